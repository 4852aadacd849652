// Classification losses on the device, on rows of K class scores (include/diffuse/ops/loss.hpp):
//
//   log_softmax_forward / _backward     diffuse::log_softmax: y = x - logsumexp(row);
//                                       dx (+)= g - exp(y) * rowsum(g)
//   cross_entropy_forward / _backward   diffuse::cross_entropy: lse [rows] and *loss = mean_r
//                                       (lse[r] - z[r, label[r]]); dlogits (+)= (*g / rows)
//                                       (softmax(z) - onehot(label))
//
// As the CPU, a row's log-sum-exp is max + log(sum exp(z - max)) in double (a non-finite max is
// returned as is), and every per-element formula is evaluated in double and rounded once; only
// the order of the double sums differs (32 lane-strided partials, then a butterfly), which is
// below float rounding. The cross-entropy backward recomputes each row's log-sum-exp in double
// from the logits rather than use the float lse of the forward: that is the CPU's computation
// (it keeps lse in double), and costs one more pass over a row of K <= ~1000 scores.
//
// One warp per row (K is small: 2 .. ~1000 classes; any K works, a lane takes every 32nd
// column), rows looping over the grid; no shared memory in the row kernels. The loss's mean is
// a fixed-order reduction (row losses in the workspace, one block of a fixed size adds them), so
// nothing depends on the launch configuration; no atomics.
#pragma once

#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace diffuse::kernels {

// Threads of the block that adds the row losses (a constant: it fixes the summation order).
inline constexpr unsigned kCrossEntropyFinishThreads = 256;

namespace classification_detail {

__device__ __forceinline__ double warp_max(double v) {
  for (int offset = 16; offset > 0; offset /= 2) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// log(sum_j exp(z_j)) of one row of K, the CPU's row_logsumexp; every lane of the warp gets it.
// fmax ignores NaN as the CPU's std::max(m, z) does; a NaN then propagates through the sum.
template <class T>
__device__ __forceinline__ double row_logsumexp(const T* z, std::int64_t K, unsigned lane) {
  double m = -INFINITY;
  for (std::int64_t j = lane; j < K; j += 32) m = fmax(m, static_cast<double>(z[j]));
  m = warp_max(m);
  if (m == INFINITY || m == -INFINITY) return m;  // all -inf (or a +inf): nothing to rescale (uniform in the warp)
  double s = 0.0;
  for (std::int64_t j = lane; j < K; j += 32) s += exp(static_cast<double>(z[j]) - m);
  return m + log(warp_sum(s));
}

// A gradient sink's put of a double: rounded to float first, then added (the CPU's GradSink).
template <class T>
__device__ __forceinline__ void put(T* out, std::int64_t i, bool acc, double v) {
  const float f = static_cast<float>(v);
  out[i] = static_cast<T>(acc ? static_cast<float>(out[i]) + f : f);
}

// Threads per block (a multiple of 32: one warp per row) and the grid for `rows`.
inline void check(const char* name, std::int64_t rows, std::int64_t K, unsigned block, unsigned max_blocks) {
  if (rows < 0 || K < 0) throw std::invalid_argument(std::string(name) + ": negative size");
  if (block == 0 || block % 32 != 0 || block > 1024 || max_blocks == 0)
    throw std::invalid_argument(std::string(name) +
                                ": block must be a multiple of 32 in [32, 1024] and max_blocks at least 1");
}
inline dim3 row_grid(std::int64_t rows, unsigned block, unsigned max_blocks) {
  const std::int64_t per_block = block / 32;
  return dim3(static_cast<unsigned>(std::min<std::int64_t>((rows + per_block - 1) / per_block, max_blocks)));
}
inline void check_ptr(const char* name, const void* p, const char* what) {
  if (!p) throw std::invalid_argument(std::string(name) + ": " + what + " is null");
}

// The row loops: warp w of block b takes rows b W + w, then + gridDim.x W, ... (W warps a
// block); all lanes of a warp run the same iterations, as the full-mask shuffles need.
__device__ __forceinline__ std::int64_t first_row() {
  return static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
}
__device__ __forceinline__ std::int64_t row_stride() {
  return static_cast<std::int64_t>(gridDim.x) * (blockDim.x / 32);
}
}  // namespace classification_detail

// ---------------------------------------------------------------- log_softmax

template <class T>
__global__ void log_softmax_forward_kernel(const T* __restrict__ x, T* __restrict__ y, std::int64_t rows,
                                           std::int64_t K) {
  const unsigned lane = threadIdx.x % 32;
  for (std::int64_t row = classification_detail::first_row(); row < rows;
       row += classification_detail::row_stride()) {
    const T* xr = x + row * K;
    const double lse = classification_detail::row_logsumexp(xr, K, lane);
    for (std::int64_t j = lane; j < K; j += 32) y[row * K + j] = static_cast<T>(static_cast<double>(xr[j]) - lse);
  }
}

template <class T>
__global__ void log_softmax_backward_kernel(const T* __restrict__ y, const T* __restrict__ g, T* __restrict__ dx,
                                            std::int64_t rows, std::int64_t K, bool acc) {
  const unsigned lane = threadIdx.x % 32;
  for (std::int64_t row = classification_detail::first_row(); row < rows;
       row += classification_detail::row_stride()) {
    const T* gr = g + row * K;
    double gs = 0.0;
    for (std::int64_t j = lane; j < K; j += 32) gs += static_cast<double>(gr[j]);
    gs = classification_detail::warp_sum(gs);
    for (std::int64_t j = lane; j < K; j += 32) {
      const std::int64_t i = row * K + j;
      classification_detail::put(dx, i, acc, static_cast<double>(g[i]) - exp(static_cast<double>(y[i])) * gs);
    }
  }
}

// y [rows, K] = log_softmax of each row of x (y must not overlap x). `block` threads (a multiple
// of 32: block / 32 rows at a time), at most max_blocks blocks.
inline void log_softmax_forward(const float* x, float* y, std::int64_t rows, std::int64_t K,
                                cuda::stream_t stream = {}, unsigned block = 128, unsigned max_blocks = 65535) {
  classification_detail::check("log_softmax_forward", rows, K, block, max_blocks);
  if (rows == 0 || K == 0) return;  // an empty grid is an invalid launch
  classification_detail::check_ptr("log_softmax_forward", x, "x");
  classification_detail::check_ptr("log_softmax_forward", y, "y");
  cuda::launch(log_softmax_forward_kernel<float>, classification_detail::row_grid(rows, block, max_blocks),
               dim3(block), 0, stream, x, y, rows, K);
}

// dx [rows, K] (+= when acc) = g - exp(y) * rowsum(g), from the forward's output y.
inline void log_softmax_backward(const float* y, const float* g, float* dx, std::int64_t rows, std::int64_t K,
                                 bool acc, cuda::stream_t stream = {}, unsigned block = 128,
                                 unsigned max_blocks = 65535) {
  classification_detail::check("log_softmax_backward", rows, K, block, max_blocks);
  if (rows == 0 || K == 0 || !dx) return;
  classification_detail::check_ptr("log_softmax_backward", y, "y");
  classification_detail::check_ptr("log_softmax_backward", g, "g");
  cuda::launch(log_softmax_backward_kernel<float>, classification_detail::row_grid(rows, block, max_blocks),
               dim3(block), 0, stream, y, g, dx, rows, K, acc);
}

// ---------------------------------------------------------------- cross_entropy

// Per row: lse[r] = float(lse) and the row's loss lse - z[label] in double into row_loss [rows].
template <class T>
__global__ void cross_entropy_rows_kernel(const T* __restrict__ z, const std::int32_t* __restrict__ labels,
                                          std::int64_t rows, std::int64_t K, T* __restrict__ lse,
                                          double* __restrict__ row_loss) {
  const unsigned lane = threadIdx.x % 32;
  for (std::int64_t row = classification_detail::first_row(); row < rows;
       row += classification_detail::row_stride()) {
    const T* zr = z + row * K;
    const double l = classification_detail::row_logsumexp(zr, K, lane);
    if (lane == 0) {
      if (lse) lse[row] = static_cast<T>(l);
      row_loss[row] = l - static_cast<double>(zr[labels[row]]);
    }
  }
}

// One block of kCrossEntropyFinishThreads: *loss = float(sum of row_loss / rows); thread t adds
// rows t, t + blockDim, ... then a fixed tree in shared memory.
template <class T>
__global__ void cross_entropy_finish_kernel(const double* __restrict__ row_loss, std::int64_t rows,
                                            T* __restrict__ loss) {
  DIFFUSE_SHARED(double, part, kCrossEntropyFinishThreads);
  double s = 0.0;
  for (std::int64_t r = threadIdx.x; r < rows; r += blockDim.x) s += row_loss[r];
  part[threadIdx.x] = s;
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = static_cast<T>(part[0] / static_cast<double>(rows));
}

template <class T>
__global__ void cross_entropy_backward_kernel(const T* __restrict__ z, const std::int32_t* __restrict__ labels,
                                              const T* __restrict__ g, T* __restrict__ dz, std::int64_t rows,
                                              std::int64_t K, bool acc) {
  const double c = static_cast<double>(*g) / static_cast<double>(rows);
  const unsigned lane = threadIdx.x % 32;
  for (std::int64_t row = classification_detail::first_row(); row < rows;
       row += classification_detail::row_stride()) {
    const T* zr = z + row * K;
    const double l = classification_detail::row_logsumexp(zr, K, lane);
    const std::int64_t label = labels[row];
    for (std::int64_t j = lane; j < K; j += 32) {
      const double p = exp(static_cast<double>(zr[j]) - l);
      classification_detail::put(dz, row * K + j, acc, c * (p - (j == label ? 1.0 : 0.0)));
    }
  }
}

// Bytes of cross_entropy_forward's workspace: one double per row.
inline std::size_t cross_entropy_workspace_bytes(std::int64_t rows, std::int64_t K) {
  if (rows < 0 || K < 0) throw std::invalid_argument("cross_entropy_workspace_bytes: negative size");
  return static_cast<std::size_t>(rows) * sizeof(double);
}

// logits [rows, K], labels [rows] (device int32 in [0, K): the op checks them on the host);
// lse [rows] = each row's log-sum-exp (may be null); *loss (one device float) = the mean of
// lse - z[label] over the rows (rows >= 1, K >= 1). workspace: cross_entropy_workspace_bytes.
inline void cross_entropy_forward(const float* logits, const std::int32_t* labels, std::int64_t rows, std::int64_t K,
                                  float* loss, float* lse, void* workspace, cuda::stream_t stream = {},
                                  unsigned block = 128, unsigned max_blocks = 65535) {
  const char* name = "cross_entropy_forward";
  classification_detail::check(name, rows, K, block, max_blocks);
  if (rows == 0 || K == 0) throw std::invalid_argument("cross_entropy_forward: empty logits");
  classification_detail::check_ptr(name, logits, "logits");
  classification_detail::check_ptr(name, labels, "labels");
  classification_detail::check_ptr(name, loss, "loss");
  classification_detail::check_ptr(name, workspace, "workspace");
  double* row_loss = static_cast<double*>(workspace);
  cuda::launch(cross_entropy_rows_kernel<float>, classification_detail::row_grid(rows, block, max_blocks),
               dim3(block), 0, stream, logits, labels, rows, K, lse, row_loss);
  cuda::launch(cross_entropy_finish_kernel<float>, dim3(1), dim3(kCrossEntropyFinishThreads), 0, stream,
               static_cast<const double*>(row_loss), rows, loss);
}

// dlogits [rows, K] (+= when acc) = (*g / rows) (softmax(z) - onehot(label)), g one device
// float (the loss's upstream gradient). `lse` is the forward's (kept in the interface; the rows'
// log-sum-exps are recomputed here in double, see the top of this file; it may be null).
inline void cross_entropy_backward(const float* logits, const std::int32_t* labels, const float* lse, const float* g,
                                   float* dlogits, std::int64_t rows, std::int64_t K, bool acc,
                                   cuda::stream_t stream = {}, unsigned block = 128, unsigned max_blocks = 65535) {
  (void)lse;
  const char* name = "cross_entropy_backward";
  classification_detail::check(name, rows, K, block, max_blocks);
  if (rows == 0 || K == 0 || !dlogits) return;
  classification_detail::check_ptr(name, logits, "logits");
  classification_detail::check_ptr(name, labels, "labels");
  classification_detail::check_ptr(name, g, "g");
  cuda::launch(cross_entropy_backward_kernel<float>, classification_detail::row_grid(rows, block, max_blocks),
               dim3(block), 0, stream, logits, labels, g, dlogits, rows, K, acc);
}

}  // namespace diffuse::kernels
