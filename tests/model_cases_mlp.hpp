// The device ToyMLP (include/diffuse/cuda/mlp.hpp) with the device trainer (cuda/trainer.hpp)
// against the CPU ToyMLP, Adam(W), clip_grad_norm and EMA (mlp_reference.cpp): the model of
// train_2d --device cuda. Included by test_emu_mlp.cpp (g++, through the CPU emulation) and
// test_cuda_unet.cu (nvcc, on a GPU). The includer may define DIFFUSE_MODEL_TEST_SETUP: a
// statement run first in each case (the emulation installs its device memory there).
#pragma once

#include <catch2/catch.hpp>

#include <diffuse/cuda/mlp.hpp>
#include <diffuse/cuda/trainer.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>

#include "compare.hpp"
#include "kernel_seed.hpp"
#include "mlp_reference.hpp"

#ifndef DIFFUSE_MODEL_TEST_SETUP
#define DIFFUSE_MODEL_TEST_SETUP
#endif


TEST_CASE("cuda ToyMLP: eps, losses, gradient norms and AdamW + EMA + clip steps match the CPU model") {
  DIFFUSE_MODEL_TEST_SETUP
  using namespace diffuse;
  using testing::rel_err;
  const std::uint64_t seed = testing::fresh_seed();
  INFO("seed " << seed);
  const int steps = 4;
  const std::int64_t B = 37;  // not a multiple of any block size
  const testing::MLPCase k = testing::make_mlp_case(seed, steps, B);
  const testing::MLPResult ref = testing::cpu_mlp_result(k);
  cuda::ToyMLPDevice dev(k.data_dim, k.hidden, k.layers, k.temb_dim);
  dev.load(k.weights);
  {
    cuda::Graph g(&dev.params());
    const Tensor<std::int32_t> td = Tensor<std::int32_t>::from(k.t[0], {B}).cuda();
    const cuda::Act out = dev.forward(g, k.x[0].cuda(), td.data(), nullptr, B, nullptr);
    CHECK(rel_err(out->value.cpu(), ref.eps0) < 1e-5);
    g.clear();
  }
  cuda::DeviceTrainOptions o;
  o.lr = k.lr;
  o.weight_decay = k.weight_decay;
  o.decoupled = true;
  o.ema_decay = k.ema_decay;
  o.clip = k.clip;
  cuda::DeviceTrainer<cuda::ToyMLPDevice> trainer(dev, o);
  for (int s = 0; s < steps; ++s) {
    INFO("step " << s);
    const float l = trainer.step(k.x[s].cuda(), k.eps[s].cuda(), k.t[s], {}, nullptr);
    CHECK(std::fabs(l - ref.losses[s]) <= 1e-5 * std::fabs(ref.losses[s]));
    CHECK(std::fabs(trainer.last_grad_norm() - ref.grad_norms[s]) <= 1e-4 * ref.grad_norms[s]);
    CHECK(ref.grad_norms[s] > k.clip);  // clipping acts
  }
  // Judged by the change from the start (each weight moves by ~lr per step).
  std::map<std::string, Tensor<float>> w_dev, e_dev, w0;
  for (auto& [n, t] : dev.named_tensors()) w_dev[n] = t;
  for (auto& [n, t] : trainer.ema_tensors()) e_dev[n] = t;
  for (auto& [n, t] : k.weights) w0[n] = t;
  auto change = [&](const Tensor<float>& a, const std::string& n) {
    Tensor<float> d(a.shape());
    for (std::size_t i = 0; i < a.size(); ++i) d[i] = a[i] - w0[n][i];
    return d;
  };
  REQUIRE(w_dev.size() == ref.after.size());
  for (std::size_t i = 0; i < ref.after.size(); ++i) {
    const std::string& n = ref.after[i].first;
    INFO(n);
    REQUIRE(w_dev.count(n));
    CHECK(rel_err(change(w_dev[n], n), change(ref.after[i].second, n)) < 1e-3);
    CHECK(rel_err(change(e_dev[n], n), change(ref.ema_after[i].second, n)) < 1e-3);
  }

  // The state round trip: a second device model and trainer continue exactly.
  cuda::ToyMLPDevice dev2(k.data_dim, k.hidden, k.layers, k.temb_dim);
  dev2.load(dev.named_tensors());
  cuda::DeviceTrainer<cuda::ToyMLPDevice> trainer2(dev2, o);
  trainer2.set_state(trainer.state());
  CHECK(trainer.step(k.x[0].cuda(), k.eps[0].cuda(), k.t[0], {}, nullptr) ==
        trainer2.step(k.x[0].cuda(), k.eps[0].cuda(), k.t[0], {}, nullptr));
  const auto wa = dev.named_tensors(), wb = dev2.named_tensors();
  std::size_t differ = 0;
  for (std::size_t i = 0; i < wa.size(); ++i)
    differ += std::memcmp(wa[i].second.data(), wb[i].second.data(), wa[i].second.size() * sizeof(float)) != 0;
  CHECK(differ == 0);
}
