// Matrix products: matmul, linear (y = x W^T + b, as torch.nn.functional.linear) and the fused
// linear_act / linear_gather_act (GEMM + bias (+ gathered rows) + activation in one op). On the
// CPU through detail::gemm (backend/cpu/gemm.hpp), split over row blocks in one parallel region so
// that the epilogue runs while a block is in cache; on CUDA cuBLAS plus one epilogue kernel.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <diffuse/backend/cpu/gemm.hpp>
#include <diffuse/ops/common.hpp>
#include <diffuse/ops/elementwise.hpp>

namespace diffuse {

namespace detail {
inline Var<float> matmul_cuda(const Var<float>& a, const Var<float>& b, int64_t m, int64_t k, int64_t n) {
  backend::CudaBackend& be = backend::require_cuda("matmul");
  Tensor<float> out({m, n}, Device::CUDA);
  be.gemm(false, false, m, n, k, 1.0f, a.value().data(), k, b.value().data(), n, 0.0f, out.data(), n);
  return make_result<float>(std::move(out), {&a, &b}, [a, b, m, k, n]() {
    return [a, b, m, k, n](const Tensor<float>& g) {
      backend::CudaBackend& be = *backend::cuda_backend();
      if (a.requires_grad()) {  // dA = G B^T
        GradSink<float> s = grad_sink(*a.node());
        be.gemm(false, true, m, k, n, 1.0f, g.data(), n, b.value().data(), n, s.accumulate ? 1.0f : 0.0f, s.data, k);
      }
      if (b.requires_grad()) {  // dB = A^T G
        GradSink<float> s = grad_sink(*b.node());
        be.gemm(true, false, k, n, m, 1.0f, a.value().data(), k, g.data(), n, s.accumulate ? 1.0f : 0.0f, s.data, n);
      }
    };
  });
}
}  // namespace detail

// [m,k] x [k,n] -> [m,n].
template <class T>
Var<T> matmul(const Var<T>& a, const Var<T>& b) {
  if (a.value().dim() != 2 || b.value().dim() != 2 || a.size(1) != b.size(0))
    detail::shape_error("matmul", a.shape(), b.shape());
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (detail::op_device("matmul", {&a, &b}) == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::matmul_cuda(a, b, m, k, n);
    else detail::cuda_float_only("matmul");
  }
  Tensor<T> out({m, n});
  detail::gemm_parallel<T>(false, false, m, n, k, T(1), a.value().data(), k, b.value().data(), n, T(0), out.data(), n);
  return make_result<T>(std::move(out), {&a, &b}, [a, b, m, k, n]() {
    return [a, b, m, k, n](const Tensor<T>& g) {
      if (a.requires_grad()) {  // dA = G B^T
        GradSink<T> s = grad_sink(*a.node());
        detail::gemm_parallel<T>(false, true, m, k, n, T(1), g.data(), n, b.value().data(), n,
                                 s.accumulate ? T(1) : T(0), s.data, k);
      }
      if (b.requires_grad()) {  // dB = A^T G
        GradSink<T> s = grad_sink(*b.node());
        detail::gemm_parallel<T>(true, false, k, n, m, T(1), a.value().data(), k, g.data(), n,
                                 s.accumulate ? T(1) : T(0), s.data, n);
      }
    };
  });
}

namespace detail {

// Y = X W^T (+ b), row-parallel.
template <class T>
inline void linear_forward(const T* x, const T* w, const T* b, T* y, int64_t N, int64_t in, int64_t out) {
  MapR<T> Y(y, N, out);
  parallel_rows(N, 2.0 * N * in * out, [&](int64_t r0, int64_t r1) {
    gemm<T>(false, true, r1 - r0, out, in, T(1), x + r0 * in, in, w, in, T(0), y + r0 * out, out);
    if (b) Y.middleRows(r0, r1 - r0).rowwise() += Eigen::Map<const RowVec<T>>(b, out);
  });
}

// Rows r0..r1 of dX = G W.
template <class T>
inline void linear_backward_rows(const T* g, const T* w, const GradSink<T>& gx, int64_t r0, int64_t r1, int64_t in,
                                 int64_t out) {
  gemm<T>(false, false, r1 - r0, in, out, T(1), g + r0 * out, out, w, in, gx.accumulate ? T(1) : T(0),
          gx.data + r0 * in, in);
}

// dW = G^T X and db = column sums of G.
template <class T>
inline void linear_backward_params(const T* g, const T* x, GradSink<T>* gw, GradSink<T>* gb, int64_t N, int64_t in,
                                   int64_t out) {
  CMapR<T> G(g, N, out);
  if (gw || gb) {
    // dW = G^T X and db = column sums of G, split over the output features (no reduction across threads).
    parallel_rows(out, gw ? 2.0 * N * in * out : 0.0, [&](int64_t o0, int64_t o1) {
      const int64_t n = o1 - o0;
      if (gw)  // rows o0..o1 of dW = G^T X
        gemm<T>(true, false, n, in, N, T(1), g + o0, out, x, in, gw->accumulate ? T(1) : T(0), gw->data + o0 * in, in);
      if (gb) {
        auto blk = Eigen::Map<RowVec<T>>(gb->data, out).segment(o0, n);
        if (gb->accumulate) blk += G.middleCols(o0, n).colwise().sum(); else blk = G.middleCols(o0, n).colwise().sum();
      }
    });
  }
}

// The three gradients of Y = X W^T + b from G = dL/dY, each written through its sink.
template <class T>
inline void linear_backward(const T* g, const T* x, const T* w, GradSink<T>* gx, GradSink<T>* gw, GradSink<T>* gb,
                            int64_t N, int64_t in, int64_t out) {
  if (gx)
    parallel_rows(N, 2.0 * N * in * out, [&](int64_t r0, int64_t r1) { linear_backward_rows(g, w, *gx, r0, r1, in, out); });
  linear_backward_params(g, x, gw, gb, N, in, out);
}
}  // namespace detail

namespace detail {
// dW (+)= G^T X, db (+)= column sums of G, dX (+)= G W, each when its input needs it.
inline void linear_backward_cuda(backend::CudaBackend& be, const float* g, const Var<float>& x, const Var<float>& w,
                                 const Var<float>* b, int64_t N, int64_t in, int64_t out) {
  if (b && b->requires_grad()) {
    GradSink<float> s = grad_sink(*b->node());
    be.row_bias_backward(g, s.data, N, out, s.accumulate);
  }
  if (w.requires_grad()) {
    GradSink<float> s = grad_sink(*w.node());
    be.gemm(true, false, out, in, N, 1.0f, g, out, x.value().data(), in, s.accumulate ? 1.0f : 0.0f, s.data, in);
  }
  if (x.requires_grad()) {
    GradSink<float> s = grad_sink(*x.node());
    be.gemm(false, false, N, in, out, 1.0f, g, out, w.value().data(), in, s.accumulate ? 1.0f : 0.0f, s.data, in);
  }
}

inline Var<float> linear_cuda(const Var<float>& x, const Var<float>& w, const Var<float>& b, int64_t N, int64_t in,
                              int64_t out) {
  backend::CudaBackend& be = backend::require_cuda("linear");
  Tensor<float> y({N, out}, Device::CUDA);
  be.gemm(false, true, N, out, in, 1.0f, x.value().data(), in, w.value().data(), in, 0.0f, y.data(), out);
  const bool has_b = b.defined();
  if (has_b) be.add_row_bias(y.data(), b.value().data(), N, out);
  return make_result<float>(std::move(y), {&x, &w, has_b ? &b : &x}, [x, w, b, has_b, N, in, out]() {
    return [x, w, b, has_b, N, in, out](const Tensor<float>& g) {
      linear_backward_cuda(*backend::cuda_backend(), g.data(), x, w, has_b ? &b : nullptr, N, in, out);
    };
  });
}
}  // namespace detail

// y = x W^T + b, as torch.nn.functional.linear: x [N,in], W [out,in], b [out] (may be undefined).
template <class T>
Var<T> linear(const Var<T>& x, const Var<T>& w, const Var<T>& b = Var<T>()) {
  if (x.value().dim() != 2 || w.value().dim() != 2 || x.size(1) != w.size(1))
    detail::shape_error("linear", x.shape(), w.shape());
  const int64_t N = x.size(0), in = x.size(1), out = w.size(0);
  const bool has_b = b.defined();
  if (has_b && (b.value().dim() != 1 || b.size(0) != out)) detail::shape_error("linear (bias)", w.shape(), b.shape());
  if (detail::op_device("linear", {&x, &w, &b}) == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::linear_cuda(x, w, b, N, in, out);
    else detail::cuda_float_only("linear");
  }
  Tensor<T> y({N, out});
  detail::linear_forward(x.value().data(), w.value().data(), has_b ? b.value().data() : nullptr, y.data(), N, in, out);
  const Var<T> bias = has_b ? b : x;  // placeholder keeps the capture simple; unused without a bias
  // A bias that is undefined is passed as `x` again: it never adds a requirement of its own.
  return make_result<T>(std::move(y), {&x, &w, has_b ? &b : &x}, [x, w, bias, has_b, N, in, out]() {
    return [x, w, bias, has_b, N, in, out](const Tensor<T>& g) {
      GradSink<T> sx{}, sw{}, sb{};
      if (x.requires_grad()) sx = grad_sink(*x.node());
      if (w.requires_grad()) sw = grad_sink(*w.node());
      if (has_b && bias.requires_grad()) sb = grad_sink(*bias.node());
      detail::linear_backward(g.data(), x.value().data(), w.value().data(), x.requires_grad() ? &sx : nullptr,
                              w.requires_grad() ? &sw : nullptr, has_b && bias.requires_grad() ? &sb : nullptr, N,
                              in, out);
    };
  });
}


namespace detail {
// act(x W^T + b [+ table[idx]]) on the device: the GEMM into z, then one epilogue kernel adds
// the bias (and the gathered rows) in place and applies the activation; z stays for the backward.
inline Var<float> linear_act_cuda(const Var<float>& x, const Var<float>& w, const Var<float>& b,
                                  const Var<float>* table, const std::vector<int32_t>* idx, Activation act,
                                  const char* name) {
  backend::CudaBackend& be = backend::require_cuda(name);
  const int64_t N = x.size(0), in = x.size(1), out = w.size(0);
  const bool grad = Tape<float>::grad_enabled() &&
                    (x.requires_grad() || w.requires_grad() || b.requires_grad() || (table && table->requires_grad()));
  Tensor<float> z({N, out}, Device::CUDA);
  be.gemm(false, true, N, out, in, 1.0f, x.value().data(), in, w.value().data(), in, 0.0f, z.data(), out);
  const Tensor<int32_t> ids = table ? device_indices(*idx) : Tensor<int32_t>();
  Tensor<float> y = act == Activation::None ? z : Tensor<float>({N, out}, Device::CUDA);
  be.bias_activation(z.data(), b.value().data(), table ? table->value().data() : nullptr,
                     table ? ids.data() : nullptr, y.data(), N, out, act);
  const Var<float> tab = table ? *table : x;  // placeholder when there is no table
  const bool has_table = table != nullptr;
  const Tensor<float> zk = grad ? z : Tensor<float>();
  return make_result<float>(std::move(y), {&x, &w, &b, has_table ? table : &x}, [&]() {
    return [x, w, b, tab, ids, has_table, zk, act, N, in, out](const Tensor<float>& g) {
      backend::CudaBackend& be = *backend::cuda_backend();
      Tensor<float> dz = act == Activation::None ? g : Tensor<float>({N, out}, Device::CUDA);
      if (act != Activation::None) be.activation_backward(act, zk.data(), g.data(), dz.data(), N * out, false);
      linear_backward_cuda(be, dz.data(), x, w, &b, N, in, out);
      if (has_table && tab.requires_grad()) {
        GradSink<float> st = grad_sink(*tab.node());
        be.scatter_rows(ids.data(), dz.data(), st.data, N, tab.size(0), out, st.accumulate);
      }
    };
  });
}

// act(x W^T + b [+ table[idx]]) with the bias, the optional gathered rows and the
// activation applied to each block of rows right after its GEMM, while it is in
// cache. For SiLU the forward keeps sigmoid(z), so the backward needs no exp:
// silu'(z) = s + y (1 - s) with y = z s the output.
template <class T>
Var<T> linear_act_impl(const Var<T>& x, const Var<T>& w, const Var<T>& b, const Var<T>* table,
                       const std::vector<int32_t>* idx, Activation act, const char* name) {
  if (x.value().dim() != 2 || w.value().dim() != 2 || x.size(1) != w.size(1)) shape_error(name, x.shape(), w.shape());
  const int64_t N = x.size(0), in = x.size(1), out = w.size(0);
  if (!b.defined() || b.value().dim() != 1 || b.size(0) != out)
    throw std::invalid_argument(std::string("diffuse: ") + name + " needs a bias of shape [" + std::to_string(out) +
                                "]");
  if (table) {
    if (table->value().dim() != 2 || table->size(1) != out || static_cast<int64_t>(idx->size()) != N)
      shape_error(name, w.shape(), table->shape());
    for (int32_t i : *idx)
      if (i < 0 || i >= table->size(0))
        throw std::out_of_range(std::string("diffuse: ") + name + ": row index " + std::to_string(i) +
                                " outside [0, " + std::to_string(table->size(0)) + ")");
  }
  if (op_device(name, {&x, &w, &b, table ? table : &x}) == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return linear_act_cuda(x, w, b, table, idx, act, name);
    else cuda_float_only(name);
  }
  const bool grad = Tape<T>::grad_enabled() &&
                    (x.requires_grad() || w.requires_grad() || b.requires_grad() || (table && table->requires_grad()));
  Tensor<T> y({N, out});
  // Kept for the backward: sigmoid(z) for SiLU, z itself for GELU.
  Tensor<T> sg = grad && (act == Activation::SiLU || act == Activation::GELU) ? Tensor<T>({N, out}) : Tensor<T>();
  {
    CMapR<T> X(x.value().data(), N, in), W(w.value().data(), out, in);
    MapR<T> Y(y.data(), N, out);
    const auto B = Eigen::Map<const RowVec<T>>(b.value().data(), out);
    const T* tp = table ? table->value().data() : nullptr;
    T* sp = sg.defined() ? sg.data() : nullptr;
    // With a tiny inner dimension (2-D data) Eigen's GEMM packing costs more than
    // the arithmetic: form each row as b + sum_k x_k W[:, k] directly.
    const bool small_k = in <= 4;
    const MatR<T> Wt = small_k ? MatR<T>(W.transpose()) : MatR<T>();
    parallel_rows(N, 2.0 * N * in * out + 20.0 * N * out, [&](int64_t r0, int64_t r1) {
      const int64_t n = r1 - r0;
      auto Yb = Y.middleRows(r0, n);
      if (small_k) {
        for (int64_t r = r0; r < r1; ++r) {
          auto yr = Y.row(r);
          yr = B;
          for (int64_t k = 0; k < in; ++k) yr += X(r, k) * Wt.row(k);
        }
      } else {
        gemm<T>(false, true, n, out, in, T(1), x.value().data() + r0 * in, in, w.value().data(), in, T(0),
                y.data() + r0 * out, out);
        Yb.rowwise() += B;
      }
      if (tp)
        for (int64_t r = r0; r < r1; ++r) Y.row(r) += Eigen::Map<const RowVec<T>>(tp + (*idx)[r] * out, out);
      auto A = Yb.array();
      if (act == Activation::SiLU) {
        if (sp) {
          auto S = MapR<T>(sp, N, out).middleRows(r0, n).array();
          S = (T(1) + (-A).exp()).inverse();
          A = A * S;
        } else {
          A = A / (T(1) + (-A).exp());
        }
      } else if (act == Activation::ReLU) {
        A = A.max(T(0));
      } else if (act == Activation::GELU) {
        if (sp) MapR<T>(sp, N, out).middleRows(r0, n) = Yb;
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t j = 0; j < out; ++j) Y(r, j) = gelu_value(Y(r, j));
      }
    });
  }
  const Var<T> tab = table ? *table : x;  // placeholder when there is no table
  const std::vector<int32_t> ids = grad && idx ? *idx : std::vector<int32_t>();
  const bool has_table = table != nullptr;
  const Tensor<T> yv = y;  // a second handle on the output's storage, for the backward
  return make_result<T>(std::move(y), {&x, &w, &b, has_table ? table : &x}, [&]() {
    return [x, w, b, tab, ids, has_table, yv, sg, act, N, in, out](const Tensor<T>& g) {
    GradSink<T> sx{}, sw{}, sb{};
    if (x.requires_grad()) sx = grad_sink(*x.node());
    if (w.requires_grad()) sw = grad_sink(*w.node());
    if (b.requires_grad()) sb = grad_sink(*b.node());
    // dz = g * act'(z) and dX = dz W in one pass over each row block (one
    // fork/join, dz still in cache for the GEMM); then dW, db over all rows.
    Tensor<T> dz = act == Activation::None ? g : Tensor<T>({N, out});
    const T* yp = yv.data();
    const double work = 10.0 * N * out + (x.requires_grad() ? 2.0 * N * in * out : 0.0);
    parallel_rows(N, work, [&](int64_t r0, int64_t r1) {
      if (act != Activation::None) {
        const int64_t off = r0 * out, len = (r1 - r0) * out;
        using A1 = Eigen::Array<T, Eigen::Dynamic, 1>;
        Eigen::Map<const A1> G(g.data() + off, len), Y(yp + off, len);
        Eigen::Map<A1> D(dz.data() + off, len);
        if (act == Activation::SiLU) {
          Eigen::Map<const A1> S(sg.data() + off, len);
          D = G * (S + Y * (T(1) - S));
        } else if (act == Activation::GELU) {
          const T* z = sg.data() + off;
          for (int64_t i = 0; i < len; ++i) D[i] = G[i] * gelu_grad(z[i]);
        } else {
          D = (Y > T(0)).select(G, T(0));
        }
      }
      if (x.requires_grad()) linear_backward_rows(dz.data(), w.value().data(), sx, r0, r1, in, out);
    });
    linear_backward_params(dz.data(), x.value().data(), w.requires_grad() ? &sw : nullptr,
                           b.requires_grad() ? &sb : nullptr, N, in, out);
    if (has_table && tab.requires_grad()) {
      GradSink<T> st = grad_sink(*tab.node());
      if (!st.accumulate) std::fill(st.data, st.data + tab.value().size(), T(0));
      for (int64_t r = 0; r < N; ++r)
        Eigen::Map<RowVec<T>>(st.data + ids[r] * out, out) += Eigen::Map<const RowVec<T>>(dz.data() + r * out, out);
    }
    };
  });
}
}  // namespace detail

// act(x W^T + b) in one op, the same values as activation(linear(x, w, b)); used by MLP.
template <class T>
inline Var<T> linear_act(const Var<T>& x, const Var<T>& w, const Var<T>& b, Activation act) {
  return detail::linear_act_impl<T>(x, w, b, nullptr, nullptr, act, "linear_act");
}

// act(x W^T + b + table[idx]): a linear layer whose input has a part that takes
// few distinct values (ToyMLP's timestep embedding), precomputed once per value
// into `table` and gathered per row. Same as activation(add(linear(x, w, b), gather_rows(table, idx))).
template <class T>
inline Var<T> linear_gather_act(const Var<T>& x, const Var<T>& w, const Var<T>& b, const Var<T>& table,
                                const std::vector<int32_t>& idx, Activation act) {
  return detail::linear_act_impl<T>(x, w, b, &table, &idx, act, "linear_gather_act");
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Var<float> matmul<float>(const Var<float>& a, const Var<float>& b))
DIFFUSE_FLOAT_INSTANCE(Var<float> linear<float>(const Var<float>& x, const Var<float>& w, const Var<float>& b))
DIFFUSE_FLOAT_INSTANCE(Var<float> detail::linear_act_impl<float>(const Var<float>& x, const Var<float>& w,
    const Var<float>& b, const Var<float>* table, const std::vector<int32_t>* idx, Activation act, const char* name))

}  // namespace diffuse
