// The DDPM U-Nets of the reference: MNIST16 (no attention) train step at batch
// 128 (q_sample, forward, backward, Adam), its forward at batch 64 without
// gradients (one sampling step), a whole DDPM sampling run of 64 images x 200
// steps (clipped x0, as the image trainers sample), and the CIFAR-10 U-Net
// forward + backward at batch 8. PyTorch on the same models:
// benchmarks/torch_unet.py.
#include <benchmark/benchmark.h>

#include <diffuse/diffuse.hpp>
#include <diffuse/models/unet.hpp>

using namespace diffuse;

namespace {

void BM_MNIST16_TrainStep(benchmark::State& st) {
  Generator g(0);
  UNet<float> model(UNetConfig::mnist16("none"), g);
  AdamOptions ao;
  ao.lr = 2e-4;
  Adam<float> opt(model.named_parameters(), ao);
  const NoiseSchedule s = NoiseSchedule::linear(200);
  const Tensor<float> x0 = Tensor<float>::randn({st.range(0), 16, 16, 1}, g);
  for (auto _ : st) {
    auto nb = make_noised_batch(s, x0, g);
    opt.zero_grad();
    backward(epsilon_loss<float>([&](const Var<float>& x, const std::vector<int32_t>& t) { return model(x, t); }, nb));
    opt.step();
  }
  st.counters["img/s"] = benchmark::Counter(static_cast<double>(st.iterations() * st.range(0)), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_MNIST16_TrainStep)->Arg(128)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(5);

void BM_MNIST16_ForwardNoGrad(benchmark::State& st) {
  Generator g(0);
  UNet<float> model(UNetConfig::mnist16("none"), g);
  const Var<float> x(Tensor<float>::randn({st.range(0), 16, 16, 1}, g));
  const std::vector<int32_t> t(static_cast<size_t>(st.range(0)), 100);
  NoGrad ng;
  for (auto _ : st) benchmark::DoNotOptimize(model(x, t).value().data());
}
BENCHMARK(BM_MNIST16_ForwardNoGrad)->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(3);

void BM_MNIST16_Sample64x200(benchmark::State& st) {
  Generator g(0);
  UNet<float> model(UNetConfig::mnist16("none"), g);
  const NoiseSchedule s = NoiseSchedule::linear(200);
  SampleOptions so;
  so.clip_x0 = true;
  NoGrad ng;
  const EpsModel<float> eps = [&](const Tensor<float>& x, const std::vector<int32_t>& t) {
    return model(Var<float>(x), t).value();
  };
  for (auto _ : st) benchmark::DoNotOptimize(ddpm_sample(s, eps, {64, 16, 16, 1}, g, so).data());
  st.counters["img/s"] = benchmark::Counter(static_cast<double>(st.iterations() * 64), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_MNIST16_Sample64x200)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(1);

void BM_CIFAR10_ForwardBackward(benchmark::State& st) {
  Generator g(0);
  UNet<float> model(UNetConfig::cifar10(), g);
  const NoiseSchedule s = NoiseSchedule::linear(1000);
  const Tensor<float> x0 = Tensor<float>::randn({st.range(0), 32, 32, 3}, g);
  Generator drop(1);
  for (auto _ : st) {
    auto nb = make_noised_batch(s, x0, g);
    model.zero_grad();
    backward(epsilon_loss<float>(
        [&](const Var<float>& x, const std::vector<int32_t>& t) { return model(x, t, nullptr, &drop); }, nb));
  }
}
BENCHMARK(BM_CIFAR10_ForwardBackward)->Arg(8)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(10);

}  // namespace

BENCHMARK_MAIN();
