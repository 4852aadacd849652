// CPU references for the kernel tests, computed by the CPU backend. Defined in
// kernel_reference.cpp, which the host compiler builds, so that nvcc never parses Eigen and the
// autograd.
#pragma once

#include <cstdint>
#include <vector>

namespace diffuse::testing {

std::vector<float> cpu_silu(const std::vector<float>& x);  // diffuse::silu
// diffuse::sum of each row of a row-major [rows, cols], in double.
std::vector<double> cpu_row_sums(const std::vector<float>& x, std::int64_t rows, std::int64_t cols);

// diffuse::q_sample with a linear schedule of T steps on x0, eps [B, row]; also returns the
// schedule's coefficient tables rounded to float, as the kernel takes them.
struct QSampleRef {
  std::vector<float> xt, sqrt_abar, sqrt_one_minus_abar;
};
QSampleRef cpu_q_sample(int T, const std::vector<float>& x0, const std::vector<float>& eps,
                        const std::vector<std::int32_t>& t, std::int64_t row);

}  // namespace diffuse::testing
