// Sinusoidal timestep embedding (Ho et al. 2020, get_timestep_embedding):
//   half = dim / 2, freq[k] = exp(-ln(10000) k / (half - 1)),
//   emb = [sin(t freq), cos(t freq)]  -> [N, dim]
// Computed in T's precision, as the PyTorch reference does in float32.
#pragma once

#include <cmath>
#include <stdexcept>
#include <vector>

#include "../tensor.hpp"

namespace diffuse {

template <class T>
inline Tensor<T> timestep_embedding(const std::vector<int32_t>& t, int64_t dim) {
  if (dim < 4 || dim % 2) throw std::invalid_argument("diffuse: timestep embedding needs an even dim >= 4");
  const int64_t half = dim / 2, n = static_cast<int64_t>(t.size());
  std::vector<T> freq(static_cast<size_t>(half));
  for (int64_t k = 0; k < half; ++k)
    freq[k] = std::exp(-static_cast<T>(std::log(10000.0)) * static_cast<T>(k) / static_cast<T>(half - 1));
  Tensor<T> e({n, dim});
#pragma omp parallel for schedule(static) if (n * half >= 4096)
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = 0; k < half; ++k) {
      const T a = static_cast<T>(t[i]) * freq[k];
      e[i * dim + k] = std::sin(a);
      e[i * dim + half + k] = std::cos(a);
    }
  }
  return e;
}

}  // namespace diffuse
