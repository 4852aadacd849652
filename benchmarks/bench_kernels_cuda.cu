// GPU benchmarks (Google Benchmark) of the kernels in kernels/, device memory and cuBLAS SGEMM.
// Built when CUDA is enabled; run by scripts/gpu_check.sh. Kernel times are GPU times from CUDA
// events around the launch (UseManualTime); without a GPU it says so and exits 0.
#include <benchmark/benchmark.h>

#include <diffuse/cuda/check.hpp>
#include <diffuse/cuda/memory.hpp>

#include "kernels/reduce_sum.cuh"
#include "kernels/silu.cuh"

#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

using diffuse::cuda::DeviceBuffer;
using diffuse::cuda::Stream;

// GPU time of launch() per iteration, measured with events on `stream`.
template <class F>
void time_on_stream(benchmark::State& state, cudaStream_t stream, F&& launch) {
  cudaEvent_t start = nullptr, stop = nullptr;
  DIFFUSE_CUDA_CHECK(cudaEventCreate(&start));
  DIFFUSE_CUDA_CHECK(cudaEventCreate(&stop));
  launch();  // warm-up (module load, first-touch)
  DIFFUSE_CUDA_CHECK(cudaStreamSynchronize(stream));
  for (auto _ : state) {
    DIFFUSE_CUDA_CHECK(cudaEventRecord(start, stream));
    launch();
    DIFFUSE_CUDA_CHECK(cudaEventRecord(stop, stream));
    DIFFUSE_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    DIFFUSE_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    state.SetIterationTime(static_cast<double>(ms) / 1e3);
  }
  DIFFUSE_CUDA_CHECK(cudaEventDestroy(start));
  DIFFUSE_CUDA_CHECK(cudaEventDestroy(stop));
}

void BM_silu_forward(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  Stream s;
  DeviceBuffer<float> x(n), y(n);
  x.fill_bytes_async(0, s);
  time_on_stream(state, s, [&] { diffuse::kernels::silu_forward(x.data(), y.data(), static_cast<std::int64_t>(n), s); });
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * n * 2 * sizeof(float)));
}
BENCHMARK(BM_silu_forward)->Arg(1 << 16)->Arg(1 << 20)->Arg(1 << 24)->UseManualTime();

void BM_reduce_sum_rows(benchmark::State& state) {
  const std::int64_t rows = state.range(0), cols = state.range(1);
  Stream s;
  DeviceBuffer<float> x(static_cast<std::size_t>(rows * cols)), out(static_cast<std::size_t>(rows));
  x.fill_bytes_async(0, s);
  time_on_stream(state, s, [&] { diffuse::kernels::reduce_sum_rows(x.data(), out.data(), rows, cols, s); });
  state.SetBytesProcessed(state.iterations() * rows * cols * static_cast<std::int64_t>(sizeof(float)));
}
BENCHMARK(BM_reduce_sum_rows)->Args({4096, 1024})->Args({64, 1 << 16})->Args({1 << 16, 64})->UseManualTime();

#if defined(DIFFUSE_WITH_CUBLAS)
void BM_cublas_sgemm(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  const auto nn = static_cast<std::size_t>(n) * n;
  Stream s;
  cublasHandle_t h = nullptr;
  DIFFUSE_CUBLAS_CHECK(cublasCreate(&h));
  DIFFUSE_CUBLAS_CHECK(cublasSetStream(h, s));
  DeviceBuffer<float> a(nn), b(nn), c(nn);
  a.fill_bytes_async(0, s);
  b.fill_bytes_async(0, s);
  const float alpha = 1.0f, beta = 0.0f;
  time_on_stream(state, s, [&] {
    DIFFUSE_CUBLAS_CHECK(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a.data(), n, b.data(), n, &beta, c.data(), n));
  });
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * n * n * n * static_cast<double>(state.iterations()),
                                                benchmark::Counter::kIsRate);
  DIFFUSE_CUBLAS_CHECK(cublasDestroy(h));
}
BENCHMARK(BM_cublas_sgemm)->Arg(1024)->Arg(4096)->UseManualTime();
#endif

// A DeviceBuffer of 4 MiB made and dropped: after the first, a cache hit (host time).
void BM_device_buffer_cached(benchmark::State& state) {
  for (auto _ : state) {
    DeviceBuffer<float> b(1 << 20);
    benchmark::DoNotOptimize(b.data());
  }
}
BENCHMARK(BM_device_buffer_cached);

// The same without the cache (host time).
void BM_cudaMalloc_cudaFree(benchmark::State& state) {
  for (auto _ : state) {
    void* p = nullptr;
    DIFFUSE_CUDA_CHECK(cudaMalloc(&p, std::size_t(4) << 20));
    benchmark::DoNotOptimize(p);
    DIFFUSE_CUDA_CHECK(cudaFree(p));
  }
}
BENCHMARK(BM_cudaMalloc_cudaFree);

// Synchronous copies of 64 MiB from and to pageable host memory (host time).
void BM_copy_host_to_device(benchmark::State& state) {
  std::vector<float> host(std::size_t(16) << 20, 1.0f);
  DeviceBuffer<float> d(host.size());
  for (auto _ : state) d.copy_from_host(host);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * d.bytes()));
}
BENCHMARK(BM_copy_host_to_device)->UseRealTime();

void BM_copy_device_to_host(benchmark::State& state) {
  std::vector<float> host(std::size_t(16) << 20, 1.0f);
  DeviceBuffer<float> d(host);
  for (auto _ : state) d.copy_to_host(host);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * d.bytes()));
}
BENCHMARK(BM_copy_device_to_host)->UseRealTime();

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("bench_kernels_cuda: no CUDA device, nothing to measure\n");
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
