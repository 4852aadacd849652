// ||a - b|| / ||b|| over all elements, b the reference: the measure every
// comparison in the tests uses (float against double, diffuse against PyTorch).
#pragma once

#include <catch2/catch.hpp>
#include <diffuse/core/tensor.hpp>

#include <algorithm>
#include <cmath>

namespace diffuse::testing {

template <class A, class B>
double rel_err(const Tensor<A>& a, const Tensor<B>& b) {
  REQUIRE(a.shape() == b.shape());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    num += d * d;
    den += static_cast<double>(b[i]) * static_cast<double>(b[i]);
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

}  // namespace diffuse::testing
