// CPU references for the conv kernel cases (kernel_cases_conv.hpp), computed by the CPU backend's
// diffuse::conv2d and its autograd. Defined in kernel_reference_conv.cpp (host compiler only, so
// nvcc never parses Eigen or the autograd).
#pragma once

#include <cstdint>
#include <vector>

namespace diffuse::testing {

struct ConvRefShape {
  std::int64_t N, H, W, C, O, kh, kw, stride_h, stride_w, pad_h, pad_w;
};

// y = conv2d(x, w) (no bias) with x [N, H, W, C] and w [O, C, kh, kw] (PyTorch layout), and the
// gradients of sum(y * dy): dx [N, H, W, C] and dw [O, C, kh, kw].
struct ConvRef {
  std::vector<float> y, dx, dw;
};
ConvRef cpu_conv2d(const ConvRefShape& s, const std::vector<float>& x, const std::vector<float>& w_oihw,
                   const std::vector<float>& dy);

}  // namespace diffuse::testing
