// Element-type conversion on the device, for the bf16 math mode's operand buffers:
//
//   convert(x, y, n, accumulate)   y[i] = D(x[i]), or with accumulate y[i] = D(float(y[i]) + float(x[i]))
//   convert_2d(x, x_ld, y, y_ld, rows, width)   y[r * y_ld + j] = D(x[r * x_ld + j]): one operand of a
//                                  channel concatenation written straight into its bf16 columns
//                                  (res_block's input on the up path)
//
// S and D are float or bf16 (bf16.hpp: float -> bf16 rounds to nearest even, bf16 -> float is
// exact). A bf16 result is added into a float buffer in float, so gradients that several
// products feed are summed in float, not bf16. CPU reference: the same loop on the host
// (convert_host), which the tests compare with.
#pragma once

#include <diffuse/backend/cuda/bf16.hpp>
#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace diffuse::kernels {

template <class S, class D>
__global__ void convert_kernel(const S* __restrict__ x, D* __restrict__ y, std::int64_t n, bool accumulate) {
  const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float v = static_cast<float>(x[i]);
    y[i] = static_cast<D>(accumulate ? static_cast<float>(y[i]) + v : v);
  }
}

// y = D(x) (or += with accumulate), n elements; x and y must not overlap.
template <class S, class D>
inline void convert(const S* x, D* y, std::int64_t n, bool accumulate, cuda::stream_t stream = {},
                    unsigned block = 256, unsigned max_blocks = 65535) {
  if (n < 0) throw std::invalid_argument("convert: negative size " + std::to_string(n));
  if (block == 0 || block > 1024 || max_blocks == 0)
    throw std::invalid_argument("convert: block must be in [1, 1024] and max_blocks positive");
  if (n == 0) return;
  if (!x || !y) throw std::invalid_argument("convert: null pointer");
  const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((n + block - 1) / block, max_blocks));
  cuda::launch(convert_kernel<S, D>, dim3(blocks), dim3(block), 0, stream, x, y, n, accumulate);
}

template <class S, class D>
__global__ void convert_2d_kernel(const S* __restrict__ x, std::int64_t x_ld, D* __restrict__ y, std::int64_t y_ld,
                                  std::int64_t n, std::int64_t width) {
  const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::int64_t r = i / width, j = i - r * width;
    y[r * y_ld + j] = static_cast<D>(static_cast<float>(x[r * x_ld + j]));
  }
}

// y[r * y_ld + j] = D(x[r * x_ld + j]) for r < rows, j < width; rows at least width apart on both
// sides (when rows > 1); x and y must not overlap.
template <class S, class D>
inline void convert_2d(const S* x, std::int64_t x_ld, D* y, std::int64_t y_ld, std::int64_t rows, std::int64_t width,
                       cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 65535) {
  if (rows < 0 || width < 0) throw std::invalid_argument("convert_2d: negative size");
  if (block == 0 || block > 1024 || max_blocks == 0)
    throw std::invalid_argument("convert_2d: block must be in [1, 1024] and max_blocks positive");
  if (rows == 0 || width == 0) return;
  if (rows > 1 && (x_ld < width || y_ld < width))
    throw std::invalid_argument("convert_2d: leading dimensions must be at least the width");
  if (!x || !y) throw std::invalid_argument("convert_2d: null pointer");
  const std::int64_t n = rows * width;
  const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((n + block - 1) / block, max_blocks));
  cuda::launch(convert_2d_kernel<S, D>, dim3(blocks), dim3(block), 0, stream, x, x_ld, y, y_ld, n, width);
}

// The CPU reference (host memory).
template <class S, class D>
inline void convert_host(const S* x, D* y, std::int64_t n, bool accumulate) {
  for (std::int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    y[i] = static_cast<D>(accumulate ? static_cast<float>(y[i]) + v : v);
  }
}

}  // namespace diffuse::kernels
