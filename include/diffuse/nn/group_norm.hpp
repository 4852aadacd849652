// GroupNorm: torch.nn.GroupNorm(groups, C, eps) on NHWC activations ("weight" = 1, "bias" = 0 at
// first), with the SiLU after it fused when asked.
#pragma once

#include <stdexcept>
#include <string>

#include <diffuse/nn/module.hpp>
#include <diffuse/ops/group_norm.hpp>
#include <diffuse/ops/group_norm_conv2d.hpp>

namespace diffuse {

template <class T>
class GroupNorm : public Module<T> {
 public:
  GroupNorm(int64_t groups, int64_t channels, double eps = 1e-5) : groups_(groups), eps_(eps) {
    // Refused here, when the model is built, rather than at its first forward pass.
    if (groups <= 0 || channels <= 0 || channels % groups != 0)
      throw std::invalid_argument("diffuse: GroupNorm: " + std::to_string(channels) +
                                  " channels cannot be split into " + std::to_string(groups) + " groups");
    weight = this->register_parameter("weight", Tensor<T>::full({channels}, T(1)));
    bias = this->register_parameter("bias", Tensor<T>::full({channels}, T(0)));
  }
  // silu = true: SiLU(GroupNorm(x)) in one op, as the U-Net uses it.
  Var<T> operator()(const Var<T>& x, bool silu = false) const {
    return group_norm(x, weight, bias, groups_, eps_, silu);
  }
  // Then dropout(., p, gen, true), fused (group_norm_dropout: the same numbers as the two ops).
  Var<T> operator()(const Var<T>& x, bool silu, double p, Generator& gen) const {
    return group_norm_dropout(x, weight, bias, groups_, eps_, silu, p, gen);
  }

  // This normalisation as the input side of a convolution (Conv2d's operator()(x, norm, ...):
  // group_norm_conv2d), with SiLU and dropout(p, *gen) after it (p = 0: none).
  GroupNormArgs<T> args(bool silu, double p = 0.0, Generator* gen = nullptr) const {
    return GroupNormArgs<T>{weight, bias, groups_, eps_, silu, p, gen};
  }

  Var<T> weight, bias;

 private:
  int64_t groups_;
  double eps_;
};

}  // namespace diffuse
