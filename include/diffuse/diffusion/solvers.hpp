// Fast samplers on the same trained epsilon model, each with a step count K (= network
// evaluations), a timestep spacing (diffusion/timesteps.hpp) and, through the model callable,
// classifier-free guidance (guided_eps_model). Notation: at timestep t, alpha_t = sqrt(abar_t),
// sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t); the data prediction is
// x0 = (x - sigma_t eps) / alpha_t (clipped to [-clip, clip] with SampleOptions::clip_x0). The
// last step goes from the smallest visited timestep to abar = 1 (sigma = 0), where every
// solver's first-order step returns x0 itself.
//
//   DPM-Solver++(2M)  Lu et al. 2022, the multistep second-order data-prediction solver (their
//                     recommendation for guided sampling): with h = lambda_next - lambda_t and
//                     r = h_prev / h,  x <- (sigma_next / sigma_t) x - alpha_next (e^-h - 1)
//                     ((1 + 1/(2r)) x0_t - 1/(2r) x0_prev); the first step first-order (DDIM).
//   DPM-Solver++(3M)  the third-order multistep form (as diffusers' DPMSolverMultistepScheduler
//                     with solver_order = 3): first steps second- and first-order.
//                     Both lower their order at the end as diffusers does (lower_order_final):
//                     the step to sigma = 0 is first-order, and with K < 15 the one before it at
//                     most second-order (high orders amplify the large last steps' errors).
//   Euler-ancestral   Karras et al.'s / k-diffusion's sample_euler_ancestral on sigma~ =
//                     sigma / alpha: a DDIM-like deterministic part to sigma_down and fresh noise
//                     sigma_up (eta = 1: the DDPM posterior's amount), then x = alpha x~.
//
// Every step is a linear combination of the state, the model's x0 and, for Euler-ancestral,
// a normal draw, formed on the state's device (the CPU's loops or the CUDA backend's scale /
// axpby kernels), so the solvers run wherever the model runs; the draws are the CPU's Philox
// streams on either device.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <diffuse/diffusion/samplers.hpp>
#include <diffuse/diffusion/timesteps.hpp>

namespace diffuse {

namespace detail {

// sum_k c_k x_k (same shape, same device), a new tensor.
template <class T>
inline Tensor<T> linear_combination(std::initializer_list<std::pair<double, const Tensor<T>*>> terms) {
  const Tensor<T>& first = *terms.begin()->second;
  Tensor<T> out(first.shape(), first.device());
  bool acc = false;
  for (const auto& [c, x] : terms) {
    if (x->shape() != first.shape() || x->device() != first.device())
      throw std::invalid_argument("diffuse: sampler: tensors of different shapes or devices");
    if (first.device() == Device::CUDA) {
      if constexpr (std::is_same_v<T, float>) {
        backend::require_cuda("sampler step").scale(x->data(), static_cast<float>(c), out.data(), out.numel(), acc);
      } else {
        cuda_float_only("sampler step");
      }
    } else {
      const T cc = static_cast<T>(c);
      T* po = out.data();
      const T* px = x->data();
      for (size_t i = 0; i < out.size(); ++i) po[i] = acc ? po[i] + cc * px[i] : cc * px[i];
    }
    acc = true;
  }
  return out;
}

// The data prediction x0 = (x - sqrt(1 - abar) eps) / sqrt(abar), optionally clipped, on x's device.
template <class T>
inline Tensor<T> predict_x0(const Tensor<T>& x, const Tensor<T>& eps, double abar, const SampleOptions& o) {
  if (eps.shape() != x.shape() || eps.device() != x.device())
    throw std::invalid_argument("diffuse: sampler: the model's output " + shape_str(eps.shape()) +
                                " does not match the state " + shape_str(x.shape()));
  const T ra = static_cast<T>(1.0 / std::sqrt(abar)), rb = static_cast<T>(std::sqrt(1 - abar) / std::sqrt(abar));
  const T lim = static_cast<T>(o.clip);
  if (x.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) {
      Tensor<float> x0 = x.clone();
      backend::SamplerStep st;  // the DDIM step's kernel with x = 1 x0 + 0 eps: x0 itself
      st.ddim = true;
      st.clip_x0 = o.clip_x0;
      st.ra = ra, st.rb = rb, st.cx0 = 1.0f, st.ceps = 0.0f, st.lim = lim, st.sigma = 0.0f;
      backend::require_cuda("sampler step").sampler_step(st, x0.data(), eps.data(), x0.numel(), 0, 0);
      return x0;
    } else {
      cuda_float_only("sampler step");
    }
  }
  Tensor<T> x0(x.shape());
  for (size_t i = 0; i < x.size(); ++i) {
    const T v = ra * x[i] - rb * eps[i];
    x0[i] = o.clip_x0 ? std::clamp(v, -lim, lim) : v;
  }
  return x0;
}

inline double lambda_of(double abar) { return 0.5 * (std::log(abar) - std::log1p(-abar)); }

// The visited timesteps, from the first (noisiest) to the last, and the checks every solver shares.
inline std::vector<int> solver_timesteps(const NoiseSchedule& s, const SampleOptions& o) {
  std::vector<int> ts = sample_timesteps(s.T(), o.steps > 0 ? o.steps : s.T(), o.spacing);
  std::reverse(ts.begin(), ts.end());
  return ts;
}

}  // namespace detail

// DPM-Solver++ multistep of order 2 (2M) or 3 (3M); o.steps network evaluations (0: T), o.spacing.
template <class T>
Tensor<T> dpm_solver_pp_sample(const NoiseSchedule& s, const EpsModel<T>& model, const Shape& shape, Generator& g,
                               const SampleOptions& o = {}, int order = 2, const SampleObserver<T>& observe = {}) {
  if (order < 1 || order > 3) throw std::invalid_argument("diffuse: DPM-Solver++ order must be 1, 2 or 3");
  const std::vector<int> ts = detail::solver_timesteps(s, o);
  const int K = static_cast<int>(ts.size());
  Tensor<T> x = Tensor<T>::randn(shape, g, o.device);
  if (observe) observe(K, x);
  std::vector<int32_t> tt(static_cast<size_t>(shape.at(0)));
  Tensor<T> m1, m2;            // the two previous data predictions
  double h1 = 0, h2 = 0;       // the two previous steps in lambda
  for (int j = 0; j < K; ++j) {
    const int t = ts[j];
    const bool last = j == K - 1;
    std::fill(tt.begin(), tt.end(), t);
    Tensor<T> m0 = detail::predict_x0(x, model(x, tt), s.abar[t], o);
    if (last) {  // to sigma = 0: the first-order step is x0 itself
      x = std::move(m0);
    } else {
      const double ab_s = s.abar[t], ab_t = s.abar[ts[j + 1]];
      const double h = detail::lambda_of(ab_t) - detail::lambda_of(ab_s);
      const double alpha_t = std::sqrt(ab_t), cx = std::sqrt((1 - ab_t) / (1 - ab_s));
      const double em1 = std::expm1(-h);  // e^-h - 1
      int ord = std::min(order, j + 1);
      if (K < 15 && j == K - 2) ord = std::min(ord, 2);
      if (ord == 1) {
        x = detail::linear_combination<T>({{cx, &x}, {-alpha_t * em1, &m0}});
      } else if (ord == 2) {
        const double r0 = h1 / h, c1 = alpha_t * em1 * 0.5 / r0;
        x = detail::linear_combination<T>({{cx, &x}, {-alpha_t * em1 - c1, &m0}, {c1, &m1}});
      } else {
        const double r0 = h1 / h, r1 = h2 / h, q = r0 / (r0 + r1);
        const double A = -alpha_t * em1, B = alpha_t * (em1 / h + 1), C = -alpha_t * ((em1 + h) / (h * h) - 0.5);
        const double b0 = B * (1 + q) + C / (r0 + r1), b1 = -B * q - C / (r0 + r1);  // of D1_0 and D1_1
        x = detail::linear_combination<T>({{cx, &x}, {A + b0 / r0, &m0}, {-b0 / r0 + b1 / r1, &m1}, {-b1 / r1, &m2}});
      }
      h2 = h1, h1 = h;
      m2 = std::move(m1);
      m1 = std::move(m0);
    }
    if (observe) observe(K - 1 - j, x);
  }
  return x;
}

// Euler-ancestral; o.ancestral_eta scales the fresh noise (1, the default: the DDPM posterior's amount;
// 0: deterministic, the same steps as DDIM).
template <class T>
Tensor<T> euler_ancestral_sample(const NoiseSchedule& s, const EpsModel<T>& model, const Shape& shape, Generator& g,
                                 const SampleOptions& o = {}, const SampleObserver<T>& observe = {}) {
  const std::vector<int> ts = detail::solver_timesteps(s, o);
  const int K = static_cast<int>(ts.size());
  Tensor<T> x = Tensor<T>::randn(shape, g, o.device);
  if (observe) observe(K, x);
  std::vector<int32_t> tt(static_cast<size_t>(shape.at(0)));
  for (int j = 0; j < K; ++j) {
    const int t = ts[j];
    std::fill(tt.begin(), tt.end(), t);
    Tensor<T> x0 = detail::predict_x0(x, model(x, tt), s.abar[t], o);
    if (j == K - 1) {
      x = std::move(x0);
    } else {
      const double ab_f = s.abar[t], ab_t = s.abar[ts[j + 1]];
      const double sf = std::sqrt((1 - ab_f) / ab_f), st = std::sqrt((1 - ab_t) / ab_t);
      const double up = std::min(st, o.ancestral_eta * std::sqrt(st * st * (sf * sf - st * st) / (sf * sf)));
      const double down = std::sqrt(std::max(0.0, st * st - up * up));
      const double at = std::sqrt(ab_t), af = std::sqrt(ab_f);
      if (up > 0) {
        const Tensor<T> z = Tensor<T>::randn(shape, g, o.device);
        x = detail::linear_combination<T>({{at / af * down / sf, &x}, {at * (1 - down / sf), &x0}, {at * up, &z}});
      } else {
        x = detail::linear_combination<T>({{at / af * down / sf, &x}, {at * (1 - down / sf), &x0}});
      }
    }
    if (observe) observe(K - 1 - j, x);
  }
  return x;
}

// The samplers by name, for tools and configuration files.
enum class SamplerKind { DDPM, DDIM, EulerAncestral, DPMSolver2M, DPMSolver3M };

inline SamplerKind parse_sampler(const std::string& name) {
  if (name == "ddpm") return SamplerKind::DDPM;
  if (name == "ddim") return SamplerKind::DDIM;
  if (name == "euler-a" || name == "euler_ancestral") return SamplerKind::EulerAncestral;
  if (name == "dpm++2m" || name == "dpmpp-2m") return SamplerKind::DPMSolver2M;
  if (name == "dpm++3m" || name == "dpmpp-3m") return SamplerKind::DPMSolver3M;
  throw std::invalid_argument("diffuse: unknown sampler '" + name + "' (ddpm, ddim, euler-a, dpm++2m, dpm++3m)");
}

inline const char* sampler_name(SamplerKind k) {
  switch (k) {
    case SamplerKind::DDPM: return "ddpm";
    case SamplerKind::DDIM: return "ddim";
    case SamplerKind::EulerAncestral: return "euler-a";
    case SamplerKind::DPMSolver2M: return "dpm++2m";
    case SamplerKind::DPMSolver3M: return "dpm++3m";
  }
  return "?";
}

// One entry for every sampler. DDPM runs all T steps (o.steps must be 0 or T: fewer ancestral
// steps are DDIM with eta = 1).
template <class T>
Tensor<T> sample_with(SamplerKind k, const NoiseSchedule& s, const EpsModel<T>& model, const Shape& shape,
                      Generator& g, const SampleOptions& o = {}, const SampleObserver<T>& observe = {}) {
  switch (k) {
    case SamplerKind::DDPM:
      if (o.steps != 0 && o.steps != s.T())
        throw std::invalid_argument("diffuse: ddpm runs all T = " + std::to_string(s.T()) + " steps (got " +
                                    std::to_string(o.steps) + "); for fewer use ddim with eta 1 or another sampler");
      return ddpm_sample<T>(s, model, shape, g, o, observe);
    case SamplerKind::DDIM: return ddim_sample<T>(s, model, shape, g, o, observe);
    case SamplerKind::EulerAncestral: return euler_ancestral_sample<T>(s, model, shape, g, o, observe);
    case SamplerKind::DPMSolver2M: return dpm_solver_pp_sample<T>(s, model, shape, g, o, 2, observe);
    case SamplerKind::DPMSolver3M: return dpm_solver_pp_sample<T>(s, model, shape, g, o, 3, observe);
  }
  throw std::invalid_argument("diffuse: unknown sampler");
}

// On the model itself, on its device, without a tape.
template <class T, class M>
  requires is_denoiser_v<M, T>
inline Tensor<T> sample_with(SamplerKind k, const NoiseSchedule& s, const M& model, const Shape& shape, Generator& g,
                             SampleOptions o = {}, const SampleObserver<T>& observe = {}) {
  o.device = detail::sample_device(model, o.device);
  return sample_with<T>(k, s, EpsModel<T>(eps_model<T>(model)), shape, g, o, observe);
}

}  // namespace diffuse
