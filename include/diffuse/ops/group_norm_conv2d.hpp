// group_norm_conv2d: a ResBlock's normalisation (GroupNorm, SiLU, dropout) and the convolution
// that reads its output, as one op:
//   conv2d(group_norm_dropout(x, gamma, beta, groups, eps, silu, p, gen), w, b, opt, cb, res)
// On the CPU, and on the device in FP32 and TF32, it is exactly those two ops (the same numbers
// and the same draws from gen). Under MathMode::BF16 on the device the normalised activation h,
// which only the convolution reads and which the convolution reads in bf16, is written by the
// normalisation's kernel in bf16 and stored only so: no float h, no conversion pass, half the
// bytes kept for the backward (the activation stored in bf16, as torch.compile's fused kernels
// store it); h's gradient, which the bf16 convolution computes in bf16, likewise goes to the
// normalisation's backward in bf16 (no float copy, no conversion pass). The numbers are those of
// the two ops under BF16 bit for bit: h rounded once from the same float, the same convolution,
// h's gradient the same bf16 product widened exactly.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <diffuse/core/rng.hpp>
#include <diffuse/ops/common.hpp>
#include <diffuse/ops/conv2d.hpp>
#include <diffuse/ops/dropout.hpp>
#include <diffuse/ops/group_norm.hpp>

namespace diffuse {

// The normalisation before a convolution: GroupNorm's parameters and settings, SiLU after it, and
// dropout after that (p = 0: none; gen is then unused and may be null).
template <class T>
struct GroupNormArgs {
  Var<T> gamma, beta;
  int64_t groups = 1;
  double eps = 1e-5;
  bool silu = false;
  double p = 0.0;
  Generator* gen = nullptr;
};

namespace detail {

// The normalisation of a bf16 device path (group_norm_conv2d here, attention_block, res_block): its
// kernel writes h in bf16 only; the statistics and the dropout mask stay for the backward, which
// reads h's gradient in bf16. Its input is float, or bf16 (res_block's first convolution's output).
struct Bf16GroupNorm {
  Var<float> gamma, beta;
  int64_t groups;
  bool silu;
  double p;
  Tensor<float> stats;         // mean, then rstd, per (sample, group)
  Tensor<std::uint8_t> keep;   // the dropout mask's bits (their owner), or undefined
  Tensor<bf16> h;              // the output; a caller releases it where no backward reads it

  const std::uint32_t* bits() const {
    return keep.defined() ? reinterpret_cast<const std::uint32_t*>(keep.data()) : nullptr;
  }
  float keep_scale() const { return p > 0.0 ? dropout_scale<float>(p) : 1.0f; }
  // x's, gamma's and beta's gradients (those that need one) from h's gradient dh in bf16.
  void backward(backend::CudaBackend& be, const Var<float>& x, const bf16* dh) const {
    GradSink<float> sx{};
    if (x.requires_grad()) sx = grad_sink(*x.node());
    run_backward(be, x.value().data(), nullptr, x.shape(), dh, sx.data, sx.accumulate, nullptr);
  }
  // The same for an input x16 in bf16 (the forward's): x's gradient written in bf16 to dx16 (null:
  // not needed), each value computed in float and rounded once.
  void backward(backend::CudaBackend& be, const Tensor<bf16>& x16, const bf16* dh, bf16* dx16) const {
    run_backward(be, nullptr, x16.data(), x16.shape(), dh, nullptr, false, dx16);
  }
  // The same with x's gradient in float, written or added to (acc).
  void backward(backend::CudaBackend& be, const Tensor<bf16>& x16, const bf16* dh, float* dx, bool acc) const {
    run_backward(be, nullptr, x16.data(), x16.shape(), dh, dx, acc, nullptr);
  }

 private:
  void run_backward(backend::CudaBackend& be, const float* x, const bf16* x16, const Shape& s, const bf16* dh,
                    float* dx, bool acc_dx, bf16* dx16) const {
    const int64_t N = s[0], HW = s[1] * s[2], C = s[3];
    GradSink<float> sg{}, sb{};
    if (gamma.requires_grad()) sg = grad_sink(*gamma.node());
    if (beta.requires_grad()) sb = grad_sink(*beta.node());
    be.group_norm_backward(nullptr, x, gamma.value().data(), beta.value().data(), stats.data(),
                           stats.data() + N * groups, dx, acc_dx, sg.data, sg.accumulate, sb.data, sb.accumulate, N, HW,
                           C, groups, silu, bits(), keep_scale(), dh, x16, dx16);
  }
};

// n's normalisation (+ SiLU, + dropout) of x [N, H, W, C], float (x) or bf16 (x16, widened
// exactly; the other null), written in bf16.
inline Bf16GroupNorm group_norm_bf16(backend::CudaBackend& be, const float* x, const bf16* x16, const Shape& s,
                                     const GroupNormArgs<float>& n) {
  const int64_t N = s[0], HW = s[1] * s[2], C = s[3];
  Bf16GroupNorm r{n.gamma, n.beta, n.groups, n.silu, n.p, Tensor<float>({2 * N * n.groups}, Device::CUDA),
                  n.p > 0.0 ? dropout_keep_bits(shape_numel(s), n.p, *n.gen) : Tensor<std::uint8_t>(),
                  Tensor<bf16>(s, Device::CUDA)};
  be.group_norm(x, n.gamma.value().data(), n.beta.value().data(), nullptr, r.stats.data(),
                r.stats.data() + N * n.groups, N, HW, C, n.groups, static_cast<float>(n.eps), n.silu, r.bits(),
                r.keep_scale(), r.h.data(), x16);
  return r;
}
inline Bf16GroupNorm group_norm_bf16(backend::CudaBackend& be, const Var<float>& x, const GroupNormArgs<float>& n) {
  return group_norm_bf16(be, x.value().data(), nullptr, x.shape(), n);
}
inline Bf16GroupNorm group_norm_bf16(backend::CudaBackend& be, const Tensor<bf16>& x16, const GroupNormArgs<float>& n) {
  return group_norm_bf16(be, nullptr, x16.data(), x16.shape(), n);
}

// The device path under BF16 (see the top of the file). x [N, H, W, C] float; h exists only in bf16.
inline Var<float> group_norm_conv2d_bf16(const Var<float>& x, const GroupNormArgs<float>& n, const Var<float>& w,
                                         const Var<float>& b, const Var<float>& cb, const Var<float>& res,
                                         const ConvGeom& g) {
  backend::CudaBackend& be = backend::require_cuda("group_norm_conv2d");
  Bf16GroupNorm norm = group_norm_bf16(be, x, n);

  const backend::ConvDesc d{g.N, g.H, g.W, g.C, g.O, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw};
  const bool has_b = b.defined(), has_cb = cb.defined(), has_res = res.defined();
  const Var<float>& gamma = n.gamma;
  const Var<float>& beta = n.beta;
  const bool need_h_grad = x.requires_grad() || gamma.requires_grad() || beta.requires_grad();
  Tensor<bf16> wb;  // w in bf16, for h's gradient
  if (need_h_grad && Tape<float>::grad_enabled()) wb = Tensor<bf16>(w.shape(), Device::CUDA);
  Tensor<float> y({g.N, d.Ho(), d.Wo(), d.O}, Device::CUDA);
  be.conv2d(d, nullptr, w.value().data(), has_b ? b.value().data() : nullptr, has_cb ? cb.value().data() : nullptr,
            has_res ? res.value().data() : nullptr, y.data(), norm.h.data(), wb.data());
  // The backward holds the norm's statistics and mask, and h only where it makes dw.
  if (!w.requires_grad()) norm.h = Tensor<bf16>();
  return make_result<float>(
      std::move(y), {&x, &gamma, &beta, &w, has_b ? &b : &x, has_cb ? &cb : &x, has_res ? &res : &x},
      [x, w, b, cb, res, has_b, d, norm, wb, need_h_grad]() {
        return [x, w, b, cb, res, has_b, d, norm, wb, need_h_grad](const Tensor<float>& dy) {
          backend::CudaBackend& be = *backend::cuda_backend();
          GradSink<float> sw{}, sb{};
          if (w.requires_grad()) sw = grad_sink(*w.node());
          if (has_b && b.requires_grad()) sb = grad_sink(*b.node());
          // h's gradient in bf16, as the bf16 convolution writes it; the normalisation's backward
          // reads it so (widened exactly: the same numbers as through a float copy).
          Tensor<bf16> dh = need_h_grad ? Tensor<bf16>(x.shape(), Device::CUDA) : Tensor<bf16>();
          be.conv2d_backward(d, nullptr, w.value().data(), dy.data(), nullptr, false, sw.data, sw.accumulate, sb.data,
                             sb.accumulate, norm.h.data(), wb.data(), dh.data());
          conv_epilogue_backward_cuda(be, d, dy, cb, res);
          if (need_h_grad) norm.backward(be, x, dh.data());
        };
      });
}

}  // namespace detail

// conv2d(group_norm_dropout(x, ...), w, b, opt, cb, res) (see the top of the file); conv2d's and
// group_norm_dropout's rules and errors.
template <class T>
Var<T> group_norm_conv2d(const Var<T>& x, const GroupNormArgs<T>& n, const Var<T>& w, const Var<T>& b,
                         const Conv2dOptions& opt, const Var<T>& cb = Var<T>(), const Var<T>& res = Var<T>()) {
  if (!(n.p >= 0.0 && n.p <= 1.0))
    throw std::invalid_argument("diffuse: dropout probability must be in [0, 1], got " + std::to_string(n.p));
  if (n.p > 0.0 && !n.gen) throw std::invalid_argument("diffuse: group_norm_conv2d: dropout needs a generator");
  if constexpr (std::is_same_v<T, float>) {
    if (detail::checked_group_norm_device(x, n.gamma, n.beta, n.groups, n.eps) == Device::CUDA &&
        backend::require_cuda("group_norm_conv2d").math_mode() == MathMode::BF16) {
      const detail::ConvGeom g = detail::checked_conv_geom(x.shape(), w, b, opt, cb, res);  // h has x's shape
      detail::op_device("group_norm_conv2d", {&x, &w, &b, &cb, &res});
      return detail::group_norm_conv2d_bf16(x, n, w, b, cb, res, g);
    }
  }
  const Var<T> h = n.p > 0.0 ? group_norm_dropout(x, n.gamma, n.beta, n.groups, n.eps, n.silu, n.p, *n.gen)
                             : group_norm(x, n.gamma, n.beta, n.groups, n.eps, n.silu);
  return conv2d(h, w, b, opt, cb, res);
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Var<float> group_norm_conv2d<float>(const Var<float>& x, const GroupNormArgs<float>& n,
    const Var<float>& w, const Var<float>& b, const Conv2dOptions& opt, const Var<float>& cb, const Var<float>& res))

}  // namespace diffuse
