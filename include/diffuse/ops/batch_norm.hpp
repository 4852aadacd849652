// Batch normalisation in inference mode on NHWC images [N, H, W, C]:
//
//   batch_norm_inference(x, weight, bias, running_mean, running_var, eps)
//     = F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps)
//     y = (x - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c]
//
// As PyTorch's CPU kernel, per channel alpha = weight / sqrt(var + eps) and
// beta = bias - mean * alpha first, then y = x * alpha + beta: one multiply-add
// per element. The running statistics are constants (buffers, not trained);
// gradients flow to x, weight and bias. Training-mode batch statistics are not
// implemented: the FID network is the one user, and it only runs inference.
#pragma once

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/ops/common.hpp>
#include <diffuse/ops/nhwc.hpp>

namespace diffuse {

namespace detail {
inline Var<float> batch_norm_inference_cuda(const Var<float>& x, const Var<float>& weight, const Var<float>& bias,
                                            const Tensor<float>& running_mean, const Tensor<float>& running_var,
                                            float eps, int64_t P, int64_t C) {
  backend::CudaBackend& be = backend::require_cuda("batch_norm_inference");
  Tensor<float> out(x.shape(), Device::CUDA);
  be.batch_norm_inference(x.value().data(), weight.value().data(), bias.value().data(), running_mean.data(),
                          running_var.data(), eps, out.data(), P, C);
  const Tensor<float> mean = running_mean.clone(), var = running_var.clone();  // the caller's buffers may change
  return make_result<float>(std::move(out), {&x, &weight, &bias}, [&]() {
    return [x, weight, bias, mean, var, eps, P, C](const Tensor<float>& g) {
      GradSink<float> sx{}, sw{}, sb{};
      if (x.requires_grad()) sx = grad_sink(*x.node());
      if (weight.requires_grad()) sw = grad_sink(*weight.node());
      if (bias.requires_grad()) sb = grad_sink(*bias.node());
      backend::cuda_backend()->batch_norm_inference_backward(g.data(), x.value().data(), weight.value().data(),
                                                             mean.data(), var.data(), eps, sx.data, sx.accumulate,
                                                             sw.data, sw.accumulate, sb.data, sb.accumulate, P, C);
    };
  });
}
}  // namespace detail

template <class T>
Var<T> batch_norm_inference(const Var<T>& x, const Var<T>& weight, const Var<T>& bias,
                            const Tensor<T>& running_mean, const Tensor<T>& running_var, double eps) {
  detail::require_nhwc("batch_norm_inference", x.shape());
  const int64_t C = x.size(3), P = x.value().numel() / std::max<int64_t>(C, 1);
  for (const Shape* s : {&weight.shape(), &bias.shape(), &running_mean.shape(), &running_var.shape()})
    if (s->size() != 1 || (*s)[0] != C)
      throw std::invalid_argument("diffuse: batch_norm_inference: weight, bias and running statistics must be [" +
                                  std::to_string(C) + "] for x " + shape_str(x.shape()) + ", got " + shape_str(*s));
  if (!(eps > 0)) throw std::invalid_argument("diffuse: batch_norm_inference: eps must be positive");
  if (detail::op_device("batch_norm_inference", {&x, &weight, &bias}) == Device::CUDA) {
    if (running_mean.device() != Device::CUDA || running_var.device() != Device::CUDA)
      throw std::invalid_argument("diffuse: batch_norm_inference: running statistics on another device than x");
    if constexpr (std::is_same_v<T, float>)
      return detail::batch_norm_inference_cuda(x, weight, bias, running_mean, running_var, static_cast<float>(eps), P, C);
    else detail::cuda_float_only("batch_norm_inference");
  }
  running_mean.require_cpu("batch_norm_inference (running mean)");
  running_var.require_cpu("batch_norm_inference (running variance)");
  // invstd kept for the weight gradient; alpha and beta as PyTorch forms them.
  std::vector<T> invstd(C), alpha(C), beta(C);
  for (int64_t c = 0; c < C; ++c) {
    invstd[c] = T(1) / std::sqrt(running_var[c] + static_cast<T>(eps));
    alpha[c] = invstd[c] * weight.value()[c];
    beta[c] = bias.value()[c] - running_mean[c] * alpha[c];
  }
  Tensor<T> out(x.shape());
  const T* xd = x.value().data();
  T* od = out.data();
  parallel_for(P, out.size() >= detail::kParallelMin, [&](int64_t p) {
    for (int64_t c = 0; c < C; ++c) od[p * C + c] = xd[p * C + c] * alpha[c] + beta[c];
  });
  const Tensor<T> mean = running_mean;  // the backward's copy: the caller's buffer may change
  return make_result<T>(std::move(out), {&x, &weight, &bias}, [&]() {
    return [x, weight, bias, mean, invstd, alpha, P, C](const Tensor<T>& g) {
      const T* gd = g.data();
      if (x.requires_grad()) {
        GradSink<T> s = grad_sink(*x.node());
        parallel_for(P, g.size() >= detail::kParallelMin, [&](int64_t p) {
          for (int64_t c = 0; c < C; ++c) s.put(static_cast<size_t>(p * C + c), gd[p * C + c] * alpha[c]);
        });
      }
      if (weight.requires_grad() || bias.requires_grad()) {
        // Sums over all pixels in double, one pass; sequential (C-wide rows, small next to the convs).
        std::vector<double> gw(C, 0.0), gb(C, 0.0);
        const T* xd = x.value().data();
        for (int64_t p = 0; p < P; ++p)
          for (int64_t c = 0; c < C; ++c) {
            const double gv = gd[p * C + c];
            gb[c] += gv;
            gw[c] += gv * (static_cast<double>(xd[p * C + c]) - static_cast<double>(mean[c]));
          }
        if (weight.requires_grad()) {
          GradSink<T> s = grad_sink(*weight.node());
          for (int64_t c = 0; c < C; ++c) s.put(static_cast<size_t>(c), gw[c] * static_cast<double>(invstd[c]));
        }
        if (bias.requires_grad()) {
          GradSink<T> s = grad_sink(*bias.node());
          for (int64_t c = 0; c < C; ++c) s.put(static_cast<size_t>(c), gb[c]);
        }
      }
    };
  });
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Var<float> batch_norm_inference<float>(const Var<float>& x, const Var<float>& weight,
    const Var<float>& bias, const Tensor<float>& running_mean, const Tensor<float>& running_var, double eps))

}  // namespace diffuse
