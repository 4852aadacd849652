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
// x may be given as parts concatenated along the channels (the up path's concat(h, skip)): under
// BF16 with a skip convolution the parts are then written once into one bf16 x (no float
// concatenation), which norm1 reads widened and the skip convolution reads as its bf16 operand
// (keeping it for its dw); x's gradient (norm1's plus the skip's) is summed in float and handed
// to the parts. Elsewhere the parts go through concat first.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <diffuse/core/rng.hpp>
#include <diffuse/ops/common.hpp>
#include <diffuse/ops/conv2d.hpp>
#include <diffuse/ops/group_norm.hpp>
#include <diffuse/ops/group_norm_conv2d.hpp>
#include <diffuse/ops/shape.hpp>

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

// x's gradient dx (float, all channels; undefined: none made) handed to the parts of x that need
// one, each its columns (a single x's gradient went to it directly).
inline void hand_out(backend::CudaBackend& be, const std::vector<Var<float>>& xs, const Tensor<float>& dx) {
  if (xs.size() < 2 || !dx.defined()) return;
  const int64_t C = dx.size(3), rows = dx.numel() / std::max<int64_t>(C, 1);
  for (int64_t i = 0, off = 0; i < static_cast<int64_t>(xs.size()); ++i) {
    const Var<float>& v = xs[static_cast<size_t>(i)];
    const int64_t Ci = v.size(3);
    if (v.requires_grad()) {
      GradSink<float> s = grad_sink(*v.node());
      be.copy_2d(dx.data() + off, C, s.data, Ci, rows, Ci, s.accumulate);
    }
    off += Ci;
  }
}

// The device path under BF16 (see the top of the file). xs: x, or its parts (then the skip
// convolution runs here, from the bf16 x); s: skip(x), made by the caller, for a single x (else
// undefined); g1, g2, gs: the convolutions' geometries, checked.
inline Var<float> res_block_cuda_bf16(const std::vector<Var<float>>& xs, const Shape& x_shape,
                                      const ResBlockParams<float>& p, const Var<float>& s, const ConvGeom& g1,
                                      const ConvGeom& g2, const ConvGeom& gs) {
  backend::CudaBackend& be = backend::require_cuda("res_block");
  const bool grad = Tape<float>::grad_enabled();
  auto needs = [](const Var<float>& v) { return v.defined() && v.requires_grad(); };
  const bool cat = xs.size() > 1;
  bool need_dx = false;
  for (const Var<float>& v : xs) need_dx = need_dx || (grad && needs(v));
  const bool need_dh1 = need_dx || (grad && (needs(p.norm1.gamma) || needs(p.norm1.beta)));
  const bool need_dy1 = need_dh1 || (grad && (needs(p.w1) || needs(p.b1) || needs(p.temb)));
  const bool need_dh2 = need_dy1 || (grad && (needs(p.norm2.gamma) || needs(p.norm2.beta)));

  // x in bf16: each part written once into its columns (the concatenation and the conversion in
  // one pass); norm1 reads it widened, the skip convolution as its operand.
  Tensor<bf16> x16 = cat ? Tensor<bf16>(x_shape, Device::CUDA) : Tensor<bf16>();
  const int64_t C = x_shape[3], rows = x_shape[0] * x_shape[1] * x_shape[2];
  for (int64_t i = 0, off = 0; cat && i < static_cast<int64_t>(xs.size()); ++i) {
    const int64_t Ci = xs[static_cast<size_t>(i)].size(3);
    be.convert_2d(xs[static_cast<size_t>(i)].value().data(), Ci, x16.data() + off, C, rows, Ci);
    off += Ci;
  }
  Bf16GroupNorm norm1 = cat ? group_norm_bf16(be, x16, p.norm1) : group_norm_bf16(be, xs[0], p.norm1);
  const backend::ConvDesc d1{g1.N, g1.H, g1.W, g1.C, g1.O, g1.kh, g1.kw, g1.sh, g1.sw, g1.ph, g1.pw};
  Tensor<bf16> w1b = need_dh1 ? Tensor<bf16>(p.w1.shape(), Device::CUDA) : Tensor<bf16>();  // for norm1's gradient
  Tensor<bf16> h({g1.N, g1.Ho, g1.Wo, g1.O}, Device::CUDA);
  be.conv2d(d1, nullptr, p.w1.value().data(), p.b1.defined() ? p.b1.value().data() : nullptr,
            p.temb.defined() ? p.temb.value().data() : nullptr, nullptr, nullptr, norm1.h.data(), w1b.data(), h.data());
  if (!(grad && needs(p.w1))) norm1.h = Tensor<bf16>();  // kept only where it makes conv1's dw

  Bf16GroupNorm norm2 = group_norm_bf16(be, h, p.norm2);  // from h in bf16
  const backend::ConvDesc d2{g2.N, g2.H, g2.W, g2.C, g2.O, g2.kh, g2.kw, g2.sh, g2.sw, g2.ph, g2.pw};
  Tensor<bf16> w2b = need_dh2 ? Tensor<bf16>(p.w2.shape(), Device::CUDA) : Tensor<bf16>();
  // The skip connection: made by the caller, or here from x16 (kept for its dw and norm1's backward).
  const backend::ConvDesc ds{gs.N, gs.H, gs.W, gs.C, gs.O, gs.kh, gs.kw, gs.sh, gs.sw, gs.ph, gs.pw};
  Tensor<float> skip_out = cat ? Tensor<float>({g2.N, g2.Ho, g2.Wo, g2.O}, Device::CUDA) : Tensor<float>();
  Tensor<bf16> wsb = cat && need_dx ? Tensor<bf16>(p.w_skip.shape(), Device::CUDA) : Tensor<bf16>();
  if (cat)
    be.conv2d(ds, nullptr, p.w_skip.value().data(), p.b_skip.defined() ? p.b_skip.value().data() : nullptr, nullptr,
              nullptr, skip_out.data(), x16.data(), wsb.data());
  Tensor<float> y({g2.N, g2.Ho, g2.Wo, g2.O}, Device::CUDA);
  be.conv2d(d2, nullptr, p.w2.value().data(), p.b2.defined() ? p.b2.value().data() : nullptr, nullptr,
            cat ? skip_out.data() : s.value().data(), y.data(), norm2.h.data(), w2b.data());
  skip_out = Tensor<float>();
  if (!(grad && (need_dh1 || needs(p.w_skip)))) x16 = Tensor<bf16>();
  if (!(grad && needs(p.w2))) norm2.h = Tensor<bf16>();
  if (!need_dh2) h = Tensor<bf16>();  // norm2's backward is h's only reader

  // The result (a variable number of inputs: recorded as concat records).
  std::vector<Var<float>> inputs;
  for (const Var<float>* v : {&p.norm1.gamma, &p.norm1.beta, &p.w1, &p.b1, &p.temb, &p.norm2.gamma, &p.norm2.beta,
                              &p.w2, &p.b2, &p.w_skip, &p.b_skip, &s})
    if (v->defined() && (cat || (v != &p.w_skip && v != &p.b_skip))) inputs.push_back(*v);
  inputs.insert(inputs.end(), xs.begin(), xs.end());
  bool need = false;
  if (grad)
    for (const Var<float>& v : inputs) need = need || v.requires_grad();
  Var<float> out(std::move(y), need);
  if (!need) return out;
  Tape<float>::current().record(
      out.node_ptr(),
      [xs, x_shape, p, s, d1, d2, ds, norm1, norm2, h, x16, w1b, w2b, wsb, need_dx, need_dh1, need_dy1,
                need_dh2](const Tensor<float>& dy) {
          backend::CudaBackend& be = *backend::cuda_backend();
          auto sink = [](const Var<float>& v) { return v.defined() && v.requires_grad() ? grad_sink(*v.node()) : GradSink<float>{}; };
          // conv2: its parameters' gradients, norm2's output's in bf16, the residual's (dy itself).
          GradSink<float> sw2 = sink(p.w2), sb2 = sink(p.b2);
          Tensor<bf16> dh2 = need_dh2 ? Tensor<bf16>(h.shape(), Device::CUDA) : Tensor<bf16>();
          if (sw2.data || sb2.data || need_dh2)
            be.conv2d_backward(d2, nullptr, p.w2.value().data(), dy.data(), nullptr, false, sw2.data, sw2.accumulate,
                               sb2.data, sb2.accumulate, norm2.h.data(), w2b.data(), dh2.data());
          // The skip connection's gradient is dy: to s, or (parts) through the skip convolution
          // into x's gradient in float (written first; norm1's is added to it below).
          const bool cat = xs.size() > 1;
          Tensor<float> dx = cat && need_dx ? Tensor<float>(x_shape, Device::CUDA) : Tensor<float>();
          if (!cat) {
            conv_epilogue_backward_cuda(be, d2, dy, Var<float>(), s);
          } else {
            GradSink<float> sws = sink(p.w_skip), sbs = sink(p.b_skip);
            if (sws.data || sbs.data || need_dx)
              be.conv2d_backward(ds, nullptr, p.w_skip.value().data(), dy.data(), dx.data(), false, sws.data,
                                 sws.accumulate, sbs.data, sbs.accumulate, x16.data(), wsb.data());
          }
          if (!need_dh2) return hand_out(be, xs, dx);
          // norm2: its parameters' gradients, h's in bf16.
          Tensor<bf16> dh = need_dy1 ? Tensor<bf16>(h.shape(), Device::CUDA) : Tensor<bf16>();
          norm2.backward(be, h, dh2.data(), dh.data());
          if (!need_dy1) return hand_out(be, xs, dx);
          // conv1 from h's gradient in bf16: temb's (per-sample channel sums), its parameters', norm1's output's.
          if (p.temb.defined() && p.temb.requires_grad()) {
            GradSink<float> st = grad_sink(*p.temb.node());
            be.channel_bias_backward(nullptr, st.data, d1.N, d1.Ho() * d1.Wo(), d1.O, st.accumulate, dh.data());
          }
          GradSink<float> sw1 = sink(p.w1), sb1 = sink(p.b1);
          Tensor<bf16> dh1 = need_dh1 ? Tensor<bf16>(x_shape, Device::CUDA) : Tensor<bf16>();
          if (sw1.data || sb1.data || need_dh1)
            be.conv2d_backward(d1, nullptr, p.w1.value().data(), nullptr, nullptr, false, sw1.data, sw1.accumulate,
                               sb1.data, sb1.accumulate, norm1.h.data(), w1b.data(), dh1.data(), dh.data());
          if (need_dh1) {
            if (cat) norm1.backward(be, x16, dh1.data(), dx.data(), true);
            else norm1.backward(be, xs[0], dh1.data());
          }
          hand_out(be, xs, dx);
      },
      inputs);
  return out;
}

}  // namespace detail

// The residual block (see the top of the file) of x, given as its parts along the channels (one
// part: x itself), each [N, H, W, C_i]; the errors of concat, group_norm, conv2d and dropout.
template <class T>
Var<T> res_block(const std::vector<Var<T>>& parts, const ResBlockParams<T>& p) {
  detail::check_dropout_args("res_block", p.norm1.p, p.norm1.gen);
  detail::check_dropout_args("res_block", p.norm2.p, p.norm2.gen);
  if constexpr (std::is_same_v<T, float>) {
    const bool cat = parts.size() > 1;  // with a skip convolution: x in bf16 only (else concat below)
    if (!parts.empty() && parts[0].defined() && parts[0].device() == Device::CUDA &&
        backend::require_cuda("res_block").math_mode() == MathMode::BF16 && (!cat || p.w_skip.defined())) {
      int64_t axis = 3;
      const Shape xs = cat ? detail::checked_concat_shape(parts, axis) : parts[0].shape();
      detail::check_group_norm(xs, p.norm1.gamma, p.norm1.beta, p.norm1.groups, p.norm1.eps);
      const detail::ConvGeom g1 = detail::checked_conv_geom(xs, p.w1, p.b1, p.opt1, p.temb, Var<T>());
      const Shape hs{g1.N, g1.Ho, g1.Wo, g1.O};
      detail::check_group_norm(hs, p.norm2.gamma, p.norm2.beta, p.norm2.groups, p.norm2.eps);
      // (the parts share one device: checked_concat_shape)
      detail::op_device("res_block", {&parts[0], &p.norm1.gamma, &p.norm1.beta, &p.w1, &p.b1, &p.temb, &p.norm2.gamma,
                                      &p.norm2.beta, &p.w2, &p.b2, &p.w_skip, &p.b_skip});
      const Conv2dOptions one;  // the skip: 1x1, stride 1, no padding
      if (cat) {
        const detail::ConvGeom gs = detail::checked_conv_geom(xs, p.w_skip, p.b_skip, one, Var<T>(), Var<T>());
        const detail::ConvGeom g2 = detail::checked_conv_geom(hs, p.w2, p.b2, p.opt2, Var<T>(), Var<T>());
        detail::check_conv_residual(g2, Shape{gs.N, gs.Ho, gs.Wo, gs.O});  // the skip's output
        return detail::res_block_cuda_bf16(parts, xs, p, Var<T>(), g1, g2, gs);
      }
      const Var<T> s = p.w_skip.defined() ? conv2d(parts[0], p.w_skip, p.b_skip, one) : parts[0];
      const detail::ConvGeom g2 = detail::checked_conv_geom(hs, p.w2, p.b2, p.opt2, Var<T>(), s);
      return detail::res_block_cuda_bf16(parts, xs, p, s, g1, g2, g1);
    }
  }
  if (parts.size() != 1) return res_block(std::vector<Var<T>>{concat(parts, 3)}, p);
  const Var<T>& x = parts[0];
  const Var<T> h = group_norm_conv2d(x, p.norm1, p.w1, p.b1, p.opt1, p.temb, Var<T>());
  const Var<T> s = p.w_skip.defined() ? conv2d(x, p.w_skip, p.b_skip, Conv2dOptions{}) : x;
  return group_norm_conv2d(h, p.norm2, p.w2, p.b2, p.opt2, Var<T>(), s);
}

// The same for x in one piece.
template <class T>
Var<T> res_block(const Var<T>& x, const ResBlockParams<T>& p) {
  return res_block(std::vector<Var<T>>{x}, p);
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Var<float> res_block<float>(const std::vector<Var<float>>& parts, const ResBlockParams<float>& p))
DIFFUSE_FLOAT_INSTANCE(Var<float> res_block<float>(const Var<float>& x, const ResBlockParams<float>& p))

}  // namespace diffuse
