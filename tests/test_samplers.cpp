// The samplers (diffusion/solvers.hpp, samplers.hpp) driven by an EXACT model, no training: for
// data from a known Gaussian mixture, every noised marginal is a Gaussian mixture too, so the
// true epsilon E[eps | x_t] has a closed form. With it:
//   - the deterministic solvers (DDIM, DPM-Solver++ 2M and 3M) converge to the probability-flow
//     ODE's solution, which a fine RK4 integration gives, at the order each claims: the error
//     shrinks by ~2^p when the steps double;
//   - every sampler's samples have the mixture's statistics at enough steps, and the stochastic
//     ones (Euler-ancestral, DDIM eta 1) approach a Gaussian's variance at first order;
//   - classifier-free guidance composes with each (the exact conditional model);
//   - the timestep spacings are what they say.
#include <catch2/catch.hpp>

#include <diffuse/diffuse.hpp>

#include <array>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kernel_seed.hpp"

using namespace diffuse;

namespace {

// A mixture of isotropic Gaussians in 2-D: sum_k w_k N(mu_k, s_k^2 I).
struct Mixture {
  std::vector<std::array<double, 2>> mu;
  std::vector<double> s, w;
  static Mixture three() { return {{{-1.5, 0.5}, {1.0, 1.0}, {0.5, -1.5}}, {0.3, 0.5, 0.2}, {0.5, 0.3, 0.2}}; }
  // Two wide, overlapping components: the ODE's solution is smooth in the noise level, so a
  // solver reaches its asymptotic order within a few dozen steps.
  static Mixture broad() { return {{{-0.6, 0.2}, {0.7, -0.3}}, {0.6, 0.8}, {0.6, 0.4}}; }
  Mixture only(size_t k) const { return {{mu[k]}, {s[k]}, {1.0}}; }

  // E[x0 | x_t = x] for x_t = a x0 + sigma eps (a^2 + sigma^2 = 1): each component's posterior
  // mean, weighted by its responsibility under N(a mu_k, (a^2 s_k^2 + sigma^2) I).
  std::array<double, 2> x0(const double* x, double a, double sigma2) const {
    std::vector<double> logr(mu.size());
    double mx = -1e300;
    for (size_t k = 0; k < mu.size(); ++k) {
      const double v = a * a * s[k] * s[k] + sigma2;
      const double d0 = x[0] - a * mu[k][0], d1 = x[1] - a * mu[k][1];
      logr[k] = std::log(w[k]) - std::log(v) - (d0 * d0 + d1 * d1) / (2 * v);
      mx = std::max(mx, logr[k]);
    }
    double z = 0;
    std::array<double, 2> m{0, 0};
    for (size_t k = 0; k < mu.size(); ++k) {
      const double r = std::exp(logr[k] - mx), v = a * a * s[k] * s[k] + sigma2;
      z += r;
      // E[x0 | x_t, k] = mu_k + a s_k^2 / v (x - a mu_k)
      for (int i = 0; i < 2; ++i) m[i] += r * (mu[k][i] + a * s[k] * s[k] / v * (x[i] - a * mu[k][i]));
    }
    return {m[0] / z, m[1] / z};
  }

  // The exact epsilon model at the schedule's timestep: eps = (x - a x0) / sigma.
  EpsModel<double> eps_model(const NoiseSchedule& sched) const {
    return [this, &sched](const Tensor<double>& x, const std::vector<int32_t>& t) {
      Tensor<double> e(x.shape());
      for (int64_t b = 0; b < x.size(0); ++b) {
        const double ab = sched.abar[t[static_cast<size_t>(b)]], a = std::sqrt(ab), s2 = 1 - ab;
        const auto m = x0(x.data() + 2 * b, a, s2);
        for (int i = 0; i < 2; ++i) e.data()[2 * b + i] = (x.data()[2 * b + i] - a * m[i]) / std::sqrt(s2);
      }
      return e;
    };
  }

  std::array<double, 2> mean() const {
    std::array<double, 2> m{0, 0};
    for (size_t k = 0; k < mu.size(); ++k)
      for (int i = 0; i < 2; ++i) m[i] += w[k] * mu[k][i];
    return m;
  }
  // E[x_i x_j] - mean_i mean_j
  std::array<double, 3> cov() const {  // xx, xy, yy
    const auto m = mean();
    std::array<double, 3> c{0, 0, 0};
    for (size_t k = 0; k < mu.size(); ++k) {
      c[0] += w[k] * (s[k] * s[k] + mu[k][0] * mu[k][0]);
      c[1] += w[k] * (mu[k][0] * mu[k][1]);
      c[2] += w[k] * (s[k] * s[k] + mu[k][1] * mu[k][1]);
    }
    c[0] -= m[0] * m[0], c[1] -= m[0] * m[1], c[2] -= m[1] * m[1];
    return c;
  }
};

// The probability-flow ODE from timestep t0 to t1 for one point, by RK4 in lambda =
// log(alpha / sigma) on y = x / sigma, where dy/dlambda = e^lambda x0(x) (Lu et al.'s form), then
// x0 at t1: what a sampler that ends with "x = x0 at its last timestep" converges to.
std::array<double, 2> ode_reference(const Mixture& mix, const NoiseSchedule& s, int t0, int t1, const double* xT,
                                    int n = 4000) {
  auto lam = [](double ab) { return 0.5 * (std::log(ab) - std::log1p(-ab)); };
  const double l0 = lam(s.abar[t0]), l1 = lam(s.abar[t1]);
  auto sig = [](double l) { return 1.0 / std::sqrt(1.0 + std::exp(2 * l)); };
  auto f = [&](double l, const std::array<double, 2>& y) {
    const double sg = sig(l), a = std::exp(l) * sg;
    const double x[2] = {sg * y[0], sg * y[1]};
    const auto m = mix.x0(x, a, sg * sg);
    return std::array<double, 2>{std::exp(l) * m[0], std::exp(l) * m[1]};
  };
  std::array<double, 2> y{xT[0] / sig(l0), xT[1] / sig(l0)};
  const double h = (l1 - l0) / n;
  for (int i = 0; i < n; ++i) {
    const double l = l0 + i * h;
    auto add = [](const std::array<double, 2>& u, double c, const std::array<double, 2>& v) {
      return std::array<double, 2>{u[0] + c * v[0], u[1] + c * v[1]};
    };
    const auto k1 = f(l, y), k2 = f(l + h / 2, add(y, h / 2, k1)), k3 = f(l + h / 2, add(y, h / 2, k2)),
               k4 = f(l + h, add(y, h, k3));
    for (int j = 0; j < 2; ++j) y[j] += h / 6 * (k1[j] + 2 * k2[j] + 2 * k3[j] + k4[j]);
  }
  const double sg = sig(l1), x[2] = {sg * y[0], sg * y[1]};
  return mix.x0(x, std::exp(l1) * sg, sg * sg);
}

struct Stats {
  std::array<double, 2> mean{0, 0};
  std::array<double, 3> cov{0, 0, 0};
};
Stats stats_of(const Tensor<double>& x) {
  Stats st;
  const int64_t n = x.size(0);
  for (int64_t b = 0; b < n; ++b)
    for (int i = 0; i < 2; ++i) st.mean[i] += x.data()[2 * b + i] / n;
  for (int64_t b = 0; b < n; ++b) {
    const double d0 = x.data()[2 * b] - st.mean[0], d1 = x.data()[2 * b + 1] - st.mean[1];
    st.cov[0] += d0 * d0 / n, st.cov[1] += d0 * d1 / n, st.cov[2] += d1 * d1 / n;
  }
  return st;
}

}  // namespace

TEST_CASE("samplers: timestep spacings") {
  CHECK(sample_timesteps(1000, 10, Spacing::Uniform) == std::vector<int>{0, 100, 200, 300, 400, 500, 600, 700, 800, 900});
  CHECK(sample_timesteps(1000, 10, Spacing::Trailing) ==
        std::vector<int>{99, 199, 299, 399, 499, 599, 699, 799, 899, 999});
  CHECK(sample_timesteps(1000, 4, Spacing::Linspace) == std::vector<int>{0, 333, 666, 999});
  // diffusers rounds half to even: 1000 / 16 = 62.5 -> 62, so trailing's first is 61.
  CHECK(sample_timesteps(1000, 16, Spacing::Trailing).front() == 61);
  CHECK(sample_timesteps(1000, 16, Spacing::Trailing).back() == 999);
  const std::vector<int> q = sample_timesteps(1000, 5, Spacing::Quadratic);
  CHECK(q == std::vector<int>{0, 50, 200, 450, 800});  // (i sqrt(800) / 4)^2
  for (Spacing sp : {Spacing::Uniform, Spacing::Linspace, Spacing::Trailing, Spacing::Quadratic}) {
    for (int K : {1, 2, 7, 50, 200}) {
      INFO(spacing_name(sp) << " K " << K);
      const std::vector<int> ts = sample_timesteps(1000, K, sp);
      REQUIRE(static_cast<int>(ts.size()) == K);
      for (size_t i = 0; i < ts.size(); ++i) {
        CHECK(ts[i] >= 0);
        CHECK(ts[i] <= 999);
        if (i > 0) CHECK(ts[i] > ts[i - 1]);
      }
    }
    CHECK(parse_spacing(spacing_name(sp)) == sp);
  }
  CHECK(sample_timesteps(1000, 1000, Spacing::Uniform).back() == 999);
  // Quadratic's first squares coincide at many steps (DDIM's code repeats them): moved up by one.
  CHECK(sample_timesteps(1000, 50, Spacing::Quadratic)[1] == 1);
  CHECK(sample_timesteps(1000, 50, Spacing::Quadratic).back() == 800);
  CHECK(sample_timesteps(1000, 1000, Spacing::Quadratic).back() == 999);
  CHECK_THROWS_WITH(sample_timesteps(100, 0), Catch::Contains("[1, T = 100]"));
  CHECK_THROWS_WITH(parse_spacing("leading-ish"), Catch::Contains("uniform, linspace, trailing, quadratic"));
  CHECK(ddim_timesteps(1000, 10) == sample_timesteps(1000, 10, Spacing::Uniform));
}

TEST_CASE("samplers: the deterministic solvers converge to the probability-flow ODE at their order") {
  const Mixture mix = Mixture::broad();
  const NoiseSchedule s = NoiseSchedule::linear(1000);
  const int64_t n = 48;
  // Fixed starting points; each solver starts from the same x_T (its first draw from the seed).
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  Generator g0(seed);
  const Tensor<double> xT = Tensor<double>::randn({n, 2}, g0);
  std::vector<std::array<double, 2>> ref(static_cast<size_t>(n));
  for (int64_t b = 0; b < n; ++b) ref[static_cast<size_t>(b)] = ode_reference(mix, s, 999, 0, xT.data() + 2 * b);
  struct Solver {
    SamplerKind kind;
    double order;
  };
  for (const Solver sv : {Solver{SamplerKind::DDIM, 1}, Solver{SamplerKind::DPMSolver2M, 2},
                          Solver{SamplerKind::DPMSolver3M, 3}}) {
    std::vector<double> err;
    for (int K : {10, 20, 40, 80, 160}) {
      SampleOptions o;
      o.steps = K;
      o.spacing = Spacing::Linspace;  // t = 999 ... 0 at every K: the same ODE interval
      Generator g(g0.seed);           // the same x_T
      const Tensor<double> x = sample_with<double>(sv.kind, s, mix.eps_model(s), {n, 2}, g, o);
      double e2 = 0;
      for (int64_t b = 0; b < n; ++b)
        for (int i = 0; i < 2; ++i) {
          const double d = x.data()[2 * b + i] - ref[static_cast<size_t>(b)][i];
          e2 += d * d;
        }
      err.push_back(std::sqrt(e2 / n));
    }
    const double p_mid = std::log2(err[2] / err[3]), p_end = std::log2(err[3] / err[4]);
    INFO(sampler_name(sv.kind) << ": RMS error at 10, 20, 40, 80, 160 steps " << err[0] << ", " << err[1] << ", "
                               << err[2] << ", " << err[3] << ", " << err[4] << "; observed order " << p_mid << ", "
                               << p_end);
    CHECK(p_end > sv.order - 0.35);
    CHECK(p_end < sv.order + 0.8);
    CHECK(err[3] < err[0]);
  }
}

TEST_CASE("samplers: DPM-Solver++ of order 1 and Euler-ancestral with eta 0 are DDIM, also with clipping") {
  // With clip_x0 all three step from the clipped x0 and the state (DDIM with the eps that the
  // clipped x0 implies), so they stay the same sampler; the clip acts here (the data reach +-2).
  const Mixture mix = Mixture::three();
  const NoiseSchedule s = NoiseSchedule::cosine(200);
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  for (const bool clip : {false, true}) {
    INFO("clip_x0 " << clip);
    SampleOptions o;
    o.steps = 17;
    o.spacing = Spacing::Trailing;
    o.clip_x0 = clip;
    Generator g1(seed), g2(seed), g3(seed), g4(seed);
    const Tensor<double> a = sample_with<double>(SamplerKind::DDIM, s, mix.eps_model(s), {16, 2}, g1, o);
    const Tensor<double> b = dpm_solver_pp_sample<double>(s, mix.eps_model(s), {16, 2}, g2, o, 1);
    SampleOptions oe = o;
    oe.ancestral_eta = 0;
    const Tensor<double> c = sample_with<double>(SamplerKind::EulerAncestral, s, mix.eps_model(s), {16, 2}, g3, oe);
    // The three formulae round differently, and the first step (t = 199, trailing) divides by
    // sqrt(abar) = 2.5e-4 (the cosine schedule's last beta is clipped to 0.999): each double
    // rounding there is ~4000 u = 5e-13, a few 1e-12 after 17 steps (seen: up to 2e-12, seed
    // 15505459043234075525, which failed the 1e-12 this had). 1e-10 is far below what a wrong
    // coefficient moves (>1e-3).
    double clipped = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      CHECK(b[i] == Approx(a[i]).epsilon(1e-10).margin(1e-10));
      CHECK(c[i] == Approx(a[i]).epsilon(1e-10).margin(1e-10));
      clipped = std::max(clipped, std::fabs(a[i]));
    }
    if (clip) {
      CHECK(clipped <= 1.0);  // the last step returns the clipped x0
      const Tensor<double> free = sample_with<double>(SamplerKind::DDIM, s, mix.eps_model(s), {16, 2}, g4, SampleOptions{
          .steps = 17, .spacing = Spacing::Trailing});
      double moved = 0;
      for (size_t i = 0; i < a.size(); ++i) moved = std::max(moved, std::fabs(free[i] - a[i]));
      CHECK(moved > 0.1);  // and the clip changed the samples
    }
  }
}

TEST_CASE("samplers: at enough steps every sampler draws the mixture's mean, covariance and weights") {
  const Mixture mix = Mixture::three();
  const NoiseSchedule s = NoiseSchedule::linear(200);
  const int64_t n = 2000;
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  const auto m = mix.mean();
  const auto c = mix.cov();
  for (const SamplerKind k : {SamplerKind::DDPM, SamplerKind::DDIM, SamplerKind::EulerAncestral,
                              SamplerKind::DPMSolver2M, SamplerKind::DPMSolver3M}) {
    INFO(sampler_name(k));
    SampleOptions o;
    o.steps = k == SamplerKind::DDPM ? 0 : 100;
    Generator g(seed);
    const Tensor<double> x = sample_with<double>(k, s, mix.eps_model(s), {n, 2}, g, o);
    const Stats st = stats_of(x);
    // Sampling error: standard errors from the samples themselves; 5 of them, plus 0.02 for the
    // discretisation (first-order samplers at 100 steps are off by about 1% of the data's scale).
    double var_prod[3] = {0, 0, 0};
    for (int64_t b = 0; b < n; ++b) {
      const double d0 = x.data()[2 * b] - st.mean[0], d1 = x.data()[2 * b + 1] - st.mean[1];
      const double p[3] = {d0 * d0 - st.cov[0], d0 * d1 - st.cov[1], d1 * d1 - st.cov[2]};
      for (int i = 0; i < 3; ++i) var_prod[i] += p[i] * p[i] / n;
    }
    CHECK(std::fabs(st.mean[0] - m[0]) < 5 * std::sqrt(st.cov[0] / n) + 0.02);
    CHECK(std::fabs(st.mean[1] - m[1]) < 5 * std::sqrt(st.cov[2] / n) + 0.02);
    for (int i = 0; i < 3; ++i) CHECK(std::fabs(st.cov[i] - c[i]) < 5 * std::sqrt(var_prod[i] / n) + 0.02);
    // The weights: each sample to the component of the highest posterior responsibility at t = 0.
    std::vector<double> frac(mix.mu.size(), 0.0);
    for (int64_t b = 0; b < n; ++b) {
      size_t best = 0;
      double bl = -1e300;
      for (size_t j = 0; j < mix.mu.size(); ++j) {
        const double d0 = x.data()[2 * b] - mix.mu[j][0], d1 = x.data()[2 * b + 1] - mix.mu[j][1];
        const double l = std::log(mix.w[j]) - 2 * std::log(mix.s[j]) - (d0 * d0 + d1 * d1) / (2 * mix.s[j] * mix.s[j]);
        if (l > bl) bl = l, best = j;
      }
      frac[best] += 1.0 / n;
    }
    for (size_t j = 0; j < frac.size(); ++j) {
      INFO("component " << j << ": " << frac[j] << " of the samples, weight " << mix.w[j]);
      CHECK(std::fabs(frac[j] - mix.w[j]) < 5 * std::sqrt(mix.w[j] * (1 - mix.w[j]) / n) + 0.02);
    }
  }
}

TEST_CASE("samplers: Euler-ancestral is DDIM with eta 1, and approaches a Gaussian's variance at first order") {
  // In sigma~ = sigma / alpha, Euler-ancestral's step to sigma_down plus sigma_up of noise is
  // DDIM's eta = 1 step term for term (the same sigma, the same deterministic part), drawing the
  // same normals in the same order: the same samples up to rounding.
  const Mixture one = Mixture::three().only(1);
  const NoiseSchedule s = NoiseSchedule::linear(1000);
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  {
    const Mixture mix = Mixture::three();
    SampleOptions o;
    o.steps = 23;
    o.spacing = Spacing::Trailing;
    o.eta = 1.0;
    Generator g1(seed), g2(seed);
    const Tensor<double> a = sample_with<double>(SamplerKind::DDIM, s, mix.eps_model(s), {64, 2}, g1, o);
    const Tensor<double> b = sample_with<double>(SamplerKind::EulerAncestral, s, mix.eps_model(s), {64, 2}, g2, o);
    for (size_t i = 0; i < a.size(); ++i) CHECK(b[i] == Approx(a[i]).epsilon(1e-10).margin(1e-10));
  }
  // One Gaussian, N(mu, 0.4^2 I): 10^5 points keep the sampling error of the variance near 0.5%,
  // well under the error at 20 to 80 steps (25% down to 7%), so its halving shows.
  const int64_t n = 100000;
  const double var = one.s[0] * one.s[0];
  std::vector<double> err;
  for (int K : {20, 40, 80}) {
    SampleOptions o;
    o.steps = K;
    o.spacing = Spacing::Trailing;
    Generator g(seed);
    const Tensor<double> x = sample_with<double>(SamplerKind::EulerAncestral, s, one.eps_model(s), {n, 2}, g, o);
    const Stats st = stats_of(x);
    err.push_back(0.5 * (st.cov[0] + st.cov[2]) / var - 1);
  }
  INFO("relative variance error at 20, 40, 80 steps: " << err[0] << ", " << err[1] << ", " << err[2]);
  CHECK(std::fabs(err[0]) > std::fabs(err[1]));
  CHECK(std::fabs(err[1]) > std::fabs(err[2]));
  CHECK(std::fabs(err[1] / err[2]) > 1.5);
  CHECK(std::fabs(err[1] / err[2]) < 2.6);
}

TEST_CASE("samplers: classifier-free guidance composes with every sampler") {
  // The exact class-conditional model: label y < 3 is component y, label 3 (null) the mixture.
  const Mixture mix = Mixture::three();
  const NoiseSchedule s = NoiseSchedule::linear(200);
  std::vector<Mixture> parts;
  for (size_t k = 0; k < 3; ++k) parts.push_back(mix.only(k));
  std::vector<EpsModel<double>> cond;
  for (const Mixture& p : parts) cond.push_back(p.eps_model(s));
  const EpsModel<double> uncond = mix.eps_model(s);
  const ClassEpsModel<double> f = [&](const Tensor<double>& x, const std::vector<int32_t>& t,
                                      const std::vector<int32_t>& y) {
    Tensor<double> e(x.shape());
    for (int64_t b = 0; b < x.size(0); ++b) {
      Tensor<double> xb({1, 2});
      xb[0] = x.data()[2 * b], xb[1] = x.data()[2 * b + 1];
      const int32_t yb = y[static_cast<size_t>(b)];
      const Tensor<double> eb = (yb == 3 ? uncond : cond[static_cast<size_t>(yb)])(xb, {t[static_cast<size_t>(b)]});
      e.data()[2 * b] = eb[0], e.data()[2 * b + 1] = eb[1];
    }
    return e;
  };
  const int64_t n = 600;
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  for (const SamplerKind k : {SamplerKind::DDIM, SamplerKind::EulerAncestral, SamplerKind::DPMSolver2M,
                              SamplerKind::DPMSolver3M}) {
    INFO(sampler_name(k));
    SampleOptions o;
    o.steps = k == SamplerKind::EulerAncestral ? 200 : 50;  // first order in distribution: needs more
    const auto gm = mix.mean();
    double away[2] = {0, 0};  // the samples' mean's distance from the mixture's mean
    for (const double w : {0.0, 2.0}) {
      Generator g(seed);
      const Tensor<double> x =
          sample_with<double>(k, s, guided_eps_model<double>(f, std::vector<int32_t>(n, 2), 3, w), {n, 2}, g, o);
      const Stats st = stats_of(x);
      // w = 0 is the conditional model: component 2, N((0.5, -1.5), 0.2^2 I).
      if (w == 0) {
        CHECK(std::fabs(st.mean[0] - 0.5) < 0.03);
        CHECK(std::fabs(st.mean[1] + 1.5) < 0.03);
        CHECK(std::fabs(std::sqrt(0.5 * (st.cov[0] + st.cov[2])) - 0.2) < 0.03);
      }
      away[w == 0 ? 0 : 1] = std::hypot(st.mean[0] - gm[0], st.mean[1] - gm[1]);
    }
    // Guidance, (1 + w) eps(x | y) - w eps(x), pushes along the difference of the two scores: away
    // from where the other classes are, so the class's samples move away from the mixture's mean.
    CHECK(away[1] > away[0] + 0.01);
  }
}

// ================================================================ objectives and schedules

TEST_CASE("objectives: the eps, x0 and v targets convert into each other exactly") {
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  for (const NoiseSchedule& s : {NoiseSchedule::linear(1000), NoiseSchedule::cosine(200), NoiseSchedule::sigmoid(300)}) {
    INFO(s.name());
    const int64_t B = 7;
    NoisedBatch<double> nb;
    nb.x0 = Tensor<double>::randn({B, 3, 2, 2}, g);
    nb.eps = Tensor<double>::randn(nb.x0.shape(), g);
    nb.t = {0, 1, s.T() / 3, s.T() / 2, s.T() - 2, s.T() - 1, 5};
    nb.x_t = q_sample(s, nb.x0, nb.t, nb.eps);
    const Tensor<double> v = prediction_target(s, nb, Prediction::V);
    const Tensor<double> from_x0 = prediction_to_eps(s, Prediction::X0, nb.x0, nb.x_t, nb.t);
    const Tensor<double> from_v = prediction_to_eps(s, Prediction::V, v, nb.x_t, nb.t);
    const int64_t row = nb.x0.numel() / B;
    double worst_v = 0, worst_x0 = 0, worst_back = 0, worst_def = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int t = nb.t[static_cast<size_t>(b)];
      const double a = s.sqrt_abar[t], sg = s.sqrt_one_minus_abar[t];
      for (int64_t i = b * row; i < (b + 1) * row; ++i) {
        const size_t k = static_cast<size_t>(i);
        worst_def = std::max(worst_def, std::fabs(v[k] - (a * nb.eps[k] - sg * nb.x0[k])));
        worst_v = std::max(worst_v, std::fabs(from_v[k] - nb.eps[k]));
        worst_back = std::max(worst_back, std::fabs((a * nb.x_t[k] - sg * v[k]) - nb.x0[k]));
        // x0 -> eps divides by sigma, which is 0.01 at t = 0 of the linear schedule: relative to 1/sigma.
        worst_x0 = std::max(worst_x0, std::fabs(from_x0[k] - nb.eps[k]) * sg);
      }
    }
    CHECK(worst_def < 1e-15);
    CHECK(worst_v < 1e-13);
    CHECK(worst_back < 1e-13);
    CHECK(worst_x0 < 1e-14);
    CHECK(prediction_target(s, nb, Prediction::X0).data() == nb.x0.data());
    CHECK(prediction_target(s, nb, Prediction::Epsilon).data() == nb.eps.data());
  }
  CHECK(parse_prediction("v") == Prediction::V);
  CHECK_THROWS_WITH(parse_prediction("score"), Catch::Contains("eps, x0, v"));
}

TEST_CASE("objectives: min-SNR-gamma weights and the weighted loss") {
  const NoiseSchedule s = NoiseSchedule::linear(1000);
  const std::vector<int32_t> t{0, 100, 400, 999};
  for (const Prediction p : {Prediction::Epsilon, Prediction::X0, Prediction::V}) {
    INFO(prediction_name(p));
    const std::vector<double> w = loss_weights(s, t, {p, 5.0});
    for (size_t b = 0; b < t.size(); ++b) {
      const double snr = s.abar[t[b]] / (1 - s.abar[t[b]]), m = std::min(snr, 5.0);
      const double want = p == Prediction::Epsilon ? m / snr : p == Prediction::X0 ? m : m / (snr + 1);
      CHECK(w[b] == Approx(want).epsilon(1e-14));
    }
    // Every weighting is min(SNR, gamma) on the x0 error: the three agree once converted.
    CHECK(loss_weights(s, t, {p, 0.0}) == std::vector<double>(t.size(), 1.0));
  }
  CHECK(loss_weights(s, {999}, {Prediction::Epsilon, 5.0})[0] == Approx(1.0));  // SNR < gamma: no change for eps
  CHECK(loss_weights(s, {0}, {Prediction::Epsilon, 5.0})[0] < 1e-3);              // SNR ~ 1e4: damped
  CHECK_THROWS_WITH(loss_weights(s, t, {Prediction::V, -1.0}), Catch::Contains("min-SNR gamma"));
  CHECK_THROWS_AS(loss_weights(s, {1000}, {Prediction::V, 5.0}), std::out_of_range);

  // The loss: mean_b w_b mean_i (out - target)^2, against the sum written out.
  Generator g(3);
  NoisedBatch<double> nb;
  nb.x0 = Tensor<double>::randn({4, 5}, g);
  nb.eps = Tensor<double>::randn({4, 5}, g);
  nb.t = t;
  nb.x_t = q_sample(s, nb.x0, nb.t, nb.eps);
  const Tensor<double> out = Tensor<double>::randn({4, 5}, g);
  auto model = [&](const Var<double>&, const std::vector<int32_t>&) { return Var<double>(out); };
  for (const Prediction p : {Prediction::Epsilon, Prediction::X0, Prediction::V}) {
    const Objective o{p, 5.0};
    const double got = diffusion_loss<double>(model, s, nb, o).value()[0];
    const Tensor<double> target = prediction_target(s, nb, p);
    const std::vector<double> w = loss_weights(s, t, o);
    double want = 0;
    for (int64_t b = 0; b < 4; ++b)
      for (int64_t i = 0; i < 5; ++i) {
        const double d = out[static_cast<size_t>(b * 5 + i)] - target[static_cast<size_t>(b * 5 + i)];
        want += w[static_cast<size_t>(b)] * d * d / 20;
      }
    CHECK(got == Approx(want).epsilon(1e-12));
    const double plain = diffusion_loss<double>(model, s, nb, {p, 0.0}).value()[0];
    double want_plain = 0;
    for (size_t i = 0; i < 20; ++i) want_plain += (out[i] - target[i]) * (out[i] - target[i]) / 20;
    CHECK(plain == Approx(want_plain).epsilon(1e-12));
  }
}

TEST_CASE("objectives: the samplers on an x0 or a v network draw what the eps network draws") {
  const Mixture mix = Mixture::three();
  const NoiseSchedule s = NoiseSchedule::linear(200);
  const EpsModel<double> eps = mix.eps_model(s);
  // The same exact model, predicting x0 or v instead.
  const EpsModel<double> x0_net = [&](const Tensor<double>& x, const std::vector<int32_t>& t) {
    const Tensor<double> e = eps(x, t);
    Tensor<double> r(x.shape());
    for (int64_t b = 0; b < x.size(0); ++b)
      for (int i = 0; i < 2; ++i) {
        const size_t k = static_cast<size_t>(2 * b + i);
        const int tb = t[static_cast<size_t>(b)];
        r[k] = (x[k] - s.sqrt_one_minus_abar[tb] * e[k]) / s.sqrt_abar[tb];
      }
    return r;
  };
  const EpsModel<double> v_net = [&](const Tensor<double>& x, const std::vector<int32_t>& t) {
    const Tensor<double> e = eps(x, t), x0 = x0_net(x, t);
    Tensor<double> r(x.shape());
    for (int64_t b = 0; b < x.size(0); ++b)
      for (int i = 0; i < 2; ++i) {
        const size_t k = static_cast<size_t>(2 * b + i);
        const int tb = t[static_cast<size_t>(b)];
        r[k] = s.sqrt_abar[tb] * e[k] - s.sqrt_one_minus_abar[tb] * x0[k];
      }
    return r;
  };
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  for (const SamplerKind k : {SamplerKind::DDIM, SamplerKind::EulerAncestral, SamplerKind::DPMSolver2M}) {
    INFO(sampler_name(k));
    SampleOptions o;
    o.steps = 25;
    Generator g1(seed), g2(seed), g3(seed);
    const Tensor<double> a = sample_with<double>(k, s, eps, {32, 2}, g1, o);
    const Tensor<double> b = sample_with<double>(k, s, as_eps_model<double>(x0_net, s, Prediction::X0), {32, 2}, g2, o);
    const Tensor<double> c = sample_with<double>(k, s, as_eps_model<double>(v_net, s, Prediction::V), {32, 2}, g3, o);
    for (size_t i = 0; i < a.size(); ++i) {
      CHECK(b[i] == Approx(a[i]).epsilon(1e-9).margin(1e-9));
      CHECK(c[i] == Approx(a[i]).epsilon(1e-9).margin(1e-9));
    }
  }
}

TEST_CASE("schedules: sigmoid matches its closed form, starts near 1 and ends at 0") {
  const int T = 300;
  const NoiseSchedule s = NoiseSchedule::sigmoid(T);
  auto sg = [](double x) { return 1 / (1 + std::exp(-x)); };
  auto f = [&](double t) { return (sg(3.0) - sg(6.0 * t / T - 3.0)) / (sg(3.0) - sg(-3.0)); };
  for (int t = 0; t < T - 1; ++t) REQUIRE(s.abar[t] == Approx(f(t + 1)).epsilon(1e-10));
  CHECK(s.beta.back() == 0.999);
  CHECK(s.abar[0] > 0.998);  // 1 - abar(1) = 1.0e-3 at T = 300
  CHECK(NoiseSchedule::by_name("sigmoid", 50).name() == "sigmoid");
  CHECK_THROWS_WITH(NoiseSchedule::by_name("sigmoidx", 10), Catch::Contains("linear, cosine, sigmoid"));
  CHECK_THROWS(NoiseSchedule::sigmoid(10, 3, -3));
}
