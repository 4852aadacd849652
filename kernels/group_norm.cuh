// GroupNorm on the device, optionally fused with SiLU: the CPU backend's diffuse::group_norm
// (include/diffuse/ops/group_norm.hpp), torch.nn.GroupNorm on NHWC x [N, HW, C], gamma and beta [C].
// Per (sample n, group g): mean and biased variance over HW * Cg values (Cg = C / G), then
//   y = (x - mean) * (rstd * gamma) + beta,  rstd = 1 / sqrt(var + eps),  and y * sigmoid(y) with silu,
// and, given a keep mask (bits, image.cuh's dropout_bits), dropout after it: the op
// group_norm_dropout, whose backward masks dy as it reads it (no pass of dropout's own).
// The backward, with dyv = dy (times SiLU'(y) when fused) and xhat = (x - mean) * rstd:
//   dbeta[c] += sum_{n,p} dyv,  dgamma[c] += sum_{n,p} dyv * xhat,
//   dx = rstd * (gamma * dyv - k1 - xhat * k2),  k1 = mean_g(gamma * dyv), k2 = mean_g(gamma * dyv * xhat).
//
// Parallelisation. One (n, g) holds HW * Cg values, too few for a block at N = 1 and too many
// for one block to be quick at large HW, so each sample's pixels are cut into chunks of L pixels,
// and a "task" is (n, chunk, channel tile): a block of bx channels x by pixel lanes whose warps
// walk consecutive channels (coalesced in NHWC; when bx == C a warp spans whole pixels, still
// contiguous). Per (n, chunk, channel) partials go to the workspace, small kernels per (n, g) and
// per channel combine them in a fixed order (deterministic: no atomics), and the elementwise
// kernels reuse the task grid so each thread keeps its channel's constants in registers.
//   forward:  partial (mean, M2) per chunk and channel (Welford per thread, then the exact
//             combination of means and M2s), combined per (n, g) by the same two-step formula
//             (sum of counts * means, then sum of M2 + count * (mean - mu)^2: no cancellation)
//             -> mean, rstd [N * G]; then y elementwise.
//   backward: partial sums of dyv and dyv * xhat per chunk and channel; per (n, g) k1, k2; per
//             channel dgamma, dbeta (a column sum over the N * chunks rows); then dx elementwise.
#pragma once

#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include "reduce_sum.cuh"  // warp_sum

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace diffuse::kernels {

inline constexpr unsigned kGroupNormTaskThreads = 256;   // bx * by, at most
inline constexpr unsigned kGroupNormGroupThreads = 128;  // per (n, g) combination block
inline constexpr unsigned kGroupNormColLanes = 16;       // row lanes of the per-channel column sum (x 32 channels)
inline constexpr std::int64_t kGroupNormTargetTasks = 2048;

// The work split, a pure function of the sizes (and of a forced chunk length), so that the
// workspace size, the forward and the backward agree.
struct GroupNormGrid {
  std::int64_t N = 0, HW = 0, C = 0, G = 0, Cg = 0;
  std::int64_t tiles = 0;    // channel tiles of bx channels
  std::int64_t bx = 1, by = 1;
  std::int64_t L = 1;        // pixels per chunk
  std::int64_t chunks = 0;   // chunks per sample
  __host__ __device__ std::int64_t tasks() const { return N * chunks * tiles; }
  __host__ __device__ std::int64_t partials() const { return N * chunks * C; }  // floats per partial array
};

// chunk_pixels = 0: automatic (see below);
// otherwise the chunk length in pixels (tests force small ones to get many partials).
inline GroupNormGrid group_norm_grid(std::int64_t N, std::int64_t HW, std::int64_t C, std::int64_t G,
                                     std::int64_t chunk_pixels = 0) {
  if (N < 0 || HW < 0 || C < 0) throw std::invalid_argument("group_norm: negative size");
  if (G <= 0 || C % G != 0)
    throw std::invalid_argument("group_norm: " + std::to_string(C) + " channels cannot be split into " +
                                std::to_string(G) + " groups (C % groups must be 0)");
  if (chunk_pixels < 0) throw std::invalid_argument("group_norm: chunk_pixels must be 0 (automatic) or positive");
  GroupNormGrid p;
  p.N = N, p.HW = HW, p.C = C, p.G = G, p.Cg = C / G;
  const std::int64_t cap = kGroupNormTaskThreads;
  p.tiles = C > 0 ? (C + cap - 1) / cap : 0;
  // One tile: bx = C exactly, so the block's threads cover whole pixels (contiguous memory).
  // Several: equal tiles rounded up to whole warps.
  p.bx = p.tiles <= 1 ? std::max<std::int64_t>(C, 1) : ((C + p.tiles - 1) / p.tiles + 31) / 32 * 32;
  p.by = std::max<std::int64_t>(1, cap / p.bx);
  if (chunk_pixels > 0) {
    p.L = chunk_pixels;
  } else {
    // About kGroupNormTargetTasks tasks, and at least 16 pixels per thread (short chunks cost
    // more in partials than they gain: measured on an H100) unless that leaves under 256 tasks
    // (N = 1), then 4. Whole rounds of the by pixel lanes.
    const std::int64_t rows = N * HW * std::max<std::int64_t>(p.tiles, 1);
    const std::int64_t want = (rows + kGroupNormTargetTasks - 1) / kGroupNormTargetTasks;
    const std::int64_t least = rows / (16 * p.by) >= 256 ? 16 * p.by : 4 * p.by;
    p.L = (std::max(want, least) + p.by - 1) / p.by * p.by;
    p.L = std::max<std::int64_t>(1, std::min(p.L, HW));
  }
  p.chunks = HW > 0 && C > 0 ? (HW + p.L - 1) / p.L : 0;
  return p;
}

// Scratch for both directions: two partial arrays [N, chunks, C] and two [N * G] (k1, k2).
inline std::size_t group_norm_workspace_bytes(std::int64_t N, std::int64_t HW, std::int64_t C, std::int64_t G,
                                              std::int64_t chunk_pixels = 0) {
  const GroupNormGrid p = group_norm_grid(N, HW, C, G, chunk_pixels);
  return sizeof(float) * static_cast<std::size_t>(2 * p.partials() + 2 * N * G);
}

namespace group_norm_detail {

// The task's place: sample n, pixels [p0, p1), channel c of this thread (valid when c < C).
struct Task {
  std::int64_t n, k, p0, p1, c;
  bool valid;
};
__device__ __forceinline__ Task task_of(const GroupNormGrid& pl, std::int64_t t) {
  Task r;
  const std::int64_t tile = t % pl.tiles, nk = t / pl.tiles;
  r.n = nk / pl.chunks;
  r.k = nk % pl.chunks;
  r.p0 = r.k * pl.L;
  r.p1 = r.p0 + pl.L < pl.HW ? r.p0 + pl.L : pl.HW;
  r.c = tile * pl.bx + threadIdx.x;
  r.valid = r.c < pl.C;
  return r;
}

// Pixels of [p0, p1) that pixel lane ty visits (p0 + ty, p0 + ty + by, ...).
__device__ __forceinline__ std::int64_t lane_count(std::int64_t len, std::int64_t ty, std::int64_t by) {
  return len > ty ? (len - ty + by - 1) / by : 0;
}

__device__ __forceinline__ float sigmoid(float y) { return 1.0f / (1.0f + expf(-y)); }

// Calls body(p, load(p)) for p = p0 + ty, p0 + ty + by, ... < p1, in order, issuing kBatch loads
// before using them: one 4-byte load in flight per thread is too little to cover the memory
// latency (on an H100 the U-Net-size forward went from 139 to 110 us, the backward from 248 to 176).
inline constexpr int kBatch = 4;
template <class Load, class Body>
__device__ __forceinline__ void for_pixels(std::int64_t p0, std::int64_t p1, std::int64_t ty, std::int64_t by,
                                           Load load, Body body) {
  for (std::int64_t p = p0 + ty; p < p1; p += kBatch * by) {
    decltype(load(p)) v[kBatch] = {};
    for (int u = 0; u < kBatch; ++u)
      if (p + u * by < p1) v[u] = load(p + u * by);
    for (int u = 0; u < kBatch; ++u)
      if (p + u * by < p1) body(p + u * by, v[u]);
  }
}

struct XDy {
  float x, dy;
};

// Dropout fused into the op (group_norm_dropout): element i kept when bit i of `keep` is set
// (bit i % 32 of word i / 32, dropout_bits in image.cuh), then scaled; no mask: v unchanged.
__device__ __forceinline__ float keep_or_zero(const std::uint32_t* keep, std::int64_t i, float v, float scale) {
  if (!keep) return v;
  return (keep[i >> 5] >> (i & 31)) & 1u ? v * scale : 0.0f;
}

// Sum over the block (blockDim.x a multiple of 32), the same value returned to every thread.
// sh: 33 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* sh) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? sh[lane] : 0.0f;
    v = warp_sum(v);
    if (lane == 0) sh[32] = v;
  }
  __syncthreads();
  const float r = sh[32];
  __syncthreads();  // everyone has read sh[32] before a later call writes sh
  return r;
}

}  // namespace group_norm_detail

// Forward stage 1: per task, each thread runs Welford over its channel's pixels; the by lanes of
// a channel are combined exactly (mean = sum(cnt * mean) / L, M2 = sum(M2 + cnt (mean - mu)^2)).
template <class T>
__global__ void group_norm_stats_kernel(const T* __restrict__ x, float* __restrict__ part_mean,
                                        float* __restrict__ part_m2, GroupNormGrid pl) {
  DIFFUSE_SHARED(float, s_mean, kGroupNormTaskThreads);
  DIFFUSE_SHARED(float, s_m2, kGroupNormTaskThreads);
  const std::int64_t ty = threadIdx.y, by = blockDim.y, slot = ty * blockDim.x + threadIdx.x;
  for (std::int64_t t = blockIdx.x; t < pl.tasks(); t += gridDim.x) {
    const group_norm_detail::Task tk = group_norm_detail::task_of(pl, t);
    float mean = 0.0f, m2 = 0.0f, cnt = 0.0f;
    if (tk.valid) {
      const T* xp = x + tk.n * pl.HW * pl.C + tk.c;
      group_norm_detail::for_pixels(
          tk.p0, tk.p1, ty, by, [&](std::int64_t p) { return static_cast<float>(xp[p * pl.C]); },
          [&](std::int64_t, float v) {
            cnt += 1.0f;
            const float d = v - mean;
            mean += d / cnt;
            m2 += d * (v - mean);
          });
    }
    s_mean[slot] = mean;
    s_m2[slot] = m2;
    __syncthreads();
    if (ty == 0 && tk.valid) {
      const std::int64_t len = tk.p1 - tk.p0;
      float s = 0.0f;
      for (std::int64_t j = 0; j < by; ++j)
        s += static_cast<float>(group_norm_detail::lane_count(len, j, by)) * s_mean[j * blockDim.x + threadIdx.x];
      const float mu = s / static_cast<float>(len);
      float q = 0.0f;
      for (std::int64_t j = 0; j < by; ++j) {
        const float d = s_mean[j * blockDim.x + threadIdx.x] - mu;
        q += s_m2[j * blockDim.x + threadIdx.x] + static_cast<float>(group_norm_detail::lane_count(len, j, by)) * d * d;
      }
      const std::int64_t o = (tk.n * pl.chunks + tk.k) * pl.C + tk.c;
      part_mean[o] = mu;
      part_m2[o] = q;
    }
    __syncthreads();  // the shared slots are read before the next task writes them
  }
}

// Forward stage 2: one block per (n, g) combines the chunks x Cg partials: mu = sum(cnt * mean)
// / M, then var = sum(M2 + cnt (mean - mu)^2) / M (all terms >= 0). With no values (HW = 0):
// mean 0, var 0, as the CPU backend.
// (F: the partials' type, float; a template so the header defines no non-inline kernel.)
template <class F>
__global__ void group_norm_combine_kernel(const F* __restrict__ part_mean, const F* __restrict__ part_m2,
                                          F* __restrict__ mean, F* __restrict__ rstd, GroupNormGrid pl, float eps) {
  DIFFUSE_SHARED(float, sh, 33);
  const std::int64_t J = pl.chunks * pl.Cg;
  const float M = static_cast<float>(pl.HW * pl.Cg);
  for (std::int64_t t = blockIdx.x; t < pl.N * pl.G; t += gridDim.x) {
    const std::int64_t n = t / pl.G, g = t % pl.G;
    const std::int64_t base = n * pl.chunks * pl.C + g * pl.Cg;
    auto at = [&](std::int64_t j) { return base + (j / pl.Cg) * pl.C + j % pl.Cg; };
    auto count = [&](std::int64_t j) {
      const std::int64_t p0 = (j / pl.Cg) * pl.L;
      return static_cast<float>(pl.HW - p0 < pl.L ? pl.HW - p0 : pl.L);
    };
    float s = 0.0f;
    for (std::int64_t j = threadIdx.x; j < J; j += blockDim.x) s += count(j) * part_mean[at(j)];
    s = group_norm_detail::block_sum(s, sh);
    const float mu = J > 0 ? s / M : 0.0f;
    float q = 0.0f;
    for (std::int64_t j = threadIdx.x; j < J; j += blockDim.x) {
      const float d = part_mean[at(j)] - mu;
      q += part_m2[at(j)] + count(j) * d * d;
    }
    q = group_norm_detail::block_sum(q, sh);
    if (threadIdx.x == 0) {
      mean[t] = mu;
      rstd[t] = 1.0f / sqrtf((J > 0 ? q / M : 0.0f) + eps);
    }
  }
}

// Forward stage 3: y = (x - mean) * (rstd * gamma) + beta (then SiLU), elementwise on the task grid;
// y's type Y may differ from x's (bf16 for a convolution that reads bf16: group_norm_conv2d), and
// x's from the parameters' P (a bf16 activation normalised with float gamma, beta: res_block).
template <class T, class P, class Y, bool kSilu>
__global__ void group_norm_apply_kernel(const T* __restrict__ x, const P* __restrict__ gamma, const P* __restrict__ beta,
                                        const float* __restrict__ mean, const float* __restrict__ rstd,
                                        Y* __restrict__ y, GroupNormGrid pl, const std::uint32_t* __restrict__ keep,
                                        float keep_scale) {
  for (std::int64_t t = blockIdx.x; t < pl.tasks(); t += gridDim.x) {
    const group_norm_detail::Task tk = group_norm_detail::task_of(pl, t);
    if (!tk.valid) continue;
    const std::int64_t ng = tk.n * pl.G + tk.c / pl.Cg;
    const float m = mean[ng], a = rstd[ng] * static_cast<float>(gamma[tk.c]), b = static_cast<float>(beta[tk.c]);
    const std::int64_t off = tk.n * pl.HW * pl.C + tk.c;
    group_norm_detail::for_pixels(
        tk.p0, tk.p1, threadIdx.y, blockDim.y, [&](std::int64_t p) { return static_cast<float>(x[off + p * pl.C]); },
        [&](std::int64_t p, float xv) {
          float v = (xv - m) * a + b;
          if constexpr (kSilu) v = v * group_norm_detail::sigmoid(v);
          y[off + p * pl.C] = static_cast<Y>(group_norm_detail::keep_or_zero(keep, off + p * pl.C, v, keep_scale));
        });
  }
}

namespace group_norm_detail {

// The gradient before the affine map at one element, and xhat. With SiLU, y is recomputed as
// the forward computes it, and SiLU'(y) = s + o (1 - s) with s = sigmoid(y), o = y s (the CPU
// backend's formula, from its stored s and output o).
template <bool kSilu>
__device__ __forceinline__ float dy_pre(float dy, float xv, float m, float a, float b) {
  if constexpr (kSilu) {
    const float yv = (xv - m) * a + b, s = sigmoid(yv), o = yv * s;
    return dy * (s + o * (1.0f - s));
  } else {
    return dy;
  }
}

}  // namespace group_norm_detail

// Backward stage 1: per task and channel, sums of dyv and dyv * xhat over the chunk's pixels
// (per thread, then the by lanes in order) -> part1, part2 [N, chunks, C].
template <class T, class P, class D, bool kSilu>
__global__ void group_norm_grad_partials_kernel(const D* __restrict__ dy, const T* __restrict__ x,
                                                const P* __restrict__ gamma, const P* __restrict__ beta,
                                                const float* __restrict__ mean, const float* __restrict__ rstd,
                                                float* __restrict__ part1, float* __restrict__ part2, GroupNormGrid pl,
                                                const std::uint32_t* __restrict__ keep, float keep_scale) {
  DIFFUSE_SHARED(float, s1, kGroupNormTaskThreads);
  DIFFUSE_SHARED(float, s2, kGroupNormTaskThreads);
  const std::int64_t ty = threadIdx.y, by = blockDim.y, slot = ty * blockDim.x + threadIdx.x;
  for (std::int64_t t = blockIdx.x; t < pl.tasks(); t += gridDim.x) {
    const group_norm_detail::Task tk = group_norm_detail::task_of(pl, t);
    float a1 = 0.0f, a2 = 0.0f;
    if (tk.valid) {
      const std::int64_t ng = tk.n * pl.G + tk.c / pl.Cg;
      const float m = mean[ng], r = rstd[ng];
      const float a = kSilu ? r * static_cast<float>(gamma[tk.c]) : 0.0f, b = kSilu ? static_cast<float>(beta[tk.c]) : 0.0f;
      const std::int64_t off = tk.n * pl.HW * pl.C + tk.c;
      group_norm_detail::for_pixels(
          tk.p0, tk.p1, ty, by,
          [&](std::int64_t p) {
            const std::int64_t i = off + p * pl.C;
            return group_norm_detail::XDy{static_cast<float>(x[i]),
                                          group_norm_detail::keep_or_zero(keep, i, static_cast<float>(dy[i]), keep_scale)};
          },
          [&](std::int64_t, group_norm_detail::XDy v) {
            const float d = group_norm_detail::dy_pre<kSilu>(v.dy, v.x, m, a, b);
            a1 += d;
            a2 += d * ((v.x - m) * r);
          });
    }
    s1[slot] = a1;
    s2[slot] = a2;
    __syncthreads();
    if (ty == 0 && tk.valid) {
      float q1 = 0.0f, q2 = 0.0f;
      for (std::int64_t j = 0; j < by; ++j) {
        q1 += s1[j * blockDim.x + threadIdx.x];
        q2 += s2[j * blockDim.x + threadIdx.x];
      }
      const std::int64_t o = (tk.n * pl.chunks + tk.k) * pl.C + tk.c;
      part1[o] = q1;
      part2[o] = q2;
    }
    __syncthreads();
  }
}

// Backward stage 2a: per (n, g), k1 = sum(gamma * part1) / M and k2 = sum(gamma * part2) / M.
template <class P>
__global__ void group_norm_grad_combine_kernel(const P* __restrict__ gamma, const float* __restrict__ part1,
                                               const float* __restrict__ part2, float* __restrict__ k1,
                                               float* __restrict__ k2, GroupNormGrid pl) {
  DIFFUSE_SHARED(float, sh, 33);
  const std::int64_t J = pl.chunks * pl.Cg;
  const float M = static_cast<float>(pl.HW * pl.Cg);
  for (std::int64_t t = blockIdx.x; t < pl.N * pl.G; t += gridDim.x) {
    const std::int64_t n = t / pl.G, g = t % pl.G;
    const std::int64_t base = n * pl.chunks * pl.C + g * pl.Cg;
    float q1 = 0.0f, q2 = 0.0f;
    for (std::int64_t j = threadIdx.x; j < J; j += blockDim.x) {
      const std::int64_t cl = j % pl.Cg, o = base + (j / pl.Cg) * pl.C + cl;
      const float ga = static_cast<float>(gamma[g * pl.Cg + cl]);
      q1 += ga * part1[o];
      q2 += ga * part2[o];
    }
    q1 = group_norm_detail::block_sum(q1, sh);
    q2 = group_norm_detail::block_sum(q2, sh);
    if (threadIdx.x == 0) {
      k1[t] = J > 0 ? q1 / M : 0.0f;
      k2[t] = J > 0 ? q2 / M : 0.0f;
    }
  }
}

// Backward stage 2b: dbeta[c] += sum of part1[:, c], dgamma[c] += sum of part2[:, c] over the
// rows = N * chunks rows. Blocks of 32 channels x kGroupNormColLanes row lanes (warps read 32
// consecutive channels), lanes combined in order: deterministic.
template <class F>
__global__ void group_norm_grad_params_kernel(const F* __restrict__ part1, const F* __restrict__ part2,
                                              F* __restrict__ dgamma, F* __restrict__ dbeta, std::int64_t rows,
                                              std::int64_t C, bool acc_gamma, bool acc_beta) {
  DIFFUSE_SHARED(float, s1, 32 * kGroupNormColLanes);
  DIFFUSE_SHARED(float, s2, 32 * kGroupNormColLanes);
  const std::int64_t tiles = (C + 31) / 32, slot = threadIdx.y * 32 + threadIdx.x;
  for (std::int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const std::int64_t c = tile * 32 + threadIdx.x;
    float a1 = 0.0f, a2 = 0.0f;
    if (c < C)
      for (std::int64_t r = threadIdx.y; r < rows; r += blockDim.y) {
        a1 += part1[r * C + c];
        a2 += part2[r * C + c];
      }
    s1[slot] = a1;
    s2[slot] = a2;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
      float q1 = 0.0f, q2 = 0.0f;
      for (unsigned j = 0; j < blockDim.y; ++j) {
        q1 += s1[j * 32 + threadIdx.x];
        q2 += s2[j * 32 + threadIdx.x];
      }
      if (dbeta) dbeta[c] = acc_beta ? dbeta[c] + q1 : q1;
      if (dgamma) dgamma[c] = acc_gamma ? dgamma[c] + q2 : q2;
    }
    __syncthreads();
  }
}

// Backward stage 3: dx = rstd * (gamma * dyv - k1 - xhat * k2), written or accumulated (in float,
// then rounded once to DX).
template <class T, class P, class D, class DX, bool kSilu>
__global__ void group_norm_grad_input_kernel(const D* __restrict__ dy, const T* __restrict__ x,
                                             const P* __restrict__ gamma, const P* __restrict__ beta,
                                             const float* __restrict__ mean, const float* __restrict__ rstd,
                                             const float* __restrict__ k1, const float* __restrict__ k2,
                                             DX* __restrict__ dx, GroupNormGrid pl, bool accumulate,
                                             const std::uint32_t* __restrict__ keep, float keep_scale) {
  for (std::int64_t t = blockIdx.x; t < pl.tasks(); t += gridDim.x) {
    const group_norm_detail::Task tk = group_norm_detail::task_of(pl, t);
    if (!tk.valid) continue;
    const std::int64_t ng = tk.n * pl.G + tk.c / pl.Cg;
    const float m = mean[ng], r = rstd[ng], q1 = k1[ng], q2 = k2[ng], ga = static_cast<float>(gamma[tk.c]);
    const float a = kSilu ? r * ga : 0.0f, b = kSilu ? static_cast<float>(beta[tk.c]) : 0.0f;
    const std::int64_t off = tk.n * pl.HW * pl.C + tk.c;
    group_norm_detail::for_pixels(
        tk.p0, tk.p1, threadIdx.y, blockDim.y,
        [&](std::int64_t p) {
          const std::int64_t i = off + p * pl.C;
          return group_norm_detail::XDy{static_cast<float>(x[i]),
                                        group_norm_detail::keep_or_zero(keep, i, static_cast<float>(dy[i]), keep_scale)};
        },
        [&](std::int64_t p, group_norm_detail::XDy u) {
          const std::int64_t i = off + p * pl.C;
          const float d = group_norm_detail::dy_pre<kSilu>(u.dy, u.x, m, a, b);
          const float v = r * (ga * d - q1 - (u.x - m) * r * q2);
          dx[i] = static_cast<DX>(accumulate ? static_cast<float>(dx[i]) + v : v);
        });
  }
}

namespace group_norm_detail {

inline void check_max_blocks(const char* who, unsigned max_blocks) {
  if (max_blocks == 0) throw std::invalid_argument(std::string(who) + ": max_blocks must be at least 1");
}
inline dim3 grid_of(std::int64_t tasks, unsigned max_blocks) {
  return dim3(static_cast<unsigned>(std::min<std::int64_t>(tasks, max_blocks)));
}

}  // namespace group_norm_detail

// y = group_norm(x) (SiLU'd when silu), mean and rstd [N * G] saved for the backward. x, y [N, HW, C]
// (NHWC, y must not overlap x), gamma, beta [C], all device pointers; workspace of
// group_norm_workspace_bytes(N, HW, C, G, chunk_pixels) bytes. chunk_pixels: 0 automatic;
// max_blocks caps each grid (grid-stride loops cover the rest). y may be of another type than x
// (float x, bf16 y: each value computed in float, then rounded once), and x of another type than
// gamma and beta (bf16 x, float parameters: each value widened exactly, then as for float).
template <class T, class P, class Y>
inline void group_norm_forward(const T* x, const P* gamma, const P* beta, Y* y, float* mean, float* rstd,
                               std::int64_t N, std::int64_t HW, std::int64_t C, std::int64_t G, float eps, bool silu,
                               void* workspace, cuda::stream_t stream = {}, std::int64_t chunk_pixels = 0,
                               unsigned max_blocks = 65535, const std::uint32_t* keep = nullptr,
                               float keep_scale = 1.0f) {
  const GroupNormGrid pl = group_norm_grid(N, HW, C, G, chunk_pixels);
  group_norm_detail::check_max_blocks("group_norm_forward", max_blocks);
  if (!(eps > 0.0f)) throw std::invalid_argument("group_norm_forward: eps must be positive");
  if (N == 0) return;  // an empty grid is an invalid launch
  float* pm = static_cast<float*>(workspace);
  float* pq = pm + pl.partials();
  const dim3 block(static_cast<unsigned>(pl.bx), static_cast<unsigned>(pl.by));
  if (pl.tasks() > 0)
    cuda::launch(group_norm_stats_kernel<T>, group_norm_detail::grid_of(pl.tasks(), max_blocks), block, 0, stream, x,
                 pm, pq, pl);
  cuda::launch(group_norm_combine_kernel<float>, group_norm_detail::grid_of(N * G, max_blocks), dim3(kGroupNormGroupThreads),
               0, stream, pm, pq, mean, rstd, pl, eps);
  if (pl.tasks() == 0) return;
  if (silu)
    cuda::launch(group_norm_apply_kernel<T, P, Y, true>, group_norm_detail::grid_of(pl.tasks(), max_blocks), block, 0, stream,
                 x, gamma, beta, mean, rstd, y, pl, keep, keep_scale);
  else
    cuda::launch(group_norm_apply_kernel<T, P, Y, false>, group_norm_detail::grid_of(pl.tasks(), max_blocks), block, 0,
                 stream, x, gamma, beta, mean, rstd, y, pl, keep, keep_scale);
}

// The backward of group_norm_forward from dy [N, HW, C] and the forward's x, gamma, beta, mean and
// rstd (with silu, y and sigmoid(y) are recomputed from them). dx, dgamma, dbeta [C] (float) are
// each written, or added to when its acc flag says; a null one is skipped. dx must not overlap dy
// or x. dy may be of another type than x (bf16: the gradient a bf16 convolution gives its input,
// read as it is and widened exactly to float); x may be bf16 with float gamma, beta, and dx of
// either type (each dx computed in float and rounded once; accumulation adds in float, then rounds).
template <class T, class P, class D, class DX>
inline void group_norm_backward(const D* dy, const T* x, const P* gamma, const P* beta, const float* mean,
                                const float* rstd, DX* dx, bool acc_dx, float* dgamma, bool acc_gamma, float* dbeta,
                                bool acc_beta, std::int64_t N, std::int64_t HW, std::int64_t C, std::int64_t G,
                                bool silu, void* workspace, cuda::stream_t stream = {}, std::int64_t chunk_pixels = 0,
                                unsigned max_blocks = 65535, const std::uint32_t* keep = nullptr,
                                float keep_scale = 1.0f) {
  const GroupNormGrid pl = group_norm_grid(N, HW, C, G, chunk_pixels);
  group_norm_detail::check_max_blocks("group_norm_backward", max_blocks);
  if (pl.tasks() == 0) return;  // no values: no gradient to add or write
  float* p1 = static_cast<float*>(workspace);
  float* p2 = p1 + pl.partials();
  float* k1 = p2 + pl.partials();
  float* k2 = k1 + N * G;
  const dim3 block(static_cast<unsigned>(pl.bx), static_cast<unsigned>(pl.by));
  const dim3 grid = group_norm_detail::grid_of(pl.tasks(), max_blocks);
  if (silu)
    cuda::launch(group_norm_grad_partials_kernel<T, P, D, true>, grid, block, 0, stream, dy, x, gamma, beta, mean, rstd, p1,
                 p2, pl, keep, keep_scale);
  else
    cuda::launch(group_norm_grad_partials_kernel<T, P, D, false>, grid, block, 0, stream, dy, x, gamma, beta, mean, rstd, p1,
                 p2, pl, keep, keep_scale);
  cuda::launch(group_norm_grad_combine_kernel<P>, group_norm_detail::grid_of(N * G, max_blocks),
               dim3(kGroupNormGroupThreads), 0, stream, gamma, p1, p2, k1, k2, pl);
  if (dgamma || dbeta)
    cuda::launch(group_norm_grad_params_kernel<float>, group_norm_detail::grid_of((C + 31) / 32, max_blocks),
                 dim3(32, kGroupNormColLanes), 0, stream, static_cast<const float*>(p1), static_cast<const float*>(p2),
                 dgamma, dbeta, N * pl.chunks, C, acc_gamma, acc_beta);
  if (!dx) return;
  if (silu)
    cuda::launch(group_norm_grad_input_kernel<T, P, D, DX, true>, grid, block, 0, stream, dy, x, gamma, beta, mean, rstd, k1, k2,
                 dx, pl, acc_dx, keep, keep_scale);
  else
    cuda::launch(group_norm_grad_input_kernel<T, P, D, DX, false>, grid, block, 0, stream, dy, x, gamma, beta, mean, rstd, k1, k2,
                 dx, pl, acc_dx, keep, keep_scale);
}

// The same with dgamma and dbeta always accumulated (parameter gradients) and dx required.
template <class T, class P, class D>
inline void group_norm_backward(const D* dy, const T* x, const P* gamma, const P* beta, const float* mean,
                                const float* rstd, T* dx, float* dgamma, float* dbeta, std::int64_t N, std::int64_t HW,
                                std::int64_t C, std::int64_t G, bool silu, bool accumulate_dx, void* workspace,
                                cuda::stream_t stream = {}, std::int64_t chunk_pixels = 0,
                                unsigned max_blocks = 65535) {
  group_norm_backward(dy, x, gamma, beta, mean, rstd, dx, accumulate_dx, dgamma, true, dbeta, true, N, HW, C, G, silu,
                      workspace, stream, chunk_pixels, max_blocks);
}

}  // namespace diffuse::kernels
