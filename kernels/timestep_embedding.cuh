// Sinusoidal timestep embedding on the device: diffuse::timestep_embedding<float>
// (include/diffuse/nn/timestep_embedding.hpp) from device int32 timesteps t [N] to [N, dim]:
//   half = dim / 2, freq[k] = exp(-ln(10000) k / (half - 1)),
//   out[n, k] = sin(t[n] freq[k]),  out[n, half + k] = cos(t[n] freq[k])   (k < half).
// In float with the CPU's order of operations: freq = expf((-float(ln 10000) * k) / (half - 1)),
// a = float(t) * freq. The emulation gives the CPU's numbers exactly (the same libm calls); a GPU
// differs by its expf, sinf and cosf (2 ulp each, CUDA Programming Guide, without fast-math):
// freq to ~2 ulp makes a differ by ~3 ulp(a), and a can be ~1000 (t up to T - 1, freq[0] = 1),
// so an entry may differ by ~3 FLT_EPSILON |a| + 2 FLT_EPSILON (~4e-4 at a = 1000); the test
// allows 4 FLT_EPSILON (|a| + 1). (A host-computed freq table would not remove the sin/cos part.)
#pragma once

#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>

namespace diffuse::kernels {

// One thread per (sample, frequency) pair: computes its freq (cheaper than a table in memory)
// and writes the sin and the cos entry; consecutive threads write consecutive k (coalesced).
template <class T>
__global__ void timestep_embedding_kernel(const std::int32_t* __restrict__ t, T* __restrict__ out, std::int64_t n,
                                          std::int64_t half, float neg_log_10000) {
  const std::int64_t total = n * half, stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  const float denom = static_cast<float>(half - 1);
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const std::int64_t r = i / half, k = i - r * half;
    const float freq = expf(neg_log_10000 * static_cast<float>(k) / denom);
    const float a = static_cast<float>(t[r]) * freq;
    out[r * 2 * half + k] = static_cast<T>(sinf(a));
    out[r * 2 * half + half + k] = static_cast<T>(cosf(a));
  }
}

// out [n, dim] = the embedding of the n device timesteps t; dim even and >= 4, as the CPU requires.
template <class T>
inline void timestep_embedding(const std::int32_t* t, T* out, std::int64_t n, std::int64_t dim,
                               cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 65535) {
  if (n < 0) throw std::invalid_argument("timestep_embedding: negative n");
  if (dim < 4 || dim % 2) throw std::invalid_argument("timestep_embedding: needs an even dim >= 4");
  if (block == 0 || block > 1024 || max_blocks == 0)
    throw std::invalid_argument("timestep_embedding: block must be in [1, 1024] and max_blocks at least 1");
  const std::int64_t half = dim / 2, total = n * half;
  if (total == 0) return;
  const std::int64_t blocks = std::min<std::int64_t>((total + block - 1) / block, max_blocks);
  // The CPU's -static_cast<T>(std::log(10000.0)): rounded on the host, where the CPU rounds it.
  const float neg_log = -static_cast<float>(std::log(10000.0));
  cuda::launch(timestep_embedding_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(block), 0, stream, t, out, n,
               half, neg_log);
}

}  // namespace diffuse::kernels
