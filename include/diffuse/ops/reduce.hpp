// Reductions to a scalar: sum, mean and the MSE loss (accumulated in double on the CPU).
#pragma once

#include <algorithm>
#include <cstddef>
#include <type_traits>

#include <diffuse/ops/common.hpp>
#include <diffuse/ops/elementwise.hpp>

namespace diffuse {

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
Var<T> sum(const Var<T>& a) {
  if (a.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::sum_cuda(a);
    else detail::cuda_float_only("sum");
  }
  const size_t n = a.value().size();
  const T* p = a.value().data();
  const double acc = parallel_sum(static_cast<int64_t>(n), n >= detail::kParallelMin, [&](int64_t i) { return double(p[i]); });
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
Var<T> mean(const Var<T>& a) {
  return scale(sum(a), T(1) / static_cast<T>(std::max<size_t>(1, a.value().size())));
}

// mean((a - b)^2), as torch.nn.functional.mse_loss; gradients flow to both inputs.
template <class T>
Var<T> mse(const Var<T>& a, const Var<T>& b) {
  if (a.shape() != b.shape()) detail::shape_error("mse", a.shape(), b.shape());
  if (a.value().numel() == 0) throw std::invalid_argument("diffuse: mse of empty tensors");
  if (detail::op_device("mse", {&a, &b}) == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::mse_cuda(a, b);
    else detail::cuda_float_only("mse");
  }
  const size_t n = a.value().size();
  const T *pa = a.value().data(), *pb = b.value().data();
  const double acc = parallel_sum(static_cast<int64_t>(n), n >= detail::kParallelMin, [&](int64_t i) {
    const double d = static_cast<double>(pa[i]) - static_cast<double>(pb[i]);
    return d * d;
  });
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
        parallel_for(n, n >= detail::kParallelMin, [&](size_t i) { s.put(i, sgn * c * (pa[i] - pb[i])); });
      }
    };
  });
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Var<float> sum<float>(const Var<float>& a))
DIFFUSE_FLOAT_INSTANCE(Var<float> mean<float>(const Var<float>& a))
DIFFUSE_FLOAT_INSTANCE(Var<float> mse<float>(const Var<float>& a, const Var<float>& b))

}  // namespace diffuse
