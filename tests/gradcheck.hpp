// Finite-difference gradient check in double: L = sum(f(inputs) * R) for a
// fixed random R; each input element is perturbed by +-h and the central
// difference is compared with the autograd gradient.
#pragma once

#include <diffuse/diffuse.hpp>

#include <functional>
#include <vector>

namespace diffuse::testing {

inline double max_gradcheck_error(const std::function<Var<double>(const std::vector<Var<double>>&)>& f,
                                  std::vector<Var<double>> inputs, uint64_t seed, double h = 1e-6) {
  Generator g(seed, 1000);
  Tape<double>::current().clear();
  Var<double> out = f(inputs);
  Var<double> R(Tensor<double>::randn(out.shape(), g));
  auto loss_of = [&](const std::vector<Var<double>>& in) {
    NoGrad ng;
    Var<double> o = f(in);
    double s = 0;
    for (size_t i = 0; i < o.value().size(); ++i) s += o.value()[i] * R.value()[i];
    return s;
  };
  for (auto& v : inputs) v.zero_grad();
  Var<double> loss = sum(mul(out, R));
  backward(loss);
  double worst = 0;
  for (auto& v : inputs) {
    if (!v.requires_grad()) continue;
    Tensor<double> ga = v.grad();
    for (size_t i = 0; i < v.value().size(); ++i) {
      const double x = v.value()[i];
      v.value()[i] = x + h;
      const double lp = loss_of(inputs);
      v.value()[i] = x - h;
      const double lm = loss_of(inputs);
      v.value()[i] = x;
      const double num = (lp - lm) / (2 * h);
      const double an = ga.defined() ? ga[i] : 0.0;
      worst = std::max(worst, std::abs(num - an) / std::max(1.0, std::abs(num)));
    }
  }
  return worst;
}

inline Var<double> rand_var(Shape s, Generator& g, bool rg = true) {
  return Var<double>(Tensor<double>::randn(std::move(s), g), rg);
}

}  // namespace diffuse::testing
