// GPU benchmark of the CUDA U-Net's train step (include/diffuse/cuda/unet.hpp): forward, MSE,
// backward and Adam over all parameters, wall time per step (the step reads the loss back, so it
// ends synchronised), images per second as a counter. Compare with
// ../shared/reference/torch_gpu_reference.py unet (PyTorch, same model, same card, same call):
// PyTorch's step also draws t and eps and runs q_sample on the device (a few microseconds);
// ours takes x_t and eps ready on the device.
//   Args: model (0 = MNIST16, 1 = CIFAR-10), batch, math (0 = FP32, 1 = TF32).
// Without a GPU it says so and exits 0.
#include <benchmark/benchmark.h>

#include <diffuse/cuda/unet.hpp>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

using namespace diffuse;

void BM_unet_train_step(benchmark::State& state) {
  const bool cifar = state.range(0) == 1;
  const std::int64_t B = state.range(1);
  const bool tf32 = state.range(2) == 1;
  UNetConfig c = cifar ? UNetConfig::cifar10() : UNetConfig::mnist16();
  cuda::UNetDevice net(c);
  Generator g(1234);
  for (cuda::Param& p : net.params()) {  // small random weights: the timing does not depend on them
    Tensor<float> h(p.shape);
    g.normal(h.data(), h.size());
    for (float& v : h) v *= 0.02f;
    p.value.copy_from(h);
  }
  cuda::UNetTrainOptions o;
  o.lr = 2e-4;
  o.math = tf32 ? cuda::MathMode::TF32 : cuda::MathMode::FP32;
  cuda::UNetTrainer trainer(net, o);
  Tensor<float> x({B, c.resolution, c.resolution, c.in_ch}), eps(x.shape());
  g.normal(x.data(), x.size());
  g.normal(eps.data(), eps.size());
  const Tensor<float> xd = x.cuda(), ed = eps.cuda();
  std::vector<std::int32_t> t(static_cast<size_t>(B));
  for (std::int64_t i = 0; i < B; ++i) t[static_cast<size_t>(i)] = static_cast<std::int32_t>((i * 37) % 1000);
  Generator drop(7);
  for (int w = 0; w < 3; ++w) trainer.step(xd, ed, t, {}, &drop);  // plans, caches, allocator warm
  for (auto _ : state) {
    const auto s = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(trainer.step(xd, ed, t, {}, &drop));
    state.SetIterationTime(std::chrono::duration<double>(std::chrono::steady_clock::now() - s).count());
  }
  state.counters["img_per_s"] = benchmark::Counter(static_cast<double>(B * state.iterations()), benchmark::Counter::kIsRate);
  state.SetLabel(std::string(cifar ? "cifar10" : "mnist16") + (tf32 ? " tf32" : " fp32") + " params " +
                 std::to_string(net.num_parameters()));
}
BENCHMARK(BM_unet_train_step)
    ->Args({0, 128, 0})
    ->Args({0, 128, 1})
    ->Args({1, 128, 0})
    ->Args({1, 128, 1})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(1.0);

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("bench_unet_cuda: no CUDA device, nothing to measure\n");
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
