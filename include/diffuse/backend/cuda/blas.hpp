// Single-precision GEMM on the device, with the library's ROW-MAJOR conventions:
//
//   diffuse::cuda::Blas blas;                 // a cuBLAS handle on the current device
//   blas.set_stream(stream);                  // optional; FP32 math unless set_math_mode(TF32 / BF16)
//   diffuse::cuda::gemm(blas, trans_a, trans_b, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
//
// C[m,n] = alpha * op(A)[m,k] * op(B)[k,n] + beta * C, every matrix row-major with a leading
// dimension (row stride): op(A) = A stored m x k (A[i*lda + p]) or, with trans_a, A^T with A
// stored k x m (A[p*lda + i]); likewise B; C[i*ldc + j]. The same contract as diffuse::gemm
// (include/diffuse/backend/cpu/gemm.hpp), on device pointers. beta == 0: C is not read (it may hold NaN).
// gemm_strided_batched does `batch` such products, the b-th on A + b*stride_a, B + b*stride_b,
// C + b*stride_c (strides in elements, >= 0; 0 reuses one operand for every product). The C
// matrices must not share elements (they may interleave, e.g. heads of one row-major tensor
// read through ldc); that is not checked.
//
// Two worlds, chosen like launch.hpp's:
//  - under nvcc: cuBLAS. Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, so
//    each call hands cuBLAS the operands swapped (B first) and m, n exchanged; no transposes
//    are materialised. cuBLAS takes int sizes and leading dimensions: larger ones are
//    rejected (std::invalid_argument) rather than truncated. Every call is checked.
//  - otherwise (the CPU emulation, where device pointers are host pointers): the same class
//    without a handle and a plain host loop that accumulates each dot product in DOUBLE (float
//    products are exact in double), so the emulation's GEMMs are nearly correctly rounded and
//    a test's tolerance is set by cuBLAS's float accumulation, not by this fallback. Argument
//    checks are identical in both worlds.
//
// Math modes (MathMode): FP32 (cuBLAS's default math: no tensor cores, as the CPU), TF32
// (CUBLAS_TF32_TENSOR_OP_MATH), BF16 (cublasGemmEx on the float matrices with
// CUBLAS_COMPUTE_32F_FAST_16BF: tensor cores round A's and B's elements to bf16, float
// accumulation, C stays float). The emulation applies BF16 exactly so: A and B rounded to bf16
// (to nearest even), then the double sums; TF32 it ignores (its tests bound TF32 instead).
#pragma once

#include <diffuse/backend/cuda/launch.hpp>

#ifdef __CUDACC__
#include <diffuse/backend/cuda/check.hpp>
#if !DIFFUSE_HAVE_CUBLAS
#error "diffuse/backend/cuda/blas.hpp needs cuBLAS (<cublas_v2.h>; link diffuse::cuda built with CUDA::cublas)"
#endif
#endif

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <diffuse/backend/capture_state.hpp>
#include <diffuse/backend/cuda/bf16.hpp>
#include <diffuse/backend/cuda/math_mode.hpp>  // MathMode: FP32 (CUBLAS_DEFAULT_MATH, matches the CPU), TF32, BF16
#include <diffuse/core/parallel.hpp>

namespace diffuse::cuda {

// The two worlds' Blas differ; separate inline namespaces keep a program that links a g++ and
// an nvcc translation unit from silently merging two different classes of one name (ODR).
#ifdef __CUDACC__
inline namespace cublas_world {
#else
inline namespace host_world {
#endif

#ifdef __CUDACC__
// Owns a cuBLAS handle created on the device current at construction; use it on that device.
// Move-only. Not thread-safe: one Blas per host thread (cuBLAS's rule for handles).
class Blas {
 public:
  Blas() {
    DIFFUSE_CUBLAS_CHECK(cublasCreate(&h_));
    try {
      DIFFUSE_CUBLAS_CHECK(cublasSetMathMode(h_, CUBLAS_DEFAULT_MATH));
    } catch (...) {
      (void)cublasDestroy(h_);
      throw;
    }
  }
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;
  Blas(Blas&& o) noexcept
      : h_(std::exchange(o.h_, nullptr)), stream_(std::exchange(o.stream_, nullptr)), mode_(o.mode_),
        ws_(std::exchange(o.ws_, nullptr)), ws_bytes_(std::exchange(o.ws_bytes_, 0)) {}
  Blas& operator=(Blas&& o) noexcept {
    if (this != &o) {
      if (h_) (void)cublasDestroy(h_);
      h_ = std::exchange(o.h_, nullptr);
      stream_ = std::exchange(o.stream_, nullptr);
      mode_ = o.mode_;
      ws_ = std::exchange(o.ws_, nullptr);
      ws_bytes_ = std::exchange(o.ws_bytes_, 0);
    }
    return *this;
  }
  ~Blas() {
    if (h_) (void)cublasDestroy(h_);  // a destructor cannot throw
  }

  // Later calls are queued on `s` (nullptr: the legacy default stream). cublasSetStream puts
  // cuBLAS's default workspace back, so a workspace given with set_workspace is given again.
  void set_stream(stream_t s) {
    if (s == stream_) return;
    DIFFUSE_CUBLAS_CHECK(cublasSetStream(handle(), s));
    stream_ = s;
    if (ws_) DIFFUSE_CUBLAS_CHECK(cublasSetWorkspace(handle(), ws_, ws_bytes_));
  }
  // cuBLAS's scratch from now on (256-byte aligned; kept by the caller): a CUDA graph capture
  // needs one, as the default one may be allocated inside the capture.
  void set_workspace(void* p, std::size_t bytes) {
    DIFFUSE_CUBLAS_CHECK(cublasSetWorkspace(handle(), p, bytes));
    ws_ = p, ws_bytes_ = bytes;
  }
  stream_t stream() const noexcept { return stream_; }
  // BF16 keeps the handle's default math: its GEMMs name their compute type (cublasGemmEx).
  void set_math_mode(MathMode m) {
    DIFFUSE_CUBLAS_CHECK(
        cublasSetMathMode(handle(), m == MathMode::TF32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
    mode_ = m;
  }
  MathMode math_mode() const noexcept { return mode_; }

  cublasHandle_t handle() const {
    if (!h_) throw std::logic_error("diffuse::cuda::Blas: used after it was moved from");
    return h_;
  }

 private:
  cublasHandle_t h_ = nullptr;
  stream_t stream_ = nullptr;
  MathMode mode_ = MathMode::FP32;
  void* ws_ = nullptr;
  std::size_t ws_bytes_ = 0;
};
#else
// The emulation's Blas: no handle; the stream is remembered and ignored (the host loop is
// synchronous and always accumulates in double); the math mode BF16 rounds the operands.
class Blas {
 public:
  Blas() = default;
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;
  Blas(Blas&&) noexcept = default;
  Blas& operator=(Blas&&) noexcept = default;

  void set_stream(stream_t s) noexcept { stream_ = s; }
  stream_t stream() const noexcept { return stream_; }
  void set_math_mode(MathMode m) noexcept { mode_ = m; }
  MathMode math_mode() const noexcept { return mode_; }

 private:
  stream_t stream_ = nullptr;
  MathMode mode_ = MathMode::FP32;
};
#endif

}  // inline namespace

namespace detail {

inline std::string gemm_dims(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k) {
  return " (m = " + std::to_string(m) + ", n = " + std::to_string(n) + ", k = " + std::to_string(k) +
         ", trans_a = " + (trans_a ? "true" : "false") + ", trans_b = " + (trans_b ? "true" : "false") + ")";
}

// The checks shared by both worlds and both entry points; `who` names the entry point.
inline void check_gemm_args(const char* who, bool trans_a, bool trans_b, std::int64_t m, std::int64_t n,
                            std::int64_t k, const float* A, std::int64_t lda, const float* B, std::int64_t ldb,
                            const float* C, std::int64_t ldc, std::int64_t batch) {
  const std::string w = std::string("diffuse::cuda::") + who + ": ";
  const std::string dims = gemm_dims(trans_a, trans_b, m, n, k);
  if (m < 0 || n < 0 || k < 0) throw std::invalid_argument(w + "negative size" + dims);
  if (batch < 0) throw std::invalid_argument(w + "negative batch " + std::to_string(batch));
  // Row lengths of the stored (row-major) matrices: A is m x k or k x m, B is k x n or n x k.
  const std::int64_t row_a = trans_a ? m : k, row_b = trans_b ? k : n;
  auto check_ld = [&](const char* name, std::int64_t ld, std::int64_t row, const char* mat) {
    if (ld < std::max<std::int64_t>(1, row))
      throw std::invalid_argument(w + name + " = " + std::to_string(ld) + " is less than max(1, " +
                                  std::to_string(row) + "), the row length of the stored " + mat + dims);
  };
  check_ld("lda", lda, row_a, "A");
  check_ld("ldb", ldb, row_b, "B");
  check_ld("ldc", ldc, n, "C");
  // cuBLAS's (non-_64) API takes int; refuse rather than truncate (in both worlds, so the
  // emulation accepts exactly what the device does).
  auto check_int = [&](const char* name, std::int64_t v) {
    if (v > INT_MAX)
      throw std::invalid_argument(w + name + " = " + std::to_string(v) +
                                  " exceeds cuBLAS's int range (2^31 - 1); split the product" + dims);
  };
  check_int("m", m);
  check_int("n", n);
  check_int("k", k);
  check_int("lda", lda);
  check_int("ldb", ldb);
  check_int("ldc", ldc);
  check_int("batch", batch);
  if (m == 0 || n == 0 || batch == 0) return;  // nothing is touched
  if (!C) throw std::invalid_argument(w + "C is null" + dims);
  if (k > 0 && (!A || !B)) throw std::invalid_argument(w + "A or B is null" + dims);
}

#ifndef __CUDACC__
// The emulation's GEMM: `batch` products, each dot product summed over p in order in double
// (exact float products, so the only sizeable rounding is the final one to float). alpha == 0
// or k == 0: A and B are not read; beta == 0: C is not read (BLAS semantics, as cuBLAS).
// bf16: every element of A and B is rounded to bf16 before it is multiplied (MathMode::BF16).
inline void host_gemm_batched(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                              float alpha, const float* A, std::int64_t lda, std::int64_t stride_a, const float* B,
                              std::int64_t ldb, std::int64_t stride_b, float beta, float* C, std::int64_t ldc,
                              std::int64_t stride_c, std::int64_t batch, bool bf16_operands = false) {
  // The operand as multiplied: the float itself, or its bf16 rounding.
  const auto op = [bf16_operands](float v) -> double {
    return bf16_operands ? static_cast<double>(static_cast<float>(bf16(v))) : static_cast<double>(v);
  };
  const std::int64_t rows = batch * m;
  const bool product = k > 0 && alpha != 0.0f;
  const double work = static_cast<double>(rows) * static_cast<double>(n) * static_cast<double>(k);
  parallel_region(loop_threads(rows, work > 1e6), [&](int th, int team) {
    std::vector<double> acc(static_cast<std::size_t>(n));
    const auto [r0, r1] = static_range(rows, th, team);
    for (std::int64_t r = r0; r < r1; ++r) {
      const std::int64_t b = r / m, i = r % m;
      const float* a = A + b * stride_a;
      const float* bm = B + b * stride_b;
      float* c = C + b * stride_c + i * ldc;
      std::fill(acc.begin(), acc.end(), 0.0);
      if (product) {
        if (trans_b) {  // B stored n x k: column j of op(B) is row j of B, contiguous
          for (std::int64_t j = 0; j < n; ++j) {
            const float* bj = bm + j * ldb;
            double s = 0.0;
            for (std::int64_t p = 0; p < k; ++p)
              s += op(trans_a ? a[p * lda + i] : a[i * lda + p]) * op(bj[p]);
            acc[static_cast<std::size_t>(j)] = s;
          }
        } else {  // B stored k x n: add row p of B times op(A)[i][p], in the same order over p
          for (std::int64_t p = 0; p < k; ++p) {
            const double aip = op(trans_a ? a[p * lda + i] : a[i * lda + p]);
            const float* bp = bm + p * ldb;
            for (std::int64_t j = 0; j < n; ++j) acc[static_cast<std::size_t>(j)] += aip * op(bp[j]);
          }
        }
      }
      for (std::int64_t j = 0; j < n; ++j) {
        double v = static_cast<double>(alpha) * acc[static_cast<std::size_t>(j)];
        if (beta != 0.0f) v += static_cast<double>(beta) * static_cast<double>(c[j]);
        c[j] = static_cast<float>(v);
      }
    }
  });
}
#endif

}  // namespace detail

// C = alpha op(A) op(B) + beta C, row-major (see the top of this file), on blas's stream.
inline void gemm(Blas& blas, bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                 const float* A, std::int64_t lda, const float* B, std::int64_t ldb, float beta, float* C,
                 std::int64_t ldc) {
  detail::check_gemm_args("gemm", trans_a, trans_b, m, n, k, A, lda, B, ldb, C, ldc, 1);
  if (m == 0 || n == 0) return;
#ifdef __CUDACC__
  // Column-major C^T (n x m) = op(B)^T (n x k) op(A)^T (k x m): the row-major B read as
  // column-major is B^T, so op(B)^T keeps op(B)'s transpose flag.
  if (blas.math_mode() == MathMode::BF16) {
    DIFFUSE_CUBLAS_CHECK(cublasGemmEx(blas.handle(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                                      trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                                      static_cast<int>(k), &alpha, B, CUDA_R_32F, static_cast<int>(ldb), A, CUDA_R_32F,
                                      static_cast<int>(lda), &beta, C, CUDA_R_32F, static_cast<int>(ldc),
                                      CUBLAS_COMPUTE_32F_FAST_16BF, CUBLAS_GEMM_DEFAULT));
    return;
  }
  DIFFUSE_CUBLAS_CHECK(cublasSgemm(blas.handle(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                                   trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                                   static_cast<int>(k), &alpha, B, static_cast<int>(ldb), A, static_cast<int>(lda),
                                   &beta, C, static_cast<int>(ldc)));
#else
  const bool bf = blas.math_mode() == MathMode::BF16;
  backend::device_work([=] { detail::host_gemm_batched(trans_a, trans_b, m, n, k, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1, bf); });
#endif
}

// `batch` independent products C_b = alpha op(A_b) op(B_b) + beta C_b, with X_b = X + b * stride_x.
inline void gemm_strided_batched(Blas& blas, bool trans_a, bool trans_b, std::int64_t m, std::int64_t n,
                                 std::int64_t k, float alpha, const float* A, std::int64_t lda, const float* B,
                                 std::int64_t ldb, float beta, float* C, std::int64_t ldc, std::int64_t batch,
                                 std::int64_t stride_a, std::int64_t stride_b, std::int64_t stride_c) {
  detail::check_gemm_args("gemm_strided_batched", trans_a, trans_b, m, n, k, A, lda, B, ldb, C, ldc, batch);
  if (stride_a < 0 || stride_b < 0 || stride_c < 0)
    throw std::invalid_argument("diffuse::cuda::gemm_strided_batched: negative stride (stride_a = " +
                                std::to_string(stride_a) + ", stride_b = " + std::to_string(stride_b) +
                                ", stride_c = " + std::to_string(stride_c) + ")");
  if (batch > 1 && stride_c == 0)
    throw std::invalid_argument("diffuse::cuda::gemm_strided_batched: stride_c = 0 with batch = " +
                                std::to_string(batch) + " would write every product to the same C");
  if (m == 0 || n == 0 || batch == 0) return;
#ifdef __CUDACC__
  if (blas.math_mode() == MathMode::BF16) {
    DIFFUSE_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        blas.handle(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n),
        static_cast<int>(m), static_cast<int>(k), &alpha, B, CUDA_R_32F, static_cast<int>(ldb),
        static_cast<long long>(stride_b), A, CUDA_R_32F, static_cast<int>(lda), static_cast<long long>(stride_a), &beta,
        C, CUDA_R_32F, static_cast<int>(ldc), static_cast<long long>(stride_c), static_cast<int>(batch),
        CUBLAS_COMPUTE_32F_FAST_16BF, CUBLAS_GEMM_DEFAULT));
    return;
  }
  DIFFUSE_CUBLAS_CHECK(cublasSgemmStridedBatched(
      blas.handle(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n),
      static_cast<int>(m), static_cast<int>(k), &alpha, B, static_cast<int>(ldb), static_cast<long long>(stride_b), A,
      static_cast<int>(lda), static_cast<long long>(stride_a), &beta, C, static_cast<int>(ldc),
      static_cast<long long>(stride_c), static_cast<int>(batch)));
#else
  const bool bf = blas.math_mode() == MathMode::BF16;
  backend::device_work([=] {
    detail::host_gemm_batched(trans_a, trans_b, m, n, k, alpha, A, lda, stride_a, B, ldb, stride_b, beta, C, ldc,
                              stride_c, batch, bf);
  });
#endif
}

}  // namespace diffuse::cuda
