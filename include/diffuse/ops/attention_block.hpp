// attention_block: the DDPM U-Net's self-attention block as one op,
//   h = group_norm(x);  q, k, v = three 1x1 convolutions of h;
//   out = x + proj(attention(q, k, v, heads))   (tokens: the H*W pixels of each image)
// On the CPU, and on the device in FP32 and TF32 or with the full-matrix attention kernels, it is
// exactly those ops (the same numbers). Under MathMode::BF16 on the device with the fused (flash)
// attention kernels every activation inside the block is bf16, written once by its producer and
// read by its consumers as PyTorch's autocast stores them:
//   - the normalisation's kernel writes h in bf16 (no float h);
//   - q, k and v are one convolution of 3C outputs (the three weights side by side: h is read
//     once and kept once, not three bf16 copies of one float h), written in bf16 packed as one
//     [N, H, W, 3C] tensor, each value the float sum of the product and the bias rounded once;
//   - the flash kernels read q, k and v from it in place (rows 3C apart) and write the attention's
//     output in bf16, which the projection's convolution reads as it is;
//   - the backward likewise: the projection writes the attention output's gradient in bf16, the
//     flash backward writes q's, k's and v's packed in bf16, the 3C convolution reads that and
//     writes h's gradient in bf16, which the normalisation's backward reads.
// One float tensor is kept besides: the attention's output before its rounding, which the flash
// backward's delta = rowsum(dO O) reads so that it agrees with the recomputed probabilities (from
// the bf16 output, as PyTorch's bf16 flash attention computes it, q's and k's gradients carry a
// coherent error: up to 20% against 7% in tests/test_backend_ops.cpp).
// Only x, the output and the parameters' gradients are float. The numbers are then those of
// autocast (bf16 roundings at each of these tensors, float arithmetic inside each kernel), not
// bit for bit those of the separate ops under BF16 (which keep q, k, v and the attention's output
// in float); tests/test_backend_ops.cpp bounds both against the CPU's FP32.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <diffuse/core/rng.hpp>
#include <diffuse/ops/attention.hpp>
#include <diffuse/ops/common.hpp>
#include <diffuse/ops/conv2d.hpp>
#include <diffuse/ops/dropout.hpp>
#include <diffuse/ops/group_norm.hpp>
#include <diffuse/ops/group_norm_conv2d.hpp>
#include <diffuse/ops/shape.hpp>

namespace diffuse {

// The four 1x1 convolutions of an attention block: weights [C, 1, 1, C] (OHWI), biases [C] (an
// undefined bias: none).
template <class T>
struct AttentionBlockParams {
  Var<T> wq, bq, wk, bk, wv, bv, wo, bo;
};

namespace detail {

// Whether attention_block runs its bf16 path (see the top of the file) on these device operands.
inline bool attention_block_bf16(backend::CudaBackend& be, int64_t N, int64_t C, int64_t heads) {
  return be.math_mode() == MathMode::BF16 && be.attention_kernel() == AttentionKernel::Flash &&
         flash_attention_fits(N, C, heads);
}

inline Var<float> attention_block_cuda_bf16(const Var<float>& x, const GroupNormArgs<float>& n,
                                            const AttentionBlockParams<float>& p, int64_t heads) {
  backend::CudaBackend& be = backend::require_cuda("attention_block");
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), L = H * W;
  const bool grad = Tape<float>::grad_enabled();
  const Var<float>& gamma = n.gamma;
  const Var<float>& beta = n.beta;
  const bool need_h_grad = grad && (x.requires_grad() || gamma.requires_grad() || beta.requires_grad());
  const bool need_w_grad = grad && (p.wq.requires_grad() || p.wk.requires_grad() || p.wv.requires_grad());
  const bool need_b_grad = grad && ((p.bq.defined() && p.bq.requires_grad()) || (p.bk.defined() && p.bk.requires_grad()) ||
                                    (p.bv.defined() && p.bv.requires_grad()));
  const bool need_qkv_grad = need_h_grad || need_w_grad || need_b_grad;

  Bf16GroupNorm norm = group_norm_bf16(be, x, n);  // h in bf16

  // q, k, v: one convolution of the three weights side by side ([3C, 1, 1, C], each a block of
  // C x C), written in bf16 as [N, H, W, 3C].
  const int64_t CC = C * C;
  Tensor<float> wqkv({3 * C, 1, 1, C}, Device::CUDA), bqkv({3 * C}, Device::CUDA);
  const Var<float>* ws[3] = {&p.wq, &p.wk, &p.wv};
  const Var<float>* bs[3] = {&p.bq, &p.bk, &p.bv};
  for (int i = 0; i < 3; ++i) {
    be.copy(ws[i]->value().data(), wqkv.data() + i * CC, CC, false);
    if (bs[i]->defined()) be.copy(bs[i]->value().data(), bqkv.data() + i * C, C, false);
    else be.fill(bqkv.data() + i * C, C, 0.0f);
  }
  const backend::ConvDesc dqkv{N, H, W, C, 3 * C, 1, 1, 1, 1, 0, 0};
  Tensor<bf16> wqkv16 = need_h_grad ? Tensor<bf16>(wqkv.shape(), Device::CUDA) : Tensor<bf16>();  // for h's gradient
  Tensor<bf16> qkv({N, H, W, 3 * C}, Device::CUDA);
  be.conv2d(dqkv, nullptr, wqkv.data(), bqkv.data(), nullptr, nullptr, nullptr, norm.h.data(), wqkv16.data(),
            qkv.data());

  // The output in bf16 (the projection's operand) and, for the backward, in float: the flash
  // backward's delta from the float output agrees with its probabilities (kernels/flash_attention.cuh).
  Tensor<bf16> o({N, H, W, C}, Device::CUDA);
  Tensor<float> o32 = need_qkv_grad ? Tensor<float>({N, H, W, C}, Device::CUDA) : Tensor<float>();
  Tensor<float> lse({N, heads, L}, Device::CUDA);
  be.flash_attention_bf16(qkv.data(), o.data(), o32.data(), lse.data(), N, L, C, heads);

  const backend::ConvDesc dproj{N, H, W, C, C, 1, 1, 1, 1, 0, 0};
  const bool has_bo = p.bo.defined();
  Tensor<bf16> wo16 = need_qkv_grad ? Tensor<bf16>(p.wo.shape(), Device::CUDA) : Tensor<bf16>();  // for o's gradient
  Tensor<float> y(x.shape(), Device::CUDA);
  be.conv2d(dproj, nullptr, p.wo.value().data(), has_bo ? p.bo.value().data() : nullptr, nullptr, x.value().data(),
            y.data(), o.data(), wo16.data());
  if (!need_w_grad) norm.h = Tensor<bf16>();   // h is kept only where it makes the 3C convolution's dw,
  if (!p.wo.requires_grad()) o = Tensor<bf16>();  // o where it makes the projection's

  const Var<float>& alt = x;  // stands in for an undefined bias in the input list
  return make_result<float>(
      std::move(y),
      {&x, &gamma, &beta, &p.wq, p.bq.defined() ? &p.bq : &alt, &p.wk, p.bk.defined() ? &p.bk : &alt, &p.wv,
       p.bv.defined() ? &p.bv : &alt, &p.wo, has_bo ? &p.bo : &alt},
      [x, p, heads, norm, wqkv16, qkv, o, o32, lse, wo16, dqkv, dproj, need_h_grad, need_w_grad, need_b_grad,
       need_qkv_grad]() {
        return [x, p, heads, norm, wqkv16, qkv, o, o32, lse, wo16, dqkv, dproj, need_h_grad, need_w_grad, need_b_grad,
                need_qkv_grad](const Tensor<float>& dy) {
          backend::CudaBackend& be = *backend::cuda_backend();
          const int64_t N = dproj.N, C = dproj.C, L = dproj.H * dproj.W;
          // The projection: its parameters' gradients, o's gradient in bf16, and the residual's.
          GradSink<float> swo{}, sbo{};
          if (p.wo.requires_grad()) swo = grad_sink(*p.wo.node());
          if (p.bo.defined() && p.bo.requires_grad()) sbo = grad_sink(*p.bo.node());
          Tensor<bf16> dout = need_qkv_grad ? Tensor<bf16>(x.shape(), Device::CUDA) : Tensor<bf16>();
          if (swo.data || sbo.data || dout.defined())
            be.conv2d_backward(dproj, nullptr, p.wo.value().data(), dy.data(), nullptr, false, swo.data, swo.accumulate,
                               sbo.data, sbo.accumulate, o.data(), wo16.data(), dout.data());
          conv_epilogue_backward_cuda(be, dproj, dy, Var<float>(), x);
          if (!need_qkv_grad) return;
          // The attention: q's, k's and v's gradients packed in bf16 as the forward's qkv.
          Tensor<bf16> dq(qkv.shape(), Device::CUDA);
          be.flash_attention_backward_bf16(qkv.data(), o32.data(), lse.data(), dout.data(), dq.data(), N, L, C, heads);
          // The 3C convolution: its weight and bias gradients (then split into q's, k's, v's), and h's in bf16.
          const int64_t CC = C * C;
          Tensor<float> dw = need_w_grad ? Tensor<float>({3 * C, 1, 1, C}, Device::CUDA) : Tensor<float>();
          Tensor<float> db = need_b_grad ? Tensor<float>({3 * C}, Device::CUDA) : Tensor<float>();
          Tensor<bf16> dh = need_h_grad ? Tensor<bf16>(x.shape(), Device::CUDA) : Tensor<bf16>();
          be.conv2d_backward(dqkv, nullptr, nullptr, nullptr, nullptr, false, dw.data(), false, db.data(), false,
                             norm.h.data(), wqkv16.data(), dh.data(), dq.data());
          const Var<float>* ws[3] = {&p.wq, &p.wk, &p.wv};
          const Var<float>* bs[3] = {&p.bq, &p.bk, &p.bv};
          for (int i = 0; i < 3; ++i) {
            if (ws[i]->requires_grad()) {
              GradSink<float> s = grad_sink(*ws[i]->node());
              be.copy(dw.data() + i * CC, s.data, CC, s.accumulate);
            }
            if (bs[i]->defined() && bs[i]->requires_grad()) {
              GradSink<float> s = grad_sink(*bs[i]->node());
              be.copy(db.data() + i * C, s.data, C, s.accumulate);
            }
          }
          // The normalisation's backward reads h's gradient in bf16; x's adds to the residual's.
          if (need_h_grad) norm.backward(be, x, dh.data());
        };
      });
}

}  // namespace detail

// x + proj(attention(q(h), k(h), v(h), heads)) with h = the normalisation of x (GroupNormArgs: its
// parameters, SiLU, dropout), q, k, v and proj 1x1 convolutions (see the top of the file). x
// [N, H, W, C]; returns x's shape. The errors of group_norm, conv2d and attention.
template <class T>
Var<T> attention_block(const Var<T>& x, const GroupNormArgs<T>& n, const AttentionBlockParams<T>& p, int heads) {
  if (!(n.p >= 0.0 && n.p <= 1.0))
    throw std::invalid_argument("diffuse: dropout probability must be in [0, 1], got " + std::to_string(n.p));
  if (n.p > 0.0 && !n.gen) throw std::invalid_argument("diffuse: attention_block: dropout needs a generator");
  if (x.defined() && x.value().dim() == 4) {
    const Shape s = x.shape();
    if constexpr (std::is_same_v<T, float>) {
      if (detail::checked_group_norm_device(x, n.gamma, n.beta, n.groups, n.eps) == Device::CUDA &&
          detail::attention_block_bf16(backend::require_cuda("attention_block"), s[0], s[3], heads)) {
        if (heads < 1 || s[3] % heads != 0)
          throw std::invalid_argument("diffuse: attention: the channel count C = " + std::to_string(s[3]) +
                                      " must be a multiple of heads = " + std::to_string(heads) + " (heads >= 1)");
        const Conv2dOptions one;  // 1x1, stride 1, no padding
        const Var<T>* convs[4][2] = {{&p.wq, &p.bq}, {&p.wk, &p.bk}, {&p.wv, &p.bv}, {&p.wo, &p.bo}};
        for (const auto& wb : convs) {
          const detail::ConvGeom g = detail::checked_conv_geom(s, *wb[0], *wb[1], one, Var<T>(), Var<T>());
          if (g.O != s[3] || !g.pointwise())
            throw std::invalid_argument("diffuse: attention_block: q, k, v and proj must be 1x1 convolutions of C = " +
                                        std::to_string(s[3]) + " outputs, got weight " + shape_str(wb[0]->shape()));
        }
        detail::op_device("attention_block", {&x, &p.wq, &p.bq, &p.wk, &p.bk, &p.wv, &p.bv, &p.wo, &p.bo});
        return detail::attention_block_cuda_bf16(x, n, p, heads);
      }
    }
  }
  const Var<T> h = n.p > 0.0 ? group_norm_dropout(x, n.gamma, n.beta, n.groups, n.eps, n.silu, n.p, *n.gen)
                             : group_norm(x, n.gamma, n.beta, n.groups, n.eps, n.silu);
  const Shape s = x.shape();  // [N, H, W, C]
  const Shape tokens{s[0], s[1] * s[2], s[3]};
  const Conv2dOptions one;
  const Var<T> a = attention(reshape(conv2d(h, p.wq, p.bq, one), tokens), reshape(conv2d(h, p.wk, p.bk, one), tokens),
                             reshape(conv2d(h, p.wv, p.bv, one), tokens), heads);
  return conv2d(reshape(a, s), p.wo, p.bo, one, Var<T>(), x);  // x + proj(a): the residual in the epilogue
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Var<float> attention_block<float>(const Var<float>& x, const GroupNormArgs<float>& n,
    const AttentionBlockParams<float>& p, int heads))

}  // namespace diffuse
