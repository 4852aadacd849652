// The library's one image layout is NHWC: a tensor [N, H, W, C] with the channels fastest.
// PyTorch is NCHW; nchw_to_nhwc and nhwc_to_nchw convert at that boundary only (channel
// concatenation is concat(xs, 3), ops/shape.hpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <diffuse/ops/common.hpp>

namespace diffuse {

// [N, C, H, W] -> [N, H, W, C] (a copy of a CPU tensor; not an autograd op: permute() is).
template <class T>
Tensor<T> nchw_to_nhwc(const Tensor<T>& t) {
  t.require_cpu("nchw_to_nhwc");
  if (t.dim() != 4)
    throw std::invalid_argument("diffuse: nchw_to_nhwc needs a 4-D tensor, got " + shape_str(t.shape()));
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3), HW = H * W;
  Tensor<T> out({N, H, W, C});
  const T* s = t.data();
  T* d = out.data();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < HW; ++p) d[(n * HW + p) * C + c] = s[(n * C + c) * HW + p];
  return out;
}

// [N, H, W, C] -> [N, C, H, W] (a copy of a CPU tensor; not an autograd op: permute() is).
template <class T>
Tensor<T> nhwc_to_nchw(const Tensor<T>& t) {
  t.require_cpu("nhwc_to_nchw");
  if (t.dim() != 4)
    throw std::invalid_argument("diffuse: nhwc_to_nchw needs a 4-D tensor, got " + shape_str(t.shape()));
  const int64_t N = t.size(0), H = t.size(1), W = t.size(2), C = t.size(3), HW = H * W;
  Tensor<T> out({N, C, H, W});
  const T* s = t.data();
  T* d = out.data();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < HW; ++p) d[(n * C + c) * HW + p] = s[(n * HW + p) * C + c];
  return out;
}

namespace detail {

inline void require_nhwc(const char* op, const Shape& s) {
  if (s.size() != 4)
    throw std::invalid_argument(std::string("diffuse: ") + op + " needs an NHWC tensor [N, H, W, C], got " +
                                shape_str(s));
}
}  // namespace detail

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Tensor<float> nchw_to_nhwc<float>(const Tensor<float>& t))
DIFFUSE_FLOAT_INSTANCE(Tensor<float> nhwc_to_nchw<float>(const Tensor<float>& t))

}  // namespace diffuse
