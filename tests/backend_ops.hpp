// The harness of test_backend_ops (in the spirit of ggml's test-backend-ops): an op, given as a
// function of Vars, runs on the CPU backend and on the CUDA backend with the same fresh random
// inputs; its output and the gradient of every input (for a random upstream gradient) must agree.
// Each op runs twice per case, the second time with every input used twice, so that both the
// first contribution to a gradient (written) and a later one (added) are exercised.
//
// The CUDA backend is the emulation (EmulatedCuda: every kernel through the CPU emulation of
// CUDA, in CI) or, with DIFFUSE_TEST_NATIVE_CUDA, the real device (test_backend_ops_cuda).
#pragma once

#include <catch2/catch.hpp>

#include <diffuse/diffuse.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#ifndef DIFFUSE_TEST_NATIVE_CUDA
#include <diffuse/backend/cuda_emulation.hpp>
#endif

#include "compare.hpp"
#include "kernel_seed.hpp"

namespace diffuse::testing {

// The CUDA backend for the scope of a test: the emulation, or the real device.
class CudaScope {
 public:
  CudaScope() {
#ifndef DIFFUSE_TEST_NATIVE_CUDA
    emu_ = std::make_unique<EmulatedCuda>();
#endif
    REQUIRE(cuda_unavailable_reason() == "");
  }

 private:
#ifndef DIFFUSE_TEST_NATIVE_CUDA
  std::unique_ptr<EmulatedCuda> emu_;
#endif
};

using OpFn = std::function<Var<float>(const std::vector<Var<float>>&)>;

struct OpInput {
  Tensor<float> value;
  bool requires_grad = true;
};

inline std::vector<OpInput> inputs_of(const std::vector<Tensor<float>>& ts, bool requires_grad = true) {
  std::vector<OpInput> in;
  for (const auto& t : ts) in.push_back({t, requires_grad});
  return in;
}

inline Tensor<float> randn_t(Shape s, Generator& g) { return Tensor<float>::randn(std::move(s), g); }

// Runs f on `dev` (inputs copied there) and returns the output and the input gradients on the
// CPU; `twice`: the loss uses f(x) twice (so every gradient gets a second contribution).
struct OpRun {
  Tensor<float> out;
  std::vector<Tensor<float>> grads;
};
inline OpRun run_op(const OpFn& f, const std::vector<OpInput>& in, const Tensor<float>& R, const Tensor<float>& R2,
                    Device dev, bool twice) {
  std::vector<Var<float>> xs;
  for (const auto& i : in) xs.emplace_back(i.value.to(dev), i.requires_grad);
  Var<float> y = f(xs);
  OpRun r;
  r.out = y.value().cpu();
  bool any = false;
  for (const auto& x : xs) any = any || x.requires_grad();
  if (any && y.requires_grad()) {
    Var<float> loss = sum(mul(y, Var<float>(R.to(dev))));
    if (twice) loss = add(loss, sum(mul(f(xs), Var<float>(R2.to(dev)))));
    backward(loss);
  }
  for (const auto& x : xs) r.grads.push_back(x.requires_grad() && x.has_grad() ? x.grad().cpu() : Tensor<float>());
  return r;
}

// A seed that the inputs' numbers fix (FNV-1a of their bytes): the upstream gradients change with
// every fresh draw of the inputs, and replaying the test's seed (DIFFUSE_TEST_SEED) replays them.
inline std::uint64_t seed_of(const std::vector<OpInput>& in) {
  std::uint64_t h = 1469598103934665603ull;
  for (const auto& i : in) {
    const auto* p = reinterpret_cast<const unsigned char*>(i.value.data());
    for (size_t b = 0; b < i.value.size() * sizeof(float); ++b) h = (h ^ p[b]) * 1099511628211ull;
  }
  return h;
}

inline double norm2(const Tensor<float>& t) {
  double s = 0;
  for (size_t i = 0; i < t.size(); ++i) s += static_cast<double>(t[i]) * t[i];
  return std::sqrt(s);
}

// Output and gradients of f on CUDA within `tol` (relative, ||cuda - cpu|| / ||cpu||) of the CPU's.
// With the inputs used twice a gradient is the sum of two contributions, which may cancel (a
// 1-element gradient (R + R2) b with R ~ -R2): its error is then taken relative to the larger of
// that sum and the first contribution alone, the size of the numbers that were rounded.
// unit_terms: every gradient is a sum of products of the N(0, 1) inputs and upstream gradients
// (add, sub, mul with broadcasting), terms of size ~1 that may cancel in a broadcast input's sum
// (a [] operand of [3, 5]: 15 terms summed in another order on each device); its error is then
// also allowed tol ||R|| (tol (||R|| + ||R2||) used twice), the size of all its terms together.
inline void check_op(const std::string& what, const OpFn& f, const std::vector<OpInput>& in, double tol = 1e-5,
                     double grad_tol = -1, bool unit_terms = false) {
  if (grad_tol < 0) grad_tol = tol;
  INFO(what);
  Generator g(seed_of(in), 77);
  std::vector<Var<float>> probe;
  for (const auto& i : in) probe.emplace_back(i.value, false);
  Shape ys;
  {
    NoGrad ng;
    ys = f(probe).shape();
  }
  const Tensor<float> R = Tensor<float>::randn(ys, g), R2 = Tensor<float>::randn(ys, g);
  std::vector<double> once_norm(in.size(), 0.0);
  for (bool twice : {false, true}) {
    INFO((twice ? "inputs used twice (gradients accumulate)" : "inputs used once"));
    const OpRun cpu = run_op(f, in, R, R2, Device::CPU, twice);
    const OpRun dev = run_op(f, in, R, R2, Device::CUDA, twice);
    REQUIRE(dev.out.shape() == cpu.out.shape());
    CHECK(rel_err(dev.out, cpu.out) <= tol);
    for (size_t k = 0; k < in.size(); ++k) {
      INFO("gradient of input " << k);
      REQUIRE(dev.grads[k].defined() == cpu.grads[k].defined());
      if (!cpu.grads[k].defined()) continue;
      REQUIRE(dev.grads[k].shape() == cpu.grads[k].shape());
      double scale = std::max(norm2(cpu.grads[k]), once_norm[k]);
      if (unit_terms) scale = std::max(scale, norm2(R) + (twice ? norm2(R2) : 0.0));
      if (!twice) once_norm[k] = norm2(cpu.grads[k]);
      Tensor<float> diff = dev.grads[k].clone();
      for (size_t i = 0; i < diff.size(); ++i) diff[i] -= cpu.grads[k][i];
      const double err = norm2(diff) / std::max(scale, 1e-300);
      INFO("||cuda - cpu|| = " << norm2(diff) << ", relative to " << scale);
      CHECK(err <= grad_tol);
    }
  }
}

// check_op once per subset of the inputs made constant (requires_grad off): an op must still give
// the other inputs' gradients, and skip the work of the constant ones' without losing a term.
inline void check_frozen(const std::string& what, const OpFn& f, const std::vector<OpInput>& in,
                         const std::vector<std::vector<int>>& subsets, double tol, double grad_tol) {
  for (const std::vector<int>& frozen : subsets) {
    std::vector<OpInput> part = in;
    std::string name = what + ", constant inputs:";
    for (int i : frozen) {
      part.at(static_cast<size_t>(i)).requires_grad = false;
      name += " " + std::to_string(i);
    }
    check_op(name, f, part, tol, grad_tol);
  }
}

}  // namespace diffuse::testing
