// CPU references for the kernel tests (see kernel_reference.hpp).
#include "kernel_reference.hpp"

#include <diffuse/ops.hpp>

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

}  // namespace diffuse::testing
