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
#include <diffuse/optim/step_record.hpp>

namespace diffuse {

namespace detail {
// The sum of the squared gradients in double, tensor after tensor (torch's order up to its own).
template <class T>
double grad_sq_sum_cpu(const NamedParams<T>& params) {
  double sq = 0;
  for (auto& [n, p] : params) {
    if (!p.has_grad()) continue;
    const T* g = p.node()->grad.data();
    for (size_t i = 0; i < p.value().size(); ++i) sq += static_cast<double>(g[i]) * g[i];
  }
  return sq;
}
template <class T>
void grad_scale_cpu(const NamedParams<T>& params, double c) {
  for (auto& [n, p] : params) {
    if (!p.has_grad()) continue;
    T* g = p.node()->grad.data();
    for (size_t i = 0; i < p.value().size(); ++i) g[i] = static_cast<T>(g[i] * c);
  }
}
}  // namespace detail

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
  const double norm = std::sqrt(detail::grad_sq_sum_cpu(params));
  const double c = max_norm / (norm + 1e-6);
  if (c < 1.0) detail::grad_scale_cpu(params, c);
  return norm;
}

// clip_grad_norm for a training loop that does not wait for its device: the sum of the squared
// gradients, the loss (a 1-element tensor) and the step's number (1-based) go into `record` (a
// StepRecord: kStepRecordSize doubles on the parameters' device, optim/step_record.hpp), which
// decides the clipping factor and notes a non-finite loss or norm; the gradients are scaled by
// that factor. On CUDA it is all queued and nothing comes back; the numbers are clip_grad_norm's.
template <class T>
void clip_grad_norm_recorded(const NamedParams<T>& params, double max_norm, const Tensor<T>& loss, int64_t step,
                             Tensor<double>& record) {
  const Device d = detail::params_device(params, "clip_grad_norm_recorded");
  detail::check_step_record(record, d, "clip_grad_norm_recorded");
  if (loss.numel() != 1 || loss.device() != d)
    throw std::invalid_argument(std::string("diffuse: clip_grad_norm_recorded: the loss must be 1 element on the parameters' device, ") +
                                device_name(d));
  StepRecord* r = reinterpret_cast<StepRecord*>(record.data());
  if (d == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) {
      backend::require_cuda("clip_grad_norm_recorded")
          .grad_clip_recorded(detail::param_slots(params, nullptr, nullptr, nullptr), max_norm, loss.data(), step, r);
      return;
    } else {
      detail::cuda_float_only("clip_grad_norm_recorded");
    }
  }
  step_record_add(*r, detail::grad_sq_sum_cpu(params), static_cast<double>(loss.data()[0]), max_norm,
                  static_cast<double>(step));
  if (r->scale < 1.0) detail::grad_scale_cpu(params, r->scale);
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(double clip_grad_norm<float>(const NamedParams<float>& params, double max_norm))
DIFFUSE_FLOAT_INSTANCE(void clip_grad_norm_recorded<float>(const NamedParams<float>& params, double max_norm,
                                                           const Tensor<float>& loss, int64_t step,
                                                           Tensor<double>& record))

}  // namespace diffuse
