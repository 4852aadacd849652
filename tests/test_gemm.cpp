// detail::gemm and detail::gemm_parallel against a naive double-accumulated
// reference, on fresh random inputs, for edge and cache-block-crossing shapes,
// all transpose combinations, padded leading dimensions and alpha/beta; on
// the path gemm_path() picks (DIFFUSE_GEMM overrides it) and, in one case, on
// every path this CPU runs.
//
// test_gemm "[.gemm_bits]" prints a hash of many products' bits: the same
// hash from a build with -march=native and one without (DIFFUSE_NATIVE=ON /
// OFF) shows that both ran the same kernel.
#include <catch2/catch.hpp>

#include "skip.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <diffuse/backend/cpu/gemm.hpp>
#include <diffuse/core/rng.hpp>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

using namespace diffuse;
using diffuse::detail::gemm;
using diffuse::detail::gemm_parallel;
using diffuse::detail::GemmPath;

namespace {

struct Shape3 {
  int64_t m, n, k;
};

template <class T>
std::vector<T> random_matrix(Generator& g, int64_t rows, int64_t cols, int64_t ld) {
  // Padding beyond the row width is NaN: a GEMM that reads it poisons C.
  std::vector<T> v(static_cast<size_t>(rows * ld), std::numeric_limits<T>::quiet_NaN());
  std::vector<T> row(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    g.normal(row.data(), row.size());
    std::copy(row.begin(), row.end(), v.begin() + r * ld);
  }
  return v;
}

struct Result {
  double rel_err = 0;
  bool nan = false;           // a NaN anywhere in the m x n result
  bool pad_changed = false;   // C's padding beyond column n was written
  std::string what;
};

// Runs one product and compares it with the reference; pad is added to every
// leading dimension.
template <class T>
Result run_case(Generator& g, bool ta, bool tb, Shape3 s, T alpha, T beta, int64_t pad, bool parallel) {
  const auto [m, n, k] = s;
  const int64_t lda = (ta ? m : k) + pad, ldb = (tb ? k : n) + pad, ldc = n + pad;
  const std::vector<T> A = random_matrix<T>(g, ta ? k : m, ta ? m : k, lda);
  const std::vector<T> B = random_matrix<T>(g, tb ? n : k, tb ? k : n, ldb);
  std::vector<T> C = random_matrix<T>(g, m, n, ldc);
  if (beta == T(0))
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) C[i * ldc + j] = std::numeric_limits<T>::quiet_NaN();
  const std::vector<T> C0 = C;

  // Reference in double: densify op(A), op(B), then an i-p-j loop.
  std::vector<double> a(static_cast<size_t>(m * k)), b(static_cast<size_t>(k * n));
  std::vector<double> ref(static_cast<size_t>(m * n), 0.0);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t p = 0; p < k; ++p) a[i * k + p] = ta ? A[p * lda + i] : A[i * lda + p];
  for (int64_t p = 0; p < k; ++p)
    for (int64_t j = 0; j < n; ++j) b[p * n + j] = tb ? B[j * ldb + p] : B[p * ldb + j];
  for (int64_t i = 0; i < m; ++i) {
    double* r = ref.data() + i * n;
    for (int64_t p = 0; p < k; ++p) {
      const double x = a[i * k + p];
      const double* bp = b.data() + p * n;
      for (int64_t j = 0; j < n; ++j) r[j] += x * bp[j];
    }
    for (int64_t j = 0; j < n; ++j) {
      r[j] *= static_cast<double>(alpha);
      if (beta != T(0)) r[j] += static_cast<double>(beta) * static_cast<double>(C0[i * ldc + j]);
    }
  }

  if (parallel)
    gemm_parallel<T>(ta, tb, m, n, k, alpha, A.data(), lda, B.data(), ldb, beta, C.data(), ldc);
  else
    gemm<T>(ta, tb, m, n, k, alpha, A.data(), lda, B.data(), ldb, beta, C.data(), ldc);

  Result res;
  double num = 0, den = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const double c = static_cast<double>(C[i * ldc + j]), r = ref[i * n + j];
      if (std::isnan(c)) res.nan = true;
      num += (c - r) * (c - r);
      den += r * r;
    }
    for (int64_t j = n; j < ldc; ++j)
      if (!std::isnan(C[i * ldc + j]) || !std::isnan(C0[i * ldc + j]))
        if (!(C[i * ldc + j] == C0[i * ldc + j])) res.pad_changed = true;
  }
  res.rel_err = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  std::ostringstream os;
  os << (parallel ? "gemm_parallel" : "gemm") << " m=" << m << " n=" << n << " k=" << k << " ta=" << ta
     << " tb=" << tb << " alpha=" << alpha << " beta=" << beta << " pad=" << pad << " rel_err=" << res.rel_err;
  res.what = os.str();
  return res;
}

template <class T>
void check_case(Generator& g, bool ta, bool tb, Shape3 s, T alpha, T beta, int64_t pad, bool parallel, double tol) {
  const Result r = run_case<T>(g, ta, tb, s, alpha, beta, pad, parallel);
  INFO(r.what);
  CHECK_FALSE(r.nan);
  CHECK_FALSE(r.pad_changed);
  CHECK(r.rel_err < tol);
}

constexpr double kTolF = 1e-5;
constexpr double kTolD = 1e-12;

// Around the 6 x 16 micro-tile and tiny k.
const std::vector<Shape3> kSmallShapes = {
    {1, 1, 1},   {1, 1, 2},   {1, 1, 3},    {2, 3, 1},    {6, 16, 1},   {6, 16, 2},  {6, 16, 3},
    {5, 15, 4},  {7, 17, 5},  {6, 16, 8},   {12, 32, 9},  {13, 33, 16}, {11, 31, 7}, {1, 40, 17},
    {40, 1, 17}, {23, 47, 31}, {64, 64, 64}, {65, 63, 67}, {18, 48, 3},  {3, 100, 2}, {100, 3, 2}};

// Bigger than the cache blocks (kGemmKC, kGemmMC, kGemmNC) and the model's shapes.
const std::vector<Shape3> kLargeShapes = {
    {1024, 128, 128}, {128, 1024, 128}, {128, 128, 1024}, {300, 700, 500},
    {145, 33, 257},   {200, 100, 800},  {20, 3100, 20}};

}  // namespace

TEST_CASE("gemm float: small and edge shapes, all transposes, alpha, beta, padded strides", "[gemm]") {
  Generator g(101);
  for (const Shape3& s : kSmallShapes)
    for (int t = 0; t < 4; ++t)
      for (float beta : {0.0f, 1.0f, 0.5f})
        for (int64_t pad : {0, 3}) {
          const float alpha = pad ? 1.5f : 1.0f;
          check_case<float>(g, t & 1, t & 2, s, alpha, beta, pad, false, kTolF);
        }
}

TEST_CASE("gemm float: shapes larger than the cache blocks, all transposes", "[gemm]") {
  Generator g(102);
  for (const Shape3& s : kLargeShapes)
    for (int t = 0; t < 4; ++t) {
      const float beta = t == 0 ? 0.0f : t == 1 ? 1.0f : 0.5f;
      check_case<float>(g, t & 1, t & 2, s, -0.75f, beta, t == 3 ? 5 : 0, false, kTolF);
    }
}

TEST_CASE("gemm_parallel float matches the reference", "[gemm]") {
  Generator g(103);
  for (const Shape3& s : kLargeShapes)
    for (int t = 0; t < 4; ++t)
      check_case<float>(g, t & 1, t & 2, s, 1.25f, t == 2 ? 0.5f : 0.0f, t == 1 ? 7 : 0, true, kTolF);
  // Below the threading threshold, and odd shapes that split unevenly over
  // rows (301 x 40) or columns (50 x 999, 13 x 500).
  for (Shape3 s : {Shape3{7, 9, 5}, Shape3{31, 17, 250}, Shape3{250, 31, 300}, Shape3{301, 40, 200},
                   Shape3{50, 999, 100}, Shape3{13, 500, 400}})
    for (int t = 0; t < 4; ++t) check_case<float>(g, t & 1, t & 2, s, 1.0f, 1.0f, 1, true, kTolF);
}

TEST_CASE("gemm_parallel inside a parallel region runs per thread", "[gemm]") {
  std::vector<Result> results(4);
  diffuse::parallel_region(4, [&](int t, int) {
    Generator g(200 + t);
    results[t] = run_case<float>(g, t & 1, t & 2, {130, 150, 140}, 1.0f, 0.0f, 2, true);
  });
  for (const Result& r : results) {
    INFO(r.what);
    CHECK_FALSE(r.nan);
    CHECK_FALSE(r.pad_changed);
    CHECK(r.rel_err < kTolF);
  }
}

TEST_CASE("gemm double falls back to Eigen and matches the reference", "[gemm]") {
  Generator g(104);
  for (Shape3 s : {Shape3{1, 1, 1}, Shape3{7, 17, 3}, Shape3{65, 63, 67}, Shape3{300, 70, 260}})
    for (int t = 0; t < 4; ++t)
      for (double beta : {0.0, 1.0, 0.5}) {
        check_case<double>(g, t & 1, t & 2, s, 1.5, beta, t, false, kTolD);
        check_case<double>(g, t & 1, t & 2, s, -1.0, beta, 2, true, kTolD);
      }
}

TEST_CASE("gemm with k == 0 or alpha == 0 only scales C", "[gemm]") {
  for (float beta : {0.0f, 0.5f}) {
    std::vector<float> C(6, beta == 0.0f ? std::numeric_limits<float>::quiet_NaN() : 2.0f);
    const std::vector<float> A(6, std::numeric_limits<float>::quiet_NaN()), B(6, 1.0f);
    gemm<float>(false, false, 2, 3, 0, 1.0f, A.data(), 1, B.data(), 3, beta, C.data(), 3);
    for (float c : C) CHECK(c == 2.0f * beta);
    std::fill(C.begin(), C.end(), beta == 0.0f ? std::numeric_limits<float>::quiet_NaN() : 2.0f);
    gemm<float>(false, false, 2, 3, 2, 0.0f, B.data(), 2, B.data(), 3, beta, C.data(), 3);
    for (float c : C) CHECK(c == 2.0f * beta);
  }
  // m == 0 or n == 0: nothing happens (and nothing is dereferenced)
  gemm<float>(false, false, 0, 3, 2, 1.0f, nullptr, 2, nullptr, 3, 0.0f, nullptr, 3);
  gemm<float>(true, true, 3, 0, 2, 1.0f, nullptr, 3, nullptr, 2, 0.0f, nullptr, 1);
}

TEST_CASE("GemmB prepacked products equal gemm") {
  for (bool tb : {false, true})
    for (auto [m, n, k] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {7, 33, 5}, {100, 64, 577}, {37, 700, 390},
                           {13, 3100, 20}}) {
      INFO("m " << m << " n " << n << " k " << k << " trans_b " << tb);
      Generator g(static_cast<uint64_t>(m * 131 + n * 7 + k + tb));
      std::vector<float> A(static_cast<size_t>(m * k)), B(static_cast<size_t>(k * n)), C1(static_cast<size_t>(m * n)),
          C2(static_cast<size_t>(m * n));
      g.normal(A.data(), A.size());
      g.normal(B.data(), B.size());
      g.normal(C1.data(), C1.size());
      C2 = C1;
      const int64_t ldb = tb ? k : n;
      diffuse::detail::GemmB<float> pb;
      pb.pack(tb, k, n, B.data(), ldb);
      pb.multiply(m, 0.5f, A.data(), k, 0.25f, C1.data(), n);
      diffuse::detail::gemm<float>(false, tb, m, n, k, 0.5f, A.data(), k, B.data(), ldb, 0.25f, C2.data(), n);
      double worst = 0;
      for (size_t i = 0; i < C1.size(); ++i) worst = std::max(worst, std::abs(double(C1[i]) - C2[i]));
      CHECK(worst < 1e-4);
      // double goes through the Eigen fallback
      std::vector<double> Ad(A.begin(), A.end()), Bd(B.begin(), B.end()), Cd(static_cast<size_t>(m * n), 0.0);
      diffuse::detail::GemmB<double> pd;
      pd.pack(tb, k, n, Bd.data(), ldb);
      pd.multiply(m, 1.0, Ad.data(), k, 0.0, Cd.data(), n);
      double ref = 0;
      for (int64_t p = 0; p < k; ++p) ref += Ad[p] * (tb ? Bd[p] : Bd[p * n]);
      CHECK(Cd[0] == Approx(ref).epsilon(1e-12));
    }
}

namespace {

constexpr GemmPath kAllPaths[] = {GemmPath::portable, GemmPath::avx2};

// Puts back the path that was current when the test case began.
struct RestorePath {
  GemmPath saved = diffuse::detail::gemm_path();
  ~RestorePath() { diffuse::detail::set_gemm_path(saved); }
};

// C = op(A) op(B) + 0.5 C through gemm, gemm_parallel and GemmB on operands
// from seed 5, folded into one FNV-1a hash of the outputs' bits. Only the
// avx2 path's hash is the same across builds (the portable path is Eigen,
// which -march=native compiles differently).
uint64_t gemm_bits_hash() {
  uint64_t h = 1469598103934665603ull;
  auto fold = [&h](const std::vector<float>& v) {
    for (float x : v) {
      uint32_t u;
      std::memcpy(&u, &x, sizeof u);
      for (int b = 0; b < 4; ++b) h = (h ^ ((u >> (8 * b)) & 0xFF)) * 1099511628211ull;
    }
  };
  Generator g(5);
  for (Shape3 s : {Shape3{7, 17, 5}, Shape3{65, 63, 67}, Shape3{1024, 128, 128}, Shape3{128, 128, 1024},
                   Shape3{300, 700, 500}, Shape3{20, 3100, 20}})
    for (int t = 0; t < 4; ++t) {
      const bool ta = t & 1, tb = t & 2;
      const int64_t lda = ta ? s.m : s.k, ldb = tb ? s.k : s.n;
      const std::vector<float> A = random_matrix<float>(g, ta ? s.k : s.m, lda, lda);
      const std::vector<float> B = random_matrix<float>(g, tb ? s.n : s.k, ldb, ldb);
      std::vector<float> C = random_matrix<float>(g, s.m, s.n, s.n), C2 = C, C3 = C;
      gemm<float>(ta, tb, s.m, s.n, s.k, 1.0f, A.data(), lda, B.data(), ldb, 0.5f, C.data(), s.n);
      gemm_parallel<float>(ta, tb, s.m, s.n, s.k, -1.0f, A.data(), lda, B.data(), ldb, 0.5f, C2.data(), s.n);
      if (!ta) {
        diffuse::detail::GemmB<float> pb;
        pb.pack(tb, s.k, s.n, B.data(), ldb);
        pb.multiply(s.m, 1.0f, A.data(), lda, 0.5f, C3.data(), s.n);
      }
      fold(C);
      fold(C2);
      fold(C3);
    }
  return h;
}

// One GEMM path against the reference: every shape, transposition and alpha/beta of the cases.
void check_gemm_path(diffuse::detail::GemmPath path) {
  using namespace diffuse::detail;
  RestorePath restore;
  INFO("gemm_path() at start: " << gemm_path_name(restore.saved));
  {
    set_gemm_path(path);
    REQUIRE(gemm_path() == path);
    INFO("path " << gemm_path_name(path));
    Generator g(300 + static_cast<uint64_t>(path));
    for (const Shape3& s : kSmallShapes)
      for (int t = 0; t < 4; ++t)
        check_case<float>(g, t & 1, t & 2, s, t == 3 ? 1.5f : 1.0f, t == 2 ? 0.0f : 0.5f, t, false, kTolF);
    for (const Shape3& s : kLargeShapes)
      for (int t = 0; t < 4; ++t) {
        check_case<float>(g, t & 1, t & 2, s, -0.75f, t == 0 ? 0.0f : 1.0f, t == 3 ? 5 : 0, false, kTolF);
        check_case<float>(g, t & 1, t & 2, s, 1.25f, t == 2 ? 0.5f : 0.0f, t == 1 ? 7 : 0, true, kTolF);
      }
    // A GemmB multiplies on the path it was packed for, even after a switch.
    for (bool tb : {false, true}) {
      const int64_t m = 37, n = 700, k = 390, ldb = tb ? k : n;
      std::vector<float> A(static_cast<size_t>(m * k)), B(static_cast<size_t>(k * n));
      g.normal(A.data(), A.size());
      g.normal(B.data(), B.size());
      std::vector<float> C1(static_cast<size_t>(m * n)), C2(C1.size());
      GemmB<float> pb;
      pb.pack(tb, k, n, B.data(), ldb);
      for (GemmPath other : kAllPaths)
        if (other != path && gemm_path_supported(other)) set_gemm_path(other);
      pb.multiply(m, 1.0f, A.data(), k, 0.0f, C1.data(), n);
      set_gemm_path(path);
      gemm<float>(false, tb, m, n, k, 1.0f, A.data(), k, B.data(), ldb, 0.0f, C2.data(), n);
      double worst = 0, scale = 0;
      for (size_t i = 0; i < C1.size(); ++i) {
        worst = std::max(worst, std::abs(double(C1[i]) - C2[i]));
        scale = std::max(scale, std::abs(double(C2[i])));
      }
      INFO("trans_b " << tb << " worst " << worst << " of " << scale);
      CHECK(worst < 1e-5 * scale);
    }
  }
}

}  // namespace

TEST_CASE("the portable GEMM path matches the reference", "[gemm]") {
  REQUIRE(diffuse::detail::gemm_path_supported(diffuse::detail::GemmPath::portable));  // every CPU runs it
  check_gemm_path(diffuse::detail::GemmPath::portable);
}

TEST_CASE("the AVX2 GEMM path matches the reference", "[gemm]") {
  using namespace diffuse::detail;
#if defined(__AVX2__) && defined(__FMA__)
  // Compiled for AVX2 + FMA (e.g. -march=native): the CPU has both.
  CHECK(gemm_path_supported(GemmPath::avx2));
#endif
  if (!gemm_path_supported(GemmPath::avx2)) {
    DIFFUSE_SKIP_NO_HARDWARE("this CPU (or build) has no AVX2 + FMA: the avx2 GEMM path cannot run here");
  }
  check_gemm_path(GemmPath::avx2);
}

TEST_CASE("DIFFUSE_GEMM values", "[gemm]") {
  using namespace diffuse::detail;
  CHECK(gemm_path_from_string(nullptr) == gemm_best_path());
  CHECK(gemm_path_from_string("") == gemm_best_path());
  CHECK(gemm_path_from_string("auto") == gemm_best_path());
  CHECK(gemm_path_from_string("portable") == GemmPath::portable);
  if (gemm_path_supported(GemmPath::avx2))
    CHECK(gemm_path_from_string("avx2") == GemmPath::avx2);
  else
    CHECK_THROWS_WITH(gemm_path_from_string("avx2"), Catch::Contains("gemm.hpp") && Catch::Contains("cannot run"));
  CHECK_THROWS_WITH(gemm_path_from_string("avx9"), Catch::Contains("gemm.hpp") && Catch::Contains("avx9"));
  CHECK_THROWS_AS(gemm_path_from_string("AVX2"), std::runtime_error);
}

TEST_CASE("gemm bits hash, per path (compare builds with and without -march=native)", "[.gemm_bits]") {
  using namespace diffuse::detail;
  RestorePath restore;
  for (GemmPath path : kAllPaths) {
    if (!gemm_path_supported(path)) continue;
    set_gemm_path(path);
    std::ostringstream os;
    os << "gemm bits " << gemm_path_name(path) << (path == restore.saved ? " (default)" : "") << ": " << std::hex
       << gemm_bits_hash();
    WARN(os.str());
  }
  SUCCEED();
}
