// Fused ("flash") multi-head attention on the device: the same function as diffuse::attention
// (include/diffuse/ops/attention.hpp) and diffuse::cuda::attention_forward/_backward
// (include/diffuse/backend/cuda/attention.hpp), without the [L, L] probability matrix: the
// forward keeps one log-sum-exp per query row, the backward recomputes the probabilities from it.
//
//   flash_attention_forward(q, k, v, out, lse, N, L, C, heads)
//       out = softmax(Q K^T d^-0.5) V per (image, head); lse [N, heads, L] = m + log(l), the
//       row's log-sum-exp of the scaled scores
//   flash_attention_backward(q, k, v, out, lse, g, dq, dk, dv, delta, N, L, C, heads, acc)
//       from g = d(loss)/d(out): delta [N, heads, L] = rowsum(g * out) (caller's workspace), then
//       P_ij = exp(s_ij - lse_i), dV = P^T G, dP = G V^T, dS = P (dP - delta), dQ = scale dS K,
//       dK = scale dS^T Q
//
// Layout as the full-matrix path: q, k, v, out, g, dq, dk, dv are [N, L, C] row-major; head h
// of image n is columns [h*d, (h+1)*d) of each token row (d = C / heads <= 256, the DDPM U-Net's
// one head of 256 channels at 16x16 included). q, k, v (and dq, dk, dv) may instead be rows of a
// wider tensor, ldx >= C elements apart: q, k and v packed in one [N, L, 3C] tensor as one
// 1x1 convolution of 3C outputs writes them (ldx = 3C, k = q + C, v = q + 2C).
//
// Work: a block of 128 threads takes 16 rows (queries in the forward and in dQ, keys in dK/dV)
// of one (image, head), 8 threads per row, thread t of a row holding channels t, t+8, ... in
// registers; the other side streams through shared memory in tiles of 16 rows. A score is the
// 8 threads' partial dot products summed by three xor-shuffles (every thread of the row gets
// the same bits). The forward's online softmax rescales its accumulators once per key tile.
// dK/dV and dQ are separate kernels that each own their outputs: no atomics, so results are
// deterministic. Accumulation in float; exp via expf, log via logf.
//
// The kernels are templates on the element type T of q, k, v, out, g and the gradients (float,
// or bf16 under MathMode::BF16: loaded widened exactly, stored rounded once) with float
// arithmetic, lse and delta, so a bf16 launch computes what the float launch computes on the
// widened values. CUDA-core FP32 (no tensor cores): the reference and fallback for a
// tensor-core or cuDNN fused attention. ptxas for sm_90 (nvcc 13): 188 (forward), 242 (dK/dV) and 211 (dQ)
// registers a thread, no spills, 32 KB of shared memory a block: 2 blocks (8 warps) an SM.
// Compiled by nvcc; tested through the emulation against the CPU op; never run on a GPU yet.
#pragma once

#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

// nvcc unrolls the fixed-length channel loops, so the per-thread arrays stay in registers; the
// host compiler (the emulation) does not know the pragma.
#ifdef __CUDACC__
#define DIFFUSE_FLASH_UNROLL _Pragma("unroll")
#else
#define DIFFUSE_FLASH_UNROLL
#endif

namespace diffuse::kernels {

inline constexpr int kFlashRows = 16;         // rows per block, and rows per streamed tile
inline constexpr int kFlashThreadsPerRow = 8;  // threads sharing a row's channels
inline constexpr int kFlashMaxHeadDim = 256;
inline constexpr int kFlashChannelsPerThread = kFlashMaxHeadDim / kFlashThreadsPerRow;  // 32
inline constexpr int kFlashThreads = kFlashRows * kFlashThreadsPerRow;                  // 128

// Sum over the 8 threads of a row (consecutive lanes 8r .. 8r+7 of a warp).
__device__ __forceinline__ float flash_row_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v;
}

namespace detail {

struct FlashShape {
  std::int64_t N, L, C, heads, d;
  float scale;
};

// Where (image n, head h) = blockIdx.y, row `row` of it starts in a [N, L, C] tensor.
__device__ __forceinline__ std::int64_t flash_at(std::int64_t nh, std::int64_t heads, std::int64_t L, std::int64_t C,
                                                 std::int64_t d, std::int64_t row) {
  const std::int64_t n = nh / heads, h = nh % heads;
  return (n * L + row) * C + h * d;
}

// Loads rows [r0, r0 + 16) of (n, h) of `src` into tile [16][d] (rows past L as zeros).
template <class T>
__device__ __forceinline__ void flash_load_tile(const T* __restrict__ src, float* tile, std::int64_t nh,
                                                std::int64_t heads, std::int64_t L, std::int64_t C, std::int64_t d,
                                                std::int64_t r0) {
  for (std::int64_t e = threadIdx.x; e < kFlashRows * d; e += blockDim.x) {
    const std::int64_t r = e / d, c = e % d;
    tile[e] = r0 + r < L ? static_cast<float>(src[flash_at(nh, heads, L, C, d, r0 + r) + c]) : 0.0f;
  }
}

// This thread's channels (t, t+8, ...) of one row into registers; zeros past d or for a dead row.
template <class T>
__device__ __forceinline__ void flash_load_row(const T* __restrict__ src, std::int64_t base, bool live, int t,
                                               std::int64_t d, float (&r)[kFlashChannelsPerThread]) {
  DIFFUSE_FLASH_UNROLL
  for (int i = 0; i < kFlashChannelsPerThread; ++i) {
    const std::int64_t c = t + i * kFlashThreadsPerRow;
    r[i] = live && c < d ? static_cast<float>(src[base + c]) : 0.0f;
  }
}

// This thread's part of the dot product of its registers with a row of a shared tile (sum it
// over the row's threads with flash_row_sum).
__device__ __forceinline__ float flash_partial_dot(const float (&r)[kFlashChannelsPerThread], const float* row, int t,
                                                   std::int64_t d) {
  float p = 0.0f;
  DIFFUSE_FLASH_UNROLL
  for (int i = 0; i < kFlashChannelsPerThread; ++i) {
    const std::int64_t c = t + i * kFlashThreadsPerRow;
    if (c < d) p = fmaf(r[i], row[c], p);
  }
  return p;
}

}  // namespace detail

// ---------------------------------------------------------------- forward

// grid (ceil(L / 16), N * heads), 128 threads.
template <class T>
__global__ void flash_attention_forward_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                               const T* __restrict__ v, T* __restrict__ out,
                                               float* __restrict__ lse, float* __restrict__ out32, std::int64_t L,
                                               std::int64_t ldx, std::int64_t C, std::int64_t heads, std::int64_t d,
                                               float scale) {
  DIFFUSE_SHARED(float, ks, kFlashRows * kFlashMaxHeadDim);
  DIFFUSE_SHARED(float, vs, kFlashRows * kFlashMaxHeadDim);
  const std::int64_t nh = blockIdx.y;
  const int r = static_cast<int>(threadIdx.x) / kFlashThreadsPerRow, t = static_cast<int>(threadIdx.x) % kFlashThreadsPerRow;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kFlashRows + r;
  const bool live = row < L;
  float qr[kFlashChannelsPerThread], acc[kFlashChannelsPerThread];
  const std::int64_t base = live ? detail::flash_at(nh, heads, L, ldx, d, row) : 0;
  detail::flash_load_row(q, base, live, t, d, qr);
DIFFUSE_FLASH_UNROLL
  for (int i = 0; i < kFlashChannelsPerThread; ++i) acc[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (std::int64_t j0 = 0; j0 < L; j0 += kFlashRows) {
    __syncthreads();  // the previous tile is no longer read
    detail::flash_load_tile(k, ks, nh, heads, L, ldx, d, j0);
    detail::flash_load_tile(v, vs, nh, heads, L, ldx, d, j0);
    __syncthreads();
    const int nj = static_cast<int>(L - j0 < kFlashRows ? L - j0 : kFlashRows);
    float s[kFlashRows];
    float tile_max = -INFINITY;
DIFFUSE_FLASH_UNROLL
    for (int j = 0; j < kFlashRows; ++j) {
      s[j] = flash_row_sum(detail::flash_partial_dot(qr, ks + j * d, t, d)) * scale;
      if (j < nj) tile_max = fmaxf(tile_max, s[j]);
    }
    const float m_new = fmaxf(m, tile_max);
    const float alpha = expf(m - m_new);  // 0 on the first tile (m = -inf)
    l *= alpha;
DIFFUSE_FLASH_UNROLL
    for (int i = 0; i < kFlashChannelsPerThread; ++i) acc[i] *= alpha;
DIFFUSE_FLASH_UNROLL
    for (int j = 0; j < kFlashRows; ++j) {
      if (j >= nj) continue;
      const float p = expf(s[j] - m_new);
      l += p;
DIFFUSE_FLASH_UNROLL
      for (int i = 0; i < kFlashChannelsPerThread; ++i) {
        const std::int64_t c = t + i * kFlashThreadsPerRow;
        if (c < d) acc[i] = fmaf(p, vs[j * d + c], acc[i]);
      }
    }
    m = m_new;
  }
  if (!live) return;
  const float inv = 1.0f / l;
  const std::int64_t obase = detail::flash_at(nh, heads, L, C, d, row);
DIFFUSE_FLASH_UNROLL
  for (int i = 0; i < kFlashChannelsPerThread; ++i) {
    const std::int64_t c = t + i * kFlashThreadsPerRow;
    if (c >= d) continue;
    out[obase + c] = static_cast<T>(acc[i] * inv);
    if (out32) out32[obase + c] = acc[i] * inv;
  }
  if (t == 0) lse[nh * L + row] = m + logf(l);
}

// ---------------------------------------------------------------- backward

// delta[nh, i] = sum_c g[i, c] out[i, c] over the head's channels; one thread per row.
template <class O, class T>
__global__ void flash_attention_delta_kernel(const O* __restrict__ out, const T* __restrict__ g,
                                             float* __restrict__ delta, std::int64_t rows, std::int64_t L,
                                             std::int64_t C, std::int64_t heads, std::int64_t d) {
  const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  for (std::int64_t e = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < rows; e += stride) {
    const std::int64_t nh = e / L, row = e % L;
    const std::int64_t base = detail::flash_at(nh, heads, L, C, d, row);
    float s = 0.0f;
    for (std::int64_t c = 0; c < d; ++c) s = fmaf(static_cast<float>(g[base + c]), static_cast<float>(out[base + c]), s);
    delta[e] = s;
  }
}

// dK, dV for 16 keys of one (image, head) a block, streaming the queries. grid (ceil(L / 16), N * heads).
template <class T>
__global__ void flash_attention_dkdv_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                            const T* __restrict__ v, const T* __restrict__ g,
                                            const float* __restrict__ lse, const float* __restrict__ delta,
                                            T* __restrict__ dk, T* __restrict__ dv, std::int64_t L,
                                            std::int64_t ldx, std::int64_t C, std::int64_t heads, std::int64_t d,
                                            float scale, bool add_dk, bool add_dv) {
  DIFFUSE_SHARED(float, qs, kFlashRows * kFlashMaxHeadDim);
  DIFFUSE_SHARED(float, gs, kFlashRows * kFlashMaxHeadDim);
  DIFFUSE_SHARED(float, lses, kFlashRows);
  DIFFUSE_SHARED(float, deltas, kFlashRows);
  const std::int64_t nh = blockIdx.y;
  const int r = static_cast<int>(threadIdx.x) / kFlashThreadsPerRow, t = static_cast<int>(threadIdx.x) % kFlashThreadsPerRow;
  const std::int64_t key = static_cast<std::int64_t>(blockIdx.x) * kFlashRows + r;
  const bool live = key < L;
  const std::int64_t base = live ? detail::flash_at(nh, heads, L, ldx, d, key) : 0;
  float kr[kFlashChannelsPerThread], vr[kFlashChannelsPerThread], dkr[kFlashChannelsPerThread],
      dvr[kFlashChannelsPerThread];
  detail::flash_load_row(k, base, live, t, d, kr);
  detail::flash_load_row(v, base, live, t, d, vr);
DIFFUSE_FLASH_UNROLL
  for (int i = 0; i < kFlashChannelsPerThread; ++i) dkr[i] = dvr[i] = 0.0f;
  for (std::int64_t i0 = 0; i0 < L; i0 += kFlashRows) {
    __syncthreads();
    detail::flash_load_tile(q, qs, nh, heads, L, ldx, d, i0);
    detail::flash_load_tile(g, gs, nh, heads, L, C, d, i0);
    if (threadIdx.x < kFlashRows) {
      const std::int64_t i = i0 + threadIdx.x;
      lses[threadIdx.x] = i < L ? lse[nh * L + i] : 0.0f;
      deltas[threadIdx.x] = i < L ? delta[nh * L + i] : 0.0f;
    }
    __syncthreads();
    const int ni = static_cast<int>(L - i0 < kFlashRows ? L - i0 : kFlashRows);
    for (int ii = 0; ii < ni; ++ii) {
      const float s = flash_row_sum(detail::flash_partial_dot(kr, qs + ii * d, t, d)) * scale;
      const float dp = flash_row_sum(detail::flash_partial_dot(vr, gs + ii * d, t, d));
      const float p = expf(s - lses[ii]);
      const float ds = p * (dp - deltas[ii]);
DIFFUSE_FLASH_UNROLL
      for (int i = 0; i < kFlashChannelsPerThread; ++i) {
        const std::int64_t c = t + i * kFlashThreadsPerRow;
        if (c < d) {
          dvr[i] = fmaf(p, gs[ii * d + c], dvr[i]);
          dkr[i] = fmaf(ds, qs[ii * d + c], dkr[i]);
        }
      }
    }
  }
  if (!live) return;
DIFFUSE_FLASH_UNROLL
  for (int i = 0; i < kFlashChannelsPerThread; ++i) {
    const std::int64_t c = t + i * kFlashThreadsPerRow;
    if (c >= d) continue;
    if (dk) dk[base + c] = static_cast<T>(add_dk ? static_cast<float>(dk[base + c]) + scale * dkr[i] : scale * dkr[i]);
    if (dv) dv[base + c] = static_cast<T>(add_dv ? static_cast<float>(dv[base + c]) + dvr[i] : dvr[i]);
  }
}

// dQ for 16 queries of one (image, head) a block, streaming the keys. grid (ceil(L / 16), N * heads).
template <class T>
__global__ void flash_attention_dq_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                          const T* __restrict__ v, const T* __restrict__ g,
                                          const float* __restrict__ lse, const float* __restrict__ delta,
                                          T* __restrict__ dq, std::int64_t L, std::int64_t ldx, std::int64_t C,
                                          std::int64_t heads, std::int64_t d, float scale, bool add_dq) {
  DIFFUSE_SHARED(float, ks, kFlashRows * kFlashMaxHeadDim);
  DIFFUSE_SHARED(float, vs, kFlashRows * kFlashMaxHeadDim);
  const std::int64_t nh = blockIdx.y;
  const int r = static_cast<int>(threadIdx.x) / kFlashThreadsPerRow, t = static_cast<int>(threadIdx.x) % kFlashThreadsPerRow;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kFlashRows + r;
  const bool live = row < L;
  const std::int64_t base = live ? detail::flash_at(nh, heads, L, ldx, d, row) : 0;
  const std::int64_t gbase = live ? detail::flash_at(nh, heads, L, C, d, row) : 0;
  const float lse_i = live ? lse[nh * L + row] : 0.0f, delta_i = live ? delta[nh * L + row] : 0.0f;
  float qr[kFlashChannelsPerThread], gr[kFlashChannelsPerThread], dqr[kFlashChannelsPerThread];
  detail::flash_load_row(q, base, live, t, d, qr);
  detail::flash_load_row(g, gbase, live, t, d, gr);
DIFFUSE_FLASH_UNROLL
  for (int i = 0; i < kFlashChannelsPerThread; ++i) dqr[i] = 0.0f;
  for (std::int64_t j0 = 0; j0 < L; j0 += kFlashRows) {
    __syncthreads();
    detail::flash_load_tile(k, ks, nh, heads, L, ldx, d, j0);
    detail::flash_load_tile(v, vs, nh, heads, L, ldx, d, j0);
    __syncthreads();
    const int nj = static_cast<int>(L - j0 < kFlashRows ? L - j0 : kFlashRows);
    for (int j = 0; j < nj; ++j) {
      const float s = flash_row_sum(detail::flash_partial_dot(qr, ks + j * d, t, d)) * scale;
      const float dp = flash_row_sum(detail::flash_partial_dot(gr, vs + j * d, t, d));
      const float ds = expf(s - lse_i) * (dp - delta_i);
DIFFUSE_FLASH_UNROLL
      for (int i = 0; i < kFlashChannelsPerThread; ++i) {
        const std::int64_t c = t + i * kFlashThreadsPerRow;
        if (c < d) dqr[i] = fmaf(ds, ks[j * d + c], dqr[i]);
      }
    }
  }
  if (!live) return;
DIFFUSE_FLASH_UNROLL
  for (int i = 0; i < kFlashChannelsPerThread; ++i) {
    const std::int64_t c = t + i * kFlashThreadsPerRow;
    if (c < d) dq[base + c] = static_cast<T>(add_dq ? static_cast<float>(dq[base + c]) + scale * dqr[i] : scale * dqr[i]);
  }
}

// ---------------------------------------------------------------- launchers

namespace detail {

inline FlashShape flash_shape(const char* who, std::int64_t N, std::int64_t L, std::int64_t C, std::int64_t heads) {
  const std::string w = std::string("diffuse::kernels::") + who + ": ";
  if (N < 0 || L < 0 || C < 0) throw std::invalid_argument(w + "negative size");
  if (heads < 1 || C % heads != 0)
    throw std::invalid_argument(w + "the channel count C = " + std::to_string(C) + " must be a multiple of heads = " +
                                std::to_string(heads) + " (heads >= 1)");
  const std::int64_t d = C / heads;
  if (d > kFlashMaxHeadDim)
    throw std::invalid_argument(w + "head dimension " + std::to_string(d) + " is more than " +
                                std::to_string(kFlashMaxHeadDim));
  if (N * heads > 65535) throw std::invalid_argument(w + "more than 65535 (image, head) pairs");
  // d^-0.5 rounded to float, as the CPU op's static_cast<T>(1.0 / sqrt(double(d))).
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d > 0 ? d : 1)));
  return {N, L, C, heads, d, scale};
}

inline dim3 flash_grid(const FlashShape& s) {
  return dim3(static_cast<unsigned>((s.L + kFlashRows - 1) / kFlashRows), static_cast<unsigned>(s.N * s.heads));
}

}  // namespace detail

// Floats of lse (and of the backward's delta workspace): N * heads * L.
inline std::int64_t flash_attention_rows(std::int64_t N, std::int64_t L, std::int64_t heads) { return N * heads * L; }

namespace detail {
// ldx: the row stride of q, k, v and their gradients; 0 means C (the [N, L, C] layout).
inline std::int64_t flash_ldx(const char* who, std::int64_t ldx, std::int64_t C) {
  if (ldx == 0) return C;
  if (ldx < C)
    throw std::invalid_argument(std::string("diffuse::kernels::") + who + ": the row stride " + std::to_string(ldx) +
                                " of q, k, v is less than C = " + std::to_string(C));
  return ldx;
}
}  // namespace detail

// T (from q; FlashSame<T>: the other pointers do not take part in deducing it, so a null one may be
// nullptr): float, or bf16 (float arithmetic, see the top of this file). ldx: see detail::flash_ldx.
template <class T>
using FlashSame = std::type_identity_t<T>;

// out32 (may be null): the output in float as well, before its rounding to T (for a bf16 launch's
// backward: see flash_attention_backward).
template <class T>
inline void flash_attention_forward(const T* q, const FlashSame<T>* k, const FlashSame<T>* v, FlashSame<T>* out,
                                    float* lse, std::int64_t N, std::int64_t L, std::int64_t C, std::int64_t heads,
                                    cuda::stream_t stream = {}, std::int64_t ldx = 0, float* out32 = nullptr) {
  const detail::FlashShape s = detail::flash_shape("flash_attention_forward", N, L, C, heads);
  const std::int64_t ld = detail::flash_ldx("flash_attention_forward", ldx, C);
  if (N == 0 || L == 0 || C == 0) return;
  if (!q || !k || !v || !out || !lse) throw std::invalid_argument("flash_attention_forward: null pointer");
  cuda::launch(flash_attention_forward_kernel<T>, detail::flash_grid(s), dim3(kFlashThreads), 0, stream, q, k, v, out,
               lse, out32, L, ld, C, heads, s.d, s.scale);
}

// dq, dk, dv: written, or added to where add_* is set; a null one is skipped. delta: the
// caller's workspace of flash_attention_rows floats. out and g are [N, L, C]; q, k, v, dq, dk
// and dv rows ldx apart (0: C). out: the forward's output in T, or its float out32 (O = float):
// delta = rowsum(g out) must equal sum_j P_ij dP_ij, which holds for out = P V in float but not
// for out rounded to bf16, whose rounding error would enter every dS_ij = P_ij (dP_ij - delta_i)
// of the row alike (rows of dS no longer summing to 0) and so q's and k's gradients coherently
// (PyTorch's bf16 flash attention uses its bf16 output there). A bf16 launch passes out32.
template <class T, class O>
inline void flash_attention_backward(const T* q, const FlashSame<T>* k, const FlashSame<T>* v, const O* out,
                                     const float* lse, const FlashSame<T>* g,
                                     FlashSame<T>* dq, FlashSame<T>* dk, FlashSame<T>* dv, float* delta,
                                     std::int64_t N, std::int64_t L, std::int64_t C, std::int64_t heads,
                                     cuda::stream_t stream = {},
                                     bool add_dq = false, bool add_dk = false, bool add_dv = false,
                                     std::int64_t ldx = 0) {
  const detail::FlashShape s = detail::flash_shape("flash_attention_backward", N, L, C, heads);
  const std::int64_t ld = detail::flash_ldx("flash_attention_backward", ldx, C);
  if (N == 0 || L == 0 || C == 0 || (!dq && !dk && !dv)) return;
  if (!q || !k || !v || !out || !lse || !g || !delta)
    throw std::invalid_argument("flash_attention_backward: null input or workspace");
  const std::int64_t rows = flash_attention_rows(N, L, heads);
  const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>((rows + 255) / 256, 65535));
  cuda::launch(flash_attention_delta_kernel<O, T>, dim3(blocks), dim3(256), 0, stream, out, g, delta, rows, L, C, heads,
               s.d);
  if (dk || dv)
    cuda::launch(flash_attention_dkdv_kernel<T>, detail::flash_grid(s), dim3(kFlashThreads), 0, stream, q, k, v, g, lse,
                 delta, dk, dv, L, ld, C, heads, s.d, s.scale, add_dk, add_dv);
  if (dq)
    cuda::launch(flash_attention_dq_kernel<T>, detail::flash_grid(s), dim3(kFlashThreads), 0, stream, q, k, v, g, lse,
                 delta, dq, L, ld, C, heads, s.d, s.scale, add_dq);
}

}  // namespace diffuse::kernels
