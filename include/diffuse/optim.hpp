// Optimisers and training helpers: Adam / AdamW (PyTorch's update rule, bias
// corrected), global gradient-norm clipping, EMA of weights, learning-rate warmup.
//
// They work on parameters of either device (all of one optimiser's on the same one): on the CPU
// a loop per tensor; on CUDA the backend's multi-tensor kernels, one launch over all parameters
// (Adam and the EMA update together when stepped with opt.step(ema)). The state (moments, EMA
// copies) lives beside the parameters; checkpoints (checkpoint.hpp) hold it by parameter name.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "autograd.hpp"

namespace diffuse {

template <class T>
using NamedParams = std::vector<std::pair<std::string, Var<T>>>;

template <class T>
class EMA;

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
}  // namespace detail

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
  void step() { step_impl(nullptr); }
  // The step, then ema.update() with the new weights: on CUDA in the same launch.
  void step(EMA<T>& ema) { step_impl(&ema); }

 private:
  void check_state_device(Device d) const {
    for (size_t k = 0; k < params_.size(); ++k)
      if (m_[k].device() != d || v_[k].device() != d)
        throw std::invalid_argument("diffuse: Adam: the moments of " + params_[k].first + " are on " +
                                    device_name(m_[k].device()) + ", the parameter on " + device_name(d) +
                                    " (create the optimiser after model.to(device), or load its state there)");
  }
  void step_impl(EMA<T>* ema);

 public:
  void step_cpu() {
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

// Scales all gradients so that their global L2 norm is at most max_norm
// (torch.nn.utils.clip_grad_norm_: factor max_norm / (norm + 1e-6) when above).
// Returns the norm before clipping.
template <class T>
inline double clip_grad_norm(const NamedParams<T>& params, double max_norm) {
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
  void update() {
    if (detail::params_device(params_, "EMA") == Device::CUDA) {
      if constexpr (std::is_same_v<T, float>) {
        std::vector<backend::ParamSlot> slots;
        for (size_t k = 0; k < params_.size(); ++k) {
          check_device(k);
          slots.push_back({params_[k].second.node()->value.data(), nullptr, nullptr, nullptr, shadow_[k].data(),
                           shadow_[k].numel()});
        }
        backend::require_cuda("EMA").ema_update(slots, static_cast<float>(current_decay()));
        ++updates_;
        return;
      } else {
        detail::cuda_float_only("EMA");
      }
    }
    const T d = static_cast<T>(current_decay());
    for (size_t k = 0; k < params_.size(); ++k) {
      const T* w = params_[k].second.value().data();
      T* s = shadow_[k].data();
      for (size_t i = 0; i < shadow_[k].size(); ++i) s[i] = d * s[i] + (T(1) - d) * w[i];
    }
    ++updates_;
  }
  // Exchanges the live weights and the averages (call twice to restore): the tensors' handles,
  // so nothing is copied on either device.
  void swap_into_model() {
    for (size_t k = 0; k < params_.size(); ++k) {
      check_device(k);
      std::swap(params_[k].second.node()->value, shadow_[k]);
    }
  }
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
inline void Adam<T>::step_impl(EMA<T>* ema) {
  const Device d = device();
  check_state_device(d);
  if (d == Device::CPU) {
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
                        opt_.decoupled};
    be.adam_step(detail::param_slots(params_, &m_, &v_, fuse ? &ema->shadow() : nullptr), a);
    if (fuse) ema->set_updates(ema->updates() + 1);
    else if (ema) ema->update();
  } else {
    detail::cuda_float_only("Adam");
  }
}

// Linear warmup from lr/warmup to lr over the first `warmup` steps (step counts from 0).
inline double warmup_lr(double lr, int64_t step, int64_t warmup) {
  if (warmup <= 0) return lr;
  return lr * std::min(1.0, static_cast<double>(step + 1) / static_cast<double>(warmup));
}

// Warmup, then a cosine decay from lr to lr * final_frac at step `total`
// (Loshchilov & Hutter's schedule without restarts). Step counts from 0.
inline double warmup_cosine_lr(double lr, int64_t step, int64_t warmup, int64_t total, double final_frac = 0.0) {
  if (step < warmup) return warmup_lr(lr, step, warmup);
  const double span = static_cast<double>(std::max<int64_t>(1, total - warmup));
  const double p = std::min(1.0, static_cast<double>(step - warmup) / span);
  return lr * (final_frac + (1.0 - final_frac) * 0.5 * (1.0 + std::cos(3.14159265358979323846 * p)));
}

}  // namespace diffuse
