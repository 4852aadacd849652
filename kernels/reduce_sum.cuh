// Row sums on the device: out[r] = sum over c of x[r * cols + c], for a row-major [rows, cols].
#pragma once

#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

namespace diffuse::kernels {

// Sum over the 32 lanes of a full warp; lane 0 gets the total (the other lanes partial sums).
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (unsigned offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// One block per row (rows beyond the grid loop back). Each thread sums a strided slice of the
// row, warps reduce with shuffles, warp 0 reduces the per-warp partials from shared memory.
// blockDim.x must be a multiple of 32 (full warps: the shuffles name all 32 lanes).
template <class T>
__global__ void reduce_sum_rows_kernel(const T* __restrict__ x, T* __restrict__ out, std::int64_t rows,
                                       std::int64_t cols) {
  DIFFUSE_SHARED(T, warp_sums, 32);  // 1024 threads at most: 32 warps
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (std::int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * cols;
    T v = T(0);
    for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) v += xr[c];
    v = warp_sum(v);
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
      v = lane < warps ? warp_sums[lane] : T(0);
      v = warp_sum(v);
      if (lane == 0) out[row] = v;
    }
    __syncthreads();  // warp 0 has read warp_sums before the next row writes it
  }
}

// out[r] = sum of row r of the [rows, cols] row-major x (device pointers), accumulated in T, on
// `stream`. `block` (a multiple of 32, up to 1024) threads per block, at most `max_blocks` blocks.
template <class T>
inline void reduce_sum_rows(const T* x, T* out, std::int64_t rows, std::int64_t cols, cuda::stream_t stream = {},
                            unsigned block = 256, unsigned max_blocks = 65535) {
  if (rows < 0 || cols < 0) throw std::invalid_argument("reduce_sum_rows: negative size");
  if (block == 0 || block % 32 != 0 || block > 1024 || max_blocks == 0)
    throw std::invalid_argument("reduce_sum_rows: block must be a multiple of 32 in [32, 1024] and max_blocks at least 1");
  if (rows == 0) return;  // an empty grid is an invalid launch
  const std::int64_t blocks = std::min<std::int64_t>(rows, max_blocks);
  cuda::launch(reduce_sum_rows_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(block), 0, stream, x, out, rows, cols);
}

}  // namespace diffuse::kernels
