// Classification losses on logits [N, K] (rows are samples, K classes):
//
//   log_softmax(x)               F.log_softmax(x, dim=-1), any shape, over the last dimension
//   cross_entropy(logits, y)     F.cross_entropy(logits, y): mean over rows of lse(z) - z[y]
//   argmax_rows(t)               t.argmax(dim=1) for a 2-D tensor (not differentiable)
//
// Both differentiable ops use a row's log-sum-exp max + log(sum exp(z - max)),
// in double, so large logits neither overflow nor lose the small terms.
// Labels are class indices in [0, K); there is no ignore_index.
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include <diffuse/ops/common.hpp>

namespace diffuse {

namespace detail {

// log(sum_j exp(z_j)) of one row of length K.
template <class T>
inline double row_logsumexp(const T* z, int64_t K) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < K; ++j) m = std::max(m, static_cast<double>(z[j]));
  if (!std::isfinite(m)) return m;  // all -inf (or a +inf): nothing to rescale
  double s = 0;
  for (int64_t j = 0; j < K; ++j) s += std::exp(static_cast<double>(z[j]) - m);
  return m + std::log(s);
}

inline Var<float> log_softmax_cuda(const Var<float>& x, int64_t rows, int64_t K) {
  backend::CudaBackend& be = backend::require_cuda("log_softmax");
  Tensor<float> out(x.shape(), Device::CUDA);
  be.log_softmax(x.value().data(), out.data(), rows, K);
  const Tensor<float> yv = out;
  return make_result<float>(std::move(out), {&x}, [x, yv, rows, K]() {
    return [x, yv, rows, K](const Tensor<float>& g) {
      GradSink<float> s = grad_sink(*x.node());
      backend::cuda_backend()->log_softmax_backward(yv.data(), g.data(), s.data, rows, K, s.accumulate);
    };
  });
}

inline Var<float> cross_entropy_cuda(const Var<float>& logits, const std::vector<int32_t>& labels, int64_t N,
                                     int64_t K) {
  backend::CudaBackend& be = backend::require_cuda("cross_entropy");
  const Tensor<int32_t> lab = Tensor<int32_t>::from(labels, {N}).to(Device::CUDA);
  Tensor<float> out({}, Device::CUDA), lse({N}, Device::CUDA);
  be.cross_entropy(logits.value().data(), lab.data(), N, K, out.data(), lse.data());
  return make_result<float>(std::move(out), {&logits}, [logits, lab, lse, N, K]() {
    return [logits, lab, lse, N, K](const Tensor<float>& g) {
      GradSink<float> s = grad_sink(*logits.node());
      backend::cuda_backend()->cross_entropy_backward(logits.value().data(), lab.data(), lse.data(), g.data(), s.data, N,
                                                      K, s.accumulate);
    };
  });
}

}  // namespace detail

// log softmax over the last dimension. Backward: dx = g - softmax * sum(g), with
// softmax = exp(output), so the forward saves nothing but its output.
template <class T>
Var<T> log_softmax(const Var<T>& x) {
  if (x.value().dim() < 1) throw std::invalid_argument("diffuse: log_softmax of a scalar");
  const int64_t K = x.size(-1), rows = K ? x.value().numel() / K : 0;
  if (x.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::log_softmax_cuda(x, rows, K);
    else detail::cuda_float_only("log_softmax");
  }
  Tensor<T> out(x.shape());
  const T* xd = x.value().data();
  T* od = out.data();
  parallel_for(rows, x.value().size() >= detail::kParallelMin, [&](int64_t r) {
    const double lse = detail::row_logsumexp(xd + r * K, K);
    for (int64_t j = 0; j < K; ++j) od[r * K + j] = static_cast<T>(static_cast<double>(xd[r * K + j]) - lse);
  });
  const Tensor<T> yv = out;  // a second handle on the output, for the backward
  return make_result<T>(std::move(out), {&x}, [x, yv, K, rows]() {
    return [x, yv, K, rows](const Tensor<T>& g) {
      GradSink<T> s = grad_sink(*x.node());
      const T* gd = g.data();
      const T* yd = yv.data();
      parallel_for(rows, g.size() >= detail::kParallelMin, [&](int64_t r) {
        double gs = 0;
        for (int64_t j = 0; j < K; ++j) gs += gd[r * K + j];
        for (int64_t j = 0; j < K; ++j) {
          const int64_t i = r * K + j;
          s.put(static_cast<size_t>(i), static_cast<double>(gd[i]) - std::exp(static_cast<double>(yd[i])) * gs);
        }
      });
    };
  });
}

// Mean cross-entropy of logits [N, K] against class labels (N of them, each in
// [0, K)), as F.cross_entropy with its defaults: a scalar. One fused op; its
// backward is g * (softmax - onehot) / N, from the rows' log-sum-exp saved by the forward.
template <class T>
Var<T> cross_entropy(const Var<T>& logits, const std::vector<int32_t>& labels) {
  if (logits.value().dim() != 2)
    throw std::invalid_argument("diffuse: cross_entropy needs logits [N, K], got " + shape_str(logits.shape()));
  const int64_t N = logits.size(0), K = logits.size(1);
  if (N == 0 || K == 0)
    throw std::invalid_argument("diffuse: cross_entropy of empty logits " + shape_str(logits.shape()));
  if (static_cast<int64_t>(labels.size()) != N)
    throw std::invalid_argument("diffuse: cross_entropy: " + std::to_string(labels.size()) + " labels for " +
                                std::to_string(N) + " rows of logits");
  for (int64_t i = 0; i < N; ++i)
    if (labels[i] < 0 || labels[i] >= K)
      throw std::out_of_range("diffuse: cross_entropy: label " + std::to_string(labels[i]) + " of row " +
                              std::to_string(i) + " outside [0, " + std::to_string(K) + ")");
  if (logits.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::cross_entropy_cuda(logits, labels, N, K);
    else detail::cuda_float_only("cross_entropy");
  }
  const T* zd = logits.value().data();
  std::vector<double> lse(static_cast<size_t>(N)), loss(static_cast<size_t>(N));
  parallel_for(N, logits.value().size() >= detail::kParallelMin, [&](int64_t i) {
    lse[i] = detail::row_logsumexp(zd + i * K, K);
    loss[i] = lse[i] - static_cast<double>(zd[i * K + labels[i]]);
  });
  double total = 0;
  for (double l : loss) total += l;  // in row order: the same sum for any thread count
  Tensor<T> out = Tensor<T>::full({}, static_cast<T>(total / static_cast<double>(N)));
  return make_result<T>(std::move(out), {&logits}, [&]() {
    return [logits, labels, lse = std::move(lse), N, K](const Tensor<T>& g) {
      GradSink<T> s = grad_sink(*logits.node());
      const T* zd = logits.value().data();
      const double c = static_cast<double>(g[0]) / static_cast<double>(N);
      parallel_for(N, logits.value().size() >= detail::kParallelMin, [&](int64_t i) {
        for (int64_t j = 0; j < K; ++j) {
          const double p = std::exp(static_cast<double>(zd[i * K + j]) - lse[i]);
          s.put(static_cast<size_t>(i * K + j), c * (p - (j == labels[i] ? 1.0 : 0.0)));
        }
      });
    };
  });
}

// Index of each row's largest value in a 2-D tensor (the predicted class); the
// first one on ties and a NaN counts as the largest, as torch.argmax.
template <class T>
inline std::vector<int32_t> argmax_rows(const Tensor<T>& t) {
  t.require_cpu("argmax_rows");
  if (t.dim() != 2) throw std::invalid_argument("diffuse: argmax_rows needs a 2-D tensor, got " + shape_str(t.shape()));
  const int64_t N = t.size(0), K = t.size(1);
  if (K == 0 && N > 0) throw std::invalid_argument("diffuse: argmax_rows of rows with no elements");
  std::vector<int32_t> out(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) {
    const T* r = t.data() + i * K;
    int64_t best = 0;
    for (int64_t j = 1; j < K && !std::isnan(r[best]); ++j)
      if (r[j] > r[best] || std::isnan(r[j])) best = j;
    out[i] = static_cast<int32_t>(best);
  }
  return out;
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Var<float> log_softmax<float>(const Var<float>& x))
DIFFUSE_FLOAT_INSTANCE(Var<float> cross_entropy<float>(const Var<float>& logits, const std::vector<int32_t>& labels))

}  // namespace diffuse
