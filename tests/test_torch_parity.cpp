// diffuse against PyTorch (python3-torch): on the 2-D toy model the timestep embedding, the
// ToyMLP forward, the epsilon loss, every parameter gradient and one Adam step; then Adam, AdamW
// and the EMA over many steps. Fresh random weights and inputs each run (the seed is printed on
// failure); the inputs go to a script in tests/torch/ in a safetensors file and PyTorch's
// results come back the same way. Skipped (DIFFUSE_SKIP) when no python can import torch.
#include <catch2/catch.hpp>

#include "kernel_seed.hpp"

#include <diffuse/diffuse.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <optional>
#include <random>
#include <string>
#include "compare.hpp"
#include "skip.hpp"

using namespace diffuse;
namespace fs = std::filesystem;

using diffuse::testing::rel_err;
using diffuse::testing::float_sums_tolerance;

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
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::optional<safetensors::File> toy_ref;
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
    // Both layer splits compute the same function of the same weights and inputs (the generator
    // restarts from the seed): one PyTorch run serves both.
    if (!toy_ref) toy_ref = run_reference("toy_mlp_ref.py", in, out);
    const safetensors::File& ref = *toy_ref;

    // Bounds from float_sums_tolerance, except the embedding's: each entry is sin or cos of a
    // rounded argument t * freq[k] (freq[k] = 10000^(-k / 63)), off by about u |t freq[k]| (sin's
    // slope is at most 1) plus its own rounding u; relative to the entries' root mean square
    // 1/sqrt(2), 4 times the root mean square of that error bounds it. The MLP: layers + 2 chained
    // sums over at most hidden = temb_dim = 128 inputs, whose input, the embedding, already
    // carries its own error (passed on with a relative gain of about 1: added in quadrature). The
    // loss L = |r|^2 / n of r = y - eps
    // moves by 2 <r, dy> / n: with rounding errors dy that do not line up with r, about
    // 2 |dy| / (|r| sqrt(2 N)) of itself; plus its own sum over 2 N squares. The gradients: the
    // backward's chain, twice as deep.
    double arg2 = 0;
    for (int32_t ti : t)
      for (int k = 0; k < 64; ++k) arg2 += std::pow(ti * std::pow(10000.0, -k / 63.0), 2) / (64.0 * N);
    const double bt = 4 * diffuse::testing::kFloatU * std::sqrt(1 + arg2) * std::sqrt(2.0);
    const ToyMLPConfig tc{};
    const double K = double(std::max(tc.hidden, tc.temb_dim)), depth = double(tc.layers + 2);
    const double et = rel_err(timestep_embedding<float>(t, 128), ref.tensor<float>("temb"));
    model.zero_grad();
    Var<float> y = model(Var<float>(x), t);
    Var<float> loss = mse(y, Var<float>(eps));
    const double ey = rel_err(y.value(), ref.tensor<float>("out")),
                 el = rel_err(loss.value().reshape({1}), ref.tensor<float>("loss"));
    double ny = 0, nr = 0;
    for (size_t i = 0; i < y.value().size(); ++i) {
      ny += double(y.value()[i]) * y.value()[i];
      nr += std::pow(double(y.value()[i]) - eps[i], 2);
    }
    const double by = std::hypot(float_sums_tolerance(K, depth), bt),
                 bl = 2 * by * std::sqrt(ny / nr) / std::sqrt(2.0 * N) + float_sums_tolerance(double(2 * N));
    std::printf("ToyMLP vs PyTorch: temb %.2g (bound %.2g), out %.2g (%.2g), loss %.2g (%.2g)\n", et, bt, ey, by, el, bl);
    CHECK(et < bt);
    CHECK(ey < by);
    CHECK(el < bl);
    backward(loss);
    double worst = 0;
    for (auto& [name, p] : model.named_parameters()) {
      INFO(name);
      const double e = rel_err(p.grad(), ref.tensor<float>("grad." + name));
      worst = std::max(worst, e);
      // Weight gradients also sum over the N = 257 rows of the batch.
      CHECK(e < std::hypot(float_sums_tolerance(std::max<double>(K, N), 2 * depth), bt));
    }
    std::printf("ToyMLP vs PyTorch: worst gradient %.2g (bound %.2g)\n", worst,
                std::hypot(float_sums_tolerance(std::max<double>(K, N), 2 * depth), bt));
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
    std::map<std::string, Tensor<float>> before;
    for (auto& [name, p] : model.named_parameters()) before[name] = p.value().clone();
    Adam<float> opt(model.named_parameters(), ao);
    opt.step();
    // One Adam step from the same gradients, no sums. The step differs by a handful of roundings
    // (the moments, the square root, the division: 8 u of the step) and by where 1 - beta is
    // formed: ours from the float betas (1 - 0.999f is 1.29e-5 below 0.001), PyTorch's in double;
    // the step scales with (1 - beta1) / sqrt(1 - beta2), so by d1 + d2 / 2 of itself. Relative to
    // the new weights that is |step| / |p_new| times more (a weight that the step nearly cancels
    // carries the step's error whole); 4 times it, plus the weights' own rounding, bounds it.
    const double u = diffuse::testing::kFloatU;
    const double d1 = std::abs((1.0 - double(float(ao.beta1))) / (1.0 - ao.beta1) - 1),
                 d2 = std::abs((1.0 - double(float(ao.beta2))) / (1.0 - ao.beta2) - 1);
    for (auto& [name, p] : model.named_parameters()) {
      INFO(name);
      const Tensor<float> theirs = ref.tensor<float>("adam." + name);
      double step2 = 0, new2 = 0;
      for (size_t i = 0; i < theirs.size(); ++i) {
        step2 += std::pow(double(before[name][i]) - theirs[i], 2);
        new2 += double(theirs[i]) * theirs[i];
      }
      const double bound = 4 * ((8 * u + d1 + d2 / 2) * std::sqrt(step2 / new2) + 2 * u);
      CHECK(rel_err(p.value(), theirs) < bound);
    }
  }
}

// Adam (L2 in the gradient) and AdamW (decoupled decay) over 40 steps, and an EMA with warm-up,
// against torch.optim and tests/torch/adam_ema_ref.py's EMA. One step cannot test an optimiser
// (it moves each weight by about lr * sign(g), whatever the betas): here the gradients keep a
// per-entry mean and change scale from step to step (x0.01 to x10), the betas are not the
// defaults, and the EMA's decay (0.75) is reached by the warm-up at update 26 of 40, so the
// moments, both bias corrections, the decay mode and both EMA phases all move the result.
// Tolerance: double throughout; each step is ~10 roundings (2^-53 ~ 1.1e-16 each) of values that
// stay O(1) relative to the weights, so 40 steps keep the relative error near 40 * 10 * 1.1e-16
// ~ 5e-14; 1e-12 leaves 20x for the different operation order, and a dropped term is O(1e-1).
TEST_CASE("Adam, AdamW and an EMA with warm-up match PyTorch over 40 steps") {
  if (!have_torch()) {
    DIFFUSE_SKIP("no python with torch found at configure time: PyTorch comparison skipped");
  }
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const std::vector<Shape> shapes = {{7, 5}, {13}, {3, 4, 2}};
  const int steps = 40;
  AdamOptions ao;
  ao.lr = 0.05;
  ao.beta1 = 0.8;
  ao.beta2 = 0.95;
  ao.eps = 1e-6;
  ao.weight_decay = 0.1;
  const double ema_decay = 0.75;

  std::vector<Tensor<double>> p0, mean;
  for (const Shape& s : shapes) {
    p0.push_back(Tensor<double>::randn(s, g));
    mean.push_back(Tensor<double>::randn(s, g));
  }
  std::vector<std::vector<Tensor<double>>> grads(steps);
  for (int s = 0; s < steps; ++s) {
    const double scale = std::pow(10.0, -2.0 + 3.0 * g.uniform1());
    for (size_t k = 0; k < shapes.size(); ++k) {
      Tensor<double> gr = Tensor<double>::randn(shapes[k], g);
      for (size_t i = 0; i < gr.size(); ++i) gr.data()[i] = (gr.data()[i] + 2.0 * mean[k].data()[i]) * scale;
      grads[s].push_back(gr);
    }
  }
  const fs::path dir = fs::path(DIFFUSE_BINARY_DIR) / "tests" / "torch_parity";
  fs::create_directories(dir);
  const std::string in = (dir / "adam_in.safetensors").string(), out = (dir / "adam_out.safetensors").string();
  {
    safetensors::Writer w;
    for (size_t k = 0; k < shapes.size(); ++k) w.add("p.w" + std::to_string(k), p0[k]);
    for (int s = 0; s < steps; ++s)
      for (size_t k = 0; k < shapes.size(); ++k) w.add("g." + std::to_string(s) + ".w" + std::to_string(k), grads[s][k]);
    Tensor<double> opts = Tensor<double>::zeros({7});
    const double o[7] = {ao.lr, ao.beta1, ao.beta2, ao.eps, ao.weight_decay, ema_decay, double(steps)};
    std::copy(o, o + 7, opts.data());
    w.add("opts", opts);
    w.write(in);
  }
  const safetensors::File ref = run_reference("adam_ema_ref.py", in, out);

  for (const bool decoupled : {false, true}) {
    const std::string mode = decoupled ? "adamw" : "adam";
    INFO(mode);
    NamedParams<double> params;
    for (size_t k = 0; k < shapes.size(); ++k) params.emplace_back("w" + std::to_string(k), Var<double>(p0[k].clone(), true));
    AdamOptions o = ao;
    o.decoupled = decoupled;
    Adam<double> opt(params, o);
    EMA<double> ema(params, ema_decay);
    for (int s = 0; s < steps; ++s) {
      opt.zero_grad();
      for (size_t k = 0; k < shapes.size(); ++k) {
        GradSink<double> sink = grad_sink(*params[k].second.node());
        std::copy(grads[s][k].begin(), grads[s][k].end(), sink.data);
      }
      if (decoupled) {
        opt.step(ema);  // the fused form
      } else {
        opt.step();
        ema.update();
      }
    }
    CHECK(opt.steps() == steps);
    CHECK(ema.updates() == steps);
    for (size_t k = 0; k < shapes.size(); ++k) {
      const std::string n = "w" + std::to_string(k);
      INFO(n);
      CHECK(rel_err(params[k].second.value(), ref.tensor<double>(mode + ".p." + n)) < 1e-12);
      CHECK(rel_err(opt.first_moments()[k], ref.tensor<double>(mode + ".m." + n)) < 1e-12);
      CHECK(rel_err(opt.second_moments()[k], ref.tensor<double>(mode + ".v." + n)) < 1e-12);
      CHECK(rel_err(ema.shadow()[k], ref.tensor<double>(mode + ".ema." + n)) < 1e-12);
    }
  }
}
