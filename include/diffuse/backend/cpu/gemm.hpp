// Dense matrix products: C = alpha * op(A) * op(B) + beta * C on row-major
// storage with explicit leading dimensions.
//
// float on a CPU with AVX2 + FMA goes through a GEMM in the style of
// GotoBLAS/BLIS: op(B) is packed into KC x NR panels, op(A) into MR x KC panels
// (or read in place when n is small), and a 6x16 register-blocked micro-kernel
// (12 ymm accumulators) runs over them. That code is compiled for AVX2 + FMA
// by per-function target attributes, so it exists in every x86 build
// (-march=native or not), and is chosen at run time from the CPU's features
// (gemm_path(); DIFFUSE_GEMM=portable|avx2|auto overrides it). Everything else
// (double, a CPU without AVX2/FMA, other architectures) falls back to Eigen's GEMM.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <diffuse/backend/cpu/cpu_features.hpp>
#include <diffuse/backend/cpu/host_cache.hpp>
#include <diffuse/core/parallel.hpp>

// Included in every x86 build: GCC (since 4.9) and Clang declare all the
// intrinsics whatever the command line, usable in functions whose target
// attribute enables them.
#ifdef DIFFUSE_X86_TARGETS
#include <immintrin.h>
#endif

namespace diffuse::detail {

// C = beta * C for the degenerate products (k == 0 or alpha == 0). Plain
// loops: beta == 0 must not read C, which may hold NaN.
template <class T>
inline void gemm_scale_c(int64_t m, int64_t n, T beta, T* C, int64_t ldc) {
  if (beta == T(1)) return;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
}

// ---------------------------------------------------------------- Eigen fallback

// Note: single-threaded (diffuse does not build Eigen with OpenMP); the
// double products it serves are the gradient checks and the FID statistics.
template <class T>
inline void gemm_eigen(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* A,
                       int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Stride = Eigen::OuterStride<>;
  using CMap = Eigen::Map<const Mat, 0, Stride>;
  if (m <= 0 || n <= 0) return;
  if (k <= 0 || alpha == T(0)) return gemm_scale_c(m, n, beta, C, ldc);
  Eigen::Map<Mat, 0, Stride> c(C, m, n, Stride(ldc));
  const CMap a(A, trans_a ? k : m, trans_a ? m : k, Stride(lda));
  const CMap b(B, trans_b ? n : k, trans_b ? k : n, Stride(ldb));
  auto run = [&](const auto& opa, const auto& opb) {
    if (beta == T(0)) {
      c.noalias() = alpha * (opa * opb);
    } else {
      if (beta != T(1)) c *= beta;
      c.noalias() += alpha * (opa * opb);
    }
  };
  if (!trans_a && !trans_b) run(a, b);
  else if (!trans_a) run(a, b.transpose());
  else if (!trans_b) run(a.transpose(), b);
  else run(a.transpose(), b.transpose());
}

// ---------------------------------------------------------------- which implementation runs

// The float GEMM's implementations. portable: Eigen (double always goes
// there). avx2: the packed kernel below, compiled for AVX2 + FMA whatever
// the build's flags. The kernel only needs 256-bit registers; on an AVX-512
// CPU it runs as it is (a -march=native build compiles the same intrinsics
// into the same FMA sequence, so both give the same bits).
enum class GemmPath { portable, avx2 };

inline const char* gemm_path_name(GemmPath p) { return p == GemmPath::avx2 ? "avx2" : "portable"; }

// Whether this CPU (and this build: x86, GCC or Clang) can run path p.
inline bool gemm_path_supported(GemmPath p) {
  if (p == GemmPath::portable) return true;
#ifdef DIFFUSE_X86_TARGETS
  const CpuFeatures& f = cpu_features();
  return f.avx2 && f.fma;
#else
  return false;
#endif
}

inline GemmPath gemm_best_path() {
  return gemm_path_supported(GemmPath::avx2) ? GemmPath::avx2 : GemmPath::portable;
}

// The path a DIFFUSE_GEMM value asks for: null, "" or "auto" is the best one
// this CPU runs; "portable" or "avx2" is that path, which must run here.
inline GemmPath gemm_path_from_string(const char* value) {
  const std::string v = value ? value : "";
  if (v.empty() || v == "auto") return gemm_best_path();
  for (GemmPath p : {GemmPath::portable, GemmPath::avx2})
    if (v == gemm_path_name(p)) {
      if (!gemm_path_supported(p))
        throw std::runtime_error("gemm.hpp: DIFFUSE_GEMM=" + v + " but this CPU cannot run that path");
      return p;
    }
  throw std::runtime_error("gemm.hpp: DIFFUSE_GEMM=" + v + " is not one of auto, portable, avx2");
}

// Chosen once, at the first product, from DIFFUSE_GEMM and the CPU.
inline std::atomic<GemmPath>& gemm_path_slot() {
  static std::atomic<GemmPath> path{gemm_path_from_string(std::getenv("DIFFUSE_GEMM"))};
  return path;
}

inline GemmPath gemm_path() { return gemm_path_slot().load(std::memory_order_relaxed); }

// For tests and benchmarks: the products started after this call use p (a
// GemmB keeps the path it was packed for).
inline void set_gemm_path(GemmPath p) {
  if (!gemm_path_supported(p))
    throw std::runtime_error(std::string("gemm.hpp: set_gemm_path: this CPU cannot run the ") + gemm_path_name(p) +
                             " path");
  gemm_path_slot().store(p, std::memory_order_relaxed);
}

// ---------------------------------------------------------------- tiles and cache blocks

// Micro-tile MR x NR: 12 accumulators + 2 B vectors + 1 broadcast = 15 of the
// 16 ymm registers; 12 independent FMA chains cover 2 FMA pipes x 4 cycles latency.
inline constexpr int64_t kGemmMR = 6;
inline constexpr int64_t kGemmNR = 16;
// Cache blocks (Zen 3: 32 KiB L1d, 512 KiB L2 per core). A KC x NR panel of B
// (24 KiB) stays in L1 while the MC x KC block of A (144 KiB) streams from L2;
// the KC x NC block of B lives in L3. Measured on 1024^3: KC 384 beats 256
// (fewer passes over C) by ~5%; MC from 48 to 144 makes no visible difference.
inline constexpr int64_t kGemmKC = 384;
inline constexpr int64_t kGemmMC = 96;
inline constexpr int64_t kGemmNC = 3072;
// Above this many columns op(A) is packed; up to it the kernel reads A in
// place (measured: packing costs ~5% at n = 128 and gains ~5% at n = 1024).
inline constexpr int64_t kGemmPackAMinN = 512;

#ifdef DIFFUSE_X86_TARGETS

// ---------------------------------------------------------------- packed float GEMM (AVX2 + FMA)

// Every function below that touches a vector register carries
// [[gnu::target("avx2,fma")]]: each is compiled for that target in any build
// and is only called when gemm_path() is avx2. A helper that uses intrinsics
// needs the attribute too (else GCC: "inlining failed ...: target specific
// option mismatch"); a lambda cannot carry it portably, so there are none.

// A 64-byte aligned float buffer that only grows, from the HostCache: a
// packed operand made per call (GemmB) reuses the block the last call freed,
// and the per-slot buffers (gemm_buffer_a / gemm_buffer_b) stop growing.
struct GemmBuffer {
  float* p = nullptr;
  size_t cap = 0;
  GemmBuffer() = default;
  GemmBuffer(const GemmBuffer&) = delete;
  GemmBuffer& operator=(const GemmBuffer&) = delete;
  ~GemmBuffer() { HostCache::instance().deallocate(p, cap * sizeof(float)); }
  float* get(size_t n) {
    if (n > cap) {
      HostCache::instance().deallocate(p, cap * sizeof(float));
      p = nullptr;
      cap = 0;
      const size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
      p = static_cast<float*>(HostCache::instance().allocate(bytes));
      cap = bytes / sizeof(float);
    }
    return p;
  }
};

struct GemmBufferA;
struct GemmBufferB;
inline GemmBuffer& gemm_buffer_a() { return slot_local<GemmBuffer, GemmBufferA>(); }
inline GemmBuffer& gemm_buffer_b() { return slot_local<GemmBuffer, GemmBufferB>(); }

[[gnu::target("avx2,fma")]]
inline void gemm_transpose8(__m256& r0, __m256& r1, __m256& r2, __m256& r3, __m256& r4, __m256& r5, __m256& r6,
                            __m256& r7) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r0 = _mm256_permute2f128_ps(s0, s4, 0x20);
  r1 = _mm256_permute2f128_ps(s1, s5, 0x20);
  r2 = _mm256_permute2f128_ps(s2, s6, 0x20);
  r3 = _mm256_permute2f128_ps(s3, s7, 0x20);
  r4 = _mm256_permute2f128_ps(s0, s4, 0x31);
  r5 = _mm256_permute2f128_ps(s1, s5, 0x31);
  r6 = _mm256_permute2f128_ps(s2, s6, 0x31);
  r7 = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Pack op(B)[0:kc, 0:nc] (b points at element (0,0) of the block) into
// NR-column panels: dst[(j / NR) * kc * NR + p * NR + j % NR], zero-padded to
// a multiple of NR columns.
[[gnu::target("avx2,fma")]]
inline void gemm_pack_b(bool trans_b, int64_t kc, int64_t nc, const float* b, int64_t ldb, float* dst) {
  constexpr int64_t NR = kGemmNR;
  for (int64_t j0 = 0; j0 < nc; j0 += NR, dst += kc * NR) {
    const int64_t nr = std::min(NR, nc - j0);
    if (nr == NR && !trans_b) {
      const float* src = b + j0;
      for (int64_t p = 0; p < kc; ++p, src += ldb) {
        _mm256_store_ps(dst + p * NR, _mm256_loadu_ps(src));
        _mm256_store_ps(dst + p * NR + 8, _mm256_loadu_ps(src + 8));
      }
    } else if (nr == NR) {
      // op(B)[p][j] = b[j * ldb + p]: transpose 8x8 blocks of the stored rows.
      const float* src = b + j0 * ldb;
      int64_t p = 0;
      for (; p + 8 <= kc; p += 8) {
        for (int64_t h = 0; h < 2; ++h) {
          const float* s = src + h * 8 * ldb + p;
          __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + ldb), r2 = _mm256_loadu_ps(s + 2 * ldb),
                 r3 = _mm256_loadu_ps(s + 3 * ldb), r4 = _mm256_loadu_ps(s + 4 * ldb),
                 r5 = _mm256_loadu_ps(s + 5 * ldb), r6 = _mm256_loadu_ps(s + 6 * ldb),
                 r7 = _mm256_loadu_ps(s + 7 * ldb);
          gemm_transpose8(r0, r1, r2, r3, r4, r5, r6, r7);
          float* d = dst + p * NR + h * 8;
          _mm256_store_ps(d, r0);
          _mm256_store_ps(d + NR, r1);
          _mm256_store_ps(d + 2 * NR, r2);
          _mm256_store_ps(d + 3 * NR, r3);
          _mm256_store_ps(d + 4 * NR, r4);
          _mm256_store_ps(d + 5 * NR, r5);
          _mm256_store_ps(d + 6 * NR, r6);
          _mm256_store_ps(d + 7 * NR, r7);
        }
      }
      for (; p < kc; ++p)
        for (int64_t j = 0; j < NR; ++j) dst[p * NR + j] = src[j * ldb + p];
    } else {
      for (int64_t p = 0; p < kc; ++p) {
        int64_t j = 0;
        if (trans_b)
          for (; j < nr; ++j) dst[p * NR + j] = b[(j0 + j) * ldb + p];
        else
          for (; j < nr; ++j) dst[p * NR + j] = b[p * ldb + j0 + j];
        for (; j < NR; ++j) dst[p * NR + j] = 0.0f;
      }
    }
  }
}

// Pack op(A)[0:mc, 0:kc] (a points at element (0,0) of the block) into
// MR-row panels: dst[(i / MR) * kc * MR + p * MR + i % MR], zero-padded to a
// multiple of MR rows. May write up to 2 floats past the packed size (the
// buffer is allocated with that slack).
[[gnu::target("avx2,fma")]]
inline void gemm_pack_a(bool trans_a, int64_t mc, int64_t kc, const float* a, int64_t lda, float* dst) {
  constexpr int64_t MR = kGemmMR;
  static_assert(MR == 6, "the transposing pack below is written for MR == 6");
  if (trans_a) {
    // op(A)[i][p] = a[p * lda + i]: MR contiguous floats per p. Walk 8 rows of
    // a across all panels before moving on: going down one panel's column
    // instead touches kc lines at a stride of lda, which (lda a multiple of
    // 128 floats) fall into a few L1 sets and miss every time.
    const int64_t full = mc / MR;
    for (int64_t p0 = 0; p0 < kc; p0 += 8) {
      const int64_t p1 = std::min(kc, p0 + 8);
      for (int64_t q = 0; q < full; ++q) {
        const float* src = a + q * MR;
        float* d = dst + q * kc * MR;
        for (int64_t p = p0; p < p1; ++p) std::memcpy(d + p * MR, src + p * lda, MR * sizeof(float));
      }
    }
    if (const int64_t mr = mc - full * MR; mr > 0) {
      float* d = dst + full * kc * MR;
      for (int64_t p = 0; p < kc; ++p) {
        int64_t i = 0;
        for (; i < mr; ++i) d[p * MR + i] = a[p * lda + full * MR + i];
        for (; i < MR; ++i) d[p * MR + i] = 0.0f;
      }
    }
    return;
  }
  for (int64_t i0 = 0; i0 < mc; i0 += MR, dst += kc * MR) {
    const int64_t mr = std::min(MR, mc - i0);
    if (mr == MR) {
      // Transpose 6 rows x 8 columns (2 dummy rows) per step; each 8-wide
      // store spills 2 floats that the next store (or panel) overwrites.
      const float* src = a + i0 * lda;
      int64_t p = 0;
      for (; p + 8 <= kc; p += 8) {
        const float* s = src + p;
        __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + lda), r2 = _mm256_loadu_ps(s + 2 * lda),
               r3 = _mm256_loadu_ps(s + 3 * lda), r4 = _mm256_loadu_ps(s + 4 * lda),
               r5 = _mm256_loadu_ps(s + 5 * lda), r6 = _mm256_setzero_ps(), r7 = _mm256_setzero_ps();
        gemm_transpose8(r0, r1, r2, r3, r4, r5, r6, r7);
        float* d = dst + p * MR;
        _mm256_storeu_ps(d, r0);
        _mm256_storeu_ps(d + MR, r1);
        _mm256_storeu_ps(d + 2 * MR, r2);
        _mm256_storeu_ps(d + 3 * MR, r3);
        _mm256_storeu_ps(d + 4 * MR, r4);
        _mm256_storeu_ps(d + 5 * MR, r5);
        _mm256_storeu_ps(d + 6 * MR, r6);
        _mm256_storeu_ps(d + 7 * MR, r7);
      }
      for (; p < kc; ++p)
        for (int64_t i = 0; i < MR; ++i) dst[p * MR + i] = src[i * lda + p];
    } else {
      for (int64_t p = 0; p < kc; ++p) {
        int64_t i = 0;
        for (; i < mr; ++i) dst[p * MR + i] = a[(i0 + i) * lda + p];
        for (; i < MR; ++i) dst[p * MR + i] = 0.0f;
      }
    }
  }
}

// Where the micro-kernel reads op(A)[r][p] from.
enum class GemmA {
  packed,  // a packed MR-row panel: a[p * MR + r]
  cols,    // A^T read in place: a[p * lda + r] (MR contiguous floats per p)
  rows,    // A read in place: a[r * lda + p]
};

// C[0:R, 0:nr] = alpha * sum_p op(A)[r][p] * b[p*NR + j] + beta * C over a
// packed, 32-byte aligned B panel; beta == 0 does not read C. R < MR and
// nr < NR serve the edge tiles without wasted rows or a bounce buffer: B
// panels are zero-padded, and columns past nr are masked off.
template <GemmA Mode, int R>
[[gnu::noinline, gnu::target("avx2,fma")]]
inline void gemm_kernel(int64_t kc, const float* __restrict a, int64_t lda, const float* __restrict b, float* c,
                        int64_t ldc, float alpha, float beta, int64_t nr) {
  __m256 acc0[R], acc1[R];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    acc0[r] = _mm256_setzero_ps();
    acc1[r] = _mm256_setzero_ps();
    // Both lines a row of the tile may straddle (C need not be 64-byte aligned).
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + kGemmNR - 1), _MM_HINT_T0);
  }
  const int64_t a_step = Mode == GemmA::packed ? kGemmMR : Mode == GemmA::cols ? lda : 1;
#pragma GCC unroll 4
  for (int64_t p = 0; p < kc; ++p) {
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(Mode == GemmA::rows ? a + r * lda : a + r);
      acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
    }
    a += a_step;
    b += kGemmNR;
  }
  const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
  if (nr == kGemmNR) {
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      float* cp = c + r * ldc;
      __m256 x0 = _mm256_mul_ps(acc0[r], va), x1 = _mm256_mul_ps(acc1[r], va);
      if (beta == 1.0f) {
        x0 = _mm256_add_ps(_mm256_loadu_ps(cp), x0);
        x1 = _mm256_add_ps(_mm256_loadu_ps(cp + 8), x1);
      } else if (beta != 0.0f) {
        x0 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(cp), x0);
        x1 = _mm256_fmadd_ps(vb, _mm256_loadu_ps(cp + 8), x1);
      }
      _mm256_storeu_ps(cp, x0);
      _mm256_storeu_ps(cp + 8, x1);
    }
  } else {
    // Masked lanes are neither read nor written (and cannot fault).
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nr)), lane);
    const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nr) - 8), lane);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      float* cp = c + r * ldc;
      __m256 x0 = _mm256_mul_ps(acc0[r], va), x1 = _mm256_mul_ps(acc1[r], va);
      if (beta != 0.0f) {
        x0 = _mm256_fmadd_ps(vb, _mm256_maskload_ps(cp, m0), x0);
        x1 = _mm256_fmadd_ps(vb, _mm256_maskload_ps(cp + 8, m1), x1);
      }
      _mm256_maskstore_ps(cp, m0, x0);
      _mm256_maskstore_ps(cp + 8, m1, x1);
    }
  }
}

template <GemmA Mode>
[[gnu::target("avx2,fma")]]
inline void gemm_kernel_dispatch(int64_t mr, int64_t kc, const float* a, int64_t lda, const float* b, float* c,
                                 int64_t ldc, float alpha, float beta, int64_t nr) {
  switch (mr) {
    case 6: return gemm_kernel<Mode, 6>(kc, a, lda, b, c, ldc, alpha, beta, nr);
    case 5: return gemm_kernel<Mode, 5>(kc, a, lda, b, c, ldc, alpha, beta, nr);
    case 4: return gemm_kernel<Mode, 4>(kc, a, lda, b, c, ldc, alpha, beta, nr);
    case 3: return gemm_kernel<Mode, 3>(kc, a, lda, b, c, ldc, alpha, beta, nr);
    case 2: return gemm_kernel<Mode, 2>(kc, a, lda, b, c, ldc, alpha, beta, nr);
    default: return gemm_kernel<Mode, 1>(kc, a, lda, b, c, ldc, alpha, beta, nr);
  }
}

// Splits len into pieces of at most blk, as even as possible and rounded up
// to a multiple of unit, so k = 300 runs as 152 + 148 rather than 256 + 44.
inline int64_t gemm_even_block(int64_t len, int64_t blk, int64_t unit) {
  const int64_t pieces = (len + blk - 1) / blk;
  const int64_t per = (len + pieces - 1) / pieces;
  return (per + unit - 1) / unit * unit;
}

[[gnu::target("avx2,fma")]]
inline void gemm_f32(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* A,
                     int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  constexpr int64_t MR = kGemmMR, NR = kGemmNR;
  const int64_t KC = gemm_even_block(k, kGemmKC, 1);
  const int64_t MC = gemm_even_block(m, kGemmMC, MR);
  const int64_t NC = gemm_even_block(n, kGemmNC, NR);
  float* bp = gemm_buffer_b().get(static_cast<size_t>(KC * ((std::min(NC, n) + NR - 1) / NR * NR)));
  // Packing A pays off when each A panel meets many B panels; with few
  // columns the kernel reads A in place instead.
  const bool pack_a = n > kGemmPackAMinN;
  float* ap = pack_a ? gemm_buffer_a().get(static_cast<size_t>(KC * ((std::min(MC, m) + MR - 1) / MR * MR) + 8))
                     : nullptr;

  for (int64_t jc = 0; jc < n; jc += NC) {
    const int64_t nc = std::min(NC, n - jc);
    for (int64_t pc = 0; pc < k; pc += KC) {
      const int64_t kc = std::min(KC, k - pc);
      const float beta_k = pc == 0 ? beta : 1.0f;  // beta applies once; later K blocks accumulate
      gemm_pack_b(trans_b, kc, nc, trans_b ? B + jc * ldb + pc : B + pc * ldb + jc, ldb, bp);
      for (int64_t ic = 0; ic < m; ic += MC) {
        const int64_t mc = std::min(MC, m - ic);
        const float* ablk = trans_a ? A + pc * lda + ic : A + ic * lda + pc;
        if (pack_a) gemm_pack_a(trans_a, mc, kc, ablk, lda, ap);
        for (int64_t jr = 0; jr < nc; jr += NR) {
          const int64_t nr = std::min(NR, nc - jr);
          const float* bpan = bp + (jr / NR) * kc * NR;
          for (int64_t ir = 0; ir < mc; ir += MR) {
            const int64_t mr = std::min(MR, mc - ir);
            float* cp = C + (ic + ir) * ldc + jc + jr;
            if (pack_a)
              gemm_kernel_dispatch<GemmA::packed>(mr, kc, ap + (ir / MR) * kc * MR, MR, bpan, cp, ldc, alpha, beta_k,
                                                  nr);
            else if (trans_a)
              gemm_kernel_dispatch<GemmA::cols>(mr, kc, ablk + ir, lda, bpan, cp, ldc, alpha, beta_k, nr);
            else
              gemm_kernel_dispatch<GemmA::rows>(mr, kc, ablk + ir * lda, lda, bpan, cp, ldc, alpha, beta_k, nr);
          }
        }
      }
    }
  }
}

// op(B) packed once for many products with different A (a convolution's
// weights against every block of im2col rows): all (NC, KC) blocks in the
// order gemm_f32 walks them, each as zero-padded KC x NR panels.
struct GemmPackedF32 {
  int64_t k = 0, n = 0, KC = 0, NC = 0;
  GemmBuffer buf;               // 64-byte aligned: the kernel's B loads are aligned
  std::vector<size_t> offset;  // start of block (jc / NC, pc / KC), row-major over (jc, pc)

  void pack(bool trans_b, int64_t k_, int64_t n_, const float* B, int64_t ldb) {
    k = k_;
    n = n_;
    KC = gemm_even_block(k, kGemmKC, 1);
    NC = gemm_even_block(n, kGemmNC, kGemmNR);
    offset.clear();
    size_t total = 0;
    for (int64_t jc = 0; jc < n; jc += NC)
      for (int64_t pc = 0; pc < k; pc += KC) {
        offset.push_back(total);
        total += static_cast<size_t>(std::min(KC, k - pc) * ((std::min(NC, n - jc) + kGemmNR - 1) / kGemmNR * kGemmNR));
      }
    float* data = buf.get(total);
    size_t blk = 0;
    for (int64_t jc = 0; jc < n; jc += NC)
      for (int64_t pc = 0; pc < k; pc += KC, ++blk)
        gemm_pack_b(trans_b, std::min(KC, k - pc), std::min(NC, n - jc), trans_b ? B + jc * ldb + pc : B + pc * ldb + jc,
                    ldb, data + offset[blk]);
  }
};

// C[m, n] = alpha * A[m, k] * op(B) + beta * C with op(B) from a GemmPackedF32.
// A is read in place (rows of lda floats).
[[gnu::target("avx2,fma")]]
inline void gemm_f32_prepacked(int64_t m, float alpha, const float* A, int64_t lda, const GemmPackedF32& pb,
                               float beta, float* C, int64_t ldc) {
  constexpr int64_t MR = kGemmMR, NR = kGemmNR;
  const int64_t n = pb.n, k = pb.k, KC = pb.KC, NC = pb.NC;
  const int64_t MC = gemm_even_block(m, kGemmMC, MR);
  size_t blk = 0;
  for (int64_t jc = 0; jc < n; jc += NC) {
    const int64_t nc = std::min(NC, n - jc);
    for (int64_t pc = 0; pc < k; pc += KC, ++blk) {
      const int64_t kc = std::min(KC, k - pc);
      const float beta_k = pc == 0 ? beta : 1.0f;
      const float* bp = pb.buf.p + pb.offset[blk];
      for (int64_t ic = 0; ic < m; ic += MC) {
        const int64_t mc = std::min(MC, m - ic);
        const float* ablk = A + ic * lda + pc;
        for (int64_t jr = 0; jr < nc; jr += NR) {
          const int64_t nr = std::min(NR, nc - jr);
          const float* bpan = bp + (jr / NR) * kc * NR;
          for (int64_t ir = 0; ir < mc; ir += MR)
            gemm_kernel_dispatch<GemmA::rows>(std::min(MR, mc - ir), kc, ablk + ir * lda, lda, bpan,
                                              C + (ic + ir) * ldc + jc + jr, ldc, alpha, beta_k, nr);
        }
      }
    }
  }
}

#endif  // DIFFUSE_X86_TARGETS

// ---------------------------------------------------------------- public entry points

// C[m,n] = alpha * op(A)[m,k] * op(B)[k,n] + beta * C, all row-major with
// leading dimensions (row strides) lda, ldb, ldc. op(A) = A (m x k,
// A[i*lda + p]) or, with trans_a, A^T (A stored k x m, A[p*lda + i]); the
// same for B. beta == 0: C is not read (it may hold NaN). Single-threaded
// (except that the Eigen fallback may use Eigen's own threads). float runs
// on gemm_path().
template <class T>
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda,
                 const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0 || alpha == T(0)) return gemm_scale_c(m, n, beta, C, ldc);
#ifdef DIFFUSE_X86_TARGETS
  if constexpr (std::is_same_v<T, float>) {
    if (gemm_path() == GemmPath::avx2) return gemm_f32(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
  }
#endif
  gemm_eigen<T>(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

// The same product split across the threads, in one parallel region:
// over row blocks of C, or over column blocks when m is small (below 256
// rows and no more than n; there each thread would spend a visible share of
// its time packing all of op(B)) or too small to give every thread two
// micro-tiles. Runs single-threaded inside a parallel region or when
// 2*m*n*k < 4e6 (there, starting threads costs more than it saves).
template <class T>
inline void gemm_parallel(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* A,
                          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  // Chosen here, on the calling thread: a bad DIFFUSE_GEMM throws where it can be caught.
  if constexpr (std::is_same_v<T, float>) (void)gemm_path();
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  const int threads = in_parallel() ? 1 : num_threads();
  if (threads > 1 && flops >= 4e6) {
    constexpr int64_t mr = kGemmMR, nr = kGemmNR;
    const int64_t nt = threads;
    const bool by_cols = n >= 2 * nr * nt && (m < 2 * mr * nt || (m < 256 && n >= m));
    parallel_region(threads, [&](int64_t t, int64_t nth) {
      // Block edges fall on micro-tile boundaries.
      if (!by_cols) {
        const int64_t tiles = (m + mr - 1) / mr;
        const int64_t i0 = std::min(m, tiles * t / nth * mr), i1 = std::min(m, tiles * (t + 1) / nth * mr);
        if (i1 > i0)
          gemm<T>(trans_a, trans_b, i1 - i0, n, k, alpha, trans_a ? A + i0 : A + i0 * lda, lda, B, ldb, beta,
                  C + i0 * ldc, ldc);
      } else {
        const int64_t tiles = (n + nr - 1) / nr;
        const int64_t j0 = std::min(n, tiles * t / nth * nr), j1 = std::min(n, tiles * (t + 1) / nth * nr);
        if (j1 > j0)
          gemm<T>(trans_a, trans_b, m, j1 - j0, k, alpha, A, lda, trans_b ? B + j0 * ldb : B + j0, ldb, beta,
                  C + j0, ldc);
      }
    });
    return;
  }
  gemm<T>(trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

// op(B) [k, n] prepared once for many products C = alpha * A op(B) + beta * C
// with different A (row-major, lda): packed panels for float on the avx2
// path, a plain row-major copy of op(B) for the Eigen fallback. The path is
// the one gemm_path() gave when pack() ran.
template <class T>
class GemmB {
 public:
  void pack(bool trans_b, int64_t k, int64_t n, const T* B, int64_t ldb) {
    k_ = k;
    n_ = n;
#ifdef DIFFUSE_X86_TARGETS
    avx2_ = std::is_same_v<T, float> && gemm_path() == GemmPath::avx2;
    if constexpr (std::is_same_v<T, float>) {
      if (avx2_) {
        packed_.pack(trans_b, k, n, B, ldb);
        plain_.clear();
        return;
      }
    }
#endif
    plain_.resize(static_cast<size_t>(k * n));
    for (int64_t p = 0; p < k; ++p)
      for (int64_t j = 0; j < n; ++j) plain_[p * n + j] = trans_b ? B[j * ldb + p] : B[p * ldb + j];
  }
  int64_t k() const { return k_; }
  int64_t n() const { return n_; }

  // C[m, n] = alpha * A[m, k] op(B) + beta * C. Single-threaded; safe to call
  // from many threads at once on one GemmB.
  void multiply(int64_t m, T alpha, const T* A, int64_t lda, T beta, T* C, int64_t ldc) const {
    if (m <= 0 || n_ <= 0) return;
    if (k_ <= 0 || alpha == T(0)) return gemm_scale_c(m, n_, beta, C, ldc);
#ifdef DIFFUSE_X86_TARGETS
    if constexpr (std::is_same_v<T, float>) {
      if (avx2_) return gemm_f32_prepacked(m, alpha, A, lda, packed_, beta, C, ldc);
    }
#endif
    gemm_eigen<T>(false, false, m, n_, k_, alpha, A, lda, plain_.data(), n_, beta, C, ldc);
  }

 private:
  int64_t k_ = 0, n_ = 0;
#ifdef DIFFUSE_X86_TARGETS
  bool avx2_ = false;
  GemmPackedF32 packed_;
#endif
  std::vector<T> plain_;
};

}  // namespace diffuse::detail
