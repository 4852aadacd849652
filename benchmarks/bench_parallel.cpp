// The cost of one parallel region of the CPU thread pool (include/diffuse/core/parallel.hpp),
// beside libgomp's `#pragma omp parallel` when the compiler has OpenMP: an empty region, and a
// region after a serial gap of G microseconds (the gap decides whether the workers are still
// spinning or have gone to sleep: the pool spins 50 us, libgomp milliseconds).
//   bench_parallel --benchmark_filter=Pool      the pool only
// Run on an otherwise idle machine; the threads are num_threads() (DIFFUSE_NUM_THREADS).
#include <benchmark/benchmark.h>

#include <atomic>
#include <chrono>
#include <diffuse/core/parallel.hpp>
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {
std::atomic<int64_t> sink{0};

// Busy serial work of about `us` microseconds on the calling thread (what a step does between
// regions: a small op, the optimiser's bookkeeping).
void serial_gap(int64_t us) {
  if (us <= 0) return;
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
  while (std::chrono::steady_clock::now() < until) {
  }
}
}  // namespace

static void BM_Pool_Region(benchmark::State& st) {
  const int team = diffuse::num_threads();
  for (auto _ : st) {
    serial_gap(st.range(0));
    diffuse::parallel_region(team, [](int t, int) { sink.fetch_add(t, std::memory_order_relaxed); });
  }
  st.counters["threads"] = team;
}
BENCHMARK(BM_Pool_Region)->Arg(0)->Arg(20)->Arg(100)->Arg(1000)->UseRealTime();

#if defined(_OPENMP)
static void BM_OpenMP_Region(benchmark::State& st) {
  const int team = diffuse::num_threads();
  for (auto _ : st) {
    serial_gap(st.range(0));
#pragma omp parallel num_threads(team)
    sink.fetch_add(omp_get_thread_num(), std::memory_order_relaxed);
  }
  st.counters["threads"] = team;
}
BENCHMARK(BM_OpenMP_Region)->Arg(0)->Arg(20)->Arg(100)->Arg(1000)->UseRealTime();
#endif

BENCHMARK_MAIN();
