// 2-D convolution on NHWC images: x [N, H, W, C], weight [O, kh, kw, C] ("OHWI",
// the filter layout of NHWC convolutions: cuDNN's NHWC filters, and the row order
// of an NHWC im2col), bias [O], y [N, Ho, Wo, O]. Same function as
// torch.nn.functional.conv2d on the NCHW view with the weight permuted to
// PyTorch's [O, C, kh, kw]; Conv2d keeps the weight in this layout on every device
// and its checkpoints in PyTorch's (nn/module.hpp's ParamLayout::ConvOHWI).
//
// How (CPU): im2col GEMM over blocks of output pixels. In NHWC a kernel row's
// taps are kw * C contiguous floats, so im2col is a few memcpy per output pixel;
// each block of R pixels becomes a [R, kh*kw*C] matrix times the weight, packed
// once per call (detail::GemmB), so the blocks can stay small enough for L2. A
// 1x1 convolution with stride 1 is a plain GEMM on x itself. The backward
// recomputes im2col blocks rather than keeping them (they are kh*kw times the
// size of x). CUDA: cuDNN (the backend's conv2d entries).
#pragma once

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <diffuse/backend/cpu/gemm.hpp>
#include <diffuse/ops/channel_bias.hpp>
#include <diffuse/ops/common.hpp>

namespace diffuse {

struct Conv2dOptions {
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_h = 0, pad_w = 0;  // zero padding on both sides
};

namespace detail {

struct ConvGeom {
  int64_t N, H, W, C, O, kh, kw, sh, sw, ph, pw, Ho, Wo;
  int64_t K() const { return kh * kw * C; }
  int64_t P() const { return N * Ho * Wo; }
  bool pointwise() const { return kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0; }
};

// Rows per im2col block: about 256 KiB of col, 24 to 240 rows, a multiple of
// the GEMM micro-tile height.
inline int64_t conv_block_rows(int64_t K) {
  const int64_t r = std::clamp<int64_t>(65536 / std::max<int64_t>(K, 1), 24, 240);
  return r / kGemmMR * kGemmMR;
}

// Calls f(ky, kx0, kx1, src_pixel_offset, col_offset) for each kernel row of
// output pixel p whose taps kx0..kx1 fall inside the image; src is the
// element offset of tap (ky, kx0) in x, col the offset inside the col row.
template <class F>
inline void conv_for_taps(const ConvGeom& g, int64_t p, F&& f) {
  const int64_t hw = g.Ho * g.Wo, n = p / hw, rem = p % hw, oy = rem / g.Wo, ox = rem % g.Wo;
  const int64_t x0 = ox * g.sw - g.pw;
  const int64_t kx0 = std::max<int64_t>(0, -x0), kx1 = std::min<int64_t>(g.kw, g.W - x0);
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    const int64_t iy = oy * g.sh - g.ph + ky;
    if (iy < 0 || iy >= g.H || kx0 >= kx1) {
      f(ky, int64_t(0), int64_t(0), int64_t(0), ky * g.kw * g.C);
      continue;
    }
    f(ky, kx0, kx1, ((n * g.H + iy) * g.W + x0 + kx0) * g.C, ky * g.kw * g.C);
  }
}

// col[r, :] = the receptive field of output pixel p0 + r, zeros outside the image.
template <class T>
inline void im2col_block(const T* x, T* col, const ConvGeom& g, int64_t p0, int64_t p1) {
  const int64_t K = g.K(), C = g.C;
  for (int64_t p = p0; p < p1; ++p) {
    T* row = col + (p - p0) * K;
    conv_for_taps(g, p, [&](int64_t, int64_t kx0, int64_t kx1, int64_t src, int64_t off) {
      T* d = row + off;
      std::fill(d, d + kx0 * C, T(0));
      if (kx1 > kx0) std::memcpy(d + kx0 * C, x + src, static_cast<size_t>((kx1 - kx0) * C) * sizeof(T));
      std::fill(d + std::max(kx1, kx0) * C, d + g.kw * C, T(0));
    });
  }
}

// dx += the col rows of output pixels p0..p1 scattered back to their taps.
template <class T>
inline void col2im_add_block(const T* col, T* dx, const ConvGeom& g, int64_t p0, int64_t p1) {
  const int64_t K = g.K(), C = g.C;
  for (int64_t p = p0; p < p1; ++p) {
    const T* row = col + (p - p0) * K;
    conv_for_taps(g, p, [&](int64_t, int64_t kx0, int64_t kx1, int64_t src, int64_t off) {
      const int64_t len = (kx1 - kx0) * C;
      const T* s = row + off + kx0 * C;
      T* d = dx + src;
      for (int64_t i = 0; i < len; ++i) d[i] += s[i];
    });
  }
}

// A growing scratch buffer per region slot (no allocation once warm); Which tells them apart.
template <class T, int Which>
inline T* conv_scratch(size_t n) {
  std::vector<T>& buf = slot_local<std::vector<T>, std::integral_constant<int, Which>>();
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

inline int conv_threads(double flops, int64_t units) { return loop_threads(units, flops >= kParallelMinFlops); }

template <class T>
inline void conv_forward(const T* x, const T* wr, const T* b, T* y, const ConvGeom& g) {
  const int64_t P = g.P(), K = g.K(), O = g.O;
  GemmB<T> pb;
  pb.pack(true, K, O, wr, K);  // op(B) = wr^T [K, O]
  const int64_t R = conv_block_rows(K);
  const bool pw = g.pointwise();
  parallel_rows(P, 2.0 * P * K * O, [&](int64_t r0, int64_t r1) {
    T* col = pw ? nullptr : conv_scratch<T, 0>(static_cast<size_t>(R * K));
    for (int64_t p0 = r0; p0 < r1; p0 += R) {
      const int64_t p1 = std::min(r1, p0 + R);
      if (pw) {
        pb.multiply(p1 - p0, T(1), x + p0 * K, K, T(0), y + p0 * O, O);
      } else {
        im2col_block(x, col, g, p0, p1);
        pb.multiply(p1 - p0, T(1), col, K, T(0), y + p0 * O, O);
      }
      if (b)
        for (int64_t p = p0; p < p1; ++p) {
          T* yr = y + p * O;
          for (int64_t o = 0; o < O; ++o) yr[o] += b[o];
        }
    }
  });
}

// dx, dW, db from dy. Threads take whole images (so col2im never races) and
// keep private dW / db sums, added up in thread order at the end.
template <class T>
inline void conv_backward(const T* dy, const T* x, const T* wr, GradSink<T>* gx, T* dwr, T* db, const ConvGeom& g) {
  const int64_t P = g.P(), K = g.K(), O = g.O, C = g.C, hw = g.Ho * g.Wo;
  const bool pw = g.pointwise();
  GemmB<T> pbw;
  if (gx) pbw.pack(false, O, K, wr, K);  // dcol = dy wr: op(B) = wr [O, K]
  const int64_t R = conv_block_rows(K);
  const double flops = 2.0 * P * K * O * ((gx ? 1 : 0) + (dwr ? 1 : 0));
  const int nt = conv_threads(flops, pw ? P / 16 : g.N);
  // Threads 1.. sum into private dW / db rows (a Tensor: cached memory, no per-step allocation).
  Tensor<T> part({nt > 1 ? (nt - 1) * (K * O + O) : 0});
  if (nt > 1) std::fill(part.data(), part.data() + part.size(), T(0));
  if (dwr) std::fill(dwr, dwr + K * O, T(0));
  if (db) std::fill(db, db + O, T(0));
  parallel_region(nt, [&](int t, int team) {
    // Rows of this thread: whole images unless pointwise (no col2im then).
    const int64_t units = pw ? P : g.N, per = (units + team - 1) / team;
    const int64_t u0 = std::min(units, t * per), u1 = std::min(units, u0 + per);
    const int64_t r0 = pw ? u0 : u0 * hw, r1 = pw ? u1 : u1 * hw;
    T* my_dw = dwr ? (t == 0 ? dwr : part.data() + (t - 1) * (K * O + O)) : nullptr;
    T* my_db = db ? (t == 0 ? db : part.data() + (t - 1) * (K * O + O) + K * O) : nullptr;
    T* col = pw ? nullptr : conv_scratch<T, 0>(static_cast<size_t>(R * K));
    T* dcol = pw || !gx ? nullptr : conv_scratch<T, 1>(static_cast<size_t>(R * K));
    if (gx && !pw && !gx->accumulate) std::fill(gx->data + u0 * g.H * g.W * C, gx->data + u1 * g.H * g.W * C, T(0));
    for (int64_t p0 = r0; p0 < r1; p0 += R) {
      const int64_t p1 = std::min(r1, p0 + R), rows = p1 - p0;
      const T* dyb = dy + p0 * O;
      if (my_dw) {
        const T* a = x + p0 * K;  // pointwise: x rows are the col rows
        if (!pw) {
          im2col_block(x, col, g, p0, p1);
          a = col;
        }
        gemm<T>(true, false, O, K, rows, T(1), dyb, O, a, K, T(1), my_dw, K);
      }
      if (my_db)
        for (int64_t p = p0; p < p1; ++p)
          for (int64_t o = 0; o < O; ++o) my_db[o] += dyb[p * O - p0 * O + o];
      if (gx) {
        if (pw) {
          pbw.multiply(rows, T(1), dyb, O, gx->accumulate ? T(1) : T(0), gx->data + p0 * C, C);
        } else {
          pbw.multiply(rows, T(1), dyb, O, T(0), dcol, K);
          col2im_add_block(dcol, gx->data, g, p0, p1);
        }
      }
    }
  });
  for (int t = 1; t < nt; ++t) {
    const T* pt = part.data() + (t - 1) * (K * O + O);
    if (dwr)
      for (int64_t i = 0; i < K * O; ++i) dwr[i] += pt[i];
    if (db)
      for (int64_t o = 0; o < O; ++o) db[o] += pt[K * O + o];
  }
}

// The gradients of the device convolution's fused epilogue from dy: the channel bias cb [N, O]
// gets dy summed over each sample's pixels, the residual gets dy itself (either may be undefined
// or need no gradient).
inline void conv_epilogue_backward_cuda(backend::CudaBackend& be, const backend::ConvDesc& d, const Tensor<float>& dy,
                                        const Var<float>& cb, const Var<float>& res) {
  if (cb.requires_grad()) {
    GradSink<float> s = grad_sink(*cb.node());
    be.channel_bias_backward(dy.data(), s.data, d.N, d.Ho() * d.Wo(), d.O, s.accumulate);
  }
  if (res.requires_grad()) {
    GradSink<float> s = grad_sink(*res.node());
    be.copy(dy.data(), s.data, dy.numel(), s.accumulate);
  }
}

// Under MathMode::BF16 the forward keeps the bf16 operands the backward needs (x for dw, w for
// dx), as PyTorch's autocast saves its casts: the backward reads them instead of rounding again.
inline Var<float> conv2d_cuda(const Var<float>& x, const Var<float>& w, const Var<float>& b, const Var<float>& cb,
                              const Var<float>& res, const ConvGeom& g) {
  backend::CudaBackend& be = backend::require_cuda("conv2d");
  const backend::ConvDesc d{g.N, g.H, g.W, g.C, g.O, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw};
  const bool has_b = b.defined(), has_cb = cb.defined(), has_res = res.defined();
  Tensor<float> y({g.N, g.Ho, g.Wo, g.O}, Device::CUDA);
  Tensor<bf16> xb, wb;
  if (be.math_mode() == MathMode::BF16 && Tape<float>::grad_enabled()) {
    if (w.requires_grad()) xb = Tensor<bf16>(x.shape(), Device::CUDA);
    if (x.requires_grad()) wb = Tensor<bf16>(w.shape(), Device::CUDA);
  }
  be.conv2d(d, x.value().data(), w.value().data(), has_b ? b.value().data() : nullptr,
            has_cb ? cb.value().data() : nullptr, has_res ? res.value().data() : nullptr, y.data(), xb.data(),
            wb.data());
  return make_result<float>(std::move(y), {&x, &w, has_b ? &b : &x, has_cb ? &cb : &x, has_res ? &res : &x},
                            [x, w, b, cb, res, has_b, d, xb, wb]() {
    return [x, w, b, cb, res, has_b, d, xb, wb](const Tensor<float>& dy) {
      backend::CudaBackend& be = *backend::cuda_backend();
      GradSink<float> sx{}, sw{}, sb{};
      if (x.requires_grad()) sx = grad_sink(*x.node());
      if (w.requires_grad()) sw = grad_sink(*w.node());
      if (has_b && b.requires_grad()) sb = grad_sink(*b.node());
      be.conv2d_backward(d, x.value().data(), w.value().data(), dy.data(), sx.data, sx.accumulate, sw.data,
                         sw.accumulate, sb.data, sb.accumulate, xb.data(), wb.data());
      conv_epilogue_backward_cuda(be, d, dy, cb, res);
    };
  });
}

// A residual of shape rs added to the output of geometry g: it must have the output's shape.
inline void check_conv_residual(const ConvGeom& g, const Shape& rs) {
  if (rs != Shape{g.N, g.Ho, g.Wo, g.O})
    throw std::invalid_argument("diffuse: conv2d residual " + shape_str(rs) + ": expected the output's shape " +
                                shape_str(Shape{g.N, g.Ho, g.Wo, g.O}));
}

// conv2d's operand checks on x's shape; its geometry when they pass.
template <class T>
ConvGeom checked_conv_geom(const Shape& xs, const Var<T>& w, const Var<T>& b, const Conv2dOptions& opt,
                           const Var<T>& cb, const Var<T>& res) {
  if (xs.size() != 4 || w.value().dim() != 4 || w.size(3) != xs[3])
    throw std::invalid_argument("diffuse: conv2d needs x [N,H,W,C] and weight [O,kh,kw,C] (OHWI); got x " +
                                shape_str(xs) + ", weight " + shape_str(w.shape()));
  if (opt.stride_h < 1 || opt.stride_w < 1 || opt.pad_h < 0 || opt.pad_w < 0)
    throw std::invalid_argument("diffuse: conv2d stride must be >= 1 and padding >= 0");
  ConvGeom g{xs[0], xs[1], xs[2], xs[3], w.size(0), w.size(1), w.size(2),
             opt.stride_h,  opt.stride_w, opt.pad_h, opt.pad_w, 0, 0};
  g.Ho = (g.H + 2 * g.ph - g.kh) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.kw) / g.sw + 1;
  if (g.H + 2 * g.ph < g.kh || g.W + 2 * g.pw < g.kw)
    throw std::invalid_argument("diffuse: conv2d kernel " + shape_str(w.shape()) + " larger than the padded input " +
                                shape_str(xs));
  if (b.defined() && (b.value().dim() != 1 || b.size(0) != g.O))
    throw std::invalid_argument("diffuse: conv2d bias " + shape_str(b.shape()) + " for " + std::to_string(g.O) +
                                " output channels");
  if (cb.defined() && cb.shape() != Shape{g.N, g.O})
    throw std::invalid_argument("diffuse: conv2d channel bias " + shape_str(cb.shape()) + ": expected [" +
                                std::to_string(g.N) + ", " + std::to_string(g.O) + "] (samples, output channels)");
  if (res.defined()) check_conv_residual(g, res.shape());
  return g;
}
}  // namespace detail

// y = conv2d(x, w, b) with x NHWC [N, H, W, C], w [O, kh, kw, C] (OHWI), b [O] (or undefined),
// then, fused, what a ResBlock adds to a convolution's output: + cb[n, o] (a bias per sample and
// channel, cb [N, O]: the time embedding) and + res (a tensor of y's shape: the skip
// connection); either may be undefined. The same sums in the same order as conv2d, then
// add_channel_bias, then add, so the same numbers; on the device they are one pass over y instead
// of three (and the conversion from bf16 in that pass too), and the backward copies no gradient.
template <class T>
Var<T> conv2d(const Var<T>& x, const Var<T>& w, const Var<T>& b, const Conv2dOptions& opt, const Var<T>& cb,
              const Var<T>& res) {
  const detail::ConvGeom g = detail::checked_conv_geom(x.shape(), w, b, opt, cb, res);
  const bool has_b = b.defined(), has_cb = cb.defined(), has_res = res.defined();
  if (detail::op_device("conv2d", {&x, &w, &b, &cb, &res}) == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::conv2d_cuda(x, w, b, cb, res, g);
    else detail::cuda_float_only("conv2d");
  }
  Tensor<T> y({g.N, g.Ho, g.Wo, g.O});
  detail::conv_forward(x.value().data(), w.value().data(), has_b ? b.value().data() : nullptr, y.data(), g);
  if (has_cb || has_res) {  // the bias is in y already; then cb, then res, as the unfused ops add them
    const int64_t HW = g.Ho * g.Wo, O = g.O;
    const T* cbd = has_cb ? cb.value().data() : nullptr;
    const T* rd = has_res ? res.value().data() : nullptr;
    T* yd = y.data();
    parallel_for(g.N * HW, y.size() >= detail::kParallelMin, [&](int64_t r) {
      T* yr = yd + r * O;
      if (cbd) {
        const T* c = cbd + (r / HW) * O;
        for (int64_t o = 0; o < O; ++o) yr[o] = yr[o] + c[o];
      }
      if (rd)
        for (int64_t o = 0; o < O; ++o) yr[o] = yr[o] + rd[r * O + o];
    });
  }
  return make_result<T>(std::move(y), {&x, &w, has_b ? &b : &x, has_cb ? &cb : &x, has_res ? &res : &x},
                        [x, w, b, cb, res, has_b, has_cb, has_res, g]() {
    return [x, w, b, cb, res, has_b, has_cb, has_res, g](const Tensor<T>& dy) {
      GradSink<T> sx{}, sw{}, sb{};
      if (x.requires_grad()) sx = grad_sink(*x.node());
      if (w.requires_grad()) sw = grad_sink(*w.node());
      if (has_b && b.requires_grad()) sb = grad_sink(*b.node());
      // conv_backward writes dW and db (sums from zero): straight into the sinks on their first
      // contribution, through a temporary added on when they already hold one.
      Tensor<T> dw_tmp = sw.data && sw.accumulate ? Tensor<T>(w.shape()) : Tensor<T>();
      Tensor<T> db_tmp = sb.data && sb.accumulate ? Tensor<T>({g.O}) : Tensor<T>();
      T* dw = sw.data ? (sw.accumulate ? dw_tmp.data() : sw.data) : nullptr;
      T* db = sb.data ? (sb.accumulate ? db_tmp.data() : sb.data) : nullptr;
      detail::conv_backward(dy.data(), x.value().data(), w.value().data(), x.requires_grad() ? &sx : nullptr, dw, db, g);
      if (dw_tmp.defined())
        for (size_t i = 0; i < dw_tmp.size(); ++i) sw.data[i] += dw_tmp[i];
      if (db_tmp.defined())
        for (size_t i = 0; i < db_tmp.size(); ++i) sb.data[i] += db_tmp[i];
      const T* gd = dy.data();
      if (has_cb && cb.requires_grad()) {
        GradSink<T> s = grad_sink(*cb.node());
        detail::channel_bias_grad(gd, s, g.N, g.Ho * g.Wo, g.O);
      }
      if (has_res && res.requires_grad()) {
        GradSink<T> s = grad_sink(*res.node());
        parallel_for(dy.size(), dy.size() >= detail::kParallelMin, [&](size_t i) { s.put(i, gd[i]); });
      }
    };
  });
}

template <class T>
Var<T> conv2d(const Var<T>& x, const Var<T>& w, const Var<T>& b, const Conv2dOptions& opt) {
  return conv2d(x, w, b, opt, Var<T>(), Var<T>());
}

template <class T>
Var<T> conv2d(const Var<T>& x, const Var<T>& w, const Var<T>& b, int64_t stride = 1, int64_t padding = 0) {
  return conv2d(x, w, b, Conv2dOptions{stride, stride, padding, padding});
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Var<float> conv2d<float>(const Var<float>& x, const Var<float>& w, const Var<float>& b,
    const Conv2dOptions& opt, const Var<float>& cb, const Var<float>& res))
DIFFUSE_FLOAT_INSTANCE(Var<float> conv2d<float>(const Var<float>& x, const Var<float>& w, const Var<float>& b,
    const Conv2dOptions& opt))
DIFFUSE_FLOAT_INSTANCE(Var<float> conv2d<float>(const Var<float>& x, const Var<float>& w, const Var<float>& b,
    int64_t stride, int64_t padding))

}  // namespace diffuse
