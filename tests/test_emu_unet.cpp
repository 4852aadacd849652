// The CUDA U-Net (include/diffuse/cuda/unet.hpp) against the CPU model, through the CPU emulation:
// every kernel of a train step runs through the emulation, cuBLAS and cuDNN are their host
// fallbacks, device memory is host memory. Same weights, inputs, timesteps, labels and dropout
// seed: the forward output, the loss, every parameter's gradient, and the weights and EMA after
// Adam steps with gradient clipping must match the CPU backend up to float rounding.
//
// The small model of unet_reference.cpp (shared with test_cuda_unet): two levels (a skip conv, a
// downsample, an upsample), attention with 2 heads in the down and up paths and the middle,
// class conditioning, dropout.
#include <catch2/catch.hpp>

#include <diffuse/cuda/profile.hpp>
#include <diffuse/cuda/sample.hpp>
#include <diffuse/cuda/unet.hpp>
#include <diffuse/diffusion.hpp>
#include <diffuse/guidance.hpp>
#include <diffuse/layers/unet.hpp>
#include <diffuse/optim.hpp>

#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "compare.hpp"
#include "kernel_seed.hpp"
#include "unet_reference.hpp"

using namespace diffuse;

namespace {

using testing::rel_err;  // compare.hpp

// The case's random weights (random everywhere: the zero-initialised convs would hide their
// gradients' paths; GroupNorm gains around 1) into a CPU UNet of its config.
void load_case(UNet<float>& m, const testing::UNetCase& k) {
  auto params = m.named_parameters();
  for (size_t i = 0; i < params.size(); ++i) params[i].second.value().copy_from(k.weights[i].second);
}

// An attention block's key bias adds the same vector to every key, which shifts each query's
// logits by one constant: softmax ignores it, so its gradient is 0 up to rounding, and Adam turns
// that noise into +-lr steps of arbitrary sign on either device. Compared separately.
bool is_key_bias(const std::string& n) { return n.size() > 7 && n.compare(n.size() - 7, 7, ".k.bias") == 0; }
double norm(const Tensor<float>& t) {
  double s = 0;
  for (float v : t) s += static_cast<double>(v) * v;
  return std::sqrt(s);
}
Tensor<float> cpu_grad(const UNet<float>& m, const std::string& name) {
  for (auto& [n, p] : m.named_parameters())
    if (n == name) return p.grad();
  FAIL("no parameter " << name);
  return {};
}

std::vector<std::pair<std::string, Tensor<float>>> values_of(const UNet<float>& m) {
  std::vector<std::pair<std::string, Tensor<float>>> out;
  for (auto& [n, p] : m.named_parameters()) out.emplace_back(n, p.value());
  return out;
}

struct Batch {
  Tensor<float> x, eps;
  std::vector<std::int32_t> t, y;
};
Batch random_batch(const UNetConfig& c, int64_t B, std::mt19937_64& gen) {
  Batch b;
  std::normal_distribution<float> d(0.0f, 1.0f);
  b.x = Tensor<float>({B, c.resolution, c.resolution, c.in_ch});
  b.eps = Tensor<float>(b.x.shape());
  for (float& v : b.x) v = d(gen);
  for (float& v : b.eps) v = d(gen);
  std::uniform_int_distribution<std::int32_t> pt(0, 999), py(0, static_cast<std::int32_t>(c.num_classes));
  for (int64_t i = 0; i < B; ++i) {
    b.t.push_back(pt(gen));
    b.y.push_back(py(gen));
  }
  return b;
}

}  // namespace

TEST_CASE("cuda UNet (emulated): forward, loss and every parameter gradient match the CPU model") {
  cuda::EmulatedDeviceMemory emulated;
  const std::uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  const testing::UNetCase k = testing::make_unet_case(seed, 1);
  const UNetConfig& c = k.config;
  Generator init(1);
  UNet<float> cpu(c, init);
  load_case(cpu, k);
  cuda::UNetDevice dev(c);
  REQUIRE(dev.num_parameters() == cpu.num_parameters());
  dev.load(values_of(cpu));
  const Batch b = random_batch(c, 3, gen);

  // CPU: forward with dropout from gc, MSE, backward.
  Generator gc(seed ^ 0x5eedu), gd(seed ^ 0x5eedu);
  const Var<float> out_cpu = cpu(Var<float>(b.x), b.t, &b.y, &gc);
  const Var<float> loss_cpu = mse(out_cpu, Var<float>(b.eps));
  backward(loss_cpu);

  // Device: the same with gd (same seed): the dropout masks must be drawn at the same offsets.
  cuda::Graph g(&dev.params());
  for (cuda::Param& p : dev.params()) p.grad.copy_from(Tensor<float>::zeros(p.shape));
  const Tensor<std::int32_t> td = Tensor<std::int32_t>::from(b.t, {3}).cuda(), yd = Tensor<std::int32_t>::from(b.y, {3}).cuda();
  const cuda::Act out_dev = dev.forward(g, b.x.cuda(), td.data(), yd.data(), 3, &gd);
  CHECK(gd.offset == gc.offset);
  const cuda::Act loss_dev = g.mse(out_dev, b.eps.cuda());
  g.backward(loss_dev);

  // Float rounding through ~20 layers in a different order of summation: ~1e-6 relative; 1e-4
  // leaves room for the amplification by the normalisations, and catches any wrong term (which
  // shows at 1e-2 or more).
  const double out_err = rel_err(out_dev->value.cpu(), out_cpu.value());
  INFO("output relative error " << out_err);
  CHECK(out_err < 1e-5);
  const float ld = loss_dev->value.cpu()[0], lc = loss_cpu.value()[0];
  CHECK(std::fabs(ld - lc) <= 1e-5 * std::fabs(lc));

  std::map<std::string, Tensor<float>> grads;
  for (auto& [n, t] : dev.named_tensors(cuda::UNetDevice::Which::Grad)) grads[n] = t;
  size_t compared = 0;
  for (auto& [n, p] : cpu.named_parameters()) {
    INFO(n);
    REQUIRE(p.has_grad());
    REQUIRE(grads.count(n));
    if (is_key_bias(n)) {
      // Exactly 0 in exact arithmetic (see is_key_bias): both sides hold rounding noise only,
      // far below the query bias's gradient.
      const double ref = norm(cpu_grad(cpu, n.substr(0, n.size() - 6) + "q.bias"));
      CHECK(norm(grads[n]) < 1e-4 * ref);
      CHECK(norm(p.grad()) < 1e-4 * ref);
      ++compared;
      continue;
    }
    const double e = rel_err(grads[n], p.grad());
    INFO("relative error " << e);
    CHECK(e < 1e-4);
    ++compared;
  }
  CHECK(compared == grads.size());
}

TEST_CASE("cuda UNet (emulated): train steps (clipping, Adam, EMA) match the CPU trainer") {
  cuda::EmulatedDeviceMemory emulated;
  const std::uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  const testing::UNetCase k = testing::make_unet_case(seed, 1);
  const UNetConfig& c = k.config;
  Generator init(1);
  UNet<float> cpu(c, init);
  load_case(cpu, k);
  cuda::UNetDevice dev(c);
  dev.load(values_of(cpu));

  AdamOptions ao;
  ao.lr = 2e-3;
  ao.weight_decay = 0.01;
  ao.decoupled = true;
  Adam<float> opt(cpu.named_parameters(), ao);
  EMA<float> ema(cpu.named_parameters(), 0.99);
  cuda::UNetTrainOptions to;
  to.lr = ao.lr;
  to.weight_decay = ao.weight_decay;
  to.decoupled = true;
  to.ema_decay = 0.99;
  to.clip = 0.5;  // below the gradient norms of these random weights: clipping acts
  cuda::UNetTrainer trainer(dev, to);
  std::map<std::string, Tensor<float>> w0;
  for (auto& [n, p] : cpu.named_parameters()) w0[n] = p.value().clone();

  Generator gc(seed + 1), gd(seed + 1);
  for (int step = 0; step < 3; ++step) {
    INFO("step " << step);
    const Batch b = random_batch(c, 2, gen);
    opt.zero_grad();
    const Var<float> loss = mse(cpu(Var<float>(b.x), b.t, &b.y, &gc), Var<float>(b.eps));
    backward(loss);
    const double norm_cpu = clip_grad_norm(opt.params(), to.clip);
    opt.step();
    ema.update();
    const float loss_dev = trainer.step(b.x.cuda(), b.eps.cuda(), b.t, b.y, &gd);
    CHECK(std::fabs(loss_dev - loss.value()[0]) <= 1e-5 * std::fabs(loss.value()[0]));
    CHECK(std::fabs(trainer.last_grad_norm() - norm_cpu) <= 1e-4 * norm_cpu);
    CHECK(norm_cpu > to.clip);
  }
  // Weights and EMA after the steps, judged by their change from the start: each weight moved by
  // ~lr per step, so a wrong update would hide under the weight's own size. Adam's first updates
  // are nearly sign(g) lr, so gradient rounding moves them little except where a gradient is
  // near 0 (then m / sqrt(v) is sensitive): 1e-3 of the change, ~2e-5 of the weights.
  std::map<std::string, Tensor<float>> w_dev, e_dev;
  for (auto& [n, t] : dev.named_tensors()) w_dev[n] = t;
  for (auto& [n, t] : trainer.ema_tensors()) e_dev[n] = t;
  const auto params = cpu.named_parameters();
  auto change = [&](const Tensor<float>& a, const std::string& n) {
    Tensor<float> d(a.shape());
    for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - w0[n][i];
    return d;
  };
  for (size_t k = 0; k < params.size(); ++k) {
    const std::string& n = params[k].first;
    INFO(n);
    if (is_key_bias(n)) continue;  // noise-driven updates (see is_key_bias); checked in the gradient test
    const Tensor<float>& w = params[k].second.value();
    CHECK(rel_err(change(w_dev[n], n), change(w, n)) < 1e-3);
    CHECK(rel_err(change(e_dev[n], n), change(ema.shadow()[k], n)) < 1e-3);
    CHECK(rel_err(w_dev[n], w) < 1e-4);
  }
}

TEST_CASE("cuda UNet (emulated): the trainer's state round-trips, so a resumed run continues exactly") {
  cuda::EmulatedDeviceMemory emulated;
  const std::uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  const testing::UNetCase k = testing::make_unet_case(seed, 1);
  const UNetConfig& c = k.config;
  Generator init(1);
  UNet<float> cpu(c, init);
  load_case(cpu, k);
  cuda::UNetTrainOptions to;
  to.lr = 2e-3;
  to.ema_decay = 0.99;
  to.clip = 0.5;
  cuda::UNetDevice a(c);
  a.load(values_of(cpu));
  cuda::UNetTrainer ta(a, to);
  Generator ga(seed + 2);
  for (int s = 0; s < 2; ++s) {
    const Batch b = random_batch(c, 2, gen);
    ta.step(b.x.cuda(), b.eps.cuda(), b.t, b.y, &ga);
  }
  // A second model and trainer from the first one's weights and state (as a checkpoint would).
  cuda::UNetDevice bnet(c);
  bnet.load(a.named_tensors());
  cuda::UNetTrainer tb(bnet, to);
  const cuda::UNetTrainer::State st = ta.state();
  CHECK(st.steps == 2);
  CHECK(st.ema_updates == 2);
  tb.set_state(st);
  Generator gb = ga;
  const Batch b = random_batch(c, 2, gen);
  const float la = ta.step(b.x.cuda(), b.eps.cuda(), b.t, b.y, &ga);
  const float lb = tb.step(b.x.cuda(), b.eps.cuda(), b.t, b.y, &gb);
  CHECK(la == lb);
  const auto wa = a.named_tensors(), wb = bnet.named_tensors();
  const auto ea = ta.ema_tensors(), eb = tb.ema_tensors();
  const cuda::UNetTrainer::State sa = ta.state(), sb = tb.state();
  REQUIRE(wa.size() == wb.size());
  size_t differ = 0;
  auto same = [](const Tensor<float>& x, const Tensor<float>& y) {
    return x.shape() == y.shape() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
  };
  for (size_t k = 0; k < wa.size(); ++k)
    differ += !same(wa[k].second, wb[k].second) + !same(ea[k].second, eb[k].second) + !same(sa.m[k].second, sb.m[k].second) +
              !same(sa.v[k].second, sb.v[k].second);
  CHECK(differ == 0);
}

TEST_CASE("cuda UNet (emulated): DDPM sampling with guidance gives the CPU sampler's images for the same seed") {
  cuda::EmulatedDeviceMemory emulated;
  const std::uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  const testing::UNetCase k = testing::make_unet_case(seed, 1);
  const UNetConfig& c = k.config;
  Generator init(1);
  UNet<float> cpu(c, init);
  load_case(cpu, k);
  cuda::UNetDevice dev(c);
  dev.load(values_of(cpu));
  const NoiseSchedule sched = NoiseSchedule::cosine(6);  // linear needs T >= 50 (its betas scale with 1000 / T)
  const std::vector<std::int32_t> labels{0, 2};
  for (auto [w, clip] : {std::pair<double, bool>{0.0, false}, {0.7, true}}) {
    {
      INFO("guidance " << w << " clip_x0 " << clip);
      SampleOptions so;
      so.clip_x0 = clip;
      Generator gc(seed + 5), gd(seed + 5);
      const ClassEpsModel<float> f = [&](const Tensor<float>& x, const std::vector<int32_t>& t,
                                         const std::vector<int32_t>& y) { return cpu(Var<float>(x), t, &y).value(); };
      const Tensor<float> ref = ddpm_sample<float>(sched, guided_eps_model<float>(f, labels, 3, w),
                                                   {2, c.resolution, c.resolution, c.in_ch}, gc, so);
      cuda::DeviceSampleOptions o;
      o.clip_x0 = clip;
      o.guidance = w;
      const Tensor<float> got = cuda::ddpm_sample(dev, sched, 2, labels, gd, o);
      CHECK(gd.offset == gc.offset);
      // 6 steps of float rounding through the network (~1e-6 each), the same noise bit for bit.
      CHECK(rel_err(got, ref) < 1e-4);
    }
  }
}

TEST_CASE("cuda UNet (emulated): the op profiler sees every op of a train step, and profiling changes nothing") {
  cuda::EmulatedDeviceMemory emulated;
  const std::uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  const testing::UNetCase k = testing::make_unet_case(seed, 1);
  const UNetConfig& c = k.config;
  Generator init(1);
  UNet<float> cpu(c, init);
  load_case(cpu, k);
  cuda::UNetTrainOptions to;
  to.lr = 2e-3;
  to.clip = 0.5;
  cuda::UNetDevice a(c), b(c);
  a.load(values_of(cpu));
  b.load(values_of(cpu));
  cuda::UNetTrainer ta(a, to), tb(b, to);
  cuda::OpProfiler prof;
  tb.graph().set_profiler(&prof);
  const Batch batch = random_batch(c, 2, gen);
  Generator ga(seed + 3), gb(seed + 3);
  for (int s = 0; s < 2; ++s) {
    const float la = ta.step(batch.x.cuda(), batch.eps.cuda(), batch.t, batch.y, &ga);
    const float lb = tb.step(batch.x.cuda(), batch.eps.cuda(), batch.t, batch.y, &gb);
    CHECK(la == lb);
  }
  const auto& totals = prof.totals();
  // Every kind of op the model uses, forward and backward, plus the optimiser; each conv once per
  // step forward (the model's convs: counted from its parameters' 4-D weights).
  for (const char* op : {"conv2d fwd", "conv2d bwd data", "conv2d bwd filter+bias", "group_norm+silu fwd",
                         "group_norm+silu bwd", "group_norm fwd", "group_norm bwd", "attention fwd", "attention bwd",
                         "linear fwd", "linear bwd", "add fwd", "add bwd", "channel bias fwd", "channel bias bwd",
                         "dropout fwd", "dropout bwd", "concat fwd", "concat bwd", "upsample fwd", "upsample bwd",
                         "class embedding fwd", "class embedding bwd", "mse fwd", "mse bwd", "timestep embedding",
                         "clip grad norm", "adam+ema, zero grads"}) {
    INFO(op);
    REQUIRE(totals.count(op) == 1);
    CHECK(totals.at(op).calls > 0);
    CHECK(totals.at(op).ms >= 0.0);
  }
  std::int64_t convs = 0;
  for (const cuda::Param& p : b.params()) convs += p.shape.size() == 4;
  CHECK(totals.at("conv2d fwd").calls == 2 * convs);
  CHECK(totals.at("adam+ema, zero grads").calls == 2);
  const auto wa = a.named_tensors(), wb = b.named_tensors();
  size_t differ = 0;
  for (size_t i = 0; i < wa.size(); ++i)
    differ += std::memcmp(wa[i].second.data(), wb[i].second.data(), wa[i].second.size() * sizeof(float)) != 0;
  CHECK(differ == 0);
  prof.reset();
  CHECK(prof.totals().empty());
}
