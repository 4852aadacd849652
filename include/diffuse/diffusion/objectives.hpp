// Training objectives: what the network predicts, and how each sample's error is weighted.
//
// With alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t) and x_t = alpha x0 + sigma eps:
//   Prediction::Epsilon  the noise eps (Ho et al. 2020; L_simple)
//   Prediction::X0       the data x0
//   Prediction::V        v = alpha eps - sigma x0 (Salimans & Ho 2022)
// and back, exactly (alpha^2 + sigma^2 = 1):
//   from x0: eps = (x_t - alpha x0) / sigma
//   from v:  eps = sigma x_t + alpha v,   x0 = alpha x_t - sigma v
// Loss: mean over the batch of w_b * mean((out - target)^2). Min-SNR-gamma (Hang et al. 2023)
// weights each timestep's error as min(SNR, gamma) times the x0 error, SNR = abar / (1 - abar),
// which is, per prediction,
//   eps: min(SNR, gamma) / SNR      x0: min(SNR, gamma)      v: min(SNR, gamma) / (SNR + 1)
// (min_snr_gamma = 0: every w_b = 1, the plain loss of the prediction.) The samplers take an
// epsilon model: as_eps_model() converts an x0 or v network's output on the state's device.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <diffuse/core/autograd.hpp>
#include <diffuse/diffusion/q_sample.hpp>
#include <diffuse/diffusion/samplers.hpp>
#include <diffuse/ops/elementwise.hpp>
#include <diffuse/ops/reduce.hpp>

namespace diffuse {

enum class Prediction { Epsilon, X0, V };

inline Prediction parse_prediction(const std::string& s) {
  if (s == "eps" || s == "epsilon") return Prediction::Epsilon;
  if (s == "x0" || s == "sample") return Prediction::X0;
  if (s == "v" || s == "v_prediction") return Prediction::V;
  throw std::invalid_argument("diffuse: unknown prediction '" + s + "' (eps, x0, v)");
}

inline const char* prediction_name(Prediction p) {
  return p == Prediction::X0 ? "x0" : p == Prediction::V ? "v" : "eps";
}

struct Objective {
  Prediction prediction = Prediction::Epsilon;
  double min_snr_gamma = 0.0;  // > 0: min-SNR-gamma weighting (5 in Hang et al.); 0: off
};

namespace detail {

// [B, 1, ..., 1] of c(t_b), on `dev`, to scale the rows of a [B, ...] tensor by broadcasting.
template <class T, class F>
inline Tensor<T> row_coefficients(const std::vector<int32_t>& t, int dims, Device dev, F c) {
  Shape s(static_cast<size_t>(std::max(dims, 1)), 1);
  s[0] = static_cast<int64_t>(t.size());
  Tensor<T> k(s);
  for (size_t b = 0; b < t.size(); ++b) k[b] = static_cast<T>(c(t[b]));
  return dev == Device::CPU ? k : k.to(dev);
}

inline void check_timesteps(const NoiseSchedule& s, const std::vector<int32_t>& t) {
  for (int32_t v : t)
    if (v < 0 || v >= s.T()) throw std::out_of_range("diffuse: timestep " + std::to_string(v) + " outside [0, T)");
}

}  // namespace detail

// a x + b y with per-row coefficients (x, y [B, ...]; a, b [B, 1, ...]), through the ops (any device).
template <class T>
inline Tensor<T> rowwise_combination(const Tensor<T>& a, const Tensor<T>& x, const Tensor<T>& b, const Tensor<T>& y) {
  NoGrad ng;
  return add(mul(Var<T>(x), Var<T>(a)), mul(Var<T>(y), Var<T>(b))).value();
}

// The training target of `p` for a noised batch (nb.x0 and nb.eps on the same device).
template <class T>
inline Tensor<T> prediction_target(const NoiseSchedule& s, const NoisedBatch<T>& nb, Prediction p) {
  if (p == Prediction::Epsilon) return nb.eps;
  if (p == Prediction::X0) return nb.x0;
  detail::check_timesteps(s, nb.t);
  const int dims = nb.x0.dim();
  const Tensor<T> a = detail::row_coefficients<T>(nb.t, dims, nb.x0.device(), [&](int t) { return s.sqrt_abar[t]; });
  const Tensor<T> m = detail::row_coefficients<T>(nb.t, dims, nb.x0.device(),
                                                  [&](int t) { return -s.sqrt_one_minus_abar[t]; });
  return rowwise_combination(a, nb.eps, m, nb.x0);  // alpha eps - sigma x0
}

// Each sample's loss weight w_b (see the top of this file).
inline std::vector<double> loss_weights(const NoiseSchedule& s, const std::vector<int32_t>& t, const Objective& o) {
  detail::check_timesteps(s, t);
  std::vector<double> w(t.size(), 1.0);
  if (o.min_snr_gamma < 0 || !std::isfinite(o.min_snr_gamma))
    throw std::invalid_argument("diffuse: min-SNR gamma must be a finite number >= 0 (0: off), got " +
                                std::to_string(o.min_snr_gamma));
  if (o.min_snr_gamma == 0) return w;
  for (size_t b = 0; b < t.size(); ++b) {
    const double ab = s.abar[t[b]], snr = ab / (1 - ab), m = std::min(snr, o.min_snr_gamma);
    w[b] = o.prediction == Prediction::Epsilon ? m / snr : o.prediction == Prediction::X0 ? m : m / (snr + 1);
  }
  return w;
}

namespace detail {
// sqrt(w_b) as [B, 1, ..., 1] on `dev`: the min-SNR weights as a row scale.
template <class T>
inline Tensor<T> min_snr_row_scale(const NoiseSchedule& s, const std::vector<int32_t>& t, const Objective& o, int dims,
                                   Device dev) {
  const std::vector<double> w = loss_weights(s, t, o);
  std::vector<int32_t> idx(t.size());
  for (size_t b = 0; b < idx.size(); ++b) idx[b] = static_cast<int32_t>(b);
  return row_coefficients<T>(idx, dims, dev, [&](int b) { return std::sqrt(w[static_cast<size_t>(b)]); });
}
}  // namespace detail

// Fills nb.target and (with min-SNR weighting) nb.loss_scale on nb's device, from the numbers the
// host computes per sample, so that diffusion_loss then reads device tensors only: what a step
// captured into a CUDA graph needs (TrainOptions::cuda_graph), the same numbers as without it.
template <class T>
inline void precompute_objective(const NoiseSchedule& s, NoisedBatch<T>& nb, const Objective& o) {
  nb.target = prediction_target(s, nb, o.prediction);
  nb.loss_scale = o.min_snr_gamma > 0 ? detail::min_snr_row_scale<T>(s, nb.t, o, nb.x_t.dim(), nb.x_t.device())
                                      : Tensor<T>();
}

// The objective's loss for `model` (Var x_t, t -> Var prediction) on a noised batch (its target
// and row scale from nb when precompute_objective made them).
template <class T, class Model>
inline Var<T> diffusion_loss(Model&& model, const NoiseSchedule& s, const NoisedBatch<T>& nb, const Objective& o) {
  const Var<T> out = model(Var<T>(nb.x_t), nb.t);
  const Tensor<T> target = nb.target.defined() ? nb.target : prediction_target(s, nb, o.prediction);
  if (o.min_snr_gamma == 0) return mse(out, Var<T>(target));
  // mean_b w_b mean_i (out - target)^2 = mse(sqrt(w) out, sqrt(w) target), rows scaled by broadcasting.
  const Tensor<T> sw = nb.loss_scale.defined()
                           ? nb.loss_scale
                           : detail::min_snr_row_scale<T>(s, nb.t, o, out.value().dim(), out.device());
  Tensor<T> scaled_target;
  {
    NoGrad ng;
    scaled_target = mul(Var<T>(target), Var<T>(sw)).value();
  }
  return mse(mul(out, Var<T>(sw)), Var<T>(scaled_target));
}

// L_simple: mean((eps_theta(x_t, t) - eps)^2). `model` maps (Var x_t, t) -> Var eps.
template <class T, class Model>
inline Var<T> epsilon_loss(Model&& model, const NoisedBatch<T>& nb) {
  return mse(model(Var<T>(nb.x_t), nb.t), Var<T>(nb.eps));
}

// eps from a network output of prediction `p` at x_t (rows at timesteps t), on x_t's device.
template <class T>
inline Tensor<T> prediction_to_eps(const NoiseSchedule& s, Prediction p, const Tensor<T>& out, const Tensor<T>& x_t,
                                   const std::vector<int32_t>& t) {
  if (p == Prediction::Epsilon) return out;
  detail::check_timesteps(s, t);
  const int dims = x_t.dim();
  const Device dev = x_t.device();
  if (p == Prediction::X0) {  // (x_t - alpha x0) / sigma
    const Tensor<T> a = detail::row_coefficients<T>(t, dims, dev, [&](int k) { return 1.0 / s.sqrt_one_minus_abar[k]; });
    const Tensor<T> b = detail::row_coefficients<T>(
        t, dims, dev, [&](int k) { return -s.sqrt_abar[k] / s.sqrt_one_minus_abar[k]; });
    return rowwise_combination(a, x_t, b, out);
  }
  const Tensor<T> a = detail::row_coefficients<T>(t, dims, dev, [&](int k) { return s.sqrt_one_minus_abar[k]; });
  const Tensor<T> b = detail::row_coefficients<T>(t, dims, dev, [&](int k) { return s.sqrt_abar[k]; });
  return rowwise_combination(a, x_t, b, out);  // sigma x_t + alpha v
}

// The epsilon model of a network that predicts `p` (the identity for Prediction::Epsilon).
template <class T>
inline EpsModel<T> as_eps_model(EpsModel<T> net, const NoiseSchedule& s, Prediction p) {
  if (p == Prediction::Epsilon) return net;
  return [net = std::move(net), &s, p](const Tensor<T>& x, const std::vector<int32_t>& t) {
    return prediction_to_eps<T>(s, p, net(x, t), x, t);
  };
}

}  // namespace diffuse
