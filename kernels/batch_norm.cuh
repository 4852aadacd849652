// Inference-mode batch norm on the device, diffuse::batch_norm_inference (include/diffuse/ops/
// batch_norm.hpp) on x [rows, C] (rows = N H W pixels of NHWC), with its rounding:
//
//   batch_norm_inference_forward    invstd = 1 / sqrt(var + eps), alpha = invstd w,
//                                   beta = b - mean alpha, y = x alpha + beta (PyTorch's CPU kernel)
//   batch_norm_inference_backward   dx (+)= g alpha; dw (+)= invstd sum_p g (x - mean);
//                                   db (+)= sum_p g (the sums in double, as the CPU)
//
// The float operations are the CPU's, unfused (nvcc would contract x alpha + beta into an FMA;
// the CPU build does not), so y and dx are the CPU's bit for bit.
//
// Layout: a block is bx = min(C, 32) channels x by pixel lanes, so a warp reads whole pixels when
// C < 32 and 32 consecutive channels otherwise (coalesced either way); each thread forms its
// channel's alpha, beta once and walks the pixels. The channel sums are per-(pixel chunk,
// channel) double partials in the workspace, added in chunk order by a second kernel: the split
// is a function of rows and C only, so results do not depend on the launch configuration, and
// no atomics are used.
#pragma once

#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "elementwise.cuh"  // elementwise_detail: first_index, grid_stride, check_flat, flat_grid, check_ptr

namespace diffuse::kernels {

// Threads of the backward's partial-sum blocks (bx channels x by pixel lanes, by = this / bx).
inline constexpr unsigned kBatchNormSumThreads = 256;

namespace batch_norm_detail {

// Unfused float multiply and add (nvcc contracts a * b + c into an FMA otherwise).
__device__ __forceinline__ float mul(float a, float b) {
#ifdef __CUDACC__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
__device__ __forceinline__ float add(float a, float b) {
#ifdef __CUDACC__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
__device__ __forceinline__ float sub(float a, float b) {
#ifdef __CUDACC__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// The CPU's per-channel invstd (sqrtf and '/' are correctly rounded under nvcc's defaults).
__device__ __forceinline__ float invstd(float var, float eps) { return 1.0f / sqrtf(add(var, eps)); }

inline std::int64_t tile_width(std::int64_t C) { return C < 32 ? C : 32; }

// blockDim (bx, by) for `block` threads, and a grid of channel tiles x pixel blocks.
inline void tile_launch(std::int64_t rows, std::int64_t C, unsigned block, unsigned max_blocks, dim3& grid,
                        dim3& threads) {
  const std::int64_t bx = tile_width(C), by = std::max<std::int64_t>(1, block / bx);
  threads = dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  const std::int64_t cap = std::min<std::int64_t>(max_blocks, 65535);
  grid = dim3(static_cast<unsigned>((C + bx - 1) / bx), static_cast<unsigned>(std::min((rows + by - 1) / by, cap)));
}

inline void check(const char* name, std::int64_t rows, std::int64_t C, unsigned block, unsigned max_blocks) {
  if (rows < 0 || C < 0) throw std::invalid_argument(std::string(name) + ": negative size");
  if (block == 0 || block > 1024 || max_blocks == 0)
    throw std::invalid_argument(std::string(name) + ": block must be in [1, 1024] and max_blocks at least 1");
  if ((C + 31) / 32 > 0x7fffffff) throw std::invalid_argument(std::string(name) + ": too many channels");
}

// The pixel chunks of the channel sums: chunk length a multiple of by, at least 16 pixels per
// lane, at most about 1024 chunks. A pure function of (rows, C).
struct SumPlan {
  std::int64_t bx, by, rows_per_chunk, chunks;
};
inline SumPlan sum_plan(std::int64_t rows, std::int64_t C) {
  SumPlan p;
  p.bx = std::max<std::int64_t>(tile_width(C), 1);
  p.by = kBatchNormSumThreads / p.bx;
  const std::int64_t per_lane = std::max<std::int64_t>(16, (rows + p.by * 1024 - 1) / (p.by * 1024));
  p.rows_per_chunk = p.by * per_lane;
  p.chunks = rows > 0 ? (rows + p.rows_per_chunk - 1) / p.rows_per_chunk : 0;
  return p;
}

}  // namespace batch_norm_detail

// ---------------------------------------------------------------- forward

template <class T>
__global__ void batch_norm_inference_forward_kernel(const T* __restrict__ x, const float* __restrict__ w,
                                                    const float* __restrict__ b, const float* __restrict__ mean,
                                                    const float* __restrict__ var, float eps, T* __restrict__ y,
                                                    std::int64_t rows, std::int64_t C) {
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;  // no barriers in this kernel
  const float alpha = batch_norm_detail::mul(batch_norm_detail::invstd(var[c], eps), w[c]);
  const float beta = batch_norm_detail::sub(b[c], batch_norm_detail::mul(mean[c], alpha));
  const std::int64_t step = static_cast<std::int64_t>(gridDim.y) * blockDim.y;
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += step)
    y[r * C + c] =
        static_cast<T>(batch_norm_detail::add(batch_norm_detail::mul(static_cast<float>(x[r * C + c]), alpha), beta));
}

// y [rows, C] = x alpha[c] + beta[c] (y may be x). w, b, mean, var [C]; `block` threads per block
// (bx = min(C, 32) channels x block / bx pixels), at most max_blocks pixel blocks per channel tile.
inline void batch_norm_inference_forward(const float* x, const float* w, const float* b, const float* mean,
                                         const float* var, float eps, float* y, std::int64_t rows, std::int64_t C,
                                         cuda::stream_t stream = {}, unsigned block = 256,
                                         unsigned max_blocks = 65535) {
  batch_norm_detail::check("batch_norm_inference_forward", rows, C, block, max_blocks);
  if (rows == 0 || C == 0) return;  // an empty grid is an invalid launch
  for (const void* p : {static_cast<const void*>(x), static_cast<const void*>(w), static_cast<const void*>(b),
                        static_cast<const void*>(mean), static_cast<const void*>(var), static_cast<const void*>(y)})
    elementwise_detail::check_ptr("batch_norm_inference_forward", p, "an operand");
  dim3 grid, threads;
  batch_norm_detail::tile_launch(rows, C, block, max_blocks, grid, threads);
  cuda::launch(batch_norm_inference_forward_kernel<float>, grid, threads, 0, stream, x, w, b, mean, var, eps, y, rows,
               C);
}

// ---------------------------------------------------------------- backward

template <class T>
__global__ void batch_norm_inference_backward_dx_kernel(const T* __restrict__ g, const float* __restrict__ w,
                                                        const float* __restrict__ var, float eps, T* __restrict__ dx,
                                                        bool acc, std::int64_t rows, std::int64_t C) {
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const float alpha = batch_norm_detail::mul(batch_norm_detail::invstd(var[c], eps), w[c]);
  const std::int64_t step = static_cast<std::int64_t>(gridDim.y) * blockDim.y;
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += step) {
    const std::int64_t i = r * C + c;
    const float v = batch_norm_detail::mul(static_cast<float>(g[i]), alpha);
    dx[i] = static_cast<T>(acc ? batch_norm_detail::add(static_cast<float>(dx[i]), v) : v);
  }
}

// Block (channel tile, pixel chunk), blockDim (bx, by): lane y sums pixels r0 + y, r0 + y + by, ...
// of its channel in double, then lane 0 adds the by lanes in order. pw, pb [chunks, C].
template <class T>
__global__ void batch_norm_inference_backward_partial_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                                             const float* __restrict__ mean, double* __restrict__ pw,
                                                             double* __restrict__ pb, std::int64_t rows,
                                                             std::int64_t C, std::int64_t rows_per_chunk) {
  DIFFUSE_SHARED(double, sw, kBatchNormSumThreads);
  DIFFUSE_SHARED(double, sb, kBatchNormSumThreads);
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t r0 = static_cast<std::int64_t>(blockIdx.y) * rows_per_chunk;
  const std::int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  double aw = 0.0, ab = 0.0;
  if (c < C) {
    const double m = static_cast<double>(mean[c]);
    for (std::int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      const double gv = static_cast<double>(g[r * C + c]);
      ab += gv;
      aw += gv * (static_cast<double>(x[r * C + c]) - m);
    }
  }
  const unsigned t = threadIdx.y * blockDim.x + threadIdx.x;
  sw[t] = aw;
  sb[t] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    double tw = 0.0, tb = 0.0;
    for (unsigned l = 0; l < blockDim.y; ++l) {
      tw += sw[l * blockDim.x + threadIdx.x];
      tb += sb[l * blockDim.x + threadIdx.x];
    }
    pw[static_cast<std::int64_t>(blockIdx.y) * C + c] = tw;
    pb[static_cast<std::int64_t>(blockIdx.y) * C + c] = tb;
  }
}

namespace batch_norm_detail {
// A gradient sink's put of a double: rounded to float first, then added (the CPU's GradSink).
template <class T>
__device__ __forceinline__ T put(const T* out, std::int64_t c, bool acc, double v) {
  const float f = static_cast<float>(v);
  return static_cast<T>(acc ? add(static_cast<float>(out[c]), f) : f);
}
}  // namespace batch_norm_detail

// dw[c] (+)= float(sum_k pw[k, c] * double(invstd[c])), db[c] (+)= float(sum_k pb[k, c]), chunks in order.
template <class T>
__global__ void batch_norm_inference_backward_combine_kernel(const double* __restrict__ pw,
                                                             const double* __restrict__ pb,
                                                             const float* __restrict__ var, float eps,
                                                             T* __restrict__ dw, bool acc_w, T* __restrict__ db,
                                                             bool acc_b, std::int64_t C, std::int64_t chunks) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  for (std::int64_t c = elementwise_detail::first_index(); c < C; c += stride) {
    double tw = 0.0, tb = 0.0;
    for (std::int64_t k = 0; k < chunks; ++k) {
      tw += pw[k * C + c];
      tb += pb[k * C + c];
    }
    if (dw) {
      const double v = tw * static_cast<double>(batch_norm_detail::invstd(var[c], eps));
      dw[c] = batch_norm_detail::put(dw, c, acc_w, v);
    }
    if (db) db[c] = batch_norm_detail::put(db, c, acc_b, tb);
  }
}

// Bytes of batch_norm_inference_backward's workspace (two doubles per pixel chunk and channel).
inline std::size_t batch_norm_inference_backward_workspace_bytes(std::int64_t rows, std::int64_t C) {
  if (rows < 0 || C < 0) throw std::invalid_argument("batch_norm_inference_backward_workspace_bytes: negative size");
  const batch_norm_detail::SumPlan p = batch_norm_detail::sum_plan(rows, C);
  return static_cast<std::size_t>(2 * p.chunks * C) * sizeof(double);
}

// The gradients of y = x alpha + beta from g [rows, C]: dx (+= when acc_dx) = g alpha;
// dw [C] (+= when acc_w) = invstd sum_p g (x - mean); db [C] (+= when acc_b) = sum_p g.
// A null dx, dw or db is skipped; workspace: batch_norm_inference_backward_workspace_bytes(rows, C)
// (needed for dw or db only). `block`, `max_blocks`: the dx kernel's, as the forward's; the sums'
// split is fixed by (rows, C).
inline void batch_norm_inference_backward(const float* g, const float* x, const float* w, const float* mean,
                                          const float* var, float eps, float* dx, bool acc_dx, float* dw, bool acc_w,
                                          float* db, bool acc_b, std::int64_t rows, std::int64_t C, void* workspace,
                                          cuda::stream_t stream = {}, unsigned block = 256,
                                          unsigned max_blocks = 65535) {
  const char* name = "batch_norm_inference_backward";
  batch_norm_detail::check(name, rows, C, block, max_blocks);
  if (C == 0) return;
  if (dx && rows > 0) {
    for (const void* p : {static_cast<const void*>(g), static_cast<const void*>(w), static_cast<const void*>(var)})
      elementwise_detail::check_ptr(name, p, "g, w or var");
    dim3 grid, threads;
    batch_norm_detail::tile_launch(rows, C, block, max_blocks, grid, threads);
    cuda::launch(batch_norm_inference_backward_dx_kernel<float>, grid, threads, 0, stream, g, w, var, eps, dx, acc_dx,
                 rows, C);
  }
  if (!dw && !db) return;
  elementwise_detail::check_ptr(name, var, "var");
  const batch_norm_detail::SumPlan p = batch_norm_detail::sum_plan(rows, C);
  double* pw = static_cast<double*>(workspace);
  double* pb = pw ? pw + p.chunks * C : nullptr;
  if (p.chunks > 0) {
    for (const void* q : {static_cast<const void*>(g), static_cast<const void*>(x), static_cast<const void*>(mean)})
      elementwise_detail::check_ptr(name, q, "g, x or mean");
    elementwise_detail::check_ptr(name, workspace, "workspace");
    const dim3 grid(static_cast<unsigned>((C + p.bx - 1) / p.bx), static_cast<unsigned>(p.chunks));
    cuda::launch(batch_norm_inference_backward_partial_kernel<float>, grid,
                 dim3(static_cast<unsigned>(p.bx), static_cast<unsigned>(p.by)), 0, stream, g, x, mean, pw, pb, rows,
                 C, p.rows_per_chunk);
  }
  // rows == 0: no chunks, so dw and db get zero sums (written, or left as they are when accumulating).
  const unsigned cb = std::min(block, 256u);
  cuda::launch(batch_norm_inference_backward_combine_kernel<float>, elementwise_detail::flat_grid(C, cb, max_blocks),
               dim3(cb), 0, stream, static_cast<const double*>(pw), static_cast<const double*>(pb), var, eps, dw, acc_w,
               db, acc_b, C, p.chunks);
}

}  // namespace diffuse::kernels
