// CPU references for the attention kernel cases (kernel_cases_attention.hpp), computed by the
// CPU backend in DOUBLE from the tests' float inputs, so that they are exact to far below float
// rounding and a test's tolerance is the device's error alone. Defined in
// kernel_reference_attention.cpp (host compiler only: nvcc never parses Eigen or the autograd).
#pragma once

#include <cstdint>
#include <vector>

namespace diffuse::testing {

// diffuse::detail::softmax_rows<double> (the CPU attention's softmax) over the rows of L values
// of the row-major x [rows, L].
std::vector<double> cpu_softmax_rows(const std::vector<float>& x, std::int64_t rows, std::int64_t L);

// The dS step of diffuse::detail::attention_backward in double: for each row,
// P * (dP - sum_j P_j dP_j).
std::vector<double> cpu_softmax_backward_rows(const std::vector<float>& P, const std::vector<float>& dP,
                                              std::int64_t rows, std::int64_t L);

// diffuse::attention<double>(q, k, v, heads) on [N, L, C] tensors and its autograd backward
// seeded with g = d(loss)/d(out): out, dq, dk, dv ([N, L, C]), and the probabilities P
// [N, heads, L, L] of diffuse::detail::attention_forward<double> (the op keeps them hidden).
struct AttentionRef {
  std::vector<double> out, P, dq, dk, dv;
};
AttentionRef cpu_attention(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                           const std::vector<float>& g, std::int64_t N, std::int64_t L, std::int64_t C,
                           std::int64_t heads);

}  // namespace diffuse::testing
