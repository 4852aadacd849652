// Ops that move numbers without arithmetic: concat, slice, gather_rows (an embedding lookup),
// reshape, permute and transpose, on the device of their operands.
#pragma once

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <diffuse/ops/common.hpp>

namespace diffuse {

namespace detail {
inline Var<float> concat_cuda(const std::vector<Var<float>>& xs, const Shape& os, int64_t axis, int64_t outer,
                              int64_t inner) {
  backend::CudaBackend& be = backend::require_cuda("concat");
  Tensor<float> out(os, Device::CUDA);
  const int64_t row = os[axis] * inner;
  std::vector<int64_t> offs;
  int64_t off = 0;
  for (const auto& v : xs) {
    const int64_t w = v.shape()[axis] * inner;
    offs.push_back(off);
    be.copy_2d(v.value().data(), w, out.data() + off, row, outer, w, false);
    off += w;
  }
  bool need = false;
  if (Tape<float>::grad_enabled())
    for (const auto& v : xs) need = need || v.requires_grad();
  Var<float> res(std::move(out), need);
  if (need)
    Tape<float>::current().record(res.node_ptr(), [xs, offs, outer, inner, row, axis](const Tensor<float>& g) {
      backend::CudaBackend& be = *backend::cuda_backend();
      for (size_t k = 0; k < xs.size(); ++k) {
        if (!xs[k].requires_grad()) continue;
        const int64_t w = xs[k].shape()[axis] * inner;
        GradSink<float> s = grad_sink(*xs[k].node());
        be.copy_2d(g.data() + offs[k], row, s.data, w, outer, w, s.accumulate);
      }
    }, xs);
  return res;
}
}  // namespace detail

namespace detail {
// concat's checks (shapes, then devices): the output's shape; axis normalised in place (res_block
// checks its concatenated input with them).
template <class T>
Shape checked_concat_shape(const std::vector<Var<T>>& xs, int64_t& axis) {
  if (xs.empty()) throw std::invalid_argument("diffuse: concat of nothing");
  const Shape& s0 = xs[0].shape();
  const int64_t nd = static_cast<int64_t>(s0.size());
  if (axis < 0) axis += nd;
  if (axis < 0 || axis >= nd) throw std::invalid_argument("diffuse: concat axis out of range");
  Shape os = s0;
  os[axis] = 0;
  for (const auto& v : xs) {
    for (int64_t d = 0; d < nd; ++d)
      if (d != axis && (static_cast<int64_t>(v.shape().size()) != nd || v.shape()[d] != s0[d]))
        detail::shape_error("concat", s0, v.shape());
    os[axis] += v.shape()[axis];
  }
  const Device dev = xs[0].device();
  for (const auto& v : xs)
    if (v.device() != dev)
      throw std::invalid_argument("diffuse: concat: operands on different devices (" + std::string(device_name(dev)) +
                                  " and " + device_name(v.device()) + "); move them with .to(Device::...) first");
  return os;
}
}  // namespace detail

// Concatenation along `axis`.
template <class T>
Var<T> concat(const std::vector<Var<T>>& xs, int64_t axis) {
  const Shape os = detail::checked_concat_shape(xs, axis);
  const Shape& s0 = xs[0].shape();
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= s0[d];
  for (int64_t d = axis + 1; d < static_cast<int64_t>(s0.size()); ++d) inner *= s0[d];
  const Device dev = xs[0].device();
  if (dev == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::concat_cuda(xs, os, axis, outer, inner);
    else detail::cuda_float_only("concat");
  }
  Tensor<T> out(os);
  const int64_t row = os[axis] * inner;
  int64_t off = 0;
  std::vector<int64_t> offs;
  for (const auto& v : xs) {
    const int64_t w = v.shape()[axis] * inner;
    offs.push_back(off);
    for (int64_t o = 0; o < outer; ++o)
      std::copy_n(v.value().data() + o * w, w, out.data() + o * row + off);
    off += w;
  }
  bool need = false;
  if (Tape<T>::grad_enabled())
    for (const auto& v : xs) need = need || v.requires_grad();
  Var<T> res(std::move(out), need);
  if (need) {
    Tape<T>::current().record(res.node_ptr(), [xs, offs, outer, inner, row, axis](const Tensor<T>& g) {
      for (size_t k = 0; k < xs.size(); ++k) {
        if (!xs[k].requires_grad()) continue;
        const int64_t w = xs[k].shape()[axis] * inner;
        GradSink<T> s = grad_sink(*xs[k].node());
        for (int64_t o = 0; o < outer; ++o)
          for (int64_t j = 0; j < w; ++j) s.put(static_cast<size_t>(o * w + j), g[o * row + offs[k] + j]);
      }
    }, xs);
  }
  return res;
}

namespace detail {
inline Var<float> slice_cuda(const Var<float>& a, const Shape& os, int64_t outer, int64_t w, int64_t row,
                             int64_t off) {
  backend::CudaBackend& be = backend::require_cuda("slice");
  Tensor<float> out(os, Device::CUDA);
  be.copy_2d(a.value().data() + off, row, out.data(), w, outer, w, false);
  return make_result<float>(std::move(out), {&a}, [a, outer, w, row, off]() {
    return [a, outer, w, row, off](const Tensor<float>& g) {
      backend::CudaBackend& be = *backend::cuda_backend();
      GradSink<float> s = grad_sink(*a.node());
      if (!s.accumulate) be.fill(s.data, a.value().numel(), 0.0f);
      be.copy_2d(g.data(), w, s.data + off, row, outer, w, true);
    };
  });
}
}  // namespace detail

// Elements [start, end) along `axis` (a copy).
template <class T>
Var<T> slice(const Var<T>& a, int64_t axis, int64_t start, int64_t end) {
  const Shape& s = a.shape();
  const int64_t nd = static_cast<int64_t>(s.size());
  if (axis < 0) axis += nd;
  if (axis < 0 || axis >= nd || start < 0 || end > s[axis] || start > end)
    throw std::invalid_argument("diffuse: slice [" + std::to_string(start) + ", " + std::to_string(end) +
                                ") out of range for " + shape_str(s));
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= s[d];
  for (int64_t d = axis + 1; d < nd; ++d) inner *= s[d];
  Shape os = s;
  os[axis] = end - start;
  const int64_t w = (end - start) * inner, row = s[axis] * inner, off = start * inner;
  if (a.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::slice_cuda(a, os, outer, w, row, off);
    else detail::cuda_float_only("slice");
  }
  Tensor<T> out(os);
  for (int64_t o = 0; o < outer; ++o) std::copy_n(a.value().data() + o * row + off, w, out.data() + o * w);
  return make_result<T>(std::move(out), {&a}, [a, outer, w, row, off]() {
    return [a, outer, w, row, off](const Tensor<T>& g) {
      GradSink<T> s = grad_sink(*a.node());
      if (!s.accumulate) std::fill(s.data, s.data + a.value().size(), T(0));
      for (int64_t o = 0; o < outer; ++o)
        for (int64_t j = 0; j < w; ++j) s.data[o * row + off + j] += g[o * w + j];
    };
  });
}

namespace detail {
inline Var<float> gather_rows_cuda(const Var<float>& table, const std::vector<int32_t>& idx, int64_t N, int64_t V,
                                   int64_t D) {
  backend::CudaBackend& be = backend::require_cuda("gather_rows");
  const Tensor<int32_t> ids = device_indices(idx);
  Tensor<float> out({N, D}, Device::CUDA);
  be.gather_rows(table.value().data(), ids.data(), out.data(), N, D, false);
  return make_result<float>(std::move(out), {&table}, [table, ids, N, V, D]() {
    return [table, ids, N, V, D](const Tensor<float>& g) {
      GradSink<float> s = grad_sink(*table.node());
      backend::cuda_backend()->scatter_rows(ids.data(), g.data(), s.data, N, V, D, s.accumulate);
    };
  });
}
}  // namespace detail

// out[i, :] = table[idx[i], :]   (an embedding lookup; the backward scatters-adds).
template <class T>
Var<T> gather_rows(const Var<T>& table, const std::vector<int32_t>& idx) {
  if (table.value().dim() != 2) throw std::invalid_argument("diffuse: gather_rows needs a 2-D table");
  const int64_t V = table.size(0), D = table.size(1), N = static_cast<int64_t>(idx.size());
  for (int64_t i = 0; i < N; ++i)
    if (idx[i] < 0 || idx[i] >= V)
      throw std::out_of_range("diffuse: gather_rows index " + std::to_string(idx[i]) + " outside [0, " +
                              std::to_string(V) + ")");
  if (table.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::gather_rows_cuda(table, idx, N, V, D);
    else detail::cuda_float_only("gather_rows");
  }
  Tensor<T> out({N, D});
  for (int64_t i = 0; i < N; ++i) std::copy_n(table.value().data() + idx[i] * D, D, out.data() + i * D);
  return make_result<T>(std::move(out), {&table}, [table, idx, D]() {
    return [table, idx, D](const Tensor<T>& g) {
      GradSink<T> s = grad_sink(*table.node());
      if (!s.accumulate) std::fill(s.data, s.data + table.value().size(), T(0));
      for (size_t i = 0; i < idx.size(); ++i)
        for (int64_t j = 0; j < D; ++j) s.data[idx[i] * D + j] += g[i * D + j];
    };
  });
}

namespace detail {
// The sizes of x.permute(perm) and the stride in x of each of its dimensions.
inline void permute_plan(const Shape& xs, const std::vector<int>& perm, Shape& ys, std::vector<int64_t>& src_stride) {
  const size_t nd = xs.size();
  std::vector<bool> seen(nd, false);
  bool ok = perm.size() == nd;
  for (size_t i = 0; ok && i < nd; ++i) {
    ok = perm[i] >= 0 && static_cast<size_t>(perm[i]) < nd && !seen[static_cast<size_t>(perm[i])];
    if (ok) seen[static_cast<size_t>(perm[i])] = true;
  }
  if (!ok) {
    std::string p;
    for (int v : perm) p += (p.empty() ? "" : ", ") + std::to_string(v);
    throw std::invalid_argument("diffuse: permute: (" + p + ") is not a permutation of the " + std::to_string(nd) +
                                " dimensions of " + shape_str(xs));
  }
  std::vector<int64_t> xstride(nd, 1);
  for (size_t d = nd; d-- > 1;) xstride[d - 1] = xstride[d] * xs[d];
  ys.resize(nd);
  src_stride.resize(nd);
  for (size_t i = 0; i < nd; ++i) {
    ys[i] = xs[static_cast<size_t>(perm[i])];
    src_stride[i] = xstride[static_cast<size_t>(perm[i])];
  }
}

// y[i] (+)= x[offset of y's element i in x], walking y in order (an odometer over its dimensions);
// scatter: x[...] (+)= y[i] instead (the backward, through the inverse map).
template <class T>
inline void permute_copy(const T* x, T* y, const Shape& ys, const std::vector<int64_t>& src_stride, bool scatter,
                         bool acc) {
  const size_t nd = ys.size();
  const int64_t n = shape_numel(ys);
  std::vector<int64_t> idx(nd, 0);
  int64_t off = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (scatter) {
      T* d = const_cast<T*>(x) + off;
      *d = acc ? *d + y[i] : y[i];
    } else {
      y[i] = acc ? y[i] + x[off] : x[off];
    }
    for (size_t k = nd; k-- > 0;) {
      ++idx[k];
      off += src_stride[k];
      if (idx[k] < ys[k]) break;
      off -= src_stride[k] * idx[k];
      idx[k] = 0;
    }
  }
}

inline Var<float> permute_cuda(const Var<float>& x, const std::vector<int>& perm, const Shape& ys) {
  backend::CudaBackend& be = backend::require_cuda("permute");
  if (x.shape().size() > static_cast<size_t>(backend::kMaxDims))
    throw std::invalid_argument("diffuse: permute on cuda: at most " + std::to_string(backend::kMaxDims) + " dimensions");
  Tensor<float> out(ys, Device::CUDA);
  const Shape xs = x.shape();
  be.permute(x.value().data(), out.data(), static_cast<int>(xs.size()), xs.data(), perm.data(), false);
  // The backward is the inverse permutation of the gradient.
  std::vector<int> inv(perm.size());
  for (size_t i = 0; i < perm.size(); ++i) inv[static_cast<size_t>(perm[i])] = static_cast<int>(i);
  return make_result<float>(std::move(out), {&x}, [x, inv, ys]() {
    return [x, inv, ys](const Tensor<float>& g) {
      GradSink<float> s = grad_sink(*x.node());
      backend::cuda_backend()->permute(g.data(), s.data, static_cast<int>(ys.size()), ys.data(), inv.data(),
                                       s.accumulate);
    };
  });
}
}  // namespace detail

// x.permute(perm) as a copy: dimension i of the result is dimension perm[i] of x.
template <class T>
Var<T> permute(const Var<T>& x, const std::vector<int>& perm) {
  Shape ys;
  std::vector<int64_t> src_stride;
  detail::permute_plan(x.shape(), perm, ys, src_stride);
  if (x.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::permute_cuda(x, perm, ys);
    else detail::cuda_float_only("permute");
  }
  Tensor<T> out(ys);
  detail::permute_copy(x.value().data(), out.data(), ys, src_stride, false, false);
  return make_result<T>(std::move(out), {&x}, [x, ys, src_stride]() {
    return [x, ys, src_stride](const Tensor<T>& g) {
      GradSink<T> s = grad_sink(*x.node());
      if (!s.accumulate) std::fill(s.data, s.data + x.value().size(), T(0));
      detail::permute_copy(s.data, const_cast<T*>(g.data()), ys, src_stride, true, true);
    };
  });
}

// x with dimensions d0 and d1 exchanged (a copy), as x.transpose(d0, d1); negative counts from the end.
template <class T>
Var<T> transpose(const Var<T>& x, int d0, int d1) {
  const int nd = static_cast<int>(x.shape().size());
  if (d0 < 0) d0 += nd;
  if (d1 < 0) d1 += nd;
  if (d0 < 0 || d1 < 0 || d0 >= nd || d1 >= nd)
    throw std::invalid_argument("diffuse: transpose: dimensions out of range for " + shape_str(x.shape()));
  std::vector<int> perm(static_cast<size_t>(nd));
  for (int i = 0; i < nd; ++i) perm[static_cast<size_t>(i)] = i;
  std::swap(perm[static_cast<size_t>(d0)], perm[static_cast<size_t>(d1)]);
  return permute(x, perm);
}

// The same numbers in another shape (shares the storage). The backward hands the gradient back
// in a's shape: as a view of g when it is a's first contribution (the tape drops g itself right
// after this entry, so nothing else writes it), else added.
template <class T>
Var<T> reshape(const Var<T>& a, Shape s) {
  Tensor<T> out = a.value().reshape(std::move(s));
  return make_result<T>(std::move(out), {&a}, [a]() {
    return [a](const Tensor<T>& g) {
      Node<T>& n = *a.node();
      if (!n.has_grad) {
        n.grad = g.reshape(n.value.shape());
        n.has_grad = true;
        return;
      }
      GradSink<T> sk = grad_sink(n);
      if (g.device() == Device::CUDA) {
        if constexpr (std::is_same_v<T, float>) backend::cuda_backend()->copy(g.data(), sk.data, g.numel(), sk.accumulate);
        else detail::cuda_float_only("reshape");
        return;
      }
      for (size_t i = 0; i < g.size(); ++i) sk.put(i, g[i]);
    };
  });
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Var<float> concat<float>(const std::vector<Var<float>>& xs, int64_t axis))
DIFFUSE_FLOAT_INSTANCE(Var<float> slice<float>(const Var<float>& a, int64_t axis, int64_t start, int64_t end))
DIFFUSE_FLOAT_INSTANCE(Var<float> gather_rows<float>(const Var<float>& table, const std::vector<int32_t>& idx))
DIFFUSE_FLOAT_INSTANCE(Var<float> permute<float>(const Var<float>& x, const std::vector<int>& perm))
DIFFUSE_FLOAT_INSTANCE(Var<float> transpose<float>(const Var<float>& x, int d0, int d1))
DIFFUSE_FLOAT_INSTANCE(Var<float> reshape<float>(const Var<float>& a, Shape s))

}  // namespace diffuse
