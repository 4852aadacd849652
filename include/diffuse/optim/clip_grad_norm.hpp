// clip_grad_norm: torch.nn.utils.clip_grad_norm_ over a model's parameters, on their device.
#pragma once

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <diffuse/optim/params.hpp>

namespace diffuse {

// Scales all gradients so that their global L2 norm is at most max_norm
// (torch.nn.utils.clip_grad_norm_: factor max_norm / (norm + 1e-6) when above).
// Returns the norm before clipping.
template <class T>
double clip_grad_norm(const NamedParams<T>& params, double max_norm) {
  if (detail::params_device(params, "clip_grad_norm") == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) {
      // The norm comes back to the host (one wait for the device): it decides the scale.
      backend::CudaBackend& be = backend::require_cuda("clip_grad_norm");
      const std::vector<backend::ParamSlot> slots = detail::param_slots(params, nullptr, nullptr, nullptr);
      const double norm = std::sqrt(be.grad_sq_norm(slots));
      const double c = max_norm / (norm + 1e-6);
      if (c < 1.0) be.grad_scale(slots, c);
      return norm;
    } else {
      detail::cuda_float_only("clip_grad_norm");
    }
  }
  double sq = 0;
  for (auto& [n, p] : params) {
    if (!p.has_grad()) continue;
    const T* g = p.node()->grad.data();
    for (size_t i = 0; i < p.value().size(); ++i) sq += static_cast<double>(g[i]) * g[i];
  }
  const double norm = std::sqrt(sq);
  const double c = max_norm / (norm + 1e-6);
  if (c < 1.0) {
    for (auto& [n, p] : params) {
      if (!p.has_grad()) continue;
      T* g = p.node()->grad.data();
      for (size_t i = 0; i < p.value().size(); ++i) g[i] = static_cast<T>(g[i] * c);
    }
  }
  return norm;
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(double clip_grad_norm<float>(const NamedParams<float>& params, double max_norm))

}  // namespace diffuse
