// NHWC image ops (include/diffuse/ops/group_norm.hpp, upsample.hpp, dropout.hpp, channel_bias.hpp): finite-difference gradients in
// double on fresh random inputs (the seed is printed on failure), float against
// double, thread-count independence, dropout's mask, and group_norm (+SiLU) and
// upsampling against PyTorch (tests/torch/image_ops_ref.py) when torch is present.
#include <catch2/catch.hpp>

#include "kernel_seed.hpp"

#include "gradcheck.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>

#include <diffuse/core/parallel.hpp>

#include "compare.hpp"
#include "skip.hpp"

using namespace diffuse;
using diffuse::testing::max_gradcheck_error;
using diffuse::testing::rand_var;
namespace fs = std::filesystem;

using diffuse::testing::rel_err;

namespace {

constexpr double kTol = 1e-6;

using diffuse::testing::fresh_seed;

// Group norm of the NCHW view, straight from the definition (double, one group at a time).
Tensor<double> group_norm_naive(const Tensor<double>& x, const Tensor<double>& gamma, const Tensor<double>& beta,
                                int64_t G, double eps, bool silu) {
  const int64_t N = x.size(0), HW = x.size(1) * x.size(2), C = x.size(3), Cg = C / G;
  Tensor<double> y(x.shape());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      double m = 0, v = 0;
      for (int64_t p = 0; p < HW; ++p)
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) m += x[(n * HW + p) * C + c];
      m /= double(HW * Cg);
      for (int64_t p = 0; p < HW; ++p)
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) v += std::pow(x[(n * HW + p) * C + c] - m, 2);
      v /= double(HW * Cg);
      for (int64_t p = 0; p < HW; ++p)
        for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
          const size_t i = static_cast<size_t>((n * HW + p) * C + c);
          const double z = (x[i] - m) / std::sqrt(v + eps) * gamma[c] + beta[c];
          y[i] = silu ? z / (1 + std::exp(-z)) : z;
        }
    }
  return y;
}

// Runs f on float and on double copies of the same inputs (all requiring grad),
// backpropagates sum(f * R) and returns the relative errors of the output and of
// every input gradient, float against double.
template <class F>
std::vector<double> float_vs_double(F f, const std::vector<Tensor<double>>& ins, Generator& g) {
  auto run = [&](auto zero) {
    using T = decltype(zero);
    std::vector<Var<T>> v;
    for (const auto& t : ins) v.emplace_back(t.template to<T>(), true);
    Var<T> y = f(v);
    Generator gr(g.seed, 777);  // the same R for both precisions
    Var<T> R(Tensor<double>::randn(y.shape(), gr).template to<T>());
    backward(sum(mul(y, R)));
    std::vector<Tensor<double>> res{y.value().template to<double>()};
    for (auto& x : v) res.push_back(x.grad().template to<double>());
    return res;
  };
  auto rf = run(0.0f);
  auto rd = run(0.0);
  std::vector<double> err;
  for (size_t k = 0; k < rf.size(); ++k) err.push_back(rel_err(rf[k], rd[k]));
  return err;
}

void set_threads(int n) { diffuse::set_num_threads(n); }
int max_threads() { return diffuse::num_threads(); }

bool have_torch() { return std::string(DIFFUSE_TORCH_PYTHON).size() > 0; }

}  // namespace

// ---------------------------------------------------------------- group_norm

TEST_CASE("gradcheck: group_norm, every input, groups 1 to C, with and without SiLU") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  struct Case {
    Shape s;
    int64_t groups;
  };
  // C = 6: groups 1, 3 and C; C = 12 in 4 groups of 3; N = 1 with groups = C = 10; C = 20 in 5 groups
  // of 4; odd sizes throughout. (Samples split into blocks of groups: the next test case.)
  const std::vector<Case> cases = {{{2, 3, 5, 6}, 1}, {{2, 3, 5, 6}, 3}, {{2, 3, 5, 6}, 6},
                                   {{2, 5, 3, 12}, 4}, {{1, 3, 3, 10}, 10}, {{3, 1, 7, 20}, 5}};
  for (const auto& c : cases) {
    for (bool silu : {false, true}) {
      INFO("shape " << shape_str(c.s) << " groups " << c.groups << " silu " << silu);
      const int64_t C = c.s[3];
      auto x = rand_var(c.s, g), gamma = rand_var({C}, g), beta = rand_var({C}, g);
      const double eps = 1e-5;
      auto f = [&](auto& v) { return group_norm(v[0], v[1], v[2], c.groups, eps, silu); };
      CHECK(max_gradcheck_error(f, {x, gamma, beta}, seed + 1) < kTol);
      // only some inputs requiring grad: x alone, the affine parameters alone
      Var<double> xc(x.value(), false), gc(gamma.value(), false), bc(beta.value(), false);
      CHECK(max_gradcheck_error(f, {x, gc, bc}, seed + 2) < kTol);
      CHECK(max_gradcheck_error(f, {xc, gamma, beta}, seed + 3) < kTol);
      // values equal the definition
      NoGrad ng;
      const Tensor<double> y = group_norm(x, gamma, beta, c.groups, eps, silu).value();
      CHECK(rel_err(y, group_norm_naive(x.value(), gamma.value(), beta.value(), c.groups, eps, silu)) < 1e-13);
    }
  }
}

TEST_CASE("gradcheck: group_norm with a sample split into blocks of groups") {
  // With many threads and few samples each sample is split into blocks of whole
  // groups (detail::group_norm_plan); here C = 40 in 20 groups gives 4 blocks of 5,
  // C = 28 in 14 groups 3 blocks of 4 and a last one of 2.
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const int before = max_threads();
  set_threads(16);
  CHECK(detail::group_norm_plan(1, 9, 40, 20, sizeof(double)).nblk == 4);
  const detail::GroupNormPlan pl = detail::group_norm_plan(2, 6, 28, 14, sizeof(double));
  CHECK(pl.nblk == 4);
  CHECK(pl.gpb == 4);
  for (const auto& [s, groups] : std::vector<std::pair<Shape, int64_t>>{{{1, 3, 3, 40}, 20}, {{2, 3, 2, 28}, 14}}) {
    for (bool silu : {false, true}) {
      INFO("shape " << shape_str(s) << " groups " << groups << " silu " << silu);
      auto x = rand_var(s, g), gamma = rand_var({s[3]}, g), beta = rand_var({s[3]}, g);
      auto f = [&, groups = groups](auto& v) { return group_norm(v[0], v[1], v[2], groups, 1e-5, silu); };
      CHECK(max_gradcheck_error(f, {x, gamma, beta}, seed + 1) < kTol);
      NoGrad ng;
      const Tensor<double> y = group_norm(x, gamma, beta, groups, 1e-5, silu).value();
      CHECK(rel_err(y, group_norm_naive(x.value(), gamma.value(), beta.value(), groups, 1e-5, silu)) < 1e-13);
    }
  }
  set_threads(before);
}

TEST_CASE("group_norm: the output is normalised, and shapes are checked") {
  Generator g(fresh_seed());
  // gamma = 1, beta = 0: every (sample, group) has mean 0 and variance 1 - eps-ish; inputs far from 0
  // with a small spread test that the variance does not cancel.
  Tensor<double> x = Tensor<double>::randn({2, 4, 3, 8}, g);
  for (double& v : x) v = 1000.0 + 0.01 * v;
  Var<double> X(x), one(Tensor<double>::ones({8})), zero(Tensor<double>::zeros({8}));
  const Tensor<double> y = group_norm(X, one, zero, 2, 1e-12).value();
  for (int64_t n = 0; n < 2; ++n)
    for (int64_t gi = 0; gi < 2; ++gi) {
      double m = 0, v = 0;
      for (int64_t p = 0; p < 12; ++p)
        for (int64_t c = gi * 4; c < gi * 4 + 4; ++c) m += y[(n * 12 + p) * 8 + c];
      m /= 48;
      for (int64_t p = 0; p < 12; ++p)
        for (int64_t c = gi * 4; c < gi * 4 + 4; ++c) v += std::pow(y[(n * 12 + p) * 8 + c] - m, 2);
      CHECK(std::abs(m) < 1e-9);
      CHECK(v / 48 == Approx(1.0).epsilon(1e-6));
    }
  CHECK_THROWS_WITH(group_norm(X, one, zero, 3, 1e-5), Catch::Contains("C % groups"));
  CHECK_THROWS_WITH(group_norm(X, one, zero, 0, 1e-5), Catch::Contains("groups"));
  Var<double> short_gamma(Tensor<double>::ones({4}));
  CHECK_THROWS_WITH(group_norm(X, short_gamma, zero, 2, 1e-5), Catch::Contains("gamma and beta must have shape [8]"));
  Var<double> flat(Tensor<double>::ones({4, 8}));
  CHECK_THROWS_WITH(group_norm(flat, one, zero, 2, 1e-5), Catch::Contains("NHWC"));
}

TEST_CASE("group_norm on a size that runs in parallel: float agrees with double, any thread count") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const int64_t N = 2, H = 17, W = 15, C = 64, G = 32;  // 32,640 elements: split between threads
  const std::vector<Tensor<double>> ins = {Tensor<double>::randn({N, H, W, C}, g), Tensor<double>::randn({C}, g),
                                           Tensor<double>::randn({C}, g)};
  for (bool silu : {false, true}) {
    INFO("silu " << silu);
    auto f = [silu](auto& v) { return group_norm(v[0], v[1], v[2], G, 1e-6, silu); };
    for (double e : float_vs_double(f, ins, g)) CHECK(e < 2e-6);
    // the same bits with one thread and with all of them
    auto bits = [&](int threads) {
      const int before = max_threads();
      set_threads(threads);
      Var<float> x(ins[0].to<float>(), true), ga(ins[1].to<float>(), true), be(ins[2].to<float>(), true);
      Var<float> y = group_norm(x, ga, be, G, 1e-6, silu);
      backward(sum(y));
      set_threads(before);
      return std::vector<Tensor<float>>{y.value(), x.grad(), ga.grad(), be.grad()};
    };
    // 16 threads split each sample into 4 blocks of groups, 1 thread keeps whole pixels
    auto one = bits(1), all = bits(16);
    for (size_t k = 0; k < one.size(); ++k)
      CHECK(std::equal(one[k].begin(), one[k].end(), all[k].begin()));
  }
}

// ---------------------------------------------------------------- upsample, bias, concat

TEST_CASE("gradcheck: upsample_nearest2x, and its values") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  auto x = rand_var({2, 3, 5, 3}, g);
  CHECK(max_gradcheck_error([](auto& v) { return upsample_nearest2x(v[0]); }, {x}, seed + 1) < kTol);
  NoGrad ng;
  const Tensor<double> y = upsample_nearest2x(x).value();
  REQUIRE(y.shape() == Shape{2, 6, 10, 3});
  for (int64_t n = 0; n < 2; ++n)
    for (int64_t h = 0; h < 6; ++h)
      for (int64_t w = 0; w < 10; ++w)
        for (int64_t c = 0; c < 3; ++c)
          CHECK(y[((n * 6 + h) * 10 + w) * 3 + c] == x.value()[((n * 3 + h / 2) * 5 + w / 2) * 3 + c]);
  Var<double> flat(Tensor<double>::ones({4, 8}));
  CHECK_THROWS_WITH(upsample_nearest2x(flat), Catch::Contains("NHWC"));
}

TEST_CASE("gradcheck: add_channel_bias, both inputs, and its values") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  // C = 70 > 64: the bias gradient is split into two channel blocks
  for (const Shape& s : {Shape{2, 3, 5, 7}, Shape{3, 2, 3, 70}}) {
    INFO("shape " << shape_str(s));
    auto x = rand_var(s, g), b = rand_var({s[0], s[3]}, g);
    CHECK(max_gradcheck_error([](auto& v) { return add_channel_bias(v[0], v[1]); }, {x, b}, seed + 1) < kTol);
    Var<double> xc(x.value(), false);
    CHECK(max_gradcheck_error([](auto& v) { return add_channel_bias(v[0], v[1]); }, {xc, b}, seed + 2) < kTol);
    NoGrad ng;
    const Tensor<double> y = add_channel_bias(x, b).value();
    const int64_t HW = s[1] * s[2], C = s[3];
    for (int64_t i = 0; i < static_cast<int64_t>(y.size()); ++i)
      CHECK(y[i] == x.value()[i] + b.value()[(i / (HW * C)) * C + i % C]);
  }
  Var<double> x(Tensor<double>::ones({2, 3, 3, 4})), bad(Tensor<double>::ones({2, 5}));
  CHECK_THROWS_WITH(add_channel_bias(x, bad), Catch::Contains("bias must have shape [2, 4]"));
}

TEST_CASE("gradcheck: channel concat of NHWC tensors, concat(xs, 3)") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  auto a = rand_var({2, 3, 5, 4}, g), b = rand_var({2, 3, 5, 1}, g), c = rand_var({2, 3, 5, 7}, g);
  CHECK(max_gradcheck_error([](auto& v) { return concat<double>({v[0], v[1], v[2]}, 3); }, {a, b, c}, seed + 1) <
        kTol);
  CHECK(max_gradcheck_error([](auto& v) { return concat<double>({v[0], v[1]}, -1); }, {c, a}, seed + 2) < kTol);
  // one input without grad; the same input twice (its gradient accumulates)
  Var<double> bc(b.value(), false);
  CHECK(max_gradcheck_error([](auto& v) { return concat<double>({v[0], v[1], v[0]}, 3); }, {a, bc}, seed + 3) < kTol);
  NoGrad ng;
  const Tensor<double> y = concat<double>({a, b, c}, 3).value();
  REQUIRE(y.shape() == Shape{2, 3, 5, 12});
  for (int64_t r = 0; r < 30; ++r) {
    for (int64_t k = 0; k < 4; ++k) CHECK(y[r * 12 + k] == a.value()[r * 4 + k]);
    CHECK(y[r * 12 + 4] == b.value()[r]);
    for (int64_t k = 0; k < 7; ++k) CHECK(y[r * 12 + 5 + k] == c.value()[r * 7 + k]);
  }
  auto d = rand_var({2, 3, 4, 1}, g);
  CHECK_THROWS_WITH(concat<double>({a, d}, 3), Catch::Contains("incompatible shapes"));
}

TEST_CASE("float and double agree on upsample_nearest2x, add_channel_bias, dropout") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const std::vector<Tensor<double>> x = {Tensor<double>::randn({2, 9, 7, 33}, g)};
  for (double e : float_vs_double([](auto& v) { return upsample_nearest2x(v[0]); }, x, g)) CHECK(e < 1e-7);
  const std::vector<Tensor<double>> xb = {x[0], Tensor<double>::randn({2, 33}, g)};
  for (double e : float_vs_double([](auto& v) { return add_channel_bias(v[0], v[1]); }, xb, g)) CHECK(e < 1e-7);
  const Generator start(seed, 5);
  auto drop = [&](auto& v) {
    Generator d = start;
    return dropout(v[0], 0.3, d, true);
  };
  for (double e : float_vs_double(drop, x, g)) CHECK(e < 1e-7);
}

TEST_CASE("nchw_to_nhwc and nhwc_to_nchw") {
  Generator g(fresh_seed());
  const Tensor<float> a = Tensor<float>::randn({2, 3, 4, 5}, g);  // NCHW
  const Tensor<float> b = nchw_to_nhwc(a);
  REQUIRE(b.shape() == Shape{2, 4, 5, 3});
  for (int64_t n = 0; n < 2; ++n)
    for (int64_t c = 0; c < 3; ++c)
      for (int64_t h = 0; h < 4; ++h)
        for (int64_t w = 0; w < 5; ++w) CHECK(b[((n * 4 + h) * 5 + w) * 3 + c] == a[((n * 3 + c) * 4 + h) * 5 + w]);
  const Tensor<float> back = nhwc_to_nchw(b);
  REQUIRE(back.shape() == a.shape());
  CHECK(std::equal(a.begin(), a.end(), back.begin()));
  CHECK_THROWS_WITH(nchw_to_nhwc(Tensor<float>({3, 4})), Catch::Contains("4-D"));
}

// ---------------------------------------------------------------- dropout

TEST_CASE("gradcheck: dropout with a fixed generator state") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  auto x = rand_var({2, 3, 5, 7}, g);
  const Generator start(seed, 42);
  for (double p : {0.1, 0.5, 0.9}) {
    INFO("p " << p);
    CHECK(max_gradcheck_error(
              [&](auto& v) {
                Generator d = start;  // every evaluation draws the same mask
                return dropout(v[0], p, d, true);
              },
              {x}, seed + 1) < kTol);
  }
}

TEST_CASE("dropout: reproducible, kept fraction 1 - p, scaled by 1 / (1 - p), identity in eval mode") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const int64_t n = 200001;  // not a multiple of 4
  Var<float> x(Tensor<float>::randn({1, 1, 1, n}, g));
  for (float& v : x.value())
    if (v == 0.0f) v = 1.0f;  // a kept zero would look dropped
  const double p = 0.3;
  Generator a(seed, 100), b(seed, 100), c(seed, 101);
  const Tensor<float> ya = dropout(x, p, a, true).value(), yb = dropout(x, p, b, true).value();
  const Tensor<float> yc = dropout(x, p, c, true).value();
  CHECK(a.offset == 100 + (n + 3) / 4);  // ceil(n / 4) Philox blocks
  CHECK(std::equal(ya.begin(), ya.end(), yb.begin()));
  CHECK_FALSE(std::equal(ya.begin(), ya.end(), yc.begin()));
  int64_t kept = 0, wrong_scale = 0;
  const float s = 1.0f / static_cast<float>(1.0 - p);
  for (int64_t i = 0; i < n; ++i) {
    if (ya[i] != 0.0f) {
      ++kept;
      wrong_scale += ya[i] != x.value()[i] * s;
    }
  }
  CHECK(wrong_scale == 0);
  // sd of the kept fraction: sqrt(p (1 - p) / n) ~ 0.001
  CHECK(double(kept) / n == Approx(1.0 - p).margin(0.006));
  // the mask is that of the generator's uniform draw at the same offset
  Generator u(seed, 100);
  std::vector<float> uni(static_cast<size_t>(n));
  u.uniform(uni.data(), uni.size());
  int64_t agree = 0;
  for (int64_t i = 0; i < n; ++i) agree += (ya[i] != 0.0f) == (double(uni[i]) < 1.0 - p);
  CHECK(agree == n);
  // any thread count gives the same mask
  {
    const int before = max_threads();
    set_threads(1);
    Generator a1(seed, 100);
    const Tensor<float> y1 = dropout(x, p, a1, true).value();
    set_threads(before);
    CHECK(std::equal(ya.begin(), ya.end(), y1.begin()));
  }
  // eval mode and p = 0: x itself, nothing drawn; p = 1: zeros
  Generator e(seed, 7);
  CHECK(dropout(x, p, e, false).node() == x.node());
  CHECK(dropout(x, 0.0, e, true).node() == x.node());
  CHECK(e.offset == 7);
  const Tensor<float> z = dropout(x, 1.0, e, true).value();
  CHECK(std::all_of(z.begin(), z.end(), [](float v) { return v == 0.0f; }));
  CHECK_THROWS_WITH(dropout(x, 1.5, e, true), Catch::Contains("[0, 1]"));
  CHECK_THROWS_WITH(dropout(x, -0.1, e, true), Catch::Contains("[0, 1]"));
}

TEST_CASE("dropout of a data-parallel rank's share of a batch is that share of the whole batch's dropout") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const int64_t rows = 6, row = 5;  // 30 elements; halves and thirds start inside Philox blocks
  Var<double> x(Tensor<double>::randn({rows, 1, 1, row}, g), true);
  Generator one(seed, 9);
  Var<double> y = dropout(x, 0.4, one, true);
  const Tensor<double> dy = Tensor<double>::randn(y.shape(), g);
  Tape<double>::current().backward(y, &dy);
  for (uint32_t parts : {2u, 3u}) {
    const int64_t share = rows / parts;
    for (uint32_t part = 0; part < parts; ++part) {
      INFO("part " << part << " of " << parts);
      Tensor<double> xs({share, 1, 1, row}), dys({share, 1, 1, row});
      std::copy(x.value().begin() + part * share * row, x.value().begin() + (part + 1) * share * row, xs.begin());
      std::copy(dy.begin() + part * share * row, dy.begin() + (part + 1) * share * row, dys.begin());
      Var<double> xv(xs, true);
      Generator mine(seed, 9);
      mine.part = part, mine.parts = parts;
      Var<double> ys = dropout(xv, 0.4, mine, true);
      CHECK(mine.offset == one.offset);
      Tape<double>::current().backward(ys, &dys);
      CHECK(std::equal(ys.value().begin(), ys.value().end(), y.value().begin() + part * share * row));
      CHECK(std::equal(xv.grad().begin(), xv.grad().end(), x.grad().begin() + part * share * row));
    }
  }
}

TEST_CASE("dropout: the backward uses the forward's mask") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  Var<double> x(Tensor<double>::randn({2, 4, 4, 9}, g), true);
  Generator d(seed, 3);
  Var<double> y = dropout(x, 0.4, d, true);
  backward(sum(y));
  const Tensor<double> gx = x.grad();
  for (size_t i = 0; i < gx.size(); ++i) CHECK(gx[i] == (y.value()[i] != 0.0 ? 1.0 / (1.0 - 0.4) : 0.0));
}

// ---------------------------------------------------------------- PyTorch

TEST_CASE("group_norm (+SiLU) and upsample_nearest2x match PyTorch") {
  if (!have_torch()) {
    DIFFUSE_SKIP("no python with torch found at configure time: PyTorch comparison skipped");
  }
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  struct Case {
    int64_t N, H, W, C, groups;
    double eps, offset;  // offset: inputs of mean `offset`, std 2
  };
  const std::vector<Case> cases = {{2, 7, 5, 12, 4, 1e-5, 0.0},  {3, 6, 9, 32, 32, 1e-6, 0.0},
                                   {1, 8, 8, 16, 1, 1e-5, 3.0},  {2, 16, 17, 64, 32, 1e-6, 0.0},
                                   {2, 5, 3, 20, 10, 1e-5, -1.0}};
  const fs::path dir = fs::path(DIFFUSE_BINARY_DIR) / "tests" / "torch_parity";
  fs::create_directories(dir);
  const std::string in = (dir / "image_in.safetensors").string(), out = (dir / "image_out.safetensors").string();
  std::vector<Tensor<float>> xs, gammas, betas, rs, rs_up;
  {
    safetensors::Writer w;
    for (size_t i = 0; i < cases.size(); ++i) {
      const Case& c = cases[i];
      Tensor<float> x = Tensor<float>::randn({c.N, c.H, c.W, c.C}, g);
      for (float& v : x) v = static_cast<float>(c.offset) + 2.0f * v;
      xs.push_back(x);
      gammas.push_back(Tensor<float>::randn({c.C}, g));
      betas.push_back(Tensor<float>::randn({c.C}, g));
      rs.push_back(Tensor<float>::randn({c.N, c.H, c.W, c.C}, g));  // d loss / d output (NHWC)
      const std::string k = "case" + std::to_string(i) + ".";
      w.add(k + "x", nhwc_to_nchw(x));
      w.add(k + "weight", gammas.back());
      w.add(k + "bias", betas.back());
      w.add(k + "r", nhwc_to_nchw(rs.back()));
      rs_up.push_back(Tensor<float>::randn({c.N, 2 * c.H, 2 * c.W, c.C}, g));
      w.add(k + "r_up", nhwc_to_nchw(rs_up.back()));
      w.add(k + "params", Tensor<double>::from({double(c.groups), c.eps}, {2}));
    }
    w.add("ncases", Tensor<double>::full({1}, double(cases.size())));
    w.write(in);
  }
  const std::string cmd = std::string("cd '") + DIFFUSE_SOURCE_DIR + "/tests/torch' && '" + DIFFUSE_TORCH_PYTHON +
                          "' image_ops_ref.py '" + in + "' '" + out + "'";
  INFO(cmd);
  REQUIRE(std::system(cmd.c_str()) == 0);
  const safetensors::File ref = safetensors::File::read(out);

  double worst_fwd = 0, worst_grad = 0;
  auto check = [&](const Tensor<float>& ours_nhwc, const std::string& name, double tol, bool is_grad) {
    INFO(name);
    const Tensor<float> theirs = ref.tensor<float>(name);
    const Tensor<float> ours = ours_nhwc.dim() == 4 ? nhwc_to_nchw(ours_nhwc) : ours_nhwc;
    const double e = rel_err(ours, theirs);
    (is_grad ? worst_grad : worst_fwd) = std::max(is_grad ? worst_grad : worst_fwd, e);
    CHECK(e < tol);
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    INFO("case " << i << ": [" << c.N << ", " << c.H << ", " << c.W << ", " << c.C << "] groups " << c.groups);
    const std::string k = "case" + std::to_string(i) + ".";
    for (bool silu : {false, true}) {
      const std::string ks = k + (silu ? "silu." : "plain.");
      Var<float> x(xs[i], true), gamma(gammas[i], true), beta(betas[i], true);
      Var<float> y = group_norm(x, gamma, beta, c.groups, c.eps, silu);
      backward(sum(mul(y, Var<float>(rs[i]))));
      check(y.value(), ks + "out", 1e-5, false);
      check(x.grad(), ks + "grad.x", 1e-4, true);
      check(gamma.grad(), ks + "grad.weight", 1e-4, true);
      check(beta.grad(), ks + "grad.bias", 1e-4, true);
    }
    Var<float> x(xs[i], true);
    Var<float> y = upsample_nearest2x(x);
    backward(sum(mul(y, Var<float>(rs_up[i]))));
    check(y.value(), k + "up.out", 1e-5, false);
    check(x.grad(), k + "up.grad.x", 1e-4, true);
  }
  std::printf("image ops vs PyTorch: worst relative error, forward %.3g, gradients %.3g\n", worst_fwd, worst_grad);
}
