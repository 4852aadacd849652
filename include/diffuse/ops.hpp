// Differentiable ops on Var<T>, on the device of their operands.
//
// Each op checks its shapes once, computes its value and, when a gradient is
// needed, records a backward function that writes straight into its inputs'
// gradient buffers. On the CPU (the reference, any T) the code is here: matrix
// products go through detail::gemm (gemm.hpp), split over OpenMP threads. On
// CUDA (float) the same op calls the CUDA backend's entries (backend/cuda.hpp)
// from its `*_cuda` twin just above it, forward and backward.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "autograd.hpp"
#include "backend/op_types.hpp"
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
    r.out[i] = da == 1 ? db : da;  // a size-1 dimension takes the other's size, even 0
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

using BinOp = BinaryOp;

inline backend::BroadcastDesc broadcast_desc(const Broadcast& bc, const char* op) {
  if (bc.out.size() > static_cast<size_t>(backend::kMaxDims))
    throw std::invalid_argument(std::string("diffuse: ") + op + " on cuda: at most " +
                                std::to_string(backend::kMaxDims) + " dimensions, got " + shape_str(bc.out));
  backend::BroadcastDesc d;
  d.ndim = static_cast<int>(bc.out.size());
  for (int i = 0; i < d.ndim; ++i) {
    d.out[i] = bc.out[i];
    d.sa[i] = bc.sa[i];
    d.sb[i] = bc.sb[i];
  }
  return d;
}

inline Var<float> binary_cuda(const Var<float>& a, const Var<float>& b, BinOp op, const char* name) {
  backend::CudaBackend& be = backend::require_cuda(name);
  const Broadcast bc = broadcast(a.shape(), b.shape(), name);
  const backend::BroadcastDesc d = broadcast_desc(bc, name);
  Tensor<float> out(bc.out, Device::CUDA);
  be.binary(op, a.value().data(), b.value().data(), out.data(), d);
  return make_result<float>(std::move(out), {&a, &b}, [a, b, op, d]() {
    return [a, b, op, d](const Tensor<float>& g) {
      backend::CudaBackend& be = *backend::cuda_backend();
      for (int side = 0; side < 2; ++side) {
        const Var<float>& self = side == 0 ? a : b;
        const Var<float>& other = side == 0 ? b : a;
        if (!self.requires_grad()) continue;
        GradSink<float> s = grad_sink(*self.node());
        be.binary_backward(op, side == 0, g.data(), other.value().data(), s.data, d, s.accumulate);
      }
    };
  });
}

template <class T>
inline Var<T> binary(const Var<T>& a, const Var<T>& b, BinOp op, const char* name) {
  if (op_device(name, {&a, &b}) == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return binary_cuda(a, b, op, name);
    else cuda_float_only(name);
  }
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

namespace detail {
inline Var<float> scale_cuda(const Var<float>& a, float s) {
  backend::CudaBackend& be = backend::require_cuda("scale");
  Tensor<float> out(a.shape(), Device::CUDA);
  be.scale(a.value().data(), s, out.data(), a.value().numel(), false);
  return make_result<float>(std::move(out), {&a}, [a, s]() {
    return [a, s](const Tensor<float>& g) {
      GradSink<float> sk = grad_sink(*a.node());
      backend::cuda_backend()->scale(g.data(), s, sk.data, g.numel(), sk.accumulate);
    };
  });
}
}  // namespace detail

// a * s for a constant s.
template <class T>
inline Var<T> scale(const Var<T>& a, T s) {
  if (a.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::scale_cuda(a, s);
    else detail::cuda_float_only("scale");
  }
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
// f(a) on the device; the backward recomputes f' from the saved input.
inline Var<float> activation_cuda(const Var<float>& a, Activation f, const char* name) {
  backend::CudaBackend& be = backend::require_cuda(name);
  Tensor<float> out(a.shape(), Device::CUDA);
  be.activation(f, a.value().data(), out.data(), a.value().numel());
  return make_result<float>(std::move(out), {&a}, [a, f]() {
    return [a, f](const Tensor<float>& g) {
      GradSink<float> s = grad_sink(*a.node());
      backend::cuda_backend()->activation_backward(f, a.value().data(), g.data(), s.data, g.numel(), s.accumulate);
    };
  });
}

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
  if (a.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::activation_cuda(a, Activation::SiLU, "silu");
    else detail::cuda_float_only("silu");
  }
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
  if (a.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::activation_cuda(a, Activation::ReLU, "relu");
    else detail::cuda_float_only("relu");
  }
  return detail::pointwise(a, [](T x) { return x > T(0) ? x : T(0); }, [](T x) { return x > T(0) ? T(1) : T(0); });
}

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

// GELU, the exact (erf) form of torch.nn.functional.gelu: x Phi(x) = x (1 + erf(x / sqrt 2)) / 2.
template <class T>
inline T gelu_value(T x) {
  return T(0.5) * x * (T(1) + std::erf(x * T(0.70710678118654752440)));
}
template <class T>
inline T gelu_grad(T x) {
  const T cdf = T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440)));
  const T pdf = std::exp(T(-0.5) * x * x) * T(0.39894228040143267794);  // 1 / sqrt(2 pi)
  return cdf + x * pdf;
}
template <class T>
inline Var<T> gelu(const Var<T>& a) {
  if (a.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::activation_cuda(a, Activation::GELU, "gelu");
    else detail::cuda_float_only("gelu");
  }
  return detail::pointwise(a, [](T x) { return gelu_value(x); }, [](T x) { return gelu_grad(x); });
}

// f(x) for an Activation (None: x itself).
template <class T>
inline Var<T> activate(const Var<T>& x, Activation a) {
  switch (a) {
    case Activation::SiLU: return silu(x);
    case Activation::ReLU: return relu(x);
    case Activation::GELU: return gelu(x);
    case Activation::None: break;
  }
  return x;
}

// [m,k] x [k,n] -> [m,n].
template <class T>
inline Var<T> matmul(const Var<T>& a, const Var<T>& b) {
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
inline Var<T> linear(const Var<T>& x, const Var<T>& w, const Var<T>& b = Var<T>()) {
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
// Host indices as a device int32 tensor (an asynchronous upload: no wait for the device).
inline Tensor<int32_t> device_indices(const std::vector<int32_t>& idx) {
  return Tensor<int32_t>::from(idx, {static_cast<int64_t>(idx.size())}).to(Device::CUDA);
}

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
    });
  return res;
}
}  // namespace detail

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
  const Device dev = xs[0].device();
  for (const auto& v : xs)
    if (v.device() != dev)
      throw std::invalid_argument("diffuse: concat: operands on different devices (" + std::string(device_name(dev)) +
                                  " and " + device_name(v.device()) + "); move them with .to(Device::...) first");
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
    });
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
inline Var<T> gather_rows(const Var<T>& table, const std::vector<int32_t>& idx) {
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
inline Var<T> permute(const Var<T>& x, const std::vector<int>& perm) {
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
inline Var<T> transpose(const Var<T>& x, int d0, int d1) {
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
inline Var<T> reshape(const Var<T>& a, Shape s) {
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

namespace detail {
inline Var<float> sum_cuda(const Var<float>& a) {
  backend::CudaBackend& be = backend::require_cuda("sum");
  Tensor<float> out({}, Device::CUDA);
  be.sum(a.value().data(), a.value().numel(), out.data());
  return make_result<float>(std::move(out), {&a}, [a]() {
    return [a](const Tensor<float>& g) {
      GradSink<float> s = grad_sink(*a.node());
      backend::cuda_backend()->fill_scalar(g.data(), 1.0f, s.data, a.value().numel(), s.accumulate);
    };
  });
}

inline Var<float> mse_cuda(const Var<float>& a, const Var<float>& b) {
  backend::CudaBackend& be = backend::require_cuda("mse");
  const int64_t n = a.value().numel();
  Tensor<float> out({}, Device::CUDA);
  be.mse(a.value().data(), b.value().data(), n, out.data());
  return make_result<float>(std::move(out), {&a, &b}, [a, b, n]() {
    return [a, b, n](const Tensor<float>& g) {
      backend::CudaBackend& be = *backend::cuda_backend();
      for (int side = 0; side < 2; ++side) {
        const Var<float>& self = side ? b : a;
        if (!self.requires_grad()) continue;
        GradSink<float> s = grad_sink(*self.node());
        be.mse_backward(a.value().data(), b.value().data(), n, g.data(), side ? -1.0f : 1.0f, s.data, s.accumulate);
      }
    };
  });
}
}  // namespace detail

// Sum / mean of all elements -> a scalar (shape []). Accumulated in double on the CPU.
template <class T>
inline Var<T> sum(const Var<T>& a) {
  if (a.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::sum_cuda(a);
    else detail::cuda_float_only("sum");
  }
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
  if (a.value().numel() == 0) throw std::invalid_argument("diffuse: mse of empty tensors");
  if (detail::op_device("mse", {&a, &b}) == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::mse_cuda(a, b);
    else detail::cuda_float_only("mse");
  }
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
