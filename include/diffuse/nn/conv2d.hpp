// Conv2d: the module of conv2d on NHWC activations, PyTorch's names ("weight", "bias") and default
// initialisation. It keeps its weight as [O, kh, kw, C] (OHWI, what the NHWC convolutions of both
// backends read); its state_dict() and checkpoints hold PyTorch's [O, C, kh, kw].
#pragma once

#include <cmath>

#include <diffuse/nn/module.hpp>
#include <diffuse/ops/conv2d.hpp>
#include <diffuse/ops/group_norm_conv2d.hpp>

namespace diffuse {

template <class T>
class Conv2d : public Module<T> {
 public:
  // PyTorch's default init: kaiming_uniform(a = sqrt(5)) for the weight and
  // U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the bias; both are U(-b, b) with
  // b = 1/sqrt(fan_in), fan_in = in * k * k.
  Conv2d(int64_t in, int64_t out, int64_t k, Generator& g, int64_t stride = 1, int64_t padding = 0, bool bias = true)
      : Conv2d(in, out, k, k, g, Conv2dOptions{stride, stride, padding, padding}, bias) {}
  // Rectangular kernels kh x kw (Inception's 1x7, 7x1), strides and paddings per axis.
  Conv2d(int64_t in, int64_t out, int64_t kh, int64_t kw, Generator& g, const Conv2dOptions& opt, bool bias = true)
      : opt_(opt) {
    const T bound = T(1) / std::sqrt(static_cast<T>(in * kh * kw));
    // Drawn in PyTorch's order, then stored OHWI: the same initial weights as before the layout.
    weight = this->register_parameter("weight", from_torch_layout(uniform({out, in, kh, kw}, bound, g), ParamLayout::ConvOHWI),
                                      ParamLayout::ConvOHWI);
    if (bias) this->bias = this->register_parameter("bias", uniform({out}, bound, g));
  }
  Var<T> operator()(const Var<T>& x) const { return conv2d(x, weight, bias, opt_); }
  // The convolution with a bias per sample and channel (cb [N, out]) and / or a residual of the
  // output's shape added in its epilogue, either undefined for none: conv, add_channel_bias and
  // add fused (ops/conv2d.hpp), the same numbers.
  Var<T> operator()(const Var<T>& x, const Var<T>& cb, const Var<T>& res) const {
    return conv2d(x, weight, bias, opt_, cb, res);
  }
  // The convolution of norm(x): a GroupNorm (+ SiLU, + dropout) as its input side, then cb and
  // res as above; one op (group_norm_conv2d: under bf16 on the device the normalised x is
  // stored in bf16 only), the same numbers as the two layers.
  Var<T> operator()(const Var<T>& x, const GroupNormArgs<T>& norm, const Var<T>& cb, const Var<T>& res) const {
    return group_norm_conv2d(x, norm, weight, bias, opt_, cb, res);
  }
  // Zero weights and bias: the reference zero-initialises the last conv of
  // each residual branch and of the output so that blocks start as identities.
  void zero_() {
    weight.value().fill(T(0));
    if (bias.defined()) bias.value().fill(T(0));
  }

  const Conv2dOptions& options() const { return opt_; }

  Var<T> weight, bias;

 private:
  static Tensor<T> uniform(Shape s, T bound, Generator& g) {
    Tensor<T> t = Tensor<T>::rand(std::move(s), g);
    for (T& v : t) v = (T(2) * v - T(1)) * bound;
    return t;
  }
  Conv2dOptions opt_;
};

}  // namespace diffuse
