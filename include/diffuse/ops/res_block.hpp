// res_block: the DDPM U-Net's residual block as one op,
//   h = conv1(norm1(x)) + temb      (temb [N, O]: the time embedding's projection, per channel)
//   out = conv2(norm2(h)) + skip(x)  (skip: a 1x1 convolution, or x itself)
// each norm a GroupNorm (+ SiLU, + dropout: GroupNormArgs). On the CPU, and on the device in FP32
// and TF32, it is exactly the ops group_norm_conv2d, conv2d, group_norm_conv2d in that order (the
// same numbers, the same draws from the generators). Under MathMode::BF16 on the device the
// activations between the two convolutions are bf16 only, as PyTorch's autocast stores them:
//   - norm1 writes its output in bf16 (group_norm_conv2d's path);
//   - conv1 writes h in bf16, each value the float sum of the product, the bias and temb rounded
//     once (before: a float h, written, read twice by norm2 and kept for norm2's backward);
//   - norm2 reads h as bf16 (widened exactly; statistics in float) and writes its output in bf16;
//   - backward: conv2 writes norm2's output's gradient in bf16, norm2's backward writes h's in bf16
//     (computed in float, rounded once), which conv1's backward reads as its bf16 dy and temb's
//     gradient sums in float.
// The numbers are then autocast's (h rounded to bf16 once), not bit for bit those of the separate
// ops under BF16 (which keep h in float); tests/test_backend_ops.cpp bounds both against the CPU.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <diffuse/core/rng.hpp>
#include <diffuse/ops/common.hpp>
#include <diffuse/ops/conv2d.hpp>
#include <diffuse/ops/group_norm.hpp>
#include <diffuse/ops/group_norm_conv2d.hpp>

namespace diffuse {

// The parameters of a residual block (see the top of the file). Undefined biases, temb or skip
// weight: none (no skip weight: the identity, x and out of one shape).
template <class T>
struct ResBlockParams {
  GroupNormArgs<T> norm1;
  Var<T> w1, b1;
  Conv2dOptions opt1;
  Var<T> temb;  // [N, O] added to conv1's output per sample and channel
  GroupNormArgs<T> norm2;
  Var<T> w2, b2;
  Conv2dOptions opt2;
  Var<T> w_skip, b_skip;  // 1x1, stride 1, no padding
};

namespace detail {

inline void check_dropout_args(const char* op, double p, const Generator* gen) {
  if (!(p >= 0.0 && p <= 1.0))
    throw std::invalid_argument("diffuse: dropout probability must be in [0, 1], got " + std::to_string(p));
  if (p > 0.0 && !gen) throw std::invalid_argument(std::string("diffuse: ") + op + ": dropout needs a generator");
}

// The device path under BF16 (see the top of the file); s: skip(x), made by the caller; g1, g2
// the two convolutions' geometries, checked.
inline Var<float> res_block_cuda_bf16(const Var<float>& x, const ResBlockParams<float>& p, const Var<float>& s,
                                      const ConvGeom& g1, const ConvGeom& g2) {
  backend::CudaBackend& be = backend::require_cuda("res_block");
  const bool grad = Tape<float>::grad_enabled();
  auto needs = [](const Var<float>& v) { return v.defined() && v.requires_grad(); };
  const bool need_dh1 = grad && (needs(x) || needs(p.norm1.gamma) || needs(p.norm1.beta));
  const bool need_dy1 = need_dh1 || (grad && (needs(p.w1) || needs(p.b1) || needs(p.temb)));
  const bool need_dh2 = need_dy1 || (grad && (needs(p.norm2.gamma) || needs(p.norm2.beta)));

  Bf16GroupNorm norm1 = group_norm_bf16(be, x, p.norm1);  // conv1's operand, bf16 only
  const backend::ConvDesc d1{g1.N, g1.H, g1.W, g1.C, g1.O, g1.kh, g1.kw, g1.sh, g1.sw, g1.ph, g1.pw};
  Tensor<bf16> w1b = need_dh1 ? Tensor<bf16>(p.w1.shape(), Device::CUDA) : Tensor<bf16>();  // for norm1's gradient
  Tensor<bf16> h({g1.N, g1.Ho, g1.Wo, g1.O}, Device::CUDA);
  be.conv2d(d1, nullptr, p.w1.value().data(), p.b1.defined() ? p.b1.value().data() : nullptr,
            p.temb.defined() ? p.temb.value().data() : nullptr, nullptr, nullptr, norm1.h.data(), w1b.data(), h.data());
  if (!(grad && needs(p.w1))) norm1.h = Tensor<bf16>();  // kept only where it makes conv1's dw

  Bf16GroupNorm norm2 = group_norm_bf16(be, h, p.norm2);  // from h in bf16
  const backend::ConvDesc d2{g2.N, g2.H, g2.W, g2.C, g2.O, g2.kh, g2.kw, g2.sh, g2.sw, g2.ph, g2.pw};
  Tensor<bf16> w2b = need_dh2 ? Tensor<bf16>(p.w2.shape(), Device::CUDA) : Tensor<bf16>();
  Tensor<float> y({g2.N, g2.Ho, g2.Wo, g2.O}, Device::CUDA);
  be.conv2d(d2, nullptr, p.w2.value().data(), p.b2.defined() ? p.b2.value().data() : nullptr, nullptr,
            s.value().data(), y.data(), norm2.h.data(), w2b.data());
  if (!(grad && needs(p.w2))) norm2.h = Tensor<bf16>();
  if (!need_dh2) h = Tensor<bf16>();  // norm2's backward is h's only reader

  const Var<float>& alt = x;  // stands in for an undefined operand in the input list
  const GroupNormArgs<float>& n1 = p.norm1;
  const GroupNormArgs<float>& n2 = p.norm2;
  return make_result<float>(
      std::move(y),
      {&x, &n1.gamma, &n1.beta, &p.w1, p.b1.defined() ? &p.b1 : &alt, p.temb.defined() ? &p.temb : &alt, &n2.gamma,
       &n2.beta, &p.w2, p.b2.defined() ? &p.b2 : &alt, &s},
      [x, p, s, d1, d2, norm1, norm2, h, w1b, w2b, need_dh1, need_dy1, need_dh2]() {
        return [x, p, s, d1, d2, norm1, norm2, h, w1b, w2b, need_dh1, need_dy1, need_dh2](const Tensor<float>& dy) {
          backend::CudaBackend& be = *backend::cuda_backend();
          auto sink = [](const Var<float>& v) { return v.defined() && v.requires_grad() ? grad_sink(*v.node()) : GradSink<float>{}; };
          // conv2: its parameters' gradients, norm2's output's in bf16, the residual's (dy itself).
          GradSink<float> sw2 = sink(p.w2), sb2 = sink(p.b2);
          Tensor<bf16> dh2 = need_dh2 ? Tensor<bf16>(h.shape(), Device::CUDA) : Tensor<bf16>();
          if (sw2.data || sb2.data || need_dh2)
            be.conv2d_backward(d2, nullptr, p.w2.value().data(), dy.data(), nullptr, false, sw2.data, sw2.accumulate,
                               sb2.data, sb2.accumulate, norm2.h.data(), w2b.data(), dh2.data());
          conv_epilogue_backward_cuda(be, d2, dy, Var<float>(), s);
          if (!need_dh2) return;
          // norm2: its parameters' gradients, h's in bf16.
          Tensor<bf16> dh = need_dy1 ? Tensor<bf16>(h.shape(), Device::CUDA) : Tensor<bf16>();
          norm2.backward(be, h, dh2.data(), dh.data());
          if (!need_dy1) return;
          // conv1 from h's gradient in bf16: temb's (per-sample channel sums), its parameters', norm1's output's.
          if (p.temb.defined() && p.temb.requires_grad()) {
            GradSink<float> st = grad_sink(*p.temb.node());
            be.channel_bias_backward(nullptr, st.data, d1.N, d1.Ho() * d1.Wo(), d1.O, st.accumulate, dh.data());
          }
          GradSink<float> sw1 = sink(p.w1), sb1 = sink(p.b1);
          Tensor<bf16> dh1 = need_dh1 ? Tensor<bf16>(x.shape(), Device::CUDA) : Tensor<bf16>();
          if (sw1.data || sb1.data || need_dh1)
            be.conv2d_backward(d1, nullptr, p.w1.value().data(), nullptr, nullptr, false, sw1.data, sw1.accumulate,
                               sb1.data, sb1.accumulate, norm1.h.data(), w1b.data(), dh1.data(), dh.data());
          if (need_dh1) norm1.backward(be, x, dh1.data());
        };
      });
}

}  // namespace detail

// The residual block (see the top of the file): x [N, H, W, C]; the errors of group_norm,
// conv2d and dropout.
template <class T>
Var<T> res_block(const Var<T>& x, const ResBlockParams<T>& p) {
  detail::check_dropout_args("res_block", p.norm1.p, p.norm1.gen);
  detail::check_dropout_args("res_block", p.norm2.p, p.norm2.gen);
  if constexpr (std::is_same_v<T, float>) {
    if (detail::checked_group_norm_device(x, p.norm1.gamma, p.norm1.beta, p.norm1.groups, p.norm1.eps) ==
            Device::CUDA &&
        backend::require_cuda("res_block").math_mode() == MathMode::BF16) {
      const detail::ConvGeom g1 = detail::checked_conv_geom(x.shape(), p.w1, p.b1, p.opt1, p.temb, Var<T>());
      const Shape hs{g1.N, g1.Ho, g1.Wo, g1.O};
      detail::check_group_norm(hs, p.norm2.gamma, p.norm2.beta, p.norm2.groups, p.norm2.eps);
      detail::op_device("res_block", {&x, &p.w1, &p.b1, &p.temb, &p.norm2.gamma, &p.norm2.beta, &p.w2, &p.b2,
                                      &p.w_skip, &p.b_skip});
      const Var<T> s = p.w_skip.defined() ? conv2d(x, p.w_skip, p.b_skip, Conv2dOptions{}) : x;
      const detail::ConvGeom g2 = detail::checked_conv_geom(hs, p.w2, p.b2, p.opt2, Var<T>(), s);
      return detail::res_block_cuda_bf16(x, p, s, g1, g2);
    }
  }
  const Var<T> h = group_norm_conv2d(x, p.norm1, p.w1, p.b1, p.opt1, p.temb, Var<T>());
  const Var<T> s = p.w_skip.defined() ? conv2d(x, p.w_skip, p.b_skip, Conv2dOptions{}) : x;
  return group_norm_conv2d(h, p.norm2, p.w2, p.b2, p.opt2, Var<T>(), s);
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Var<float> res_block<float>(const Var<float>& x, const ResBlockParams<float>& p))

}  // namespace diffuse
