// group_norm (+ fused SiLU) on NHWC at the U-Nets' shapes: forward, and
// forward + backward (dx, dgamma, dbeta). GB/s counts one read and one write of
// x per forward (x, dy read and dx written per backward): the floor is memory.
#include <benchmark/benchmark.h>

#include <diffuse/diffuse.hpp>

using namespace diffuse;

namespace {

// args: N, H (= W), C, groups, silu
void gn_args(benchmark::internal::Benchmark* b) {
  b->Args({128, 16, 32, 8, 1})     // MNIST16 level 0
      ->Args({128, 8, 64, 8, 1})   // MNIST16 level 1
      ->Args({8, 32, 128, 32, 1})  // CIFAR level 0
      ->Args({8, 16, 256, 32, 1})  // CIFAR level 1
      ->Args({8, 16, 256, 32, 0})  // CIFAR attention block (no SiLU)
      ->ArgNames({"N", "HW", "C", "G", "silu"});
}

struct Setup {
  Var<float> x, gamma, beta;
  int64_t groups;
  bool silu;
  double bytes;
  explicit Setup(const benchmark::State& st) {
    Generator g(1);
    const int64_t N = st.range(0), HW = st.range(1), C = st.range(2);
    groups = st.range(3);
    silu = st.range(4) != 0;
    x = Var<float>(Tensor<float>::randn({N, HW, HW, C}, g), true);
    gamma = Var<float>(Tensor<float>::randn({C}, g), true);
    beta = Var<float>(Tensor<float>::randn({C}, g), true);
    bytes = 4.0 * N * HW * HW * C;
  }
};

void BM_GroupNormForward(benchmark::State& st) {
  Setup s(st);
  NoGrad ng;
  for (auto _ : st) benchmark::DoNotOptimize(group_norm(s.x, s.gamma, s.beta, s.groups, 1e-6, s.silu).value().data());
  st.counters["GB/s"] = benchmark::Counter(2 * s.bytes * 1e-9 * st.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_GroupNormForward)->Apply(gn_args)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_GroupNormForwardBackward(benchmark::State& st) {
  Setup s(st);
  Tensor<float> gy;
  for (auto _ : st) {
    s.x.zero_grad();
    s.gamma.zero_grad();
    s.beta.zero_grad();
    Var<float> y = group_norm(s.x, s.gamma, s.beta, s.groups, 1e-6, s.silu);
    if (!gy.defined()) gy = Tensor<float>::full(y.shape(), 1.0f);
    Tape<float>::current().backward(y, &gy);
  }
  st.counters["GB/s"] = benchmark::Counter(5 * s.bytes * 1e-9 * st.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_GroupNormForwardBackward)->Apply(gn_args)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
