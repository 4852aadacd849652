// CPU references for the group_norm kernel cases, computed by the CPU backend (host compiler only).
#include "kernel_reference_group_norm.hpp"

#include <cmath>

#include <diffuse/ops/elementwise.hpp>
#include <diffuse/ops/reduce.hpp>
#include <diffuse/ops/group_norm.hpp>

namespace diffuse::testing {

GroupNormRef cpu_group_norm(const std::vector<float>& x, const std::vector<float>& gamma,
                            const std::vector<float>& beta, const std::vector<float>& dy, std::int64_t N,
                            std::int64_t H, std::int64_t W, std::int64_t C, std::int64_t G, double eps, bool silu) {
  const Shape shape{N, H, W, C};
  Var<float> X(Tensor<float>::from(x, shape), true), Ga(Tensor<float>::from(gamma, {C}), true),
      Be(Tensor<float>::from(beta, {C}), true);
  const Var<float> y = group_norm(X, Ga, Be, G, eps, silu);
  // d(sum(y * dy)) / dy = dy exactly, so the op's backward receives dy.
  backward(sum(mul(y, Var<float>(Tensor<float>::from(dy, shape)))));
  GroupNormRef r;
  r.y.assign(y.value().begin(), y.value().end());
  r.dx.assign(X.grad().begin(), X.grad().end());
  r.dgamma.assign(Ga.grad().begin(), Ga.grad().end());
  r.dbeta.assign(Be.grad().begin(), Be.grad().end());
  // Mean and rstd as the op computes them (in double, mean then squared deviations); the op
  // keeps them to itself.
  const std::int64_t HW = H * W, Cg = C / G;
  r.mean.assign(static_cast<size_t>(N * G), 0.0);
  r.rstd.assign(static_cast<size_t>(N * G), 0.0);
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t g = 0; g < G; ++g) {
      const double M = static_cast<double>(HW * Cg);
      double s = 0, q = 0;
      for (std::int64_t p = 0; p < HW; ++p)
        for (std::int64_t c = g * Cg; c < (g + 1) * Cg; ++c) s += x[static_cast<size_t>((n * HW + p) * C + c)];
      const double mu = M > 0 ? s / M : 0.0;
      for (std::int64_t p = 0; p < HW; ++p)
        for (std::int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
          const double d = x[static_cast<size_t>((n * HW + p) * C + c)] - mu;
          q += d * d;
        }
      r.mean[static_cast<size_t>(n * G + g)] = mu;
      r.rstd[static_cast<size_t>(n * G + g)] = 1.0 / std::sqrt((M > 0 ? q / M : 0.0) + eps);
    }
  return r;
}

}  // namespace diffuse::testing
