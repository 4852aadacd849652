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

// float's unit roundoff: one rounding changes a value by at most this fraction of it.
inline constexpr double kFloatU = 0x1p-24;

// The bound for ||a - b|| / ||b|| when a and b are float evaluations of the same outputs (or one
// is exact, in double), each output a sum of about K rounded products, summed in different
// orders, through `depth` such sums in a chain (layers; a backward pass is another chain).
// Derivation: a sum of K terms of mixed sign is about sqrt(K) terms in size, and the rounding of
// its j-th partial sum (sqrt(j) terms in size) adds a random error of u times that; these add in
// quadrature to u K / sqrt(2) terms, relative to the sum u sqrt(K / 2). Two independent
// evaluations differ by sqrt(2) of that, u sqrt(K); the layers of a chain add their independent
// errors in quadrature too (each passed on with a gain of about 1: the layers are normalised),
// u sqrt(depth K). The norm over all outputs averages many such errors, so 4 times this root mean
// square is a bound a correct implementation does not reach; blocked sums and fused multiply-adds
// round less than a serial sum, and the tests print what they see, so the margin can be read off
// a run.
inline double float_sums_tolerance(double K, double depth = 1) { return 4 * std::sqrt(depth * K) * kFloatU; }

}  // namespace diffuse::testing
