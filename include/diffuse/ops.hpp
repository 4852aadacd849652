// Differentiable ops on Var<T> (CPU reference implementations).
//
// Each op computes its value and, when a gradient is needed, records a
// backward function that writes straight into its inputs' gradient buffers.
// Matrix products go through detail::gemm (gemm.hpp), split over OpenMP threads.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "autograd.hpp"
#include "gemm.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace diffuse {

namespace detail {

template <class T>
using MatR = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using MapR = Eigen::Map<MatR<T>>;
template <class T>
using CMapR = Eigen::Map<const MatR<T>>;

inline constexpr size_t kParallelMin = size_t(1) << 15;  // below this, threads cost more than they give

[[noreturn]] inline void shape_error(const char* op, const Shape& a, const Shape& b) {
  throw std::invalid_argument(std::string("diffuse: ") + op + ": incompatible shapes " + shape_str(a) + " and " +
                              shape_str(b));
}

// NumPy broadcasting of two shapes: the output shape and, for each output
// dimension, the stride of each input (0 where the input is broadcast).
struct Broadcast {
  Shape out;
  std::vector<int64_t> sa, sb;
};

inline Broadcast broadcast(const Shape& a, const Shape& b, const char* op) {
  const size_t nd = std::max(a.size(), b.size());
  Broadcast r;
  r.out.assign(nd, 1);
  r.sa.assign(nd, 0);
  r.sb.assign(nd, 0);
  for (size_t i = 0; i < nd; ++i) {
    const int64_t da = i + a.size() >= nd ? a[i + a.size() - nd] : 1;
    const int64_t db = i + b.size() >= nd ? b[i + b.size() - nd] : 1;
    if (da != db && da != 1 && db != 1) shape_error(op, a, b);
    r.out[i] = std::max(da, db);
  }
  int64_t st_a = 1, st_b = 1;
  for (size_t k = nd; k-- > 0;) {
    const int64_t da = k + a.size() >= nd ? a[k + a.size() - nd] : 1;
    const int64_t db = k + b.size() >= nd ? b[k + b.size() - nd] : 1;
    r.sa[k] = (da == 1) ? 0 : st_a;
    r.sb[k] = (db == 1) ? 0 : st_b;
    st_a *= da;
    st_b *= db;
  }
  return r;
}

// Calls f(i, ia, ib) for every output element i with the matching input offsets.
template <class F>
inline void for_each_broadcast(const Broadcast& bc, F&& f) {
  const size_t nd = bc.out.size();
  if (nd == 0) {
    f(size_t(0), int64_t(0), int64_t(0));
    return;
  }
  const int64_t inner = bc.out[nd - 1], ia_s = bc.sa[nd - 1], ib_s = bc.sb[nd - 1];
  const int64_t outer = inner ? shape_numel(bc.out) / inner : 0;
  std::vector<int64_t> idx(nd, 0);
  int64_t ia = 0, ib = 0;
  size_t i = 0;
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t j = 0; j < inner; ++j) f(i++, ia + j * ia_s, ib + j * ib_s);
    for (size_t k = nd - 1; k-- > 0;) {  // odometer over the outer dimensions
      ++idx[k];
      ia += bc.sa[k];
      ib += bc.sb[k];
      if (idx[k] < bc.out[k]) break;
      ia -= bc.sa[k] * idx[k];
      ib -= bc.sb[k] * idx[k];
      idx[k] = 0;
    }
  }
}

// d(out)/d(input) reduced over the broadcast dimensions: sink[i_in] += g[i] * w(i, other offset).
template <class T, class W>
inline void reduce_broadcast_grad(GradSink<T> s, size_t n_in, const Broadcast& bc, bool first, const T* g, W&& w) {
  if (!s.accumulate) std::fill(s.data, s.data + n_in, T(0));
  for_each_broadcast(bc, [&](size_t i, int64_t ia, int64_t ib) {
    if (first)
      s.data[ia] += g[i] * w(ib);
    else
      s.data[ib] += g[i] * w(ia);
  });
}

enum class BinOp { Add, Sub, Mul };

template <class T>
inline Var<T> binary(const Var<T>& a, const Var<T>& b, BinOp op, const char* name) {
  const Tensor<T>& A = a.value();
  const Tensor<T>& B = b.value();
  auto apply = [op](T x, T y) { return op == BinOp::Add ? x + y : op == BinOp::Sub ? x - y : x * y; };
  Tensor<T> out;
  const bool same = A.shape() == B.shape();
  Broadcast bc;
  if (same) {
    out = Tensor<T>(A.shape());
    const size_t n = out.size();
    const T *pa = A.data(), *pb = B.data();
    T* po = out.data();
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
    for (size_t i = 0; i < n; ++i) po[i] = apply(pa[i], pb[i]);
  } else {
    bc = broadcast(A.shape(), B.shape(), name);
    out = Tensor<T>(bc.out);
    const T *pa = A.data(), *pb = B.data();
    T* po = out.data();
    for_each_broadcast(bc, [&](size_t i, int64_t ia, int64_t ib) { po[i] = apply(pa[ia], pb[ib]); });
  }
  return make_result<T>(std::move(out), {&a, &b}, [a, b, op, same, bc]() {
    return [a, b, op, same, bc](const Tensor<T>& g) {
      const T* pg = g.data();
      const size_t n = g.size();
      for (int side = 0; side < 2; ++side) {
        const Var<T>& self = side == 0 ? a : b;
        const Var<T>& other = side == 0 ? b : a;
        if (!self.requires_grad()) continue;
        const T sign = (op == BinOp::Sub && side == 1) ? T(-1) : T(1);
        const T* po = other.value().data();
        GradSink<T> s = grad_sink(*self.node());
        if (same) {
          if (op == BinOp::Mul) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
            for (size_t i = 0; i < n; ++i) s.put(i, pg[i] * po[i]);
          } else {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
            for (size_t i = 0; i < n; ++i) s.put(i, sign * pg[i]);
          }
        } else if (op == BinOp::Mul) {
          reduce_broadcast_grad<T>(s, self.value().size(), bc, side == 0, pg, [po](int64_t j) { return po[j]; });
        } else {
          reduce_broadcast_grad<T>(s, self.value().size(), bc, side == 0, pg, [sign](int64_t) { return sign; });
        }
      }
    };
  });
}

}  // namespace detail

// Elementwise with NumPy broadcasting.
template <class T>
inline Var<T> add(const Var<T>& a, const Var<T>& b) {
  return detail::binary(a, b, detail::BinOp::Add, "add");
}
template <class T>
inline Var<T> sub(const Var<T>& a, const Var<T>& b) {
  return detail::binary(a, b, detail::BinOp::Sub, "sub");
}
template <class T>
inline Var<T> mul(const Var<T>& a, const Var<T>& b) {
  return detail::binary(a, b, detail::BinOp::Mul, "mul");
}
template <class T>
inline Var<T> operator+(const Var<T>& a, const Var<T>& b) { return add(a, b); }
template <class T>
inline Var<T> operator-(const Var<T>& a, const Var<T>& b) { return sub(a, b); }
template <class T>
inline Var<T> operator*(const Var<T>& a, const Var<T>& b) { return mul(a, b); }

// a * s for a constant s.
template <class T>
inline Var<T> scale(const Var<T>& a, T s) {
  Tensor<T> out(a.shape());
  const size_t n = out.size();
  for (size_t i = 0; i < n; ++i) out[i] = a.value()[i] * s;
  return make_result<T>(std::move(out), {&a}, [a, s]() {
    return [a, s](const Tensor<T>& g) {
      GradSink<T> sk = grad_sink(*a.node());
      for (size_t i = 0; i < g.size(); ++i) sk.put(i, g[i] * s);
    };
  });
}

// Pointwise activations. The derivative is computed from the saved input.
template <class T>
inline T silu_value(T x) { return x / (T(1) + std::exp(-x)); }
template <class T>
inline T silu_grad(T x) {
  const T s = T(1) / (T(1) + std::exp(-x));
  return s * (T(1) + x * (T(1) - s));
}

namespace detail {
template <class T, class F, class DF>
inline Var<T> pointwise(const Var<T>& a, F f, DF df) {
  Tensor<T> out(a.shape());
  const size_t n = out.size();
  const T* pa = a.value().data();
  T* po = out.data();
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (size_t i = 0; i < n; ++i) po[i] = f(pa[i]);
  return make_result<T>(std::move(out), {&a}, [a, df]() {
    return [a, df](const Tensor<T>& g) {
      const size_t n = g.size();
      const T* pa = a.value().data();
      const T* pg = g.data();
      GradSink<T> s = grad_sink(*a.node());
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
      for (size_t i = 0; i < n; ++i) s.put(i, pg[i] * df(pa[i]));
    };
  });
}
}  // namespace detail

// SiLU through Eigen's vectorised exp (g++ does not vectorise a std::exp loop).
// The standalone op; after a linear layer use linear_act, which fuses bias and
// SiLU into the GEMM's row blocks and keeps sigmoid(z) for the backward.
template <class T>
inline Var<T> silu(const Var<T>& a) {
  using Arr = Eigen::Array<T, Eigen::Dynamic, 1>;
  const Eigen::Index n = static_cast<Eigen::Index>(a.value().size());
  Tensor<T> out(a.shape());
  {
    Eigen::Map<const Arr> x(a.value().data(), n);
    Eigen::Map<Arr>(out.data(), n) = x / (T(1) + (-x).exp());
  }
  return make_result<T>(std::move(out), {&a}, [a, n]() {
    return [a, n](const Tensor<T>& g) {
      Eigen::Map<const Arr> x(a.value().data(), n), G(g.data(), n);
      GradSink<T> s = grad_sink(*a.node());
      Eigen::Map<Arr> S(s.data, n);
      const auto sig = T(1) / (T(1) + (-x).exp());
      const auto d = G * sig * (T(1) + x * (T(1) - sig));
      if (s.accumulate) S += d; else S = d;
    };
  });
}
template <class T>
inline Var<T> relu(const Var<T>& a) {
  return detail::pointwise(a, [](T x) { return x > T(0) ? x : T(0); }, [](T x) { return x > T(0) ? T(1) : T(0); });
}

// [m,k] x [k,n] -> [m,n].
template <class T>
inline Var<T> matmul(const Var<T>& a, const Var<T>& b) {
  if (a.value().dim() != 2 || b.value().dim() != 2 || a.size(1) != b.size(0))
    detail::shape_error("matmul", a.shape(), b.shape());
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
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

// Splits rows [0, m) into one contiguous chunk per thread and runs
// f(r0, r1) on each, in a single OpenMP region. The linear layers below split
// their GEMMs this way (detail::gemm single-threaded inside each chunk) so that
// bias, activation and gather run on the chunk while it is still in cache: one
// fork/join per layer (docs/performance.md).
// `flops` decides whether threads are worth starting at all.
namespace detail {
// Below this much work (in flops, or ~flops for elementwise passes) one thread
// does it all. The OpenMP workers spin between regions, so a fork/join costs
// a few microseconds; measured on the toy train step (2 cores), thresholds
// from 3e4 to 1e5 were equally good and 4e6 was 15-20% slower.
inline constexpr double kParallelMinFlops = 1e5;

template <class F>
inline void parallel_rows(int64_t m, double flops, F&& f) {
  int nt = 1;
#ifdef _OPENMP
  if (flops >= kParallelMinFlops && !omp_in_parallel()) nt = static_cast<int>(std::min<int64_t>(omp_get_max_threads(), m / 16));
#endif
  if (nt <= 1) {
    f(int64_t(0), m);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    const int64_t id = omp_get_thread_num(), n = omp_get_num_threads();
#else
    const int64_t id = 0, n = 1;
#endif
    // Chunks are multiples of 8 rows so that every thread's block starts aligned.
    const int64_t chunk = ((m + n - 1) / n + 7) / 8 * 8;
    const int64_t r0 = std::min(m, id * chunk), r1 = std::min(m, r0 + chunk);
    if (r1 > r0) f(r0, r1);
  }
}

template <class T>
using RowVec = Eigen::Matrix<T, 1, Eigen::Dynamic>;

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

// y = x W^T + b, as torch.nn.functional.linear: x [N,in], W [out,in], b [out] (may be undefined).
template <class T>
inline Var<T> linear(const Var<T>& x, const Var<T>& w, const Var<T>& b = Var<T>()) {
  if (x.value().dim() != 2 || w.value().dim() != 2 || x.size(1) != w.size(1))
    detail::shape_error("linear", x.shape(), w.shape());
  const int64_t N = x.size(0), in = x.size(1), out = w.size(0);
  const bool has_b = b.defined();
  if (has_b && (b.value().dim() != 1 || b.size(0) != out)) detail::shape_error("linear (bias)", w.shape(), b.shape());
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

enum class Activation { SiLU, ReLU, None };

namespace detail {
// act(x W^T + b [+ table[idx]]) with the bias, the optional gathered rows and the
// activation applied to each block of rows right after its GEMM, while it is in
// cache. For SiLU the forward keeps sigmoid(z), so the backward needs no exp:
// silu'(z) = s + y (1 - s) with y = z s the output.
template <class T>
inline Var<T> linear_act_impl(const Var<T>& x, const Var<T>& w, const Var<T>& b, const Var<T>* table,
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
  const bool grad = Tape<T>::grad_enabled() &&
                    (x.requires_grad() || w.requires_grad() || b.requires_grad() || (table && table->requires_grad()));
  Tensor<T> y({N, out});
  Tensor<T> sg = grad && act == Activation::SiLU ? Tensor<T>({N, out}) : Tensor<T>();  // sigmoid(z)
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

// Concatenation along `axis`.
template <class T>
inline Var<T> concat(const std::vector<Var<T>>& xs, int64_t axis) {
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
  int64_t outer = 1, inner = 1;
  for (int64_t d = 0; d < axis; ++d) outer *= s0[d];
  for (int64_t d = axis + 1; d < nd; ++d) inner *= s0[d];
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
    });
  }
  return res;
}

// Elements [start, end) along `axis` (a copy).
template <class T>
inline Var<T> slice(const Var<T>& a, int64_t axis, int64_t start, int64_t end) {
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
  Tensor<T> out(os);
  const int64_t w = (end - start) * inner, row = s[axis] * inner, off = start * inner;
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

// out[i, :] = table[idx[i], :]   (an embedding lookup; the backward scatters-adds).
template <class T>
inline Var<T> gather_rows(const Var<T>& table, const std::vector<int32_t>& idx) {
  if (table.value().dim() != 2) throw std::invalid_argument("diffuse: gather_rows needs a 2-D table");
  const int64_t V = table.size(0), D = table.size(1), N = static_cast<int64_t>(idx.size());
  Tensor<T> out({N, D});
  for (int64_t i = 0; i < N; ++i) {
    if (idx[i] < 0 || idx[i] >= V)
      throw std::out_of_range("diffuse: gather_rows index " + std::to_string(idx[i]) + " outside [0, " +
                              std::to_string(V) + ")");
    std::copy_n(table.value().data() + idx[i] * D, D, out.data() + i * D);
  }
  return make_result<T>(std::move(out), {&table}, [table, idx, D]() {
    return [table, idx, D](const Tensor<T>& g) {
      GradSink<T> s = grad_sink(*table.node());
      if (!s.accumulate) std::fill(s.data, s.data + table.value().size(), T(0));
      for (size_t i = 0; i < idx.size(); ++i)
        for (int64_t j = 0; j < D; ++j) s.data[idx[i] * D + j] += g[i * D + j];
    };
  });
}

template <class T>
inline Var<T> reshape(const Var<T>& a, Shape s) {
  Tensor<T> out = a.value().reshape(std::move(s));
  return make_result<T>(std::move(out), {&a}, [a]() {
    return [a](const Tensor<T>& g) {
      GradSink<T> sk = grad_sink(*a.node());
      for (size_t i = 0; i < g.size(); ++i) sk.put(i, g[i]);
    };
  });
}

// Sum / mean of all elements -> a scalar (shape []). Accumulated in double.
template <class T>
inline Var<T> sum(const Var<T>& a) {
  double acc = 0;
  const size_t n = a.value().size();
  const T* p = a.value().data();
#pragma omp parallel for reduction(+ : acc) schedule(static) if (n >= detail::kParallelMin)
  for (size_t i = 0; i < n; ++i) acc += p[i];
  Tensor<T> out = Tensor<T>::full({}, static_cast<T>(acc));
  return make_result<T>(std::move(out), {&a}, [a]() {
    return [a](const Tensor<T>& g) {
      GradSink<T> s = grad_sink(*a.node());
      const size_t n = a.value().size();
      const T g0 = g[0];
      if (s.accumulate)
        for (size_t i = 0; i < n; ++i) s.data[i] += g0;
      else
        std::fill(s.data, s.data + n, g0);
    };
  });
}
template <class T>
inline Var<T> mean(const Var<T>& a) {
  return scale(sum(a), T(1) / static_cast<T>(std::max<size_t>(1, a.value().size())));
}

// mean((a - b)^2), as torch.nn.functional.mse_loss; gradients flow to both inputs.
template <class T>
inline Var<T> mse(const Var<T>& a, const Var<T>& b) {
  if (a.shape() != b.shape()) detail::shape_error("mse", a.shape(), b.shape());
  const size_t n = a.value().size();
  const T *pa = a.value().data(), *pb = b.value().data();
  double acc = 0;
#pragma omp parallel for reduction(+ : acc) schedule(static) if (n >= detail::kParallelMin)
  for (size_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(pa[i]) - static_cast<double>(pb[i]);
    acc += d * d;
  }
  Tensor<T> out = Tensor<T>::full({}, static_cast<T>(acc / static_cast<double>(n)));
  return make_result<T>(std::move(out), {&a, &b}, [a, b, n]() {
    return [a, b, n](const Tensor<T>& g) {
      const T c = g[0] * T(2) / static_cast<T>(n);
      const T *pa = a.value().data(), *pb = b.value().data();
      for (int side = 0; side < 2; ++side) {
        const Var<T>& self = side ? b : a;
        if (!self.requires_grad()) continue;
        const T sgn = side ? T(-1) : T(1);
        GradSink<T> s = grad_sink(*self.node());
#pragma omp parallel for schedule(static) if (n >= detail::kParallelMin)
        for (size_t i = 0; i < n; ++i) s.put(i, sgn * c * (pa[i] - pb[i]));
      }
    };
  });
}

}  // namespace diffuse
