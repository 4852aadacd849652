// Linear layer, y = x W^T + b, with PyTorch's parameter layout and default init.
#pragma once

#include <cmath>

#include <diffuse/nn/module.hpp>
#include <diffuse/ops/linear.hpp>

namespace diffuse {

template <class T>
class Linear : public Module<T> {
 public:
  // PyTorch's default: kaiming_uniform(a = sqrt(5)) for W and U(-1/sqrt(in), 1/sqrt(in)) for b,
  // which both come to U(-1/sqrt(in), 1/sqrt(in)).
  Linear(int64_t in, int64_t out, Generator& g, bool bias = true) : in_(in), out_(out) {
    const T bound = T(1) / std::sqrt(static_cast<T>(in));
    weight = this->register_parameter("weight", uniform({out, in}, bound, g));
    if (bias) this->bias = this->register_parameter("bias", uniform({out}, bound, g));
  }
  Var<T> operator()(const Var<T>& x) const { return linear(x, weight, bias); }
  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }

  Var<T> weight, bias;

 private:
  static Tensor<T> uniform(Shape s, T bound, Generator& g) {
    Tensor<T> t = Tensor<T>::rand(std::move(s), g);
    for (T& v : t) v = (T(2) * v - T(1)) * bound;
    return t;
  }
  int64_t in_, out_;
};

}  // namespace diffuse
