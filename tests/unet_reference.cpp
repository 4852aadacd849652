// CPU side of test_cuda_unet (see unet_reference.hpp).
#include "unet_reference.hpp"

#include <diffuse/diffusion.hpp>
#include <diffuse/guidance.hpp>
#include <diffuse/layers/unet.hpp>
#include <diffuse/optim.hpp>

#include <random>

namespace diffuse::testing {

UNetCase make_unet_case(std::uint64_t seed, std::int64_t B) {
  UNetCase k;
  UNetConfig& c = k.config;
  c.in_ch = c.out_ch = 3;
  c.ch = 8;
  c.ch_mult = {1, 2};
  c.num_res_blocks = 1;
  c.attn_resolutions = {4};
  c.groups = 4;
  c.resolution = 8;
  c.mid_attn = true;
  c.num_classes = 3;
  c.dropout = 0.1;
  c.attn_heads = 2;
  Generator init(seed);
  UNet<float> m(c, init);
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (auto& [name, p] : m.named_parameters()) {
    const bool norm = name.find("norm") != std::string::npos, gain = norm && name.find(".weight") != std::string::npos;
    for (float& v : p.value()) v = (gain ? 1.0f : 0.0f) + (norm ? 0.1f : 0.3f) * d(gen);
    k.weights.emplace_back(name, p.value().clone());
  }
  k.x = Tensor<float>({B, c.resolution, c.resolution, c.in_ch});
  k.eps = Tensor<float>(k.x.shape());
  for (float& v : k.x) v = d(gen);
  for (float& v : k.eps) v = d(gen);
  std::uniform_int_distribution<std::int32_t> pt(0, 999), py(0, static_cast<std::int32_t>(c.num_classes));
  for (std::int64_t i = 0; i < B; ++i) {
    k.t.push_back(pt(gen));
    k.y.push_back(py(gen));
  }
  k.dropout_seed = seed ^ 0x5eedu;
  return k;
}

UNetResult cpu_unet_result(const UNetCase& k, int steps) {
  Generator init(1);
  UNet<float> m(k.config, init);
  {
    auto params = m.named_parameters();
    for (size_t i = 0; i < params.size(); ++i) params[i].second.value().copy_from(k.weights[i].second);
  }
  UNetResult r;
  Generator g(k.dropout_seed);
  {
    const Var<float> out = m(Var<float>(k.x), k.t, &k.y, &g);
    const Var<float> loss = mse(out, Var<float>(k.eps));
    backward(loss);
    r.out = out.value().clone();
    r.loss = loss.value()[0];
    for (auto& [n, p] : m.named_parameters()) r.grads.emplace_back(n, p.grad().clone());
  }
  AdamOptions ao;
  ao.lr = 2e-3;
  ao.weight_decay = 0.01;
  ao.decoupled = true;
  Adam<float> opt(m.named_parameters(), ao);
  EMA<float> ema(m.named_parameters(), 0.99);
  for (int s = 0; s < steps; ++s) {
    opt.zero_grad();
    const Var<float> loss = mse(m(Var<float>(k.x), k.t, &k.y, &g), Var<float>(k.eps));
    backward(loss);
    clip_grad_norm(opt.params(), 0.5);
    opt.step();
    ema.update();
    r.losses.push_back(loss.value()[0]);
  }
  for (auto& [n, p] : m.named_parameters()) r.after.emplace_back(n, p.value().clone());
  return r;
}

Tensor<float> cpu_ddpm_sample(const UNetCase& k, const std::vector<std::int32_t>& labels, double w, bool clip_x0,
                              int T, std::uint64_t seed) {
  Generator init(1);
  UNet<float> m(k.config, init);
  auto params = m.named_parameters();
  for (size_t i = 0; i < params.size(); ++i) params[i].second.value().copy_from(k.weights[i].second);
  const ClassEpsModel<float> f = [&](const Tensor<float>& x, const std::vector<int32_t>& t,
                                     const std::vector<int32_t>& y) { return m(Var<float>(x), t, &y).value(); };
  SampleOptions so;
  so.clip_x0 = clip_x0;
  Generator g(seed);
  const std::int64_t n = static_cast<std::int64_t>(labels.size());
  return ddpm_sample<float>(NoiseSchedule::cosine(T),
                            guided_eps_model<float>(f, labels, static_cast<int32_t>(k.config.num_classes), w),
                            {n, k.config.resolution, k.config.resolution, k.config.in_ch}, g, so);
}

}  // namespace diffuse::testing
