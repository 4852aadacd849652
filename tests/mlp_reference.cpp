// CPU side of the device ToyMLP tests (see mlp_reference.hpp).
#include "mlp_reference.hpp"

#include <diffuse/layers/mlp.hpp>
#include <diffuse/optim.hpp>

#include <random>

namespace diffuse::testing {

namespace {
ToyMLPConfig config_of(const MLPCase& c) {
  return ToyMLPConfig{c.data_dim, c.hidden, c.layers, c.temb_dim, Activation::SiLU};
}
}  // namespace

MLPCase make_mlp_case(std::uint64_t seed, int steps, std::int64_t B) {
  MLPCase c;
  Generator init(seed);
  ToyMLP<float> m(config_of(c), init);
  for (auto& [n, p] : m.named_parameters()) c.weights.emplace_back(n, p.value().clone());
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::uniform_int_distribution<std::int32_t> pt(0, 49);
  for (int s = 0; s < steps; ++s) {
    Tensor<float> x({B, c.data_dim}), e({B, c.data_dim});
    for (float& v : x) v = d(gen);
    for (float& v : e) v = d(gen);
    std::vector<std::int32_t> t(static_cast<std::size_t>(B));
    for (auto& v : t) v = pt(gen);
    c.x.push_back(x);
    c.eps.push_back(e);
    c.t.push_back(t);
  }
  return c;
}

MLPResult cpu_mlp_result(const MLPCase& c) {
  Generator init(1);
  ToyMLP<float> m(config_of(c), init);
  {
    auto params = m.named_parameters();
    for (std::size_t i = 0; i < params.size(); ++i) params[i].second.value().copy_from(c.weights[i].second);
  }
  MLPResult r;
  {
    NoGrad ng;
    r.eps0 = m(Var<float>(c.x[0]), c.t[0]).value().clone();
  }
  AdamOptions ao;
  ao.lr = c.lr;
  ao.weight_decay = c.weight_decay;
  ao.decoupled = true;
  Adam<float> opt(m.named_parameters(), ao);
  EMA<float> ema(m.named_parameters(), c.ema_decay);
  for (std::size_t s = 0; s < c.x.size(); ++s) {
    opt.zero_grad();
    const Var<float> loss = mse(m(Var<float>(c.x[s]), c.t[s]), Var<float>(c.eps[s]));
    backward(loss);
    r.grad_norms.push_back(clip_grad_norm(opt.params(), c.clip));
    opt.step();
    ema.update();
    r.losses.push_back(loss.value()[0]);
  }
  const auto params = m.named_parameters();
  for (std::size_t k = 0; k < params.size(); ++k) {
    r.after.emplace_back(params[k].first, params[k].second.value().clone());
    r.ema_after.emplace_back(params[k].first, ema.shadow()[k].clone());
  }
  return r;
}

}  // namespace diffuse::testing
