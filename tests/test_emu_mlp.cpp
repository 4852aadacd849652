// The device ToyMLP (include/diffuse/cuda/mlp.hpp) and the generic device trainer
// (cuda/trainer.hpp) against the CPU ToyMLP and its Adam / EMA / clip_grad_norm, through the CPU
// emulation (train_2d --device cuda's model). Fresh random weights, inputs and timesteps.
#include <catch2/catch.hpp>

#include <diffuse/cuda/mlp.hpp>
#include <diffuse/cuda/trainer.hpp>
#include <diffuse/layers/mlp.hpp>
#include <diffuse/optim.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "kernel_seed.hpp"

using namespace diffuse;

namespace {

double rel_err(const Tensor<float>& a, const Tensor<float>& b) {
  REQUIRE(a.shape() == b.shape());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

std::vector<std::pair<std::string, Tensor<float>>> values_of(const ToyMLP<float>& m) {
  std::vector<std::pair<std::string, Tensor<float>>> out;
  for (auto& [n, p] : m.named_parameters()) out.emplace_back(n, p.value());
  return out;
}

struct Batch {
  Tensor<float> x, eps;
  std::vector<std::int32_t> t;
};
// B points with timesteps from 0..T-1 (repeats included: the CPU model's first layer groups them).
Batch random_batch(std::int64_t B, int T, std::mt19937_64& gen) {
  Batch b;
  std::normal_distribution<float> d(0.0f, 1.0f);
  b.x = Tensor<float>({B, 2});
  b.eps = Tensor<float>({B, 2});
  for (float& v : b.x) v = d(gen);
  for (float& v : b.eps) v = d(gen);
  std::uniform_int_distribution<std::int32_t> pt(0, T - 1);
  for (std::int64_t i = 0; i < B; ++i) b.t.push_back(pt(gen));
  return b;
}

}  // namespace

TEST_CASE("cuda ToyMLP (emulated): eps, loss, gradients and AdamW + EMA + clip steps match the CPU model") {
  cuda::EmulatedDeviceMemory emulated;
  const std::uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  Generator init(seed);
  const ToyMLPConfig cfg{2, 24, 3, 16, Activation::SiLU};
  ToyMLP<float> cpu(cfg, init);
  cuda::ToyMLPDevice dev(cfg.data_dim, cfg.hidden, cfg.layers, cfg.temb_dim);
  REQUIRE(dev.num_parameters() == cpu.num_parameters());
  dev.load(values_of(cpu));

  // The forward alone, on 37 points (not a multiple of any block size).
  {
    const Batch b = random_batch(37, 50, gen);
    cuda::Graph g(&dev.params());
    const Tensor<std::int32_t> td = Tensor<std::int32_t>::from(b.t, {37}).cuda();
    const cuda::Act out = dev.forward(g, b.x.cuda(), td.data(), nullptr, 37, nullptr);
    NoGrad ng;
    CHECK(rel_err(out->value.cpu(), cpu(Var<float>(b.x), b.t).value()) < 1e-5);
    g.clear();
  }

  AdamOptions ao;
  ao.lr = 1e-2;
  ao.weight_decay = 0.01;
  ao.decoupled = true;
  Adam<float> opt(cpu.named_parameters(), ao);
  EMA<float> ema(cpu.named_parameters(), 0.9);
  cuda::DeviceTrainOptions to;
  to.lr = ao.lr;
  to.weight_decay = ao.weight_decay;
  to.decoupled = true;
  to.ema_decay = 0.9;
  to.clip = 0.3;
  cuda::DeviceTrainer<cuda::ToyMLPDevice> trainer(dev, to);
  std::map<std::string, Tensor<float>> w0;
  for (auto& [n, p] : cpu.named_parameters()) w0[n] = p.value().clone();
  for (int step = 0; step < 4; ++step) {
    INFO("step " << step);
    const Batch b = random_batch(33, 50, gen);
    opt.zero_grad();
    const Var<float> loss = mse(cpu(Var<float>(b.x), b.t), Var<float>(b.eps));
    backward(loss);
    const double norm_cpu = clip_grad_norm(opt.params(), to.clip);
    opt.step();
    ema.update();
    const float loss_dev = trainer.step(b.x.cuda(), b.eps.cuda(), b.t, {}, nullptr);
    CHECK(std::fabs(loss_dev - loss.value()[0]) <= 1e-5 * std::fabs(loss.value()[0]));
    CHECK(std::fabs(trainer.last_grad_norm() - norm_cpu) <= 1e-4 * norm_cpu);
  }
  // Judged by the change from the start (each weight moves by ~lr per step).
  std::map<std::string, Tensor<float>> w_dev, e_dev;
  for (auto& [n, t] : dev.named_tensors()) w_dev[n] = t;
  for (auto& [n, t] : trainer.ema_tensors()) e_dev[n] = t;
  const auto params = cpu.named_parameters();
  auto change = [&](const Tensor<float>& a, const std::string& n) {
    Tensor<float> d(a.shape());
    for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - w0[n][i];
    return d;
  };
  REQUIRE(w_dev.size() == params.size());
  for (size_t k = 0; k < params.size(); ++k) {
    const std::string& n = params[k].first;
    INFO(n);
    CHECK(rel_err(change(w_dev[n], n), change(params[k].second.value(), n)) < 1e-3);
    CHECK(rel_err(change(e_dev[n], n), change(ema.shadow()[k], n)) < 1e-3);
  }

  // The state round trip: a second device model and trainer continue exactly.
  cuda::ToyMLPDevice dev2(cfg.data_dim, cfg.hidden, cfg.layers, cfg.temb_dim);
  dev2.load(dev.named_tensors());
  cuda::DeviceTrainer<cuda::ToyMLPDevice> trainer2(dev2, to);
  trainer2.set_state(trainer.state());
  const Batch b = random_batch(16, 50, gen);
  CHECK(trainer.step(b.x.cuda(), b.eps.cuda(), b.t, {}, nullptr) ==
        trainer2.step(b.x.cuda(), b.eps.cuda(), b.t, {}, nullptr));
  const auto wa = dev.named_tensors(), wb = dev2.named_tensors();
  size_t differ = 0;
  for (size_t k = 0; k < wa.size(); ++k)
    differ += std::memcmp(wa[k].second.data(), wb[k].second.data(), wa[k].second.size() * sizeof(float)) != 0;
  CHECK(differ == 0);
}

TEST_CASE("cuda ToyMLP (emulated): load refuses a model of other sizes, forward refuses labels") {
  cuda::EmulatedDeviceMemory emulated;
  Generator init(3);
  ToyMLP<float> cpu(ToyMLPConfig{2, 16, 2, 8, Activation::SiLU}, init);
  cuda::ToyMLPDevice wider(2, 32, 2, 8), deeper(2, 16, 3, 8);
  CHECK_THROWS_WITH(wider.load(values_of(cpu)), Catch::Contains("net.0.weight has shape"));
  CHECK_THROWS_WITH(deeper.load(values_of(cpu)), Catch::Contains("net.4.weight has shape [2, 16], expected [16, 16]"));
  cuda::ToyMLPDevice same(2, 16, 2, 8);
  same.load(values_of(cpu));
  cuda::Graph g(&same.params());
  const Tensor<float> x = Tensor<float>::zeros({2, 2}).cuda();
  const Tensor<std::int32_t> t = Tensor<std::int32_t>::from({1, 2}, {2}).cuda();
  CHECK_THROWS_WITH(same.forward(g, x, t.data(), t.data(), 2, nullptr), Catch::Contains("no classes"));
  CHECK_THROWS_WITH(same.forward(g, x, t.data(), nullptr, 3, nullptr), Catch::Contains("expected [3, 2]"));
}
