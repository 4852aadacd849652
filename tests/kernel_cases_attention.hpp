// The attention family against exact references: diffuse::cuda::gemm / gemm_strided_batched
// (include/diffuse/backend/cuda/blas.hpp) against a double loop here, the softmax kernels
// (kernels/softmax.cuh), diffuse::cuda::attention_forward / _backward and the fused
// kernels::flash_attention_forward / _backward (kernels/flash_attention.cuh)
// (include/diffuse/backend/cuda/attention.hpp) against the CPU backend run in double
// (kernel_reference_attention.cpp). Included by test_emu_attention.cpp (CPU emulation: the GEMMs
// are the host fallback) and cuda_attention.cu (nvcc: cuBLAS and the kernels on the GPU).
//
// Tolerances are worst-case rounding bounds of the device's float arithmetic, written with the
// unit roundoff u = 2^-24 (a float operation's relative error) and then doubled (kMargin) to
// cover second-order terms; the references themselves are exact to ~1e-16:
//  - a dot product of k terms, in any order, with or without FMA: k u sum |a_p b_p| (cuBLAS
//    may split k; the bound holds for every summation tree);
//  - expf: at most 2 ulp (CUDA's documented bound; glibc's is under 1), i.e. 4u relative;
//  - a sum spread over threads: each thread adds at most ceil(L/32) terms, then two butterflies
//    of 5 levels: depth D = ceil(L/32) + 10.
#pragma once

#include <catch2/catch.hpp>

#include <diffuse/backend/cuda/attention.hpp>
#include <diffuse/backend/cuda/bf16.hpp>
#include <diffuse/backend/cuda/blas.hpp>

#include "kernels/flash_attention.cuh"
#include "kernels/softmax.cuh"

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "device_buffer.hpp"
#include "kernel_reference_attention.hpp"
#include "kernel_seed.hpp"

namespace {

namespace attn_test {

using diffuse::testing::DeviceBuffer;

constexpr double kU = FLT_EPSILON / 2;  // unit roundoff of float
constexpr double kMargin = 2.0;

inline bool is_poison(float x) {  // the 0xFF bytes DeviceBuffer fills with
  std::uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b == 0xFFFFFFFFu;
}
inline float poison() {
  const std::uint32_t b = 0xFFFFFFFFu;
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// Depth of the softmax kernels' float sums over a row of L values (see the top of this file).
inline double softmax_depth(std::int64_t L) { return static_cast<double>((L + 31) / 32 + 10); }

#ifdef __CUDACC__
// A non-blocking stream: work queued on it does not wait for the legacy default stream, so a
// GEMM or kernel of one attention call that went to another stream could race with the rest.
// DeviceBuffer's fill and copies run on the legacy default stream (a pageable copy may still be
// in flight when cudaMemcpy returns), so ready() waits for them before work goes on the stream.
struct TestStream {
  cudaStream_t s = nullptr;
  TestStream() { diffuse::testing::cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream"); }
  ~TestStream() { cudaStreamDestroy(s); }
  void ready() const { diffuse::testing::cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }
  TestStream(const TestStream&) = delete;
  TestStream& operator=(const TestStream&) = delete;
};
#else
struct TestStream {
  diffuse::cuda::stream_t s = nullptr;
  void ready() const {}
};
#endif

// ---------------------------------------------------------------- GEMM

struct GemmLayout {
  std::int64_t rows, cols, ld, stride;  // one stored matrix: rows x cols in rows of ld, stride apart
  std::size_t size(std::int64_t batch) const {
    return static_cast<std::size_t>(batch > 0 ? (batch - 1) * stride + std::max<std::int64_t>(rows, 1) * ld : 0);
  }
  bool valid(std::size_t e) const {  // element e is inside some matrix (not padding or a gap)
    const std::int64_t off = static_cast<std::int64_t>(e) % stride;
    return off / ld < rows && off % ld < cols;
  }
};

inline GemmLayout make_layout(std::mt19937_64& gen, std::int64_t rows, std::int64_t cols, bool gaps) {
  std::uniform_int_distribution<std::int64_t> pad(0, 3), gap(0, 5);
  GemmLayout l{rows, cols, std::max<std::int64_t>(cols, 1) + pad(gen), 0};
  l.stride = std::max<std::int64_t>(rows, 1) * l.ld + (gaps ? gap(gen) : 0);
  return l;
}

// Fills the matrices' elements with uniform values in [-1, 1) and leaves padding poisoned.
inline std::vector<float> fill(std::mt19937_64& gen, const GemmLayout& l, std::int64_t batch, bool values) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> x(l.size(batch), poison());
  if (values)
    for (std::size_t e = 0; e < x.size(); ++e)
      if (l.valid(e)) x[e] = u(gen);
  return x;
}

// Runs one product (batch 0: diffuse::cuda::gemm; else gemm_strided_batched) and checks every
// element of C against a double loop within (k + 3) u (|alpha| sum |a b| + |beta c|) doubled,
// and that padding and gaps of C are untouched. `bstride0`: B's stride 0 (one B for every
// product). `extra_rel`: a further relative error per product term (TF32 input rounding).
inline void check_gemm(diffuse::cuda::Blas& blas, std::mt19937_64& gen, bool ta, bool tb, std::int64_t m,
                       std::int64_t n, std::int64_t k, float alpha, float beta, std::int64_t batch, bool bstride0,
                       double extra_rel = 0.0) {
  const std::int64_t nb = std::max<std::int64_t>(batch, 1);
  INFO("trans_a " << ta << " trans_b " << tb << " m " << m << " n " << n << " k " << k << " alpha " << alpha
                  << " beta " << beta << " batch " << batch << " B stride 0 " << bstride0);
  GemmLayout la = make_layout(gen, ta ? k : m, ta ? m : k, batch > 0);
  GemmLayout lb = make_layout(gen, tb ? n : k, tb ? k : n, batch > 0);
  GemmLayout lc = make_layout(gen, m, n, batch > 0);
  const std::vector<float> A = fill(gen, la, nb, true);
  std::vector<float> B;
  if (bstride0) {
    B = fill(gen, lb, 1, true);
    lb.stride = 0;
  } else {
    B = fill(gen, lb, nb, true);
  }
  const std::vector<float> C0 = fill(gen, lc, nb, beta != 0.0f);  // beta == 0: all poison, never read
  DeviceBuffer<float> dA(A), dB(B), dC(C0);
  if (batch == 0)
    diffuse::cuda::gemm(blas, ta, tb, m, n, k, alpha, dA.get(), la.ld, dB.get(), lb.ld, beta, dC.get(), lc.ld);
  else
    diffuse::cuda::gemm_strided_batched(blas, ta, tb, m, n, k, alpha, dA.get(), la.ld, dB.get(), lb.ld, beta,
                                        dC.get(), lc.ld, batch, la.stride, lb.stride, lc.stride);
  const std::vector<float> C = dC.to_host();
  REQUIRE(C.size() == C0.size());
  std::size_t bad = 0, untouched = 0;
  double worst = 0;
  for (std::int64_t b = 0; b < nb; ++b) {
    const float* a = A.data() + b * la.stride;
    const float* bm = B.data() + b * lb.stride;
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) {
        double dot = 0, mag = 0;
        for (std::int64_t p = 0; p < k; ++p) {
          const double x = ta ? a[p * la.ld + i] : a[i * la.ld + p];
          const double y = tb ? bm[j * lb.ld + p] : bm[p * lb.ld + j];
          dot += x * y;
          mag += std::fabs(x * y);
        }
        const std::size_t e = static_cast<std::size_t>(b * lc.stride + i * lc.ld + j);
        const double c0 = beta != 0.0f ? static_cast<double>(C0[e]) : 0.0;
        const double ref = static_cast<double>(alpha) * dot + static_cast<double>(beta) * c0;
        const double scale = std::fabs(static_cast<double>(alpha)) * mag + std::fabs(static_cast<double>(beta) * c0);
        const double tol =
            kMargin * (static_cast<double>(k + 3) * kU * scale + extra_rel * std::fabs(static_cast<double>(alpha)) * mag);
        const double err = std::fabs(static_cast<double>(C[e]) - ref);
        if (!(err <= tol)) ++bad;
        if (scale > 0) worst = std::max(worst, err / scale);
      }
  }
  for (std::size_t e = 0; e < C.size(); ++e)
    if (!lc.valid(e) && !is_poison(C[e])) ++untouched;
  INFO("worst |error| / (|alpha| sum|ab| + |beta c|) = " << worst << " (u = " << kU << ")");
  CHECK(bad == 0);
  CHECK(untouched == 0);
}

// ---------------------------------------------------------------- attention bounds

struct AttentionCase {
  std::int64_t N, L, C, heads;
};

// Error bounds (before kMargin) of the device's out, P, dq, dk, dv, by first-order propagation
// of each step's rounding through the next (see attention.hpp for the steps). old_*: the
// magnitudes already in an accumulated gradient (empty: written).
struct AttentionBounds {
  std::vector<double> out, P, dq, dk, dv;
};

inline AttentionBounds attention_bounds(const AttentionCase& c, const std::vector<float>& q,
                                        const std::vector<float>& k, const std::vector<float>& v,
                                        const std::vector<float>& g, const std::vector<double>& P,
                                        const std::vector<float>& old_q, const std::vector<float>& old_k,
                                        const std::vector<float>& old_v) {
  const std::int64_t N = c.N, L = c.L, C = c.C, H = c.heads, d = C / H;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d)), u = kU, D = softmax_depth(L);
  const double Ld = static_cast<double>(L), dd = static_cast<double>(d);
  const std::size_t nx = static_cast<std::size_t>(N * L * C), LL = static_cast<std::size_t>(L * L);
  AttentionBounds b{std::vector<double>(nx), std::vector<double>(P.size()), std::vector<double>(nx),
                    std::vector<double>(nx), std::vector<double>(nx)};
  std::vector<double> S(LL), eP(LL), dP(LL), edP(LL), dS(LL), edS(LL), r(static_cast<std::size_t>(L)),
      er(static_cast<std::size_t>(L));
  auto old = [](const std::vector<float>& o, std::size_t e) { return o.empty() ? 0.0 : std::fabs(double(o[e])); };
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t h = 0; h < H; ++h) {
      auto at = [&](std::int64_t tok, std::int64_t ch) { return static_cast<std::size_t>((n * L + tok) * C + h * d + ch); };
      const double* p = P.data() + (n * H + h) * L * L;
      double* bp = b.P.data() + (n * H + h) * L * L;
      // S = scale Q K^T: (d + 3) u scale sum|q||k| (the dot product, alpha, scale's rounding).
      for (std::int64_t i = 0; i < L; ++i) {
        double E = 0, mx = -INFINITY;
        for (std::int64_t j = 0; j < L; ++j) {
          double s = 0, a = 0;
          for (std::int64_t ch = 0; ch < d; ++ch) {
            s += double(q[at(i, ch)]) * double(k[at(j, ch)]);
            a += std::fabs(double(q[at(i, ch)]) * double(k[at(j, ch)]));
          }
          S[i * L + j] = scale * s;
          E = std::max(E, (dd + 3) * u * scale * a);
          mx = std::max(mx, S[i * L + j]);
        }
        double M = 0;
        for (std::int64_t j = 0; j < L; ++j) M = std::max(M, mx - S[i * L + j]);
        // softmax(S + dS) - softmax(S) = P (dS_j - sum P dS) <= 2 P max|dS|, plus the softmax's own
        // rounding u(|x_j - m| + max|x - m| + D + 10) relative (see the softmax test).
        for (std::int64_t j = 0; j < L; ++j) {
          const std::size_t e = static_cast<std::size_t>(i * L + j);
          eP[e] = p[e] * (2 * E + u * ((mx - S[e]) + M + D + 10));
          bp[e] = eP[e];
        }
      }
      // out = P V: (L + 2) u sum P|v| + sum eP |v|.
      for (std::int64_t i = 0; i < L; ++i)
        for (std::int64_t ch = 0; ch < d; ++ch) {
          double a = 0, e = 0;
          for (std::int64_t j = 0; j < L; ++j) {
            a += p[i * L + j] * std::fabs(double(v[at(j, ch)]));
            e += eP[i * L + j] * std::fabs(double(v[at(j, ch)]));
          }
          b.out[at(i, ch)] = (Ld + 2) * u * a + e;
        }
      // dV = P^T G (+ old).
      for (std::int64_t j = 0; j < L; ++j)
        for (std::int64_t ch = 0; ch < d; ++ch) {
          double a = 0, e = 0;
          for (std::int64_t i = 0; i < L; ++i) {
            a += p[i * L + j] * std::fabs(double(g[at(i, ch)]));
            e += eP[i * L + j] * std::fabs(double(g[at(i, ch)]));
          }
          b.dv[at(j, ch)] = (Ld + 3) * u * (a + old(old_v, at(j, ch))) + e;
        }
      // dP = G V^T; r = sum_j P dP; dS = P (dP - r), the softmax backward's rounding
      // u((D + 1) sum|P dP| + 2|dP - r|) relative to P.
      for (std::int64_t i = 0; i < L; ++i) {
        double ri = 0, eri = 0, s1 = 0;
        for (std::int64_t j = 0; j < L; ++j) {
          double s = 0, a = 0;
          for (std::int64_t ch = 0; ch < d; ++ch) {
            s += double(g[at(i, ch)]) * double(v[at(j, ch)]);
            a += std::fabs(double(g[at(i, ch)]) * double(v[at(j, ch)]));
          }
          const std::size_t e = static_cast<std::size_t>(i * L + j);
          dP[e] = s;
          edP[e] = (dd + 2) * u * a;
          ri += p[e] * s;
          s1 += p[e] * std::fabs(s);
          eri += eP[e] * std::fabs(s) + p[e] * edP[e];
        }
        for (std::int64_t j = 0; j < L; ++j) {
          const std::size_t e = static_cast<std::size_t>(i * L + j);
          const double t = std::fabs(dP[e] - ri);
          dS[e] = p[e] * (dP[e] - ri);
          edS[e] = eP[e] * t + p[e] * (edP[e] + eri) + p[e] * u * ((D + 1) * s1 + 2 * t);
        }
      }
      // dQ = scale dS K, dK = scale dS^T Q (+ old): (L + 3) u (the product, alpha, scale's rounding).
      for (std::int64_t i = 0; i < L; ++i)
        for (std::int64_t ch = 0; ch < d; ++ch) {
          double aq = 0, eq = 0, ak = 0, ek = 0;
          for (std::int64_t j = 0; j < L; ++j) {
            aq += std::fabs(dS[i * L + j] * double(k[at(j, ch)]));
            eq += edS[i * L + j] * std::fabs(double(k[at(j, ch)]));
            ak += std::fabs(dS[j * L + i] * double(q[at(j, ch)]));  // row i of dS^T is column i of dS
            ek += edS[j * L + i] * std::fabs(double(q[at(j, ch)]));
          }
          b.dq[at(i, ch)] = (Ld + 3) * u * (scale * aq + old(old_q, at(i, ch))) + scale * eq;
          b.dk[at(i, ch)] = (Ld + 3) * u * (scale * ak + old(old_k, at(i, ch))) + scale * ek;
        }
    }
  return b;
}

// Counts elements outside kMargin * bound (NaN included); reports the worst error / bound.
inline std::size_t count_bad(const char* what, const std::vector<float>& got, const std::vector<double>& ref,
                             const std::vector<double>& bound, const std::vector<float>& old = {}) {
  std::size_t bad = 0;
  double worst = 0;
  for (std::size_t e = 0; e < got.size(); ++e) {
    const double want = ref[e] + (old.empty() ? 0.0 : double(old[e]));
    const double err = std::fabs(double(got[e]) - want), tol = kMargin * bound[e] + FLT_MIN;
    if (!(err <= tol)) ++bad;
    worst = std::max(worst, err / tol);
  }
  UNSCOPED_INFO(what << ": worst |error| / tolerance " << worst << ", " << bad << " of " << got.size() << " outside");
  return bad;
}

}  // namespace attn_test
}  // namespace

// ================================================================ GEMM

TEST_CASE("kernel attention: gemm (row-major) matches a double loop in all transpose cases") {
  using namespace attn_test;
  const std::uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  diffuse::cuda::Blas blas;
  CHECK(blas.math_mode() == diffuse::cuda::MathMode::FP32);
  struct Dims {
    std::int64_t m, n, k;
  };
  struct AB {
    float alpha, beta;
  };
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (Dims s : {Dims{1, 1, 1}, Dims{17, 33, 257}, Dims{257, 17, 33}, Dims{33, 257, 1}, Dims{1, 257, 17},
                     Dims{17, 1, 33}, Dims{5, 3, 0}})
        for (AB ab : {AB{1.5f, 0.0f}, AB{-0.75f, 1.0f}, AB{1.0f, -0.5f}})
          check_gemm(blas, gen, ta, tb, s.m, s.n, s.k, ab.alpha, ab.beta, 0, false);
}

TEST_CASE("kernel attention: gemm_strided_batched matches a double loop, with gaps and a shared B") {
  using namespace attn_test;
  const std::uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  diffuse::cuda::Blas blas;
  struct Dims {
    std::int64_t m, n, k, batch;
  };
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (Dims s : {Dims{17, 33, 257, 3}, Dims{33, 1, 17, 2}, Dims{1, 17, 33, 4}, Dims{257, 33, 17, 1}}) {
        check_gemm(blas, gen, ta, tb, s.m, s.n, s.k, 1.25f, 0.0f, s.batch, false);
        check_gemm(blas, gen, ta, tb, s.m, s.n, s.k, -0.5f, 0.75f, s.batch, true);
      }
}

TEST_CASE("kernel attention: gemm in TF32 mode stays within the TF32 bound, and back in FP32") {
  using namespace attn_test;
  const std::uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  diffuse::cuda::Blas blas;
  blas.set_math_mode(diffuse::cuda::MathMode::TF32);
  CHECK(blas.math_mode() == diffuse::cuda::MathMode::TF32);
  // Inputs rounded (or truncated) to TF32's 10-bit mantissa: each product off by up to 2 * 2^-10.
  check_gemm(blas, gen, false, true, 65, 70, 257, 1.0f, 0.5f, 0, false, std::ldexp(1.0, -9));
  check_gemm(blas, gen, true, false, 33, 17, 129, 1.0f, 0.0f, 3, false, std::ldexp(1.0, -9));
  blas.set_math_mode(diffuse::cuda::MathMode::FP32);
  check_gemm(blas, gen, false, true, 65, 70, 257, 1.0f, 0.5f, 0, false);
  // A moved-to Blas works (the handle moved with it).
  diffuse::cuda::Blas moved(std::move(blas));
  check_gemm(moved, gen, false, false, 9, 10, 11, 1.0f, 0.0f, 0, false);
}

TEST_CASE("kernel attention: gemm in BF16 mode rounds the operands to bf16 and stays within the bf16 bound") {
  using namespace attn_test;
  const std::uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  diffuse::cuda::Blas blas;
  blas.set_math_mode(diffuse::cuda::MathMode::BF16);
  CHECK(blas.math_mode() == diffuse::cuda::MathMode::BF16);
  // bf16 keeps 8 significant bits: rounding to nearest moves an operand by up to 2^-8 of itself,
  // truncation (cuBLAS does not say which its tensor cores do) by up to 2^-7, so a product is off
  // by up to (1 + 2^-7)^2 - 1 = 2^-6 + 2^-14 of itself; the float accumulation adds (k + 3) u.
  const double bf16_rel = std::ldexp(1.0, -6) + std::ldexp(1.0, -14);
  check_gemm(blas, gen, false, true, 65, 70, 257, 1.0f, 0.5f, 0, false, bf16_rel);
  check_gemm(blas, gen, true, false, 33, 17, 129, 1.0f, 0.0f, 0, false, bf16_rel);
  check_gemm(blas, gen, true, true, 17, 33, 65, -0.75f, 1.0f, 3, false, bf16_rel);
  check_gemm(blas, gen, false, false, 33, 17, 129, 1.25f, 0.0f, 2, true, bf16_rel);
  // And the rounding happens: 1 + 2^-10 is no bf16 (to nearest and truncated it is 1), so the
  // products below are 1 and 3 in bf16 where FP32 gives 1 + 2^-10 and 3 (1 + 2^-10) exactly.
  const std::vector<float> A{1.0f + std::ldexp(1.0f, -10), 3.0f}, B{1.0f, 1.0f + std::ldexp(1.0f, -10)};
  DeviceBuffer<float> dA(A), dB(B), dC(2), dC2(std::vector<float>(2, 0.0f));
  diffuse::cuda::gemm(blas, false, false, 2, 1, 1, 1.0f, dA.get(), 1, dB.get(), 1, 0.0f, dC.get(), 1);  // A [2,1] B[0]
  diffuse::cuda::gemm_strided_batched(blas, false, false, 1, 1, 1, 1.0f, dA.get(), 1, dB.get(), 1, 0.0f, dC2.get(), 1,
                                      2, 1, 1, 1);  // A[b] * B[b]
  const std::vector<float> c = dC.to_host(), c2 = dC2.to_host();
  CHECK(c[0] == 1.0f);
  CHECK(c[1] == 3.0f);
  CHECK(c2[0] == 1.0f);
  CHECK(c2[1] == 3.0f);
  blas.set_math_mode(diffuse::cuda::MathMode::FP32);
  diffuse::cuda::gemm(blas, false, false, 2, 1, 1, 1.0f, dA.get(), 1, dB.get(), 1, 0.0f, dC.get(), 1);
  CHECK(dC.to_host()[0] == 1.0f + std::ldexp(1.0f, -10));
  check_gemm(blas, gen, false, true, 65, 70, 257, 1.0f, 0.5f, 0, false);
}

TEST_CASE("kernel attention: gemm rejects bad arguments with std::invalid_argument") {
  using diffuse::cuda::gemm;
  using diffuse::cuda::gemm_strided_batched;
  diffuse::cuda::Blas blas;
  diffuse::testing::DeviceBuffer<float> buf(64);
  float* p = buf.get();
  CHECK_THROWS_AS(gemm(blas, false, false, -1, 2, 2, 1.0f, p, 2, p, 2, 0.0f, p, 2), std::invalid_argument);
  CHECK_THROWS_AS(gemm(blas, false, false, 2, 3, 4, 1.0f, p, 3, p, 3, 0.0f, p, 3), std::invalid_argument);  // lda < k
  CHECK_THROWS_AS(gemm(blas, true, false, 2, 3, 4, 1.0f, p, 1, p, 3, 0.0f, p, 3), std::invalid_argument);   // lda < m
  CHECK_THROWS_AS(gemm(blas, false, true, 2, 3, 4, 1.0f, p, 4, p, 3, 0.0f, p, 3), std::invalid_argument);   // ldb < k
  CHECK_THROWS_AS(gemm(blas, false, false, 2, 3, 4, 1.0f, p, 4, p, 3, 0.0f, p, 2), std::invalid_argument);  // ldc < n
  CHECK_THROWS_AS(gemm(blas, false, false, 2, 3, 4, 1.0f, p, 4, p, 3, 0.0f, nullptr, 3), std::invalid_argument);
  CHECK_THROWS_AS(gemm(blas, false, false, 2, 3, 4, 1.0f, nullptr, 4, p, 3, 0.0f, p, 3), std::invalid_argument);
  const std::int64_t big = std::int64_t{INT_MAX} + 1;
  CHECK_THROWS_AS(gemm(blas, false, false, big, 1, 1, 1.0f, p, 1, p, 1, 0.0f, p, 1), std::invalid_argument);
  CHECK_THROWS_AS(gemm(blas, false, false, 1, 1, 1, 1.0f, p, big, p, 1, 0.0f, p, 1), std::invalid_argument);
  CHECK_THROWS_AS(gemm_strided_batched(blas, false, false, 2, 2, 2, 1.0f, p, 2, p, 2, 0.0f, p, 2, 2, -4, 4, 4),
                  std::invalid_argument);
  CHECK_THROWS_AS(gemm_strided_batched(blas, false, false, 2, 2, 2, 1.0f, p, 2, p, 2, 0.0f, p, 2, 2, 4, 4, 0),
                  std::invalid_argument);
  CHECK_THROWS_AS(gemm_strided_batched(blas, false, false, 2, 2, 2, 1.0f, p, 2, p, 2, 0.0f, p, 2, big, 4, 4, 4),
                  std::invalid_argument);
  // Empty products are fine and touch nothing, null pointers included.
  CHECK_NOTHROW(gemm(blas, false, false, 0, 3, 4, 1.0f, nullptr, 4, nullptr, 3, 0.0f, nullptr, 3));
  CHECK_NOTHROW(gemm_strided_batched(blas, false, false, 2, 2, 2, 1.0f, nullptr, 2, nullptr, 2, 0.0f, nullptr, 2, 0,
                                     4, 4, 4));
}

// ================================================================ softmax

TEST_CASE("kernel attention: softmax forward matches the CPU softmax_rows, large offsets included") {
  using namespace attn_test;
  const std::uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  // Rows shifted by up to 200: without the max subtraction exp overflows (+) or underflows (-).
  const float offsets[] = {0.0f, 50.0f, -50.0f, 200.0f, -200.0f, 3.0f, -7.0f};
  struct Config {
    unsigned block, max_blocks;
    std::int64_t warp_max_cols;  // 0: always one block per row; huge: always one warp per row
  };
  for (std::int64_t L : {1, 7, 33, 256, 1024, 1025}) {
    const std::int64_t rows = L >= 1024 ? 5 : 9;
    for (Config cfg : {Config{0, 65535, diffuse::kernels::kSoftmaxWarpMaxCols}, Config{32, 2, INT64_MAX},
                       Config{64, 1, 0}, Config{1024, 3, 0}}) {
      INFO("L " << L << " rows " << rows << " block " << cfg.block << " max_blocks " << cfg.max_blocks
                << " warp_max_cols " << cfg.warp_max_cols);
      std::vector<float> x(static_cast<std::size_t>(rows * L));
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t j = 0; j < L; ++j) x[static_cast<std::size_t>(r * L + j)] = offsets[r % 7] + normal(gen);
      const std::vector<double> ref = diffuse::testing::cpu_softmax_rows(x, rows, L);
      DeviceBuffer<float> dx(x);
      diffuse::kernels::softmax_forward(dx.get(), rows, L, {}, cfg.block, cfg.max_blocks, cfg.warp_max_cols);
      const std::vector<float> p = dx.to_host();
      // Relative error of p_j: u|x_j - m| (the subtraction) + 4u (expf) + the sum's D u plus its
      // terms' worst error + 2u (1/s and the product). FLT_MIN: a floor for denormal results.
      std::size_t bad = 0;
      double worst = 0;
      for (std::int64_t r = 0; r < rows; ++r) {
        const float* xr = x.data() + r * L;
        const double m = *std::max_element(xr, xr + L), M = m - *std::min_element(xr, xr + L);
        for (std::int64_t j = 0; j < L; ++j) {
          const std::size_t e = static_cast<std::size_t>(r * L + j);
          const double tol = kMargin * ref[e] * kU * ((m - xr[j]) + M + softmax_depth(L) + 10) + FLT_MIN;
          const double err = std::fabs(double(p[e]) - ref[e]);
          if (!(err <= tol)) ++bad;
          worst = std::max(worst, err / tol);
        }
      }
      INFO("worst |error| / tolerance " << worst);
      CHECK(bad == 0);
    }
  }
}

TEST_CASE("kernel attention: softmax backward matches the CPU attention_backward's dS step") {
  using namespace attn_test;
  const std::uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const float offsets[] = {0.0f, 50.0f, -50.0f, 3.0f, -200.0f};  // dP offsets: the row sum cancels them
  struct Config {
    unsigned block, max_blocks;
    std::int64_t warp_max_cols;
  };
  for (std::int64_t L : {1, 7, 33, 256, 1024, 1025}) {
    const std::int64_t rows = L >= 1024 ? 5 : 9;
    for (Config cfg : {Config{0, 65535, diffuse::kernels::kSoftmaxWarpMaxCols}, Config{32, 2, INT64_MAX},
                       Config{64, 1, 0}, Config{1024, 3, 0}}) {
      INFO("L " << L << " rows " << rows << " block " << cfg.block << " max_blocks " << cfg.max_blocks
                << " warp_max_cols " << cfg.warp_max_cols);
      // P: a softmax of random scores, rounded to float; dP: an offset plus noise per row.
      std::vector<float> x(static_cast<std::size_t>(rows * L)), dP(x.size());
      for (float& s : x) s = 3.0f * normal(gen);
      const std::vector<double> pd = diffuse::testing::cpu_softmax_rows(x, rows, L);
      const std::vector<float> P(pd.begin(), pd.end());
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t j = 0; j < L; ++j) dP[static_cast<std::size_t>(r * L + j)] = offsets[r % 5] + normal(gen);
      const std::vector<double> ref = diffuse::testing::cpu_softmax_backward_rows(P, dP, rows, L);
      DeviceBuffer<float> dp(P), dd(dP);
      diffuse::kernels::softmax_backward(dp.get(), dd.get(), rows, L, {}, cfg.block, cfg.max_blocks, cfg.warp_max_cols);
      const std::vector<float> ds = dd.to_host();
      CHECK(dp.to_host() == P);  // P is only read
      // dS_j = P_j (dP_j - r): r's sum off by (D + 1) u sum|P dP|; the difference and the
      // product u|dP_j - r| each.
      std::size_t bad = 0;
      double worst = 0;
      for (std::int64_t r = 0; r < rows; ++r) {
        double rr = 0, s1 = 0;
        for (std::int64_t j = 0; j < L; ++j) {
          const std::size_t e = static_cast<std::size_t>(r * L + j);
          rr += double(P[e]) * double(dP[e]);
          s1 += std::fabs(double(P[e]) * double(dP[e]));
        }
        for (std::int64_t j = 0; j < L; ++j) {
          const std::size_t e = static_cast<std::size_t>(r * L + j);
          const double tol =
              kMargin * double(P[e]) * kU * ((softmax_depth(L) + 1) * s1 + 2 * std::fabs(double(dP[e]) - rr)) + FLT_MIN;
          const double err = std::fabs(double(ds[e]) - ref[e]);
          if (!(err <= tol)) ++bad;
          worst = std::max(worst, err / tol);
        }
      }
      INFO("worst |error| / tolerance " << worst);
      CHECK(bad == 0);
    }
  }
}

TEST_CASE("kernel attention: softmax launchers reject bad arguments and skip empty work") {
  diffuse::testing::DeviceBuffer<float> x(8), p(8);
  CHECK_THROWS_AS(diffuse::kernels::softmax_forward(x.get(), -1, 4), std::invalid_argument);
  CHECK_THROWS_AS(diffuse::kernels::softmax_forward(x.get(), 2, 4, {}, 48), std::invalid_argument);
  CHECK_THROWS_AS(diffuse::kernels::softmax_forward(x.get(), 2, 4, {}, 2048), std::invalid_argument);
  CHECK_THROWS_AS(diffuse::kernels::softmax_forward(x.get(), 2, 4, {}, 0, 0), std::invalid_argument);
  CHECK_THROWS_AS(diffuse::kernels::softmax_backward<float>(p.get(), nullptr, 2, 4), std::invalid_argument);
  CHECK_NOTHROW(diffuse::kernels::softmax_forward<float>(nullptr, 0, 4));
  CHECK_NOTHROW(diffuse::kernels::softmax_backward<float>(nullptr, nullptr, 3, 0));
}

// ================================================================ attention

TEST_CASE("kernel attention: attention forward and backward match diffuse::attention with autograd") {
  using namespace attn_test;
  using Acc = diffuse::cuda::AttentionAccumulate;
  const std::uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  diffuse::cuda::Blas blas;
  TestStream stream;
  // N >= heads batches each head over the images, N < heads each image over its heads.
  for (AttentionCase c : {AttentionCase{1, 1, 8, 1}, AttentionCase{2, 1, 16, 4}, AttentionCase{3, 5, 8, 2},
                          AttentionCase{1, 5, 12, 4}, AttentionCase{2, 64, 32, 1}, AttentionCase{1, 64, 64, 4},
                          AttentionCase{3, 64, 16, 2}, AttentionCase{2, 256, 64, 2}, AttentionCase{1, 256, 32, 4}}) {
    const std::int64_t N = c.N, L = c.L, C = c.C, H = c.heads;
    INFO("N " << N << " L " << L << " C " << C << " heads " << H);
    const std::size_t nx = static_cast<std::size_t>(N * L * C);
    std::vector<float> q(nx), k(nx), v(nx), g(nx);
    for (float& x : q) x = 2.0f * normal(gen);  // sharper attention than unit scores
    for (float& x : k) x = normal(gen);
    for (float& x : v) x = normal(gen);
    for (float& x : g) x = normal(gen);
    const diffuse::testing::AttentionRef ref = diffuse::testing::cpu_attention(q, k, v, g, N, L, C, H);
    const std::size_t np = diffuse::cuda::attention_probs_elements(N, L, H);
    REQUIRE(ref.P.size() == np);

    DeviceBuffer<float> dq_in(q), dk_in(k), dv_in(v), dg(g), dout(nx), dP(np);
    DeviceBuffer<char> ws(diffuse::cuda::attention_workspace_bytes(N, L, H));
    const auto before = blas.stream();
    stream.ready();
    diffuse::cuda::attention_forward(blas, dq_in.get(), dk_in.get(), dv_in.get(), dout.get(), dP.get(), N, L, C, H,
                                     stream.s);
    CHECK(blas.stream() == before);  // the Blas is back on its own stream
    const std::vector<float> out = dout.to_host(), P = dP.to_host();

    // All three gradients written (their buffers start as NaN).
    DeviceBuffer<float> gq(nx), gk(nx), gv(nx);
    stream.ready();
    diffuse::cuda::attention_backward(blas, dq_in.get(), dk_in.get(), dv_in.get(), dP.get(), dg.get(), gq.get(),
                                      gk.get(), gv.get(), ws.get(), N, L, C, H, stream.s);
    const AttentionBounds bw = attention_bounds(c, q, k, v, g, ref.P, {}, {}, {});
    CHECK(count_bad("out", out, ref.out, bw.out) == 0);
    CHECK(count_bad("P", P, ref.P, bw.P) == 0);
    CHECK(count_bad("dq", gq.to_host(), ref.dq, bw.dq) == 0);
    CHECK(count_bad("dk", gk.to_host(), ref.dk, bw.dk) == 0);
    CHECK(count_bad("dv", gv.to_host(), ref.dv, bw.dv) == 0);
    CHECK(dP.to_host() == P);  // the backward leaves P as it was

    if (L <= 64) {
      // dq and dv added to what they hold, dk written.
      std::vector<float> oq(nx), ov(nx);
      for (float& x : oq) x = normal(gen);
      for (float& x : ov) x = normal(gen);
      DeviceBuffer<float> aq(oq), ak(nx), av(ov);
      stream.ready();
      diffuse::cuda::attention_backward(blas, dq_in.get(), dk_in.get(), dv_in.get(), dP.get(), dg.get(), aq.get(),
                                        ak.get(), av.get(), ws.get(), N, L, C, H, stream.s,
                                        Acc{.dq = true, .dk = false, .dv = true});
      const AttentionBounds ba = attention_bounds(c, q, k, v, g, ref.P, oq, {}, ov);
      CHECK(count_bad("dq accumulated", aq.to_host(), ref.dq, ba.dq, oq) == 0);
      CHECK(count_bad("dk written", ak.to_host(), ref.dk, ba.dk) == 0);
      CHECK(count_bad("dv accumulated", av.to_host(), ref.dv, ba.dv, ov) == 0);
      // dv alone needs no workspace; dq alone skips dk and dv.
      DeviceBuffer<float> only_v(nx), only_q(nx);
      stream.ready();
      diffuse::cuda::attention_backward(blas, dq_in.get(), dk_in.get(), dv_in.get(), dP.get(), dg.get(), nullptr,
                                        nullptr, only_v.get(), nullptr, N, L, C, H, stream.s);
      diffuse::cuda::attention_backward(blas, dq_in.get(), dk_in.get(), dv_in.get(), dP.get(), dg.get(), only_q.get(),
                                        nullptr, nullptr, ws.get(), N, L, C, H, stream.s);
      CHECK(count_bad("dv alone", only_v.to_host(), ref.dv, bw.dv) == 0);
      CHECK(count_bad("dq alone", only_q.to_host(), ref.dq, bw.dq) == 0);
    }
  }
}

TEST_CASE("kernel attention: attention edge cases and argument checks") {
  using namespace attn_test;
  diffuse::cuda::Blas blas;
  // C = 0: no channels, scores all 0, P uniform (as the CPU op); nothing else to write.
  {
    const std::int64_t N = 2, L = 3;
    DeviceBuffer<float> empty(0), P(static_cast<std::size_t>(N * L * L));
    diffuse::cuda::attention_forward(blas, empty.get(), empty.get(), empty.get(), empty.get(), P.get(), N, L, 0, 1);
    const std::vector<float> p = P.to_host();
    for (float x : p) CHECK(std::fabs(x - 1.0f / 3.0f) <= 2 * FLT_EPSILON / 3);
  }
  DeviceBuffer<float> x(64), P(64), ws(64);
  float* a = x.get();
  CHECK_THROWS_AS(diffuse::cuda::attention_forward(blas, a, a, a, a, P.get(), 1, 2, 6, 4), std::invalid_argument);
  CHECK_THROWS_AS(diffuse::cuda::attention_forward(blas, a, a, a, a, P.get(), 1, 2, 4, 0), std::invalid_argument);
  CHECK_THROWS_AS(diffuse::cuda::attention_forward(blas, a, a, a, a, nullptr, 1, 2, 4, 1), std::invalid_argument);
  CHECK_THROWS_AS(diffuse::cuda::attention_backward(blas, a, a, a, P.get(), a, a, nullptr, nullptr, nullptr, 1, 2, 4, 1),
                  std::invalid_argument);  // dq needs the workspace
  CHECK_THROWS_AS(diffuse::cuda::attention_backward(blas, a, a, a, nullptr, a, nullptr, nullptr, a, nullptr, 1, 2, 4, 1),
                  std::invalid_argument);
  CHECK_NOTHROW(diffuse::cuda::attention_forward(blas, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 5, 4, 2));
  CHECK(diffuse::cuda::attention_workspace_bytes(2, 3, 4) == 2 * 4 * 3 * 3 * sizeof(float));
}

// ================================================================ fused (flash) attention

// The fused kernels against the same double references. Their roundings differ from the
// full-matrix path's in three places: the online softmax multiplies the accumulators and the
// row sum by exp(m_old - m_new) once per 16-key tile (ceil(L/16) more roundings of 4u each on
// out's terms), P is recomputed in the backward as exp(s - lse) (lse's error, below, enters P
// relatively), and the products run in another order (covered by the any-order dot bounds).
// Each extra term is at most as large as the full-matrix bound's terms it sits beside (L >= 16
// tiles' worth of u, and lse's error is at most the score error E plus (L + 4 ceil(L/16) + 8) u),
// so kFlashFactor = 4 times attention_bounds covers them. Observed (emulation, 3 seeds): the worst
// error is about 1% of this tolerance.
TEST_CASE("kernel attention: flash attention forward and backward match diffuse::attention with autograd") {
  using namespace attn_test;
  constexpr double kFlashFactor = 4.0;
  const std::uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  // Tiles of 16 rows with and without remainders, several heads, and d = 256 (the DDPM U-Net's).
  for (AttentionCase c : {AttentionCase{1, 1, 8, 1}, AttentionCase{2, 5, 12, 3}, AttentionCase{1, 16, 32, 2},
                          AttentionCase{2, 37, 24, 2}, AttentionCase{1, 20, 256, 1}, AttentionCase{3, 17, 48, 4}}) {
    const std::int64_t N = c.N, L = c.L, C = c.C, H = c.heads, d = C / H;
    INFO("N " << N << " L " << L << " C " << C << " heads " << H);
    const std::size_t nx = static_cast<std::size_t>(N * L * C);
    std::vector<float> q(nx), k(nx), v(nx), g(nx);
    for (float& x : q) x = 2.0f * normal(gen);
    for (float& x : k) x = normal(gen);
    for (float& x : v) x = normal(gen);
    for (float& x : g) x = normal(gen);
    const diffuse::testing::AttentionRef ref = diffuse::testing::cpu_attention(q, k, v, g, N, L, C, H);
    AttentionBounds b = attention_bounds(c, q, k, v, g, ref.P, {}, {}, {});
    for (auto* vec : {&b.out, &b.dq, &b.dk, &b.dv})
      for (double& x : *vec) x *= kFlashFactor;

    const std::size_t rows = static_cast<std::size_t>(diffuse::kernels::flash_attention_rows(N, L, H));
    DeviceBuffer<float> dq_in(q), dk_in(k), dv_in(v), dg(g), dout(nx), dlse(rows), delta(rows);
    TestStream stream;
    stream.ready();
    diffuse::kernels::flash_attention_forward(dq_in.get(), dk_in.get(), dv_in.get(), dout.get(), dlse.get(), N, L, C, H,
                                              stream.s);
    stream.ready();
    CHECK(count_bad("flash out", dout.to_host(), ref.out, b.out) == 0);

    // lse against log sum_j exp(s_ij) in double, within the score error plus the sum's roundings.
    const std::vector<float> lse = dlse.to_host();
    const double scale = 1.0 / std::sqrt(static_cast<double>(d)), u = kU;
    std::size_t bad_lse = 0;
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t i = 0; i < L; ++i) {
          std::vector<double> sc(static_cast<std::size_t>(L));
          double mx = -INFINITY, E = 0;
          for (std::int64_t j = 0; j < L; ++j) {
            double s = 0, a = 0;
            for (std::int64_t ch = 0; ch < d; ++ch) {
              const double x = q[static_cast<std::size_t>((n * L + i) * C + h * d + ch)],
                           y = k[static_cast<std::size_t>((n * L + j) * C + h * d + ch)];
              s += x * y;
              a += std::fabs(x * y);
            }
            sc[static_cast<std::size_t>(j)] = scale * s;
            mx = std::max(mx, scale * s);
            E = std::max(E, (static_cast<double>(d) + 3) * u * scale * a);
          }
          double sum = 0;
          for (double s : sc) sum += std::exp(s - mx);
          const double want = mx + std::log(sum);
          const double tol =
              kMargin * (E + u * (std::fabs(mx) + std::log(sum) + static_cast<double>(L + 4 * ((L + 15) / 16) + 8)));
          if (!(std::fabs(double(lse[static_cast<std::size_t>((n * H + h) * L + i)]) - want) <= tol)) ++bad_lse;
        }
    CHECK(bad_lse == 0);

    // All three gradients written (their buffers start as NaN), then added to.
    DeviceBuffer<float> gq(nx), gk(nx), gv(nx);
    stream.ready();
    diffuse::kernels::flash_attention_backward(dq_in.get(), dk_in.get(), dv_in.get(), dout.get(), dlse.get(), dg.get(),
                                               gq.get(), gk.get(), gv.get(), delta.get(), N, L, C, H, stream.s);
    stream.ready();
    CHECK(count_bad("flash dq", gq.to_host(), ref.dq, b.dq) == 0);
    CHECK(count_bad("flash dk", gk.to_host(), ref.dk, b.dk) == 0);
    CHECK(count_bad("flash dv", gv.to_host(), ref.dv, b.dv) == 0);
    std::vector<float> oq(nx), ok(nx);
    for (float& x : oq) x = normal(gen);
    for (float& x : ok) x = normal(gen);
    AttentionBounds ba = attention_bounds(c, q, k, v, g, ref.P, oq, ok, {});
    for (auto* vec : {&ba.dq, &ba.dk}) for (double& x : *vec) x *= kFlashFactor;
    DeviceBuffer<float> aq(oq), ak(ok);
    stream.ready();
    diffuse::kernels::flash_attention_backward(dq_in.get(), dk_in.get(), dv_in.get(), dout.get(), dlse.get(), dg.get(),
                                               aq.get(), ak.get(), nullptr, delta.get(), N, L, C, H, stream.s,
                                               /*add_dq=*/true, /*add_dk=*/true);
    stream.ready();
    CHECK(count_bad("flash dq accumulated", aq.to_host(), ref.dq, ba.dq, oq) == 0);
    CHECK(count_bad("flash dk accumulated", ak.to_host(), ref.dk, ba.dk, ok) == 0);
  }
}

// The bf16 launch (attention_block under BF16) on q, k, v packed in one [N, L, 3C] tensor (rows
// 3C apart) against the float launch above on separate [N, L, C] tensors holding the same values
// widened: the kernels load bf16 exactly and compute in float in the same order, so out, lse and
// every gradient must be the float launch's values rounded once, bit for bit (lse and the float
// copy of out equal; the backward reads that float out, as the float launch reads its own). The
// gradient buffer starts as NaN: every one of its 3C channels must be written.
TEST_CASE("kernel attention: flash attention in bf16 on packed q, k, v is the float launch on the widened values") {
  using namespace attn_test;
  using diffuse::bf16;
  const std::uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (AttentionCase c : {AttentionCase{1, 1, 8, 1}, AttentionCase{2, 37, 24, 2}, AttentionCase{1, 20, 256, 1},
                          AttentionCase{3, 17, 48, 4}}) {
    const std::int64_t N = c.N, L = c.L, C = c.C, H = c.heads;
    INFO("N " << N << " L " << L << " C " << C << " heads " << H);
    const std::size_t nx = static_cast<std::size_t>(N * L * C), rows = static_cast<std::size_t>(N * L);
    const std::size_t C3 = static_cast<std::size_t>(3 * C), Cs = static_cast<std::size_t>(C);
    // Packed bf16 values, and the same values widened into three separate float tensors.
    std::vector<bf16> qkv16(3 * nx), g16(nx);
    std::vector<float> part[3] = {std::vector<float>(nx), std::vector<float>(nx), std::vector<float>(nx)}, g(nx);
    for (std::size_t r = 0; r < rows; ++r)
      for (std::size_t j = 0; j < C3; ++j) {
        const bf16 b(normal(gen) * (j < Cs ? 2.0f : 1.0f));
        qkv16[r * C3 + j] = b;
        part[j / Cs][r * Cs + j % Cs] = static_cast<float>(b);
      }
    for (std::size_t i = 0; i < nx; ++i) {
      g16[i] = bf16(normal(gen));
      g[i] = static_cast<float>(g16[i]);
    }
    const std::size_t nrows = static_cast<std::size_t>(diffuse::kernels::flash_attention_rows(N, L, H));
    DeviceBuffer<float> dq(part[0]), dk(part[1]), dv(part[2]), out(nx), lse(nrows), delta(nrows);
    DeviceBuffer<bf16> dqkv16(qkv16), out16(nx), dg16(g16);
    DeviceBuffer<float> lse16(nrows), out32(nx);
    TestStream stream;
    stream.ready();
    diffuse::kernels::flash_attention_forward(dq.get(), dk.get(), dv.get(), out.get(), lse.get(), N, L, C, H, stream.s);
    const bf16* p16 = dqkv16.get();
    diffuse::kernels::flash_attention_forward(p16, p16 + C, p16 + 2 * C, out16.get(), lse16.get(), N, L, C, H,
                                              stream.s, 3 * C, out32.get());
    stream.ready();
    const std::vector<float> o = out.to_host(), l = lse.to_host(), l16 = lse16.to_host(), o32 = out32.to_host();
    const std::vector<bf16> o16 = out16.to_host();
    std::size_t bad = 0;
    for (std::size_t i = 0; i < nx; ++i) bad += o16[i].bits != bf16(o[i]).bits || !(o32[i] == o[i]);
    for (std::size_t i = 0; i < nrows; ++i) bad += !(l16[i] == l[i]);
    CHECK(bad == 0);

    // The backward: each launch reads the float output.
    DeviceBuffer<float> dg(g), gq(nx), gk(nx), gv(nx);
    DeviceBuffer<bf16> gqkv16(3 * nx);
    stream.ready();
    diffuse::kernels::flash_attention_backward(dq.get(), dk.get(), dv.get(), out.get(), lse.get(), dg.get(), gq.get(),
                                               gk.get(), gv.get(), delta.get(), N, L, C, H, stream.s);
    bf16* d16 = gqkv16.get();
    const float* o32p = out32.get();
    diffuse::kernels::flash_attention_backward(p16, p16 + C, p16 + 2 * C, o32p, lse16.get(), dg16.get(), d16, d16 + C,
                                               d16 + 2 * C, delta.get(), N, L, C, H, stream.s, false, false, false,
                                               3 * C);
    stream.ready();
    const std::vector<float> want[3] = {gq.to_host(), gk.to_host(), gv.to_host()};
    const std::vector<bf16> got = gqkv16.to_host();
    std::size_t bad_grad = 0;
    for (std::size_t r = 0; r < rows; ++r)
      for (std::size_t j = 0; j < C3; ++j) bad_grad += got[r * C3 + j].bits != bf16(want[j / Cs][r * Cs + j % Cs]).bits;
    CHECK(bad_grad == 0);
  }
  // A row stride below C is refused.
  DeviceBuffer<bf16> x(64);
  DeviceBuffer<float> lse(8);
  CHECK_THROWS_AS(diffuse::kernels::flash_attention_forward(x.get(), x.get(), x.get(), x.get(), lse.get(), 1, 2, 8, 1, {},
                                                            4),
                  std::invalid_argument);
}

TEST_CASE("kernel attention: flash attention refuses head dimensions over 256 and bad shapes") {
  using namespace attn_test;
  DeviceBuffer<float> x(1024), lse(64);
  float* a = x.get();
  CHECK_THROWS_AS(diffuse::kernels::flash_attention_forward(a, a, a, a, lse.get(), 1, 1, 512, 1), std::invalid_argument);
  CHECK_THROWS_AS(diffuse::kernels::flash_attention_forward(a, a, a, a, lse.get(), 1, 2, 6, 4), std::invalid_argument);
  CHECK_THROWS_AS(diffuse::kernels::flash_attention_forward(a, a, a, a, nullptr, 1, 2, 4, 1), std::invalid_argument);
  CHECK_THROWS_AS(diffuse::kernels::flash_attention_backward(a, a, a, a, lse.get(), a, a, nullptr, nullptr, nullptr, 1,
                                                             2, 4, 1),
                  std::invalid_argument);  // the delta workspace
  CHECK_NOTHROW(diffuse::kernels::flash_attention_forward<float>(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 5, 4, 2));
}
