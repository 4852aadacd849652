// Layer normalisation over the last dimension on the device: diffuse::layer_norm
// (include/diffuse/ops/layer_norm.hpp), torch.nn.functional.layer_norm(x, (C,), gamma, beta, eps)
// on `rows` rows of C floats.
//
//   layer_norm_forward    mean, rstd = 1 / sqrt(biased var + eps) per row [rows];
//                         y = (x - mean) * rstd * gamma + beta (no affine map when gamma, beta are null)
//   layer_norm_backward   with xhat = (x - mean) * rstd and dxhat = dy * gamma (dy without gamma):
//                         dx (+)= rstd (dxhat - mean_c(dxhat) - xhat mean_c(dxhat xhat)),
//                         dgamma[c] (+)= sum_r dy xhat,  dbeta[c] (+)= sum_r dy
//   layer_norm_backward_workspace_bytes   its scratch memory
//
// Parallelisation. A row belongs to one "group" of threads: a warp when C <= warp_max_cols
// (1024; several rows per block, no shared memory, no barriers), else a whole block (block-wide
// reductions through shared memory). Thread t of a group takes the columns t, t + width, ...
// and, when they fit (at most kLayerNormMaxPer per thread, the launcher picks a power of two),
// keeps them in registers, so the forward reads x once; longer rows are re-read (from L1/L2).
// Groups walk the rows with a stride of the number of groups (grid-stride loops).
//
// Accuracy. Statistics in float, as two passes over the row (mean, then the sum of squared
// deviations from it: no cancellation, unlike E[x^2] - mean^2), each a per-thread sum in column
// order then a fixed shuffle butterfly (and, for block rows, a second butterfly over the warps'
// sums): deterministic, and accurate to a few ulp (float mean and rstd are what the CPU op keeps
// too; it accumulates in double and rounds). The backward's per-row sums k1, k2 the same way.
// Float is enough: in the tests (C up to 5000, up to 100,000 rows, x in [-8, 8] + 5) y, dx,
// dgamma and dbeta are within 1e-6 of their largest value of exact (double) results; the CPU
// op's, with double sums, within 3e-7. A row's results depend on C and the threads per row
// only, not on the grid.
//
// dgamma, dbeta without atomics: each backward group also sums dy xhat and dy over its own rows
// for its columns (in registers, in row order) and writes one partial row [C] of each to the
// workspace; column_sums (elementwise.cuh) then adds the groups' partials in a fixed tree. The
// number of groups is a pure function of (rows, C, block, max_blocks, warp_max_cols), so the
// sums are reproducible run to run (they round differently if those change).
#pragma once

#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "elementwise.cuh"  // column_sums

// Fully unrolled register loops under nvcc (the arrays must stay in registers); nothing for g++.
#ifdef __CUDACC__
#define DIFFUSE_LAYER_NORM_UNROLL _Pragma("unroll")
#else
#define DIFFUSE_LAYER_NORM_UNROLL
#endif

namespace diffuse::kernels {

inline constexpr std::int64_t kLayerNormWarpMaxCols = 1024;  // rows up to this long: one warp each
inline constexpr int kLayerNormMaxPer = 32;                  // columns per thread held in registers
// Backward partials: each group takes at least this many rows; at most this many floats per
// partial array (8 MiB); at most this many groups (enough to fill an H100/H200).
inline constexpr std::int64_t kLayerNormMinRowsPerGroup = 4;
inline constexpr std::int64_t kLayerNormMaxPartials = std::int64_t{1} << 21;
inline constexpr std::int64_t kLayerNormMaxWarpGroups = 8192;
inline constexpr std::int64_t kLayerNormMaxBlockGroups = 1024;
// The most threads per block of the kernels that keep per columns per thread in registers (their
// __launch_bounds__: more registers per thread for more columns; a block whose threads need more
// registers than the SM has cannot launch at all). The launcher keeps to it.
constexpr unsigned layer_norm_max_threads(int per) { return per >= 16 ? 256 : per == 8 ? 512 : 1024; }
template <int per>
inline constexpr unsigned kLayerNormMaxThreads = layer_norm_max_threads(per);
inline constexpr unsigned kLayerNormCombineBlock = 256, kLayerNormCombineChunks = 1024;  // column_sums' settings

// The launch of either direction, a pure function of its arguments (so the workspace size and
// the backward agree).
struct LayerNormPlan {
  bool per_warp = true;     // a warp per row, else a block per row
  unsigned block = 128;     // threads per block
  unsigned width = 32;      // threads per row
  int per = 1;              // columns per thread kept in registers (power of two); 0: re-read the row
  std::int64_t groups = 0;  // row groups (warps or blocks); group g takes rows g, g + groups, ...
  unsigned grid = 0;        // blocks
};

// block: 0 automatic (128 for warp rows; for block rows the power of two in [128, 1024] that
// gives each thread at most 8 columns where it can), else a multiple of 32 up to 1024. Blocks
// larger than kLayerNormMaxThreads allows for the columns per thread: warp rows get fewer warps
// per block, block rows re-read the row (per = 0).
// partials: the backward with dgamma / dbeta (groups then also bounded by the workspace).
inline LayerNormPlan layer_norm_plan(const char* who, std::int64_t rows, std::int64_t C, unsigned block,
                                     unsigned max_blocks, std::int64_t warp_max_cols, bool partials) {
  if (rows < 0 || C < 0) throw std::invalid_argument(std::string(who) + ": negative size");
  if (C > 0 && rows > std::numeric_limits<std::int64_t>::max() / C)
    throw std::invalid_argument(std::string(who) + ": rows * C overflows");
  if (block != 0 && (block % 32 != 0 || block > 1024))
    throw std::invalid_argument(std::string(who) + ": block must be 0 (automatic) or a multiple of 32 in [32, 1024]," +
                                " got " + std::to_string(block));
  if (max_blocks == 0 || max_blocks > 0x7fffffffu)
    throw std::invalid_argument(std::string(who) + ": max_blocks must be in [1, 2^31)");
  LayerNormPlan p;
  p.per_warp = C <= warp_max_cols;
  if (block != 0) {
    p.block = block;
  } else if (p.per_warp) {
    p.block = 128;
  } else {
    p.block = 128;
    while (p.block < 1024 && static_cast<std::int64_t>(p.block) * 8 < C) p.block *= 2;
  }
  p.width = p.per_warp ? 32 : p.block;
  const std::int64_t need = (C + p.width - 1) / p.width;
  p.per = 1;
  while (p.per < need && p.per <= kLayerNormMaxPer) p.per *= 2;
  if (p.per > kLayerNormMaxPer) p.per = 0;
  if (p.block > layer_norm_max_threads(p.per)) {
    if (p.per_warp)
      p.block = layer_norm_max_threads(p.per);  // fewer rows per block: the same results
    else
      p.per = 0;  // the block is the row's width: keep it, re-read the row instead
  }
  const std::int64_t per_block = p.per_warp ? p.block / 32 : 1;
  const std::int64_t cap = static_cast<std::int64_t>(max_blocks) * per_block;
  if (rows == 0 || C == 0) {
    p.groups = 0;
  } else if (!partials) {
    p.groups = std::min(rows, cap);
  } else {
    const std::int64_t most = std::min({cap, std::max<std::int64_t>(1, kLayerNormMaxPartials / C),
                                        p.per_warp ? kLayerNormMaxWarpGroups : kLayerNormMaxBlockGroups});
    p.groups = std::clamp<std::int64_t>((rows + kLayerNormMinRowsPerGroup - 1) / kLayerNormMinRowsPerGroup, 1, most);
  }
  p.grid = static_cast<unsigned>((p.groups + per_block - 1) / per_block);
  return p;
}

namespace layer_norm_detail {

__device__ __forceinline__ float warp_allsum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The sum over the row's group, the same value in every thread (all lanes combine the same values
// in the same tree). Block rows: sh holds 32 floats; the trailing barrier frees it for reuse.
template <bool kWarp>
__device__ __forceinline__ float group_sum(float v, float* sh) {
  v = warp_allsum(v);
  if constexpr (!kWarp) {
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = warp_allsum(lane < warps ? sh[lane] : 0.0f);
    __syncthreads();
  }
  return v;
}

// Two sums at once (one pair of barriers); sh holds 64 floats.
template <bool kWarp>
__device__ __forceinline__ void group_sum2(float& a, float& b, float* sh) {
  a = warp_allsum(a);
  b = warp_allsum(b);
  if constexpr (!kWarp) {
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    if (lane == 0) {
      sh[warp] = a;
      sh[32 + warp] = b;
    }
    __syncthreads();
    a = warp_allsum(lane < warps ? sh[lane] : 0.0f);
    b = warp_allsum(lane < warps ? sh[32 + lane] : 0.0f);
    __syncthreads();
  }
}

// dxhat = dy gamma rounded to float in both backward passes, so that d - k1 is exactly 0 when a row's
// dxhat is constant (C = 1, say): contracting the recomputed product into an FMA (nvcc does by
// default, so does g++ -march=native) would leave its rounding error there, times a large rstd.
// The kernel keeps d in registers where it can (kPer <= 8), which does the same for g++.
__device__ __forceinline__ float mul_rn(float a, float b) {
#ifdef __CUDACC__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// How many of the columns t, t + w, ... < C are this thread's (at most per).
__device__ __forceinline__ int own_columns(std::int64_t t, std::int64_t w, std::int64_t C, int per) {
  const std::int64_t n = t < C ? (C - 1 - t) / w + 1 : 0;
  return static_cast<int>(n < per ? n : per);
}

// This thread's group, its place in it, the group width and the number of groups in the grid.
template <bool kWarp>
__device__ __forceinline__ std::int64_t group_id() {
  return kWarp ? static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32
               : static_cast<std::int64_t>(blockIdx.x);
}
template <bool kWarp>
__device__ __forceinline__ std::int64_t group_lane() {
  return kWarp ? threadIdx.x % 32 : threadIdx.x;
}
template <bool kWarp>
__device__ __forceinline__ std::int64_t group_width() {
  return kWarp ? 32 : blockDim.x;
}
template <bool kWarp>
__device__ __forceinline__ std::int64_t grid_groups() {
  return kWarp ? static_cast<std::int64_t>(gridDim.x) * (blockDim.x / 32) : static_cast<std::int64_t>(gridDim.x);
}

}  // namespace layer_norm_detail

// ---------------------------------------------------------------- forward

// kPer > 0: the row's values of this thread stay in v[] between the passes; 0: re-read.
template <class T, bool kWarp, int kPer>
__global__ void __launch_bounds__(kLayerNormMaxThreads<kPer>)
    layer_norm_forward_kernel(const T* x, const T* gamma, const T* beta, T* y, float* mean, float* rstd,
                              std::int64_t rows, std::int64_t C, float eps) {
  DIFFUSE_SHARED(float, sh, 32);
  const std::int64_t t = layer_norm_detail::group_lane<kWarp>(), w = layer_norm_detail::group_width<kWarp>();
  const std::int64_t stride = layer_norm_detail::grid_groups<kWarp>();
  const float fc = static_cast<float>(C);
  // Register path: 32-bit columns (C <= kPer * width) and this thread's count of them, so that
  // the unrolled loops keep no 64-bit offsets alive (block rows used twice the registers).
  const int ti = static_cast<int>(t), wi = static_cast<int>(w);
  const int nv = kPer > 0 ? layer_norm_detail::own_columns(t, w, C, kPer) : 0;
  for (std::int64_t row = layer_norm_detail::group_id<kWarp>(); row < rows; row += stride) {
    const T* xr = x + row * C;
    T* yr = y + row * C;
    float v[kPer > 0 ? kPer : 1];
    float s = 0.0f;
    if constexpr (kPer > 0) {
      DIFFUSE_LAYER_NORM_UNROLL
      for (int j = 0; j < kPer; ++j) v[j] = j < nv ? static_cast<float>(xr[ti + j * wi]) : 0.0f;
      DIFFUSE_LAYER_NORM_UNROLL
      for (int j = 0; j < kPer; ++j) s += v[j];  // the same order as the loop below (zeros come last)
    } else {
      for (std::int64_t c = t; c < C; c += w) s += static_cast<float>(xr[c]);
    }
    const float mu = layer_norm_detail::group_sum<kWarp>(s, sh) / fc;
    float q = 0.0f;
    if constexpr (kPer > 0) {
      DIFFUSE_LAYER_NORM_UNROLL
      for (int j = 0; j < kPer; ++j)
        if (j < nv) {
          const float d = v[j] - mu;
          q += d * d;
        }
    } else {
      for (std::int64_t c = t; c < C; c += w) {
        const float d = static_cast<float>(xr[c]) - mu;
        q += d * d;
      }
    }
    const float rs = 1.0f / sqrtf(layer_norm_detail::group_sum<kWarp>(q, sh) / fc + eps);
    if (t == 0) {
      if (mean) mean[row] = mu;
      if (rstd) rstd[row] = rs;
    }
    // The CPU's rounding: xhat = (x - mean) * rstd, then xhat * gamma + beta.
    auto put = [&](auto c, float xv) {
      const float xh = (xv - mu) * rs;
      yr[c] = static_cast<T>(gamma ? xh * static_cast<float>(gamma[c]) + static_cast<float>(beta[c]) : xh);
    };
    if constexpr (kPer > 0) {
      DIFFUSE_LAYER_NORM_UNROLL
      for (int j = 0; j < kPer; ++j)
        if (j < nv) put(ti + j * wi, v[j]);
    } else {
      for (std::int64_t c = t; c < C; c += w) put(c, static_cast<float>(xr[c]));  // read before the write: y may be x
    }
  }
}

// ---------------------------------------------------------------- backward

// Group g (< groups) takes rows g, g + groups, ...: per row, k1 = mean(dxhat), k2 = mean(dxhat
// xhat) (group sums), then dx; with partials (part_g non-null) it also sums dy xhat and dy over
// its rows per column and writes them to part_g, part_b [groups, C] row g. kPer <= 8: xhat, dy,
// dxhat (and gamma, across rows) of the thread's columns stay in registers between the passes;
// more: re-read (the partial sums already take 2 kPer registers); 0: the partials accumulate in
// the workspace row itself.
template <class T, bool kWarp, int kPer>
__global__ void __launch_bounds__(kLayerNormMaxThreads<kPer>)
    layer_norm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ gamma,
                               const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
                               bool acc_dx, float* __restrict__ part_g, float* __restrict__ part_b, std::int64_t rows,
                               std::int64_t C, std::int64_t groups) {
  DIFFUSE_SHARED(float, sh, 64);
  constexpr bool kCache = kPer > 0 && kPer <= 8;
  constexpr int kRegs = kPer > 0 ? kPer : 1;
  constexpr int kCached = kCache ? kPer : 1;
  const std::int64_t g = layer_norm_detail::group_id<kWarp>();
  if (g >= groups) return;  // the whole warp (or block): no barrier is left waiting
  const std::int64_t t = layer_norm_detail::group_lane<kWarp>(), w = layer_norm_detail::group_width<kWarp>();
  const bool partials = part_g != nullptr;
  const float fc = static_cast<float>(C);
  const int ti = static_cast<int>(t), wi = static_cast<int>(w);  // as in the forward
  const int nv = kPer > 0 ? layer_norm_detail::own_columns(t, w, C, kPer) : 0;
  float pg[kRegs], pb[kRegs], ga[kCached];
  DIFFUSE_LAYER_NORM_UNROLL
  for (int j = 0; j < kRegs; ++j) pg[j] = pb[j] = 0.0f;
  if constexpr (kCache) {
    DIFFUSE_LAYER_NORM_UNROLL
    for (int j = 0; j < kPer; ++j) ga[j] = j < nv && gamma ? static_cast<float>(gamma[ti + j * wi]) : 1.0f;
  }
  if constexpr (kPer == 0)
    if (partials)
      for (std::int64_t c = t; c < C; c += w) part_g[g * C + c] = part_b[g * C + c] = 0.0f;
  auto gam = [&](int j, auto c) -> float {
    if constexpr (kCache) return ga[j];
    else return gamma ? static_cast<float>(gamma[c]) : 1.0f;
  };
  for (std::int64_t row = g; row < rows; row += groups) {
    const float m = mean[row], r = rstd[row];
    const T* xr = x + row * C;
    const T* dyr = dy + row * C;
    float xs[kCached] = {}, ds[kCached] = {}, dd[kCached] = {};
    float a1 = 0.0f, a2 = 0.0f;
    auto sums = [&](int j, auto c) {
      const float xh = (static_cast<float>(xr[c]) - m) * r, dv = static_cast<float>(dyr[c]);
      const float d = layer_norm_detail::mul_rn(dv, gam(j, c));
      a1 += d;
      a2 += d * xh;
      if constexpr (kCache) {
        xs[j] = xh;
        ds[j] = dv;
        dd[j] = d;
      }
    };
    if constexpr (kPer > 0) {
      DIFFUSE_LAYER_NORM_UNROLL
      for (int j = 0; j < kPer; ++j)
        if (j < nv) sums(j, ti + j * wi);
    } else {
      for (std::int64_t c = t; c < C; c += w) sums(0, c);
    }
    layer_norm_detail::group_sum2<kWarp>(a1, a2, sh);
    const float k1 = a1 / fc, k2 = a2 / fc;
    auto grads = [&](int j, auto c) {
      float xh, dv, d;
      if constexpr (kCache) {
        xh = xs[j];
        dv = ds[j];
        d = dd[j];
      } else {
        xh = (static_cast<float>(xr[c]) - m) * r;
        dv = static_cast<float>(dyr[c]);
        d = layer_norm_detail::mul_rn(dv, gam(j, c));
      }
      if (dx) {
        const float v = r * (d - k1 - xh * k2);
        T* p = dx + row * C + c;
        *p = static_cast<T>(acc_dx ? static_cast<float>(*p) + v : v);
      }
      if (partials) {
        if constexpr (kPer > 0) {
          pg[j] += dv * xh;
          pb[j] += dv;
        } else {
          part_g[g * C + c] += dv * xh;
          part_b[g * C + c] += dv;
        }
      }
    };
    if constexpr (kPer > 0) {
      DIFFUSE_LAYER_NORM_UNROLL
      for (int j = 0; j < kPer; ++j)
        if (j < nv) grads(j, ti + j * wi);
    } else {
      for (std::int64_t c = t; c < C; c += w) grads(0, c);
    }
  }
  if constexpr (kPer > 0)
    if (partials) {
      DIFFUSE_LAYER_NORM_UNROLL
      for (int j = 0; j < kPer; ++j)
        if (j < nv) {
          part_g[g * C + ti + j * wi] = pg[j];
          part_b[g * C + ti + j * wi] = pb[j];
        }
    }
}

// ---------------------------------------------------------------- launchers

namespace layer_norm_detail {

// f(std::integral_constant<int, per>{}) for the plan's columns per thread.
template <class F>
inline void with_per(int per, F&& f) {
  switch (per) {
    case 0: return f(std::integral_constant<int, 0>{});
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    default: throw std::logic_error("layer_norm: no kernel for " + std::to_string(per) + " columns per thread");
  }
}
static_assert(kLayerNormMaxPer == 32, "with_per covers the powers of two up to kLayerNormMaxPer");

}  // namespace layer_norm_detail

// y = layer_norm(x) over the rows of C floats of x [rows, C] (device pointers; y may be x):
// y = (x - mean) * rstd * gamma + beta with rstd = 1 / sqrt(var + eps), var biased; gamma and
// beta [C] both given or both null (no affine map). mean, rstd [rows] are written (a null one is
// skipped). block: 0 automatic, else a multiple of 32 up to 1024; at most max_blocks blocks;
// rows of at most warp_max_cols values take a warp each (tests move it to run both kernels).
inline void layer_norm_forward(const float* x, const float* gamma, const float* beta, float* y, float* mean,
                               float* rstd, std::int64_t rows, std::int64_t C, float eps, cuda::stream_t stream = {},
                               unsigned block = 0, unsigned max_blocks = 65535,
                               std::int64_t warp_max_cols = kLayerNormWarpMaxCols) {
  constexpr const char* who = "layer_norm_forward";
  const LayerNormPlan p = layer_norm_plan(who, rows, C, block, max_blocks, warp_max_cols, false);
  if (!(eps > 0.0f)) throw std::invalid_argument(std::string(who) + ": eps must be positive");
  if ((gamma == nullptr) != (beta == nullptr))
    throw std::invalid_argument(std::string(who) + ": give both gamma and beta, or neither");
  if (p.groups == 0) return;  // an empty grid is an invalid launch
  elementwise_detail::check_ptr(who, x, "x");
  elementwise_detail::check_ptr(who, y, "y");
  layer_norm_detail::with_per(p.per, [&](auto k) {
    constexpr int K = decltype(k)::value;
    if (p.per_warp)
      cuda::launch(layer_norm_forward_kernel<float, true, K>, dim3(p.grid), dim3(p.block), 0, stream, x, gamma, beta, y,
                   mean, rstd, rows, C, eps);
    else
      cuda::launch(layer_norm_forward_kernel<float, false, K>, dim3(p.grid), dim3(p.block), 0, stream, x, gamma, beta,
                   y, mean, rstd, rows, C, eps);
  });
}

// Bytes of layer_norm_backward's workspace for the same rows, C, block, max_blocks and
// warp_max_cols: the groups' partial rows of dgamma and dbeta, and column_sums' own scratch.
inline std::size_t layer_norm_backward_workspace_bytes(std::int64_t rows, std::int64_t C, unsigned block = 0,
                                                       unsigned max_blocks = 65535,
                                                       std::int64_t warp_max_cols = kLayerNormWarpMaxCols) {
  const LayerNormPlan p = layer_norm_plan("layer_norm_backward", rows, C, block, max_blocks, warp_max_cols, true);
  if (p.groups == 0) return 0;
  return sizeof(float) * static_cast<std::size_t>(2 * p.groups * C) +
         elementwise_detail::column_sums_workspace_bytes(1, p.groups, C, kLayerNormCombineBlock,
                                                         kLayerNormCombineChunks);
}

// The backward of layer_norm_forward from dy [rows, C], the forward's x, gamma (null: no affine
// map) and its mean, rstd [rows]:
//   dx (+)= rstd (dxhat - mean_c(dxhat) - xhat mean_c(dxhat xhat)),  dxhat = dy gamma (or dy),
//   dgamma[c] (+)= sum_r dy xhat,  dbeta[c] (+)= sum_r dy,
// each written, or added when its acc flag is set, and skipped when its pointer is null. dx must
// not overlap dy or x. workspace: layer_norm_backward_workspace_bytes(rows, C, block, max_blocks,
// warp_max_cols) bytes (needed only for dgamma / dbeta). rows == 0 with acc false writes zero
// parameter gradients (sums over no rows). Same tuning parameters as layer_norm_forward.
inline void layer_norm_backward(const float* dy, const float* x, const float* gamma, const float* mean,
                                const float* rstd, float* dx, bool acc_dx, float* dgamma, bool acc_gamma, float* dbeta,
                                bool acc_beta, std::int64_t rows, std::int64_t C, void* workspace,
                                cuda::stream_t stream = {}, unsigned block = 0, unsigned max_blocks = 65535,
                                std::int64_t warp_max_cols = kLayerNormWarpMaxCols) {
  constexpr const char* who = "layer_norm_backward";
  const bool params = dgamma || dbeta;
  const LayerNormPlan p = layer_norm_plan(who, rows, C, block, max_blocks, warp_max_cols, params);
  if (C == 0 || (!dx && !params)) return;
  if (rows == 0) {  // no rows: the parameter sums are 0
    const float* none = nullptr;  // column sums over zero rows write zeros
    if (dgamma && !acc_gamma)
      elementwise_detail::column_sums(who, none, dgamma, 1, 0, C, false, nullptr, stream, kLayerNormCombineBlock,
                                      kLayerNormCombineChunks);
    if (dbeta && !acc_beta)
      elementwise_detail::column_sums(who, none, dbeta, 1, 0, C, false, nullptr, stream, kLayerNormCombineBlock,
                                      kLayerNormCombineChunks);
    return;
  }
  elementwise_detail::check_ptr(who, dy, "dy");
  elementwise_detail::check_ptr(who, x, "x");
  elementwise_detail::check_ptr(who, mean, "mean");
  elementwise_detail::check_ptr(who, rstd, "rstd");
  float* part_g = nullptr;
  float* part_b = nullptr;
  void* sums_ws = nullptr;
  if (params) {
    elementwise_detail::check_ptr(who, workspace, "workspace");
    part_g = static_cast<float*>(workspace);
    part_b = part_g + p.groups * C;
    sums_ws = part_b + p.groups * C;
  }
  layer_norm_detail::with_per(p.per, [&](auto k) {
    constexpr int K = decltype(k)::value;
    if (p.per_warp)
      cuda::launch(layer_norm_backward_kernel<float, true, K>, dim3(p.grid), dim3(p.block), 0, stream, dy, x, gamma,
                   mean, rstd, dx, acc_dx, part_g, part_b, rows, C, p.groups);
    else
      cuda::launch(layer_norm_backward_kernel<float, false, K>, dim3(p.grid), dim3(p.block), 0, stream, dy, x, gamma,
                   mean, rstd, dx, acc_dx, part_g, part_b, rows, C, p.groups);
  });
  // The same stream runs these in order, so both may use the one scratch area.
  if (dgamma)
    elementwise_detail::column_sums(who, static_cast<const float*>(part_g), dgamma, 1, p.groups, C, acc_gamma, sums_ws,
                                    stream, kLayerNormCombineBlock, kLayerNormCombineChunks);
  if (dbeta)
    elementwise_detail::column_sums(who, static_cast<const float*>(part_b), dbeta, 1, p.groups, C, acc_beta, sums_ws,
                                    stream, kLayerNormCombineBlock, kLayerNormCombineChunks);
}

}  // namespace diffuse::kernels

#undef DIFFUSE_LAYER_NORM_UNROLL
