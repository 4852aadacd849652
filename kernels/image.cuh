// NHWC image ops of the U-Net on the device, each the same function as the CPU backend's op:
//
//   upsample_nearest2x_forward / _backward   diffuse::upsample_nearest2x (ops/upsample.hpp)
//       [N, H, W, C] -> [N, 2H, 2W, C]; the backward sums the 4 copies in the CPU's order,
//       (g[2h][2w] + g[2h][2w+1]) + (g[2h+1][2w] + g[2h+1][2w+1]), so it is bit for bit the same.
//   concat_channels_forward / _backward      diffuse::concat({a, b}, 3) (ops/shape.hpp)
//       a [P, Ca], b [P, Cb] -> [P, Ca + Cb] (P = N H W); the backward splits the gradient.
//   dropout_forward / _backward              diffuse::dropout(x, p, gen, true) (ops/dropout.hpp)
//       element i kept when uniform i of the Philox draw at (seed, offset) is below 1 - p (the
//       comparison in double, as the CPU does), kept values scaled by 1 / (1 - p) (rounded to
//       float first, as the CPU's T(1) / T(1 - p)); p == 1 gives zeros. The mask is not stored:
//       the backward regenerates it from the same (seed, offset).
//
// Dropout and the Generator: the launchers take (seed, where the draw lies), not the Generator; the
// caller takes the draw exactly as the CPU op does,
//     if (training && p > 0) { at = gen.take(n); dropout_forward(x, y, n, p, gen.seed, at); }
// (not training or p == 0: the CPU returns x itself and draws nothing), and keeps (seed, at) for
// the backward. Draw i of n comes from Philox block off + i / 4, lane i % 4, as Generator::uniform
// (i shifted by at.first in a data-parallel rank's share, core/rng.hpp); an offset alone is a
// DrawPos with first 0.
//
// Input gradients are written (=), or added (+=) when the launcher's accumulate flag is set.
// All launchers: device pointers, `block` threads per block and at most `max_blocks` blocks
// (grid-stride loops, so tests can force a small grid), nothing to do for empty tensors.
#pragma once

#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include "rng.cuh"  // the CPU Generator's Philox4x32-10 (diffuse/core/rng.hpp), host and device

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace diffuse::kernels {

namespace detail {
// The grid for `work` items; throws on bad block / max_blocks or negative work.
inline dim3 image_grid(const char* op, std::int64_t work, unsigned block, unsigned max_blocks) {
  if (work < 0) throw std::invalid_argument(std::string(op) + ": negative size");
  if (block == 0 || block > 1024 || max_blocks == 0)
    throw std::invalid_argument(std::string(op) + ": block must be in [1, 1024] and max_blocks at least 1");
  return dim3(static_cast<unsigned>(std::max<std::int64_t>(1, std::min<std::int64_t>((work + block - 1) / block, max_blocks))));
}
inline void require_nonnegative(const char* op, std::int64_t a, std::int64_t b, std::int64_t c, std::int64_t d) {
  if (a < 0 || b < 0 || c < 0 || d < 0) throw std::invalid_argument(std::string(op) + ": negative size");
}
}  // namespace detail

// ---------------------------------------------------------------- upsample_nearest2x

// One thread per input element, written to its 4 copies: consecutive threads write 4 coalesced
// runs, with a quarter of the index arithmetic of a thread per output element.
template <class T>
__global__ void upsample_nearest2x_forward_kernel(const T* __restrict__ x, T* __restrict__ y, std::int64_t W,
                                                  std::int64_t C, std::int64_t n_in) {
  const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  const std::int64_t orow = 2 * W * C;  // one output row
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_in; i += stride) {
    const std::int64_t c = i % C, q = i / C;
    const std::int64_t w = q % W, r = q / W;  // r = n H + h: output rows 2r and 2r + 1
    T* o = y + 2 * r * orow + 2 * w * C + c;
    const T v = x[i];
    o[0] = v;
    o[C] = v;
    o[orow] = v;
    o[orow + C] = v;
  }
}

// One thread per input element: the sum of its 4 copies, in the CPU's order.
template <class T>
__global__ void upsample_nearest2x_backward_kernel(const T* __restrict__ dy, T* __restrict__ dx, std::int64_t W,
                                                   std::int64_t C, std::int64_t n_in, bool accumulate) {
  const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  const std::int64_t orow = 2 * W * C;  // one output row
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_in; i += stride) {
    const std::int64_t c = i % C, q = i / C;
    const std::int64_t w = q % W, r = q / W;  // r = n H + h: output rows 2r and 2r + 1
    const T* g0 = dy + 2 * r * orow;
    const T* g1 = g0 + orow;
    const std::int64_t a = 2 * w * C + c, b = a + C;
    const float v = (static_cast<float>(g0[a]) + static_cast<float>(g0[b])) +
                    (static_cast<float>(g1[a]) + static_cast<float>(g1[b]));
    dx[i] = static_cast<T>(accumulate ? static_cast<float>(dx[i]) + v : v);
  }
}

// y [N, 2H, 2W, C] = nearest-neighbour 2x upsampling of x [N, H, W, C].
template <class T>
inline void upsample_nearest2x_forward(const T* x, T* y, std::int64_t N, std::int64_t H, std::int64_t W,
                                       std::int64_t C, cuda::stream_t stream = {}, unsigned block = 256,
                                       unsigned max_blocks = 65535) {
  detail::require_nonnegative("upsample_nearest2x_forward", N, H, W, C);
  const std::int64_t n_in = N * H * W * C;
  const dim3 grid = detail::image_grid("upsample_nearest2x_forward", n_in, block, max_blocks);
  if (n_in == 0) return;
  cuda::launch(upsample_nearest2x_forward_kernel<T>, grid, dim3(block), 0, stream, x, y, W, C, n_in);
}

// dx [N, H, W, C] (= or += when accumulate) from dy [N, 2H, 2W, C].
template <class T>
inline void upsample_nearest2x_backward(const T* dy, T* dx, std::int64_t N, std::int64_t H, std::int64_t W,
                                        std::int64_t C, bool accumulate = false, cuda::stream_t stream = {},
                                        unsigned block = 256, unsigned max_blocks = 65535) {
  detail::require_nonnegative("upsample_nearest2x_backward", N, H, W, C);
  const std::int64_t n_in = N * H * W * C;
  const dim3 grid = detail::image_grid("upsample_nearest2x_backward", n_in, block, max_blocks);
  if (n_in == 0) return;
  cuda::launch(upsample_nearest2x_backward_kernel<T>, grid, dim3(block), 0, stream, dy, dx, W, C, n_in, accumulate);
}

// ---------------------------------------------------------------- concat along channels

// One thread per output element: reads one of the two inputs.
template <class T>
__global__ void concat_channels_forward_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,
                                               std::int64_t Ca, std::int64_t Cb, std::int64_t n) {
  const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x, C = Ca + Cb;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::int64_t p = i / C, c = i - p * C;
    y[i] = c < Ca ? a[p * Ca + c] : b[p * Cb + (c - Ca)];
  }
}

// One thread per gradient element: writes it to da or db (either may be null: no gradient wanted).
template <class T>
__global__ void concat_channels_backward_kernel(const T* __restrict__ dy, T* __restrict__ da, T* __restrict__ db,
                                                std::int64_t Ca, std::int64_t Cb, std::int64_t n, bool accumulate_a,
                                                bool accumulate_b) {
  const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x, C = Ca + Cb;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::int64_t p = i / C, c = i - p * C;
    T* d;
    bool acc;
    if (c < Ca) {
      d = da ? da + (p * Ca + c) : nullptr;
      acc = accumulate_a;
    } else {
      d = db ? db + (p * Cb + (c - Ca)) : nullptr;
      acc = accumulate_b;
    }
    if (d) *d = acc ? static_cast<T>(static_cast<float>(*d) + static_cast<float>(dy[i])) : dy[i];
  }
}

// y [P, Ca + Cb] = [a | b] with a [P, Ca], b [P, Cb]: concat({a, b}, 3) of NHWC tensors, P = N H W.
template <class T>
inline void concat_channels_forward(const T* a, const T* b, T* y, std::int64_t P, std::int64_t Ca, std::int64_t Cb,
                                    cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 65535) {
  detail::require_nonnegative("concat_channels_forward", P, Ca, Cb, 0);
  const std::int64_t n = P * (Ca + Cb);
  const dim3 grid = detail::image_grid("concat_channels_forward", n, block, max_blocks);
  if (n == 0) return;
  cuda::launch(concat_channels_forward_kernel<T>, grid, dim3(block), 0, stream, a, b, y, Ca, Cb, n);
}

// da [P, Ca] and db [P, Cb] from dy [P, Ca + Cb], each written (=) or added (+=) by its own flag;
// a null da or db is skipped (that input needs no gradient).
template <class T>
inline void concat_channels_backward(const T* dy, T* da, T* db, std::int64_t P, std::int64_t Ca, std::int64_t Cb,
                                     bool accumulate_a = false, bool accumulate_b = false, cuda::stream_t stream = {},
                                     unsigned block = 256, unsigned max_blocks = 65535) {
  detail::require_nonnegative("concat_channels_backward", P, Ca, Cb, 0);
  const std::int64_t n = P * (Ca + Cb);
  const dim3 grid = detail::image_grid("concat_channels_backward", n, block, max_blocks);
  if (n == 0 || (!da && !db)) return;
  cuda::launch(concat_channels_backward_kernel<T>, grid, dim3(block), 0, stream, dy, da, db, Ca, Cb, n, accumulate_a,
               accumulate_b);
}

// ---------------------------------------------------------------- dropout

// One thread per Philox block (4 elements, the 4 uniforms of one philox4x32_10 call); grid-stride.
// Forward (backward = false): out = keep ? in * scale : 0. Backward: the same map applied to the
// gradient, written or added to out. The two differ only in the accumulate branch, so one kernel.
template <class T>
__global__ void dropout_kernel(const T* __restrict__ in, T* __restrict__ out, std::int64_t n, std::uint64_t seed,
                               DrawPos at, double keep_below, float scale, bool accumulate) {
  const std::int64_t blocks = static_cast<std::int64_t>(draw_blocks(at.first, static_cast<std::uint64_t>(n)));
  const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  const std::uint64_t b0 = at.first / 4, end = at.first + static_cast<std::uint64_t>(n);
  for (std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < blocks; j += stride) {
    const std::uint64_t blk = b0 + static_cast<std::uint64_t>(j);
    const Philox4 b = philox4x32_10(at.counter(blk), seed);
    for (unsigned l = 0; l < 4; ++l) {
      const std::uint64_t e = 4 * blk + l;
      if (e < at.first || e >= end) continue;
      const std::int64_t i = static_cast<std::int64_t>(e - at.first);
      // double comparison: the CPU compares double(u) < 1.0 - p (a float 1 - p could round across a u).
      const bool keep = static_cast<double>(uint_to_uniform(b.v[l])) < keep_below;
      const float v = keep ? static_cast<float>(in[i]) * scale : 0.0f;
      out[i] = static_cast<T>(accumulate ? static_cast<float>(out[i]) + v : v);
    }
  }
}

// The keep mask of the same draws as bits, for kernels that apply dropout inside their own pass
// (group_norm_dropout: group_norm.cuh): bit i % 32 of word i / 32 set when element i is kept.
// One thread per word: the (up to 9) Philox blocks under its 32 elements.
template <class W>
__global__ void dropout_bits_kernel(W* __restrict__ bits, std::int64_t n, std::uint64_t seed, DrawPos at,
                                    double keep_below) {
  const std::int64_t words = (n + 31) / 32;
  const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  for (std::int64_t w = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < words; w += stride) {
    const std::int64_t i0 = 32 * w, i1 = i0 + 32 < n ? i0 + 32 : n;
    W word = 0;
    std::uint64_t have = ~std::uint64_t(0);
    Philox4 b{};
    for (std::int64_t i = i0; i < i1; ++i) {
      const std::uint64_t e = at.first + static_cast<std::uint64_t>(i), blk = e / 4;
      if (blk != have) b = philox4x32_10(at.counter(blk), seed), have = blk;
      if (static_cast<double>(uint_to_uniform(b.v[e % 4])) < keep_below) word |= W(1) << (i - i0);
    }
    bits[w] = word;
  }
}

namespace detail {
inline void dropout_check(const char* op, std::int64_t n, double p) {
  if (n < 0) throw std::invalid_argument(std::string(op) + ": negative n");
  if (!(p >= 0.0 && p <= 1.0)) throw std::invalid_argument(std::string(op) + ": p must be in [0, 1]");
}
// The CPU's scale T(1) / T(1 - p), T = float; 0 for p == 1 (all dropped, as PyTorch).
inline float dropout_scale(double p) { return p >= 1.0 ? 0.0f : 1.0f / static_cast<float>(1.0 - p); }
inline dim3 dropout_grid(const char* op, std::int64_t n, unsigned block, unsigned max_blocks) {
  return image_grid(op, (n + 3) / 4 + 1, block, max_blocks);  // + 1: a share that starts inside a block
}
}  // namespace detail

// y = dropout(x) for n elements with the mask of the Philox uniforms at (seed, at); see the top
// of this file for how the caller takes `at` from the Generator.
template <class T>
inline void dropout_forward(const T* x, T* y, std::int64_t n, double p, std::uint64_t seed, DrawPos at,
                            cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 65535) {
  detail::dropout_check("dropout_forward", n, p);
  const dim3 grid = detail::dropout_grid("dropout_forward", n, block, max_blocks);
  if (n == 0) return;
  cuda::launch(dropout_kernel<T>, grid, dim3(block), 0, stream, x, y, n, seed, at, 1.0 - p, detail::dropout_scale(p),
               false);
}

// dx (= or += when accumulate) = dropout's gradient of dy, the mask regenerated from the forward's
// (seed, at) and p.
template <class T>
inline void dropout_backward(const T* dy, T* dx, std::int64_t n, double p, std::uint64_t seed, DrawPos at,
                             bool accumulate = false, cuda::stream_t stream = {}, unsigned block = 256,
                             unsigned max_blocks = 65535) {
  detail::dropout_check("dropout_backward", n, p);
  const dim3 grid = detail::dropout_grid("dropout_backward", n, block, max_blocks);
  if (n == 0) return;
  cuda::launch(dropout_kernel<T>, grid, dim3(block), 0, stream, dy, dx, n, seed, at, 1.0 - p,
               detail::dropout_scale(p), accumulate);
}

// bits[(n + 31) / 32] = dropout's keep mask for n elements at (seed, at) (see dropout_bits_kernel).
inline void dropout_bits(std::uint32_t* bits, std::int64_t n, double p, std::uint64_t seed, DrawPos at,
                         cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 65535) {
  detail::dropout_check("dropout_bits", n, p);
  if (n == 0) return;
  const dim3 grid = detail::image_grid("dropout_bits", (n + 31) / 32, block, max_blocks);
  cuda::launch(dropout_bits_kernel<std::uint32_t>, grid, dim3(block), 0, stream, bits, n, seed, at, 1.0 - p);
}

}  // namespace diffuse::kernels
