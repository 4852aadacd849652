// CPU references for the Adam(W) + EMA kernel test and the gradient-norm kernels (grad_norm.cuh): the CPU backend's Adam<float> and EMA<float>
// (include/diffuse/optim/optimizers.hpp), one step. Defined in kernel_reference_adam.cpp (host compiler).
#pragma once

#include <cstdint>
#include <vector>

namespace diffuse::testing {

struct AdamState {
  std::vector<std::vector<float>> p, g, m, v, ema;  // one vector per tensor
};

// One Adam(W) step number t (m and v hold the moments after step t - 1), then one EMA update
// with decay ema_decay (no warmup). Returns p, m, v, ema after the step (g unchanged).
AdamState cpu_adam_ema(const AdamState& s, double lr, double beta1, double beta2, double eps, double weight_decay,
                       bool decoupled, std::int64_t t, double ema_decay);

// The CPU backend's clip_grad_norm (optim/adam.hpp, clip_grad_norm.hpp) on gradients g (one vector per tensor), in place;
// returns the norm before clipping.
double cpu_clip_grad_norm(std::vector<std::vector<float>>& g, double max_norm);

}  // namespace diffuse::testing
