// GPU benchmarks (Google Benchmark) of the kernels in kernels/, device memory and cuBLAS SGEMM.
// Built when CUDA is enabled; run by scripts/gpu_check.sh. Kernel times are GPU times from CUDA
// events around the launch (UseManualTime); the U-Net's kernels (group norm + SiLU, attention at
// 256 and 1,024 tokens, Adam + EMA over a CIFAR-10-sized model, the elementwise chains) run with
// the L2 cache flushed before each timed launch, next to the card's device-to-device copy rate
// and SGEMM rate. Without a GPU it says so and exits 0.
#include <benchmark/benchmark.h>

#include <diffuse/backend/cuda/check.hpp>
#include <diffuse/backend/cuda/memory.hpp>

#include <diffuse/backend/cuda/attention.hpp>

#include "kernels/adam.cuh"
#include "kernels/elementwise.cuh"
#include "kernels/flash_attention.cuh"
#include "kernels/group_norm.cuh"
#include "kernels/image.cuh"
#include "kernels/reduce_sum.cuh"
#include "kernels/silu.cuh"

#include <cstdint>
#include <cstdio>
#include <utility>
#include <vector>

namespace {

using diffuse::cuda::DeviceBuffer;
using diffuse::cuda::Stream;

// GPU time of launch() per iteration, measured with events on `stream`. cold: the L2 cache is
// flushed (a 256 MiB memset, more than any current L2) before each timed launch, so the kernel
// reads its inputs from device memory as inside a model.
template <class F>
void time_on_stream(benchmark::State& state, cudaStream_t stream, F&& launch, bool cold = false) {
  static DeviceBuffer<unsigned char>* flush = nullptr;  // made on first cold use, kept (never freed)
  if (cold && !flush) flush = new DeviceBuffer<unsigned char>(std::size_t(256) << 20);
  cudaEvent_t start = nullptr, stop = nullptr;
  DIFFUSE_CUDA_CHECK(cudaEventCreate(&start));
  DIFFUSE_CUDA_CHECK(cudaEventCreate(&stop));
  launch();  // warm-up (module load, first-touch)
  DIFFUSE_CUDA_CHECK(cudaStreamSynchronize(stream));
  for (auto _ : state) {
    if (cold) flush->fill_bytes_async(0, stream);
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
template <class F>
void time_cold(benchmark::State& state, cudaStream_t stream, F&& launch) {
  time_on_stream(state, stream, std::forward<F>(launch), true);
}

// Random-ish device data (the values do not change the timings; NaNs would not either, but keep
// them finite so the kernels take their usual paths).
DeviceBuffer<float> filled(std::size_t n, float v = 0.5f) {
  std::vector<float> h(n);
  for (std::size_t i = 0; i < n; ++i) h[i] = v * static_cast<float>((i * 2654435761u) % 1000) / 1000.0f - 0.25f;
  return DeviceBuffer<float>(h);
}

// The card's own copy rate (device to device, read + write), the roof of the memory-bound kernels.
void BM_device_copy(benchmark::State& state) {
  const std::size_t n = std::size_t(1) << 26;  // 256 MiB
  Stream s;
  DeviceBuffer<float> a(n), b(n);
  a.fill_bytes_async(0, s);
  time_on_stream(state, s, [&] {
    DIFFUSE_CUDA_CHECK(cudaMemcpyAsync(b.data(), a.data(), n * sizeof(float), cudaMemcpyDeviceToDevice, s));
  });
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * 2 * n * sizeof(float)));
}
BENCHMARK(BM_device_copy)->UseManualTime();

// GroupNorm + SiLU at the U-Net's sizes: {N, HW, C, G, backward, dropout}. dropout 0: none; 1:
// p = 0.1 fused (group_norm_dropout: the keep bits drawn, then applied inside the normalisation's
// kernels; the backward masks dy as it reads it); 2: p = 0.1 as two ops (group_norm, then the
// dropout kernel; backward: dropout's, then group_norm's), what 1 replaced.
void BM_group_norm_silu(benchmark::State& state) {
  const std::int64_t N = state.range(0), HW = state.range(1), C = state.range(2), G = state.range(3);
  const bool bwd = state.range(4) == 1;
  const int drop = static_cast<int>(state.range(5));
  const auto n = static_cast<std::size_t>(N * HW * C);
  const double p = 0.1;
  const diffuse::DrawPos at(12345, 0);
  const std::uint64_t seed = 7;
  const float scale = 1.0f / 0.9f;
  Stream s;
  DeviceBuffer<float> x = filled(n), y(n), dy = filled(n, 0.1f), dx(n), gamma = filled(static_cast<std::size_t>(C)),
                      beta = filled(static_cast<std::size_t>(C)), dg(static_cast<std::size_t>(C)),
                      db(static_cast<std::size_t>(C)), mean(static_cast<std::size_t>(N * G)),
                      rstd(static_cast<std::size_t>(N * G)), tmp(drop == 2 ? n : 1);
  DeviceBuffer<std::uint32_t> keep((n + 31) / 32);
  dg.fill_bytes_async(0, s);
  db.fill_bytes_async(0, s);
  DeviceBuffer<unsigned char> ws(diffuse::kernels::group_norm_workspace_bytes(N, HW, C, G));
  const std::uint32_t* k = drop == 1 ? keep.data() : nullptr;
  diffuse::kernels::dropout_bits(keep.data(), static_cast<std::int64_t>(n), p, seed, at, s);
  diffuse::kernels::group_norm_forward(x.data(), gamma.data(), beta.data(), y.data(), mean.data(), rstd.data(), N, HW,
                                       C, G, 1e-6f, true, ws.data(), s);
  time_cold(state, s, [&] {
    if (bwd) {
      const float* g = dy.data();
      if (drop == 2) {
        diffuse::kernels::dropout_backward(dy.data(), tmp.data(), static_cast<std::int64_t>(n), p, seed, at, false, s);
        g = tmp.data();
      }
      diffuse::kernels::group_norm_backward(g, x.data(), gamma.data(), beta.data(), mean.data(), rstd.data(), dx.data(),
                                            false, dg.data(), true, db.data(), true, N, HW, C, G, true, ws.data(), s, 0,
                                            65535, k, scale);
    } else {
      if (drop == 1) diffuse::kernels::dropout_bits(keep.data(), static_cast<std::int64_t>(n), p, seed, at, s);
      diffuse::kernels::group_norm_forward(x.data(), gamma.data(), beta.data(), drop == 2 ? tmp.data() : y.data(),
                                           mean.data(), rstd.data(), N, HW, C, G, 1e-6f, true, ws.data(), s, 0, 65535,
                                           k, scale);
      if (drop == 2)
        diffuse::kernels::dropout_forward(tmp.data(), y.data(), static_cast<std::int64_t>(n), p, seed, at, s);
    }
  });
  // The least traffic: forward reads x and writes y; backward reads dy and x and writes dx.
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * (bwd ? 3 : 2) * n * sizeof(float)));
  state.SetLabel(drop == 0 ? "" : drop == 1 ? "dropout 0.1 fused" : "dropout 0.1 as its own kernel");
}
BENCHMARK(BM_group_norm_silu)
    ->Args({128, 32 * 32, 128, 32, 0, 0})
    ->Args({128, 32 * 32, 128, 32, 1, 0})
    ->Args({128, 16 * 16, 256, 32, 0, 0})
    ->Args({128, 16 * 16, 256, 32, 1, 0})
    ->Args({128, 32 * 32, 128, 32, 0, 1})
    ->Args({128, 32 * 32, 128, 32, 0, 2})
    ->Args({128, 32 * 32, 128, 32, 1, 1})
    ->Args({128, 32 * 32, 128, 32, 1, 2})
    ->UseManualTime();

// Attention forward + backward (dq, dk, dv): {N, L, C, heads}; FLOP/s of the four GEMM pairs.
void BM_attention(benchmark::State& state) {
  const std::int64_t N = state.range(0), L = state.range(1), C = state.range(2), H = state.range(3);
  const auto n = static_cast<std::size_t>(N * L * C);
  Stream s;
  diffuse::cuda::Blas blas;
  DeviceBuffer<float> q = filled(n), k = filled(n, 0.3f), v = filled(n, 0.7f), out(n), g = filled(n, 0.1f), dq(n), dk(n),
                      dv(n), P(diffuse::cuda::attention_probs_elements(N, L, H));
  DeviceBuffer<unsigned char> ws(diffuse::cuda::attention_workspace_bytes(N, L, H));
  time_cold(state, s, [&] {
    diffuse::cuda::attention_forward(blas, q.data(), k.data(), v.data(), out.data(), P.data(), N, L, C, H, s);
    diffuse::cuda::attention_backward(blas, q.data(), k.data(), v.data(), P.data(), g.data(), dq.data(), dk.data(),
                                      dv.data(), ws.data(), N, L, C, H, s);
  });
  // Forward 2 GEMMs of 2 N L^2 C flops, backward 4: 12 N L^2 C.
  state.counters["FLOP/s"] = benchmark::Counter(12.0 * N * L * L * C * static_cast<double>(state.iterations()),
                                                benchmark::Counter::kIsRate);
}
BENCHMARK(BM_attention)->Args({128, 256, 256, 1})->Args({16, 1024, 128, 1})->UseManualTime();

// The fused kernels (kernels/flash_attention.cuh) on the same shapes: forward + backward,
// FLOP/s counted as the full-matrix path's 12 N L^2 C (the backward's recomputed scores are
// not counted), so the two rates compare as times.
void BM_flash_attention(benchmark::State& state) {
  const std::int64_t N = state.range(0), L = state.range(1), C = state.range(2), H = state.range(3);
  const auto n = static_cast<std::size_t>(N * L * C);
  const auto rows = static_cast<std::size_t>(diffuse::kernels::flash_attention_rows(N, L, H));
  Stream s;
  DeviceBuffer<float> q = filled(n), k = filled(n, 0.3f), v = filled(n, 0.7f), out(n), g = filled(n, 0.1f), dq(n), dk(n),
                      dv(n), lse(rows), delta(rows);
  time_cold(state, s, [&] {
    diffuse::kernels::flash_attention_forward(q.data(), k.data(), v.data(), out.data(), lse.data(), N, L, C, H, s);
    diffuse::kernels::flash_attention_backward(q.data(), k.data(), v.data(), out.data(), lse.data(), g.data(), dq.data(),
                                               dk.data(), dv.data(), delta.data(), N, L, C, H, s);
  });
  state.counters["FLOP/s"] = benchmark::Counter(12.0 * N * L * L * C * static_cast<double>(state.iterations()),
                                                benchmark::Counter::kIsRate);
}
BENCHMARK(BM_flash_attention)->Args({128, 256, 256, 1})->Args({16, 1024, 128, 1})->UseManualTime();

// Adam + EMA over a CIFAR-10-sized model (35.7 M floats) cut into 250 tensors, one launch.
void BM_adam_ema(benchmark::State& state) {
  const std::int64_t total = 35746307, tensors = 250;
  Stream s;
  DeviceBuffer<float> p = filled(static_cast<std::size_t>(total)), gr = filled(static_cast<std::size_t>(total), 0.01f),
                      m(static_cast<std::size_t>(total)), v(static_cast<std::size_t>(total)),
                      e = filled(static_cast<std::size_t>(total));
  m.fill_bytes_async(0, s);
  v.fill_bytes_async(0, s);
  std::vector<diffuse::kernels::AdamTensor<float>> table;
  std::vector<std::int64_t> sizes;
  for (std::int64_t t = 0, at = 0; t < tensors; ++t) {
    const std::int64_t sz = t + 1 < tensors ? total / tensors : total - at;
    table.push_back({p.data() + at, gr.data() + at, m.data() + at, v.data() + at, e.data() + at, sz});
    sizes.push_back(sz);
    at += sz;
  }
  const std::vector<diffuse::kernels::AdamChunk> chunks = diffuse::kernels::plan_adam_chunks(sizes);
  DeviceBuffer<unsigned char> dt(table.size() * sizeof(table[0])), dc(chunks.size() * sizeof(chunks[0]));
  DIFFUSE_CUDA_CHECK(cudaMemcpy(dt.data(), table.data(), dt.bytes(), cudaMemcpyHostToDevice));
  DIFFUSE_CUDA_CHECK(cudaMemcpy(dc.data(), chunks.data(), dc.bytes(), cudaMemcpyHostToDevice));
  const auto args = diffuse::kernels::adam_step_args<float>(2e-4, 0.9, 0.999, 1e-8, 0.0, false, 10, 0.9999);
  time_cold(state, s, [&] {
    diffuse::kernels::adam_ema_step(reinterpret_cast<const diffuse::kernels::AdamTensor<float>*>(dt.data()),
                                    reinterpret_cast<const diffuse::kernels::AdamChunk*>(dc.data()),
                                    static_cast<std::int64_t>(chunks.size()), args, s);
  });
  // Reads p, g, m, v, ema and writes p, m, v, ema: 9 floats per parameter.
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * total * 9 * static_cast<std::int64_t>(sizeof(float)));
}
BENCHMARK(BM_adam_ema)->UseManualTime();

// Elementwise chains of a ResBlock at [128, 32, 32, 128]: 0 = add_channel_bias (x + temb bias),
// 1 = SiLU backward, 2 = residual add.
void BM_elementwise(benchmark::State& state) {
  const std::int64_t N = 128, HW = 32 * 32, C = 128, n = N * HW * C;
  const int which = static_cast<int>(state.range(0));
  Stream s;
  DeviceBuffer<float> x = filled(static_cast<std::size_t>(n)), y(static_cast<std::size_t>(n)),
                      dy = filled(static_cast<std::size_t>(n), 0.1f), b = filled(static_cast<std::size_t>(N * C));
  time_cold(state, s, [&] {
    if (which == 0) diffuse::kernels::add_channel_bias(x.data(), b.data(), y.data(), N, HW, C, s);
    else if (which == 1) diffuse::kernels::silu_backward(x.data(), dy.data(), y.data(), n, false, s);
    else diffuse::kernels::add(x.data(), dy.data(), y.data(), n, s);
  });
  state.SetLabel(which == 0 ? "add_channel_bias" : which == 1 ? "silu_backward" : "add");
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * n * (which == 0 ? 2 : 3) *
                          static_cast<std::int64_t>(sizeof(float)));
}
BENCHMARK(BM_elementwise)->Arg(0)->Arg(1)->Arg(2)->UseManualTime();

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
