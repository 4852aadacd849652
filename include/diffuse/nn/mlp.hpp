// MLP: Linear, act, Linear, act, ..., Linear, named as torch.nn.Sequential names them.
#pragma once

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include <diffuse/nn/linear.hpp>

namespace diffuse {

inline Activation parse_activation(const std::string& s) {
  if (s == "silu") return Activation::SiLU;
  if (s == "relu") return Activation::ReLU;
  if (s == "gelu") return Activation::GELU;
  throw std::invalid_argument("diffuse: unknown activation '" + s + "' (silu, relu, gelu)");
}

// Linear layers named as in torch.nn.Sequential with the activations between
// them: "0", "2", "4", ... (the activations hold the odd indices).
template <class T>
class MLP : public Module<T> {
 public:
  MLP(const std::vector<int64_t>& widths, Activation act, Generator& g) : act_(act) {
    if (widths.size() < 2) throw std::invalid_argument("diffuse: MLP needs at least an input and output width");
    for (size_t i = 0; i + 1 < widths.size(); ++i) {
      layers_.push_back(std::make_unique<Linear<T>>(widths[i], widths[i + 1], g));
      this->register_module(std::to_string(2 * i), layers_.back());
    }
  }
  Var<T> operator()(Var<T> h) const { return forward_from(std::move(h), 0); }
  // Runs layers [first, end): lets a caller compute the first layers its own way
  // (then `h` is layer first-1's output after its activation). Hidden layers use
  // the fused linear_act.
  Var<T> forward_from(Var<T> h, size_t first) const {
    for (size_t i = first; i < layers_.size(); ++i) {
      const Linear<T>& l = *layers_[i];
      const bool last = i + 1 == layers_.size();
      h = (last || !l.bias.defined()) ? l(h) : linear_act(h, l.weight, l.bias, act_);
      if (!last && !l.bias.defined()) h = activate(h, act_);  // linear_act needs a bias
    }
    return h;
  }
  const Linear<T>& layer(size_t i) const { return *layers_.at(i); }
  size_t depth() const { return layers_.size(); }
  Activation activation() const { return act_; }

 private:
  Activation act_;
  std::vector<std::unique_ptr<Linear<T>>> layers_;
};

}  // namespace diffuse
