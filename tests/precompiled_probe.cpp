// Compiled, never run: a file that uses the loop, the samplers, the ops and a checkpoint, as a
// user's would. With diffuse::diffuse (DIFFUSE_PRECOMPILED) none of the float code it uses may be
// compiled in this file again: tests/precompiled_check.cmake reads its object file's symbols.
#include <diffuse/data/points2d.hpp>
#include <diffuse/diffusion/samplers.hpp>
#include <diffuse/models/toy_mlp.hpp>
#include <diffuse/ops/conv2d.hpp>
#include <diffuse/ops/group_norm.hpp>
#include <diffuse/train/trainer.hpp>

using namespace diffuse;

float precompiled_probe() {
  Generator init(0);
  ToyMLP<float> model(ToyMLPConfig{}, init);
  const NoiseSchedule schedule = NoiseSchedule::linear(100);
  auto moons = data2d::make_dataset("moons");
  GeneratedSource<float> data({2}, [&](Generator& g, int64_t n, Batch<float>& b) { moons->sample(g, n, b.x0.data()); });
  TrainOptions opts;
  opts.steps = 1;
  opts.out = "probe";
  Trainer<float, ToyMLP<float>> trainer(model, schedule, data, opts);
  trainer.run();
  Generator g(1);
  const Tensor<float> points = ddpm_sample<float>(schedule, model, {4, 2}, g);
  save_checkpoint<float>("probe.safetensors", model, nullptr, nullptr, 1, g, {});
  const Var<float> x(Tensor<float>::randn({1, 4, 4, 8}, g), true);
  const Var<float> w(Tensor<float>::randn({8, 3, 3, 8}, g), true);
  const Var<float> gamma(Tensor<float>::ones({8})), beta(Tensor<float>::zeros({8}));
  Var<float> y = group_norm(conv2d(x, w, Var<float>(), 1, 1), gamma, beta, 2, 1e-5, true);
  backward(mean(y));
  return points[0] + y.value()[0];
}
