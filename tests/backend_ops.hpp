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

// Output and gradients of f on CUDA within `tol` (relative, ||cuda - cpu|| / ||cpu||) of the CPU's.
inline void check_op(const std::string& what, const OpFn& f, const std::vector<OpInput>& in, double tol = 1e-5,
                     double grad_tol = -1) {
  if (grad_tol < 0) grad_tol = tol;
  INFO(what);
  Generator g(fresh_seed(), 77);
  std::vector<Var<float>> probe;
  for (const auto& i : in) probe.emplace_back(i.value, false);
  Shape ys;
  {
    NoGrad ng;
    ys = f(probe).shape();
  }
  const Tensor<float> R = Tensor<float>::randn(ys, g), R2 = Tensor<float>::randn(ys, g);
  for (bool twice : {false, true}) {
    INFO((twice ? "inputs used twice (gradients accumulate)" : "inputs used once"));
    const OpRun cpu = run_op(f, in, R, R2, Device::CPU, twice);
    const OpRun dev = run_op(f, in, R, R2, Device::CUDA, twice);
    REQUIRE(dev.out.shape() == cpu.out.shape());
    CHECK(rel_err(dev.out, cpu.out) <= tol);
    for (size_t k = 0; k < in.size(); ++k) {
      INFO("gradient of input " << k);
      REQUIRE(dev.grads[k].defined() == cpu.grads[k].defined());
      if (cpu.grads[k].defined()) CHECK(rel_err(dev.grads[k], cpu.grads[k]) <= grad_tol);
    }
  }
}

}  // namespace diffuse::testing
