// CPU references for the elementwise kernel cases (kernel_cases_elementwise.hpp), computed by the
// CPU backend's ops and their autograd backwards. Defined in kernel_reference_elementwise.cpp,
// which the host compiler builds (nvcc never parses Eigen and the autograd). A `prefill` argument
// is the gradient buffer's old contents: given, the CPU backward accumulates into it (as when a
// gradient already arrived); null, it writes.
#pragma once

#include <cstdint>
#include <vector>

namespace diffuse::testing {

std::vector<float> cpu_add(const std::vector<float>& a, const std::vector<float>& b);  // diffuse::add, same shapes
std::vector<float> cpu_scale(const std::vector<float>& x, float s);                    // diffuse::scale

// The gradient diffuse::silu's backward gives x for the upstream gradient dy.
std::vector<float> cpu_silu_backward(const std::vector<float>& x, const std::vector<float>& dy,
                                     const std::vector<float>* prefill);

// diffuse::add(y [rows, C], b [C]) (broadcast) in float; its backward for b in double (db = prefill
// + column sums of dy), so the reference's own rounding is negligible against the kernel's.
std::vector<float> cpu_add_row_bias(const std::vector<float>& y, const std::vector<float>& b, std::int64_t rows,
                                    std::int64_t C);
std::vector<double> cpu_row_bias_backward(const std::vector<float>& dy, const std::vector<float>& prefill,
                                          std::int64_t rows, std::int64_t C);

// diffuse::add_channel_bias(x [N, HW, C] as NHWC [N, HW, 1, C], b [N, C]) in float; its backward
// for b in double.
std::vector<float> cpu_add_channel_bias(const std::vector<float>& x, const std::vector<float>& b, std::int64_t N,
                                        std::int64_t HW, std::int64_t C);
std::vector<double> cpu_channel_bias_backward(const std::vector<float>& dy, const std::vector<float>* prefill,
                                              std::int64_t N, std::int64_t HW, std::int64_t C);

// diffuse::linear_act(z, I, b, Activation::SiLU) with the identity weight, so that the GEMM is
// exact and the op reduces to its epilogue: y = silu(z + b) and, for the upstream gradient dy,
// dx = dz (the gradient of the pre-activation; prefill: into dz's old contents).
struct BiasSiluRef {
  std::vector<float> y, dz;
};
BiasSiluRef cpu_bias_silu(const std::vector<float>& z, const std::vector<float>& b, const std::vector<float>& dy,
                          const std::vector<float>* prefill, std::int64_t rows, std::int64_t C);

// diffuse::mse(a, b) and its backward for the upstream gradient grad_scale: da and db (each
// into its own prefill when given).
struct MseRef {
  float loss;
  std::vector<float> da, db;
};
MseRef cpu_mse(const std::vector<float>& a, const std::vector<float>& b, float grad_scale,
               const std::vector<float>* prefill_a, const std::vector<float>* prefill_b);

// add(y [N, D], gather_rows(table [R, D], idx)) and gather_rows's backward for the upstream
// gradient dy: prefill + the rows of dy scattered to idx.
std::vector<float> cpu_gather_rows_add(const std::vector<float>& table, const std::vector<std::int32_t>& idx,
                                       const std::vector<float>& y, std::int64_t R, std::int64_t D);
std::vector<float> cpu_gather_rows_backward(const std::vector<std::int32_t>& idx, const std::vector<float>& dy,
                                            const std::vector<float>& prefill, std::int64_t R, std::int64_t D);

}  // namespace diffuse::testing
