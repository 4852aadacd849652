// Pooling on NHWC images x [N, H, W, C] on the device, the CPU ops of include/diffuse/ops/pool.hpp
// (PyTorch's semantics) with their rounding:
//
//   max_pool2d_forward / _backward     diffuse::max_pool2d: y = window max, argmax = h W + w of the
//                                      first maximum (strict '>', NaN wins); dx = g routed by argmax
//   avg_pool2d_forward / _backward     diffuse::avg_pool2d: y = window sum / divisor (PoolDesc's
//                                      count_include_pad); dx = sum of g / divisor over the windows
//   global_avg_pool_forward / _backward diffuse::global_avg_pool: y [N, C] = mean over the HW
//                                      pixels (in double, as the CPU); dx = g * (1 / HW)
//
// Windows (PoolDesc): output row i reads input rows [max(start, 0), min(start + k, H)), start =
// i stride - pad; its padded length is min(start + k, H + pad) - start (columns alike).
//
// One thread per output element for the forwards, one per input element for the backwards:
// windows overlap, so rather than scatter with atomics each input element gathers from the
// outputs whose windows contain it (a range of (oh, ow) computed from kernel, stride and pad),
// in row-major output order, starting from 0 or from dx. That is the CPU's order of additions,
// so every result here is the CPU's bit for bit (global_avg_pool's forward: when HW <= 256; past
// that its double partial sums over 256-pixel chunks are added in chunk order). Nothing depends
// on the launch configuration; no atomics. Threads run along the channels, so loads coalesce.
#pragma once

#include <diffuse/backend/op_types.hpp>
#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "elementwise.cuh"  // elementwise_detail: divmod, first_index, grid_stride, check_flat, flat_grid

namespace diffuse::kernels {

// global_avg_pool sums chunks of this many pixels per thread (a constant: the result must not
// depend on the launch configuration).
inline constexpr std::int64_t kGlobalAvgPoolChunk = 256;

namespace pool_detail {

using diffuse::backend::PoolDesc;

__device__ __forceinline__ bool is_nan(float v) {
#ifdef __CUDACC__
  return isnan(v);
#else
  return std::isnan(v);
#endif
}

// One output position's window along one axis (PoolDesc's rule).
struct Window {
  std::int64_t lo, hi, padded;
};
__device__ __forceinline__ Window window(std::int64_t o, std::int64_t in, std::int64_t k, std::int64_t s,
                                         std::int64_t p) {
  const std::int64_t start = o * s - p, stop = start + k < in + p ? start + k : in + p;
  return {start > 0 ? start : 0, stop < in ? stop : in, stop - start};
}

// The outputs [lo, hi) along one axis whose windows contain input index i: start <= i < start + k,
// i.e. ceil((i + p - k + 1) / s) <= o <= floor((i + p) / s), clipped to [0, out).
__device__ __forceinline__ void covering(std::int64_t i, std::int64_t k, std::int64_t s, std::int64_t p,
                                         std::int64_t out, std::int64_t& lo, std::int64_t& hi) {
  std::int64_t q, r;
  const std::int64_t num = i + p - k + 1;
  if (num <= 0) {
    lo = 0;
  } else {
    elementwise_detail::divmod(num, s, q, r);
    lo = q + (r != 0);
  }
  elementwise_detail::divmod(i + p, s, q, r);
  hi = q + 1 < out ? q + 1 : out;
}

// i = ((n * A + a) * B + b) * C + c  ->  (n * A + a, b, c) as (row, b, c); row / A only when needed.
__device__ __forceinline__ void split(std::int64_t i, std::int64_t B, std::int64_t C, std::int64_t& row,
                                      std::int64_t& b, std::int64_t& c) {
  std::int64_t q;
  elementwise_detail::divmod(i, C, q, c);
  elementwise_detail::divmod(q, B, row, b);
}

inline void check_desc(const char* name, const PoolDesc& d, unsigned block, unsigned max_blocks) {
  elementwise_detail::check_flat(name, 0, block, max_blocks);
  const std::string who(name);
  if (d.N < 0 || d.H < 0 || d.W < 0 || d.C < 0 || d.OH < 0 || d.OW < 0)
    throw std::invalid_argument(who + ": negative size");
  if (d.kernel_h < 1 || d.kernel_w < 1 || d.stride_h < 1 || d.stride_w < 1 || d.pad_h < 0 || d.pad_w < 0)
    throw std::invalid_argument(who + ": kernel and stride must be positive, padding non-negative");
  // PyTorch's rules (pool_plan checks them too): every window holds at least one input element.
  if (d.pad_h > d.kernel_h / 2 || d.pad_w > d.kernel_w / 2)
    throw std::invalid_argument(who + ": padding must be at most half the kernel size");
  if ((d.OH > 0 && (d.OH - 1) * d.stride_h - d.pad_h >= d.H) ||
      (d.OW > 0 && (d.OW - 1) * d.stride_w - d.pad_w >= d.W))
    throw std::invalid_argument(who + ": the last window starts past the input");
  if (d.H * d.W > std::numeric_limits<std::int32_t>::max())
    throw std::invalid_argument(who + ": image too large for 32-bit argmax indices");
}

}  // namespace pool_detail

// ---------------------------------------------------------------- max pool

// As the CPU: start at -inf with the index of the window's first element (so an all -inf window
// routes its gradient somewhere defined), then replace on v > max or a NaN v (strict: the first
// maximum wins ties; a later NaN replaces an earlier one, as the CPU's test does).
template <class T>
__global__ void max_pool2d_forward_kernel(diffuse::backend::PoolDesc d, const T* __restrict__ x, T* __restrict__ y,
                                          std::int32_t* __restrict__ argmax, std::int64_t n_out) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  for (std::int64_t i = elementwise_detail::first_index(); i < n_out; i += stride) {
    std::int64_t row, ow, c, n, oh;
    pool_detail::split(i, d.OW, d.C, row, ow, c);
    elementwise_detail::divmod(row, d.OH, n, oh);
    const pool_detail::Window wh = pool_detail::window(oh, d.H, d.kernel_h, d.stride_h, d.pad_h);
    const pool_detail::Window ww = pool_detail::window(ow, d.W, d.kernel_w, d.stride_w, d.pad_w);
    float m = -INFINITY;
    std::int64_t a = wh.lo * d.W + ww.lo;
    for (std::int64_t ih = wh.lo; ih < wh.hi; ++ih) {
      const T* xr = x + ((n * d.H + ih) * d.W) * d.C + c;
      for (std::int64_t iw = ww.lo; iw < ww.hi; ++iw) {
        const float v = static_cast<float>(xr[iw * d.C]);
        if (v > m || pool_detail::is_nan(v)) {
          m = v;
          a = ih * d.W + iw;
        }
      }
    }
    y[i] = static_cast<T>(m);
    if (argmax) argmax[i] = static_cast<std::int32_t>(a);
  }
}

// One thread per input element (n, ih, iw, c): the sum, over the outputs whose window contains
// it, in row-major order, of the g whose argmax names it (the CPU's scatter order).
template <class T>
__global__ void max_pool2d_backward_kernel(diffuse::backend::PoolDesc d, const std::int32_t* __restrict__ argmax,
                                           const T* __restrict__ g, T* __restrict__ dx, std::int64_t n_in, bool acc) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  for (std::int64_t i = elementwise_detail::first_index(); i < n_in; i += stride) {
    std::int64_t row, iw, c, n, ih;
    pool_detail::split(i, d.W, d.C, row, iw, c);
    elementwise_detail::divmod(row, d.H, n, ih);
    std::int64_t oh0, oh1, ow0, ow1;
    pool_detail::covering(ih, d.kernel_h, d.stride_h, d.pad_h, d.OH, oh0, oh1);
    pool_detail::covering(iw, d.kernel_w, d.stride_w, d.pad_w, d.OW, ow0, ow1);
    const std::int32_t self = static_cast<std::int32_t>(ih * d.W + iw);
    float s = acc ? static_cast<float>(dx[i]) : 0.0f;
    for (std::int64_t oh = oh0; oh < oh1; ++oh)
      for (std::int64_t ow = ow0; ow < ow1; ++ow) {
        const std::int64_t o = ((n * d.OH + oh) * d.OW + ow) * d.C + c;
        if (argmax[o] == self) s += static_cast<float>(g[o]);
      }
    dx[i] = static_cast<T>(s);
  }
}

// y [N, OH, OW, C] = the max over each window of x [N, H, W, C]; argmax (same shape, may be null
// when no backward follows) = h W + w of the first maximum.
inline void max_pool2d_forward(const diffuse::backend::PoolDesc& d, const float* x, float* y, std::int32_t* argmax,
                               cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 65535) {
  pool_detail::check_desc("max_pool2d_forward", d, block, max_blocks);
  const std::int64_t n = d.N * d.OH * d.OW * d.C;
  if (n == 0) return;  // an empty grid is an invalid launch
  elementwise_detail::check_ptr("max_pool2d_forward", x, "x");
  elementwise_detail::check_ptr("max_pool2d_forward", y, "y");
  cuda::launch(max_pool2d_forward_kernel<float>, elementwise_detail::flat_grid(n, block, max_blocks), dim3(block), 0,
               stream, d, x, y, argmax, n);
}

// dx [N, H, W, C] (+= when acc) = g [N, OH, OW, C] routed to the input elements argmax names.
inline void max_pool2d_backward(const diffuse::backend::PoolDesc& d, const std::int32_t* argmax, const float* g,
                                float* dx, bool acc, cuda::stream_t stream = {}, unsigned block = 256,
                                unsigned max_blocks = 65535) {
  pool_detail::check_desc("max_pool2d_backward", d, block, max_blocks);
  const std::int64_t n = d.N * d.H * d.W * d.C;
  if (n == 0 || !dx) return;  // a null gradient: nobody needs it
  if (d.OH * d.OW > 0) {
    elementwise_detail::check_ptr("max_pool2d_backward", argmax, "argmax");
    elementwise_detail::check_ptr("max_pool2d_backward", g, "g");
  }
  cuda::launch(max_pool2d_backward_kernel<float>, elementwise_detail::flat_grid(n, block, max_blocks), dim3(block), 0,
               stream, d, argmax, g, dx, n, acc);
}

// ---------------------------------------------------------------- average pool

namespace pool_detail {
// The divisor of one window, as the CPU forms it (an int64 product, then rounded to float).
__device__ __forceinline__ float divisor(const Window& wh, const Window& ww, bool include_pad) {
  return static_cast<float>(include_pad ? wh.padded * ww.padded : (wh.hi - wh.lo) * (ww.hi - ww.lo));
}
}  // namespace pool_detail

template <class T>
__global__ void avg_pool2d_forward_kernel(diffuse::backend::PoolDesc d, const T* __restrict__ x, T* __restrict__ y,
                                          std::int64_t n_out) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  for (std::int64_t i = elementwise_detail::first_index(); i < n_out; i += stride) {
    std::int64_t row, ow, c, n, oh;
    pool_detail::split(i, d.OW, d.C, row, ow, c);
    elementwise_detail::divmod(row, d.OH, n, oh);
    const pool_detail::Window wh = pool_detail::window(oh, d.H, d.kernel_h, d.stride_h, d.pad_h);
    const pool_detail::Window ww = pool_detail::window(ow, d.W, d.kernel_w, d.stride_w, d.pad_w);
    float s = 0.0f;
    for (std::int64_t ih = wh.lo; ih < wh.hi; ++ih) {
      const T* xr = x + ((n * d.H + ih) * d.W) * d.C + c;
      for (std::int64_t iw = ww.lo; iw < ww.hi; ++iw) s += static_cast<float>(xr[iw * d.C]);
    }
    y[i] = static_cast<T>(s / pool_detail::divisor(wh, ww, d.count_include_pad));  // divide: PyTorch's rounding
  }
}

// One thread per input element: the sum of g / divisor over the windows containing it, in
// row-major output order (the CPU's order).
template <class T>
__global__ void avg_pool2d_backward_kernel(diffuse::backend::PoolDesc d, const T* __restrict__ g, T* __restrict__ dx,
                                           std::int64_t n_in, bool acc) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  for (std::int64_t i = elementwise_detail::first_index(); i < n_in; i += stride) {
    std::int64_t row, iw, c, n, ih;
    pool_detail::split(i, d.W, d.C, row, iw, c);
    elementwise_detail::divmod(row, d.H, n, ih);
    std::int64_t oh0, oh1, ow0, ow1;
    pool_detail::covering(ih, d.kernel_h, d.stride_h, d.pad_h, d.OH, oh0, oh1);
    pool_detail::covering(iw, d.kernel_w, d.stride_w, d.pad_w, d.OW, ow0, ow1);
    float s = acc ? static_cast<float>(dx[i]) : 0.0f;
    for (std::int64_t oh = oh0; oh < oh1; ++oh) {
      const pool_detail::Window wh = pool_detail::window(oh, d.H, d.kernel_h, d.stride_h, d.pad_h);
      for (std::int64_t ow = ow0; ow < ow1; ++ow) {
        const pool_detail::Window ww = pool_detail::window(ow, d.W, d.kernel_w, d.stride_w, d.pad_w);
        const std::int64_t o = ((n * d.OH + oh) * d.OW + ow) * d.C + c;
        s += static_cast<float>(g[o]) / pool_detail::divisor(wh, ww, d.count_include_pad);
      }
    }
    dx[i] = static_cast<T>(s);
  }
}

// y [N, OH, OW, C] = window sums of x / divisor: the padded window's size when
// d.count_include_pad, else the number of input elements in it.
inline void avg_pool2d_forward(const diffuse::backend::PoolDesc& d, const float* x, float* y,
                               cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 65535) {
  pool_detail::check_desc("avg_pool2d_forward", d, block, max_blocks);
  const std::int64_t n = d.N * d.OH * d.OW * d.C;
  if (n == 0) return;
  elementwise_detail::check_ptr("avg_pool2d_forward", x, "x");
  elementwise_detail::check_ptr("avg_pool2d_forward", y, "y");
  cuda::launch(avg_pool2d_forward_kernel<float>, elementwise_detail::flat_grid(n, block, max_blocks), dim3(block), 0,
               stream, d, x, y, n);
}

// dx [N, H, W, C] (+= when acc) = sum over the windows containing each element of g / divisor.
inline void avg_pool2d_backward(const diffuse::backend::PoolDesc& d, const float* g, float* dx, bool acc,
                                cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 65535) {
  pool_detail::check_desc("avg_pool2d_backward", d, block, max_blocks);
  const std::int64_t n = d.N * d.H * d.W * d.C;
  if (n == 0 || !dx) return;
  if (d.OH * d.OW > 0) elementwise_detail::check_ptr("avg_pool2d_backward", g, "g");
  cuda::launch(avg_pool2d_backward_kernel<float>, elementwise_detail::flat_grid(n, block, max_blocks), dim3(block), 0,
               stream, d, g, dx, n, acc);
}

// ---------------------------------------------------------------- global average pool

// Thread (n, chunk, c) sums pixels [chunk * L, min(chunk * L + L, HW)) of channel c in double, in
// pixel order. One chunk: it writes y = float(sum / HW) itself (the CPU's computation exactly);
// else the double partial goes to part [N, chunks, C].
template <class T>
__global__ void global_avg_pool_partial_kernel(const T* __restrict__ x, T* __restrict__ y, double* __restrict__ part,
                                               std::int64_t N, std::int64_t HW, std::int64_t C, std::int64_t chunks) {
  const std::int64_t n_tasks = N * chunks * C, stride = elementwise_detail::grid_stride();
  for (std::int64_t i = elementwise_detail::first_index(); i < n_tasks; i += stride) {
    std::int64_t q, c, n, k;
    elementwise_detail::divmod(i, C, q, c);
    elementwise_detail::divmod(q, chunks, n, k);
    const std::int64_t p0 = k * kGlobalAvgPoolChunk, p1 = p0 + kGlobalAvgPoolChunk < HW ? p0 + kGlobalAvgPoolChunk : HW;
    const T* xp = x + n * HW * C + c;
    double s = 0.0;
    for (std::int64_t p = p0; p < p1; ++p) s += static_cast<double>(xp[p * C]);
    if (chunks == 1)
      y[i] = static_cast<T>(s / static_cast<double>(HW));
    else
      part[i] = s;
  }
}

// y[n, c] = float(sum over chunks, in chunk order, of the partials / HW).
template <class T>
__global__ void global_avg_pool_combine_kernel(const double* __restrict__ part, T* __restrict__ y, std::int64_t N,
                                               std::int64_t HW, std::int64_t C, std::int64_t chunks) {
  const std::int64_t n_out = N * C, stride = elementwise_detail::grid_stride();
  for (std::int64_t i = elementwise_detail::first_index(); i < n_out; i += stride) {
    std::int64_t n, c;
    elementwise_detail::divmod(i, C, n, c);
    const double* pp = part + n * chunks * C + c;
    double s = 0.0;
    for (std::int64_t k = 0; k < chunks; ++k) s += pp[k * C];
    y[i] = static_cast<T>(s / static_cast<double>(HW));
  }
}

// dx[n, p, c] (+)= g[n, c] * inv, inv = 1 / float(HW) (the CPU multiplies by the float reciprocal).
template <class T>
__global__ void global_avg_pool_backward_kernel(const T* __restrict__ g, T* __restrict__ dx, std::int64_t n,
                                                std::int64_t C, std::int64_t HWC, float inv, bool acc) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  std::int64_t i = elementwise_detail::first_index();
  elementwise_detail::StrideDivMod col(i, stride, C), sample(i, stride, HWC);
  for (; i < n; i += stride, col.advance(), sample.advance()) {
    const float v = static_cast<float>(g[sample.q * C + col.r]) * inv;
    dx[i] = static_cast<T>(acc ? static_cast<float>(dx[i]) + v : v);
  }
}

namespace pool_detail {
inline std::int64_t global_avg_pool_chunks(std::int64_t HW) {
  return (HW + kGlobalAvgPoolChunk - 1) / kGlobalAvgPoolChunk;
}
inline void check_global(const char* name, std::int64_t N, std::int64_t HW, std::int64_t C) {
  if (N < 0 || HW < 0 || C < 0) throw std::invalid_argument(std::string(name) + ": negative size");
}
}  // namespace pool_detail

// Bytes of global_avg_pool_forward's workspace (0 when HW <= kGlobalAvgPoolChunk).
inline std::size_t global_avg_pool_workspace_bytes(std::int64_t N, std::int64_t HW, std::int64_t C) {
  pool_detail::check_global("global_avg_pool_workspace_bytes", N, HW, C);
  const std::int64_t chunks = pool_detail::global_avg_pool_chunks(HW);
  return chunks > 1 ? static_cast<std::size_t>(N * chunks * C) * sizeof(double) : 0;
}

// y [N, C] = the mean of x [N, HW, C] over its HW pixels, summed in double (the CPU's
// accumulation); HW must be positive. workspace: global_avg_pool_workspace_bytes(N, HW, C).
inline void global_avg_pool_forward(const float* x, float* y, std::int64_t N, std::int64_t HW, std::int64_t C,
                                    void* workspace, cuda::stream_t stream = {}, unsigned block = 256,
                                    unsigned max_blocks = 65535) {
  pool_detail::check_global("global_avg_pool_forward", N, HW, C);
  elementwise_detail::check_flat("global_avg_pool_forward", 0, block, max_blocks);
  if (N * C == 0) return;
  if (HW == 0) throw std::invalid_argument("global_avg_pool_forward: the mean of no pixels");
  elementwise_detail::check_ptr("global_avg_pool_forward", x, "x");
  elementwise_detail::check_ptr("global_avg_pool_forward", y, "y");
  const std::int64_t chunks = pool_detail::global_avg_pool_chunks(HW);
  double* part = static_cast<double*>(workspace);
  if (chunks > 1) elementwise_detail::check_ptr("global_avg_pool_forward", workspace, "workspace");
  const std::int64_t tasks = N * chunks * C;
  cuda::launch(global_avg_pool_partial_kernel<float>, elementwise_detail::flat_grid(tasks, block, max_blocks),
               dim3(block), 0, stream, x, y, part, N, HW, C, chunks);
  if (chunks > 1)
    cuda::launch(global_avg_pool_combine_kernel<float>, elementwise_detail::flat_grid(N * C, block, max_blocks),
                 dim3(block), 0, stream, static_cast<const double*>(part), y, N, HW, C, chunks);
}

// dx [N, HW, C] (+= when acc) = g [N, C] / HW broadcast over the pixels.
inline void global_avg_pool_backward(const float* g, float* dx, std::int64_t N, std::int64_t HW, std::int64_t C,
                                     bool acc, cuda::stream_t stream = {}, unsigned block = 256,
                                     unsigned max_blocks = 65535) {
  pool_detail::check_global("global_avg_pool_backward", N, HW, C);
  const std::int64_t n = N * HW * C;
  elementwise_detail::check_flat("global_avg_pool_backward", n, block, max_blocks);
  if (n == 0 || !dx) return;
  elementwise_detail::check_ptr("global_avg_pool_backward", g, "g");
  const float inv = 1.0f / static_cast<float>(HW);
  cuda::launch(global_avg_pool_backward_kernel<float>, elementwise_detail::flat_grid(n, block, max_blocks),
               dim3(block), 0, stream, g, dx, n, C, HW * C, inv, acc);
}

}  // namespace diffuse::kernels
