// add_channel_bias(x, b): x + b[:, None, None, :] for NHWC x [N, H, W, C] and b [N, C] (the
// ResBlock's time embedding).
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

namespace detail {
// db[n, c] (+)= the sum of g [N, HW, C] over the pixels of sample n: add_channel_bias's bias
// gradient (and the fused convolution's, ops/conv2d.hpp). Tasks of (sample, 64 channels):
// contiguous reads per pixel, sums in double, no reduction across threads.
template <class T>
void channel_bias_grad(const T* gd, GradSink<T>& s, int64_t N, int64_t HW, int64_t C) {
  constexpr int64_t kBlock = 64;
  const int64_t nblk = (C + kBlock - 1) / kBlock;
  parallel_for(N * nblk, static_cast<size_t>(N * HW * C) >= kParallelMin, [&](int64_t t) {
    const int64_t nn = t / nblk, c0 = (t % nblk) * kBlock, cb = std::min(C, c0 + kBlock) - c0;
    double acc[kBlock] = {};
    const T* gp = gd + nn * HW * C + c0;
    for (int64_t p = 0; p < HW; ++p)
      for (int64_t c = 0; c < cb; ++c) acc[c] += gp[p * C + c];
    for (int64_t c = 0; c < cb; ++c) s.put(static_cast<size_t>(nn * C + c0 + c), acc[c]);
  });
}

inline Var<float> add_channel_bias_cuda(const Var<float>& x, const Var<float>& b, int64_t N, int64_t HW, int64_t C) {
  backend::CudaBackend& be = backend::require_cuda("add_channel_bias");
  Tensor<float> out(x.shape(), Device::CUDA);
  be.add_channel_bias(x.value().data(), b.value().data(), out.data(), N, HW, C);
  return make_result<float>(std::move(out), {&x, &b}, [x, b, N, HW, C]() {
    return [x, b, N, HW, C](const Tensor<float>& g) {
      backend::CudaBackend& be = *backend::cuda_backend();
      if (x.requires_grad()) {
        GradSink<float> s = grad_sink(*x.node());
        be.copy(g.data(), s.data, g.numel(), s.accumulate);
      }
      if (b.requires_grad()) {
        GradSink<float> s = grad_sink(*b.node());
        be.channel_bias_backward(g.data(), s.data, N, HW, C, s.accumulate);
      }
    };
  });
}
}  // namespace detail

// x NHWC [N, H, W, C] plus b [N, C] broadcast over H and W: the ResBlock's
// h + temb_proj(emb)[:, :, None, None]. Backward: dx = g, db[n, c] = sum over pixels.
template <class T>
Var<T> add_channel_bias(const Var<T>& x, const Var<T>& b) {
  detail::require_nhwc("add_channel_bias", x.shape());
  const int64_t N = x.size(0), HW = x.size(1) * x.size(2), C = x.size(3);
  if (b.value().dim() != 2 || b.size(0) != N || b.size(1) != C)
    throw std::invalid_argument("diffuse: add_channel_bias: bias must have shape [" + std::to_string(N) + ", " +
                                std::to_string(C) + "] for x " + shape_str(x.shape()) + ", got " +
                                shape_str(b.shape()));
  if (detail::op_device("add_channel_bias", {&x, &b}) == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::add_channel_bias_cuda(x, b, N, HW, C);
    else detail::cuda_float_only("add_channel_bias");
  }
  Tensor<T> out(x.shape());
  const T* xd = x.value().data();
  const T* bd = b.value().data();
  T* od = out.data();
  parallel_for(N * HW, out.size() >= detail::kParallelMin, [&](int64_t r) {
    const T* br = bd + (r / HW) * C;
    for (int64_t c = 0; c < C; ++c) od[r * C + c] = xd[r * C + c] + br[c];
  });
  return make_result<T>(std::move(out), {&x, &b}, [x, b, N, HW, C]() {
    return [x, b, N, HW, C](const Tensor<T>& g) {
      const T* gd = g.data();
      const size_t n = g.size();
      if (x.requires_grad()) {
        GradSink<T> s = grad_sink(*x.node());
        parallel_for(n, n >= detail::kParallelMin, [&](size_t i) { s.put(i, gd[i]); });
      }
      if (b.requires_grad()) {
        GradSink<T> s = grad_sink(*b.node());
        detail::channel_bias_grad(gd, s, N, HW, C);
      }
    };
  });
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Var<float> add_channel_bias<float>(const Var<float>& x, const Var<float>& b))

}  // namespace diffuse
