// One reverse step of the CPU backend's samplers (include/diffuse/diffusion/ddpm.hpp) on the device,
// as one fused elementwise kernel over the whole batch x [n] (in place), with classifier-free
// guidance (include/diffuse/diffusion/guidance.hpp) optionally fused in front:
//
//   guidance (eps_uncond given): eps = (1 + w) eps - w eps_uncond        guide_combine
//   DDPM, no clipping: x = (x - beta / sqrt(1 - abar) eps) / sqrt(alpha) + sigma z      ddpm_step
//   DDPM, clipping:    x0 = clamp((x - sqrt(1 - abar) eps) / sqrt(abar)), x = c1 x0 + c2 x + sigma z
//   DDIM (eta):        x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t) [clamped],      ddim_sample
//                      x = sqrt(abar_p) x0 + sqrt(1 - abar_p - sigma^2) eps + sigma z
//                      (ddim_sample with clipping: ddim_clipped_step_params, the DDPM form)
//
// Mirrors the CPU code as follows.
// - Timesteps: the CPU samplers run the whole batch at one timestep, so the step's coefficients
//   are host scalars (DdpmStepParams / DdimStepParams), computed in double from the schedule and
//   rounded to float exactly as ddpm_step / ddim_sample round them to T. ddpm_step_params and
//   ddim_step_params take any schedule with NoiseSchedule's tables (a template, so this header
//   does not include diffusion/schedule.hpp).
// - Noise: the CPU draws z = randn(x.shape(), g) (n normals) only when it adds noise (DDPM: t > 0;
//   DDIM: sigma > 0), *after* the model call. Here z is generated inside the step kernel from the
//   Philox stream at (seed, off), element i from block off + i / 4 as Generator::normal; params.noise
//   says whether the step draws. The caller advances the Generator exactly as the CPU does:
//       const std::uint64_t off = p.noise ? gen.advance(n) : 0;
//       ddpm_step(p, x, eps, nullptr, 0.0, n, gen.seed, off);
//   so the same seed gives the same images (to the GPU's logf/sinf/cosf rounding of the normals).
// - Guidance: guided_eps_model runs [x; x] with labels [y; null] and combines the two halves with
//   a = float(1 + w), b = float(w): pass eps = the conditional half and eps_uncond = the
//   unconditional half (e.g. eps + n of the doubled batch); w == 0 means no uncond pass at all
//   (eps_uncond = nullptr), as the CPU calls the model once then.
// - The clamp is std::clamp's comparison order (a NaN passes through), not fminf/fmaxf.
#pragma once

#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include "rng.cuh"  // the CPU Generator's Philox normals (philox_normal4), host and device

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace diffuse::kernels {

// The scalars of one ancestral (DDPM) step at timestep t, as ddpm_step rounds them to T = float.
struct DdpmStepParams {
  int clip_x0;  // 0: (x - a eps) / b + sigma z;  1: c1 clamp(ra x - rb eps, -lim, lim) + c2 x + sigma z
  int noise;    // 1 when t > 0: the step adds sigma z and the CPU draws n normals
  float a, b, ra, rb, c1, c2, lim, sigma;
};

// The scalars of one DDIM step from kept timestep t to the previous kept one (or past the end).
struct DdimStepParams {
  int clip_x0;  // clamp x0 to [-lim, lim]
  int noise;    // 1 when sigma > 0: the step adds sigma z and the CPU draws n normals
  float ra, rb, cx0, ceps, lim, sigma;
};

// ddpm_step(s, t, ...) with SampleOptions{variance, clip_x0, clip}: fixed_small is
// variance == Variance::FixedSmall. Schedule: NoiseSchedule or anything with its tables and T().
template <class Schedule>
inline DdpmStepParams ddpm_step_params(const Schedule& s, int t, bool fixed_small, bool clip_x0, double clip) {
  if (t < 0 || t >= s.T())
    throw std::invalid_argument("ddpm_step_params: timestep " + std::to_string(t) + " outside [0, T)");
  double var = fixed_small ? s.posterior_variance[t] : s.beta[t];
  if (!fixed_small && t == 0 && s.T() > 1) var = s.posterior_variance[1];
  DdpmStepParams p{};
  p.clip_x0 = clip_x0 ? 1 : 0;
  p.noise = t > 0 ? 1 : 0;
  p.sigma = t > 0 ? static_cast<float>(std::sqrt(var)) : 0.0f;
  p.a = static_cast<float>(s.beta[t] / s.sqrt_one_minus_abar[t]);
  p.b = static_cast<float>(std::sqrt(s.alpha[t]));
  p.ra = static_cast<float>(1.0 / s.sqrt_abar[t]);
  p.rb = static_cast<float>(s.sqrt_one_minus_abar[t] / s.sqrt_abar[t]);
  p.c1 = static_cast<float>(s.posterior_coef1[t]);
  p.c2 = static_cast<float>(s.posterior_coef2[t]);
  p.lim = static_cast<float>(clip);
  return p;
}

// The DDIM step of ddim_sample from kept timestep t to t_prev, the previous kept timestep
// (ts[i - 1] of ddim_timesteps), or t_prev = -1 for the last step (abar_p = 1).
template <class Schedule>
inline DdimStepParams ddim_step_params(const Schedule& s, int t, int t_prev, double eta, bool clip_x0, double clip) {
  if (t < 0 || t >= s.T() || t_prev < -1 || t_prev >= t)
    throw std::invalid_argument("ddim_step_params: timesteps t = " + std::to_string(t) + ", t_prev = " +
                                std::to_string(t_prev) + " must satisfy -1 <= t_prev < t < T");
  const double ab = s.abar[t], abp = t_prev >= 0 ? s.abar[t_prev] : 1.0;
  const double sigma = eta * std::sqrt((1 - abp) / (1 - ab) * (1 - ab / abp));
  DdimStepParams p{};
  p.clip_x0 = clip_x0 ? 1 : 0;
  p.noise = sigma > 0 ? 1 : 0;
  p.ra = static_cast<float>(1.0 / std::sqrt(ab));
  p.rb = static_cast<float>(std::sqrt(1 - ab) / std::sqrt(ab));
  p.cx0 = static_cast<float>(std::sqrt(abp));
  p.ceps = static_cast<float>(std::sqrt(std::max(0.0, 1 - abp - sigma * sigma)));
  p.lim = static_cast<float>(clip);
  p.sigma = static_cast<float>(sigma);
  return p;
}

// ddim_sample's step with clip_x0 (from t to t_prev, -1: past the end): the clipped x0 with the
// eps it implies, which is the clipped-DDPM update's form x = c1 clamp(x0) + c2 x + sigma z with
// c2 = sqrt(1 - abar_p - sigma^2) / sqrt(1 - abar_t), c1 = sqrt(abar_p) - c2 sqrt(abar_t): run it
// with ddpm_step. (DdimStepParams with clip_x0 clamp x0 but step with the network's eps.)
template <class Schedule>
inline DdpmStepParams ddim_clipped_step_params(const Schedule& s, int t, int t_prev, double eta, double clip) {
  const DdimStepParams q = ddim_step_params(s, t, t_prev, eta, true, clip);
  const double ab = s.abar[t], abp = t_prev >= 0 ? s.abar[t_prev] : 1.0;
  const double sigma = eta * std::sqrt((1 - abp) / (1 - ab) * (1 - ab / abp));
  const double c = std::sqrt(std::max(0.0, 1 - abp - sigma * sigma)) / std::sqrt(1 - ab);
  DdpmStepParams p{};
  p.clip_x0 = 1;
  p.noise = q.noise;
  p.ra = q.ra, p.rb = q.rb, p.lim = q.lim, p.sigma = q.sigma;
  p.c1 = static_cast<float>(std::sqrt(abp) - c * std::sqrt(ab));
  p.c2 = static_cast<float>(c);
  return p;
}

namespace detail {

__device__ __forceinline__ float sampler_clamp(float v, float lim) { return v < -lim ? -lim : (lim < v ? lim : v); }

// The per-element updates, in the CPU's order of operations (x, eps, z as floats).
__device__ __forceinline__ float sampler_update(const DdpmStepParams& p, float x, float e, float z) {
  float v;
  if (!p.clip_x0) {
    v = (x - p.a * e) / p.b;
  } else {
    const float x0 = sampler_clamp(p.ra * x - p.rb * e, p.lim);
    v = p.c1 * x0 + p.c2 * x;
  }
  return p.noise ? v + p.sigma * z : v;
}
__device__ __forceinline__ float sampler_update(const DdimStepParams& p, float x, float e, float z) {
  float x0 = p.ra * x - p.rb * e;
  if (p.clip_x0) x0 = sampler_clamp(x0, p.lim);
  const float v = p.cx0 * x0 + p.ceps * e;
  return p.noise ? v + p.sigma * z : v;
}

}  // namespace detail

// One thread per Philox block: 4 consecutive elements and (when the step adds noise) the 4
// normals of one philox_normal4 call, as Generator::normal assigns them; grid-stride.
template <class T, class Params>
__global__ void sampler_step_kernel(Params p, T* __restrict__ x, const T* __restrict__ eps,
                                    const T* __restrict__ eps_uncond, float ga, float gb, std::int64_t n,
                                    std::uint64_t seed, std::uint64_t off) {
  const std::int64_t blocks = (n + 3) / 4, stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  for (std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < blocks; j += stride) {
    float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (p.noise) philox_normal4(seed, off + static_cast<std::uint64_t>(j), z);
    for (std::int64_t l = 0; l < 4 && 4 * j + l < n; ++l) {
      const std::int64_t i = 4 * j + l;
      float e = static_cast<float>(eps[i]);
      // guide_combine stores the guided eps as T before the step reads it.
      if (eps_uncond) e = static_cast<float>(static_cast<T>(ga * e - gb * static_cast<float>(eps_uncond[i])));
      x[i] = static_cast<T>(detail::sampler_update(p, static_cast<float>(x[i]), e, z[l]));
    }
  }
}

namespace detail {
template <class T, class Params>
inline void sampler_step_launch(const char* op, const Params& p, T* x, const T* eps, const T* eps_uncond,
                                double guidance_w, std::int64_t n, std::uint64_t seed, std::uint64_t off,
                                cuda::stream_t stream, unsigned block, unsigned max_blocks) {
  if (n < 0) throw std::invalid_argument(std::string(op) + ": negative n");
  if (block == 0 || block > 1024 || max_blocks == 0)
    throw std::invalid_argument(std::string(op) + ": block must be in [1, 1024] and max_blocks at least 1");
  if (n == 0) return;
  const std::int64_t blocks = std::min<std::int64_t>(((n + 3) / 4 + block - 1) / block, max_blocks);
  const float ga = static_cast<float>(1 + guidance_w), gb = static_cast<float>(guidance_w);  // guide_combine's a, b
  cuda::launch(sampler_step_kernel<T, Params>, dim3(static_cast<unsigned>(blocks)), dim3(block), 0, stream, p, x, eps,
               eps_uncond, ga, gb, n, seed, off);
}
}  // namespace detail

// x [n] <- one DDPM step from x with predicted noise eps [n] (guided with eps_uncond and weight w
// when eps_uncond is not null); noise from the Philox normals at (seed, off) when p.noise.
template <class T>
inline void ddpm_step(const DdpmStepParams& p, T* x, const T* eps, const T* eps_uncond, double guidance_w,
                      std::int64_t n, std::uint64_t seed, std::uint64_t off, cuda::stream_t stream = {},
                      unsigned block = 256, unsigned max_blocks = 65535) {
  detail::sampler_step_launch("ddpm_step", p, x, eps, eps_uncond, guidance_w, n, seed, off, stream, block, max_blocks);
}

// x [n] <- one DDIM step; the rest as ddpm_step.
template <class T>
inline void ddim_step(const DdimStepParams& p, T* x, const T* eps, const T* eps_uncond, double guidance_w,
                      std::int64_t n, std::uint64_t seed, std::uint64_t off, cuda::stream_t stream = {},
                      unsigned block = 256, unsigned max_blocks = 65535) {
  detail::sampler_step_launch("ddim_step", p, x, eps, eps_uncond, guidance_w, n, seed, off, stream, block, max_blocks);
}

}  // namespace diffuse::kernels
