// The pointwise activations of the library on the device, as the CPU ops compute them
// (include/diffuse/ops/elementwise.hpp), selected by diffuse::Activation:
//
//   activation_forward    y = f(x): diffuse::silu, relu, gelu (exact erf form), None = copy
//   activation_backward   dx (+)= g * f'(x) from the saved input x (their backwards)
//   bias_activation       the epilogue of diffuse::linear_act / linear_gather_act after the GEMM
//                         z = x W^T: z += b (+ table[idx]) in place, then y = f(z)
//
// Float math throughout, in the CPU's order of operations (same formulas, so results agree to
// the last bit or two of expf / erff): SiLU x / (1 + exp(-x)) (device_silu, as silu.cuh and
// bias_silu_forward), its derivative g * s * (1 + x (1 - s)); GELU 0.5 x (1 + erf(x / sqrt 2)),
// its derivative Phi(x) + x phi(x). ReLU's gradient is g where x > 0, else 0 (also for a NaN or
// infinite g, as torch's threshold_backward and linear_act's CPU backward).
// Elementwise only: an output may alias an input at the same index (no __restrict__).
#pragma once

#include <diffuse/backend/op_types.hpp>
#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "elementwise.cuh"  // StrideDivMod, check_flat, flat_grid
#include "silu.cuh"         // device_silu

namespace diffuse::kernels {

namespace activation_detail {

__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f)); }
__device__ __forceinline__ float gelu_grad(float x) {
  const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752440f));
  const float pdf = expf(-0.5f * x * x) * 0.39894228040143267794f;  // 1 / sqrt(2 pi)
  return cdf + x * pdf;
}

template <Activation F>
__device__ __forceinline__ float apply(float x) {
  if constexpr (F == Activation::SiLU) return device_silu(x);
  else if constexpr (F == Activation::ReLU) return x > 0.0f ? x : 0.0f;
  else if constexpr (F == Activation::GELU) return gelu(x);
  else return x;
}

// g * f'(x), each in the CPU backward's order (SiLU: (g * s) * (1 + x (1 - s))).
template <Activation F>
__device__ __forceinline__ float grad(float x, float g) {
  if constexpr (F == Activation::SiLU) {
    const float s = 1.0f / (1.0f + expf(-x));
    return g * s * (1.0f + x * (1.0f - s));
  } else if constexpr (F == Activation::ReLU) {
    return x > 0.0f ? g : 0.0f;
  } else if constexpr (F == Activation::GELU) {
    return g * gelu_grad(x);
  } else {
    return g;
  }
}

inline const char* name_of(Activation f) {
  switch (f) {
    case Activation::SiLU: return "SiLU";
    case Activation::ReLU: return "ReLU";
    case Activation::None: return "None";
    case Activation::GELU: return "GELU";
  }
  return "?";
}
[[noreturn]] inline void bad_activation(const char* who, Activation f) {
  throw std::invalid_argument(std::string(who) + ": unknown activation " +
                              std::to_string(static_cast<unsigned>(f)));
}

}  // namespace activation_detail

// ---------------------------------------------------------------- kernels

template <class T, Activation F>
__global__ void activation_forward_kernel(const T* x, T* y, std::int64_t n) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  for (std::int64_t i = elementwise_detail::first_index(); i < n; i += stride)
    y[i] = static_cast<T>(activation_detail::apply<F>(static_cast<float>(x[i])));
}

template <class T, Activation F>
__global__ void activation_backward_kernel(const T* x, const T* g, T* dx, std::int64_t n, bool acc) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  for (std::int64_t i = elementwise_detail::first_index(); i < n; i += stride) {
    const float d = activation_detail::grad<F>(F == Activation::None ? 0.0f : static_cast<float>(x[i]),
                                               static_cast<float>(g[i]));
    dx[i] = static_cast<T>(acc ? static_cast<float>(dx[i]) + d : d);
  }
}

// z[i] = z[i] + b[c] (+ table[idx[r] C + c]), stored; y[i] = f(stored z) (y == z for None: the
// store of y is then the same value again).
template <class T, Activation F, bool kTable>
__global__ void bias_activation_kernel(T* z, const T* b, const T* table, const std::int32_t* idx, T* y,
                                       std::int64_t n, std::int64_t C) {
  const std::int64_t stride = elementwise_detail::grid_stride();
  std::int64_t i = elementwise_detail::first_index();
  for (elementwise_detail::StrideDivMod rc(i, stride, C); i < n; i += stride, rc.advance()) {
    float v = static_cast<float>(z[i]) + static_cast<float>(b[rc.r]);  // (z + b) + t, the CPU's order
    if constexpr (kTable) v += static_cast<float>(table[static_cast<std::int64_t>(idx[rc.q]) * C + rc.r]);
    const T zs = static_cast<T>(v);
    z[i] = zs;
    y[i] = static_cast<T>(activation_detail::apply<F>(static_cast<float>(zs)));  // from the stored value
  }
}

namespace activation_detail {

// f(std::integral_constant<Activation, a>{}): one kernel instantiation per activation.
template <class F>
inline void with_activation(const char* who, Activation a, F&& f) {
  switch (a) {
    case Activation::SiLU: return f(std::integral_constant<Activation, Activation::SiLU>{});
    case Activation::ReLU: return f(std::integral_constant<Activation, Activation::ReLU>{});
    case Activation::None: return f(std::integral_constant<Activation, Activation::None>{});
    case Activation::GELU: return f(std::integral_constant<Activation, Activation::GELU>{});
  }
  bad_activation(who, a);
}

}  // namespace activation_detail

// ---------------------------------------------------------------- launchers

// y = f(x) elementwise over n floats (device pointers; y may be x). None copies x to y (nothing
// to do when y == x). `block` threads per block, at most max_blocks blocks (grid-stride loop).
inline void activation_forward(Activation f, const float* x, float* y, std::int64_t n, cuda::stream_t stream = {},
                               unsigned block = 256, unsigned max_blocks = 65535) {
  constexpr const char* who = "activation_forward";
  elementwise_detail::check_flat(who, n, block, max_blocks);
  if (n == 0) return;  // an empty grid is an invalid launch
  elementwise_detail::check_ptr(who, x, "x");
  elementwise_detail::check_ptr(who, y, "y");
  if (f == Activation::None && x == y) return;
  const dim3 grid = elementwise_detail::flat_grid(n, block, max_blocks);
  activation_detail::with_activation(who, f, [&](auto a) {
    cuda::launch(activation_forward_kernel<float, decltype(a)::value>, grid, dim3(block), 0, stream, x, y, n);
  });
}

// dx (+)= g * f'(x) over n floats, from the forward's saved input x (SiLU: s (1 + x (1 - s)),
// s = sigmoid(x); ReLU: 1 where x > 0; GELU: Phi(x) + x phi(x); None: 1, and x is not read and
// may be null). acc false: dx is written, not read. dx may be g (or x). A null dx (a gradient
// nobody needs) is skipped.
inline void activation_backward(Activation f, const float* x, const float* g, float* dx, std::int64_t n, bool acc,
                                cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 65535) {
  constexpr const char* who = "activation_backward";
  elementwise_detail::check_flat(who, n, block, max_blocks);
  if (n == 0 || !dx) return;
  if (f != Activation::None) elementwise_detail::check_ptr(who, x, "x");
  elementwise_detail::check_ptr(who, g, "g");
  const dim3 grid = elementwise_detail::flat_grid(n, block, max_blocks);
  activation_detail::with_activation(who, f, [&](auto a) {
    cuda::launch(activation_backward_kernel<float, decltype(a)::value>, grid, dim3(block), 0, stream, x, g, dx, n,
                 acc);
  });
}

// The epilogue of linear_act after the GEMM z = x W^T [rows, C]: z[r, c] += b[c] (then
// + table[idx[r] C + c] when table is not null; idx: device int32 [rows], each in range: the
// caller checks them on the host) in place, so z keeps the pre-activation for the backward, and
// y = f(z) computed from the stored z. y must not be z, except for None, where y == z is allowed
// (then only the add; y != z gets a copy of z).
inline void bias_activation(float* z, const float* b, const float* table, const std::int32_t* idx, float* y,
                            std::int64_t rows, std::int64_t C, Activation f, cuda::stream_t stream = {},
                            unsigned block = 256, unsigned max_blocks = 65535) {
  constexpr const char* who = "bias_activation";
  if (rows < 0 || C < 0) throw std::invalid_argument(std::string(who) + ": negative size");
  if (C > 0 && rows > std::numeric_limits<std::int64_t>::max() / C)
    throw std::invalid_argument(std::string(who) + ": rows * C overflows");
  const std::int64_t n = rows * C;
  elementwise_detail::check_flat(who, n, block, max_blocks);
  if (n == 0) return;
  elementwise_detail::check_ptr(who, z, "z");
  elementwise_detail::check_ptr(who, b, "b");
  elementwise_detail::check_ptr(who, y, "y");
  if (table) elementwise_detail::check_ptr(who, idx, "idx (table given)");
  if (f != Activation::None && static_cast<const void*>(z) == static_cast<const void*>(y))
    throw std::invalid_argument(std::string(who) + ": y must not be z for " + activation_detail::name_of(f) +
                                " (z keeps the pre-activation)");
  const dim3 grid = elementwise_detail::flat_grid(n, block, max_blocks);
  activation_detail::with_activation(who, f, [&](auto a) {
    constexpr Activation F = decltype(a)::value;
    if (table)
      cuda::launch(bias_activation_kernel<float, F, true>, grid, dim3(block), 0, stream, z, b, table, idx, y, n, C);
    else
      cuda::launch(bias_activation_kernel<float, F, false>, grid, dim3(block), 0, stream, z, b, table, idx, y, n, C);
  });
}

}  // namespace diffuse::kernels
