// DDPM forward noising on the device: x_t = sqrt(abar[t_b]) x0 + sqrt(1 - abar[t_b]) eps, each
// sample b of the batch at its own timestep t_b; the CPU backend's q_sample (diffusion/samplers.hpp).
// The schedule's two coefficient tables (T entries each, rounded to the element type as the CPU
// backend rounds them) and the timesteps are device arrays; they are uploaded once per schedule
// and once per batch.
#pragma once

#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

namespace diffuse::kernels {

// Grid-stride over all B * row elements; x0, eps and xt are [B, row] row-major.
template <class T>
__global__ void q_sample_kernel(const T* __restrict__ x0, const T* __restrict__ eps, const std::int32_t* __restrict__ t,
                                const T* __restrict__ sqrt_abar, const T* __restrict__ sqrt_one_minus_abar,
                                T* __restrict__ xt, std::int64_t batch, std::int64_t row) {
  const std::int64_t n = batch * row, stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::int32_t ts = t[i / row];
    xt[i] = sqrt_abar[ts] * x0[i] + sqrt_one_minus_abar[ts] * eps[i];
  }
}

// Timesteps must lie in [0, T): the caller checks them on the host (the CPU backend throws
// std::out_of_range), the kernel does not.
template <class T>
inline void q_sample(const T* x0, const T* eps, const std::int32_t* t, const T* sqrt_abar,
                     const T* sqrt_one_minus_abar, T* xt, std::int64_t batch, std::int64_t row,
                     cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 65535) {
  if (batch < 0 || row < 0) throw std::invalid_argument("q_sample: negative size");
  if (block == 0 || block > 1024 || max_blocks == 0)
    throw std::invalid_argument("q_sample: block must be in [1, 1024] and max_blocks at least 1");
  const std::int64_t n = batch * row;
  if (n == 0) return;
  const std::int64_t blocks = std::min<std::int64_t>((n + block - 1) / block, max_blocks);
  cuda::launch(q_sample_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(block), 0, stream, x0, eps, t, sqrt_abar,
               sqrt_one_minus_abar, xt, batch, row);
}

}  // namespace diffuse::kernels
