// GPU benchmark of the CUDA U-Net's train step (include/diffuse/cuda/unet.hpp): forward, MSE,
// backward and Adam over all parameters, wall time per step (the step reads the loss back, so it
// ends synchronised), images per second as a counter. Compare with
// ../shared/reference/torch_gpu_reference.py unet (PyTorch, same model, same card, same call):
// PyTorch's step also draws t and eps and runs q_sample on the device (a few microseconds);
// ours takes x_t and eps ready on the device.
//   Args: model (0 = MNIST16, 1 = CIFAR-10), batch, math (0 = FP32, 1 = TF32), convolution
//   algorithms (0 = cuDNN's heuristics, plain sums of products only: the default; 1 = timed by
//   cuDNN, plain sums; 2 = timed, FFT and Winograd allowed).
//   bench_unet_cuda --profile   instead: where a step's device time goes, by op kind
//                               (cuda/profile.hpp), for each of the four configurations.
// Without a GPU it says so and exits 0.
#include <benchmark/benchmark.h>

#include <diffuse/cuda/profile.hpp>
#include <diffuse/cuda/unet.hpp>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace {

using namespace diffuse;

// A model with small random weights (the timing does not depend on them), a trainer and one
// batch on the device, warmed up (plans, caches, allocator).
struct Setup {
  Setup(bool cifar, std::int64_t B, bool tf32, int conv)
      : c(cifar ? UNetConfig::cifar10() : UNetConfig::mnist16()), net(c), trainer(net, options(tf32, conv)) {
    Generator g(1234);
    for (cuda::Param& p : net.params()) {
      Tensor<float> h(p.shape);
      g.normal(h.data(), h.size());
      for (float& v : h) v *= 0.02f;
      p.value.copy_from(h);
    }
    Tensor<float> x({B, c.resolution, c.resolution, c.in_ch}), eps(x.shape());
    g.normal(x.data(), x.size());
    g.normal(eps.data(), eps.size());
    xd = x.cuda();
    ed = eps.cuda();
    t.resize(static_cast<size_t>(B));
    for (std::int64_t i = 0; i < B; ++i) t[static_cast<size_t>(i)] = static_cast<std::int32_t>((i * 37) % 1000);
    for (int w = 0; w < 3; ++w) step();
  }
  static cuda::UNetTrainOptions options(bool tf32, int conv) {
    cuda::UNetTrainOptions o;
    o.lr = 2e-4;
    o.math = tf32 ? cuda::MathMode::TF32 : cuda::MathMode::FP32;
    o.conv_search = conv > 0 ? cuda::ConvSearch::Benchmark : cuda::ConvSearch::Heuristic;
    o.conv_fft_winograd = conv == 2;
    return o;
  }
  float step() { return trainer.step(xd, ed, t, {}, &drop); }

  UNetConfig c;
  cuda::UNetDevice net;
  cuda::UNetTrainer trainer;
  Tensor<float> xd, ed;
  std::vector<std::int32_t> t;
  Generator drop{7};
};

void BM_unet_train_step(benchmark::State& state) {
  const bool cifar = state.range(0) == 1;
  const std::int64_t B = state.range(1);
  const bool tf32 = state.range(2) == 1;
  const int conv = static_cast<int>(state.range(3));
  Setup su(cifar, B, tf32, conv);
  for (auto _ : state) {
    const auto s = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(su.step());
    state.SetIterationTime(std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count());
  }
  state.counters["img_per_s"] = benchmark::Counter(static_cast<double>(B * state.iterations()), benchmark::Counter::kIsRate);
  static const char* conv_name[] = {" conv heuristic", " conv timed", " conv timed+fft/winograd"};
  state.SetLabel(std::string(cifar ? "cifar10" : "mnist16") + (tf32 ? " tf32" : " fp32") + conv_name[conv] +
                 " params " + std::to_string(su.net.num_parameters()));
}
BENCHMARK(BM_unet_train_step)
    ->Args({0, 128, 0, 0})
    ->Args({0, 128, 1, 0})
    ->Args({1, 128, 0, 0})
    ->Args({1, 128, 1, 0})
    ->Args({0, 128, 0, 1})
    ->Args({0, 128, 1, 1})
    ->Args({1, 128, 0, 1})
    ->Args({1, 128, 1, 1})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(1.0);

// --profile: device time per op kind over 5 steps of each configuration, beside the wall time.
void profile(std::int64_t B) {
  static const char* conv_name[] = {"conv heuristic", "conv timed", "conv timed+fft/winograd"};
  for (const bool cifar : {true, false}) {
    for (const bool tf32 : {false, true}) {
      for (int conv = 0; conv < (cifar && !tf32 ? 3 : 2); ++conv) {
        Setup su(cifar, B, tf32, conv);
        cuda::OpProfiler prof;
        su.trainer.graph().set_profiler(&prof);
        su.step();
        prof.reset();  // the first profiled step creates the events
        const int steps = 5;
        const auto s = std::chrono::steady_clock::now();
        for (int i = 0; i < steps; ++i) su.step();
        const double wall = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - s).count();
        std::printf("\n== %s %s %s batch %lld: %.2f ms/step wall (with the profiler's events)\n",
                    cifar ? "cifar10" : "mnist16", tf32 ? "tf32" : "fp32", conv_name[conv], static_cast<long long>(B),
                    wall / steps);
        prof.print(stdout, steps);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("bench_unet_cuda: no CUDA device, nothing to measure\n");
    return 0;
  }
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--profile") {
      profile(128);
      return 0;
    }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
