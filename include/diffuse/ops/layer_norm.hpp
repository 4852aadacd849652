// Layer normalisation over the last dimension, as torch.nn.functional.layer_norm(x, (C,),
// gamma, beta, eps): per row of C values, mean and biased variance (accumulated in double on
// the CPU), y = (x - mean) / sqrt(var + eps) * gamma + beta. gamma and beta [C] may both be
// undefined (no affine map). The transformer block's norm (a DiT, a FiLM-conditioned MLP).
#pragma once

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/ops/common.hpp>

namespace diffuse {

namespace detail {

inline Var<float> layer_norm_cuda(const Var<float>& x, const Var<float>& gamma, const Var<float>& beta, int64_t rows,
                                  int64_t C, double eps) {
  backend::CudaBackend& be = backend::require_cuda("layer_norm");
  const bool affine = gamma.defined();
  Tensor<float> out(x.shape(), Device::CUDA);
  Tensor<float> stats({2 * rows}, Device::CUDA);  // mean, then rstd, per row
  be.layer_norm(x.value().data(), affine ? gamma.value().data() : nullptr, affine ? beta.value().data() : nullptr,
                out.data(), stats.data(), stats.data() + rows, rows, C, static_cast<float>(eps));
  return make_result<float>(std::move(out), {&x, affine ? &gamma : &x, affine ? &beta : &x},
                            [x, gamma, beta, affine, stats, rows, C]() {
    return [x, gamma, beta, affine, stats, rows, C](const Tensor<float>& g) {
      GradSink<float> sx{}, sg{}, sb{};
      if (x.requires_grad()) sx = grad_sink(*x.node());
      if (affine && gamma.requires_grad()) sg = grad_sink(*gamma.node());
      if (affine && beta.requires_grad()) sb = grad_sink(*beta.node());
      backend::cuda_backend()->layer_norm_backward(g.data(), x.value().data(), affine ? gamma.value().data() : nullptr,
                                                   stats.data(), stats.data() + rows, sx.data, sx.accumulate, sg.data,
                                                   sg.accumulate, sb.data, sb.accumulate, rows, C);
    };
  });
}

}  // namespace detail

template <class T>
Var<T> layer_norm(const Var<T>& x, const Var<T>& gamma, const Var<T>& beta, double eps = 1e-5) {
  if (x.value().dim() < 1) throw std::invalid_argument("diffuse: layer_norm of a scalar");
  const int64_t C = x.size(-1), rows = C ? x.value().numel() / C : 0;
  if (C == 0) throw std::invalid_argument("diffuse: layer_norm over an empty last dimension " + shape_str(x.shape()));
  if (gamma.defined() != beta.defined())
    throw std::invalid_argument("diffuse: layer_norm: give both gamma and beta, or neither");
  for (const Var<T>* v : {&gamma, &beta})
    if (v->defined() && (v->value().dim() != 1 || v->size(0) != C))
      throw std::invalid_argument("diffuse: layer_norm: gamma and beta must have shape [" + std::to_string(C) +
                                  "], got " + shape_str(v->shape()));
  if (!(eps > 0)) throw std::invalid_argument("diffuse: layer_norm: eps must be positive");
  if (detail::op_device("layer_norm", {&x, &gamma, &beta}) == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::layer_norm_cuda(x, gamma, beta, rows, C, eps);
    else detail::cuda_float_only("layer_norm");
  }
  const bool affine = gamma.defined();
  Tensor<T> out(x.shape());
  std::vector<T> mean(static_cast<size_t>(rows)), rstd(static_cast<size_t>(rows));
  const T* xd = x.value().data();
  T* od = out.data();
  const T* gd = affine ? gamma.value().data() : nullptr;
  const T* bd = affine ? beta.value().data() : nullptr;
  parallel_for(rows, x.value().size() >= detail::kParallelMin, [&](int64_t r) {
    const T* xr = xd + r * C;
    double m = 0, v = 0;
    for (int64_t c = 0; c < C; ++c) m += xr[c];
    m /= static_cast<double>(C);
    for (int64_t c = 0; c < C; ++c) {
      const double d = xr[c] - m;
      v += d * d;
    }
    const double rs = 1.0 / std::sqrt(v / static_cast<double>(C) + eps);
    mean[r] = static_cast<T>(m);
    rstd[r] = static_cast<T>(rs);
    for (int64_t c = 0; c < C; ++c) {
      const T xh = (xr[c] - mean[r]) * rstd[r];
      od[r * C + c] = affine ? xh * gd[c] + bd[c] : xh;
    }
  });
  return make_result<T>(std::move(out), {&x, affine ? &gamma : &x, affine ? &beta : &x},
                        [x, gamma, beta, affine, mean, rstd, rows, C]() {
    return [x, gamma, beta, affine, mean, rstd, rows, C](const Tensor<T>& g) {
      const T* xd = x.value().data();
      const T* gd = g.data();
      const T* ga = affine ? gamma.value().data() : nullptr;
      if (x.requires_grad()) {
        // dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = g gamma.
        GradSink<T> s = grad_sink(*x.node());
        parallel_for(rows, g.size() >= detail::kParallelMin, [&](int64_t r) {
          double k1 = 0, k2 = 0;
          for (int64_t c = 0; c < C; ++c) {
            const double dxh = static_cast<double>(gd[r * C + c]) * (ga ? ga[c] : T(1));
            k1 += dxh;
            k2 += dxh * static_cast<double>((xd[r * C + c] - mean[r]) * rstd[r]);
          }
          k1 /= static_cast<double>(C);
          k2 /= static_cast<double>(C);
          for (int64_t c = 0; c < C; ++c) {
            const double xh = static_cast<double>((xd[r * C + c] - mean[r]) * rstd[r]);
            const double dxh = static_cast<double>(gd[r * C + c]) * (ga ? ga[c] : T(1));
            s.put(static_cast<size_t>(r * C + c), static_cast<double>(rstd[r]) * (dxh - k1 - xh * k2));
          }
        });
      }
      if (affine && (gamma.requires_grad() || beta.requires_grad())) {
        std::vector<double> dg(static_cast<size_t>(C), 0.0), db(static_cast<size_t>(C), 0.0);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < C; ++c) {
            const double gv = gd[r * C + c];
            db[c] += gv;
            dg[c] += gv * static_cast<double>((xd[r * C + c] - mean[r]) * rstd[r]);
          }
        if (gamma.requires_grad()) {
          GradSink<T> s = grad_sink(*gamma.node());
          for (int64_t c = 0; c < C; ++c) s.put(static_cast<size_t>(c), dg[c]);
        }
        if (beta.requires_grad()) {
          GradSink<T> s = grad_sink(*beta.node());
          for (int64_t c = 0; c < C; ++c) s.put(static_cast<size_t>(c), db[c]);
        }
      }
    };
  });
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Var<float> layer_norm<float>(const Var<float>& x, const Var<float>& gamma,
    const Var<float>& beta, double eps))

}  // namespace diffuse
