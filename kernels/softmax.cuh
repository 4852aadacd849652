// Row softmax on the device, in place, and its backward, for attention's [rows, L] scores:
//
//   softmax_forward(x, rows, L):       x[r, :] = exp(x[r, :] - max) / sum(exp(x[r, :] - max))
//   softmax_backward(P, d, rows, L):   d[r, :] = P[r, :] * (d[r, :] - sum_j P[r, j] d[r, j])
//
// the same functions as diffuse::detail::softmax_rows and the dS step of
// diffuse::detail::attention_backward (include/diffuse/ops/attention.hpp): the backward turns
// dP (the gradient of the probabilities) into dS (that of the scores) in place, P unchanged.
//
// Parallelisation: rows of up to `warp_max_cols` (1024) values get one warp each (no shared
// memory, no __syncthreads: warps of a block are independent); longer rows one block each
// (block reductions through shared memory). Either way each thread walks its columns with a
// stride of the warp or block width (coalesced loads), reductions are shuffle butterflies,
// and the grid loops over rows when it is capped. The forward reads a row three times (max,
// sum of exp, write) rather than keeping it in registers, so any L works; the rows of
// attention (L <= 4096 floats) are re-read from L1/L2.
// Accumulation in float, as the CPU op does in float.
#pragma once

#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace diffuse::kernels {

// Rows up to this length take the warp-per-row kernels by default.
inline constexpr std::int64_t kSoftmaxWarpMaxCols = 1024;

// Butterfly reductions over a full warp: every lane gets the result (each lane combines the
// same values in the same tree, so all lanes agree bit for bit).
__device__ __forceinline__ float softmax_warp_max(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}
__device__ __forceinline__ float softmax_warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Block-wide max / sum for blockDim.x a multiple of 32: warp partials through `partials`
// (32 floats of shared memory), then every warp reduces the partials itself, so every thread
// gets the same result without a second broadcast. The trailing barrier lets the caller
// reuse `partials` at once.
__device__ __forceinline__ float softmax_block_max(float v, float* partials) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = softmax_warp_max(v);
  if (lane == 0) partials[warp] = v;
  __syncthreads();
  v = softmax_warp_max(lane < warps ? partials[lane] : -INFINITY);
  __syncthreads();
  return v;
}
__device__ __forceinline__ float softmax_block_sum(float v, float* partials) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = softmax_warp_sum(v);
  if (lane == 0) partials[warp] = v;
  __syncthreads();
  v = softmax_warp_sum(lane < warps ? partials[lane] : 0.0f);
  __syncthreads();
  return v;
}

// ---------------------------------------------------------------- forward

// One warp per row: warp w of block b takes rows b*W + w, then + gridDim.x*W, ... (W warps a
// block). All lanes of a warp run the same iterations, as the full-mask shuffles need.
template <class T>
__global__ void softmax_forward_warp_kernel(T* __restrict__ x, std::int64_t rows, std::int64_t L) {
  const unsigned lane = threadIdx.x % 32;
  const std::int64_t warps = blockDim.x / 32;
  for (std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * warps + threadIdx.x / 32; row < rows;
       row += static_cast<std::int64_t>(gridDim.x) * warps) {
    T* xr = x + row * L;
    float mx = -INFINITY;
    for (std::int64_t c = lane; c < L; c += 32) mx = fmaxf(mx, static_cast<float>(xr[c]));
    mx = softmax_warp_max(mx);
    // exp(x - max) <= 1: no overflow however large the scores (the CPU op does the same).
    float sum = 0.0f;
    for (std::int64_t c = lane; c < L; c += 32) sum += expf(static_cast<float>(xr[c]) - mx);
    const float inv = 1.0f / softmax_warp_sum(sum);
    for (std::int64_t c = lane; c < L; c += 32) xr[c] = static_cast<T>(expf(static_cast<float>(xr[c]) - mx) * inv);
  }
}

// One block per row (rows beyond the grid loop back); blockDim.x a multiple of 32.
template <class T>
__global__ void softmax_forward_block_kernel(T* __restrict__ x, std::int64_t rows, std::int64_t L) {
  DIFFUSE_SHARED(float, partials, 32);  // one per warp: at most 1024 threads
  for (std::int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    T* xr = x + row * L;
    float mx = -INFINITY;
    for (std::int64_t c = threadIdx.x; c < L; c += blockDim.x) mx = fmaxf(mx, static_cast<float>(xr[c]));
    mx = softmax_block_max(mx, partials);
    float sum = 0.0f;
    for (std::int64_t c = threadIdx.x; c < L; c += blockDim.x) sum += expf(static_cast<float>(xr[c]) - mx);
    const float inv = 1.0f / softmax_block_sum(sum, partials);
    for (std::int64_t c = threadIdx.x; c < L; c += blockDim.x)
      xr[c] = static_cast<T>(expf(static_cast<float>(xr[c]) - mx) * inv);
  }
}

// ---------------------------------------------------------------- backward

template <class T>
__global__ void softmax_backward_warp_kernel(const T* __restrict__ P, T* __restrict__ d, std::int64_t rows,
                                             std::int64_t L) {
  const unsigned lane = threadIdx.x % 32;
  const std::int64_t warps = blockDim.x / 32;
  for (std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * warps + threadIdx.x / 32; row < rows;
       row += static_cast<std::int64_t>(gridDim.x) * warps) {
    const T* pr = P + row * L;
    T* dr = d + row * L;
    float dot = 0.0f;
    for (std::int64_t c = lane; c < L; c += 32) dot += static_cast<float>(pr[c]) * static_cast<float>(dr[c]);
    dot = softmax_warp_sum(dot);
    for (std::int64_t c = lane; c < L; c += 32)
      dr[c] = static_cast<T>(static_cast<float>(pr[c]) * (static_cast<float>(dr[c]) - dot));
  }
}

template <class T>
__global__ void softmax_backward_block_kernel(const T* __restrict__ P, T* __restrict__ d, std::int64_t rows,
                                              std::int64_t L) {
  DIFFUSE_SHARED(float, partials, 32);
  for (std::int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* pr = P + row * L;
    T* dr = d + row * L;
    float dot = 0.0f;
    for (std::int64_t c = threadIdx.x; c < L; c += blockDim.x)
      dot += static_cast<float>(pr[c]) * static_cast<float>(dr[c]);
    dot = softmax_block_sum(dot, partials);
    for (std::int64_t c = threadIdx.x; c < L; c += blockDim.x)
      dr[c] = static_cast<T>(static_cast<float>(pr[c]) * (static_cast<float>(dr[c]) - dot));
  }
}

// ---------------------------------------------------------------- launchers

namespace detail {

// Threads per block: the caller's `block`, or by default 128 (four rows) for the warp kernels
// and, for the block kernels, the power of two in [128, 1024] that gives each thread at most 8
// columns where it can (256 at L = 2048, 512 at L = 4096).
inline unsigned softmax_block(const char* who, std::int64_t rows, std::int64_t L, unsigned block,
                              unsigned max_blocks, bool per_warp) {
  if (rows < 0 || L < 0) throw std::invalid_argument(std::string(who) + ": negative size");
  if (block != 0 && (block % 32 != 0 || block > 1024))
    throw std::invalid_argument(std::string(who) + ": block must be 0 (automatic) or a multiple of 32 in [32, 1024], got " +
                                std::to_string(block));
  if (max_blocks == 0) throw std::invalid_argument(std::string(who) + ": max_blocks must be at least 1");
  if (block != 0) return block;
  if (per_warp) return 128;
  unsigned b = 128;
  while (b < 1024 && static_cast<std::int64_t>(b) * 8 < L) b *= 2;
  return b;
}

inline dim3 softmax_grid(std::int64_t rows, unsigned block, unsigned max_blocks, bool per_warp) {
  const std::int64_t per_block = per_warp ? block / 32 : 1;
  return dim3(static_cast<unsigned>(std::min<std::int64_t>((rows + per_block - 1) / per_block, max_blocks)));
}

}  // namespace detail

// x[r, :] = softmax(x[r, :]) for the `rows` rows of `L` values of the row-major x (device
// pointer), in place, on `stream`. Rows of at most `warp_max_cols` values take one warp each,
// longer rows one block each (tests move the threshold to run both kernels on any L). `block`:
// threads per block (0: automatic; else a multiple of 32 up to 1024); at most `max_blocks`
// blocks (the grid loops over the rest).
template <class T>
inline void softmax_forward(T* x, std::int64_t rows, std::int64_t L, cuda::stream_t stream = {}, unsigned block = 0,
                            unsigned max_blocks = 65535, std::int64_t warp_max_cols = kSoftmaxWarpMaxCols) {
  const bool per_warp = L <= warp_max_cols;
  block = detail::softmax_block("softmax_forward", rows, L, block, max_blocks, per_warp);
  if (rows == 0 || L == 0) return;  // an empty grid is an invalid launch
  if (!x) throw std::invalid_argument("softmax_forward: x is null");
  const dim3 grid = detail::softmax_grid(rows, block, max_blocks, per_warp);
  if (per_warp)
    cuda::launch(softmax_forward_warp_kernel<T>, grid, dim3(block), 0, stream, x, rows, L);
  else
    cuda::launch(softmax_forward_block_kernel<T>, grid, dim3(block), 0, stream, x, rows, L);
}

// d[r, :] = P[r, :] * (d[r, :] - sum_j P[r, j] d[r, j]): d holds dP on entry (the gradient of
// the softmax's output P) and dS (that of its input) on return; P is only read and must not
// overlap d. Same parameters as softmax_forward.
template <class T>
inline void softmax_backward(const T* P, T* d, std::int64_t rows, std::int64_t L, cuda::stream_t stream = {},
                             unsigned block = 0, unsigned max_blocks = 65535,
                             std::int64_t warp_max_cols = kSoftmaxWarpMaxCols) {
  const bool per_warp = L <= warp_max_cols;
  block = detail::softmax_block("softmax_backward", rows, L, block, max_blocks, per_warp);
  if (rows == 0 || L == 0) return;
  if (!P || !d) throw std::invalid_argument("softmax_backward: P or d is null");
  const dim3 grid = detail::softmax_grid(rows, block, max_blocks, per_warp);
  if (per_warp)
    cuda::launch(softmax_backward_warp_kernel<T>, grid, dim3(block), 0, stream, P, d, rows, L);
  else
    cuda::launch(softmax_backward_block_kernel<T>, grid, dim3(block), 0, stream, P, d, rows, L);
}

}  // namespace diffuse::kernels
