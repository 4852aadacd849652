// Copies that move data between layouts: the device side of the CUDA backend's copy_2d and
// permute entries (include/diffuse/backend/cuda.hpp), as diffuse::concat / slice / permute do on
// the CPU (include/diffuse/ops/shape.hpp):
//
//   copy_2d    dst[r * dst_ld + j] (+)= src[r * src_ld + j], r < rows, j < width: one operand of a
//              concat along any axis (and its gradient), a slice (and its gradient)
//   permute    y (+)= x.permute(perm) for up to kMaxDims dimensions (its backward is the
//              inverse permutation)
//
// Both are memory-bound copies, one thread per destination element, so writes are coalesced.
// copy_2d moves float4s when both pointers are 16-byte aligned and the row length and leading
// dimensions are multiples of 4, and is a flat loop when the rows are contiguous. permute merges
// the output dimensions that stay contiguous in x (size-1 ones dropped), so a permutation that
// keeps the data in order is a flat copy, and the others walk their remaining dimensions with one
// 32-bit division each; reads follow x's strides (coalesced only where the innermost output
// dimension is contiguous in x, e.g. [N, L, h, d] -> [N, h, L, d]). No rounding beyond the one
// addition when accumulating.
#pragma once

#include <diffuse/backend/op_types.hpp>
#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "elementwise.cuh"  // elementwise_detail: divmod, StrideDivMod, grid loops, checks

namespace diffuse::kernels {

namespace layout_detail {

__device__ __forceinline__ float add(float a, float b) { return a + b; }
__device__ __forceinline__ float4 add(float4 a, float4 b) {
  float4 r;
  r.x = a.x + b.x;
  r.y = a.y + b.y;
  r.z = a.z + b.z;
  r.w = a.w + b.w;
  return r;
}

// y's dimensions (merged) and the stride in x of each: a kernel argument by value.
struct PermuteDesc {
  int nd = 0;
  std::int64_t size[backend::kMaxDims] = {};
  std::int64_t stride[backend::kMaxDims] = {};
};

}  // namespace layout_detail

// ---------------------------------------------------------------- copy_2d

// dst[i] (+)= src[i], n elements of V (float or float4).
template <class V>
__global__ void copy_flat_kernel(const V* src, V* dst, std::int64_t n, bool acc) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  for (std::int64_t i = elementwise_detail::first_index(); i < n; i += stride)
    dst[i] = acc ? layout_detail::add(dst[i], src[i]) : src[i];
}

// The rows * width elements in row-major order, one per thread (grid-stride), row and column
// found by two divisions per thread and then additions.
template <class V>
__global__ void copy_2d_kernel(const V* src, std::int64_t src_ld, V* dst, std::int64_t dst_ld, std::int64_t n,
                               std::int64_t width, bool acc) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  std::int64_t i = elementwise_detail::first_index();
  for (elementwise_detail::StrideDivMod rc(i, stride, width); i < n; i += stride, rc.advance()) {
    const V v = src[rc.q * src_ld + rc.r];
    V& d = dst[rc.q * dst_ld + rc.r];
    d = acc ? layout_detail::add(d, v) : v;
  }
}

namespace layout_detail {

template <class V>
inline void copy_2d_launch(const V* src, std::int64_t src_ld, V* dst, std::int64_t dst_ld, std::int64_t rows,
                           std::int64_t width, bool acc, cuda::stream_t stream, unsigned block, unsigned max_blocks) {
  const std::int64_t n = rows * width;
  const dim3 grid = elementwise_detail::flat_grid(n, block, max_blocks);
  if (rows == 1 || (src_ld == width && dst_ld == width))
    cuda::launch(copy_flat_kernel<V>, grid, dim3(block), 0, stream, src, dst, n, acc);
  else
    cuda::launch(copy_2d_kernel<V>, grid, dim3(block), 0, stream, src, src_ld, dst, dst_ld, n, width, acc);
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace layout_detail

// dst[r * dst_ld + j] (+)= src[r * src_ld + j] for r < rows, j < width (the rows must not
// overlap: both leading dimensions at least width when rows > 1). The regions must not overlap.
inline void copy_2d(const float* src, std::int64_t src_ld, float* dst, std::int64_t dst_ld, std::int64_t rows,
                    std::int64_t width, bool acc, cuda::stream_t stream = {}, unsigned block = 256,
                    unsigned max_blocks = 65535) {
  if (rows < 0 || width < 0) throw std::invalid_argument("copy_2d: negative size");
  elementwise_detail::check_flat("copy_2d", rows * width, block, max_blocks);
  if (rows == 0 || width == 0) return;
  if (rows > 1 && (src_ld < width || dst_ld < width))
    throw std::invalid_argument("copy_2d: leading dimensions must be at least the width");
  elementwise_detail::check_ptr("copy_2d", src, "src");
  elementwise_detail::check_ptr("copy_2d", dst, "dst");
  const bool vec = layout_detail::aligned16(src) && layout_detail::aligned16(dst) && width % 4 == 0 &&
                   (rows == 1 || (src_ld % 4 == 0 && dst_ld % 4 == 0));
  if (vec)
    layout_detail::copy_2d_launch(reinterpret_cast<const float4*>(src), src_ld / 4, reinterpret_cast<float4*>(dst),
                                  dst_ld / 4, rows, width / 4, acc, stream, block, max_blocks);
  else
    layout_detail::copy_2d_launch(src, src_ld, dst, dst_ld, rows, width, acc, stream, block, max_blocks);
}

// ---------------------------------------------------------------- permute

// y[i] (+)= x[the offset of y's element i], one thread per element of y.
template <class T>
__global__ void __launch_bounds__(1024)
    permute_kernel(const T* __restrict__ x, T* __restrict__ y, std::int64_t n, layout_detail::PermuteDesc d, bool acc) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  for (std::int64_t i = elementwise_detail::first_index(); i < n; i += stride) {
    std::int64_t t = i, off = 0;
    for (int k = d.nd - 1; k > 0; --k) {
      std::int64_t q, r;
      elementwise_detail::divmod(t, d.size[k], q, r);
      off += r * d.stride[k];
      t = q;
    }
    off += t * d.stride[0];
    y[i] = acc ? y[i] + x[off] : x[off];
  }
}

// y (+)= x.permute(perm): x [x_shape[0], ..., x_shape[ndim - 1]] row-major (ndim <= kMaxDims),
// y's dimension i is x's dimension perm[i] (x_shape and perm are host arrays). y must not
// overlap x.
inline void permute(const float* x, float* y, int ndim, const std::int64_t* x_shape, const int* perm, bool acc,
                    cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 65535) {
  constexpr int kMax = backend::kMaxDims;
  if (ndim < 0 || ndim > kMax)
    throw std::invalid_argument("permute: ndim must be in [0, " + std::to_string(kMax) + "]");
  if (ndim > 0 && (!x_shape || !perm)) throw std::invalid_argument("permute: x_shape or perm is null");
  bool seen[kMax] = {};
  std::int64_t xstride[kMax];
  std::int64_t n = 1;
  for (int k = ndim; k-- > 0;) {
    if (x_shape[k] < 0) throw std::invalid_argument("permute: negative size");
    xstride[k] = n;
    n *= x_shape[k];
  }
  for (int i = 0; i < ndim; ++i) {
    if (perm[i] < 0 || perm[i] >= ndim || seen[perm[i]])
      throw std::invalid_argument("permute: perm is not a permutation of the " + std::to_string(ndim) + " dimensions");
    seen[perm[i]] = true;
  }
  elementwise_detail::check_flat("permute", n, block, max_blocks);
  if (n == 0) return;
  elementwise_detail::check_ptr("permute", x, "x");
  elementwise_detail::check_ptr("permute", y, "y");
  // y's dimensions in order, size-1 ones dropped, merged where they stay contiguous in x.
  layout_detail::PermuteDesc d;
  for (int i = 0; i < ndim; ++i) {
    const std::int64_t size = x_shape[perm[i]], st = xstride[perm[i]];
    if (size == 1) continue;
    if (d.nd > 0 && d.stride[d.nd - 1] == st * size) {
      d.size[d.nd - 1] *= size;
      d.stride[d.nd - 1] = st;
      continue;
    }
    d.size[d.nd] = size;
    d.stride[d.nd] = st;
    ++d.nd;
  }
  if (d.nd == 0 || (d.nd == 1 && d.stride[0] == 1)) {  // the data stays in order
    copy_2d(x, n, y, n, 1, n, acc, stream, block, max_blocks);
    return;
  }
  cuda::launch(permute_kernel<float>, elementwise_detail::flat_grid(n, block, max_blocks), dim3(block), 0, stream, x, y,
               n, d, acc);
}

}  // namespace diffuse::kernels
