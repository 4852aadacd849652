// CPU references for the kernel tests (see kernel_reference.hpp).
#include "kernel_reference.hpp"

#include <diffuse/diffusion/objectives.hpp>
#include <diffuse/diffusion/q_sample.hpp>
#include <diffuse/diffusion/samplers.hpp>
#include <diffuse/ops/elementwise.hpp>
#include <diffuse/ops/linear.hpp>
#include <diffuse/ops/reduce.hpp>
#include <diffuse/diffusion/schedule.hpp>

namespace diffuse::testing {

std::vector<float> cpu_silu(const std::vector<float>& x) {
  NoGrad ng;
  const Var<float> y = silu(Var<float>(Tensor<float>::from(x, {static_cast<int64_t>(x.size())})));
  return std::vector<float>(y.value().begin(), y.value().end());
}

std::vector<double> cpu_row_sums(const std::vector<float>& x, std::int64_t rows, std::int64_t cols) {
  NoGrad ng;
  std::vector<double> out(static_cast<size_t>(rows));
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::vector<double> row(x.begin() + r * cols, x.begin() + (r + 1) * cols);
    out[static_cast<size_t>(r)] = sum(Var<double>(Tensor<double>::from(row, {cols}))).value()[0];
  }
  return out;
}

QSampleRef cpu_q_sample(int T, const std::vector<float>& x0, const std::vector<float>& eps,
                        const std::vector<std::int32_t>& t, std::int64_t row) {
  const NoiseSchedule s = NoiseSchedule::linear(T);
  const Shape shape{static_cast<int64_t>(t.size()), row};
  const Tensor<float> xt = q_sample(s, Tensor<float>::from(x0, shape), t, Tensor<float>::from(eps, shape));
  QSampleRef r;
  r.xt.assign(xt.begin(), xt.end());
  for (int i = 0; i < T; ++i) {
    r.sqrt_abar.push_back(static_cast<float>(s.sqrt_abar[i]));
    r.sqrt_one_minus_abar.push_back(static_cast<float>(s.sqrt_one_minus_abar[i]));
  }
  return r;
}

}  // namespace diffuse::testing
