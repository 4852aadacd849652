// conv2d (NHWC, im2col GEMM) at the U-Nets' shapes: forward, and forward +
// backward (dx, dW, db). GFLOP/s counts 2*N*Ho*Wo*O*C*kh*kw per pass (x3 with
// the backward). PyTorch on the same shapes: benchmarks/torch_conv.py.
#include <benchmark/benchmark.h>

#include <diffuse/diffuse.hpp>

using namespace diffuse;

namespace {

// args: N, H (= W), C, O, k, stride
void conv_args(benchmark::internal::Benchmark* b) {
  b->Args({128, 16, 32, 32, 3, 1})   // MNIST16 level 0
      ->Args({128, 8, 64, 64, 3, 1})  // MNIST16 level 1
      ->Args({128, 16, 64, 32, 1, 1}) // 1x1 skip
      ->Args({8, 32, 128, 128, 3, 1}) // CIFAR level 0
      ->Args({8, 16, 256, 256, 3, 1}) // CIFAR level 1
      ->Args({8, 32, 128, 128, 3, 2}) // CIFAR downsample
      ->ArgNames({"N", "HW", "C", "O", "k", "s"});
}

struct Setup {
  Var<float> x, w, b;
  int64_t stride, pad;
  double flops;
  explicit Setup(const benchmark::State& st) {
    Generator g(1);
    const int64_t N = st.range(0), HW = st.range(1), C = st.range(2), O = st.range(3), k = st.range(4);
    stride = st.range(5);
    pad = k / 2;
    x = Var<float>(Tensor<float>::randn({N, HW, HW, C}, g), true);
    w = Var<float>(Tensor<float>::randn({O, k, k, C}, g), true);  // OHWI
    b = Var<float>(Tensor<float>::randn({O}, g), true);
    const int64_t Ho = (HW + 2 * pad - k) / stride + 1;
    flops = 2.0 * N * Ho * Ho * O * C * k * k;
  }
};

void BM_Conv2dForward(benchmark::State& st) {
  Setup s(st);
  NoGrad ng;
  for (auto _ : st) benchmark::DoNotOptimize(conv2d(s.x, s.w, s.b, s.stride, s.pad).value().data());
  st.counters["GFLOP/s"] = benchmark::Counter(s.flops * 1e-9 * st.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_Conv2dForward)->Apply(conv_args)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_Conv2dForwardBackward(benchmark::State& st) {
  Setup s(st);
  Tensor<float> gy;
  for (auto _ : st) {
    s.x.zero_grad();
    s.w.zero_grad();
    s.b.zero_grad();
    Var<float> y = conv2d(s.x, s.w, s.b, s.stride, s.pad);
    if (!gy.defined()) gy = Tensor<float>::full(y.shape(), 1.0f);
    Tape<float>::current().backward(y, &gy);
  }
  st.counters["GFLOP/s"] = benchmark::Counter(3 * s.flops * 1e-9 * st.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_Conv2dForwardBackward)->Apply(conv_args)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
