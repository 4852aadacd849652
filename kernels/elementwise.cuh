// Pointwise and small reduction kernels of a U-Net train step, each the device version of a CPU
// backend op (NHWC: an activation is rows of C channels):
//
//   add, accumulate, scale            diffuse::add (same shapes), a gradient sink's +=, diffuse::scale
//   silu_backward                     the backward of diffuse::silu (silu_forward is in silu.cuh)
//   add_row_bias, row_bias_backward   the bias of linear / conv2d: y [rows, C] += b [C]; db += column sums
//   add_channel_bias(_backward)       diffuse::add_channel_bias: x [N, HW, C] + b [N, C]; db = pixel sums
//   conv_epilogue                     conv2d's bias + a channel bias + a residual in one pass (the ResBlock)
//   bias_silu_forward / _backward     the epilogue of diffuse::linear_act(..., Activation::SiLU)
//   mse_forward, mse_backward         diffuse::mse
//   gather_rows_add(_backward)        add(y, gather_rows(table, idx)) (the class embedding)
//
// Element type T (float now, bf16 later): loads convert to float, math is in float, stores
// convert back. Input gradients are written, or added when `accumulate` is true; parameter
// gradients (row bias, table rows) are always added. Scratch memory comes from the caller
// (`workspace`, sized by the matching *_workspace_bytes function with the same block /
// max_chunks / max_blocks arguments). Every reduction sums in a fixed order, so results are
// reproducible run to run (no float atomics). Elementwise kernels allow their output to alias
// an input at the same index (in place) and so take no __restrict__.
#pragma once

#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "reduce_sum.cuh"  // warp_sum
#include "silu.cuh"        // device_silu

namespace diffuse::kernels {

namespace elementwise_detail {

// q = a / d, r = a % d for a >= 0, d > 0. 64-bit division is a long software routine on the GPU;
// the 32-bit one is a few instructions, and activations have fewer than 2^32 elements.
__device__ __forceinline__ void divmod(std::int64_t a, std::int64_t d, std::int64_t& q, std::int64_t& r) {
  if (((static_cast<std::uint64_t>(a) | static_cast<std::uint64_t>(d)) >> 32) == 0)
    q = static_cast<std::int64_t>(static_cast<std::uint32_t>(a) / static_cast<std::uint32_t>(d));
  else
    q = a / d;
  r = a - q * d;
}

// (i / d, i % d) along a grid-stride loop i, i + stride, ...: two divisions per thread, then
// additions only.
struct StrideDivMod {
  std::int64_t q, r, dq, dr, d;
  __device__ __forceinline__ StrideDivMod(std::int64_t i, std::int64_t stride, std::int64_t divisor) : d(divisor) {
    divmod(i, d, q, r);
    divmod(stride, d, dq, dr);
  }
  __device__ __forceinline__ void advance() {
    q += dq;
    r += dr;
    if (r >= d) {
      r -= d;
      ++q;
    }
  }
};

__device__ __forceinline__ std::int64_t first_index() {
  return static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ std::int64_t grid_stride() { return static_cast<std::int64_t>(blockDim.x) * gridDim.x; }

// Sum over a block of full warps; thread 0 gets the total. warp_sums: 32 floats of shared memory.
// The tree is fixed by the block size, so the result does not depend on scheduling.
__device__ __forceinline__ float block_sum(float v, float* warp_sums) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) v = warp_sum(lane < warps ? warp_sums[lane] : 0.0f);
  return v;
}

inline void check_flat(const char* name, std::int64_t n, unsigned block, unsigned max_blocks) {
  if (n < 0) throw std::invalid_argument(std::string(name) + ": negative size");
  if (block == 0 || block > 1024 || max_blocks == 0 || max_blocks > 0x7fffffffu)
    throw std::invalid_argument(std::string(name) + ": block must be in [1, 1024] and max_blocks in [1, 2^31)");
}
inline dim3 flat_grid(std::int64_t n, unsigned block, unsigned max_blocks) {
  return dim3(static_cast<unsigned>(std::min<std::int64_t>((n + block - 1) / block, max_blocks)));
}
inline void check_ptr(const char* name, const void* p, const char* what) {
  if (!p) throw std::invalid_argument(std::string(name) + ": " + what + " is null");
}

}  // namespace elementwise_detail

// ---------------------------------------------------------------- add, accumulate, scale

template <class T>
__global__ void add_kernel(const T* a, const T* b, T* out, std::int64_t n) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  for (std::int64_t i = elementwise_detail::first_index(); i < n; i += stride)
    out[i] = static_cast<T>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
}

template <class T>
__global__ void accumulate_kernel(const T* x, T* y, std::int64_t n) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  for (std::int64_t i = elementwise_detail::first_index(); i < n; i += stride)
    y[i] = static_cast<T>(static_cast<float>(y[i]) + static_cast<float>(x[i]));
}

template <class T>
__global__ void scale_kernel(const T* x, float s, T* y, std::int64_t n) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  for (std::int64_t i = elementwise_detail::first_index(); i < n; i += stride)
    y[i] = static_cast<T>(static_cast<float>(x[i]) * s);
}

// out = a + b, n elements (out may be a or b).
template <class T>
inline void add(const T* a, const T* b, T* out, std::int64_t n, cuda::stream_t stream = {}, unsigned block = 256,
                unsigned max_blocks = 65535) {
  elementwise_detail::check_flat("add", n, block, max_blocks);
  if (n == 0) return;  // an empty grid is an invalid launch
  cuda::launch(add_kernel<T>, elementwise_detail::flat_grid(n, block, max_blocks), dim3(block), 0, stream, a, b, out, n);
}

// y += x, n elements (summing the gradients of an activation with two consumers).
template <class T>
inline void accumulate(const T* x, T* y, std::int64_t n, cuda::stream_t stream = {}, unsigned block = 256,
                       unsigned max_blocks = 65535) {
  elementwise_detail::check_flat("accumulate", n, block, max_blocks);
  if (n == 0) return;
  cuda::launch(accumulate_kernel<T>, elementwise_detail::flat_grid(n, block, max_blocks), dim3(block), 0, stream, x, y,
               n);
}

// y = x * s, n elements (y may be x).
template <class T>
inline void scale(const T* x, float s, T* y, std::int64_t n, cuda::stream_t stream = {}, unsigned block = 256,
                  unsigned max_blocks = 65535) {
  elementwise_detail::check_flat("scale", n, block, max_blocks);
  if (n == 0) return;
  cuda::launch(scale_kernel<T>, elementwise_detail::flat_grid(n, block, max_blocks), dim3(block), 0, stream, x, s, y, n);
}

// ---------------------------------------------------------------- SiLU backward

// silu'(x) = s (1 + x (1 - s)), s = sigmoid(x): the CPU's silu backward and silu_grad, in the
// same order of operations (dy * s first).
template <class T>
__global__ void silu_backward_kernel(const T* x, const T* dy, T* dx, std::int64_t n, bool accumulate) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  for (std::int64_t i = elementwise_detail::first_index(); i < n; i += stride) {
    const float xv = static_cast<float>(x[i]);
    const float s = 1.0f / (1.0f + expf(-xv));
    const float d = static_cast<float>(dy[i]) * s * (1.0f + xv * (1.0f - s));
    dx[i] = static_cast<T>(accumulate ? static_cast<float>(dx[i]) + d : d);
  }
}

// dx = dy * silu'(x) (dx += ... when accumulate), n elements; dx may be dy.
template <class T>
inline void silu_backward(const T* x, const T* dy, T* dx, std::int64_t n, bool accumulate, cuda::stream_t stream = {},
                          unsigned block = 256, unsigned max_blocks = 65535) {
  elementwise_detail::check_flat("silu_backward", n, block, max_blocks);
  if (n == 0) return;
  cuda::launch(silu_backward_kernel<T>, elementwise_detail::flat_grid(n, block, max_blocks), dim3(block), 0, stream, x,
               dy, dx, n, accumulate);
}

// ---------------------------------------------------------------- biases

template <class T>
__global__ void add_row_bias_kernel(T* y, const T* b, std::int64_t n, std::int64_t C) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  std::int64_t i = elementwise_detail::first_index();
  for (elementwise_detail::StrideDivMod col(i, stride, C); i < n; i += stride, col.advance())
    y[i] = static_cast<T>(static_cast<float>(y[i]) + static_cast<float>(b[col.r]));
}

// y [rows, C] += b [C] in place (the bias of a linear layer or of an NHWC convolution).
template <class T>
inline void add_row_bias(T* y, const T* b, std::int64_t rows, std::int64_t C, cuda::stream_t stream = {},
                         unsigned block = 256, unsigned max_blocks = 65535) {
  if (rows < 0 || C < 0) throw std::invalid_argument("add_row_bias: negative size");
  elementwise_detail::check_flat("add_row_bias", rows * C, block, max_blocks);
  if (rows * C == 0) return;
  cuda::launch(add_row_bias_kernel<T>, elementwise_detail::flat_grid(rows * C, block, max_blocks), dim3(block), 0,
               stream, y, b, rows * C, C);
}

template <class T>
__global__ void add_channel_bias_kernel(const T* x, const T* b, T* y, std::int64_t n, std::int64_t C,
                                        std::int64_t HWC) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  std::int64_t i = elementwise_detail::first_index();
  elementwise_detail::StrideDivMod col(i, stride, C), sample(i, stride, HWC);
  for (; i < n; i += stride, col.advance(), sample.advance())
    y[i] = static_cast<T>(static_cast<float>(x[i]) + static_cast<float>(b[sample.q * C + col.r]));
}

// y [N, HW, C] = x + b [N, C] broadcast over the pixels of each sample (y may be x). Its dx is dy.
template <class T>
inline void add_channel_bias(const T* x, const T* b, T* y, std::int64_t N, std::int64_t HW, std::int64_t C,
                             cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 65535) {
  if (N < 0 || HW < 0 || C < 0) throw std::invalid_argument("add_channel_bias: negative size");
  const std::int64_t n = N * HW * C;
  elementwise_detail::check_flat("add_channel_bias", n, block, max_blocks);
  if (n == 0) return;
  cuda::launch(add_channel_bias_kernel<T>, elementwise_detail::flat_grid(n, block, max_blocks), dim3(block), 0, stream,
               x, b, y, n, C, HW * C);
}

// The epilogue of a convolution and what follows it in a ResBlock, in one pass over the output:
// y = ((src + b[c]) + cb[n, c]) + res, each term optional (null), summed in float in that order
// (the order of conv2d's bias, add_channel_bias and add, so the result is theirs bit for bit).
// src is the convolution's result: y itself (in place), or the bf16 buffer of a BF16 plan, which
// this converts on the way.
template <class S, class T, class Y>
__global__ void conv_epilogue_kernel(const S* src, const T* b, const T* cb, const T* res, Y* y, std::int64_t n,
                                     std::int64_t C, std::int64_t HWC) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  std::int64_t i = elementwise_detail::first_index();
  elementwise_detail::StrideDivMod col(i, stride, C), sample(i, stride, HWC);
  for (; i < n; i += stride, col.advance(), sample.advance()) {
    float v = static_cast<float>(src[i]);
    if (b) v = v + static_cast<float>(b[col.r]);
    if (cb) v = v + static_cast<float>(cb[sample.q * C + col.r]);
    if (res) v = v + static_cast<float>(res[i]);
    y[i] = static_cast<Y>(v);
  }
}

// y [N, HW, C] = src + b [C] + cb [N, C] + res [N, HW, C] (see the kernel); src may be y. Y: y's
// type (T, or bf16 for a bf16 convolution's output kept in bf16: the float sum rounded once).
template <class S, class T, class Y>
inline void conv_epilogue(const S* src, const T* b, const T* cb, const T* res, Y* y, std::int64_t N, std::int64_t HW,
                          std::int64_t C, cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 65535) {
  if (N < 0 || HW < 0 || C < 0) throw std::invalid_argument("conv_epilogue: negative size");
  const std::int64_t n = N * HW * C;
  elementwise_detail::check_flat("conv_epilogue", n, block, max_blocks);
  if (n == 0) return;
  cuda::launch(conv_epilogue_kernel<S, T, Y>, elementwise_detail::flat_grid(n, block, max_blocks), dim3(block), 0, stream,
               src, b, cb, res, y, n, C, HW * C);
}

// Column sums of dy viewed as [batch, rows, C]. Block (tile, chunk, sample) takes the channels
// of its tile over the rows of its chunk. A tile is W = min(C, 32) consecutive channels and a
// warp reads k = 32 / W whole rows' worth of them at once (lane: channel lane % W of row lane / W),
// so its loads are consecutive addresses even for C = 3. The block's partial sums meet in shared
// memory and are added in a fixed order: over warps, then over the k rows of a warp step.
// With one chunk the block writes db itself (out = db, accumulate as asked); otherwise it writes
// float partials to the workspace [batch, chunks, C] and column_sums_combine_kernel adds them.
template <class T, class Out>
__global__ void column_sums_kernel(const T* __restrict__ dy, Out* __restrict__ out, std::int64_t rows, std::int64_t C,
                                   std::int64_t rows_per_chunk, bool accumulate) {
  DIFFUSE_SHARED(float, part, 1024);
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const std::int64_t W = C < 32 ? C : 32, k = 32 / W;
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * W + lane % W, sub = lane / W;
  const std::int64_t r0 = static_cast<std::int64_t>(blockIdx.y) * rows_per_chunk;
  const std::int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  const T* base = dy + static_cast<std::int64_t>(blockIdx.z) * rows * C;
  float acc = 0.0f;
  if (sub < k && c < C)
    for (std::int64_t r = r0 + warp * k + sub; r < r1; r += warps * k) acc += static_cast<float>(base[r * C + c]);
  part[threadIdx.x] = acc;
  __syncthreads();
  if (warp == 0) {
    float v = 0.0f;
    for (unsigned w = 0; w < warps; ++w) v += part[w * 32 + lane];
    float total = 0.0f;
    for (std::int64_t s = 0; s < k; ++s) {  // lane t < W adds lanes t, t + W, ... (same channel)
      const std::int64_t src = s * W + lane;
      total += __shfl_sync(0xffffffffu, v, static_cast<int>(src < 32 ? src : 31));
    }
    if (lane < W && c < C) {
      const std::int64_t o = (static_cast<std::int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * C + c;
      out[o] = static_cast<Out>(accumulate ? static_cast<float>(out[o]) + total : total);
    }
  }
}

// db [batch, C] (=, or += when accumulate) the sum over chunks of the partials [batch, chunks, C],
// in chunk order.
template <class T>
__global__ void column_sums_combine_kernel(const float* __restrict__ part, T* __restrict__ db, std::int64_t n,
                                           std::int64_t C, std::int64_t chunks, bool accumulate) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  std::int64_t i = elementwise_detail::first_index();
  for (elementwise_detail::StrideDivMod col(i, stride, C); i < n; i += stride, col.advance()) {
    const float* p = part + col.q * chunks * C + col.r;
    float total = 0.0f;
    for (std::int64_t j = 0; j < chunks; ++j) total += p[j * C];
    db[i] = static_cast<T>(accumulate ? static_cast<float>(db[i]) + total : total);
  }
}

namespace elementwise_detail {

struct ColumnSumPlan {
  std::int64_t chunks, rows_per_chunk;
};

// Chunks of rows so that each thread sums at least about 8 rows, at most max_chunks of them.
inline ColumnSumPlan column_sum_plan(std::int64_t rows, std::int64_t C, unsigned block, unsigned max_chunks) {
  if (rows <= 0 || C <= 0) return {1, 1};
  const std::int64_t W = std::min<std::int64_t>(C, 32), k = 32 / W;
  const std::int64_t min_rows = 8 * static_cast<std::int64_t>(block / 32) * k;
  std::int64_t chunks = std::clamp<std::int64_t>((rows + min_rows - 1) / min_rows, 1, max_chunks);
  const std::int64_t rows_per_chunk = (rows + chunks - 1) / chunks;
  chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;  // no empty chunk
  return {chunks, rows_per_chunk};
}

inline void check_column_sums(const char* name, std::int64_t batch, std::int64_t rows, std::int64_t C, unsigned block,
                              unsigned max_chunks) {
  if (batch < 0 || rows < 0 || C < 0) throw std::invalid_argument(std::string(name) + ": negative size");
  if (block == 0 || block % 32 != 0 || block > 1024 || max_chunks == 0 || max_chunks > 65535)
    throw std::invalid_argument(std::string(name) +
                                ": block must be a multiple of 32 in [32, 1024] and max_chunks in [1, 65535]");
  if (batch > 65535) throw std::invalid_argument(std::string(name) + ": more than 65535 samples");
  if ((C + 31) / 32 > 0x7fffffff) throw std::invalid_argument(std::string(name) + ": too many channels");
}

inline std::size_t column_sums_workspace_bytes(std::int64_t batch, std::int64_t rows, std::int64_t C, unsigned block,
                                               unsigned max_chunks) {
  const ColumnSumPlan p = column_sum_plan(rows, C, block, max_chunks);
  return p.chunks > 1 ? static_cast<std::size_t>(batch * p.chunks * C) * sizeof(float) : 0;
}

template <class S, class T>
inline void column_sums(const char* name, const S* dy, T* db, std::int64_t batch, std::int64_t rows, std::int64_t C,
                        bool accumulate, void* workspace, cuda::stream_t stream, unsigned block, unsigned max_chunks) {
  check_column_sums(name, batch, rows, C, block, max_chunks);
  if (batch == 0 || C == 0) return;
  const ColumnSumPlan p = column_sum_plan(rows, C, block, max_chunks);
  const std::int64_t W = std::min<std::int64_t>(C, 32);
  const dim3 grid(static_cast<unsigned>((C + W - 1) / W), static_cast<unsigned>(p.chunks), static_cast<unsigned>(batch));
  if (p.chunks == 1) {
    cuda::launch(column_sums_kernel<S, T>, grid, dim3(block), 0, stream, dy, db, rows, C, p.rows_per_chunk, accumulate);
    return;
  }
  check_ptr(name, workspace, "workspace (column_sums_workspace_bytes > 0)");
  float* part = static_cast<float*>(workspace);
  cuda::launch(column_sums_kernel<S, float>, grid, dim3(block), 0, stream, dy, part, rows, C, p.rows_per_chunk, false);
  const std::int64_t n = batch * C;
  cuda::launch(column_sums_combine_kernel<T>, flat_grid(n, block, max_chunks), dim3(block), 0, stream,
               static_cast<const float*>(part), db, n, C, p.chunks, accumulate);
}

}  // namespace elementwise_detail

// Workspace of row_bias_backward with the same rows, C, block and max_chunks (0 when one chunk).
inline std::size_t row_bias_backward_workspace_bytes(std::int64_t rows, std::int64_t C, unsigned block = 256,
                                                     unsigned max_chunks = 1024) {
  elementwise_detail::check_column_sums("row_bias_backward", 1, rows, C, block, max_chunks);
  return elementwise_detail::column_sums_workspace_bytes(1, rows, C, block, max_chunks);
}

// db [C] += column sums of dy [rows, C] (a parameter gradient: always added). `block` (a
// multiple of 32) threads per block; at most max_chunks row chunks (and combine blocks).
template <class T>
inline void row_bias_backward(const T* dy, T* db, std::int64_t rows, std::int64_t C, void* workspace,
                              cuda::stream_t stream = {}, unsigned block = 256, unsigned max_chunks = 1024) {
  elementwise_detail::column_sums("row_bias_backward", dy, db, 1, rows, C, true, workspace, stream, block, max_chunks);
}
// The same, written (accumulate = false) or added to: the autograd's first contribution writes.
// dy may be bf16 (S) where db is float (T): the sums of the widened values.
template <class S, class T>
inline void row_bias_backward(const S* dy, T* db, std::int64_t rows, std::int64_t C, bool accumulate, void* workspace,
                              cuda::stream_t stream = {}, unsigned block = 256, unsigned max_chunks = 1024) {
  elementwise_detail::column_sums("row_bias_backward", dy, db, 1, rows, C, accumulate, workspace, stream, block,
                                  max_chunks);
}

// Workspace of channel_bias_backward with the same N, HW, C, block and max_chunks.
inline std::size_t channel_bias_backward_workspace_bytes(std::int64_t N, std::int64_t HW, std::int64_t C,
                                                         unsigned block = 256, unsigned max_chunks = 1024) {
  elementwise_detail::check_column_sums("channel_bias_backward", N, HW, C, block, max_chunks);
  return elementwise_detail::column_sums_workspace_bytes(N, HW, C, block, max_chunks);
}

// db [N, C] = sum over the HW pixels of dy [N, HW, C] (+= when accumulate: db is an activation's
// gradient here, the time-embedding projection's output). dy may be bf16 (S) where db is float (T):
// the sums of the widened values.
template <class S, class T>
inline void channel_bias_backward(const S* dy, T* db, std::int64_t N, std::int64_t HW, std::int64_t C, bool accumulate,
                                  void* workspace, cuda::stream_t stream = {}, unsigned block = 256,
                                  unsigned max_chunks = 1024) {
  elementwise_detail::column_sums("channel_bias_backward", dy, db, N, HW, C, accumulate, workspace, stream, block,
                                  max_chunks);
}

// ---------------------------------------------------------------- linear + bias + SiLU epilogue

template <class T>
__global__ void bias_silu_forward_kernel(T* z, const T* b, T* y, std::int64_t n, std::int64_t C) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  std::int64_t i = elementwise_detail::first_index();
  for (elementwise_detail::StrideDivMod col(i, stride, C); i < n; i += stride, col.advance()) {
    const T zb = static_cast<T>(static_cast<float>(z[i]) + static_cast<float>(b[col.r]));
    z[i] = zb;
    y[i] = static_cast<T>(device_silu(static_cast<float>(zb)));  // from the stored value, as the backward sees it
  }
}

// The epilogue of linear_act(x, w, b, SiLU) after the GEMM z = x W^T [rows, C]: z += b in place
// (z keeps the pre-activation for the backward, as the CPU keeps sigmoid(z): no more memory) and
// y = silu(z). y must not be z.
template <class T>
inline void bias_silu_forward(T* z, const T* b, T* y, std::int64_t rows, std::int64_t C, cuda::stream_t stream = {},
                              unsigned block = 256, unsigned max_blocks = 65535) {
  if (rows < 0 || C < 0) throw std::invalid_argument("bias_silu_forward: negative size");
  elementwise_detail::check_flat("bias_silu_forward", rows * C, block, max_blocks);
  if (rows * C == 0) return;
  if (static_cast<const void*>(z) == static_cast<const void*>(y))
    throw std::invalid_argument("bias_silu_forward: y must not be z (z keeps the pre-activation)");
  cuda::launch(bias_silu_forward_kernel<T>, elementwise_detail::flat_grid(rows * C, block, max_blocks), dim3(block), 0,
               stream, z, b, y, rows * C, C);
}

// Its backward: dz = dy * silu'(z) from the kept pre-activation z (recomputing sigmoid costs one
// expf; the kernel is memory-bound either way). Then row_bias_backward(dz) gives db and the
// GEMMs dx = dz W, dW = dz^T x. accumulate: dz += ... (dz may be dy when false).
template <class T>
inline void bias_silu_backward(const T* z, const T* dy, T* dz, std::int64_t rows, std::int64_t C, bool accumulate,
                               cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 65535) {
  if (rows < 0 || C < 0) throw std::invalid_argument("bias_silu_backward: negative size");
  silu_backward(z, dy, dz, rows * C, accumulate, stream, block, max_blocks);
}

// ---------------------------------------------------------------- MSE loss

// Per-block sums of (a - b)^2 in float. Float suffices: every term is >= 0, so the relative error
// is at most (terms per thread + tree depth + 3) ulp (a few 1e-6 for any U-Net batch), and the
// loss is only reported; the gradient does not use it.
template <class T>
__global__ void mse_partial_kernel(const T* __restrict__ a, const T* __restrict__ b, std::int64_t n,
                                   float* __restrict__ partial) {
  DIFFUSE_SHARED(float, warp_sums, 32);
  const std::int64_t stride = elementwise_detail::grid_stride();
  float acc = 0.0f;
  for (std::int64_t i = elementwise_detail::first_index(); i < n; i += stride) {
    const float d = static_cast<float>(a[i]) - static_cast<float>(b[i]);
    acc += d * d;
  }
  acc = elementwise_detail::block_sum(acc, warp_sums);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// One block: the sum of the partials, divided by n in double (float(n) is inexact past 2^24).
template <class Acc>
__global__ void mse_finish_kernel(const Acc* __restrict__ partial, std::int64_t parts, std::int64_t n,
                                  float* __restrict__ out) {
  DIFFUSE_SHARED(float, warp_sums, 32);
  float acc = 0.0f;
  for (std::int64_t j = threadIdx.x; j < parts; j += blockDim.x) acc += static_cast<float>(partial[j]);
  acc = elementwise_detail::block_sum(acc, warp_sums);
  if (threadIdx.x == 0) *out = static_cast<float>(static_cast<double>(acc) / static_cast<double>(n));
}

// Bytes of mse_forward's workspace for the same n, block and max_blocks: one float per block.
inline std::size_t mse_forward_workspace_bytes(std::int64_t n, unsigned block = 256, unsigned max_blocks = 1024) {
  elementwise_detail::check_flat("mse_forward", n, block, max_blocks);
  return static_cast<std::size_t>(elementwise_detail::flat_grid(n, block, max_blocks).x) * sizeof(float);
}

// *out_loss (one float on the device) = mean((a - b)^2) over n >= 1 elements: per-block partial
// sums into the workspace, then one block adds them (fixed order: reproducible). `block` a
// multiple of 32.
template <class T>
inline void mse_forward(const T* a, const T* b, std::int64_t n, float* out_loss, void* workspace,
                        cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 1024) {
  elementwise_detail::check_flat("mse_forward", n, block, max_blocks);
  if (block % 32 != 0) throw std::invalid_argument("mse_forward: block must be a multiple of 32");
  if (n == 0) throw std::invalid_argument("mse_forward: the mean of no elements");
  elementwise_detail::check_ptr("mse_forward", workspace, "workspace");
  float* part = static_cast<float*>(workspace);
  const dim3 grid = elementwise_detail::flat_grid(n, block, max_blocks);
  cuda::launch(mse_partial_kernel<T>, grid, dim3(block), 0, stream, a, b, n, part);
  cuda::launch(mse_finish_kernel<float>, dim3(1), dim3(block), 0, stream, static_cast<const float*>(part),
               static_cast<std::int64_t>(grid.x), n, out_loss);
}

// The same with the upstream gradient read from the device (the autograd's loss seed): the factor
// is formed per thread as the CPU forms it, g * 2 / float(n), times sign (-1 for b).
template <class T>
__global__ void mse_backward_dev_kernel(const T* a, const T* b, std::int64_t n, const float* g, float sign, T* da,
                                        bool accumulate) {
  const float c = sign * (*g * 2.0f / static_cast<float>(n));
  const std::int64_t stride = elementwise_detail::grid_stride();
  for (std::int64_t i = elementwise_detail::first_index(); i < n; i += stride) {
    const float d = c * (static_cast<float>(a[i]) - static_cast<float>(b[i]));
    da[i] = static_cast<T>(accumulate ? static_cast<float>(da[i]) + d : d);
  }
}

template <class T>
inline void mse_backward(const T* a, const T* b, std::int64_t n, const float* grad, float sign, T* da, bool accumulate,
                         cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 65535) {
  elementwise_detail::check_flat("mse_backward", n, block, max_blocks);
  if (n == 0) return;
  cuda::launch(mse_backward_dev_kernel<T>, elementwise_detail::flat_grid(n, block, max_blocks), dim3(block), 0, stream,
               a, b, n, grad, sign, da, accumulate);
}

template <class T>
__global__ void mse_backward_kernel(const T* a, const T* b, std::int64_t n, float c, T* da, bool accumulate) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  for (std::int64_t i = elementwise_detail::first_index(); i < n; i += stride) {
    const float d = c * (static_cast<float>(a[i]) - static_cast<float>(b[i]));
    da[i] = static_cast<T>(accumulate ? static_cast<float>(da[i]) + d : d);
  }
}

// da = 2 (a - b) grad_scale / n (+= when accumulate); grad_scale is the loss's upstream gradient
// (1 for the loss itself). The factor is formed as the CPU forms it, grad_scale * 2 / float(n).
// The gradient for b is this with -grad_scale (the CPU's -c (a - b), bit for bit).
template <class T>
inline void mse_backward(const T* a, const T* b, std::int64_t n, float grad_scale, T* da, bool accumulate,
                         cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 65535) {
  elementwise_detail::check_flat("mse_backward", n, block, max_blocks);
  if (n == 0) return;
  const float c = grad_scale * 2.0f / static_cast<float>(n);
  cuda::launch(mse_backward_kernel<T>, elementwise_detail::flat_grid(n, block, max_blocks), dim3(block), 0, stream, a,
               b, n, c, da, accumulate);
}

// ---------------------------------------------------------------- embedding rows

template <class T>
__global__ void gather_rows_add_kernel(const T* __restrict__ table, const std::int32_t* __restrict__ idx,
                                       T* __restrict__ y, std::int64_t n, std::int64_t D, bool accumulate) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  std::int64_t i = elementwise_detail::first_index();
  for (elementwise_detail::StrideDivMod rc(i, stride, D); i < n; i += stride, rc.advance()) {
    const float v = static_cast<float>(table[static_cast<std::int64_t>(idx[rc.q]) * D + rc.r]);
    y[i] = static_cast<T>(accumulate ? static_cast<float>(y[i]) + v : v);
  }
}

// y [N, D] = (accumulate: +=) table [R, D] rows idx [N] (device int32, checked by the caller).
template <class T>
inline void gather_rows(const T* table, const std::int32_t* idx, T* y, std::int64_t N, std::int64_t D, bool accumulate,
                        cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 65535) {
  if (N < 0 || D < 0) throw std::invalid_argument("gather_rows: negative size");
  elementwise_detail::check_flat("gather_rows", N * D, block, max_blocks);
  if (N * D == 0) return;
  cuda::launch(gather_rows_add_kernel<T>, elementwise_detail::flat_grid(N * D, block, max_blocks), dim3(block), 0,
               stream, table, idx, y, N * D, D, accumulate);
}

// y [N, D] += table [R, D] rows idx [N] (device int32). Indices must lie in [0, R): the caller
// checks them on the host (the CPU backend throws std::out_of_range); the kernel does not.
template <class T>
inline void gather_rows_add(const T* table, const std::int32_t* idx, T* y, std::int64_t N, std::int64_t D,
                            cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 65535) {
  if (N < 0 || D < 0) throw std::invalid_argument("gather_rows_add: negative size");
  elementwise_detail::check_flat("gather_rows_add", N * D, block, max_blocks);
  if (N * D == 0) return;
  cuda::launch(gather_rows_add_kernel<T>, elementwise_detail::flat_grid(N * D, block, max_blocks), dim3(block), 0,
               stream, table, idx, y, N * D, D, true);
}

// Deterministic scatter-add without atomics: block per table row r (grid-stride over rows),
// thread per column; each thread walks all N indices in order and adds the rows of dy whose
// index is r, starting from the old value: the CPU's order exactly, so the result is bit for bit
// the CPU's. Costs R * N index reads (cached, the same address across a warp): fine for a class
// table (R = classes + 1, N = batch); a large vocabulary would want a sort by index instead.
template <class T>
__global__ void gather_rows_add_backward_kernel(const std::int32_t* __restrict__ idx, const T* __restrict__ dy,
                                                T* __restrict__ dtable, std::int64_t N, std::int64_t R,
                                                std::int64_t D, bool accumulate) {
  for (std::int64_t r = blockIdx.x; r < R; r += gridDim.x)
    for (std::int64_t j = threadIdx.x; j < D; j += blockDim.x) {
      float acc = accumulate ? static_cast<float>(dtable[r * D + j]) : 0.0f;
      bool hit = false;
      for (std::int64_t i = 0; i < N; ++i)
        if (idx[i] == r) {
          acc += static_cast<float>(dy[i * D + j]);
          hit = true;
        }
      // Accumulating, rows no sample uses are not touched; writing, they become 0.
      if (hit || !accumulate) dtable[r * D + j] = static_cast<T>(acc);
    }
}

// dtable [R, D] = (accumulate: +=) dy [N, D] scattered to rows idx [N]; writing, unused rows are 0.
template <class T>
inline void scatter_rows(const std::int32_t* idx, const T* dy, T* dtable, std::int64_t N, std::int64_t R,
                         std::int64_t D, bool accumulate, cuda::stream_t stream = {}, unsigned block = 256,
                         unsigned max_blocks = 65535) {
  if (N < 0 || R < 0 || D < 0) throw std::invalid_argument("scatter_rows: negative size");
  elementwise_detail::check_flat("scatter_rows", R, block, max_blocks);
  if (R == 0 || D == 0 || (N == 0 && accumulate)) return;
  const unsigned threads = static_cast<unsigned>(std::min<std::int64_t>(block, D));
  cuda::launch(gather_rows_add_backward_kernel<T>, dim3(static_cast<unsigned>(std::min<std::int64_t>(R, max_blocks))),
               dim3(threads), 0, stream, idx, dy, dtable, N, R, D, accumulate);
}

// dtable [R, D] += dy [N, D] scattered to rows idx [N] (duplicates add up), a parameter gradient.
// Indices in [0, R) as for gather_rows_add. `block` threads per row, at most max_blocks blocks.
template <class T>
inline void gather_rows_add_backward(const std::int32_t* idx, const T* dy, T* dtable, std::int64_t N, std::int64_t R,
                                     std::int64_t D, cuda::stream_t stream = {}, unsigned block = 256,
                                     unsigned max_blocks = 65535) {
  if (N < 0 || R < 0 || D < 0) throw std::invalid_argument("gather_rows_add_backward: negative size");
  elementwise_detail::check_flat("gather_rows_add_backward", R, block, max_blocks);
  if (N == 0 || R == 0 || D == 0) return;
  const unsigned threads = static_cast<unsigned>(std::min<std::int64_t>(block, D));  // no idle lanes for small D
  cuda::launch(gather_rows_add_backward_kernel<T>, dim3(static_cast<unsigned>(std::min<std::int64_t>(R, max_blocks))),
               dim3(threads), 0, stream, idx, dy, dtable, N, R, D, true);
}

}  // namespace diffuse::kernels
