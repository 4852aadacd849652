// The DDPM U-Net of Ho et al. 2020, as the project's PyTorch reference defines
// it (../shared/reference/torch_reference.py, class UNet), on NHWC images.
// Parameter names follow the reference's module names ("down.3.0.conv1.weight",
// "mid_attn.q.bias", ...), so weights move between the two through safetensors.
//
// Same function as the reference, with fewer passes: SiLU(temb) is computed
// once and shared by every ResBlock (the reference recomputes it per block),
// and each GroupNorm that feeds a SiLU runs fused with it. One class for every
// device: after unet.to(Device::CUDA) the same forward runs on the GPU.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/nn/module.hpp>
#include <diffuse/ops/elementwise.hpp>
#include <diffuse/ops/linear.hpp>
#include <diffuse/ops/shape.hpp>
#include <diffuse/ops/attention.hpp>
#include <diffuse/ops/attention_block.hpp>
#include <diffuse/ops/res_block.hpp>
#include <diffuse/ops/conv2d.hpp>
#include <diffuse/ops/channel_bias.hpp>
#include <diffuse/ops/dropout.hpp>
#include <diffuse/ops/group_norm.hpp>
#include <diffuse/ops/nhwc.hpp>
#include <diffuse/ops/upsample.hpp>
#include <diffuse/nn/conv2d.hpp>
#include <diffuse/nn/group_norm.hpp>
#include <diffuse/nn/linear.hpp>
#include <diffuse/nn/timestep_embedding.hpp>
#include <diffuse/models/unet_config.hpp>

namespace diffuse {

// The configuration as JSON (checkpoint metadata), and back; every field is
// written, and reading requires every field, so a checkpoint names its model fully.
inline nlohmann::json unet_config_to_json(const UNetConfig& c) {
  return {{"in_ch", c.in_ch},           {"out_ch", c.out_ch},         {"ch", c.ch},
          {"ch_mult", c.ch_mult},       {"num_res_blocks", c.num_res_blocks},
          {"attn_resolutions", c.attn_resolutions}, {"dropout", c.dropout}, {"groups", c.groups},
          {"resolution", c.resolution}, {"mid_attn", c.mid_attn},     {"attn_only_first", c.attn_only_first},
          {"num_classes", c.num_classes}, {"attn_heads", c.attn_heads}};
}
inline UNetConfig unet_config_from_json(const nlohmann::json& j) {
  UNetConfig c;
  try {
    j.at("in_ch").get_to(c.in_ch);
    j.at("out_ch").get_to(c.out_ch);
    j.at("ch").get_to(c.ch);
    j.at("ch_mult").get_to(c.ch_mult);
    j.at("num_res_blocks").get_to(c.num_res_blocks);
    j.at("attn_resolutions").get_to(c.attn_resolutions);
    j.at("dropout").get_to(c.dropout);
    j.at("groups").get_to(c.groups);
    j.at("resolution").get_to(c.resolution);
    j.at("mid_attn").get_to(c.mid_attn);
    j.at("attn_only_first").get_to(c.attn_only_first);
    j.at("num_classes").get_to(c.num_classes);
    j.at("attn_heads").get_to(c.attn_heads);
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument(std::string("diffuse: U-Net configuration JSON: ") + e.what());
  }
  return c;
}

template <class T>
class ResBlock : public Module<T> {
 public:
  ResBlock(int64_t cin, int64_t cout, int64_t temb_dim, int64_t groups, double dropout, Generator& g)
      : norm1(groups, cin, 1e-6),
        conv1(cin, cout, 3, g, 1, 1),
        temb_proj(temb_dim, cout, g),
        norm2(groups, cout, 1e-6),
        conv2(cout, cout, 3, g, 1, 1),
        dropout_(dropout) {
    conv2.zero_();
    this->register_module("norm1", norm1);
    this->register_module("conv1", conv1);
    this->register_module("temb_proj", temb_proj);
    this->register_module("norm2", norm2);
    this->register_module("conv2", conv2);
    if (cin != cout) {
      skip = std::make_unique<Conv2d<T>>(cin, cout, 1, g);
      this->register_module("skip", skip);
    }
  }
  // temb_act = SiLU(temb), shared by all blocks. rng: dropout on when given.
  // The reference's h = conv1(silu(norm1(x))) + temb_proj(temb)[:, :, None, None];
  // h = conv2(dropout(silu(norm2(h)))); return skip(x) + h: one op (ops/res_block.hpp: the time
  // embedding and the skip connection added in the convolutions' epilogues, each norm + SiLU
  // (+ dropout) fused with the convolution after it; under bf16 on the device h is bf16 only).
  // x given as its parts along the channels (the up path's concat(h, skip): under bf16 on the
  // device written once into a bf16 x, no float concatenation).
  Var<T> operator()(const std::vector<Var<T>>& x, const Var<T>& temb_act, Generator* rng) const {
    const bool drop = rng && dropout_ > 0;
    return res_block(x, ResBlockParams<T>{norm1.args(true), conv1.weight, conv1.bias, conv1.options(), temb_proj(temb_act),
                                          norm2.args(true, drop ? dropout_ : 0.0, drop ? rng : nullptr), conv2.weight,
                                          conv2.bias, conv2.options(), skip ? skip->weight : Var<T>(),
                                          skip ? skip->bias : Var<T>()});
  }
  Var<T> operator()(const Var<T>& x, const Var<T>& temb_act, Generator* rng) const {
    return (*this)(std::vector<Var<T>>{x}, temb_act, rng);
  }

  GroupNorm<T> norm1;
  Conv2d<T> conv1;
  Linear<T> temb_proj;
  GroupNorm<T> norm2;
  Conv2d<T> conv2;
  std::unique_ptr<Conv2d<T>> skip;

 private:
  double dropout_;
};

template <class T>
class AttnBlock : public Module<T> {
 public:
  AttnBlock(int64_t c, int64_t groups, int64_t heads, Generator& g)
      : norm(groups, c, 1e-6), q(c, c, 1, g), k(c, c, 1, g), v(c, c, 1, g), proj(c, c, 1, g), heads_(heads) {
    if (heads < 1 || c % heads != 0)
      throw std::invalid_argument("diffuse: UNet attention: " + std::to_string(heads) + " heads do not divide " +
                                  std::to_string(c) + " channels");
    proj.zero_();
    this->register_module("norm", norm);
    this->register_module("q", q);
    this->register_module("k", k);
    this->register_module("v", v);
    this->register_module("proj", proj);
  }
  // x + proj(attention(q(h), k(h), v(h))), h = norm(x): one op (ops/attention_block.hpp; under bf16
  // on the device with the flash kernels every activation inside it is bf16), the same numbers as
  // the layers one by one elsewhere.
  Var<T> operator()(const Var<T>& x) const {
    return attention_block(x, norm.args(false),
                           AttentionBlockParams<T>{q.weight, q.bias, k.weight, k.bias, v.weight, v.bias, proj.weight,
                                                   proj.bias},
                           static_cast<int>(heads_));
  }

  GroupNorm<T> norm;
  Conv2d<T> q, k, v, proj;

 private:
  int64_t heads_;
};

template <class T>
class UNet : public Module<T> {
 public:
  UNet(const UNetConfig& c, Generator& g) : cfg_(c) {
    const int64_t ch = c.ch, tdim = 4 * ch, L = static_cast<int64_t>(c.ch_mult.size());
    if (L == 0 || c.ch <= 0 || c.num_res_blocks <= 0) throw std::invalid_argument("diffuse: UNet needs ch, ch_mult, num_res_blocks");
    if (c.num_classes < 0) throw std::invalid_argument("diffuse: UNet num_classes " + std::to_string(c.num_classes) + " < 0");
    if (!(c.dropout >= 0 && c.dropout < 1))
      throw std::invalid_argument("diffuse: UNet dropout " + std::to_string(c.dropout) + " outside [0, 1)");
    if (c.resolution % (int64_t(1) << (L - 1)) != 0)
      throw std::invalid_argument("diffuse: UNet resolution " + std::to_string(c.resolution) + " is not divisible by 2^" +
                                  std::to_string(L - 1));
    temb0_ = std::make_unique<Linear<T>>(ch, tdim, g);
    temb2_ = std::make_unique<Linear<T>>(tdim, tdim, g);
    this->register_module("temb.0", temb0_);
    this->register_module("temb.2", temb2_);
    conv_in_ = std::make_unique<Conv2d<T>>(c.in_ch, ch, 3, g, 1, 1);
    this->register_module("conv_in", conv_in_);
    if (c.num_classes > 0) {
      // Embedding rows are N(0, 1), as nn.Embedding; the last row is the null class.
      class_emb_ = this->register_parameter("class_emb.weight", Tensor<T>::randn({c.num_classes + 1, tdim}, g));
    }
    const std::set<int64_t> attn_res(c.attn_resolutions.begin(), c.attn_resolutions.end());
    int64_t budget = c.attn_only_first ? 1 : int64_t(1) << 40;
    auto maybe_attn = [&](int64_t cc, int64_t r, const std::string& name) -> std::unique_ptr<AttnBlock<T>> {
      if (!attn_res.count(r) || budget <= 0) return nullptr;
      --budget;
      auto a = std::make_unique<AttnBlock<T>>(cc, c.groups, c.attn_heads, g);
      this->register_module(name, a);
      return a;
    };
    std::vector<int64_t> hs{ch};
    int64_t cur = ch, r = c.resolution;
    for (int64_t i = 0; i < L; ++i) {
      for (int64_t j = 0; j < c.num_res_blocks; ++j) {
        const std::string name = "down." + std::to_string(down_.size());
        down_.push_back(std::make_unique<ResBlock<T>>(cur, ch * c.ch_mult[i], tdim, c.groups, c.dropout, g));
        this->register_module(name + ".0", down_.back());
        cur = ch * c.ch_mult[i];
        down_attn_.push_back(maybe_attn(cur, r, name + ".1"));
        hs.push_back(cur);
      }
      if (i != L - 1) {
        downsample_.push_back(std::make_unique<Conv2d<T>>(cur, cur, 3, g, 2, 1));
        this->register_module("downsample." + std::to_string(i) + ".conv", downsample_.back());
        hs.push_back(cur);
        r /= 2;
      }
    }
    mid1_ = std::make_unique<ResBlock<T>>(cur, cur, tdim, c.groups, c.dropout, g);
    this->register_module("mid1", mid1_);
    if (c.mid_attn) {
      mid_attn_ = std::make_unique<AttnBlock<T>>(cur, c.groups, c.attn_heads, g);
      this->register_module("mid_attn", mid_attn_);
    }
    mid2_ = std::make_unique<ResBlock<T>>(cur, cur, tdim, c.groups, c.dropout, g);
    this->register_module("mid2", mid2_);
    for (int64_t i = L - 1; i >= 0; --i) {
      for (int64_t j = 0; j < c.num_res_blocks + 1; ++j) {
        const std::string name = "up." + std::to_string(up_.size());
        const int64_t cin = cur + hs.back();
        hs.pop_back();
        up_.push_back(std::make_unique<ResBlock<T>>(cin, ch * c.ch_mult[i], tdim, c.groups, c.dropout, g));
        this->register_module(name + ".0", up_.back());
        cur = ch * c.ch_mult[i];
        up_attn_.push_back(maybe_attn(cur, r, name + ".1"));
      }
      if (i != 0) {
        upsample_.push_back(std::make_unique<Conv2d<T>>(cur, cur, 3, g, 1, 1));
        this->register_module("upsample." + std::to_string(upsample_.size() - 1) + ".conv", upsample_.back());
        r *= 2;
      }
    }
    norm_out_ = std::make_unique<GroupNorm<T>>(c.groups, cur, 1e-6);
    conv_out_ = std::make_unique<Conv2d<T>>(cur, c.out_ch, 3, g, 1, 1);
    conv_out_->zero_();
    this->register_module("norm_out", norm_out_);
    this->register_module("conv_out", conv_out_);
  }

  // x: NHWC [B, res, res, in_ch]; t: B timesteps; y: B class labels (0 ..
  // num_classes, num_classes = null) for a class-conditional model; rng: turns
  // dropout on (training) when given.
  Var<T> operator()(const Var<T>& x, const std::vector<int32_t>& t, const std::vector<int32_t>* y = nullptr,
                    Generator* rng = nullptr) const {
    const UNetConfig& c = cfg_;
    if (x.value().dim() != 4 || x.size(1) != c.resolution || x.size(2) != c.resolution || x.size(3) != c.in_ch ||
        x.size(0) != static_cast<int64_t>(t.size()))
      throw std::invalid_argument("diffuse: UNet input " + shape_str(x.shape()) + " with " + std::to_string(t.size()) +
                                  " timesteps; expected [B, " + std::to_string(c.resolution) + ", " +
                                  std::to_string(c.resolution) + ", " + std::to_string(c.in_ch) + "]");
    Var<T> temb = linear(linear_act(Var<T>(timestep_embedding<T>(t, c.ch, x.device())), temb0_->weight, temb0_->bias,
                                    Activation::SiLU),
                         temb2_->weight, temb2_->bias);
    if (c.num_classes > 0) {
      if (!y || y->size() != t.size())
        throw std::invalid_argument("diffuse: class-conditional UNet needs one label per image");
      for (int32_t v : *y)
        if (v < 0 || v > c.num_classes)
          throw std::invalid_argument("diffuse: class label " + std::to_string(v) + " outside 0.." +
                                      std::to_string(c.num_classes));
      temb = add(temb, gather_rows(class_emb_, *y));
    }
    const Var<T> temb_act = silu(temb);
    std::vector<Var<T>> hs{(*conv_in_)(x)};
    const int64_t L = static_cast<int64_t>(c.ch_mult.size());
    size_t k = 0;
    for (int64_t i = 0; i < L; ++i) {
      for (int64_t j = 0; j < c.num_res_blocks; ++j, ++k) {
        Var<T> h = (*down_[k])(hs.back(), temb_act, rng);
        if (down_attn_[k]) h = (*down_attn_[k])(h);
        hs.push_back(h);
      }
      if (i != L - 1) hs.push_back((*downsample_[static_cast<size_t>(i)])(hs.back()));
    }
    Var<T> h = (*mid1_)(hs.back(), temb_act, rng);
    if (mid_attn_) h = (*mid_attn_)(h);
    h = (*mid2_)(h, temb_act, rng);
    k = 0;
    size_t u = 0;
    for (int64_t i = L - 1; i >= 0; --i) {
      for (int64_t j = 0; j < c.num_res_blocks + 1; ++j, ++k) {
        h = (*up_[k])(std::vector<Var<T>>{h, hs.back()}, temb_act, rng);  // concat(h, skip) inside
        hs.pop_back();
        if (up_attn_[k]) h = (*up_attn_[k])(h);
      }
      if (i != 0) h = (*upsample_[u++])(upsample_nearest2x(h));
    }
    return (*conv_out_)(h, norm_out_->args(true), Var<T>(), Var<T>());
  }

  const UNetConfig& config() const { return cfg_; }

 private:
  UNetConfig cfg_;
  std::unique_ptr<Linear<T>> temb0_, temb2_;
  std::unique_ptr<Conv2d<T>> conv_in_;
  Var<T> class_emb_;
  std::vector<std::unique_ptr<ResBlock<T>>> down_, up_;
  std::vector<std::unique_ptr<AttnBlock<T>>> down_attn_, up_attn_;
  std::vector<std::unique_ptr<Conv2d<T>>> downsample_, upsample_;
  std::unique_ptr<ResBlock<T>> mid1_, mid2_;
  std::unique_ptr<AttnBlock<T>> mid_attn_;
  std::unique_ptr<GroupNorm<T>> norm_out_;
  std::unique_ptr<Conv2d<T>> conv_out_;
};

}  // namespace diffuse
