// CPU references for the group_norm kernel cases (kernel_cases_group_norm.hpp). Defined in
// kernel_reference_group_norm.cpp, which the host compiler builds (nvcc never parses Eigen or the
// autograd): plain vectors in and out.
#pragma once

#include <cstdint>
#include <vector>

namespace diffuse::testing {

struct GroupNormRef {
  std::vector<float> y;                 // diffuse::group_norm(x, gamma, beta, G, eps, silu) [N, H, W, C]
  std::vector<float> dx, dgamma, dbeta; // its gradients through backward(sum(y * dy))
  std::vector<double> mean, rstd;       // [N * G], two passes in double (the CPU op's own values)
};

// x, dy [N, H, W, C] (NHWC), gamma, beta [C]; eps as a double (pass the float the kernel gets).
GroupNormRef cpu_group_norm(const std::vector<float>& x, const std::vector<float>& gamma,
                            const std::vector<float>& beta, const std::vector<float>& dy, std::int64_t N,
                            std::int64_t H, std::int64_t W, std::int64_t C, std::int64_t G, double eps, bool silu);

}  // namespace diffuse::testing
