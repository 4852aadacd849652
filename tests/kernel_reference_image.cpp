// CPU references for the image kernel cases (see kernel_reference_image.hpp).
#include "kernel_reference_image.hpp"

#include <diffuse/diffusion/objectives.hpp>
#include <diffuse/diffusion/q_sample.hpp>
#include <diffuse/diffusion/samplers.hpp>
#include <diffuse/diffusion/guidance.hpp>
#include <diffuse/nn/timestep_embedding.hpp>
#include <diffuse/ops/shape.hpp>
#include <diffuse/ops/channel_bias.hpp>
#include <diffuse/ops/dropout.hpp>
#include <diffuse/ops/group_norm.hpp>
#include <diffuse/ops/nhwc.hpp>
#include <diffuse/ops/upsample.hpp>
#include <diffuse/diffusion/schedule.hpp>

#include <random>
#include <stdexcept>

namespace diffuse::testing {

namespace {

std::vector<float> vec(const Tensor<float>& t) { return std::vector<float>(t.begin(), t.end()); }

// A leaf of the given values that requires grad; with prefill, its gradient already holds those
// values, so the op's backward adds to them (GradSink::accumulate).
Var<float> leaf(const std::vector<float>& v, const Shape& s, const std::vector<float>* prefill) {
  Var<float> x(Tensor<float>::from(v, s), true);
  if (prefill) {
    x.node()->grad = Tensor<float>::from(*prefill, s);
    x.node()->has_grad = true;
  }
  return x;
}

// Runs the tape from y with the upstream gradient dy.
void run_backward(const Var<float>& y, const std::vector<float>& dy) {
  const Tensor<float> g = Tensor<float>::from(dy, y.shape());
  Tape<float>::current().backward(y, &g);
}

}  // namespace

std::vector<float> cpu_upsample_nearest2x(const std::vector<float>& x, std::int64_t N, std::int64_t H, std::int64_t W,
                                          std::int64_t C) {
  NoGrad ng;
  return vec(upsample_nearest2x(Var<float>(Tensor<float>::from(x, {N, H, W, C}))).value());
}

std::vector<float> cpu_upsample_nearest2x_backward(const std::vector<float>& x, const std::vector<float>& dy,
                                                   std::int64_t N, std::int64_t H, std::int64_t W, std::int64_t C,
                                                   const std::vector<float>* prefill) {
  Var<float> xv = leaf(x, {N, H, W, C}, prefill);
  run_backward(upsample_nearest2x(xv), dy);
  return vec(xv.grad());
}

std::vector<float> cpu_concat_channels(const std::vector<float>& a, const std::vector<float>& b, std::int64_t N,
                                       std::int64_t H, std::int64_t W, std::int64_t Ca, std::int64_t Cb) {
  NoGrad ng;
  const Var<float> av(Tensor<float>::from(a, {N, H, W, Ca})), bv(Tensor<float>::from(b, {N, H, W, Cb}));
  return vec(concat<float>({av, bv}, 3).value());
}

ConcatGrads cpu_concat_channels_backward(const std::vector<float>& a, const std::vector<float>& b,
                                         const std::vector<float>& dy, std::int64_t N, std::int64_t H, std::int64_t W,
                                         std::int64_t Ca, std::int64_t Cb, bool need_a, bool need_b,
                                         const std::vector<float>* prefill_a, const std::vector<float>* prefill_b) {
  if (!need_a && !need_b) throw std::invalid_argument("cpu_concat_channels_backward: nothing requires grad");
  Var<float> av = need_a ? leaf(a, {N, H, W, Ca}, prefill_a) : Var<float>(Tensor<float>::from(a, {N, H, W, Ca}));
  Var<float> bv = need_b ? leaf(b, {N, H, W, Cb}, prefill_b) : Var<float>(Tensor<float>::from(b, {N, H, W, Cb}));
  run_backward(concat<float>({av, bv}, 3), dy);
  ConcatGrads r;
  if (need_a) r.da = vec(av.grad());
  if (need_b) r.db = vec(bv.grad());
  return r;
}

DropoutRef cpu_dropout(const std::vector<float>& x, const std::vector<float>& dy, double p, std::uint64_t seed,
                       std::uint64_t offset, const std::vector<float>* prefill) {
  const Shape s{static_cast<int64_t>(x.size())};
  Var<float> xv = leaf(x, s, prefill);
  Generator gen(seed, offset);
  DropoutRef r;
  r.draw_offset = gen.offset;
  const Var<float> y = dropout(xv, p, gen, /*training=*/true);
  r.offset_after = gen.offset;
  r.y = vec(y.value());
  run_backward(y, dy);
  r.dx = vec(xv.grad());
  return r;
}

std::vector<float> cpu_timestep_embedding(const std::vector<std::int32_t>& t, std::int64_t dim) {
  return vec(timestep_embedding<float>(t, dim));
}

ScheduleTables cpu_schedule(const std::string& name, int T) {
  const NoiseSchedule s = NoiseSchedule::by_name(name, T);
  return ScheduleTables{s.beta,
                        s.alpha,
                        s.abar,
                        s.sqrt_abar,
                        s.sqrt_one_minus_abar,
                        s.posterior_variance,
                        s.posterior_coef1,
                        s.posterior_coef2};
}

SamplerRun cpu_sample(const SamplerConfig& c, std::uint64_t seed, std::uint64_t eps_seed) {
  NoGrad ng;
  const NoiseSchedule s = NoiseSchedule::by_name(c.schedule, c.T);
  const Shape shape{c.batch, c.row};
  std::mt19937_64 rng(eps_seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto random_eps = [&](const Shape& sh) {
    Tensor<float> e(sh);
    for (float& v : e) v = normal(rng);
    return e;
  };
  SamplerRun run;
  const size_t n = static_cast<size_t>(c.batch * c.row);
  auto check_t = [&](const std::vector<int32_t>& t) {
    for (int32_t v : t)
      if (v != t[0]) throw std::logic_error("cpu_sample: the sampler ran one batch at several timesteps");
    run.t.push_back(t[0]);
  };
  EpsModel<float> model;
  if (c.w == 0) {
    model = [&](const Tensor<float>& x, const std::vector<int32_t>& t) {
      check_t(t);
      Tensor<float> e = random_eps(x.shape());
      run.eps_c.push_back(vec(e));
      return e;
    };
  } else {
    // A class-conditional stand-in: the doubled batch [x; x] with labels [y; null] gets random
    // eps; its halves are what the kernel gets as eps and eps_uncond.
    ClassEpsModel<float> f = [&](const Tensor<float>& x2, const std::vector<int32_t>& t2, const std::vector<int32_t>&) {
      Tensor<float> e = random_eps(x2.shape());
      check_t(t2);
      run.eps_c.emplace_back(e.begin(), e.begin() + static_cast<std::ptrdiff_t>(n));
      run.eps_u.emplace_back(e.begin() + static_cast<std::ptrdiff_t>(n), e.end());
      return e;
    };
    const std::vector<int32_t> labels(static_cast<size_t>(c.batch), 3);
    model = guided_eps_model<float>(f, labels, /*null_class=*/10, c.w);
  }
  Generator gen(seed);
  const SampleObserver<float> observe = [&](int, const Tensor<float>& x) {
    run.x.push_back(vec(x));
    run.offset.push_back(gen.offset);
  };
  SampleOptions o;
  o.variance = c.fixed_small ? Variance::FixedSmall : Variance::FixedLarge;
  o.clip_x0 = c.clip_x0;
  o.clip = c.clip;
  o.eta = c.eta;
  o.steps = c.steps;
  if (c.ddim)
    ddim_sample<float>(s, model, shape, gen, o, observe);
  else
    ddpm_sample<float>(s, model, shape, gen, o, observe);
  return run;
}

}  // namespace diffuse::testing
