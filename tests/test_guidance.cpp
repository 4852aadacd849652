// Classifier-free guidance against hand computations, label dropout, and a
// short class-conditional U-Net training whose loss must fall.
#include <catch2/catch.hpp>

#include <diffuse/diffuse.hpp>
#include <diffuse/diffusion/guidance.hpp>
#include <diffuse/models/unet.hpp>

#include <cmath>
#include <random>

using namespace diffuse;

TEST_CASE("guide_combine is (1 + w) cond - w uncond") {
  Generator g(std::random_device{}());
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
  Generator g(std::random_device{}());
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
  const uint64_t seed = std::random_device{}();
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
  Generator g(std::random_device{}());
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
}
