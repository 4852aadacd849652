// The CPU model's side of the CUDA U-Net checks (test_cuda_unet, compiled by nvcc, cannot parse
// the CPU backend): a small U-Net with random weights, a batch, and what the CPU backend computes
// for them. Defined in unet_reference.cpp (host compiler).
#pragma once

#include <diffuse/tensor.hpp>
#include <diffuse/unet_config.hpp>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::testing {

using NamedTensors = std::vector<std::pair<std::string, Tensor<float>>>;

struct UNetCase {
  UNetConfig config;
  NamedTensors weights;  // PyTorch layouts, the CPU model's order
  Tensor<float> x, eps;  // [B, res, res, C]
  std::vector<std::int32_t> t, y;
  std::uint64_t dropout_seed = 0;
};

struct UNetResult {
  Tensor<float> out;
  float loss = 0;
  NamedTensors grads;  // one forward + backward
  NamedTensors after;  // weights after `steps` train steps (AdamW, clip 0.5, EMA 0.99) from `weights`
  std::vector<float> losses;
};

// The small model of test_emu_unet (two levels, attention with 2 heads, classes, dropout) with
// random weights and a batch of B, from `seed`.
UNetCase make_unet_case(std::uint64_t seed, std::int64_t B);
// The CPU backend on the case: forward/backward, then `steps` train steps on the same batch.
UNetResult cpu_unet_result(const UNetCase& c, int steps);
// ddpm_sample with the case's weights, guided_eps_model(labels, w), clip_x0, a cosine schedule of
// T steps, Generator(seed): [labels.size(), res, res, C].
Tensor<float> cpu_ddpm_sample(const UNetCase& c, const std::vector<std::int32_t>& labels, double w, bool clip_x0,
                              int T, std::uint64_t seed);

}  // namespace diffuse::testing
