// UNetConfig: the DDPM U-Net's hyper-parameters and the reference's configurations. Its own
// header (no Eigen, no autograd) so that the CPU model (models/unet.hpp) and the CUDA model
// (cuda/unet.hpp, compiled by nvcc) share it.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace diffuse {

struct UNetConfig {
  int64_t in_ch = 1, out_ch = 1, ch = 32;
  std::vector<int64_t> ch_mult{1, 2, 2};
  int64_t num_res_blocks = 2;
  std::vector<int64_t> attn_resolutions;  // resolutions (e.g. 16) whose blocks get attention
  double dropout = 0.0;
  int64_t groups = 8;
  int64_t resolution = 16;
  bool mid_attn = true;
  bool attn_only_first = false;  // at most one attention block in the down/up path (the reference's "one8")
  int64_t num_classes = 0;       // > 0: class-conditional, embedding row num_classes is the "null" class
  int64_t attn_heads = 1;

  // The reference's configurations.
  static UNetConfig mnist16(const std::string& attn = "none") {
    UNetConfig c;
    c.mid_attn = false;
    if (attn == "one8" || attn == "ho8") c.attn_resolutions = {8};
    else if (attn != "none") throw std::invalid_argument("diffuse: mnist16 attention '" + attn + "' (none, one8, ho8)");
    c.attn_only_first = attn == "one8";
    return c;
  }
  static UNetConfig cifar10() {
    UNetConfig c;
    c.in_ch = c.out_ch = 3;
    c.ch = 128;
    c.ch_mult = {1, 2, 2, 2};
    c.attn_resolutions = {16};
    c.dropout = 0.1;
    c.groups = 32;
    c.resolution = 32;
    c.mid_attn = true;
    return c;
  }
};

}  // namespace diffuse
