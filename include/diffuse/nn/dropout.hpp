// Dropout as a module: active in training mode (train(), the default) when given a generator,
// the identity in eval() mode or without one. The mask is drawn from the caller's Generator
// (diffuse passes random streams explicitly, so a resumed run draws the same masks).
#pragma once

#include <stdexcept>
#include <string>

#include <diffuse/nn/module.hpp>
#include <diffuse/ops/dropout.hpp>

namespace diffuse {

template <class T>
class Dropout : public Module<T> {
 public:
  explicit Dropout(double p) : p_(p) {
    if (!(p >= 0.0 && p < 1.0)) throw std::invalid_argument("diffuse: Dropout probability must be in [0, 1), got " + std::to_string(p));
  }
  Var<T> operator()(const Var<T>& x, Generator* rng) const {
    if (!this->is_training() || !rng || p_ == 0.0) return x;
    return dropout(x, p_, *rng, true);
  }
  double p() const { return p_; }

 private:
  double p_;
};

}  // namespace diffuse
