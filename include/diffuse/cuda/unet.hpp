// The DDPM U-Net on the CUDA device, and its train step.
//
// Same function, same parameter names and the same order of random draws as the CPU model
// (layers/unet.hpp), built from the device graph (graph.hpp):
//
//   diffuse::cuda::UNetDevice net(cfg);             // parameters on the device (uninitialised)
//   net.load(cpu_model_named_tensors);             // from the CPU model / a checkpoint (PyTorch layouts)
//   diffuse::cuda::UNetTrainer trainer(net, options);  // cuda/trainer.hpp: lr, Adam(W), EMA, clip, TF32
//   float loss = trainer.step(x_t, eps, t, labels, &gen);   // forward, MSE, backward, clip, Adam(W) + EMA
//   auto named = net.named_tensors();              // back to CPU tensors in PyTorch layouts
//
// Parameters live on the device in the layouts the device ops want: convolution weights as
// [O, kh, kw, C] (cuDNN's NHWC filters), everything else as on the CPU. load() and
// named_tensors() convert, so checkpoints are the same files on either device.
//
// Only float. nvcc compiles this header for the GPU; g++ compiles it for the CPU emulation (with
// diffuse::cuda::EmulatedDeviceMemory installed), where tests/test_emu_unet.cpp compares a whole
// train step with the CPU backend.
#pragma once

#include <diffuse/cuda/graph.hpp>
#include <diffuse/cuda/trainer.hpp>
#include <diffuse/rng.hpp>
#include <diffuse/unet_config.hpp>

#include "kernels/timestep_embedding.cuh"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::cuda {

class UNetDevice {
 public:
  struct ResBlock {
    GroupNormSpec norm1, norm2;
    ConvSpec conv1, conv2, skip;
    LinearSpec temb_proj;
    bool has_skip = false;
  };
  struct AttnBlock {
    GroupNormSpec norm;
    ConvSpec q, k, v, proj;
  };

  explicit UNetDevice(const UNetConfig& c) : cfg_(c) {
    const std::int64_t ch = c.ch, tdim = 4 * ch, L = static_cast<std::int64_t>(c.ch_mult.size());
    if (L == 0 || c.ch <= 0 || c.num_res_blocks <= 0)
      throw std::invalid_argument("diffuse::cuda::UNetDevice: needs ch, ch_mult, num_res_blocks");
    if (c.resolution % (std::int64_t(1) << (L - 1)) != 0)
      throw std::invalid_argument("diffuse::cuda::UNetDevice: resolution not divisible by 2^(levels - 1)");
    temb0_ = linear("temb.0", ch, tdim);
    temb2_ = linear("temb.2", tdim, tdim);
    conv_in_ = conv("conv_in", c.in_ch, ch, 3, 1, 1);
    if (c.num_classes > 0) class_emb_ = param("class_emb.weight", {c.num_classes + 1, tdim});
    const std::set<std::int64_t> attn_res(c.attn_resolutions.begin(), c.attn_resolutions.end());
    std::int64_t budget = c.attn_only_first ? 1 : std::int64_t(1) << 40;
    auto maybe_attn = [&](std::int64_t cc, std::int64_t r, const std::string& name) {
      if (!attn_res.count(r) || budget <= 0) return false;
      --budget;
      attn_.emplace(name, attn_block(name, cc));
      return true;
    };
    std::vector<std::int64_t> hs{ch};
    std::int64_t cur = ch, r = c.resolution;
    for (std::int64_t i = 0; i < L; ++i) {
      for (std::int64_t j = 0; j < c.num_res_blocks; ++j) {
        const std::string name = "down." + std::to_string(down_.size());
        down_.push_back(res_block(name + ".0", cur, ch * c.ch_mult[static_cast<std::size_t>(i)], tdim));
        cur = ch * c.ch_mult[static_cast<std::size_t>(i)];
        down_attn_.push_back(maybe_attn(cur, r, name + ".1") ? name + ".1" : std::string());
        hs.push_back(cur);
      }
      if (i != L - 1) {
        downsample_.push_back(conv("downsample." + std::to_string(i) + ".conv", cur, cur, 3, 2, 1));
        hs.push_back(cur);
        r /= 2;
      }
    }
    mid1_ = res_block("mid1", cur, cur, tdim);
    if (c.mid_attn) attn_.emplace("mid_attn", attn_block("mid_attn", cur));
    mid2_ = res_block("mid2", cur, cur, tdim);
    for (std::int64_t i = L - 1; i >= 0; --i) {
      for (std::int64_t j = 0; j < c.num_res_blocks + 1; ++j) {
        const std::string name = "up." + std::to_string(up_.size());
        const std::int64_t cin = cur + hs.back();
        hs.pop_back();
        up_.push_back(res_block(name + ".0", cin, ch * c.ch_mult[static_cast<std::size_t>(i)], tdim));
        cur = ch * c.ch_mult[static_cast<std::size_t>(i)];
        up_attn_.push_back(maybe_attn(cur, r, name + ".1") ? name + ".1" : std::string());
      }
      if (i != 0) {
        upsample_.push_back(conv("upsample." + std::to_string(upsample_.size()) + ".conv", cur, cur, 3, 1, 1));
        r *= 2;
      }
    }
    norm_out_ = group_norm("norm_out", cur);
    conv_out_ = conv("conv_out", cur, c.out_ch, 3, 1, 1);
  }

  const UNetConfig& config() const { return cfg_; }
  std::vector<Param>& params() { return params_; }
  std::int64_t num_parameters() const { return count_parameters(params_); }

  // Copies the named CPU tensors (PyTorch layouts, e.g. a CPU UNet's named_parameters() values or
  // a checkpoint) onto the device (load_params in graph.hpp: every parameter, nothing else).
  void load(const std::vector<std::pair<std::string, Tensor<float>>>& named) {
    load_params(
        params_, named, [this](const Param& p) { return cpu_shape(p); },
        [this](const Param& p, const Tensor<float>& t) { return to_device_layout(p, t); },
        "diffuse::cuda::UNetDevice::load");
  }

  // The parameters (or, with which = Grad, their gradients) as CPU tensors in PyTorch layouts,
  // in the model's order.
  enum class Which { Value, Grad };
  std::vector<std::pair<std::string, Tensor<float>>> named_tensors(Which which = Which::Value) const {
    std::vector<std::pair<std::string, Tensor<float>>> out;
    for (const Param& p : params_) out.emplace_back(p.name, to_cpu_layout(p, (which == Which::Value ? p.value : p.grad).cpu()));
    return out;
  }

  // Device tensor of parameter i (device layout) as a CPU tensor in the PyTorch layout, and back.
  Tensor<float> to_cpu_layout(int i, const Tensor<float>& device_tensor) const {
    return to_cpu_layout(params_[static_cast<std::size_t>(i)], device_tensor.cpu());
  }
  Tensor<float> to_device_layout(int i, const Tensor<float>& cpu_tensor) const {
    return to_device_layout(params_[static_cast<std::size_t>(i)], cpu_tensor.cpu());
  }
  // Parameter index by name, or -1.
  int index(const std::string& name) const { return param_index(params_, name); }

  void zero_grad() {
    for (Param& p : params_)
      if (p.grad.numel()) p.grad.copy_from(zeros_like_host(p.grad));
  }

  // Forward on the graph: x [B, res, res, in_ch] (device), t and y device int32 arrays of B
  // (y only for a class-conditional model; labels 0 .. num_classes, num_classes = null). With
  // gen, dropout is on and draws from it in the CPU model's order. The caller checks t and y.
  Act forward(Graph& g, const Tensor<float>& x, const std::int32_t* t, const std::int32_t* y, std::int64_t B,
              Generator* gen) {
    const UNetConfig& c = cfg_;
    const Shape& s = x.shape();
    if (s.size() != 4 || s[0] != B || s[1] != c.resolution || s[2] != c.resolution || s[3] != c.in_ch)
      throw std::invalid_argument("diffuse::cuda::UNetDevice: input " + shape_str(s) + ", expected [" +
                                  std::to_string(B) + ", " + std::to_string(c.resolution) + ", " +
                                  std::to_string(c.resolution) + ", " + std::to_string(c.in_ch) + "]");
    gen_ = gen;
    Act emb = Graph::make({B, c.ch});
    {
      ProfileScope ps(g.profiler(), "timestep embedding");
      kernels::timestep_embedding(t, emb->value.data(), B, c.ch);
    }
    emb->requires_grad = false;
    Act temb = g.linear(g.linear(emb, temb0_, true), temb2_);
    if (c.num_classes > 0) {
      if (!y) throw std::invalid_argument("diffuse::cuda::UNetDevice: class-conditional model needs labels");
      temb = g.add_table_rows(temb, class_emb_, y, c.num_classes + 1);
    }
    const Act temb_act = g.silu(temb);
    std::vector<Act> hs{g.conv2d(Graph::input(x), conv_in_)};
    const std::int64_t L = static_cast<std::int64_t>(c.ch_mult.size());
    std::size_t k = 0;
    for (std::int64_t i = 0; i < L; ++i) {
      for (std::int64_t j = 0; j < c.num_res_blocks; ++j, ++k) {
        Act h = res(g, down_[k], hs.back(), temb_act);
        if (!down_attn_[k].empty()) h = attn(g, attn_.at(down_attn_[k]), h);
        hs.push_back(h);
      }
      if (i != L - 1) hs.push_back(g.conv2d(hs.back(), downsample_[static_cast<std::size_t>(i)]));
    }
    Act h = res(g, mid1_, hs.back(), temb_act);
    if (c.mid_attn) h = attn(g, attn_.at("mid_attn"), h);
    h = res(g, mid2_, h, temb_act);
    k = 0;
    std::size_t u = 0;
    for (std::int64_t i = L - 1; i >= 0; --i) {
      for (std::int64_t j = 0; j < c.num_res_blocks + 1; ++j, ++k) {
        h = res(g, up_[k], g.concat_channels(h, hs.back()), temb_act);
        hs.pop_back();
        if (!up_attn_[k].empty()) h = attn(g, attn_.at(up_attn_[k]), h);
      }
      if (i != 0) h = g.conv2d(g.upsample_nearest2x(h), upsample_[u++]);
    }
    return g.conv2d(g.group_norm(h, norm_out_, true), conv_out_);
  }

 private:
  int param(const std::string& name, Shape shape) { return add_param(params_, name, std::move(shape)); }
  LinearSpec linear(const std::string& name, std::int64_t in, std::int64_t out) {
    LinearSpec l;
    l.in = in;
    l.out = out;
    l.w = param(name + ".weight", {out, in});
    l.b = param(name + ".bias", {out});
    return l;
  }
  ConvSpec conv(const std::string& name, std::int64_t cin, std::int64_t cout, std::int64_t k, std::int64_t stride,
                std::int64_t pad) {
    ConvSpec c;
    c.C = cin;
    c.O = cout;
    c.k = k;
    c.stride = stride;
    c.pad = pad;
    c.w = param(name + ".weight", {cout, k, k, cin});  // device layout [O, kh, kw, C]
    conv_weights_.insert(c.w);
    c.b = param(name + ".bias", {cout});
    return c;
  }
  GroupNormSpec group_norm(const std::string& name, std::int64_t C) {
    GroupNormSpec g;
    g.C = C;
    g.groups = cfg_.groups;
    g.eps = 1e-6f;
    g.w = param(name + ".weight", {C});
    g.b = param(name + ".bias", {C});
    return g;
  }
  ResBlock res_block(const std::string& name, std::int64_t cin, std::int64_t cout, std::int64_t tdim) {
    ResBlock b;
    b.norm1 = group_norm(name + ".norm1", cin);
    b.conv1 = conv(name + ".conv1", cin, cout, 3, 1, 1);
    b.temb_proj = linear(name + ".temb_proj", tdim, cout);
    b.norm2 = group_norm(name + ".norm2", cout);
    b.conv2 = conv(name + ".conv2", cout, cout, 3, 1, 1);
    if (cin != cout) {
      b.skip = conv(name + ".skip", cin, cout, 1, 1, 0);
      b.has_skip = true;
    }
    return b;
  }
  AttnBlock attn_block(const std::string& name, std::int64_t C) {
    AttnBlock a;
    a.norm = group_norm(name + ".norm", C);
    a.q = conv(name + ".q", C, C, 1, 1, 0);
    a.k = conv(name + ".k", C, C, 1, 1, 0);
    a.v = conv(name + ".v", C, C, 1, 1, 0);
    a.proj = conv(name + ".proj", C, C, 1, 1, 0);
    return a;
  }

  // The ResBlock of layers/unet.hpp, op for op.
  Act res(Graph& g, const ResBlock& b, const Act& x, const Act& temb_act) {
    Act h = g.conv2d(g.group_norm(x, b.norm1, true), b.conv1);
    h = g.add_channel_bias(h, g.linear(temb_act, b.temb_proj));
    h = g.group_norm(h, b.norm2, true);
    if (gen_ && cfg_.dropout > 0) {
      const std::uint64_t n = static_cast<std::uint64_t>(h->value.numel());
      const std::uint64_t seed = gen_->seed, off = gen_->advance(n);  // as the CPU dropout draws
      h = g.dropout(h, cfg_.dropout, seed, off);
    }
    h = g.conv2d(h, b.conv2);
    return g.add(b.has_skip ? g.conv2d(x, b.skip) : x, h);
  }
  Act attn(Graph& g, const AttnBlock& a, const Act& x) {
    const Act h = g.group_norm(x, a.norm, false);
    const Act o = g.attention(g.conv2d(h, a.q), g.conv2d(h, a.k), g.conv2d(h, a.v), cfg_.attn_heads);
    return g.add(x, g.conv2d(o, a.proj));
  }

  Shape cpu_shape(const Param& p) const {
    if (!conv_weights_.count(index_of(p))) return p.shape;
    return {p.shape[0], p.shape[3], p.shape[1], p.shape[2]};
  }
  int index_of(const Param& p) const { return static_cast<int>(&p - params_.data()); }
  Tensor<float> to_device_layout(const Param& p, const Tensor<float>& cpu) const {
    if (!conv_weights_.count(index_of(p))) return cpu;
    Tensor<float> out(p.shape);
    conv_weight_oihw_to_ohwi_host(cpu.data(), out.data(), p.shape[0], p.shape[3], p.shape[1], p.shape[2]);
    return out;
  }
  Tensor<float> to_cpu_layout(const Param& p, const Tensor<float>& dev_layout) const {
    if (!conv_weights_.count(index_of(p))) return dev_layout;
    Tensor<float> out(cpu_shape(p));
    conv_weight_ohwi_to_oihw_host(dev_layout.data(), out.data(), p.shape[0], p.shape[3], p.shape[1], p.shape[2]);
    return out;
  }
  static Tensor<float> zeros_like_host(const Tensor<float>& t) { return Tensor<float>::zeros(t.shape()); }

  UNetConfig cfg_;
  std::vector<Param> params_;
  std::set<int> conv_weights_;
  LinearSpec temb0_, temb2_;
  ConvSpec conv_in_;
  int class_emb_ = -1;
  std::vector<ResBlock> down_, up_;
  std::vector<std::string> down_attn_, up_attn_;
  std::map<std::string, AttnBlock> attn_;
  std::vector<ConvSpec> downsample_, upsample_;
  ResBlock mid1_, mid2_;
  GroupNormSpec norm_out_;
  ConvSpec conv_out_;
  Generator* gen_ = nullptr;
};

// The U-Net's trainer (cuda/trainer.hpp), under the names the tools and tests use.
using UNetTrainOptions = DeviceTrainOptions;
using UNetTrainer = DeviceTrainer<UNetDevice>;

}  // namespace diffuse::cuda
