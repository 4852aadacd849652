// CPU references for the Adam(W) + EMA and gradient-norm kernels (see kernel_reference_adam.hpp).
#include "kernel_reference_adam.hpp"

#include <diffuse/optim/adam.hpp>
#include <diffuse/optim/clip_grad_norm.hpp>
#include <diffuse/optim/ema.hpp>

#include <string>

namespace diffuse::testing {

AdamState cpu_adam_ema(const AdamState& s, double lr, double beta1, double beta2, double eps, double weight_decay,
                       bool decoupled, std::int64_t t, double ema_decay) {
  NamedParams<float> params;
  for (size_t k = 0; k < s.p.size(); ++k) {
    const int64_t n = static_cast<int64_t>(s.p[k].size());
    Var<float> p(Tensor<float>::from(s.p[k], {n}), true);
    p.node()->grad = Tensor<float>::from(s.g[k], {n});
    p.node()->has_grad = true;
    std::string name = std::to_string(k);  // not "p" + ...: g++ 12 warns falsely (-Wrestrict) on that
    params.emplace_back(name, p);
  }
  AdamOptions o;
  o.lr = lr;
  o.beta1 = beta1;
  o.beta2 = beta2;
  o.eps = eps;
  o.weight_decay = weight_decay;
  o.decoupled = decoupled;
  Adam<float> adam(params, o);
  for (size_t k = 0; k < s.p.size(); ++k) {
    const int64_t n = static_cast<int64_t>(s.p[k].size());
    adam.first_moments()[k] = Tensor<float>::from(s.m[k], {n});
    adam.second_moments()[k] = Tensor<float>::from(s.v[k], {n});
  }
  adam.set_steps(t - 1);
  adam.step();
  EMA<float> ema(params, ema_decay, false);
  for (size_t k = 0; k < s.p.size(); ++k)
    ema.shadow()[k] = Tensor<float>::from(s.ema[k], {static_cast<int64_t>(s.ema[k].size())});
  ema.update();
  AdamState out = s;
  for (size_t k = 0; k < s.p.size(); ++k) {
    const Tensor<float>& p = params[k].second.value();
    out.p[k].assign(p.begin(), p.end());
    out.m[k].assign(adam.first_moments()[k].begin(), adam.first_moments()[k].end());
    out.v[k].assign(adam.second_moments()[k].begin(), adam.second_moments()[k].end());
    out.ema[k].assign(ema.shadow()[k].begin(), ema.shadow()[k].end());
  }
  return out;
}

double cpu_clip_grad_norm(std::vector<std::vector<float>>& g, double max_norm) {
  NamedParams<float> params;
  for (size_t k = 0; k < g.size(); ++k) {
    const int64_t n = static_cast<int64_t>(g[k].size());
    Var<float> p(Tensor<float>({n}), true);
    p.node()->grad = Tensor<float>::from(g[k], {n});
    p.node()->has_grad = true;
    params.emplace_back(std::to_string(k), p);
  }
  const double norm = clip_grad_norm(params, max_norm);
  for (size_t k = 0; k < g.size(); ++k) {
    const Tensor<float>& gk = params[k].second.node()->grad;
    g[k].assign(gk.begin(), gk.end());
  }
  return norm;
}

}  // namespace diffuse::testing
