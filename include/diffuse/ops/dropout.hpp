// dropout(x, p, gen, training): F.dropout with the mask from the counter-based RNG (the same mask
// on every device for the same generator state).
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <diffuse/core/rng.hpp>
#include <diffuse/ops/common.hpp>

namespace diffuse {

namespace detail {
// f(i, keep) for every element of a dropout mask: keep when uniform draw i of (seed, at) is
// below 1 - p. Draws go 4 per Philox block, as Generator::uniform, so the mask is that of
// gen.uniform() at the same place in the stream, in any thread count.
template <class F>
inline void dropout_mask(uint64_t seed, DrawPos at, size_t n, double p, F&& f) {
  if (at.base) throw std::logic_error("diffuse: dropout on the CPU with a draw placed by a device word");
  const double keep_below = 1.0 - p;
  const uint64_t b0 = at.first / 4, end = at.first + n;
  parallel_for(static_cast<int64_t>(draw_blocks(at.first, n)), n >= kParallelMin / 4, [&](int64_t j) {
    const uint64_t blk = b0 + static_cast<uint64_t>(j);
    const Philox4 b = philox4x32_10(at.counter(blk), seed);
    for (unsigned l = 0; l < 4; ++l) {
      const uint64_t e = 4 * blk + l;
      if (e >= at.first && e < end) f(static_cast<size_t>(e - at.first), static_cast<double>(uint_to_uniform(b.v[l])) < keep_below);
    }
  });
}
}  // namespace detail

namespace detail {
// The kept values' factor, 1 / (1 - p) in T; 0 for p == 1 (all zeros, as PyTorch).
template <class T>
T dropout_scale(double p) {
  return p >= 1.0 ? T(0) : T(1) / static_cast<T>(1.0 - p);
}

inline Var<float> dropout_cuda(const Var<float>& x, double p, uint64_t seed, DrawPos at) {
  backend::CudaBackend& be = backend::require_cuda("dropout");
  const int64_t n = x.value().numel();
  Tensor<float> out(x.shape(), Device::CUDA);
  be.dropout(x.value().data(), out.data(), n, p, seed, at);
  return make_result<float>(std::move(out), {&x}, [x, n, p, seed, at]() {
    return [x, n, p, seed, at](const Tensor<float>& g) {
      GradSink<float> s = grad_sink(*x.node());
      backend::cuda_backend()->dropout_backward(g.data(), s.data, n, p, seed, at, s.accumulate);
    };
  });
}
}  // namespace detail

// F.dropout(x, p, training): each element zeroed with probability p, the rest
// scaled by 1 / (1 - p). The mask comes from gen (which advances by ceil(n / 4)
// blocks, or past all the ranks' shares of the draw, core/rng.hpp); the backward
// regenerates it from the same place in the stream instead of storing it.
// Not training, or p == 0: returns x itself and draws nothing.
template <class T>
Var<T> dropout(const Var<T>& x, double p, Generator& gen, bool training) {
  if (!(p >= 0.0 && p <= 1.0))
    throw std::invalid_argument("diffuse: dropout probability must be in [0, 1], got " + std::to_string(p));
  if (!training || p == 0.0) return x;
  const size_t n = x.value().size();
  const uint64_t seed = gen.seed;
  if (x.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::dropout_cuda(x, p, seed, backend::device_draw(gen, n));
    else detail::cuda_float_only("dropout");
  }
  const DrawPos at = gen.take(n);
  const T scale = detail::dropout_scale<T>(p);
  Tensor<T> out(x.shape());
  const T* xd = x.value().data();
  T* od = out.data();
  detail::dropout_mask(seed, at, n, p, [&](size_t i, bool keep) { od[i] = keep ? xd[i] * scale : T(0); });
  return make_result<T>(std::move(out), {&x}, [x, seed, at, n, p, scale]() {
    return [x, seed, at, n, p, scale](const Tensor<T>& g) {
      GradSink<T> s = grad_sink(*x.node());
      const T* gd = g.data();
      detail::dropout_mask(seed, at, n, p, [&](size_t i, bool keep) { s.put(i, keep ? gd[i] * scale : T(0)); });
    };
  });
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Var<float> dropout<float>(const Var<float>& x, double p, Generator& gen, bool training))

}  // namespace diffuse
