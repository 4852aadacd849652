// ToyMLP: the 2-D epsilon model of the PyTorch reference, an MLP on [x, timestep embedding].
#pragma once

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/nn/mlp.hpp>
#include <diffuse/nn/timestep_embedding.hpp>
#include <diffuse/ops/shape.hpp>

namespace diffuse {

struct ToyMLPConfig {
  int64_t data_dim = 2;
  int64_t hidden = 128;
  int64_t layers = 3;  // hidden layers
  int64_t temb_dim = 128;
  Activation act = Activation::SiLU;
};

// The 2-D epsilon model of the PyTorch reference (ToyMLP):
//   net(concat(x, timestep_embedding(t, temb_dim)))
// Parameter names match it ("net.0.weight" ... "net.6.bias").
//
// Speed: the first layer acts on concat(x, e(t)), and e(t) takes at most T
// values. So W [x | e] = W_x x + W_e e(t): W_e e is computed once per distinct
// timestep in the batch (about T rows instead of B) and gathered. Same
// function, fewer operations; `split_first_layer = false` runs the literal concat.
template <class T>
class ToyMLP : public Module<T> {
 public:
  ToyMLP(const ToyMLPConfig& c, Generator& g) : cfg_(c), net_(widths(c), c.act, g) {
    this->register_module("net", net_);
  }

  Var<T> operator()(const Var<T>& x, const std::vector<int32_t>& t) const {
    if (x.value().dim() != 2 || x.size(1) != cfg_.data_dim || x.size(0) != static_cast<int64_t>(t.size()))
      throw std::invalid_argument("diffuse: ToyMLP input " + shape_str(x.shape()) + " with " +
                                  std::to_string(t.size()) + " timesteps");
    if (!split_first_layer) {
      Var<T> e(timestep_embedding<T>(t, cfg_.temb_dim, x.device()));
      return net_(concat<T>({x, e}, 1));
    }
    std::vector<int32_t> uniq(t);
    std::sort(uniq.begin(), uniq.end());
    uniq.erase(std::unique(uniq.begin(), uniq.end()), uniq.end());
    std::vector<int32_t> pos(t.size());
    for (size_t i = 0; i < t.size(); ++i)
      pos[i] = static_cast<int32_t>(std::lower_bound(uniq.begin(), uniq.end(), t[i]) - uniq.begin());
    const Linear<T>& l0 = net_.layer(0);
    const int64_t D = cfg_.data_dim, E = cfg_.temb_dim;
    Var<T> wx = slice(l0.weight, 1, 0, D), we = slice(l0.weight, 1, D, D + E);
    Var<T> e(timestep_embedding<T>(uniq, E, x.device()));
    // act(W_x x + b + (W_e e)[pos]) as one fused op.
    return net_.forward_from(linear_gather_act(x, wx, l0.bias, linear(e, we), pos, cfg_.act), 1);
  }

  const ToyMLPConfig& config() const { return cfg_; }
  bool split_first_layer = true;

 private:
  static std::vector<int64_t> widths(const ToyMLPConfig& c) {
    std::vector<int64_t> w{c.data_dim + c.temb_dim};
    for (int64_t i = 0; i < c.layers; ++i) w.push_back(c.hidden);
    w.push_back(c.data_dim);
    return w;
  }
  ToyMLPConfig cfg_;
  MLP<T> net_;
};

}  // namespace diffuse
