// attention(q, k, v, heads) in float on the DDPM U-Net's attention sizes:
//   N=8   L=256 C=256 heads=1  (CIFAR-10 at 16x16, batch 8)
//   N=128 L=64  C=64  heads=1  (MNIST at 8x8, batch 128)
// Forward alone (under NoGrad: no P kept) and forward + backward (q, k, v all
// need gradients), with 1 and 2 threads. GFLOP/s counts the matrix products
// only: 4 N L^2 C for the forward, 12 N L^2 C for forward + backward.
#include <benchmark/benchmark.h>

#include <diffuse/diffuse.hpp>

#include <diffuse/core/parallel.hpp>

using namespace diffuse;

namespace {

struct Size {
  int64_t N, L, C;
  int heads;
};
constexpr Size kCifar16{8, 256, 256, 1};
constexpr Size kMnist8{128, 64, 64, 1};

void set_threads(benchmark::State& st) { diffuse::set_num_threads(static_cast<int>(st.range(0))); }

void report(benchmark::State& st, const Size& s, double mult) {
  const double flops = mult * static_cast<double>(s.N) * static_cast<double>(s.L) * static_cast<double>(s.L) *
                       static_cast<double>(s.C);
  st.counters["GFLOP/s"] =
      benchmark::Counter(flops * static_cast<double>(st.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

void BM_AttentionForward(benchmark::State& st, Size s) {
  set_threads(st);
  Generator g(1);
  const Shape sh{s.N, s.L, s.C};
  Var<float> q(Tensor<float>::randn(sh, g)), k(Tensor<float>::randn(sh, g)), v(Tensor<float>::randn(sh, g));
  NoGrad ng;
  for (auto _ : st) {
    Var<float> o = attention(q, k, v, s.heads);
    benchmark::DoNotOptimize(o.value().data());
  }
  report(st, s, 4.0);
}

void BM_AttentionForwardBackward(benchmark::State& st, Size s) {
  set_threads(st);
  Generator g(2);
  const Shape sh{s.N, s.L, s.C};
  Var<float> q(Tensor<float>::randn(sh, g), true), k(Tensor<float>::randn(sh, g), true),
      v(Tensor<float>::randn(sh, g), true);
  const Tensor<float> seed = Tensor<float>::randn(sh, g);
  for (auto _ : st) {
    Var<float> o = attention(q, k, v, s.heads);
    Tape<float>::current().backward(o, &seed);
    benchmark::DoNotOptimize(q.grad().data());
  }
  report(st, s, 12.0);
}

}  // namespace

#define DIFFUSE_ATTN_BENCH(name, s)                                                                       \
  BENCHMARK_CAPTURE(BM_AttentionForward, name, s)->ArgName("threads")->Arg(1)->Arg(2)->UseRealTime();     \
  BENCHMARK_CAPTURE(BM_AttentionForwardBackward, name, s)->ArgName("threads")->Arg(1)->Arg(2)->UseRealTime()

DIFFUSE_ATTN_BENCH(N8_L256_C256, kCifar16);
DIFFUSE_ATTN_BENCH(N128_L64_C64, kMnist8);

BENCHMARK_MAIN();
