// Adam / AdamW, torch.optim.Adam(W)'s update rule (bias corrected), on the parameters' device:
// on the CPU a loop per tensor, on CUDA one launch over all parameters; opt.step(ema) also updates
// an EMA in that launch. The moments live beside the parameters; checkpoints (io/checkpoint.hpp)
// hold them by parameter name.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <diffuse/optim/ema.hpp>
#include <diffuse/optim/params.hpp>

namespace diffuse {

struct AdamOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool decoupled = false;  // true: AdamW (decay the weights), false: Adam (L2 added to the gradient)
};

// torch.optim.Adam / AdamW, step for step:
//   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
//   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// Parameters without a gradient this step are left alone, as PyTorch does.
template <class T>
class Adam {
 public:
  // The moments are made on the parameters' device: create the optimiser after model.to(device).
  Adam(NamedParams<T> params, AdamOptions o) : params_(std::move(params)), opt_(o) {
    const Device d = detail::params_device(params_, "Adam");
    for (auto& [n, p] : params_) {
      m_.push_back(Tensor<T>::zeros(p.shape(), d));
      v_.push_back(Tensor<T>::zeros(p.shape(), d));
    }
  }

  // One step for every parameter that has a gradient.
  void step() { step_impl(nullptr, nullptr); }
  // The step, then ema.update() with the new weights: on CUDA in the same launch.
  void step(EMA<T>& ema) { step_impl(&ema, nullptr); }
  // Either, skipped (weights, moments and EMA untouched; the counts advance) once `record` (a
  // StepRecord beside the weights, filled by clip_grad_norm_recorded) has seen a non-finite loss
  // or gradient norm: read on the device, so a training loop need not wait for it.
  void step(const Tensor<double>& record) { step_impl(nullptr, &record); }
  void step(EMA<T>& ema, const Tensor<double>& record) { step_impl(&ema, &record); }

 private:
  void check_state_device(Device d) const {
    for (size_t k = 0; k < params_.size(); ++k)
      if (m_[k].device() != d || v_[k].device() != d)
        throw std::invalid_argument("diffuse: Adam: the moments of " + params_[k].first + " are on " +
                                    device_name(m_[k].device()) + ", the parameter on " + device_name(d) +
                                    " (create the optimiser after model.to(device), or load its state there)");
  }
  void step_impl(EMA<T>* ema, const Tensor<double>* record);

 public:
  void step_cpu();

  void zero_grad() {
    for (auto& [n, p] : params_) p.zero_grad();
  }
  // The device of the parameters (and so of the moments).
  Device device() const { return detail::params_device(params_, "Adam"); }
  void set_lr(double lr) { opt_.lr = lr; }
  double lr() const { return opt_.lr; }
  const AdamOptions& options() const { return opt_; }
  int64_t steps() const { return t_; }
  void set_steps(int64_t t) { t_ = t; }
  const NamedParams<T>& params() const { return params_; }
  // Moment tensors, in the order of params(); for checkpoints.
  std::vector<Tensor<T>>& first_moments() { return m_; }
  std::vector<Tensor<T>>& second_moments() { return v_; }

 private:
  NamedParams<T> params_;
  AdamOptions opt_;
  std::vector<Tensor<T>> m_, v_;
  int64_t t_ = 0;
};

template <class T>
void Adam<T>::step_cpu() {
  ++t_;
  const double bc1 = 1.0 - std::pow(opt_.beta1, static_cast<double>(t_));
  const double bc2 = 1.0 - std::pow(opt_.beta2, static_cast<double>(t_));
  const T step_size = static_cast<T>(opt_.lr / bc1);
  const T bc2_sqrt = static_cast<T>(std::sqrt(bc2));
  const T b1 = static_cast<T>(opt_.beta1), b2 = static_cast<T>(opt_.beta2), eps = static_cast<T>(opt_.eps);
  const T wd = static_cast<T>(opt_.weight_decay), lr = static_cast<T>(opt_.lr);
  for (size_t k = 0; k < params_.size(); ++k) {
    Var<T>& p = params_[k].second;
    if (!p.has_grad()) continue;
    T* w = p.value().data();
    const T* g = p.node()->grad.data();
    T* m = m_[k].data();
    T* v = v_[k].data();
    // Eigen arrays so that sqrt and the divisions vectorise (a plain loop
    // with std::sqrt does not without -fno-math-errno). Same formula and
    // order of operations as torch.optim.Adam(W).
    using Arr = Eigen::Array<T, Eigen::Dynamic, 1>;
    const Eigen::Index n = static_cast<Eigen::Index>(p.value().size());
    Eigen::Map<Arr> W(w, n), M(m, n), V(v, n);
    Eigen::Map<const Arr> G(g, n);
    if (wd != T(0) && opt_.decoupled) W *= T(1) - lr * wd;
    if (wd != T(0) && !opt_.decoupled) {
      const Arr gi = G + wd * W;
      M = b1 * M + (T(1) - b1) * gi;
      V = b2 * V + (T(1) - b2) * (gi * gi);
    } else {
      M = b1 * M + (T(1) - b1) * G;
      V = b2 * V + (T(1) - b2) * (G * G);
    }
    W -= step_size * M / (V.sqrt() / bc2_sqrt + eps);
  }
}

template <class T>
void Adam<T>::step_impl(EMA<T>* ema, const Tensor<double>* record) {
  const Device d = device();
  check_state_device(d);
  const StepRecord* guard = detail::step_guard(record, d, "Adam");
  if (d == Device::CPU) {
    if (guard && guard->bad_step != 0) {  // the record is in host memory: as the device would, skip
      ++t_;
      if (ema) ema->update(record);
      return;
    }
    step_cpu();
    if (ema) ema->update();
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    backend::CudaBackend& be = backend::require_cuda("Adam");
    if (ema)
      for (size_t k = 0; k < params_.size(); ++k) ema->check_device(k);
    ++t_;
    // Fused when every parameter is stepped; otherwise the EMA moves all averages after the step.
    bool all = true;
    for (const auto& [n, p] : params_) all = all && p.has_grad();
    const bool fuse = ema && all;
    // The scalars as step_cpu() rounds them.
    const double bc1 = 1.0 - std::pow(opt_.beta1, static_cast<double>(t_));
    const double bc2 = 1.0 - std::pow(opt_.beta2, static_cast<double>(t_));
    backend::AdamArgs a{static_cast<float>(opt_.lr / bc1), static_cast<float>(std::sqrt(bc2)),
                        static_cast<float>(opt_.beta1), static_cast<float>(opt_.beta2),
                        static_cast<float>(opt_.eps), static_cast<float>(opt_.lr),
                        static_cast<float>(opt_.weight_decay), fuse ? static_cast<float>(ema->current_decay()) : 0.0f,
                        opt_.decoupled, guard};
    be.adam_step(detail::param_slots(params_, &m_, &v_, fuse ? &ema->shadow() : nullptr), a);
    if (fuse) ema->set_updates(ema->updates() + 1);
    else if (ema) ema->update(record);
  } else {
    detail::cuda_float_only("Adam");
  }
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(class Adam<float>)

}  // namespace diffuse
