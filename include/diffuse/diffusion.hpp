// The DDPM core: forward noising (q_sample), the epsilon-prediction training
// batch and loss, ancestral DDPM sampling and DDIM sampling.
//
// Models are callables eps(x_t, t) -> predicted noise. Samplers take a
// callback `observe(remaining, x)` that sees x_T first (remaining = number of
// steps) and then the state after every step (remaining = 0 is the sample),
// for plots of the denoising process.
//
// Everything runs where the tensors are: with x0 (training) or
// SampleOptions::device (sampling) on CUDA, the noise is drawn on the device
// from the same Philox streams as on the CPU, and q_sample and every sampler
// step are device kernels, so the same seed gives the same images on both
// devices up to rounding and a sampling run never copies x to the host.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "autograd.hpp"
#include "ops.hpp"
#include "schedule.hpp"

namespace diffuse {

template <class T>
using EpsModel = std::function<Tensor<T>(const Tensor<T>& x, const std::vector<int32_t>& t)>;
template <class T>
using SampleObserver = std::function<void(int remaining, const Tensor<T>& x)>;

// x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per batch row (dimension 0).
template <class T>
inline Tensor<T> q_sample(const NoiseSchedule& s, const Tensor<T>& x0, const std::vector<int32_t>& t,
                          const Tensor<T>& eps) {
  if (x0.shape() != eps.shape() || x0.dim() < 1 || x0.size(0) != static_cast<int64_t>(t.size()))
    throw std::invalid_argument("diffuse: q_sample shapes " + shape_str(x0.shape()) + ", " + shape_str(eps.shape()) +
                                " with " + std::to_string(t.size()) + " timesteps");
  if (x0.device() != eps.device()) throw std::invalid_argument("diffuse: q_sample: x0 and eps on different devices");
  const int64_t B = x0.size(0), row = x0.numel() / std::max<int64_t>(B, 1);
  if (x0.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) {
      for (int32_t v : t)
        if (v < 0 || v >= s.T()) throw std::out_of_range("diffuse: timestep " + std::to_string(v) + " outside [0, T)");
      // The two coefficient tables as the CPU rounds them, and the timesteps: small uploads.
      const int64_t steps = s.T();
      Tensor<float> coef({2 * steps});
      for (int64_t i = 0; i < steps; ++i) {
        coef[static_cast<size_t>(i)] = static_cast<float>(s.sqrt_abar[i]);
        coef[static_cast<size_t>(steps + i)] = static_cast<float>(s.sqrt_one_minus_abar[i]);
      }
      const Tensor<float> coef_dev = coef.to(Device::CUDA);
      const Tensor<int32_t> t_dev = Tensor<int32_t>::from(t, {B}).to(Device::CUDA);
      Tensor<float> xt(x0.shape(), Device::CUDA);
      backend::require_cuda("q_sample").q_sample(x0.data(), eps.data(), t_dev.data(), coef_dev.data(), steps, xt.data(), B,
                                                row);
      return xt;
    } else {
      detail::cuda_float_only("q_sample");
    }
  }
  Tensor<T> xt(x0.shape());
  for (int64_t b = 0; b < B; ++b) {
    if (t[b] < 0 || t[b] >= s.T()) throw std::out_of_range("diffuse: timestep " + std::to_string(t[b]) + " outside [0, T)");
    const T ca = static_cast<T>(s.sqrt_abar[t[b]]), cb = static_cast<T>(s.sqrt_one_minus_abar[t[b]]);
    const T *px = x0.data() + b * row, *pe = eps.data() + b * row;
    T* po = xt.data() + b * row;
    for (int64_t i = 0; i < row; ++i) po[i] = ca * px[i] + cb * pe[i];
  }
  return xt;
}

// One training batch: t ~ U{0..T-1}, eps ~ N(0, I), x_t = q_sample(x0, t, eps).
template <class T>
struct NoisedBatch {
  Tensor<T> x_t, eps;
  std::vector<int32_t> t;
};

template <class T>
inline NoisedBatch<T> make_noised_batch(const NoiseSchedule& s, const Tensor<T>& x0, Generator& g) {
  NoisedBatch<T> nb;
  nb.t.resize(static_cast<size_t>(x0.size(0)));
  g.randint(nb.t.data(), nb.t.size(), static_cast<uint32_t>(s.T()));
  nb.eps = Tensor<T>::randn(x0.shape(), g, x0.device());
  nb.x_t = q_sample(s, x0, nb.t, nb.eps);
  return nb;
}

// L_simple: mean((eps_theta(x_t, t) - eps)^2). `model` maps (Var x_t, t) -> Var eps.
template <class T, class Model>
inline Var<T> epsilon_loss(Model&& model, const NoisedBatch<T>& nb) {
  return mse(model(Var<T>(nb.x_t), nb.t), Var<T>(nb.eps));
}

// Variance of the ancestral sampler: "fixed small" is the posterior variance
// beta_t (1 - abar_{t-1}) / (1 - abar_t); "fixed large" is beta_t (Ho et al. use it for CIFAR-10).
enum class Variance { FixedSmall, FixedLarge };

inline Variance parse_variance(const std::string& s) {
  if (s == "small" || s == "fixed-small" || s == "fixedsmall") return Variance::FixedSmall;
  if (s == "large" || s == "fixed-large" || s == "fixedlarge") return Variance::FixedLarge;
  throw std::invalid_argument("diffuse: unknown variance '" + s + "' (small, large)");
}

struct SampleOptions {
  Variance variance = Variance::FixedLarge;
  bool clip_x0 = false;  // clip predicted x0 to [-clip, clip] (images); off for unbounded data
  double clip = 1.0;
  double eta = 0.0;      // DDIM only: 0 deterministic, 1 DDPM-like noise
  int steps = 0;         // DDIM only: number of steps (0 = T)
  Device device = Device::CPU;  // where x lives (the model's device): x_T is drawn there
};

namespace detail {
// One sampler step x <- a x-update from eps on the device (float), with the noise drawn there at
// (g.seed, g.advance(n)) when the step adds any: the CPU step's draws, in the same order.
inline void sampler_step_cuda(const backend::SamplerStep& st, Tensor<float>& x, const Tensor<float>& eps, Generator& g) {
  if (eps.device() != Device::CUDA || eps.shape() != x.shape())
    throw std::invalid_argument("diffuse: sampler step: eps must be a CUDA tensor of x's shape " + shape_str(x.shape()));
  const uint64_t off = st.noise ? g.advance(x.size()) : 0;
  backend::require_cuda("sampler step").sampler_step(st, x.data(), eps.data(), x.numel(), g.seed, off);
}
}  // namespace detail

// One ancestral step x_t -> x_{t-1} at model timestep t, in place.
//   no clipping: x = (x - beta / sqrt(1 - abar) eps) / sqrt(alpha) + sigma z
//   clipping:    x0 = clip((x - sqrt(1 - abar) eps) / sqrt(abar)), x = c1 x0 + c2 x + sigma z
template <class T>
inline void ddpm_step(const NoiseSchedule& s, int t, Tensor<T>& x, const Tensor<T>& eps, Generator& g,
                      const SampleOptions& o) {
  const size_t n = x.size();
  double var = o.variance == Variance::FixedSmall ? s.posterior_variance[t] : s.beta[t];
  if (o.variance == Variance::FixedLarge && t == 0 && s.T() > 1) var = s.posterior_variance[1];
  const T sigma = t > 0 ? static_cast<T>(std::sqrt(var)) : T(0);
  if (x.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) {
      backend::SamplerStep st;  // the scalars below, rounded as this function rounds them
      st.clip_x0 = o.clip_x0;
      st.noise = t > 0;
      st.sigma = sigma;
      st.a = static_cast<float>(s.beta[t] / s.sqrt_one_minus_abar[t]);
      st.b = static_cast<float>(std::sqrt(s.alpha[t]));
      st.ra = static_cast<float>(1.0 / s.sqrt_abar[t]);
      st.rb = static_cast<float>(s.sqrt_one_minus_abar[t] / s.sqrt_abar[t]);
      st.c1 = static_cast<float>(s.posterior_coef1[t]);
      st.c2 = static_cast<float>(s.posterior_coef2[t]);
      st.lim = static_cast<float>(o.clip);
      detail::sampler_step_cuda(st, x, eps, g);
      return;
    } else {
      detail::cuda_float_only("ddpm_step");
    }
  }
  Tensor<T> z;
  if (t > 0) z = Tensor<T>::randn(x.shape(), g);
  T* px = x.data();
  const T* pe = eps.data();
  if (!o.clip_x0) {
    const T a = static_cast<T>(s.beta[t] / s.sqrt_one_minus_abar[t]), b = static_cast<T>(std::sqrt(s.alpha[t]));
    for (size_t i = 0; i < n; ++i) px[i] = (px[i] - a * pe[i]) / b + (t > 0 ? sigma * z[i] : T(0));
  } else {
    const T ra = static_cast<T>(1.0 / s.sqrt_abar[t]), rb = static_cast<T>(s.sqrt_one_minus_abar[t] / s.sqrt_abar[t]);
    const T c1 = static_cast<T>(s.posterior_coef1[t]), c2 = static_cast<T>(s.posterior_coef2[t]);
    const T lim = static_cast<T>(o.clip);
    for (size_t i = 0; i < n; ++i) {
      const T x0 = std::clamp(ra * px[i] - rb * pe[i], -lim, lim);
      px[i] = c1 * x0 + c2 * px[i] + (t > 0 ? sigma * z[i] : T(0));
    }
  }
}

// Ancestral sampling from x_T ~ N(0, I) over all T steps.
template <class T>
inline Tensor<T> ddpm_sample(const NoiseSchedule& s, const EpsModel<T>& model, const Shape& shape, Generator& g,
                             const SampleOptions& o = {}, const SampleObserver<T>& observe = {}) {
  Tensor<T> x = Tensor<T>::randn(shape, g, o.device);
  if (observe) observe(s.T(), x);
  std::vector<int32_t> tt(static_cast<size_t>(shape.at(0)));
  for (int t = s.T() - 1; t >= 0; --t) {
    std::fill(tt.begin(), tt.end(), t);
    Tensor<T> eps = model(x, tt);
    ddpm_step(s, t, x, eps, g, o);
    if (observe) observe(t, x);
  }
  return x;
}

// The DDIM timesteps for `steps` steps: 0, T/steps, 2T/steps, ... (integer division), ascending.
inline std::vector<int> ddim_timesteps(int T, int steps) {
  if (steps < 1 || steps > T)
    throw std::invalid_argument("diffuse: DDIM steps must be in [1, T = " + std::to_string(T) + "], got " +
                                std::to_string(steps));
  std::vector<int> ts(static_cast<size_t>(steps));
  for (int i = 0; i < steps; ++i) ts[i] = static_cast<int>(static_cast<int64_t>(i) * T / steps);
  return ts;
}

// DDIM (Song et al. 2021): from t to the previous kept timestep p (abar_p = 1 past the end),
//   x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t),
//   sigma = eta sqrt((1 - abar_p) / (1 - abar_t)) sqrt(1 - abar_t / abar_p),
//   x = sqrt(abar_p) x0 + sqrt(1 - abar_p - sigma^2) eps + sigma z.
template <class T>
inline Tensor<T> ddim_sample(const NoiseSchedule& s, const EpsModel<T>& model, const Shape& shape, Generator& g,
                             const SampleOptions& o = {}, const SampleObserver<T>& observe = {}) {
  const std::vector<int> ts = ddim_timesteps(s.T(), o.steps > 0 ? o.steps : s.T());
  Tensor<T> x = Tensor<T>::randn(shape, g, o.device);
  const int S = static_cast<int>(ts.size());
  if (observe) observe(S, x);
  std::vector<int32_t> tt(static_cast<size_t>(shape.at(0)));
  for (int i = S - 1; i >= 0; --i) {
    const int t = ts[i];
    const double ab = s.abar[t], abp = i > 0 ? s.abar[ts[i - 1]] : 1.0;
    const double sigma = o.eta * std::sqrt((1 - abp) / (1 - ab) * (1 - ab / abp));
    std::fill(tt.begin(), tt.end(), t);
    Tensor<T> eps = model(x, tt);
    const T ra = static_cast<T>(1.0 / std::sqrt(ab)), rb = static_cast<T>(std::sqrt(1 - ab) / std::sqrt(ab));
    const T cx0 = static_cast<T>(std::sqrt(abp)), ceps = static_cast<T>(std::sqrt(std::max(0.0, 1 - abp - sigma * sigma)));
    const T lim = static_cast<T>(o.clip), sg = static_cast<T>(sigma);
    if (x.device() == Device::CUDA) {
      if constexpr (std::is_same_v<T, float>) {
        backend::SamplerStep st;
        st.ddim = true;
        st.clip_x0 = o.clip_x0;
        st.noise = sigma > 0;
        st.ra = ra, st.rb = rb, st.cx0 = cx0, st.ceps = ceps, st.lim = lim, st.sigma = sg;
        detail::sampler_step_cuda(st, x, eps, g);
        if (observe) observe(i, x);
        continue;
      } else {
        detail::cuda_float_only("ddim_sample");
      }
    }
    Tensor<T> z;
    if (sigma > 0) z = Tensor<T>::randn(shape, g);
    T* px = x.data();
    const T* pe = eps.data();
    for (size_t k = 0; k < x.size(); ++k) {
      T x0 = ra * px[k] - rb * pe[k];
      if (o.clip_x0) x0 = std::clamp(x0, -lim, lim);
      px[k] = cx0 * x0 + ceps * pe[k] + (sigma > 0 ? sg * z[k] : T(0));
    }
    if (observe) observe(i, x);
  }
  return x;
}

}  // namespace diffuse
