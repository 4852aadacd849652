// Elementwise ops with NumPy broadcasting (add, sub, mul and their operators, scale) and the
// pointwise activations (silu, relu, gelu, activate), on the device of their operands: the CPU
// code here, or the CUDA backend's entries from each op's `*_cuda` twin just above it.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <diffuse/ops/common.hpp>

namespace diffuse {

namespace detail {

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
    parallel_for(n, n >= kParallelMin, [&](size_t i) { po[i] = apply(pa[i], pb[i]); });
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
            parallel_for(n, n >= kParallelMin, [&](size_t i) { s.put(i, pg[i] * po[i]); });
          } else {
            parallel_for(n, n >= kParallelMin, [&](size_t i) { s.put(i, sign * pg[i]); });
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
Var<T> add(const Var<T>& a, const Var<T>& b) {
  return detail::binary(a, b, detail::BinOp::Add, "add");
}
template <class T>
Var<T> sub(const Var<T>& a, const Var<T>& b) {
  return detail::binary(a, b, detail::BinOp::Sub, "sub");
}
template <class T>
Var<T> mul(const Var<T>& a, const Var<T>& b) {
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
Var<T> scale(const Var<T>& a, T s) {
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
  parallel_for(n, n >= kParallelMin, [&](size_t i) { po[i] = f(pa[i]); });
  return make_result<T>(std::move(out), {&a}, [a, df]() {
    return [a, df](const Tensor<T>& g) {
      const size_t n = g.size();
      const T* pa = a.value().data();
      const T* pg = g.data();
      GradSink<T> s = grad_sink(*a.node());
      parallel_for(n, n >= kParallelMin, [&](size_t i) { s.put(i, pg[i] * df(pa[i])); });
    };
  });
}
}  // namespace detail

// SiLU through Eigen's vectorised exp (g++ does not vectorise a std::exp loop).
// The standalone op; after a linear layer use linear_act, which fuses bias and
// SiLU into the GEMM's row blocks and keeps sigmoid(z) for the backward.
template <class T>
Var<T> silu(const Var<T>& a) {
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
Var<T> relu(const Var<T>& a) {
  if (a.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::activation_cuda(a, Activation::ReLU, "relu");
    else detail::cuda_float_only("relu");
  }
  return detail::pointwise(a, [](T x) { return x > T(0) ? x : T(0); }, [](T x) { return x > T(0) ? T(1) : T(0); });
}

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
Var<T> gelu(const Var<T>& a) {
  if (a.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::activation_cuda(a, Activation::GELU, "gelu");
    else detail::cuda_float_only("gelu");
  }
  return detail::pointwise(a, [](T x) { return gelu_value(x); }, [](T x) { return gelu_grad(x); });
}

// f(x) for an Activation (None: x itself).
template <class T>
Var<T> activate(const Var<T>& x, Activation a) {
  switch (a) {
    case Activation::SiLU: return silu(x);
    case Activation::ReLU: return relu(x);
    case Activation::GELU: return gelu(x);
    case Activation::None: break;
  }
  return x;
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Var<float> add<float>(const Var<float>& a, const Var<float>& b))
DIFFUSE_FLOAT_INSTANCE(Var<float> sub<float>(const Var<float>& a, const Var<float>& b))
DIFFUSE_FLOAT_INSTANCE(Var<float> mul<float>(const Var<float>& a, const Var<float>& b))
DIFFUSE_FLOAT_INSTANCE(Var<float> scale<float>(const Var<float>& a, float s))
DIFFUSE_FLOAT_INSTANCE(Var<float> silu<float>(const Var<float>& a))
DIFFUSE_FLOAT_INSTANCE(Var<float> relu<float>(const Var<float>& a))
DIFFUSE_FLOAT_INSTANCE(Var<float> gelu<float>(const Var<float>& a))
DIFFUSE_FLOAT_INSTANCE(Var<float> activate<float>(const Var<float>& x, Activation a))

}  // namespace diffuse
