// Random numbers on the device: the same Philox4x32-10 streams as the CPU backend's Generator
// (include/diffuse/core/rng.hpp), so a seed and offset give the same noise on either device (the
// uniforms bit for bit; the normals to the rounding of the device's logf/sinf/cosf).
//
// A draw of n numbers at offset `off` fills out[i] from Philox block off + i / 4, lane i % 4,
// exactly as Generator::normal / Generator::uniform do (shifted by DrawPos::first in a
// data-parallel rank's share); the launchers advance the host-side Generator as the CPU draw
// does, so CPU and GPU draws can be interleaved.
#pragma once

#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>
#include <diffuse/core/rng.hpp>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

namespace diffuse::kernels {

// One thread per Philox block (4 outputs); grid-stride over blocks. The draw at `at` fills out[i]
// with element at.first + i of the numbers at block at.offset (at.first is 0 but in a
// data-parallel rank's share of a draw, core/rng.hpp).
template <class T>
__global__ void philox_normal_kernel(T* __restrict__ out, std::int64_t n, std::uint64_t seed, DrawPos at) {
  const std::int64_t blocks = static_cast<std::int64_t>(draw_blocks(at.first, static_cast<std::uint64_t>(n)));
  const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  const std::uint64_t b0 = at.first / 4, end = at.first + static_cast<std::uint64_t>(n);
  for (std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < blocks; j += stride) {
    const std::uint64_t blk = b0 + static_cast<std::uint64_t>(j);
    float z[4];
    philox_normal4(seed, at.counter(blk), z);
    for (unsigned l = 0; l < 4; ++l) {
      const std::uint64_t e = 4 * blk + l;
      if (e >= at.first && e < end) out[e - at.first] = static_cast<T>(z[l]);
    }
  }
}

template <class T>
__global__ void philox_uniform_kernel(T* __restrict__ out, std::int64_t n, std::uint64_t seed, DrawPos at) {
  const std::int64_t blocks = static_cast<std::int64_t>(draw_blocks(at.first, static_cast<std::uint64_t>(n)));
  const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  const std::uint64_t b0 = at.first / 4, end = at.first + static_cast<std::uint64_t>(n);
  for (std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < blocks; j += stride) {
    const std::uint64_t blk = b0 + static_cast<std::uint64_t>(j);
    const Philox4 b = philox4x32_10(at.counter(blk), seed);
    for (unsigned l = 0; l < 4; ++l) {
      const std::uint64_t e = 4 * blk + l;
      if (e >= at.first && e < end) out[e - at.first] = static_cast<T>(uint_to_uniform(b.v[l]));
    }
  }
}

namespace detail {
inline dim3 rng_grid(std::int64_t n, unsigned block, unsigned max_blocks) {
  if (block == 0 || block > 1024 || max_blocks == 0)
    throw std::invalid_argument("philox kernels: block must be in [1, 1024] and max_blocks at least 1");
  const std::int64_t philox_blocks = (n + 3) / 4 + 1;  // + 1: a share that starts inside a block
  return dim3(static_cast<unsigned>(std::min<std::int64_t>((philox_blocks + block - 1) / block, max_blocks)));
}
}  // namespace detail

// n standard normals into the device array out: the draw at (seed, at).
template <class T>
inline void philox_normal_at(T* out, std::int64_t n, std::uint64_t seed, DrawPos at, cuda::stream_t stream = {},
                             unsigned block = 256, unsigned max_blocks = 65535) {
  if (n < 0) throw std::invalid_argument("philox_normal: negative n");
  const dim3 grid = detail::rng_grid(n, block, max_blocks);
  if (n == 0) return;
  cuda::launch(philox_normal_kernel<T>, grid, dim3(block), 0, stream, out, n, seed, at);
}

// n uniforms in (0, 1) into the device array out: the draw at (seed, at).
template <class T>
inline void philox_uniform_at(T* out, std::int64_t n, std::uint64_t seed, DrawPos at, cuda::stream_t stream = {},
                              unsigned block = 256, unsigned max_blocks = 65535) {
  if (n < 0) throw std::invalid_argument("philox_uniform: negative n");
  const dim3 grid = detail::rng_grid(n, block, max_blocks);
  if (n == 0) return;
  cuda::launch(philox_uniform_kernel<T>, grid, dim3(block), 0, stream, out, n, seed, at);
}

// n standard normals into the device array out, the draw g.normal(out, n) makes on the CPU.
template <class T>
inline void philox_normal(Generator& g, T* out, std::int64_t n, cuda::stream_t stream = {}, unsigned block = 256,
                          unsigned max_blocks = 65535) {
  if (n < 0) throw std::invalid_argument("philox_normal: negative n");
  philox_normal_at(out, n, g.seed, g.take(static_cast<std::uint64_t>(n)), stream, block, max_blocks);
}

// n uniforms in (0, 1) into the device array out, the draw g.uniform(out, n) makes on the CPU.
template <class T>
inline void philox_uniform(Generator& g, T* out, std::int64_t n, cuda::stream_t stream = {}, unsigned block = 256,
                           unsigned max_blocks = 65535) {
  if (n < 0) throw std::invalid_argument("philox_uniform: negative n");
  philox_uniform_at(out, n, g.seed, g.take(static_cast<std::uint64_t>(n)), stream, block, max_blocks);
}

}  // namespace diffuse::kernels
