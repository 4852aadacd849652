// The toy 2-D model of the PyTorch reference: one training step (batch 1024,
// 3x128 hidden, SiLU, temb 128, T = 200, Adam) and sampling 2,000 points x 200 steps.
#include <benchmark/benchmark.h>

#include <cmath>
#include <diffuse/diffuse.hpp>

using namespace diffuse;

namespace {
// The reference's eight_gaussians: radius 2, std 0.1.
void eight_gaussians(Generator& g, Tensor<float>& x) {
  const size_t n = static_cast<size_t>(x.size(0));
  std::vector<int32_t> k(n);
  g.randint(k.data(), n, 8);
  std::vector<float> z(2 * n);
  g.normal(z.data(), z.size());
  for (size_t i = 0; i < n; ++i) {
    const float a = static_cast<float>(k[i]) * static_cast<float>(2 * M_PI / 8);
    x[2 * i] = 2 * std::cos(a) + 0.1f * z[2 * i];
    x[2 * i + 1] = 2 * std::sin(a) + 0.1f * z[2 * i + 1];
  }
}
}  // namespace

static void BM_Toy2D_TrainStep(benchmark::State& st) {
  Generator g(0);
  ToyMLP<float> model(ToyMLPConfig{}, g);
  Adam<float> opt(model.named_parameters(), AdamOptions{});
  const NoiseSchedule s = NoiseSchedule::linear(200);
  Tensor<float> x0({st.range(0), 2});
  for (auto _ : st) {
    eight_gaussians(g, x0);
    auto nb = make_noised_batch(s, x0, g);
    opt.zero_grad();
    backward(epsilon_loss<float>([&](const Var<float>& x, const std::vector<int32_t>& t) { return model(x, t); }, nb));
    opt.step();
  }
  st.counters["steps/s"] = benchmark::Counter(static_cast<double>(st.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_Toy2D_TrainStep)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();

static void BM_Toy2D_Sample2000x200(benchmark::State& st) {
  Generator g(0);
  ToyMLP<float> model(ToyMLPConfig{}, g);
  const NoiseSchedule s = NoiseSchedule::linear(200);
  EpsModel<float> f = [&](const Tensor<float>& x, const std::vector<int32_t>& t) {
    NoGrad ng;
    return model(Var<float>(x), t).value();
  };
  for (auto _ : st) benchmark::DoNotOptimize(ddpm_sample<float>(s, f, {2000, 2}, g).data());
}
BENCHMARK(BM_Toy2D_Sample2000x200)->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
