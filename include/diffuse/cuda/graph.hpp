// A small reverse-mode graph of device ops: what the CUDA U-Net (cuda/unet.hpp) is built from.
//
// The CPU backend's autograd (autograd.hpp) works on CPU tensors; this is its device
// counterpart, deliberately smaller: float only, one stream, and each op a pair of calls into the
// kernels (kernels/*.cuh), cuBLAS (blas.hpp), cuDNN (conv.hpp) or the attention of attention.hpp.
//
//   diffuse::cuda::Graph g;                          // handles, plans, scratch and the tape
//   Act h = g.input(x_device_tensor);
//   h = g.conv2d(h, conv, ...);  h = g.group_norm(h, gn, true);  ...
//   Act loss = g.mse(h, target);
//   g.backward(loss);                                // parameter gradients accumulate (+=)
//   g.clear();                                       // drops the tape and the activations
//
// An Act holds a device tensor and, after backward, its gradient. Gradient convention (as the
// kernels'): parameter gradients are accumulated; the first contribution to an activation's
// gradient is written, later ones are added. Every op records its backward on the tape; the tape
// runs in reverse, skipping ops whose output received no gradient.
//
// The same source runs natively (compiled by nvcc, device memory from the CUDA runtime) and on the
// CPU through the emulation (compiled by g++, with diffuse::cuda::EmulatedDeviceMemory installed;
// cuBLAS and cuDNN are then host loops), which is how tests/test_emu_unet.cpp checks a whole U-Net
// train step against the CPU backend without a GPU.
#pragma once

#include <diffuse/cuda/check.hpp>

// In a CUDA build the kernels below must be launched by nvcc-compiled code: a host-compiled file
// would run them through the CPU emulation on device pointers.
#if DIFFUSE_HAVE_CUDA_RUNTIME && !defined(__CUDACC__)
#error "diffuse/cuda/graph.hpp (and cuda/unet.hpp) in a CUDA build: include it from a .cu file compiled by nvcc"
#endif

#include <diffuse/cuda/attention.hpp>
#include <diffuse/cuda/blas.hpp>
#include <diffuse/cuda/conv.hpp>
#include <diffuse/cuda/profile.hpp>
#include <diffuse/cuda/tensor.hpp>

#include "kernels/elementwise.cuh"
#include "kernels/group_norm.cuh"
#include "kernels/image.cuh"
#include "kernels/silu.cuh"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::cuda {

// A device parameter: value and gradient (+ optimiser state, owned by the trainer).
struct Param {
  std::string name;
  Shape shape;           // the device shape (conv weights: [O, kh, kw, C])
  Tensor<float> value;   // Device::CUDA
  Tensor<float> grad;    // Device::CUDA, same shape; accumulated by backward
};

// A device model's parameter list (cuda/unet.hpp's UNetDevice, cuda/mlp.hpp's ToyMLPDevice).
// add_param: a new parameter (value and gradient uninitialised) and its index.
inline int add_param(std::vector<Param>& ps, const std::string& name, Shape shape) {
  Param p;
  p.name = name;
  p.shape = shape;
  p.value = Tensor<float>(shape, Device::CUDA);
  p.grad = Tensor<float>(shape, Device::CUDA);
  ps.push_back(std::move(p));
  return static_cast<int>(ps.size() - 1);
}
// Index by name, or -1.
inline int param_index(const std::vector<Param>& ps, const std::string& name) {
  for (std::size_t i = 0; i < ps.size(); ++i)
    if (ps[i].name == name) return static_cast<int>(i);
  return -1;
}
inline std::int64_t count_parameters(const std::vector<Param>& ps) {
  std::int64_t n = 0;
  for (const Param& p : ps) n += p.value.numel();
  return n;
}
// Copies named CPU tensors (PyTorch layouts: a CPU model's named_parameters() values, a
// checkpoint) onto ps: every parameter must be given, with the shape cpu_shape(p); extra names
// are an error too (a different model). to_device(p, cpu) gives the host tensor in p's device
// layout. who names the caller in the messages.
template <class CpuShape, class ToDevice>
inline void load_params(std::vector<Param>& ps, const std::vector<std::pair<std::string, Tensor<float>>>& named,
                        CpuShape cpu_shape, ToDevice to_device, const std::string& who) {
  std::map<std::string, const Tensor<float>*> by_name;
  for (const auto& [n, t] : named) by_name[n] = &t;
  for (Param& p : ps) {
    auto it = by_name.find(p.name);
    if (it == by_name.end()) throw std::invalid_argument(who + ": missing " + p.name);
    const Tensor<float>& t = *it->second;
    const Shape want = cpu_shape(p);
    if (t.shape() != want)
      throw std::invalid_argument(who + ": " + p.name + " has shape " + shape_str(t.shape()) + ", expected " +
                                  shape_str(want));
    p.value.copy_from(to_device(p, t.cpu()));
    by_name.erase(it);
  }
  if (!by_name.empty()) throw std::invalid_argument(who + ": unknown tensor " + by_name.begin()->first);
}

// An activation: a device tensor and, once backward reaches it, its gradient.
struct ActNode {
  Tensor<float> value;
  Tensor<float> grad;
  bool requires_grad = true;  // false for graph inputs: backward stops there
  bool has_grad = false;      // grad holds a contribution (the next one adds)
};
using Act = std::shared_ptr<ActNode>;

// Layer descriptions: indices into the parameter list plus sizes.
struct LinearSpec {
  int w = -1, b = -1;  // weight [out, in], bias [out]
  std::int64_t in = 0, out = 0;
};
struct ConvSpec {
  int w = -1, b = -1;  // weight [O, kh, kw, C] (device layout), bias [O]
  std::int64_t C = 0, O = 0, k = 3, stride = 1, pad = 1;
};
struct GroupNormSpec {
  int w = -1, b = -1;  // gamma, beta [C]
  std::int64_t C = 0, groups = 1;
  float eps = 1e-6f;
};

class Graph {
 public:
  // math: FP32 (results match the CPU backend up to summation order) or TF32 for the GEMMs and
  // convolutions (tensor cores; inputs rounded to 10 mantissa bits).
  explicit Graph(std::vector<Param>* params, MathMode math = MathMode::FP32) : params_(params), math_(math) {
    blas_.set_math_mode(math);
  }
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;

  Blas& blas() { return blas_; }
  Dnn& dnn() { return dnn_; }
  // How convolutions choose their cuDNN algorithms (conv.hpp): heuristics or timing them, and
  // whether FFT and Winograd (other rounding than a plain sum of products) may be used.
  void set_conv_search(ConvSearch search, bool allow_fft_winograd) {
    conv_search_ = search;
    conv_fft_winograd_ = allow_fft_winograd;
  }

  // Time each op (forward and backward) into p (cuda/profile.hpp); nullptr: off.
  void set_profiler(OpProfiler* p) { prof_ = p; }
  OpProfiler* profiler() const { return prof_; }

  // Scratch device memory of at least `bytes`, valid until the next call (ops run in stream
  // order, so one op's scratch is free once its kernels are queued).
  void* scratch(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    if (!scratch_.defined() || scratch_.size() < bytes) {
      scratch_ = Tensor<std::uint8_t>();
      scratch_ = Tensor<std::uint8_t>({static_cast<std::int64_t>(std::max<std::size_t>(bytes, 1 << 20))}, Device::CUDA);
    }
    return scratch_.data();
  }

  static Act make(Shape s) {
    auto a = std::make_shared<ActNode>();
    a->value = Tensor<float>(std::move(s), Device::CUDA);
    return a;
  }
  // A graph input: a device tensor that needs no gradient.
  static Act input(const Tensor<float>& device_value) {
    if (device_value.device() != Device::CUDA) throw std::invalid_argument("diffuse::cuda::Graph: input must be on cuda");
    auto a = std::make_shared<ActNode>();
    a->value = device_value;
    a->requires_grad = false;
    return a;
  }

  // ------------------------------------------------------------------------ ops
  // y = x W^T + b over the rows of x [rows, in]; silu: y = SiLU(x W^T + b) (z kept for the backward).
  Act linear(const Act& x, const LinearSpec& L, bool silu = false) {
    ProfileScope ps(prof_, "linear fwd");
    const std::int64_t rows = x->value.numel() / L.in;
    Shape ys = x->value.shape();
    ys.back() = L.out;
    Act y = make(ys);
    const float* W = P(L.w);
    Act z = silu ? make(ys) : y;
    gemm(blas_, false, true, rows, L.out, L.in, 1.0f, x->value.data(), L.in, W, L.in, 0.0f, z->value.data(), L.out);
    if (silu) kernels::bias_silu_forward(z->value.data(), P(L.b), y->value.data(), rows, L.out, stream_);
    else if (L.b >= 0) kernels::add_row_bias(y->value.data(), P(L.b), rows, L.out, stream_);
    record(y, [this, x, y, z, L, rows, silu] {
      ProfileScope ps(prof_, "linear bwd");
      const float* dz = y->grad.data();
      Tensor<float> t;  // dL/dz before the SiLU; freed in stream order after its last use
      if (silu) {
        t = Tensor<float>(z->value.shape(), Device::CUDA);
        kernels::bias_silu_backward(z->value.data(), dz, t.data(), rows, L.out, false, stream_);
        dz = t.data();
      }
      if (L.b >= 0)
        kernels::row_bias_backward(dz, G(L.b), rows, L.out,
                                   scratch(kernels::row_bias_backward_workspace_bytes(rows, L.out)), stream_);
      // dW += dz^T x;  dx (= or +=) dz W
      gemm(blas_, true, false, L.out, L.in, rows, 1.0f, dz, L.out, x->value.data(), L.in, 1.0f, G(L.w), L.in);
      bool acc = false;
      if (float* dx = grad_of(x, acc))
        gemm(blas_, false, false, rows, L.in, L.out, 1.0f, dz, L.out, P(L.w), L.in, acc ? 1.0f : 0.0f, dx, L.in);
    });
    return y;
  }

  // 2-D convolution (+ bias) of x [N, H, W, C].
  Act conv2d(const Act& x, const ConvSpec& c) {
    const Shape& s = x->value.shape();
    Conv2dShape cs;
    cs.N = s[0];
    cs.H = s[1];
    cs.W = s[2];
    cs.C = c.C;
    cs.O = c.O;
    cs.kh = cs.kw = c.k;
    cs.stride_h = cs.stride_w = c.stride;
    cs.pad_h = cs.pad_w = c.pad;
    const Conv2dPlan& plan = convs_.get(dnn_, cs, conv_options());
    ProfileScope ps(prof_, "conv2d fwd");
    Act y = make({cs.N, cs.Ho(), cs.Wo(), cs.O});
    const std::int64_t rows = cs.N * cs.Ho() * cs.Wo();
    plan.forward(dnn_, x->value.data(), P(c.w), y->value.data());
    if (c.b >= 0) kernels::add_row_bias(y->value.data(), P(c.b), rows, c.O, stream_);
    record(y, [this, x, y, c, cs, rows] {
      const Conv2dPlan& plan = convs_.get(dnn_, cs, conv_options());
      const float* dy = y->grad.data();
      {
        ProfileScope ps(prof_, "conv2d bwd filter+bias");
        if (c.b >= 0)
          kernels::row_bias_backward(dy, G(c.b), rows, c.O,
                                     scratch(kernels::row_bias_backward_workspace_bytes(rows, c.O)), stream_);
        plan.backward_filter(dnn_, x->value.data(), dy, G(c.w));
      }
      bool acc = false;
      if (float* dx = grad_of(x, acc)) {
        ProfileScope ps(prof_, "conv2d bwd data");
        plan.backward_data(dnn_, dy, P(c.w), dx, acc);
      }
    });
    return y;
  }

  // GroupNorm of x [N, H, W, C] (NHWC), SiLU'd when silu.
  Act group_norm(const Act& x, const GroupNormSpec& g, bool silu) {
    const Shape& s = x->value.shape();
    const std::int64_t N = s[0], HW = s[1] * s[2], C = s[3];
    ProfileScope ps(prof_, silu ? "group_norm+silu fwd" : "group_norm fwd");
    Act y = make(s);
    auto stats = std::make_shared<Tensor<float>>(Shape{2 * N * g.groups}, Device::CUDA);
    float* mean = stats->data();
    float* rstd = mean + N * g.groups;
    kernels::group_norm_forward(x->value.data(), P(g.w), P(g.b), y->value.data(), mean, rstd, N, HW, C, g.groups, g.eps,
                                silu, scratch(kernels::group_norm_workspace_bytes(N, HW, C, g.groups)), stream_);
    record(y, [this, x, y, g, stats, N, HW, C, silu] {
      ProfileScope ps(prof_, silu ? "group_norm+silu bwd" : "group_norm bwd");
      const float* mean = stats->data();
      const float* rstd = mean + N * g.groups;
      bool acc = false;
      float* dx = grad_of(x, acc);
      if (!dx) throw std::logic_error("diffuse::cuda::Graph: group_norm of a graph input is not supported");
      kernels::group_norm_backward(y->grad.data(), x->value.data(), P(g.w), P(g.b), mean, rstd, dx, G(g.w), G(g.b), N,
                                   HW, C, g.groups, silu, acc,
                                   scratch(kernels::group_norm_workspace_bytes(N, HW, C, g.groups)), stream_);
    });
    return y;
  }

  Act silu(const Act& x) {
    ProfileScope ps(prof_, "silu fwd");
    Act y = make(x->value.shape());
    const std::int64_t n = x->value.numel();
    kernels::silu_forward(x->value.data(), y->value.data(), n, stream_);
    record(y, [this, x, y, n] {
      ProfileScope ps(prof_, "silu bwd");
      bool acc = false;
      if (float* dx = grad_of(x, acc)) kernels::silu_backward(x->value.data(), y->grad.data(), dx, n, acc, stream_);
    });
    return y;
  }

  Act add(const Act& a, const Act& b) {
    if (a->value.shape() != b->value.shape())
      throw std::invalid_argument("diffuse::cuda::Graph::add: shapes " + shape_str(a->value.shape()) + " and " +
                                  shape_str(b->value.shape()));
    ProfileScope ps(prof_, "add fwd");
    Act y = make(a->value.shape());
    const std::int64_t n = y->value.numel();
    kernels::add(a->value.data(), b->value.data(), y->value.data(), n, stream_);
    record(y, [this, a, b, y, n] {
      ProfileScope ps(prof_, "add bwd");
      pass_through(a, y->grad.data(), n);
      pass_through(b, y->grad.data(), n);
    });
    return y;
  }

  // x [N, H, W, C] + b [N, C] over the pixels.
  Act add_channel_bias(const Act& x, const Act& b) {
    const Shape& s = x->value.shape();
    const std::int64_t N = s[0], HW = s[1] * s[2], C = s[3];
    ProfileScope ps(prof_, "channel bias fwd");
    Act y = make(s);
    kernels::add_channel_bias(x->value.data(), b->value.data(), y->value.data(), N, HW, C, stream_);
    record(y, [this, x, b, y, N, HW, C] {
      ProfileScope ps(prof_, "channel bias bwd");
      pass_through(x, y->grad.data(), N * HW * C);
      bool acc = false;
      if (float* db = grad_of(b, acc))
        kernels::channel_bias_backward(y->grad.data(), db, N, HW, C, acc,
                                       scratch(kernels::channel_bias_backward_workspace_bytes(N, HW, C)), stream_);
    });
    return y;
  }

  // Dropout with the mask of the Philox stream at (seed, off): the caller advances its Generator
  // as the CPU op does (ceil(n / 4) blocks).
  Act dropout(const Act& x, double p, std::uint64_t seed, std::uint64_t off) {
    ProfileScope ps(prof_, "dropout fwd");
    Act y = make(x->value.shape());
    const std::int64_t n = x->value.numel();
    kernels::dropout_forward(x->value.data(), y->value.data(), n, p, seed, off, stream_);
    record(y, [this, x, y, n, p, seed, off] {
      ProfileScope ps(prof_, "dropout bwd");
      bool acc = false;
      if (float* dx = grad_of(x, acc)) kernels::dropout_backward(y->grad.data(), dx, n, p, seed, off, acc, stream_);
    });
    return y;
  }

  // Concatenation along the last dimension: a [..., Ca] and b [..., Cb] (images: channels of
  // [N, H, W, C]; rows: features of [N, C]).
  Act concat_channels(const Act& a, const Act& b) {
    Shape s = a->value.shape();
    const std::int64_t Ca = s.back(), Cb = b->value.shape().back(), Pn = a->value.numel() / Ca;
    if (b->value.numel() / Cb != Pn)
      throw std::invalid_argument("diffuse::cuda::Graph::concat_channels: shapes " + shape_str(s) + " and " +
                                  shape_str(b->value.shape()));
    s.back() = Ca + Cb;
    ProfileScope ps(prof_, "concat fwd");
    Act y = make(s);
    kernels::concat_channels_forward(a->value.data(), b->value.data(), y->value.data(), Pn, Ca, Cb, stream_);
    record(y, [this, a, b, y, Pn, Ca, Cb] {
      ProfileScope ps(prof_, "concat bwd");
      bool acc_a = false, acc_b = false;
      float* da = grad_of(a, acc_a);
      float* db = grad_of(b, acc_b);
      kernels::concat_channels_backward(y->grad.data(), da, db, Pn, Ca, Cb, acc_a, acc_b, stream_);
    });
    return y;
  }

  Act upsample_nearest2x(const Act& x) {
    const Shape& s = x->value.shape();
    ProfileScope ps(prof_, "upsample fwd");
    Act y = make({s[0], 2 * s[1], 2 * s[2], s[3]});
    kernels::upsample_nearest2x_forward(x->value.data(), y->value.data(), s[0], s[1], s[2], s[3], stream_);
    record(y, [this, x, y, s] {
      ProfileScope ps(prof_, "upsample bwd");
      bool acc = false;
      if (float* dx = grad_of(x, acc))
        kernels::upsample_nearest2x_backward(y->grad.data(), dx, s[0], s[1], s[2], s[3], acc, stream_);
    });
    return y;
  }

  // Multi-head attention over the H*W tokens of q, k, v [N, H, W, C].
  Act attention(const Act& q, const Act& k, const Act& v, std::int64_t heads) {
    const Shape& s = q->value.shape();
    const std::int64_t N = s[0], L = s[1] * s[2], C = s[3];
    ProfileScope ps(prof_, "attention fwd");
    Act y = make(s);
    auto probs = std::make_shared<Tensor<float>>(
        Shape{static_cast<std::int64_t>(attention_probs_elements(N, L, heads))}, Device::CUDA);
    attention_forward(blas_, q->value.data(), k->value.data(), v->value.data(), y->value.data(), probs->data(), N, L, C,
                      heads, stream_);
    record(y, [this, q, k, v, y, probs, N, L, C, heads] {
      ProfileScope ps(prof_, "attention bwd");
      AttentionAccumulate acc;
      float* dq = grad_of(q, acc.dq);
      float* dk = grad_of(k, acc.dk);
      float* dv = grad_of(v, acc.dv);
      attention_backward(blas_, q->value.data(), k->value.data(), v->value.data(), probs->data(), y->grad.data(), dq, dk,
                         dv, scratch(attention_workspace_bytes(N, L, heads)), N, L, C, heads, stream_, acc);
    });
    return y;
  }

  // y = x + table[idx] row by row (x [N, D], table a parameter [R, D], idx N device int32).
  Act add_table_rows(const Act& x, int table, const std::int32_t* idx, std::int64_t R) {
    const std::int64_t N = x->value.shape()[0], D = x->value.shape()[1];
    ProfileScope ps(prof_, "class embedding fwd");
    Act y = make(x->value.shape());
    kernels::scale(x->value.data(), 1.0f, y->value.data(), N * D, stream_);
    kernels::gather_rows_add(P(table), idx, y->value.data(), N, D, stream_);
    record(y, [this, x, y, table, idx, N, R, D] {
      ProfileScope ps(prof_, "class embedding bwd");
      pass_through(x, y->grad.data(), N * D);
      kernels::gather_rows_add_backward(idx, y->grad.data(), G(table), N, R, D, stream_);
    });
    return y;
  }

  // mean((a - b)^2) as a one-element activation; b is a constant (no gradient).
  Act mse(const Act& a, const Tensor<float>& b) {
    const std::int64_t n = a->value.numel();
    ProfileScope ps(prof_, "mse fwd");
    Act y = make({1});
    kernels::mse_forward(a->value.data(), b.data(), n, y->value.data(), scratch(kernels::mse_forward_workspace_bytes(n)),
                         stream_);
    record(y, [this, a, b, y, n] {
      // The loss's gradient is 1 (backward seeds it); read on the host once, it is a scalar.
      ProfileScope ps(prof_, "mse bwd");
      bool acc = false;
      if (float* da = grad_of(a, acc)) kernels::mse_backward(a->value.data(), b.data(), n, loss_grad_, da, acc, stream_);
    });
    return y;
  }

  // ------------------------------------------------------------------------ backward
  // Gradients of the scalar `loss` (an output of mse) into every parameter's grad (+=) and every
  // activation reached. The tape stays until clear().
  void backward(const Act& loss) {
    if (loss->value.numel() != 1) throw std::invalid_argument("diffuse::cuda::Graph::backward: loss must be a scalar");
    loss->grad = Tensor<float>::ones({1}).cuda();
    loss->has_grad = true;
    loss_grad_ = 1.0f;
    for (auto it = tape_.rbegin(); it != tape_.rend(); ++it)
      if (it->out->has_grad) it->backward();  // an output nothing used gets no gradient
    tape_.clear();
  }
  void clear() { tape_.clear(); }

 private:
  Conv2dPlanOptions conv_options() const {
    Conv2dPlanOptions o;
    o.math = math_;
    o.search = conv_search_;
    o.allow_fft_winograd = conv_fft_winograd_;
    return o;
  }
  float* P(int i) { return (*params_)[static_cast<std::size_t>(i)].value.data(); }
  float* G(int i) { return (*params_)[static_cast<std::size_t>(i)].grad.data(); }

  struct Entry {
    Act out;
    std::function<void()> backward;
  };
  void record(const Act& out, std::function<void()> f) { tape_.push_back(Entry{out, std::move(f)}); }

  // Where x's gradient goes (nullptr: x needs none): allocated on first use; acc says whether to
  // add (a contribution is already there).
  static float* grad_of(const Act& x, bool& acc) {
    acc = false;
    if (!x || !x->requires_grad) return nullptr;
    if (!x->grad.defined()) x->grad = Tensor<float>(x->value.shape(), Device::CUDA);
    acc = x->has_grad;
    x->has_grad = true;
    return x->grad.data();
  }
  // x's gradient gets dy (copied, or added).
  void pass_through(const Act& x, const float* dy, std::int64_t n) {
    bool acc = false;
    float* dx = grad_of(x, acc);
    if (!dx) return;
    if (acc) kernels::accumulate(dy, dx, n, stream_);
    else kernels::scale(dy, 1.0f, dx, n, stream_);
  }

  std::vector<Param>* params_;
  MathMode math_;
  ConvSearch conv_search_ = ConvSearch::Heuristic;
  bool conv_fft_winograd_ = false;
  Blas blas_;
  Dnn dnn_;
  Conv2dPlans convs_;
  stream_t stream_{};
  Tensor<std::uint8_t> scratch_;
  OpProfiler* prof_ = nullptr;
  float loss_grad_ = 1.0f;
  std::vector<Entry> tape_;
};

}  // namespace diffuse::cuda
