// Pointwise ops, broadcasting binary ops and their gradients, and the sum of a tensor: the device
// side of the CUDA backend's pointwise and sum entries (include/diffuse/backend/cuda.hpp), with the
// CPU ops' semantics (include/diffuse/ops/elementwise.hpp, reduce.hpp):
//
//   fill, fill_scalar      y = v; y (+)= alpha * (*s) for one device float s (the backward of sum)
//   axpby, scale_acc       y = a x + b y (y not read when b == 0); y (+)= s x
//   binary                 y = a op b (Add, Sub, Mul) with NumPy broadcasting (a BroadcastDesc)
//   binary_backward        the gradient of one operand of a op b: g times the other operand (Mul)
//                          or +-1, summed over the dimensions where the operand is broadcast
//   sum                    *out = the sum of x, in double as diffuse::sum (sum_workspace_bytes)
//
// Broadcast shapes are first reduced to as few dimensions as they have (size-1 dimensions
// dropped, neighbours whose strides continue each other merged: [N, C] + [C] is 2-D, a scalar
// operand makes any shape 1-D), then walked with one 32-bit division per dimension per element.
// The gradient of a broadcast operand is a deterministic reduction without float atomics; the
// kernel is chosen from the shapes alone (never from block / max_blocks), so the result does
// not depend on the launch configuration:
//   - the operand is not broadcast: one thread per element;
//   - the contiguous (last) output dimension is one the operand keeps ([N, C] + [C]): a thread
//     per dx element (lanes over consecutive dx elements read consecutive g elements), summing
//     in the CPU's order, so bit for bit the CPU's result; when there are few dx elements for
//     many terms, 32-element tiles of dx get a block of (32, P) threads, P row chunks summed in
//     order, then added in chunk order;
//   - the operand is broadcast along the last output dimension ([N, C, 1] * [N, C, HW]): a warp
//     per dx element (a whole 256-thread block when there are few of them and many terms) reads
//     the runs of g along that dimension, then a shuffle (+ shared memory) tree.
// Elementwise kernels allow their output to alias an input at the same index. The kernels that
// walk dimensions are declared for blocks of up to 1024 threads (__launch_bounds__), so that any
// `block` (and the split reduction's (32, 32)) fits the register file.
#pragma once

#include <diffuse/backend/op_types.hpp>
#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "elementwise.cuh"  // elementwise_detail: divmod, grid loops, block_sum, checks
#include "reduce_sum.cuh"   // warp_sum

namespace diffuse::kernels {

namespace pointwise_detail {

using elementwise_detail::first_index;
using elementwise_detail::grid_stride;

// Up to kMaxDims row-major dimensions, each with the element strides of up to three arrays.
// A kernel argument by value (no device memory).
struct Walk {
  int nd = 0;
  std::int64_t size[backend::kMaxDims] = {};
  std::int64_t s0[backend::kMaxDims] = {}, s1[backend::kMaxDims] = {}, s2[backend::kMaxDims] = {};
};

// Appends a dimension (inner to the ones already there): dropped when of size 1, merged into the
// previous one when all three strides continue it.
inline void push_dim(Walk& w, std::int64_t n, std::int64_t a, std::int64_t b, std::int64_t c) {
  if (n == 1) return;
  if (w.nd > 0) {
    const int k = w.nd - 1;
    if (w.s0[k] == a * n && w.s1[k] == b * n && w.s2[k] == c * n) {
      w.size[k] *= n;
      w.s0[k] = a;
      w.s1[k] = b;
      w.s2[k] = c;
      return;
    }
  }
  w.size[w.nd] = n;
  w.s0[w.nd] = a;
  w.s1[w.nd] = b;
  w.s2[w.nd] = c;
  ++w.nd;
}

// The offsets along the three strides of the row-major index t over the first nd dims of w.
__device__ __forceinline__ void walk_offsets(const Walk& w, int nd, std::int64_t t, std::int64_t& o0, std::int64_t& o1,
                                             std::int64_t& o2) {
  o0 = o1 = o2 = 0;
  for (int k = nd - 1; k > 0; --k) {
    std::int64_t q, r;
    elementwise_detail::divmod(t, w.size[k], q, r);
    o0 += r * w.s0[k];
    o1 += r * w.s1[k];
    o2 += r * w.s2[k];
    t = q;
  }
  if (nd > 0) {
    o0 += t * w.s0[0];
    o1 += t * w.s1[0];
    o2 += t * w.s2[0];
  }
}

template <BinaryOp Op>
__device__ __forceinline__ float apply(float a, float b) {
  if constexpr (Op == BinaryOp::Add)
    return a + b;
  else if constexpr (Op == BinaryOp::Sub)
    return a - b;
  else
    return a * b;
}

// Block sum (full warps) in T; thread 0 gets the total. warp_sums: 32 T of shared memory.
template <class T>
__device__ __forceinline__ T block_sum(T v, T* warp_sums) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) v = warp_sum(lane < warps ? warp_sums[lane] : T(0));
  return v;
}

// v plus g[i] * w(i) over the reduced indices r in [r0, r1) (row-major over `red`: increasing
// output index i, the CPU's order); g and o (the other operand, read for Mul only) are at the
// bases of one dx element. The innermost dimension is a plain loop; the outer ones are found
// once per run of it.
template <class T, bool Mul>
__device__ __forceinline__ float reduce_range(float v, const T* g, const T* o, const Walk& red, std::int64_t r0,
                                              std::int64_t r1, float sign) {
  const int last = red.nd - 1;
  const std::int64_t L = red.size[last], gs = red.s0[last], os = red.s1[last];
  std::int64_t q, l;
  elementwise_detail::divmod(r0, L, q, l);
  for (std::int64_t r = r0; r < r1; ++q) {
    std::int64_t og, oo, unused;
    walk_offsets(red, last, q, og, oo, unused);
    const std::int64_t end = r1 - r < L - l ? l + (r1 - r) : L;
    r += end - l;
    const T* gp = g + og;
    if constexpr (Mul) {
      const T* op = o + oo;
      for (; l < end; ++l) v += static_cast<float>(gp[l * gs]) * static_cast<float>(op[l * os]);
    } else {
      for (; l < end; ++l) v += static_cast<float>(gp[l * gs]) * sign;
    }
    l = 0;
  }
  return v;
}

inline void check_launch(const char* name, unsigned block, unsigned max_blocks) {
  if (block == 0 || block > 1024 || max_blocks == 0 || max_blocks > 0x7fffffffu)
    throw std::invalid_argument(std::string(name) + ": block must be in [1, 1024] and max_blocks in [1, 2^31)");
}

inline void check_desc(const char* name, const backend::BroadcastDesc& d) {
  if (d.ndim < 0 || d.ndim > backend::kMaxDims)
    throw std::invalid_argument(std::string(name) + ": ndim must be in [0, " + std::to_string(backend::kMaxDims) + "]");
  for (int k = 0; k < d.ndim; ++k)
    if (d.out[k] < 0 || d.sa[k] < 0 || d.sb[k] < 0)
      throw std::invalid_argument(std::string(name) + ": negative size or stride");
}

inline dim3 grid_for(std::int64_t work, unsigned per_block, unsigned max_blocks) {
  return dim3(static_cast<unsigned>(std::clamp<std::int64_t>((work + per_block - 1) / per_block, 1, max_blocks)));
}

// Threads of the reductions whose shape does not come from the caller's `block`.
inline constexpr unsigned kReduceBlock = 256;

}  // namespace pointwise_detail

// ---------------------------------------------------------------- fill, scale, axpby

template <class T>
__global__ void fill_kernel(T* y, std::int64_t n, float v) {
  const std::int64_t stride = pointwise_detail::grid_stride();
  for (std::int64_t i = pointwise_detail::first_index(); i < n; i += stride) y[i] = static_cast<T>(v);
}

template <class T>
__global__ void fill_scalar_kernel(const T* s, float alpha, T* y, std::int64_t n, bool acc) {
  const float v = alpha * static_cast<float>(*s);
  const std::int64_t stride = pointwise_detail::grid_stride();
  for (std::int64_t i = pointwise_detail::first_index(); i < n; i += stride)
    y[i] = static_cast<T>(acc ? static_cast<float>(y[i]) + v : v);
}

template <class T>
__global__ void axpby_kernel(float a, const T* x, float b, T* y, std::int64_t n) {
  const std::int64_t stride = pointwise_detail::grid_stride();
  for (std::int64_t i = pointwise_detail::first_index(); i < n; i += stride) {
    const float ax = a * static_cast<float>(x[i]);
    y[i] = static_cast<T>(b == 0.0f ? ax : ax + b * static_cast<float>(y[i]));
  }
}

template <class T>
__global__ void scale_acc_kernel(const T* x, float s, T* y, std::int64_t n, bool acc) {
  const std::int64_t stride = pointwise_detail::grid_stride();
  for (std::int64_t i = pointwise_detail::first_index(); i < n; i += stride) {
    const float v = static_cast<float>(x[i]) * s;  // x s, as the CPU's scale
    y[i] = static_cast<T>(acc ? static_cast<float>(y[i]) + v : v);
  }
}

// y[0..n) = v.
inline void fill(float* y, std::int64_t n, float v, cuda::stream_t stream = {}, unsigned block = 256,
                 unsigned max_blocks = 65535) {
  elementwise_detail::check_flat("fill", n, block, max_blocks);
  if (n == 0) return;
  elementwise_detail::check_ptr("fill", y, "y");
  cuda::launch(fill_kernel<float>, elementwise_detail::flat_grid(n, block, max_blocks), dim3(block), 0, stream, y, n,
               v);
}

// y (+)= alpha * (*s), s one float in device memory (the backward of sum broadcasts its gradient).
inline void fill_scalar(const float* s, float alpha, float* y, std::int64_t n, bool acc, cuda::stream_t stream = {},
                        unsigned block = 256, unsigned max_blocks = 65535) {
  elementwise_detail::check_flat("fill_scalar", n, block, max_blocks);
  if (n == 0) return;
  elementwise_detail::check_ptr("fill_scalar", s, "s");
  elementwise_detail::check_ptr("fill_scalar", y, "y");
  cuda::launch(fill_scalar_kernel<float>, elementwise_detail::flat_grid(n, block, max_blocks), dim3(block), 0, stream,
               s, alpha, y, n, acc);
}

// y = a x + b y; when b == 0, y is not read (it may hold NaN). y may be x.
inline void axpby(float a, const float* x, float b, float* y, std::int64_t n, cuda::stream_t stream = {},
                  unsigned block = 256, unsigned max_blocks = 65535) {
  elementwise_detail::check_flat("axpby", n, block, max_blocks);
  if (n == 0) return;
  elementwise_detail::check_ptr("axpby", x, "x");
  elementwise_detail::check_ptr("axpby", y, "y");
  cuda::launch(axpby_kernel<float>, elementwise_detail::flat_grid(n, block, max_blocks), dim3(block), 0, stream, a, x,
               b, y, n);
}

// y (+)= s x (y is not read when acc is false; y may be x).
inline void scale_acc(const float* x, float s, float* y, std::int64_t n, bool acc, cuda::stream_t stream = {},
                      unsigned block = 256, unsigned max_blocks = 65535) {
  elementwise_detail::check_flat("scale_acc", n, block, max_blocks);
  if (n == 0) return;
  elementwise_detail::check_ptr("scale_acc", x, "x");
  elementwise_detail::check_ptr("scale_acc", y, "y");
  cuda::launch(scale_acc_kernel<float>, elementwise_detail::flat_grid(n, block, max_blocks), dim3(block), 0, stream, x,
               s, y, n, acc);
}

// ---------------------------------------------------------------- binary with broadcasting

template <class T, BinaryOp Op>
__global__ void binary_flat_kernel(const T* a, const T* b, T* y, std::int64_t n) {
  const std::int64_t stride = pointwise_detail::grid_stride();
  for (std::int64_t i = pointwise_detail::first_index(); i < n; i += stride)
    y[i] = static_cast<T>(pointwise_detail::apply<Op>(static_cast<float>(a[i]), static_cast<float>(b[i])));
}

// w: the output's dimensions with a's strides (s1) and b's (s2).
template <class T, BinaryOp Op>
__global__ void __launch_bounds__(1024)
    binary_strided_kernel(const T* a, const T* b, T* y, std::int64_t n, pointwise_detail::Walk w) {
  const std::int64_t stride = pointwise_detail::grid_stride();
  for (std::int64_t i = pointwise_detail::first_index(); i < n; i += stride) {
    std::int64_t unused, ia, ib;
    pointwise_detail::walk_offsets(w, w.nd, i, unused, ia, ib);
    y[i] = static_cast<T>(pointwise_detail::apply<Op>(static_cast<float>(a[ia]), static_cast<float>(b[ib])));
  }
}

namespace pointwise_detail {
template <BinaryOp Op>
inline void binary_launch(const float* a, const float* b, float* y, std::int64_t n, const Walk& w, bool flat,
                          cuda::stream_t stream, unsigned block, unsigned max_blocks) {
  const dim3 grid = elementwise_detail::flat_grid(n, block, max_blocks);
  if (flat)
    cuda::launch(binary_flat_kernel<float, Op>, grid, dim3(block), 0, stream, a, b, y, n);
  else
    cuda::launch(binary_strided_kernel<float, Op>, grid, dim3(block), 0, stream, a, b, y, n, w);
}
}  // namespace pointwise_detail

// y [d.out] = a op b with NumPy broadcasting: d.sa / d.sb are a's and b's element strides per
// output dimension (0 where broadcast); ndim 0 is a scalar. Contiguous unbroadcast operands take
// a flat loop; anything else the merged dimensions (one division per remaining dimension).
inline void binary(BinaryOp op, const float* a, const float* b, float* y, const backend::BroadcastDesc& d,
                   cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 65535) {
  pointwise_detail::check_desc("binary", d);
  pointwise_detail::check_launch("binary", block, max_blocks);
  const std::int64_t n = d.numel();
  if (n == 0) return;
  elementwise_detail::check_ptr("binary", a, "a");
  elementwise_detail::check_ptr("binary", b, "b");
  elementwise_detail::check_ptr("binary", y, "y");
  pointwise_detail::Walk w;
  std::int64_t os = 1;
  std::int64_t ostride[backend::kMaxDims];
  for (int k = d.ndim; k-- > 0;) {
    ostride[k] = os;
    os *= d.out[k];
  }
  for (int k = 0; k < d.ndim; ++k) pointwise_detail::push_dim(w, d.out[k], ostride[k], d.sa[k], d.sb[k]);
  const bool flat = w.nd == 0 || (w.nd == 1 && w.s1[0] == 1 && w.s2[0] == 1);
  switch (op) {
    case BinaryOp::Add:
      pointwise_detail::binary_launch<BinaryOp::Add>(a, b, y, n, w, flat, stream, block, max_blocks);
      break;
    case BinaryOp::Sub:
      pointwise_detail::binary_launch<BinaryOp::Sub>(a, b, y, n, w, flat, stream, block, max_blocks);
      break;
    case BinaryOp::Mul:
      pointwise_detail::binary_launch<BinaryOp::Mul>(a, b, y, n, w, flat, stream, block, max_blocks);
      break;
    default:
      throw std::invalid_argument("binary: unknown op");
  }
}

// ---------------------------------------------------------------- the gradient of a binary op

// The operand is not broadcast, g and dx contiguous: dx[i] (+)= g[i] * (other[i * other_stride]
// for Mul, other_stride 0 or 1; else sign).
template <class T, bool Mul>
__global__ void binary_grad_flat_kernel(const T* g, const T* other, std::int64_t other_stride, T* dx, std::int64_t n,
                                        float sign, bool acc) {
  const std::int64_t stride = pointwise_detail::grid_stride();
  for (std::int64_t i = pointwise_detail::first_index(); i < n; i += stride) {
    const float v = static_cast<float>(g[i]) * (Mul ? static_cast<float>(other[i * other_stride]) : sign);
    dx[i] = static_cast<T>(acc ? static_cast<float>(dx[i]) + v : v);
  }
}

// The operand is not broadcast but the other one (Mul) is: kept = the operand's dimensions with
// the strides of g (s0), of the other operand (s1) and of dx (s2).
template <class T, bool Mul>
__global__ void __launch_bounds__(1024) binary_grad_strided_kernel(const T* g, const T* other, T* dx, std::int64_t n,
                                                                   pointwise_detail::Walk kept, float sign, bool acc) {
  const std::int64_t stride = pointwise_detail::grid_stride();
  for (std::int64_t j = pointwise_detail::first_index(); j < n; j += stride) {
    std::int64_t go, oo, xo;
    pointwise_detail::walk_offsets(kept, kept.nd, j, go, oo, xo);
    const float v = static_cast<float>(g[go]) * (Mul ? static_cast<float>(other[oo]) : sign);
    dx[xo] = static_cast<T>(acc ? static_cast<float>(dx[xo]) + v : v);
  }
}

// One thread per dx element, summing its nr terms (the dimensions of `red`: strides of g, s0,
// and of the other operand, s1) in the CPU's order from the CPU's start (0, or dx when acc).
template <class T, bool Mul>
__global__ void __launch_bounds__(1024)
    binary_grad_reduce_kernel(const T* g, const T* other, T* dx, std::int64_t nx, std::int64_t nr,
                              pointwise_detail::Walk kept, pointwise_detail::Walk red, float sign, bool acc) {
  const std::int64_t stride = pointwise_detail::grid_stride();
  for (std::int64_t j = pointwise_detail::first_index(); j < nx; j += stride) {
    std::int64_t go, oo, xo;
    pointwise_detail::walk_offsets(kept, kept.nd, j, go, oo, xo);
    const float start = acc ? static_cast<float>(dx[xo]) : 0.0f;
    const float v = pointwise_detail::reduce_range<T, Mul>(start, g + go, Mul ? other + oo : other, red, 0, nr, sign);
    dx[xo] = static_cast<T>(v);
  }
}

// The same with blockDim (32, P): lane x takes dx element 32 tile + x, row y the chunk
// [y chunk, (y + 1) chunk) of its terms; the P partial sums are added in chunk order.
template <class T, bool Mul>
__global__ void __launch_bounds__(1024)
    binary_grad_reduce_split_kernel(const T* g, const T* other, T* dx, std::int64_t nx, std::int64_t nr,
                                    std::int64_t chunk, pointwise_detail::Walk kept, pointwise_detail::Walk red,
                                    float sign, bool acc) {
  DIFFUSE_SHARED(float, part, 1024);
  const unsigned lane = threadIdx.x, p = threadIdx.y, parts = blockDim.y;
  for (std::int64_t tile = blockIdx.x; tile * 32 < nx; tile += gridDim.x) {
    const std::int64_t j = tile * 32 + lane;
    std::int64_t go = 0, oo = 0, xo = 0;
    float v = 0.0f;
    if (j < nx) {
      pointwise_detail::walk_offsets(kept, kept.nd, j, go, oo, xo);
      const std::int64_t r0 = static_cast<std::int64_t>(p) * chunk, r1 = r0 + chunk < nr ? r0 + chunk : nr;
      if (r0 < r1)
        v = pointwise_detail::reduce_range<T, Mul>(0.0f, g + go, Mul ? other + oo : other, red, r0, r1, sign);
    }
    part[p * 32 + lane] = v;
    __syncthreads();
    if (p == 0 && j < nx) {
      float total = 0.0f;
      for (unsigned k = 0; k < parts; ++k) total += part[k * 32 + lane];
      dx[xo] = static_cast<T>(acc ? static_cast<float>(dx[xo]) + total : total);
    }
    __syncthreads();  // part is rewritten by the next tile
  }
}

// The operand is broadcast along the contiguous output dimension (red's last, g stride 1, length
// L): a group of lanes per dx element, lane t reading elements t, t + G, ... of each run; then a
// shuffle tree (G = 32, one warp) or a block tree (G = blockDim.x, one block).
template <class T, bool Mul, bool WholeBlock>
__global__ void binary_grad_rows_kernel(const T* g, const T* other, T* dx, std::int64_t nx, std::int64_t runs,
                                        pointwise_detail::Walk kept, pointwise_detail::Walk red, float sign, bool acc) {
  DIFFUSE_SHARED(float, warp_sums, 32);
  const int last = red.nd - 1;
  const std::int64_t L = red.size[last], os = red.s1[last];
  std::int64_t lane, G, group, groups;
  if constexpr (WholeBlock) {
    lane = threadIdx.x;
    G = blockDim.x;
    group = blockIdx.x;
    groups = gridDim.x;
  } else {
    lane = threadIdx.x % 32;
    G = 32;
    group = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    groups = static_cast<std::int64_t>(gridDim.x) * (blockDim.x / 32);
  }
  for (std::int64_t j = group; j < nx; j += groups) {  // uniform over the group
    std::int64_t go, oo, xo;
    pointwise_detail::walk_offsets(kept, kept.nd, j, go, oo, xo);
    float v = 0.0f;
    for (std::int64_t q = 0; q < runs; ++q) {
      std::int64_t og, oq, unused;
      pointwise_detail::walk_offsets(red, last, q, og, oq, unused);
      const T* gp = g + go + og;
      if constexpr (Mul) {
        const T* op = other + oo + oq;
        for (std::int64_t l = lane; l < L; l += G) v += static_cast<float>(gp[l]) * static_cast<float>(op[l * os]);
      } else {
        for (std::int64_t l = lane; l < L; l += G) v += static_cast<float>(gp[l]) * sign;
      }
    }
    if constexpr (WholeBlock) {
      v = pointwise_detail::block_sum(v, warp_sums);
      if (threadIdx.x == 0) dx[xo] = static_cast<T>(acc ? static_cast<float>(dx[xo]) + v : v);
      __syncthreads();  // warp 0 has read warp_sums before the next element writes them
    } else {
      v = warp_sum(v);
      if (lane == 0) dx[xo] = static_cast<T>(acc ? static_cast<float>(dx[xo]) + v : v);
    }
  }
}

namespace pointwise_detail {

template <bool Mul>
inline void binary_grad_launch(const float* g, const float* other, float* dx, std::int64_t nx, std::int64_t nr,
                               const Walk& kept, const Walk& red, float sign, bool acc, cuda::stream_t stream,
                               unsigned block, unsigned max_blocks) {
  if (red.nd == 0) {  // not broadcast: elementwise
    const bool flat = kept.nd == 0 || (kept.nd == 1 && kept.s0[0] == 1 && kept.s2[0] == 1 && kept.s1[0] <= 1);
    const dim3 grid = elementwise_detail::flat_grid(nx, block, max_blocks);
    if (flat)
      cuda::launch(binary_grad_flat_kernel<float, Mul>, grid, dim3(block), 0, stream, g, other,
                   static_cast<std::int64_t>(kept.nd == 0 ? 0 : kept.s1[0]), dx, nx, sign, acc);
    else
      cuda::launch(binary_grad_strided_kernel<float, Mul>, grid, dim3(block), 0, stream, g, other, dx, nx, kept, sign,
                   acc);
    return;
  }
  const int last = red.nd - 1;
  if (red.s0[last] == 1 && red.size[last] >= 32) {  // broadcast along the contiguous dimension
    const std::int64_t runs = nr / red.size[last];
    if (nx <= 2048 && nr >= 4096)  // few long reductions: a block each
      cuda::launch(binary_grad_rows_kernel<float, Mul, true>,
                   dim3(static_cast<unsigned>(std::min<std::int64_t>(nx, max_blocks))), dim3(kReduceBlock), 0, stream,
                   g, other, dx, nx, runs, kept, red, sign, acc);
    else
      cuda::launch(binary_grad_rows_kernel<float, Mul, false>, grid_for(nx, kReduceBlock / 32, max_blocks),
                   dim3(kReduceBlock), 0, stream, g, other, dx, nx, runs, kept, red, sign, acc);
    return;
  }
  // Lanes over dx elements. Split the terms into P chunks when there are few dx elements for
  // the GPU (aiming at ~64K threads) and at least 64 terms a chunk.
  const std::int64_t want = (std::int64_t{1} << 16) / nx + 1;
  const std::int64_t P = std::clamp<std::int64_t>(std::min(want, nr / 64), 1, 32);
  if (P == 1) {
    cuda::launch(binary_grad_reduce_kernel<float, Mul>, elementwise_detail::flat_grid(nx, block, max_blocks),
                 dim3(block), 0, stream, g, other, dx, nx, nr, kept, red, sign, acc);
    return;
  }
  const std::int64_t chunk = (nr + P - 1) / P;
  cuda::launch(binary_grad_reduce_split_kernel<float, Mul>, grid_for(nx, 32, max_blocks),
               dim3(32, static_cast<unsigned>(P)), 0, stream, g, other, dx, nx, nr, chunk, kept, red, sign, acc);
}

}  // namespace pointwise_detail

// The gradient of one operand x of y = a op b (first: x is a, else b) from g = dL/dy [d.out]:
// dx[j] (+)= the sum over the elements i of y that read x[j] of g[i] * w(i), w = the other
// operand at i (Mul), 1 (Add; Sub for a) or -1 (Sub for b). dx has x's own elements (the product
// of d.out over the dimensions where x's stride is nonzero); `other` is read for Mul only (may be
// null otherwise). Deterministic, no atomics; `block` is the block of the elementwise and
// thread-per-element kernels, the others take (32, P) or 256 threads (see the file's header).
inline void binary_backward(BinaryOp op, bool first, const float* g, const float* other, float* dx,
                            const backend::BroadcastDesc& d, bool acc, cuda::stream_t stream = {}, unsigned block = 256,
                            unsigned max_blocks = 65535) {
  pointwise_detail::check_desc("binary_backward", d);
  pointwise_detail::check_launch("binary_backward", block, max_blocks);
  if (op != BinaryOp::Add && op != BinaryOp::Sub && op != BinaryOp::Mul)
    throw std::invalid_argument("binary_backward: unknown op");
  const bool mul = op == BinaryOp::Mul;
  const std::int64_t* sx = first ? d.sa : d.sb;
  const std::int64_t* so = first ? d.sb : d.sa;
  std::int64_t ostride[backend::kMaxDims];
  std::int64_t os = 1;
  for (int k = d.ndim; k-- > 0;) {
    ostride[k] = os;
    os *= d.out[k];
  }
  pointwise_detail::Walk kept, red;  // kept: g, other, dx strides; red: g, other strides
  std::int64_t nx = 1, nr = 1;
  for (int k = 0; k < d.ndim; ++k) {
    const std::int64_t o = mul ? so[k] : 0;  // Add / Sub never read the other operand
    if (sx[k] != 0) {
      nx *= d.out[k];
      pointwise_detail::push_dim(kept, d.out[k], ostride[k], o, sx[k]);
    } else {
      nr *= d.out[k];
      pointwise_detail::push_dim(red, d.out[k], ostride[k], o, 0);
    }
  }
  if (nx == 0) return;
  elementwise_detail::check_ptr("binary_backward", dx, "dx");
  if (nr == 0) {  // y is empty: a sum of nothing
    if (!acc) fill(dx, nx, 0.0f, stream, block, max_blocks);
    return;
  }
  elementwise_detail::check_ptr("binary_backward", g, "g");
  if (mul) elementwise_detail::check_ptr("binary_backward", other, "other");
  const float sign = (op == BinaryOp::Sub && !first) ? -1.0f : 1.0f;
  if (mul)
    pointwise_detail::binary_grad_launch<true>(g, other, dx, nx, nr, kept, red, sign, acc, stream, block, max_blocks);
  else
    pointwise_detail::binary_grad_launch<false>(g, other, dx, nx, nr, kept, red, sign, acc, stream, block, max_blocks);
}

// ---------------------------------------------------------------- sum

// Per-block sums in double (the CPU's diffuse::sum accumulates in double: the float result does
// not depend on the order for any practical n), written as Out: a double partial or the result.
template <class T, class Out>
__global__ void sum_partial_kernel(const T* __restrict__ x, std::int64_t n, Out* __restrict__ out) {
  DIFFUSE_SHARED(double, warp_sums, 32);
  const std::int64_t stride = pointwise_detail::grid_stride();
  double acc = 0.0;
  for (std::int64_t i = pointwise_detail::first_index(); i < n; i += stride) acc += static_cast<double>(x[i]);
  acc = pointwise_detail::block_sum(acc, warp_sums);
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<Out>(acc);
}

// One block: the partials added in a fixed tree, rounded to float once.
template <class T>
__global__ void sum_finish_kernel(const double* __restrict__ partial, std::int64_t parts, T* __restrict__ out) {
  DIFFUSE_SHARED(double, warp_sums, 32);
  double acc = 0.0;
  for (std::int64_t j = threadIdx.x; j < parts; j += blockDim.x) acc += partial[j];
  acc = pointwise_detail::block_sum(acc, warp_sums);
  if (threadIdx.x == 0) *out = static_cast<T>(acc);
}

namespace pointwise_detail {
inline void check_sum(std::int64_t n, unsigned block, unsigned max_blocks) {
  elementwise_detail::check_flat("sum", n, block, max_blocks);
  if (block % 32 != 0) throw std::invalid_argument("sum: block must be a multiple of 32");
}
}  // namespace pointwise_detail

// Bytes of sum's workspace for the same n, block and max_blocks: one double per block, 0 when
// one block does it all (the workspace may then be null).
inline std::size_t sum_workspace_bytes(std::int64_t n, unsigned block = 256, unsigned max_blocks = 1024) {
  pointwise_detail::check_sum(n, block, max_blocks);
  const unsigned blocks = elementwise_detail::flat_grid(n, block, max_blocks).x;
  return blocks > 1 ? static_cast<std::size_t>(blocks) * sizeof(double) : 0;
}

// *out (one device float) = the sum of x[0..n), n >= 0 (0 for none): per-block double partial
// sums into the workspace, then one block adds them in order (reproducible; the result depends
// on block and max_blocks only through the order of double additions).
inline void sum(const float* x, std::int64_t n, float* out, void* workspace, cuda::stream_t stream = {},
                unsigned block = 256, unsigned max_blocks = 1024) {
  pointwise_detail::check_sum(n, block, max_blocks);
  elementwise_detail::check_ptr("sum", out, "out");
  if (n == 0) {
    fill(out, 1, 0.0f, stream);
    return;
  }
  elementwise_detail::check_ptr("sum", x, "x");
  const dim3 grid = elementwise_detail::flat_grid(n, block, max_blocks);
  if (grid.x == 1) {
    cuda::launch(sum_partial_kernel<float, float>, grid, dim3(block), 0, stream, x, n, out);
    return;
  }
  elementwise_detail::check_ptr("sum", workspace, "workspace (sum_workspace_bytes > 0)");
  double* part = static_cast<double*>(workspace);
  cuda::launch(sum_partial_kernel<float, double>, grid, dim3(block), 0, stream, x, n, part);
  cuda::launch(sum_finish_kernel<float>, dim3(1), dim3(block), 0, stream, static_cast<const double*>(part),
               static_cast<std::int64_t>(grid.x), out);
}

}  // namespace diffuse::kernels
