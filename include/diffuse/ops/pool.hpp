// Pooling on NHWC images [N, H, W, C], with PyTorch's semantics exactly:
//
//   max_pool2d(x, PoolOptions{...})   F.max_pool2d(kernel, stride, padding, ceil_mode)
//   avg_pool2d(x, PoolOptions{...})   F.avg_pool2d(kernel, stride, padding, ceil_mode, count_include_pad)
//   global_avg_pool(x)                x.mean((H, W)): [N, H, W, C] -> [N, C]
//
// Output size (PyTorch's pooling_output_shape, dilation 1):
//   out = floor((in + 2 pad - k + (ceil ? stride - 1 : 0)) / stride) + 1,
//   and with ceil_mode one less when the last window would start at or past
//   in + pad (it must start inside the input or the left padding).
// Max pool pads with -inf; its backward routes each output's gradient to the
// first maximum of the window in row-major order (PyTorch's CPU kernel: strict
// '>', NaN wins). Avg pool divides by the window clipped to the padded input
// (count_include_pad) or to the input itself (not), as PyTorch does; so a
// ceil_mode window hanging past the padded edge does not count that part.
// No dilation, no divisor_override.
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include <diffuse/ops/common.hpp>
#include <diffuse/ops/nhwc.hpp>

namespace diffuse {

struct PoolOptions {
  int64_t kernel_h = 2, kernel_w = 2;
  int64_t stride_h = 0, stride_w = 0;  // 0: the kernel size (PyTorch's stride=None)
  int64_t pad_h = 0, pad_w = 0;
  bool ceil_mode = false;
  bool count_include_pad = true;  // avg_pool2d only
};

namespace detail {

// One output position's window along one axis: input range [lo, hi) and its
// length clipped to the padded input (avg pool's count_include_pad divisor).
struct PoolWindow {
  int64_t lo, hi, padded_len;
};

// PyTorch's pooling_output_shape with dilation 1 (floor division: the numerator can be negative).
inline int64_t pool_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, bool ceil_mode) {
  const int64_t num = in + 2 * pad - k + (ceil_mode ? stride - 1 : 0);
  int64_t out = (num >= 0 ? num / stride : -((-num + stride - 1) / stride)) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;  // the last window must start inside
  return out;
}

struct PoolPlan {
  int64_t N = 0, H = 0, W = 0, C = 0, OH = 0, OW = 0;
  std::vector<PoolWindow> wh, ww;  // per output row / column
};

inline PoolPlan pool_plan(const char* op, const Shape& s, PoolOptions& o) {
  require_nhwc(op, s);
  if (o.stride_h == 0) o.stride_h = o.kernel_h;
  if (o.stride_w == 0) o.stride_w = o.kernel_w;
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument(std::string("diffuse: ") + op + ": " + why + " (input " + shape_str(s) + ", kernel " +
                                std::to_string(o.kernel_h) + "x" + std::to_string(o.kernel_w) + ", stride " +
                                std::to_string(o.stride_h) + "x" + std::to_string(o.stride_w) + ", padding " +
                                std::to_string(o.pad_h) + "x" + std::to_string(o.pad_w) + ")");
  };
  if (o.kernel_h <= 0 || o.kernel_w <= 0) fail("kernel size must be positive");
  if (o.stride_h < 0 || o.stride_w < 0) fail("stride must be positive");
  if (o.pad_h < 0 || o.pad_w < 0) fail("padding must be non-negative");
  // PyTorch's rule; it also guarantees every window holds at least one input element.
  if (o.pad_h > o.kernel_h / 2 || o.pad_w > o.kernel_w / 2) fail("padding must be at most half the kernel size");
  PoolPlan p;
  p.N = s[0], p.H = s[1], p.W = s[2], p.C = s[3];
  if (p.C <= 0) fail("no channels");
  p.OH = pool_out_size(p.H, o.kernel_h, o.stride_h, o.pad_h, o.ceil_mode);
  p.OW = pool_out_size(p.W, o.kernel_w, o.stride_w, o.pad_w, o.ceil_mode);
  if (p.OH < 1 || p.OW < 1)
    fail("output size " + std::to_string(p.OH) + "x" + std::to_string(p.OW) + " is too small");
  if (p.H * p.W > std::numeric_limits<int32_t>::max()) fail("image too large for 32-bit argmax indices");
  auto windows = [](int64_t out, int64_t in, int64_t k, int64_t stride, int64_t pad) {
    std::vector<PoolWindow> v(static_cast<size_t>(out));
    for (int64_t i = 0; i < out; ++i) {
      const int64_t start = i * stride - pad, end = std::min(start + k, in + pad);
      v[i] = {std::max<int64_t>(start, 0), std::min(end, in), end - start};
    }
    return v;
  };
  p.wh = windows(p.OH, p.H, o.kernel_h, o.stride_h, o.pad_h);
  p.ww = windows(p.OW, p.W, o.kernel_w, o.stride_w, o.pad_w);
  return p;
}

inline backend::PoolDesc pool_desc(const PoolPlan& p, const PoolOptions& o) {
  backend::PoolDesc d;
  d.N = p.N, d.H = p.H, d.W = p.W, d.C = p.C, d.OH = p.OH, d.OW = p.OW;
  d.kernel_h = o.kernel_h, d.kernel_w = o.kernel_w, d.stride_h = o.stride_h, d.stride_w = o.stride_w;
  d.pad_h = o.pad_h, d.pad_w = o.pad_w, d.count_include_pad = o.count_include_pad;
  return d;
}

inline Var<float> max_pool2d_cuda(const Var<float>& x, const backend::PoolDesc& d) {
  backend::CudaBackend& be = backend::require_cuda("max_pool2d");
  const bool grad = Tape<float>::grad_enabled() && x.requires_grad();
  Tensor<float> out({d.N, d.OH, d.OW, d.C}, Device::CUDA);
  Tensor<int32_t> arg = grad ? Tensor<int32_t>(out.shape(), Device::CUDA) : Tensor<int32_t>();
  be.max_pool2d(d, x.value().data(), out.data(), grad ? arg.data() : nullptr);
  return make_result<float>(std::move(out), {&x}, [&]() {
    return [x, d, arg](const Tensor<float>& g) {
      GradSink<float> s = grad_sink(*x.node());
      backend::cuda_backend()->max_pool2d_backward(d, arg.data(), g.data(), s.data, s.accumulate);
    };
  });
}

inline Var<float> avg_pool2d_cuda(const Var<float>& x, const backend::PoolDesc& d) {
  backend::CudaBackend& be = backend::require_cuda("avg_pool2d");
  Tensor<float> out({d.N, d.OH, d.OW, d.C}, Device::CUDA);
  be.avg_pool2d(d, x.value().data(), out.data());
  return make_result<float>(std::move(out), {&x}, [x, d]() {
    return [x, d](const Tensor<float>& g) {
      GradSink<float> s = grad_sink(*x.node());
      backend::cuda_backend()->avg_pool2d_backward(d, g.data(), s.data, s.accumulate);
    };
  });
}

inline Var<float> global_avg_pool_cuda(const Var<float>& x, int64_t N, int64_t HW, int64_t C) {
  backend::CudaBackend& be = backend::require_cuda("global_avg_pool");
  Tensor<float> out({N, C}, Device::CUDA);
  be.global_avg_pool(x.value().data(), out.data(), N, HW, C);
  return make_result<float>(std::move(out), {&x}, [x, N, HW, C]() {
    return [x, N, HW, C](const Tensor<float>& g) {
      GradSink<float> s = grad_sink(*x.node());
      backend::cuda_backend()->global_avg_pool_backward(g.data(), s.data, N, HW, C, s.accumulate);
    };
  });
}

}  // namespace detail

// F.max_pool2d on NHWC x. The forward keeps, per output element, the index
// (h * W + w) of its window's maximum for the backward (only when a gradient is needed).
template <class T>
Var<T> max_pool2d(const Var<T>& x, PoolOptions opt) {
  const detail::PoolPlan pl = detail::pool_plan("max_pool2d", x.shape(), opt);
  if (x.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::max_pool2d_cuda(x, detail::pool_desc(pl, opt));
    else detail::cuda_float_only("max_pool2d");
  }
  const int64_t H = pl.H, W = pl.W, C = pl.C, OH = pl.OH, OW = pl.OW;
  const bool grad = Tape<T>::grad_enabled() && x.requires_grad();
  Tensor<T> out({pl.N, OH, OW, C});
  std::vector<int32_t> arg(grad ? out.size() : 0);
  const T* xd = x.value().data();
  T* od = out.data();
  int32_t* ad = grad ? arg.data() : nullptr;
  // One task per output row (n, oh): disjoint outputs, so any thread count gives the same bits.
  parallel_for(pl.N * OH, x.value().size() >= detail::kParallelMin, [&](int64_t r) {
    const int64_t n = r / OH;
    const detail::PoolWindow& wh = pl.wh[r % OH];
    for (int64_t ow = 0; ow < OW; ++ow) {
      const detail::PoolWindow& ww = pl.ww[ow];
      T* o = od + (r * OW + ow) * C;
      int32_t* a = ad ? ad + (r * OW + ow) * C : nullptr;
      // As PyTorch: start at -inf with the index of the window's first element,
      // so an all -inf window still routes its gradient somewhere defined.
      std::fill(o, o + C, -std::numeric_limits<T>::infinity());
      if (a) std::fill(a, a + C, static_cast<int32_t>(wh.lo * W + ww.lo));
      for (int64_t ih = wh.lo; ih < wh.hi; ++ih)
        for (int64_t iw = ww.lo; iw < ww.hi; ++iw) {
          const T* xp = xd + ((n * H + ih) * W + iw) * C;
          const int32_t p = static_cast<int32_t>(ih * W + iw);
          for (int64_t c = 0; c < C; ++c) {
            const T v = xp[c];
            if (v > o[c] || std::isnan(v)) {  // strict: the first maximum wins ties
              o[c] = v;
              if (a) a[c] = p;
            }
          }
        }
    }
  });
  return make_result<T>(std::move(out), {&x}, [&]() {
    return [x, N = pl.N, H, W, C, OH, OW, arg = std::move(arg)](const Tensor<T>& g) {
      GradSink<T> s = grad_sink(*x.node());
      const T* gd = g.data();
      const int64_t in_n = H * W * C, out_n = OH * OW * C;
      // Windows overlap, so the scatter is split over samples only.
      parallel_for(N, x.value().size() >= detail::kParallelMin && N > 1, [&](int64_t n) {
        T* sd = s.data + n * in_n;
        if (!s.accumulate) std::fill(sd, sd + in_n, T(0));
        const T* gn = gd + n * out_n;
        const int32_t* an = arg.data() + n * out_n;
        for (int64_t j = 0; j < OH * OW; ++j)
          for (int64_t c = 0; c < C; ++c) sd[an[j * C + c] * C + c] += gn[j * C + c];
      });
    };
  });
}

// F.avg_pool2d on NHWC x; the divisor of each window follows PyTorch (see the top of this file).
template <class T>
Var<T> avg_pool2d(const Var<T>& x, PoolOptions opt) {
  const detail::PoolPlan pl = detail::pool_plan("avg_pool2d", x.shape(), opt);
  if (x.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::avg_pool2d_cuda(x, detail::pool_desc(pl, opt));
    else detail::cuda_float_only("avg_pool2d");
  }
  const int64_t H = pl.H, W = pl.W, C = pl.C, OH = pl.OH, OW = pl.OW;
  const bool include_pad = opt.count_include_pad;
  auto divisor = [include_pad](const detail::PoolWindow& a, const detail::PoolWindow& b) {
    return include_pad ? a.padded_len * b.padded_len : (a.hi - a.lo) * (b.hi - b.lo);
  };
  Tensor<T> out({pl.N, OH, OW, C});
  const T* xd = x.value().data();
  T* od = out.data();
  parallel_for(pl.N * OH, x.value().size() >= detail::kParallelMin, [&](int64_t r) {
    const int64_t n = r / OH;
    const detail::PoolWindow& wh = pl.wh[r % OH];
    for (int64_t ow = 0; ow < OW; ++ow) {
      const detail::PoolWindow& ww = pl.ww[ow];
      T* o = od + (r * OW + ow) * C;
      std::fill(o, o + C, T(0));
      // Whole pixels at a time: C contiguous values, a loop the compiler vectorises.
      for (int64_t ih = wh.lo; ih < wh.hi; ++ih)
        for (int64_t iw = ww.lo; iw < ww.hi; ++iw) {
          const T* xp = xd + ((n * H + ih) * W + iw) * C;
          for (int64_t c = 0; c < C; ++c) o[c] += xp[c];
        }
      const T d = static_cast<T>(divisor(wh, ww));  // divide, not multiply by 1/d: PyTorch's rounding
      for (int64_t c = 0; c < C; ++c) o[c] /= d;
    }
  });
  return make_result<T>(std::move(out), {&x}, [&]() {
    return [x, pl, divisor](const Tensor<T>& g) {
      const int64_t H = pl.H, W = pl.W, C = pl.C, OH = pl.OH, OW = pl.OW;
      GradSink<T> s = grad_sink(*x.node());
      const T* gd = g.data();
      const int64_t in_n = H * W * C;
      parallel_for(pl.N, x.value().size() >= detail::kParallelMin && pl.N > 1, [&](int64_t n) {
        T* sd = s.data + n * in_n;
        if (!s.accumulate) std::fill(sd, sd + in_n, T(0));
        std::vector<T> q(static_cast<size_t>(C));
        for (int64_t oh = 0; oh < OH; ++oh) {
          const detail::PoolWindow& wh = pl.wh[oh];
          for (int64_t ow = 0; ow < OW; ++ow) {
            const detail::PoolWindow& ww = pl.ww[ow];
            const T* gp = gd + ((n * OH + oh) * OW + ow) * C;
            const T d = static_cast<T>(divisor(wh, ww));
            for (int64_t c = 0; c < C; ++c) q[c] = gp[c] / d;
            for (int64_t ih = wh.lo; ih < wh.hi; ++ih)
              for (int64_t iw = ww.lo; iw < ww.hi; ++iw) {
                T* sp = sd + (ih * W + iw) * C;
                for (int64_t c = 0; c < C; ++c) sp[c] += q[c];
              }
          }
        }
      });
    };
  });
}

// Square kernels, as F.max_pool2d(x, kernel, stride, padding, ceil_mode); stride 0 means the kernel size.
template <class T>
Var<T> max_pool2d(const Var<T>& x, int64_t kernel, int64_t stride = 0, int64_t padding = 0,
                  bool ceil_mode = false) {
  return max_pool2d(x, PoolOptions{kernel, kernel, stride, stride, padding, padding, ceil_mode, true});
}

// As F.avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad); stride 0 means the kernel size.
template <class T>
Var<T> avg_pool2d(const Var<T>& x, int64_t kernel, int64_t stride = 0, int64_t padding = 0,
                  bool ceil_mode = false, bool count_include_pad = true) {
  return avg_pool2d(x, PoolOptions{kernel, kernel, stride, stride, padding, padding, ceil_mode, count_include_pad});
}

// Mean over H and W: NHWC [N, H, W, C] -> [N, C] (a classifier's head), accumulated in double.
template <class T>
Var<T> global_avg_pool(const Var<T>& x) {
  detail::require_nhwc("global_avg_pool", x.shape());
  const int64_t N = x.size(0), HW = x.size(1) * x.size(2), C = x.size(3);
  if (HW == 0) throw std::invalid_argument("diffuse: global_avg_pool of an empty image " + shape_str(x.shape()));
  if (x.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::global_avg_pool_cuda(x, N, HW, C);
    else detail::cuda_float_only("global_avg_pool");
  }
  Tensor<T> out({N, C});
  const T* xd = x.value().data();
  T* od = out.data();
  parallel_for(N, x.value().size() >= detail::kParallelMin && N > 1, [&](int64_t n) {
    std::vector<double> acc(static_cast<size_t>(C), 0.0);
    const T* xp = xd + n * HW * C;
    for (int64_t p = 0; p < HW; ++p)
      for (int64_t c = 0; c < C; ++c) acc[c] += xp[p * C + c];
    for (int64_t c = 0; c < C; ++c) od[n * C + c] = static_cast<T>(acc[c] / static_cast<double>(HW));
  });
  return make_result<T>(std::move(out), {&x}, [x, N, HW, C]() {
    return [x, N, HW, C](const Tensor<T>& g) {
      GradSink<T> s = grad_sink(*x.node());
      const T inv = T(1) / static_cast<T>(HW);
      parallel_for(N * HW, x.value().size() >= detail::kParallelMin, [&](int64_t r) {
        const T* gr = g.data() + (r / HW) * C;
        for (int64_t c = 0; c < C; ++c) s.put(static_cast<size_t>(r * C + c), gr[c] * inv);
      });
    };
  });
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Var<float> max_pool2d<float>(const Var<float>& x, PoolOptions opt))
DIFFUSE_FLOAT_INSTANCE(Var<float> max_pool2d<float>(const Var<float>& x, int64_t kernel, int64_t stride,
    int64_t padding, bool ceil_mode))
DIFFUSE_FLOAT_INSTANCE(Var<float> avg_pool2d<float>(const Var<float>& x, PoolOptions opt))
DIFFUSE_FLOAT_INSTANCE(Var<float> avg_pool2d<float>(const Var<float>& x, int64_t kernel, int64_t stride,
    int64_t padding, bool ceil_mode, bool count_include_pad))
DIFFUSE_FLOAT_INSTANCE(Var<float> global_avg_pool<float>(const Var<float>& x))

}  // namespace diffuse
