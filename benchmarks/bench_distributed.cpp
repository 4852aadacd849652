// The cost of data parallelism on the CPU, run as `mpirun -np N bench_distributed` (rank 0 prints):
//   BM_AllReduce/n          MPI_Allreduce (sum) of n floats in place: 1M (4 MB) and 35.7M (143 MB,
//                           the CIFAR-10 U-Net's gradients)
//   BM_GradReducer/<model>  what the training loop adds to a step: every gradient of the model
//                           averaged over the ranks in 25 MB buckets (packed, summed, unpacked);
//                           mnist16 (1.4M parameters) and cifar10 (35.7M)
// Each benchmark runs a fixed number of iterations (every rank must make the same collectives)
// and is timed on the wall clock. docs/distributed.md has the numbers and what they predict.
#include <benchmark/benchmark.h>

#include <diffuse/distributed/grad_reducer.hpp>
#include <diffuse/distributed/mpi.hpp>
#include <diffuse/models/unet.hpp>

#include <cstdio>
#include <memory>
#include <vector>

using namespace diffuse;

namespace {

std::unique_ptr<MpiCommunicator> g_comm;

void BM_AllReduce(benchmark::State& state) {
  std::vector<float> x(static_cast<size_t>(state.range(0)), 1.0f);
  for (auto _ : state) {
    g_comm->all_reduce(x.data(), x.size(), ReduceOp::sum);
    benchmark::DoNotOptimize(x.data());
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(x.size() * sizeof(float)));
  state.counters["ranks"] = g_comm->size();
}
BENCHMARK(BM_AllReduce)->Arg(1 << 20)->Arg(35746307)->Iterations(10)->UseRealTime()->Unit(benchmark::kMillisecond);

void BM_GradReducer(benchmark::State& state, UNetConfig c) {
  Generator g(0);
  UNet<float> model(c, g);
  const NamedParams<float> params = model.named_parameters();
  for (auto& [n, p] : params) {  // a gradient for every parameter, as after a backward
    GradSink<float> s = grad_sink(*p.node());
    std::fill(s.data, s.data + p.value().size(), 1e-3f);
  }
  GradReducer<float> reducer(*g_comm, params);
  for (auto _ : state) {
    reducer.begin();
    reducer.finish();
  }
  state.counters["parameters"] = static_cast<double>(model.num_parameters());
  state.counters["buckets"] = static_cast<double>(reducer.buckets());
  state.counters["ranks"] = g_comm->size();
}
BENCHMARK_CAPTURE(BM_GradReducer, mnist16, UNetConfig::mnist16())->Iterations(20)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_GradReducer, cifar10, UNetConfig::cifar10())->Iterations(5)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  g_comm = std::make_unique<MpiCommunicator>(&argc, &argv);
  if (g_comm->rank() != 0 && !std::freopen("/dev/null", "w", stdout)) return 1;  // rank 0 reports
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  g_comm.reset();
  return 0;
}
