// pytorch-fid's InceptionV3 on CPU: pool features of a batch of 32x32 uint8
// images (CIFAR-10's size), preprocessing (resize to 299) included, as the fid
// tool runs it. Weights are random (speed does not depend on them). PyTorch
// side: benchmarks/torch_fid.py. FLOPs: 5.71 G multiply-adds x 2 per image.
#include <benchmark/benchmark.h>

#include <diffuse/eval/fid.hpp>

using namespace diffuse;

static void BM_FidInception_Features(benchmark::State& st) {
  const int64_t B = st.range(0);
  Generator g(0);
  FidInceptionV3<float> net(g);
  ImageSet im{B, 32, 32, 3, std::vector<uint8_t>(static_cast<size_t>(B * 32 * 32 * 3)), {}, 0, {}};
  Generator gi(1);
  const Tensor<float> u = Tensor<float>::rand({B * 32 * 32 * 3}, gi);
  for (size_t i = 0; i < im.pixels.size(); ++i) im.pixels[i] = static_cast<uint8_t>(255.0f * u[i]);
  for (auto _ : st) {
    std::vector<float> f = fid_features(net, im, B);
    benchmark::DoNotOptimize(f.data());
  }
  st.counters["images/s"] = benchmark::Counter(static_cast<double>(B), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_FidInception_Features)->Arg(1)->Arg(50)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(5.0);

BENCHMARK_MAIN();
