// GPU benchmark of the U-Net's train step on CUDA: the library's UNet moved to the device
// (model.to(Device::CUDA)), forward with dropout, MSE, backward and Adam over all parameters;
// wall time per step (the step reads the loss back, so it ends synchronised), images per second
// as a counter. Ordinary C++ linking diffuse::cuda, as a user's program would be. Compare with
// ../shared/reference/torch_gpu_reference.py unet (PyTorch, same model, same card, same call):
// PyTorch's step also draws t and eps and runs q_sample on the device (a few microseconds);
// ours takes x_t and eps ready on the device.
//   Args: model (0 = MNIST16, 1 = CIFAR-10), batch, math (0 = FP32, 1 = TF32, 2 = BF16), convolution
//   algorithms (0 = cuDNN's heuristics, plain sums of products only: the default; 1 = timed by
//   cuDNN, plain sums; 2 = timed, FFT and Winograd allowed), attention (0 = full-matrix kernels,
//   1 = the fused flash kernels).
//   bench_unet_cuda --profile   instead: where a step's device time goes, by backend entry, for
//                               each configuration.
// Without a GPU it says so and exits 0.
#include <benchmark/benchmark.h>

#include <diffuse/diffuse.hpp>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

namespace {

using namespace diffuse;

// The model, its optimiser and one batch on the device, warmed up (plans, caches, allocator).
struct Setup {
  Setup(bool cifar, std::int64_t B, MathMode math, int conv, bool flash = false)
      : c(cifar ? UNetConfig::cifar10() : UNetConfig::mnist16()) {
    backend::CudaBackend& be = backend::require_cuda("bench_unet_cuda");
    be.set_math_mode(math);
    be.set_attention_kernel(flash ? AttentionKernel::Flash : AttentionKernel::Full);
    be.set_conv_search(conv > 0, conv == 2);
    Generator g(1234);
    net = std::make_unique<UNet<float>>(c, g);
    net->to(Device::CUDA);
    AdamOptions ao;
    ao.lr = 2e-4;
    opt = std::make_unique<Adam<float>>(net->named_parameters(), ao);
    x = Tensor<float>::randn({B, c.resolution, c.resolution, c.in_ch}, g, Device::CUDA);
    eps = Tensor<float>::randn(x.shape(), g, Device::CUDA);
    t.resize(static_cast<size_t>(B));
    for (std::int64_t i = 0; i < B; ++i) t[static_cast<size_t>(i)] = static_cast<std::int32_t>((i * 37) % 1000);
    for (int w = 0; w < 3; ++w) step();
  }
  float step() {
    opt->zero_grad();
    const Var<float> loss = mse((*net)(Var<float>(x), t, nullptr, &drop), Var<float>(eps));
    backward(loss);
    opt->step();
    return loss.value().cpu()[0];
  }

  UNetConfig c;
  std::unique_ptr<UNet<float>> net;
  std::unique_ptr<Adam<float>> opt;
  Tensor<float> x, eps;
  std::vector<std::int32_t> t;
  Generator drop{7};
};

void BM_unet_train_step(benchmark::State& state) {
  const bool cifar = state.range(0) == 1;
  const std::int64_t B = state.range(1);
  const auto math = static_cast<MathMode>(state.range(2));
  const int conv = static_cast<int>(state.range(3));
  const bool flash = state.range(4) == 1;
  Setup su(cifar, B, math, conv, flash);
  for (auto _ : state) {
    const auto s = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(su.step());
    state.SetIterationTime(std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count());
  }
  state.counters["img_per_s"] = benchmark::Counter(static_cast<double>(B * state.iterations()), benchmark::Counter::kIsRate);
  static const char* conv_name[] = {" conv heuristic", " conv timed", " conv timed+fft/winograd"};
  state.SetLabel(std::string(cifar ? "cifar10" : "mnist16") + " " + math_mode_name(math) + conv_name[conv] +
                 (flash ? " flash attention" : "") + " params " + std::to_string(su.net->num_parameters()));
}
BENCHMARK(BM_unet_train_step)
    ->Args({0, 128, 0, 0, 0})
    ->Args({0, 128, 1, 0, 0})
    ->Args({1, 128, 0, 0, 0})
    ->Args({1, 128, 1, 0, 0})
    ->Args({0, 128, 0, 1, 0})
    ->Args({0, 128, 1, 1, 0})
    ->Args({1, 128, 0, 1, 0})
    ->Args({1, 128, 1, 1, 0})
    ->Args({0, 128, 1, 1, 1})
    ->Args({1, 128, 1, 1, 1})
    ->Args({0, 128, 2, 1, 0})
    ->Args({1, 128, 2, 1, 0})
    ->Args({0, 128, 2, 1, 1})
    ->Args({1, 128, 2, 1, 1})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(1.0);

// The whole product loop: the library's Trainer (noise and timesteps drawn, q_sample, the loss,
// clipping, Adam + EMA, the step record) over 20 steps of random images from host memory, read
// back only at the end (the loop's one wait: no log line, hook or checkpoint in between), so the
// host queues step after step while the device runs: images per second of the loop as a user
// runs it. Args: model (0 = MNIST16, 1 = CIFAR-10), batch, math (0 = FP32, 1 = TF32, 2 = BF16),
// attention (0 = full-matrix, 1 = flash: under BF16 the attention blocks all bf16, attention_block),
// CUDA graph (1: TrainOptions::cuda_graph, the forward and backward captured at the third step of
// each 20-step run and replayed; the capture is inside the timed run).
void BM_unet_train_loop(benchmark::State& state) {
  const bool cifar = state.range(0) == 1;
  const std::int64_t B = state.range(1);
  const auto math = static_cast<MathMode>(state.range(2));
  const bool flash = state.range(3) == 1;
  const bool graph = state.range(4) == 1;
  backend::CudaBackend& be = backend::require_cuda("bench_unet_cuda");
  be.set_math_mode(math);
  be.set_attention_kernel(flash ? AttentionKernel::Flash : AttentionKernel::Full);
  be.set_conv_search(true, false);
  const UNetConfig c = cifar ? UNetConfig::cifar10() : UNetConfig::mnist16();
  Generator g(1234);
  UNet<float> net(c, g);
  net.to(Device::CUDA);
  TensorDataset<float> data(Tensor<float>::randn({512, c.resolution, c.resolution, c.in_ch}, g));
  const int steps = 20;
  auto run = [&] {
    TrainOptions o;
    o.steps = steps, o.batch = B, o.lr = 2e-4, o.clip = 1.0, o.ema = 0.9999, o.log = nullptr, o.log_every = steps;
    o.handle_signals = false;
    o.cuda_graph = graph;
    Trainer<float, UNet<float>> tr(net, NoiseSchedule::linear(cifar ? 1000 : 200), data, o);
    const auto s = std::chrono::steady_clock::now();
    tr.run();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count();
  };
  run();  // plans, caches, the allocator
  for (auto _ : state) state.SetIterationTime(run());
  state.counters["img_per_s"] =
      benchmark::Counter(static_cast<double>(B * steps * state.iterations()), benchmark::Counter::kIsRate);
  state.SetLabel(std::string(cifar ? "cifar10" : "mnist16") + " " + math_mode_name(math) + (flash ? " flash" : "") +
                 (graph ? " cuda graph" : "") + " conv timed, Trainer loop of 20 steps (clip, Adam + EMA)");
}
BENCHMARK(BM_unet_train_loop)
    ->Args({0, 128, 1, 0, 0})
    ->Args({1, 128, 1, 0, 0})
    ->Args({0, 128, 2, 0, 0})
    ->Args({1, 128, 2, 0, 0})
    ->Args({0, 128, 2, 1, 0})
    ->Args({1, 128, 2, 1, 0})
    ->Args({0, 128, 1, 0, 1})
    ->Args({0, 128, 2, 1, 1})
    ->Args({1, 128, 2, 1, 1})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(1.0);

// --profile: device time per backend entry over 5 steps of each configuration, beside the wall time.
void profile(std::int64_t B) {
  static const char* conv_name[] = {"conv heuristic", "conv timed", "conv timed+fft/winograd"};
  backend::CudaBackend& be = backend::require_cuda("bench_unet_cuda");
  struct Config {
    bool cifar;
    MathMode math;
    int conv;
    bool flash;
  };
  std::vector<Config> configs;
  for (const bool cifar : {true, false}) {
    for (const MathMode math : {MathMode::FP32, MathMode::TF32}) {
      const bool tf32 = math == MathMode::TF32;
      for (int conv = 0; conv < (cifar && !tf32 ? 3 : 2); ++conv) configs.push_back({cifar, math, conv, false});
      if (tf32) configs.push_back({cifar, math, 1, true});  // TF32, timed convolutions, the fused attention
    }
    configs.push_back({cifar, MathMode::BF16, 1, false});  // bf16, timed convolutions
    configs.push_back({cifar, MathMode::BF16, 1, true});   // and the fused attention
  }
  for (const Config& k : configs) {
    Setup su(k.cifar, B, k.math, k.conv, k.flash);
    be.set_profiling(true);
    su.step();
    be.profile_table(1);  // the first profiled step creates the events
    const int steps = 5;
    const auto s = std::chrono::steady_clock::now();
    for (int i = 0; i < steps; ++i) su.step();
    const double wall = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - s).count();
    std::printf("\n== %s %s %s%s batch %lld: %.2f ms/step wall (with the profiler's events)\n",
                k.cifar ? "cifar10" : "mnist16", math_mode_name(k.math), conv_name[k.conv],
                k.flash ? " flash attention" : "", static_cast<long long>(B), wall / steps);
    std::fputs(be.profile_table(steps).c_str(), stdout);
    be.set_profiling(false);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda_available()) {
    std::printf("bench_unet_cuda: %s; nothing to measure\n", cuda_unavailable_reason().c_str());
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
