// detail::gemm / gemm_parallel against Eigen's GEMM on the toy model's shapes
// (batch 1024, width 128) and on 1024^3, with 1 and 2 threads.
//   xwT   C = X W^T   1024x128x128  (forward of a linear layer)
//   gw    C = G W     1024x128x128  (input gradient)
//   gTx   C = G^T X   128x128, k = 1024 (weight gradient)
//   nn1024 C = A B    1024^3
// BM_Ours runs on detail::gemm_path(), shown as each row's label: the best
// path this CPU has in any build (-march=native or not); DIFFUSE_GEMM=portable
// (Eigen) or DIFFUSE_GEMM=avx2 forces one.
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <cstdint>
#include <diffuse/backend/cpu/gemm.hpp>
#include <diffuse/core/rng.hpp>
#include <vector>

#include <diffuse/core/parallel.hpp>

using namespace diffuse;

namespace {

struct Case {
  bool ta, tb;
  int64_t m, n, k;
};
constexpr Case kXWt{false, true, 1024, 128, 128};
constexpr Case kGW{false, false, 1024, 128, 128};
constexpr Case kGtX{true, false, 128, 128, 1024};
constexpr Case kNN1024{false, false, 1024, 1024, 1024};

struct Operands {
  std::vector<float> a, b, c;
  int64_t lda, ldb, ldc;
  explicit Operands(const Case& cs) {
    Generator g(7);
    const int64_t ar = cs.ta ? cs.k : cs.m, br = cs.tb ? cs.n : cs.k;
    lda = cs.ta ? cs.m : cs.k;
    ldb = cs.tb ? cs.k : cs.n;
    ldc = cs.n;
    a.resize(static_cast<size_t>(ar * lda));
    b.resize(static_cast<size_t>(br * ldb));
    c.assign(static_cast<size_t>(cs.m * cs.n), 0.0f);
    g.normal(a.data(), a.size());
    g.normal(b.data(), b.size());
  }
};

void set_threads(int threads) {
  diffuse::set_num_threads(threads);
  Eigen::setNbThreads(threads);
}

void report(benchmark::State& st, const Case& cs) {
  const double flops = 2.0 * static_cast<double>(cs.m) * static_cast<double>(cs.n) * static_cast<double>(cs.k);
  st.counters["GFLOP/s"] =
      benchmark::Counter(flops * static_cast<double>(st.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

void BM_Ours(benchmark::State& st, Case cs) {
  const int threads = static_cast<int>(st.range(0));
  set_threads(threads);
  Operands o(cs);
  st.SetLabel(detail::gemm_path_name(detail::gemm_path()));
  for (auto _ : st) {
    if (threads == 1)
      detail::gemm<float>(cs.ta, cs.tb, cs.m, cs.n, cs.k, 1.0f, o.a.data(), o.lda, o.b.data(), o.ldb, 0.0f,
                          o.c.data(), o.ldc);
    else
      detail::gemm_parallel<float>(cs.ta, cs.tb, cs.m, cs.n, cs.k, 1.0f, o.a.data(), o.lda, o.b.data(), o.ldb,
                                   0.0f, o.c.data(), o.ldc);
    benchmark::DoNotOptimize(o.c.data());
    benchmark::ClobberMemory();
  }
  report(st, cs);
}

void BM_Eigen(benchmark::State& st, Case cs) {
  using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const int threads = static_cast<int>(st.range(0));
  set_threads(threads);
  Operands o(cs);
  Eigen::Map<const Mat> a(o.a.data(), cs.ta ? cs.k : cs.m, o.lda), b(o.b.data(), cs.tb ? cs.n : cs.k, o.ldb);
  Eigen::Map<Mat> c(o.c.data(), cs.m, cs.n);
  for (auto _ : st) {
    if (cs.ta && cs.tb) c.noalias() = a.transpose() * b.transpose();
    else if (cs.ta) c.noalias() = a.transpose() * b;
    else if (cs.tb) c.noalias() = a * b.transpose();
    else c.noalias() = a * b;
    benchmark::DoNotOptimize(o.c.data());
    benchmark::ClobberMemory();
  }
  report(st, cs);
}

}  // namespace

#define DIFFUSE_GEMM_BENCH(name, cs)                                                              \
  BENCHMARK_CAPTURE(BM_Ours, name, cs)->ArgName("threads")->Arg(1)->Arg(2)->UseRealTime();  \
  BENCHMARK_CAPTURE(BM_Eigen, name, cs)->ArgName("threads")->Arg(1)->Arg(2)->UseRealTime()

DIFFUSE_GEMM_BENCH(xwT_1024x128x128, kXWt);
DIFFUSE_GEMM_BENCH(gw_1024x128x128, kGW);
DIFFUSE_GEMM_BENCH(gTx_128x128x1024, kGtX);
DIFFUSE_GEMM_BENCH(nn_1024x1024x1024, kNN1024);

BENCHMARK_MAIN();
