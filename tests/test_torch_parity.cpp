// diffuse against PyTorch (python3-torch) on the 2-D toy model: the timestep
// embedding, the ToyMLP forward, the epsilon loss, every parameter gradient
// and one Adam step. Fresh random weights and inputs each run (the seed is
// printed on failure); the inputs go to tests/torch/toy_mlp_ref.py in a
// safetensors file and PyTorch's results come back the same way.
// Skipped, with a warning, when no python can import torch (see tests/CMakeLists.txt).
#include <catch2/catch.hpp>

#include <diffuse/diffuse.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include "compare.hpp"
#include "skip.hpp"

using namespace diffuse;
namespace fs = std::filesystem;

using diffuse::testing::rel_err;

namespace {

bool have_torch() { return std::string(DIFFUSE_TORCH_PYTHON).size() > 0; }

// Runs the reference script on `in`, returns what it wrote.
safetensors::File run_reference(const std::string& script, const std::string& in, const std::string& out) {
  const std::string cmd = std::string("cd '") + DIFFUSE_SOURCE_DIR + "/tests/torch' && '" + DIFFUSE_TORCH_PYTHON +
                          "' " + script + " '" + in + "' '" + out + "'";
  INFO(cmd);
  REQUIRE(std::system(cmd.c_str()) == 0);
  return safetensors::File::read(out);
}

}  // namespace

TEST_CASE("ToyMLP forward, loss, gradients and an Adam step match PyTorch") {
  if (!have_torch()) {
    DIFFUSE_SKIP("no python with torch found at configure time: PyTorch comparison skipped");
  }
  const uint64_t seed = std::random_device{}();
  INFO("seed " << seed);
  for (bool split : {true, false}) {
    INFO("split_first_layer " << split);
    Generator g(seed);
    ToyMLP<float> model(ToyMLPConfig{}, g);
    model.split_first_layer = split;
    const int64_t N = 257;  // not a multiple of any block size
    Tensor<float> x = Tensor<float>::randn({N, 2}, g), eps = Tensor<float>::randn({N, 2}, g);
    std::vector<int32_t> t(static_cast<size_t>(N));
    g.randint(t.data(), t.size(), 1000);
    // Weights drawn larger than the init so that every layer matters.
    for (auto& [name, p] : model.named_parameters()) g.normal(p.value().data(), p.value().size());
    for (auto& [name, p] : model.named_parameters())
      for (auto& v : p.value()) v *= 0.2f;
    const float lr = 1e-2f;

    const fs::path dir = fs::path(DIFFUSE_BINARY_DIR) / "tests" / "torch_parity";
    fs::create_directories(dir);
    const std::string in = (dir / "toy_in.safetensors").string(), out = (dir / "toy_out.safetensors").string();
    {
      safetensors::Writer w;
      for (auto& [name, p] : model.named_parameters()) w.add(name, p.value());
      w.add("x", x);
      w.add("eps", eps);
      w.add_raw("t", safetensors::DType::I32, {N}, t.data(), t.size() * sizeof(int32_t));
      w.add("lr", Tensor<float>::full({1}, lr));
      w.write(in);
    }
    const safetensors::File ref = run_reference("toy_mlp_ref.py", in, out);

    CHECK(rel_err(timestep_embedding<float>(t, 128), ref.tensor<float>("temb")) < 1e-5);
    model.zero_grad();
    Var<float> y = model(Var<float>(x), t);
    Var<float> loss = mse(y, Var<float>(eps));
    CHECK(rel_err(y.value(), ref.tensor<float>("out")) < 1e-5);
    CHECK(rel_err(loss.value().reshape({1}), ref.tensor<float>("loss")) < 1e-5);
    backward(loss);
    for (auto& [name, p] : model.named_parameters()) {
      INFO(name);
      CHECK(rel_err(p.grad(), ref.tensor<float>("grad." + name)) < 2e-5);
    }
    // Adam from PyTorch's gradients: the first step moves each weight by about
    // lr * sign(g), so our own gradients (equal to rounding) would flip the sign
    // of the tiniest entries and test the gradients again, not Adam.
    model.zero_grad();
    for (auto& [name, p] : model.named_parameters()) {
      const Tensor<float> rg = ref.tensor<float>("grad." + name);
      GradSink<float> sink = grad_sink(*p.node());
      std::copy(rg.begin(), rg.end(), sink.data);
    }
    AdamOptions ao;
    ao.lr = lr;
    Adam<float> opt(model.named_parameters(), ao);
    opt.step();
    for (auto& [name, p] : model.named_parameters()) {
      INFO(name);
      CHECK(rel_err(p.value(), ref.tensor<float>("adam." + name)) < 1e-5);
    }
  }
}
