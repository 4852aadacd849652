// CPU side of the device ToyMLP tests (test_emu_mlp through the emulation, test_cuda_unet on a
// GPU): a random case and the CPU model's results on it. Defined in mlp_reference.cpp (host
// compiler: nvcc never parses the CPU autograd).
#pragma once

#include <diffuse/tensor.hpp>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::testing {

struct MLPCase {
  std::int64_t data_dim = 2, hidden = 24, layers = 3, temb_dim = 16;  // ToyMLP with SiLU
  std::vector<std::pair<std::string, Tensor<float>>> weights;         // the CPU model's names
  std::vector<Tensor<float>> x, eps;                                   // one batch per step, [B, 2]
  std::vector<std::vector<std::int32_t>> t;                            // timesteps 0..49, repeats included
  double lr = 1e-2, weight_decay = 0.01, ema_decay = 0.9, clip = 0.02;  // AdamW; clip below the norms (~0.1-0.3)
};

struct MLPResult {
  Tensor<float> eps0;  // the model's output on the first batch, before training
  std::vector<float> losses;
  std::vector<double> grad_norms;  // before clipping
  std::vector<std::pair<std::string, Tensor<float>>> after, ema_after;
};

// Random weights (the CPU model's initialisation from seed) and `steps` batches of B points.
MLPCase make_mlp_case(std::uint64_t seed, int steps, std::int64_t B);
// The CPU ToyMLP, Adam(W), clip_grad_norm and EMA, one step per batch.
MLPResult cpu_mlp_result(const MLPCase& c);

}  // namespace diffuse::testing
