// The forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (q_sample) and a training
// batch of it (make_noised_batch: t ~ U{0..T-1}, eps ~ N(0, I)), on x0's device: the noise drawn
// there from the same Philox stream as on the CPU, q_sample a kernel on CUDA.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <diffuse/core/autograd.hpp>
#include <diffuse/diffusion/schedule.hpp>

namespace diffuse {

// x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per batch row (dimension 0).
template <class T>
Tensor<T> q_sample(const NoiseSchedule& s, const Tensor<T>& x0, const std::vector<int32_t>& t,
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

// One training batch: t ~ U{0..T-1}, eps ~ N(0, I), x_t = q_sample(x0, t, eps) (x0 kept, shared).
template <class T>
struct NoisedBatch {
  Tensor<T> x_t, eps;
  std::vector<int32_t> t;
  Tensor<T> x0;  // the clean batch (the target of an x0 or v objective)
  // Optional (objectives.hpp's precompute_objective): the objective's target and min-SNR row
  // scale, made beforehand so that the loss uploads no host numbers (a captured CUDA graph).
  Tensor<T> target, loss_scale;
};

template <class T>
NoisedBatch<T> make_noised_batch(const NoiseSchedule& s, const Tensor<T>& x0, Generator& g) {
  NoisedBatch<T> nb;
  nb.t.resize(static_cast<size_t>(x0.size(0)));
  g.randint(nb.t.data(), nb.t.size(), static_cast<uint32_t>(s.T()));
  nb.eps = Tensor<T>::randn(x0.shape(), g, x0.device());
  nb.x_t = q_sample(s, x0, nb.t, nb.eps);
  nb.x0 = x0;
  return nb;
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Tensor<float> q_sample<float>(const NoiseSchedule& s, const Tensor<float>& x0,
    const std::vector<int32_t>& t, const Tensor<float>& eps))
DIFFUSE_FLOAT_INSTANCE(NoisedBatch<float> make_noised_batch<float>(const NoiseSchedule& s, const Tensor<float>& x0,
    Generator& g))

}  // namespace diffuse
