// The CUDA U-Net (include/diffuse/cuda/unet.hpp) on a GPU against the CPU model: the native twin
// of test_emu_unet (which runs the same device code through the emulation). The CPU side is in
// unet_reference.cpp (host compiler). Also the device ToyMLP's cases (model_cases_mlp.hpp,
// mlp_reference.cpp), test_emu_mlp's twin. Skipped (exit 77) without a GPU; main() in catch_main.cpp
// with the gate of cuda_test_main.cpp.
#include <catch2/catch.hpp>

#include <diffuse/cuda/sample.hpp>
#include <diffuse/cuda/unet.hpp>

#include <cmath>
#include <cstdint>
#include <map>
#include <random>
#include <string>

#include "compare.hpp"
#include "kernel_seed.hpp"
#include "model_cases_mlp.hpp"
#include "unet_reference.hpp"

using namespace diffuse;

namespace {
using testing::rel_err;  // compare.hpp
bool is_key_bias(const std::string& n) { return n.size() > 7 && n.compare(n.size() - 7, 7, ".k.bias") == 0; }
}  // namespace

TEST_CASE("cuda UNet on the GPU: forward, gradients and train steps match the CPU model") {
  const std::uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  const testing::UNetCase k = testing::make_unet_case(seed, 3);
  const int steps = 3;
  const testing::UNetResult ref = testing::cpu_unet_result(k, steps);

  cuda::UNetDevice dev(k.config);
  dev.load(k.weights);
  Generator g(k.dropout_seed);
  const std::int64_t B = static_cast<std::int64_t>(k.t.size());
  {
    cuda::Graph graph(&dev.params());
    for (cuda::Param& p : dev.params()) p.grad.copy_from(Tensor<float>::zeros(p.shape));
    const Tensor<std::int32_t> td = Tensor<std::int32_t>::from(k.t, {B}).cuda();
    const Tensor<std::int32_t> yd = Tensor<std::int32_t>::from(k.y, {B}).cuda();
    const cuda::Act out = dev.forward(graph, k.x.cuda(), td.data(), yd.data(), B, &g);
    const cuda::Act loss = graph.mse(out, k.eps.cuda());
    graph.backward(loss);
    CHECK(rel_err(out->value.cpu(), ref.out) < 1e-5);
    CHECK(std::fabs(loss->value.cpu()[0] - ref.loss) <= 1e-5 * std::fabs(ref.loss));
    // By name: the two models list their parameters in different orders.
    std::map<std::string, Tensor<float>> grads;
    for (auto& [n, t] : dev.named_tensors(cuda::UNetDevice::Which::Grad)) grads[n] = t;
    REQUIRE(grads.size() == ref.grads.size());
    for (const auto& [n, t] : ref.grads) {
      INFO(n);
      REQUIRE(grads.count(n));
      if (is_key_bias(n)) continue;  // 0 up to rounding (see test_emu_unet)
      CHECK(rel_err(grads[n], t) < 1e-4);
    }
  }
  cuda::UNetTrainOptions o;
  o.lr = 2e-3;
  o.weight_decay = 0.01;
  o.decoupled = true;
  o.ema_decay = 0.99;
  o.clip = 0.5;
  cuda::UNetTrainer trainer(dev, o);
  const Tensor<float> xd = k.x.cuda(), ed = k.eps.cuda();
  for (int s = 0; s < steps; ++s) {
    const float l = trainer.step(xd, ed, k.t, k.y, &g);
    CHECK(std::fabs(l - ref.losses[static_cast<size_t>(s)]) <= 1e-4 * std::fabs(ref.losses[static_cast<size_t>(s)]));
  }
  std::map<std::string, Tensor<float>> after;
  for (auto& [n, t] : dev.named_tensors()) after[n] = t;
  REQUIRE(after.size() == ref.after.size());
  for (size_t i = 0; i < ref.after.size(); ++i) {
    const std::string& n = ref.after[i].first;
    INFO(n);
    REQUIRE(after.count(n));
    if (is_key_bias(n)) continue;
    const Tensor<float>& w0 = k.weights[i].second;  // same order as ref.after (the CPU model's)
    Tensor<float> dd(w0.shape()), dc(w0.shape());
    for (size_t j = 0; j < dd.size(); ++j) {
      dd[j] = after[n][j] - w0[j];
      dc[j] = ref.after[i].second[j] - w0[j];
    }
    CHECK(rel_err(dd, dc) < 1e-3);
  }
}

TEST_CASE("cuda UNet on the GPU: DDPM sampling with guidance gives the CPU sampler's images for the same seed") {
  const std::uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  const testing::UNetCase k = testing::make_unet_case(seed, 2);
  cuda::UNetDevice dev(k.config);
  dev.load(k.weights);
  const std::vector<std::int32_t> labels{0, 2};
  const int T = 20;
  for (auto [w, clip] : {std::pair<double, bool>{0.0, false}, {0.7, true}}) {
    INFO("guidance " << w << " clip_x0 " << clip);
    const Tensor<float> ref = testing::cpu_ddpm_sample(k, labels, w, clip, T, seed + 5);
    Generator g(seed + 5);
    cuda::DeviceSampleOptions o;
    o.clip_x0 = clip;
    o.guidance = w;
    const Tensor<float> got = cuda::ddpm_sample(dev, NoiseSchedule::cosine(T), 2, labels, g, o);
    // Float rounding through T network passes, and the device's normals (logf/sinf/cosf within a
    // few ulp of glibc's): 1e-3 of the images.
    CHECK(rel_err(got, ref) < 1e-3);
  }
}
