// Image resizing for data preparation (MNIST 28 -> 16, FID's resize to 299), on
// NHWC images [N, H, W, C], with PyTorch's arithmetic so that data prepared
// here equals data prepared by the Python reference:
//
//   resize_area      F.interpolate(x, size, mode="area") = F.adaptive_avg_pool2d:
//                    output i averages input [floor(i in / out), ceil((i+1) in / out)).
//   resize_bilinear  F.interpolate(x, size, mode="bilinear", align_corners=False),
//                    no antialias: source = (i + 0.5) in / out - 0.5, clamped
//                    at 0, between input i0 = floor(source) and min(i0 + 1, in - 1).
//                    Up and down; downsampling by more than 2 skips pixels, as
//                    PyTorch's does.
//
// Area is bit-exact with PyTorch (torch 1.13, CPU). For bilinear PyTorch has
// two CPU kernels that differ by a rounding: the channels-last one (also taken
// when C == 1) weights the four pixels by wy * wx rounded to T and sums the
// products in double, and this does the same (bit-exact in the test); the
// NCHW one for C > 1 rounds each 1-D step, about 1 ulp away.
//
// Plain functions, not autograd ops: inputs are data, not parameters.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/core/parallel.hpp>
#include <diffuse/core/tensor.hpp>

namespace diffuse {

namespace detail {

// One output position along one axis of a bilinear resize: the two input
// indices and their weights.
template <class T>
struct LinearTap {
  int64_t i0, i1;
  T w0, w1;
};

// PyTorch's compute_source_index_and_lambda (align_corners=False), as torch
// 1.13 evaluates it: the scale in T, the source index in double, the weight
// w1 rounded to T and w0 = 1 - w1 in T (bit-exact weights, checked by test).
template <class T>
std::vector<LinearTap<T>> linear_taps(int64_t in, int64_t out) {
  std::vector<LinearTap<T>> taps(static_cast<size_t>(out));
  const T scale = static_cast<T>(in) / static_cast<T>(out);
  for (int64_t i = 0; i < out; ++i) {
    LinearTap<T>& t = taps[static_cast<size_t>(i)];
    if (in == out) {
      t = {i, i, T(1), T(0)};
      continue;
    }
    double src = static_cast<double>(scale) * (static_cast<double>(i) + 0.5) - 0.5;
    if (src < 0.0) src = 0.0;
    t.i0 = static_cast<int64_t>(src);
    t.i1 = t.i0 + (t.i0 < in - 1 ? 1 : 0);
    t.w1 = static_cast<T>(src - static_cast<double>(t.i0));
    t.w0 = T(1) - t.w1;
  }
  return taps;
}

inline void check_resize_dims(const char* fn, int64_t n, int64_t h, int64_t w, int64_t c, int64_t oh, int64_t ow) {
  if (n < 0 || h <= 0 || w <= 0 || c <= 0 || oh <= 0 || ow <= 0)
    throw std::invalid_argument(std::string(fn) + ": sizes must be positive (N " + std::to_string(n) + ", " +
                                std::to_string(h) + "x" + std::to_string(w) + "x" + std::to_string(c) + " -> " +
                                std::to_string(oh) + "x" + std::to_string(ow) + ")");
}

inline constexpr int64_t kResizeParallelMin = 1 << 15;  // output elements worth a thread team

}  // namespace detail

// in [n, h, w, c] -> out [n, oh, ow, c], both NHWC and contiguous.
template <class T>
void resize_area(const T* in, T* out, int64_t n, int64_t h, int64_t w, int64_t c, int64_t oh, int64_t ow) {
  detail::check_resize_dims("resize_area", n, h, w, c, oh, ow);
  std::vector<int64_t> y0(static_cast<size_t>(oh)), y1(y0.size()), x0(static_cast<size_t>(ow)), x1(x0.size());
  for (int64_t i = 0; i < oh; ++i) { y0[size_t(i)] = i * h / oh; y1[size_t(i)] = ((i + 1) * h + oh - 1) / oh; }
  for (int64_t i = 0; i < ow; ++i) { x0[size_t(i)] = i * w / ow; x1[size_t(i)] = ((i + 1) * w + ow - 1) / ow; }
  parallel_for(n * oh, n * oh * ow * c >= detail::kResizeParallelMin, [&](int64_t r) {
    const int64_t b = r / oh, oy = r % oh;
    const T* src = in + b * h * w * c;
    T* dst = out + r * ow * c;
    const int64_t kh = y1[size_t(oy)] - y0[size_t(oy)];
    for (int64_t ox = 0; ox < ow; ++ox) {
      const int64_t kw = x1[size_t(ox)] - x0[size_t(ox)];
      for (int64_t ch = 0; ch < c; ++ch) {
        T sum = 0;  // PyTorch's order: rows, then columns, in T; then / kh / kw
        for (int64_t y = y0[size_t(oy)]; y < y1[size_t(oy)]; ++y)
          for (int64_t x = x0[size_t(ox)]; x < x1[size_t(ox)]; ++x) sum += src[(y * w + x) * c + ch];
        dst[ox * c + ch] = sum / static_cast<T>(kh) / static_cast<T>(kw);
      }
    }
  });
}

// in [n, h, w, c] -> out [n, oh, ow, c], both NHWC and contiguous.
template <class T>
void resize_bilinear(const T* in, T* out, int64_t n, int64_t h, int64_t w, int64_t c, int64_t oh, int64_t ow) {
  detail::check_resize_dims("resize_bilinear", n, h, w, c, oh, ow);
  const auto ty = detail::linear_taps<T>(h, oh), tx = detail::linear_taps<T>(w, ow);
  parallel_for(n * oh, n * oh * ow * c >= detail::kResizeParallelMin, [&](int64_t r) {
    const int64_t b = r / oh;
    const detail::LinearTap<T>& vy = ty[size_t(r % oh)];
    const T* row0 = in + (b * h + vy.i0) * w * c;
    const T* row1 = in + (b * h + vy.i1) * w * c;
    T* dst = out + r * ow * c;
    for (int64_t ox = 0; ox < ow; ++ox) {
      const detail::LinearTap<T>& vx = tx[size_t(ox)];
      // Float products are exact in double, so the sum rounds once (and an
      // FMA contraction cannot change it).
      const double w00 = static_cast<T>(vy.w0 * vx.w0), w01 = static_cast<T>(vy.w0 * vx.w1);
      const double w10 = static_cast<T>(vy.w1 * vx.w0), w11 = static_cast<T>(vy.w1 * vx.w1);
      const T *p00 = row0 + vx.i0 * c, *p01 = row0 + vx.i1 * c, *p10 = row1 + vx.i0 * c, *p11 = row1 + vx.i1 * c;
      for (int64_t ch = 0; ch < c; ++ch)
        dst[ox * c + ch] = static_cast<T>(static_cast<double>(p00[ch]) * w00 + static_cast<double>(p01[ch]) * w01 +
                                          static_cast<double>(p10[ch]) * w10 + static_cast<double>(p11[ch]) * w11);
    }
  });
}

// Tensor forms: x is a CPU NHWC tensor [N, H, W, C]; returns [N, oh, ow, C].
namespace detail {
template <class T, class F>
Tensor<T> resize_tensor(const char* fn, const Tensor<T>& x, int64_t oh, int64_t ow, F f) {
  if (x.dim() != 4 || x.device() != Device::CPU)
    throw std::invalid_argument(std::string(fn) + ": expected a CPU NHWC tensor [N, H, W, C], got " +
                                shape_str(x.shape()) + " on " + device_name(x.device()));
  check_resize_dims(fn, x.size(0), x.size(1), x.size(2), x.size(3), oh, ow);
  Tensor<T> y({x.size(0), oh, ow, x.size(3)});
  f(x.data(), y.data(), x.size(0), x.size(1), x.size(2), x.size(3), oh, ow);
  return y;
}
}  // namespace detail

template <class T>
Tensor<T> resize_area(const Tensor<T>& x, int64_t oh, int64_t ow) {
  return detail::resize_tensor("resize_area", x, oh, ow, [](auto... a) { resize_area<T>(a...); });
}

template <class T>
Tensor<T> resize_bilinear(const Tensor<T>& x, int64_t oh, int64_t ow) {
  return detail::resize_tensor("resize_bilinear", x, oh, ow, [](auto... a) { resize_bilinear<T>(a...); });
}

}  // namespace diffuse
