// LeNet<T>: a small CNN classifier for 1-channel images (MNIST at 16x16 or
// 28x28), used to judge generated digits: its predicted class, and its
// penultimate 128-d activations as the feature space of FD-LeNet
// (include/diffuse/eval/lenet_score.hpp), as Inception's pool features are for FID.
//
// Input NHWC [N, S, S, 1], pixels scaled to [-1, 1] (uint8 / 255 * 2 - 1), S
// divisible by 4 (16 and 28 are the sizes it is trained at). Layers and
// parameter names (PyTorch layout: conv weight [O, C, 3, 3], linear [out, in]):
//
//   conv1  3x3 pad 1, 1 -> c1   ReLU      "conv1.weight" [c1,1,3,3], "conv1.bias" [c1]
//   conv2  3x3 pad 1, c1 -> c1  ReLU      "conv2.weight", "conv2.bias"
//   max pool 2x2                          S -> S/2
//   conv3  3x3 pad 1, c1 -> c2  ReLU      "conv3.weight", "conv3.bias"
//   conv4  3x3 pad 1, c2 -> c2  ReLU      "conv4.weight", "conv4.bias"
//   max pool 2x2                          S/2 -> S/4
//   flatten in NHWC order: feature index (h * S/4 + w) * c2 + c
//   fc1    linear (S/4)^2 c2 -> hidden, ReLU     "fc1.weight", "fc1.bias"   <- features()
//   fc2    linear hidden -> classes               "fc2.weight", "fc2.bias"   <- logits()
//
// Defaults c1 = 64, c2 = 128, hidden = 128, classes = 10: 522,570 parameters
// at S = 16 (a 2,048-wide flatten), 1,063,242 at S = 28 (6,272). Twice the
// classic 32/64 widths: on the 8,000/2,000 MNIST split at 16x16 (15 epochs,
// 1-pixel shifts) 32/64 gave 98.4-98.6% test accuracy, 64/128 98.65-98.9%.
// A PyTorch twin must flatten with x.permute(0, 2, 3, 1).flatten(1) to use
// these fc1 weights.
// No dropout or batch norm: the forward is the same in training and evaluation.
#pragma once

#include <memory>
#include <stdexcept>
#include <string>

#include <diffuse/nn/module.hpp>
#include <diffuse/ops/elementwise.hpp>
#include <diffuse/ops/linear.hpp>
#include <diffuse/ops/shape.hpp>
#include <diffuse/ops/conv2d.hpp>
#include <diffuse/ops/pool.hpp>
#include <diffuse/nn/conv2d.hpp>
#include <diffuse/nn/linear.hpp>

namespace diffuse {

struct LeNetConfig {
  int64_t size = 16;     // input height = width, divisible by 4
  int64_t c1 = 64, c2 = 128;  // conv1/conv2 and conv3/conv4 channels
  int64_t hidden = 128;  // width of the penultimate features
  int64_t classes = 10;
  // The number of parameters (in double: a file's claim is checked with it before anything is made).
  double parameters() const {
    const double q = static_cast<double>(size / 4), a = static_cast<double>(c1), b = static_cast<double>(c2),
                 h = static_cast<double>(hidden), k = static_cast<double>(classes);
    return (9 * a + a) + (9 * a * a + a) + (9 * a * b + b) + (9 * b * b + b) + (q * q * b * h + h) + (h * k + k);
  }
};

template <class T>
class LeNet : public Module<T> {
 public:
  LeNet(const LeNetConfig& c, Generator& g) : cfg_(c) {
    if (c.size < 4 || c.size % 4 != 0 || c.c1 < 1 || c.c2 < 1 || c.hidden < 1 || c.classes < 2)
      throw std::invalid_argument("LeNet: image size must be a positive multiple of 4 (16, 28) and widths positive; got size " +
                                  std::to_string(c.size));
    const int64_t q = c.size / 4;
    conv1_ = std::make_unique<Conv2d<T>>(1, c.c1, 3, g, 1, 1);
    conv2_ = std::make_unique<Conv2d<T>>(c.c1, c.c1, 3, g, 1, 1);
    conv3_ = std::make_unique<Conv2d<T>>(c.c1, c.c2, 3, g, 1, 1);
    conv4_ = std::make_unique<Conv2d<T>>(c.c2, c.c2, 3, g, 1, 1);
    fc1_ = std::make_unique<Linear<T>>(q * q * c.c2, c.hidden, g);
    fc2_ = std::make_unique<Linear<T>>(c.hidden, c.classes, g);
    this->register_module("conv1", conv1_);
    this->register_module("conv2", conv2_);
    this->register_module("conv3", conv3_);
    this->register_module("conv4", conv4_);
    this->register_module("fc1", fc1_);
    this->register_module("fc2", fc2_);
  }
  // LeNet for size x size images with the default widths.
  LeNet(int64_t size, Generator& g) : LeNet(LeNetConfig{size}, g) {}

  // The penultimate activations ReLU(fc1(...)): [N, hidden].
  Var<T> features(const Var<T>& x) const {
    const Shape& s = x.shape();
    if (s.size() != 4 || s[1] != cfg_.size || s[2] != cfg_.size || s[3] != 1)
      throw std::invalid_argument("LeNet: expected images [N, " + std::to_string(cfg_.size) + ", " +
                                  std::to_string(cfg_.size) + ", 1] (NHWC), got " + shape_str(s));
    Var<T> h = relu((*conv1_)(x));
    h = max_pool2d(relu((*conv2_)(h)), 2);
    h = relu((*conv3_)(h));
    h = max_pool2d(relu((*conv4_)(h)), 2);
    h = reshape(h, {s[0], h.value().numel() / std::max<int64_t>(s[0], 1)});
    return linear_act(h, fc1_->weight, fc1_->bias, Activation::ReLU);
  }
  // Class scores before softmax: [N, classes].
  Var<T> logits(const Var<T>& x) const { return logits_from_features(features(x)); }
  // fc2 on features(x), for callers that need both without a second forward.
  Var<T> logits_from_features(const Var<T>& f) const { return (*fc2_)(f); }

  const LeNetConfig& config() const { return cfg_; }
  int64_t size() const { return cfg_.size; }

 private:
  LeNetConfig cfg_;
  std::unique_ptr<Conv2d<T>> conv1_, conv2_, conv3_, conv4_;
  std::unique_ptr<Linear<T>> fc1_, fc2_;
};

}  // namespace diffuse
