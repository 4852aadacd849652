// EMA<T>: exponential moving average of a model's weights (with warmup), updated on the
// parameters' device; swap_into_model() exchanges the live weights and the averages.
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

// Exponential moving average of the weights: shadow = d shadow + (1 - d) w.
// With warmup, d = min(decay, (1 + n) / (10 + n)) after n updates, so early
// averages are not dominated by the random initial weights.
template <class T>
class EMA {
 public:
  EMA(const NamedParams<T>& params, double decay, bool warmup = true)
      : params_(params), decay_(decay), warmup_(warmup) {
    detail::params_device(params_, "EMA");
    for (auto& [n, p] : params_) shadow_.push_back(p.value().clone());
  }
  double current_decay() const {
    return warmup_ ? std::min(decay_, (1.0 + updates_) / (10.0 + updates_)) : decay_;
  }
  void update() { update(nullptr); }
  // The update unless `record` (a StepRecord beside the weights, optim/step_record.hpp) has seen a
  // non-finite step: read where it lies, so nothing waits for the device. The count advances either way.
  void update(const Tensor<double>* record);
  // Exchanges the live weights and the averages (call twice to restore): the tensors' handles,
  // so nothing is copied on either device.
  void swap_into_model();
  // Throws unless the average of parameter k lies beside it (create the EMA after model.to(device)).
  void check_device(size_t k) const {
    if (shadow_[k].device() != params_[k].second.device() || shadow_[k].shape() != params_[k].second.shape())
      throw std::invalid_argument("diffuse: EMA: the average of " + params_[k].first + " is a " +
                                  shape_str(shadow_[k].shape()) + " tensor on " + device_name(shadow_[k].device()) +
                                  ", the parameter " + shape_str(params_[k].second.shape()) + " on " +
                                  device_name(params_[k].second.device()));
  }
  const NamedParams<T>& params() const { return params_; }
  std::vector<Tensor<T>>& shadow() { return shadow_; }
  int64_t updates() const { return updates_; }
  void set_updates(int64_t n) { updates_ = n; }
  double decay() const { return decay_; }

 private:
  NamedParams<T> params_;
  std::vector<Tensor<T>> shadow_;
  double decay_;
  bool warmup_;
  int64_t updates_ = 0;
};

template <class T>
void EMA<T>::update(const Tensor<double>* record) {
  const Device dev = detail::params_device(params_, "EMA");
  const StepRecord* guard = detail::step_guard(record, dev, "EMA");
  if (dev == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) {
      std::vector<backend::ParamSlot> slots;
      for (size_t k = 0; k < params_.size(); ++k) {
        check_device(k);
        slots.push_back({params_[k].second.node()->value.data(), nullptr, nullptr, nullptr, shadow_[k].data(),
                         shadow_[k].numel()});
      }
      backend::require_cuda("EMA").ema_update(slots, static_cast<float>(current_decay()), guard);
      ++updates_;
      return;
    } else {
      detail::cuda_float_only("EMA");
    }
  }
  if (guard && guard->bad_step != 0) {  // on the CPU the record is in host memory
    ++updates_;
    return;
  }
  const T d = static_cast<T>(current_decay());
  for (size_t k = 0; k < params_.size(); ++k) {
    const T* w = params_[k].second.value().data();
    T* s = shadow_[k].data();
    for (size_t i = 0; i < shadow_[k].size(); ++i) s[i] = d * s[i] + (T(1) - d) * w[i];
  }
  ++updates_;
}

template <class T>
void EMA<T>::swap_into_model() {
  for (size_t k = 0; k < params_.size(); ++k) {
    check_device(k);
    std::swap(params_[k].second.node()->value, shadow_[k]);
  }
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(class EMA<float>)

}  // namespace diffuse
