// Sinusoidal timestep embedding (Ho et al. 2020, get_timestep_embedding):
//   half = dim / 2, freq[k] = exp(-ln(10000) k / (half - 1)),
//   emb = [sin(t freq), cos(t freq)]  -> [N, dim]
// Computed in T's precision, as the PyTorch reference does in float32.
#pragma once

#include <cmath>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include <diffuse/core/parallel.hpp>
#include <diffuse/core/tensor.hpp>
#include <diffuse/ops/common.hpp>

namespace diffuse {

// On `dev`: a CUDA embedding is computed on the device from the uploaded timesteps (float).
template <class T>
Tensor<T> timestep_embedding(const std::vector<int32_t>& t, int64_t dim, Device dev = Device::CPU) {
  if (dim < 4 || dim % 2) throw std::invalid_argument("diffuse: timestep embedding needs an even dim >= 4");
  const int64_t half = dim / 2, n = static_cast<int64_t>(t.size());
  if (dev == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) {
      backend::CudaBackend& be = backend::require_cuda("timestep_embedding");
      const Tensor<int32_t> td = detail::device_indices(t);
      Tensor<T> e({n, dim}, Device::CUDA);
      be.timestep_embedding(td.data(), e.data(), n, dim);
      return e;
    } else {
      throw std::invalid_argument("diffuse: timestep_embedding on cuda must be float");
    }
  }
  std::vector<T> freq(static_cast<size_t>(half));
  for (int64_t k = 0; k < half; ++k)
    freq[k] = std::exp(-static_cast<T>(std::log(10000.0)) * static_cast<T>(k) / static_cast<T>(half - 1));
  Tensor<T> e({n, dim});
  parallel_for(n, n * half >= 4096, [&](int64_t i) {
    for (int64_t k = 0; k < half; ++k) {
      const T a = static_cast<T>(t[i]) * freq[k];
      e[i * dim + k] = std::sin(a);
      e[i * dim + half + k] = std::cos(a);
    }
  });
  return e;
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Tensor<float> timestep_embedding<float>(const std::vector<int32_t>& t, int64_t dim, Device dev))

}  // namespace diffuse
