// The reverse process: ancestral DDPM sampling (fixed small or large variance, optional x0
// clipping) and DDIM (any step count and timestep spacing, eta). The faster solvers
// (DPM-Solver++, Euler-ancestral) and the by-name entry are in diffusion/solvers.hpp. Models are the model itself (a denoiser:
// diffusion/denoiser.hpp; sampled on its own device, without a tape) or callables
// eps(x_t, t) -> predicted noise (EpsModel, e.g. guided_eps_model);
// `observe(remaining, x)` sees x_T first (remaining = number of steps) and the state after every
// step (remaining = 0 is the sample), for plots of the process. Everything runs on
// SampleOptions::device: on CUDA x_T and every step's noise are drawn on the device from the CPU's
// Philox streams and each step is one kernel, so the same seed gives the same images on both
// devices up to rounding and a run never copies x to the host.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <diffuse/core/autograd.hpp>
#include <diffuse/diffusion/denoiser.hpp>
#include <diffuse/diffusion/schedule.hpp>
#include <diffuse/diffusion/timesteps.hpp>

namespace diffuse {

template <class T>
using EpsModel = std::function<Tensor<T>(const Tensor<T>& x, const std::vector<int32_t>& t)>;
template <class T>
using SampleObserver = std::function<void(int remaining, const Tensor<T>& x)>;

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
  int steps = 0;         // all but DDPM: number of steps = network evaluations (0 = T)
  Spacing spacing = Spacing::Uniform;  // all but DDPM: which timesteps (diffusion/timesteps.hpp)
  double ancestral_eta = 1.0;  // Euler-ancestral: scale of its fresh noise (0: deterministic)
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
void ddpm_step(const NoiseSchedule& s, int t, Tensor<T>& x, const Tensor<T>& eps, Generator& g,
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
Tensor<T> ddpm_sample(const NoiseSchedule& s, const EpsModel<T>& model, const Shape& shape, Generator& g,
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

// The DDIM paper's uniform timesteps for `steps` steps: 0, T/steps, 2T/steps, ... (integer
// division), ascending; sample_timesteps(T, steps, Spacing::Uniform).
inline std::vector<int> ddim_timesteps(int T, int steps) { return sample_timesteps(T, steps, Spacing::Uniform); }

// DDIM (Song et al. 2021): from t to the previous kept timestep p (abar_p = 1 past the end),
//   x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t),
//   sigma = eta sqrt((1 - abar_p) / (1 - abar_t)) sqrt(1 - abar_t / abar_p),
//   x = sqrt(abar_p) x0 + sqrt(1 - abar_p - sigma^2) eps + sigma z.
// With clip_x0 the step uses the clipped x0 and the noise it implies, eps' = (x - sqrt(abar_t) x0)
// / sqrt(1 - abar_t) (diffusers' use_clipped_model_output; DPM-Solver++'s first-order step),
//   x = (sqrt(abar_p) - c sqrt(abar_t)) x0 + c x + sigma z,  c = sqrt(1 - abar_p - sigma^2) / sqrt(1 - abar_t),
// where the network's own eps beside a clipped x0 would put back the part of the prediction the
// clip removed (with guidance, which extrapolates eps, that turned most MNIST 1s into other
// digits: docs/results.md). Without clipping the two are the same step.
template <class T>
Tensor<T> ddim_sample(const NoiseSchedule& s, const EpsModel<T>& model, const Shape& shape, Generator& g,
                      const SampleOptions& o = {}, const SampleObserver<T>& observe = {}) {
  const std::vector<int> ts = sample_timesteps(s.T(), o.steps > 0 ? o.steps : s.T(), o.spacing);
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
    const double c = std::sqrt(std::max(0.0, 1 - abp - sigma * sigma)) / std::sqrt(1 - ab);
    const T c1 = static_cast<T>(std::sqrt(abp) - c * std::sqrt(ab)), c2 = static_cast<T>(c);
    if (x.device() == Device::CUDA) {
      if constexpr (std::is_same_v<T, float>) {
        backend::SamplerStep st;
        st.noise = sigma > 0;
        st.ra = ra, st.rb = rb, st.lim = lim, st.sigma = sg;
        if (o.clip_x0) {  // the clipped-DDPM kernel's form: x0 = clamp(ra x - rb eps), x = c1 x0 + c2 x + sigma z
          st.clip_x0 = true;
          st.c1 = c1, st.c2 = c2;
        } else {
          st.ddim = true;
          st.cx0 = cx0, st.ceps = ceps;
        }
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
      const T x0 = ra * px[k] - rb * pe[k];
      if (o.clip_x0)
        px[k] = c1 * std::clamp(x0, -lim, lim) + c2 * px[k] + (sigma > 0 ? sg * z[k] : T(0));
      else
        px[k] = cx0 * x0 + ceps * pe[k] + (sigma > 0 ? sg * z[k] : T(0));
    }
    if (observe) observe(i, x);
  }
  return x;
}

namespace detail {
// The model's device, where sampling runs, for a model that knows it (a Module).
template <class M>
inline Device sample_device(const M& model, Device fallback) {
  if constexpr (requires { model.device(); }) return model.device();
  else return fallback;
}
}  // namespace detail

// The samplers on the model itself: ddpm_sample<float>(schedule, model, {n, 2}, g), on the
// model's device, without a tape.
template <class T, class M>
  requires is_denoiser_v<M, T>
inline Tensor<T> ddpm_sample(const NoiseSchedule& s, const M& model, const Shape& shape, Generator& g,
                             SampleOptions o = {}, const SampleObserver<T>& observe = {}) {
  o.device = detail::sample_device(model, o.device);
  return ddpm_sample<T>(s, EpsModel<T>(eps_model<T>(model)), shape, g, o, observe);
}
template <class T, class M>
  requires is_denoiser_v<M, T>
inline Tensor<T> ddim_sample(const NoiseSchedule& s, const M& model, const Shape& shape, Generator& g,
                             SampleOptions o = {}, const SampleObserver<T>& observe = {}) {
  o.device = detail::sample_device(model, o.device);
  return ddim_sample<T>(s, EpsModel<T>(eps_model<T>(model)), shape, g, o, observe);
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(void ddpm_step<float>(const NoiseSchedule& s, int t, Tensor<float>& x,
    const Tensor<float>& eps, Generator& g, const SampleOptions& o))
DIFFUSE_FLOAT_INSTANCE(Tensor<float> ddpm_sample<float>(const NoiseSchedule& s, const EpsModel<float>& model,
    const Shape& shape, Generator& g, const SampleOptions& o, const SampleObserver<float>& observe))
DIFFUSE_FLOAT_INSTANCE(Tensor<float> ddim_sample<float>(const NoiseSchedule& s, const EpsModel<float>& model,
    const Shape& shape, Generator& g, const SampleOptions& o, const SampleObserver<float>& observe))

}  // namespace diffuse
