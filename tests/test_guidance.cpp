// Classifier-free guidance against hand computations, label dropout, guided sampling with an
// exact model of point-mass classes, and a short class-conditional U-Net training whose loss must
// fall and whose labels must matter.
#include <catch2/catch.hpp>

#include "kernel_seed.hpp"

#include <diffuse/diffuse.hpp>
#include <diffuse/diffusion/guidance.hpp>
#include <diffuse/models/unet.hpp>

#include <algorithm>
#include <cmath>
#include <random>

using namespace diffuse;

TEST_CASE("guide_combine is (1 + w) cond - w uncond") {
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed << " (DIFFUSE_TEST_SEED replays it)");
  Generator g(seed);
  const Tensor<double> c = Tensor<double>::randn({3, 4, 4, 1}, g), u = Tensor<double>::randn({3, 4, 4, 1}, g);
  for (double w : {0.0, 1.0, 2.5, -0.5}) {
    Tensor<double> r = c.clone();
    guide_combine(r, u, w);
    for (size_t i = 0; i < r.size(); ++i) REQUIRE(r[i] == Approx((1 + w) * c[i] - w * u[i]).epsilon(1e-14));
  }
  Tensor<double> bad({2, 4, 4, 1});
  CHECK_THROWS_WITH(guide_combine(bad, u, 1.0), Catch::Contains("equal shapes"));
}

TEST_CASE("the guided model runs cond and null labels in one batch and combines them") {
  // A fake class-conditional network whose output depends on x, t and y in a
  // known way: eps = x * (y + 1) + t / 100.
  int calls = 0;
  int64_t last_batch = 0;
  ClassEpsModel<double> f = [&](const Tensor<double>& x, const std::vector<int32_t>& t, const std::vector<int32_t>& y) {
    ++calls;
    last_batch = x.size(0);
    Tensor<double> e(x.shape());
    const int64_t per = x.size() / static_cast<size_t>(x.size(0));
    for (int64_t b = 0; b < x.size(0); ++b)
      for (int64_t k = 0; k < per; ++k) {
        const size_t i = static_cast<size_t>(b * per + k);
        e[i] = x[i] * (y[static_cast<size_t>(b)] + 1) + t[static_cast<size_t>(b)] / 100.0;
      }
    return e;
  };
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed << " (DIFFUSE_TEST_SEED replays it)");
  Generator g(seed);
  const Tensor<double> x = Tensor<double>::randn({3, 2, 2, 1}, g);
  const std::vector<int32_t> y{0, 4, 9}, t{5, 17, 199};
  const int32_t null_class = 10;
  const double w = 1.7;
  const Tensor<double> e = guided_eps_model<double>(f, y, null_class, w)(x, t);
  CHECK(calls == 1);
  CHECK(last_batch == 6);
  for (int64_t b = 0; b < 3; ++b)
    for (int64_t k = 0; k < 4; ++k) {
      const size_t i = static_cast<size_t>(b * 4 + k);
      const double tb = t[static_cast<size_t>(b)] / 100.0;
      const double cond = x[i] * (y[static_cast<size_t>(b)] + 1) + tb, uncond = x[i] * (null_class + 1) + tb;
      REQUIRE(e[i] == Approx((1 + w) * cond - w * uncond).epsilon(1e-13));
    }
  // w = 0: the conditional model alone, one pass over the plain batch.
  calls = 0;
  const Tensor<double> e0 = guided_eps_model<double>(f, y, null_class, 0.0)(x, t);
  CHECK(calls == 1);
  CHECK(last_batch == 3);
  for (size_t i = 0; i < e0.size(); ++i) REQUIRE(e0[i] == Approx(x[i] * (y[i / 4] + 1) + t[i / 4] / 100.0));
  CHECK_THROWS_WITH(guided_eps_model<double>(f, {1, 2}, null_class, w)(x, t), Catch::Contains("labels"));
}

TEST_CASE("drop_labels replaces labels by the null class at the given rate, reproducibly") {
  std::vector<int32_t> y(20000);
  for (size_t i = 0; i < y.size(); ++i) y[i] = static_cast<int32_t>(i % 10);
  const uint64_t seed = diffuse::testing::fresh_seed();
  Generator g1(seed), g2(seed);
  const std::vector<int32_t> a = drop_labels(y, 0.1, 10, g1), b = drop_labels(y, 0.1, 10, g2);
  CHECK(a == b);
  size_t dropped = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    if (a[i] == 10) ++dropped;
    else REQUIRE(a[i] == y[i]);
  }
  // Binomial(20000, 0.1): mean 2000, sd 42; 6 sd either side.
  CHECK(dropped > 1750);
  CHECK(dropped < 2250);
  Generator g3(seed);
  CHECK(drop_labels(y, 0.0, 10, g3) == y);
  CHECK_THROWS(drop_labels(y, 1.5, 10, g3));
}

TEST_CASE("a short class-conditional U-Net training lowers the loss") {
  // Three classes of 16x16 images (a horizontal bar, a vertical bar, a
  // square) at random positions, plus noise; a narrow U-Net, 60 steps.
  UNetConfig c = UNetConfig::mnist16("none");
  c.ch = 8;
  c.num_classes = 3;
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed << " (DIFFUSE_TEST_SEED replays it)");
  Generator g(seed);
  UNet<float> m(c, g);
  AdamOptions ao;
  ao.lr = 2e-3;
  Adam<float> opt(m.named_parameters(), ao);
  const NoiseSchedule s = NoiseSchedule::linear(100);
  const int64_t B = 32;
  auto batch = [&](std::vector<int32_t>& y) {
    Tensor<float> x({B, 16, 16, 1});
    x.fill(-1.0f);
    std::vector<uint32_t> r(static_cast<size_t>(3 * B));
    g.randint(r.data(), r.size(), 10);
    for (int64_t b = 0; b < B; ++b) {
      const int32_t k = static_cast<int32_t>(r[static_cast<size_t>(3 * b)] % 3);
      y[static_cast<size_t>(b)] = k;
      const int64_t oy = r[static_cast<size_t>(3 * b + 1)], ox = r[static_cast<size_t>(3 * b + 2)];
      for (int64_t i = 0; i < 6; ++i)
        for (int64_t j = 0; j < 6; ++j) {
          const bool on = k == 0 ? i == 2 : k == 1 ? j == 2 : true;
          if (on) x[static_cast<size_t>(((b * 16 + oy + i) * 16) + ox + j)] = 1.0f;
        }
    }
    return x;
  };
  std::vector<int32_t> y(static_cast<size_t>(B));
  double first = 0, last = 0;
  const int steps = 60, avg = 10;
  for (int step = 0; step < steps; ++step) {
    const Tensor<float> x0 = batch(y);
    const std::vector<int32_t> yd = drop_labels(y, 0.1, 3, g);
    auto nb = make_noised_batch(s, x0, g);
    opt.zero_grad();
    Var<float> loss = epsilon_loss<float>(
        [&](const Var<float>& x, const std::vector<int32_t>& t) { return m(x, t, &yd); }, nb);
    const double lv = loss.value()[0];
    REQUIRE(std::isfinite(lv));
    backward(loss);
    clip_grad_norm(opt.params(), 1.0);
    opt.step();
    if (step < avg) first += lv / avg;
    if (step >= steps - avg) last += lv / avg;
  }
  INFO("mean loss of the first 10 steps " << first << ", of the last 10 " << last);
  CHECK(last < 0.7 * first);

  // The labels are used: on the same noised batches, the loss with each image's own label is
  // lower than with the next class's (a model that ignored its labels would give equal losses).
  // Timesteps 10-59 of 100: there the wrong class costs 6-25% more loss (8 runs); at the noisiest
  // timesteps eps is nearly x_t and the label hardly matters. Eval mode: no dropout differs.
  NoGrad ng;
  m.eval();
  double own = 0, wrong = 0;
  for (int k = 0; k < 16; ++k) {
    const Tensor<float> x0 = batch(y);
    std::vector<int32_t> t(static_cast<size_t>(B)), shifted(y);
    for (auto& v : shifted) v = (v + 1) % 3;
    std::vector<uint32_t> r(t.size());
    g.randint(r.data(), r.size(), 50);
    for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<int32_t>(10 + r[i]);
    const Tensor<float> eps = Tensor<float>::randn(x0.shape(), g);
    const Tensor<float> xt = q_sample(s, x0, t, eps);
    own += mse(m(Var<float>(xt), t, &y), Var<float>(eps)).value()[0];
    wrong += mse(m(Var<float>(xt), t, &shifted), Var<float>(eps)).value()[0];
  }
  INFO("loss with the images' own labels " << own / 16 << ", with the next class's " << wrong / 16);
  CHECK(own < wrong);
}

// K classes, each a point c_k, so both the conditional and the unconditional epsilon are exact:
// eps_k(x) = (x - sqrt(abar) c_k) / sqrt(1 - abar), and the unconditional one averages them with
// the posterior class probabilities p(k | x_t) (a softmax of -|x - sqrt(abar) c_k|^2 / (2 (1 - abar))).
// Guided DDIM must land every sample on its own class's point: exactly for w = 0, and within a
// small distance for w > 0 (guidance pushes away from the other classes, which vanish near t = 0).
// A sampler or guided model that lost the labels would land on a random class.
TEST_CASE("guided DDIM with the exact model of point-mass classes lands each sample on its class") {
  const NoiseSchedule s = NoiseSchedule::linear(200);
  const int K = 4, D = 3;
  const double cls[K][D] = {{0.8, -0.5, 0.1}, {-0.6, 0.7, 0.3}, {0.2, 0.3, -0.9}, {-0.4, -0.6, -0.2}};
  const int32_t null_class = K;
  ClassEpsModel<double> f = [&](const Tensor<double>& x, const std::vector<int32_t>& t, const std::vector<int32_t>& y) {
    Tensor<double> e(x.shape());
    for (int64_t b = 0; b < x.size(0); ++b) {
      const double ab = s.abar[static_cast<size_t>(t[static_cast<size_t>(b)])], sa = std::sqrt(ab), so = std::sqrt(1 - ab);
      const double* xb = x.data() + b * D;
      double p[K], top = -1e300, z = 0;
      for (int k = 0; k < K; ++k) {
        double d2 = 0;
        for (int j = 0; j < D; ++j) d2 += (xb[j] - sa * cls[k][j]) * (xb[j] - sa * cls[k][j]);
        p[k] = -d2 / (2 * (1 - ab));
        top = std::max(top, p[k]);
      }
      for (int k = 0; k < K; ++k) z += (p[k] = std::exp(p[k] - top));
      const int32_t yb = y[static_cast<size_t>(b)];
      for (int j = 0; j < D; ++j) {
        double mean_c = 0;  // E[c | x_t] under the class the model is asked for
        if (yb == null_class)
          for (int k = 0; k < K; ++k) mean_c += p[k] / z * cls[k][j];
        else
          mean_c = cls[yb][j];
        e[static_cast<size_t>(b * D + j)] = (xb[j] - sa * mean_c) / so;
      }
    }
    return e;
  };
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed << " (DIFFUSE_TEST_SEED replays it)");
  const int64_t B = 64;
  std::vector<int32_t> y(static_cast<size_t>(B));
  for (size_t i = 0; i < y.size(); ++i) y[i] = static_cast<int32_t>(i % K);
  for (const double w : {0.0, 1.0, 3.0}) {
    INFO("guidance " << w);
    Generator g(seed);
    SampleOptions o;
    o.steps = 50;
    const Tensor<double> x = ddim_sample<double>(s, guided_eps_model<double>(f, y, null_class, w), {B, D}, g, o);
    int on_own = 0;
    double worst = 0;
    for (int64_t b = 0; b < B; ++b) {
      double best = 1e300;
      int nearest = -1;
      for (int k = 0; k < K; ++k) {
        double d2 = 0;
        for (int j = 0; j < D; ++j) d2 += (x[static_cast<size_t>(b * D + j)] - cls[k][j]) * (x[static_cast<size_t>(b * D + j)] - cls[k][j]);
        if (d2 < best) best = d2, nearest = k;
      }
      on_own += nearest == y[static_cast<size_t>(b)];
      if (nearest == y[static_cast<size_t>(b)]) worst = std::max(worst, std::sqrt(best));
    }
    CHECK(on_own == B);
    CHECK(worst < (w == 0 ? 1e-9 : 0.05));  // the points are over 1.2 apart
  }
}
