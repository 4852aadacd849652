// upsample_nearest2x(x): F.interpolate(scale_factor=2, mode="nearest") on NHWC images.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <diffuse/ops/nhwc.hpp>
#include <diffuse/ops/common.hpp>

namespace diffuse {

// Nearest-neighbour 2x upsampling, NHWC [N, H, W, C] -> [N, 2H, 2W, C], as
// F.interpolate(x, scale_factor=2, mode="nearest"); the backward sums the 4 copies.
namespace detail {
inline Var<float> upsample_nearest2x_cuda(const Var<float>& x, int64_t N, int64_t H, int64_t W, int64_t C) {
  backend::CudaBackend& be = backend::require_cuda("upsample_nearest2x");
  Tensor<float> out({N, 2 * H, 2 * W, C}, Device::CUDA);
  be.upsample_nearest2x(x.value().data(), out.data(), N, H, W, C);
  return make_result<float>(std::move(out), {&x}, [x, N, H, W, C]() {
    return [x, N, H, W, C](const Tensor<float>& g) {
      GradSink<float> s = grad_sink(*x.node());
      backend::cuda_backend()->upsample_nearest2x_backward(g.data(), s.data, N, H, W, C, s.accumulate);
    };
  });
}
}  // namespace detail

template <class T>
Var<T> upsample_nearest2x(const Var<T>& x) {
  detail::require_nhwc("upsample_nearest2x", x.shape());
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  if (x.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::upsample_nearest2x_cuda(x, N, H, W, C);
    else detail::cuda_float_only("upsample_nearest2x");
  }
  Tensor<T> out({N, 2 * H, 2 * W, C});
  const T* xd = x.value().data();
  T* od = out.data();
  const int64_t orow = 2 * W * C;  // one output row
  // Each input row r = (n, h) fills output rows 2h and 2h + 1 of sample n, i.e. 2r and 2r + 1.
  parallel_for(N * H, out.size() >= detail::kParallelMin, [&](int64_t r) {
    T* o0 = od + 2 * r * orow;
    for (int64_t w = 0; w < W; ++w) {
      const T* s = xd + (r * W + w) * C;
      std::copy_n(s, C, o0 + 2 * w * C);
      std::copy_n(s, C, o0 + (2 * w + 1) * C);
    }
    std::copy_n(o0, orow, o0 + orow);
  });
  return make_result<T>(std::move(out), {&x}, [x, N, H, W, C, orow]() {
    return [x, N, H, W, C, orow](const Tensor<T>& g) {
      GradSink<T> s = grad_sink(*x.node());
      const T* gd = g.data();
      parallel_for(N * H, g.size() >= detail::kParallelMin, [&](int64_t r) {
        const T* g0 = gd + 2 * r * orow;
        const T* g1 = g0 + orow;
        for (int64_t w = 0; w < W; ++w)
          for (int64_t c = 0; c < C; ++c) {
            const int64_t a = 2 * w * C + c, b = a + C;
            s.put(static_cast<size_t>((r * W + w) * C + c), (g0[a] + g0[b]) + (g1[a] + g1[b]));
          }
      });
    };
  });
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Var<float> upsample_nearest2x<float>(const Var<float>& x))

}  // namespace diffuse
