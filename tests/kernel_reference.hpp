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

}  // namespace diffuse::testing
