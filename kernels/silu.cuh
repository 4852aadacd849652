// SiLU forward on the device: y = x / (1 + exp(-x)), elementwise; float, double or bf16 (computed in float).
#pragma once

#include <diffuse/backend/cuda/bf16.hpp>
#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

namespace diffuse::kernels {

__device__ __forceinline__ float device_silu(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ double device_silu(double x) { return x / (1.0 + exp(-x)); }

// Grid-stride loop: any grid covers any n, so the launcher can cap the grid size.
template <class T>
__global__ void silu_forward_kernel(const T* __restrict__ x, T* __restrict__ y, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    y[i] = static_cast<T>(device_silu(static_cast<compute_t<T>>(x[i])));
}

// y[i] = silu(x[i]) for n elements at device pointers (x and y must not overlap), on `stream`.
// `block` threads per block and at most `max_blocks` blocks (parameters so tests can force the
// grid-stride path).
template <class T>
inline void silu_forward(const T* x, T* y, std::int64_t n, cuda::stream_t stream = {}, unsigned block = 256,
                         unsigned max_blocks = 65535) {
  if (n < 0) throw std::invalid_argument("silu_forward: negative n");
  if (block == 0 || block > 1024 || max_blocks == 0)
    throw std::invalid_argument("silu_forward: block must be in [1, 1024] and max_blocks at least 1");
  if (n == 0) return;  // an empty grid is an invalid launch
  const std::int64_t blocks = std::min<std::int64_t>((n + block - 1) / block, max_blocks);
  cuda::launch(silu_forward_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(block), 0, stream, x, y, n);
}

}  // namespace diffuse::kernels
