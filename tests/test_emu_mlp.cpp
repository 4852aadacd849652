// The device ToyMLP (include/diffuse/cuda/mlp.hpp) and the generic device trainer
// (cuda/trainer.hpp) against the CPU ToyMLP and its Adam / EMA / clip_grad_norm, through the CPU
// emulation (train_2d --device cuda's model): model_cases_mlp.hpp (also run natively by
// test_cuda_unet), and here the refusals.
#include <catch2/catch.hpp>

#define DIFFUSE_MODEL_TEST_SETUP diffuse::cuda::EmulatedDeviceMemory emulated_memory;
#include "model_cases_mlp.hpp"

#include <diffuse/cuda/mlp.hpp>
#include <diffuse/layers/mlp.hpp>

#include <string>
#include <utility>
#include <vector>

using namespace diffuse;

namespace {
std::vector<std::pair<std::string, Tensor<float>>> values_of(const ToyMLP<float>& m) {
  std::vector<std::pair<std::string, Tensor<float>>> out;
  for (auto& [n, p] : m.named_parameters()) out.emplace_back(n, p.value());
  return out;
}
}  // namespace

TEST_CASE("cuda ToyMLP (emulated): load refuses a model of other sizes, forward refuses labels") {
  cuda::EmulatedDeviceMemory emulated;
  Generator init(3);
  ToyMLP<float> cpu(ToyMLPConfig{2, 16, 2, 8, Activation::SiLU}, init);
  cuda::ToyMLPDevice wider(2, 32, 2, 8), deeper(2, 16, 3, 8);
  CHECK_THROWS_WITH(wider.load(values_of(cpu)), Catch::Contains("net.0.weight has shape"));
  CHECK_THROWS_WITH(deeper.load(values_of(cpu)), Catch::Contains("net.4.weight has shape [2, 16], expected [16, 16]"));
  cuda::ToyMLPDevice same(2, 16, 2, 8);
  same.load(values_of(cpu));
  cuda::Graph g(&same.params());
  const Tensor<float> x = Tensor<float>::zeros({2, 2}).cuda();
  const Tensor<std::int32_t> t = Tensor<std::int32_t>::from({1, 2}, {2}).cuda();
  CHECK_THROWS_WITH(same.forward(g, x, t.data(), t.data(), 2, nullptr), Catch::Contains("no classes"));
  CHECK_THROWS_WITH(same.forward(g, x, t.data(), nullptr, 3, nullptr), Catch::Contains("expected [3, 2]"));
}
