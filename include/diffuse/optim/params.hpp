// What the optimisers share: a model's named parameters (Module::named_parameters()), the
// device they live on (all on one), and the CUDA backend's view of them (value, gradient and the
// optimiser's state at the same index) for the multi-tensor kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <diffuse/core/autograd.hpp>
#include <diffuse/optim/step_record.hpp>

namespace diffuse {

template <class T>
using NamedParams = std::vector<std::pair<std::string, Var<T>>>;

namespace detail {
// The device of a parameter list (all must agree); CPU for an empty one.
template <class T>
inline Device params_device(const NamedParams<T>& params, const char* who) {
  if (params.empty()) return Device::CPU;
  const Device d = params.front().second.device();
  for (const auto& [n, p] : params)
    if (p.device() != d)
      throw std::invalid_argument(std::string("diffuse: ") + who + ": parameters on different devices (" + n + " on " +
                                  device_name(p.device()) + ", " + params.front().first + " on " + device_name(d) + ")");
  return d;
}

// The CUDA backend's view of parameters with a gradient this step: value, gradient and, when
// given, the optimiser's moments and EMA copies at the same index.
inline std::vector<backend::ParamSlot> param_slots(const NamedParams<float>& params, std::vector<Tensor<float>>* m,
                                                   std::vector<Tensor<float>>* v, std::vector<Tensor<float>>* ema) {
  std::vector<backend::ParamSlot> slots;
  for (size_t k = 0; k < params.size(); ++k) {
    const Var<float>& p = params[k].second;
    if (!p.has_grad()) continue;
    backend::ParamSlot s;
    s.w = p.node()->value.data();
    s.g = p.node()->grad.data();
    if (m) s.m = (*m)[k].data();
    if (v) s.v = (*v)[k].data();
    if (ema) s.ema = (*ema)[k].data();
    s.n = p.value().numel();
    slots.push_back(s);
  }
  return slots;
}

// Throws unless `record` can hold a StepRecord beside parameters on `d`.
inline void check_step_record(const Tensor<double>& record, Device d, const char* who) {
  if (record.numel() != kStepRecordSize || record.device() != d)
    throw std::invalid_argument(std::string("diffuse: ") + who + ": a step record is " +
                                std::to_string(kStepRecordSize) + " doubles on the parameters' device, " +
                                device_name(d));
}
// The StepRecord in `record` (null: none) for an optimiser whose parameters are on `d`.
inline const StepRecord* step_guard(const Tensor<double>* record, Device d, const char* who) {
  if (!record) return nullptr;
  check_step_record(*record, d, who);
  return reinterpret_cast<const StepRecord*>(record->data());
}
}  // namespace detail

}  // namespace diffuse
