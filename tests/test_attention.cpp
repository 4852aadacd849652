// attention(q, k, v, heads): values against a naive loop implementation,
// gradients against central finite differences (double), float against double
// at U-Net size, and forward + gradients against PyTorch (tests/torch/attention_ref.py).
#include <catch2/catch.hpp>

#include "kernel_seed.hpp"

#include <diffuse/diffuse.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "gradcheck.hpp"
#include "compare.hpp"
#include "skip.hpp"

using namespace diffuse;
using diffuse::testing::max_gradcheck_error;
using diffuse::testing::rand_var;
namespace fs = std::filesystem;

using diffuse::testing::rel_err;
using diffuse::testing::float_sums_tolerance;

namespace {

constexpr double kTol = 1e-6;

// out[n, i, h*d + c] = sum_j softmax_j(q_i . k_j / sqrt(d)) v[j, h*d + c], in long double loops.
Tensor<double> naive_attention(const Tensor<double>& q, const Tensor<double>& k, const Tensor<double>& v, int heads) {
  const int64_t N = q.size(0), L = q.size(1), C = q.size(2), d = C / heads;
  Tensor<double> out({N, L, C});
  std::vector<long double> w(static_cast<size_t>(L));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < L; ++i) {
        long double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j < L; ++j) {
          long double s = 0;
          for (int64_t c = 0; c < d; ++c) s += (long double)q[(n * L + i) * C + h * d + c] * k[(n * L + j) * C + h * d + c];
          w[j] = s / std::sqrt((long double)d);
          mx = std::max(mx, w[j]);
        }
        for (int64_t j = 0; j < L; ++j) sum += (w[j] = std::exp(w[j] - mx));
        for (int64_t c = 0; c < d; ++c) {
          long double o = 0;
          for (int64_t j = 0; j < L; ++j) o += w[j] / sum * v[(n * L + j) * C + h * d + c];
          out[(n * L + i) * C + h * d + c] = static_cast<double>(o);
        }
      }
  return out;
}

Var<double> scaled_var(Shape s, Generator& g, double scale) {
  Tensor<double> t = Tensor<double>::randn(std::move(s), g);
  for (auto& x : t) x *= scale;
  return Var<double>(t, true);
}

// "c<i>." (built with append: gcc 12 warns falsely (-Wrestrict) on "c" + std::to_string(i)).
std::string case_prefix(size_t i) {
  std::string p = std::to_string(i);
  p.insert(p.begin(), 'c');
  p.push_back('.');
  return p;
}

struct Case {
  int64_t N, L, C;
  int heads;
};

}  // namespace

TEST_CASE("attention values match a naive implementation") {
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed << " (DIFFUSE_TEST_SEED replays it)");
  Generator g(seed);
  // L and C off the GEMM tiles (6 x 16); L = 200 runs in several row blocks and in parallel.
  for (Case c : {Case{2, 7, 10, 1}, Case{3, 13, 10, 2}, Case{2, 11, 28, 4}, Case{1, 1, 5, 1}, Case{2, 200, 20, 4}}) {
    INFO("N " << c.N << " L " << c.L << " C " << c.C << " heads " << c.heads);
    auto q = rand_var({c.N, c.L, c.C}, g), k = rand_var({c.N, c.L, c.C}, g), v = rand_var({c.N, c.L, c.C}, g);
    Var<double> out = attention(q, k, v, c.heads);
    REQUIRE(out.shape() == Shape{c.N, c.L, c.C});
    CHECK(rel_err(out.value(), naive_attention(q.value(), k.value(), v.value(), c.heads)) < 1e-13);
    // without a gradient the scores go to a per-thread scratch buffer instead of P: the
    // same numbers up to rounding (Eigen's double GEMM depends on the buffers' alignment)
    NoGrad ng;
    Var<double> o2 = attention(q, k, v, c.heads);
    CHECK(rel_err(o2.value(), out.value()) < 1e-14);
  }
  Tape<double>::current().clear();
}

TEST_CASE("gradcheck: attention with 1, 2 and 4 heads") {
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  for (Case c : {Case{2, 7, 10, 1}, Case{2, 5, 10, 2}, Case{1, 9, 20, 4}, Case{2, 13, 28, 4}, Case{1, 100, 10, 2}}) {
    INFO("N " << c.N << " L " << c.L << " C " << c.C << " heads " << c.heads);
    auto q = rand_var({c.N, c.L, c.C}, g), k = rand_var({c.N, c.L, c.C}, g), v = rand_var({c.N, c.L, c.C}, g);
    const int h = c.heads;
    CHECK(max_gradcheck_error([h](auto& x) { return attention(x[0], x[1], x[2], h); }, {q, k, v}, 1) < kTol);
    // one input at a time (the others constant): only its phase of the backward runs.
    // L = 100 is two blocks of rows whatever the thread count (gradchecked with all three inputs only).
    for (int which = 0; which < 3 && c.L < 50; ++which) {
      INFO("only input " << which);
      std::vector<Var<double>> in{Var<double>(q.value()), Var<double>(k.value()), Var<double>(v.value())};
      in[static_cast<size_t>(which)] = Var<double>(in[static_cast<size_t>(which)].value(), true);
      CHECK(max_gradcheck_error([h](auto& x) { return attention(x[0], x[1], x[2], h); }, in, 2) < kTol);
    }
  }
}

TEST_CASE("gradcheck: attention with peaked softmax (large logits)") {
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  // q, k scaled by 3: logits have standard deviation ~9, so most rows put nearly all weight on one key.
  for (Case c : {Case{2, 7, 10, 1}, Case{1, 11, 20, 4}}) {
    INFO("N " << c.N << " L " << c.L << " C " << c.C << " heads " << c.heads);
    auto q = scaled_var({c.N, c.L, c.C}, g, 3.0), k = scaled_var({c.N, c.L, c.C}, g, 3.0),
         v = rand_var({c.N, c.L, c.C}, g);
    const int h = c.heads;
    CHECK(max_gradcheck_error([h](auto& x) { return attention(x[0], x[1], x[2], h); }, {q, k, v}, 3) < 1e-5);
  }
  // Logits far beyond exp's range (~1e4): finite, and each query takes the value of its best key.
  auto q = scaled_var({1, 9, 6}, g, 100.0), k = scaled_var({1, 9, 6}, g, 100.0), v = rand_var({1, 9, 6}, g);
  Var<double> out = attention(q, k, v);
  backward(sum(out));
  for (auto* t : {&out.value(), &q.node()->grad, &k.node()->grad, &v.node()->grad})
    for (double x : *t) REQUIRE(std::isfinite(x));
  int checked = 0;
  for (int64_t i = 0; i < 9; ++i) {
    int64_t best = 0;
    double bs = -INFINITY, second = -INFINITY;
    for (int64_t j = 0; j < 9; ++j) {
      double s = 0;
      for (int64_t c = 0; c < 6; ++c) s += q.value()[i * 6 + c] * k.value()[j * 6 + c];
      s /= std::sqrt(6.0);
      if (s > bs) second = bs, bs = s, best = j;
      else second = std::max(second, s);
    }
    if (bs - second < 40) continue;  // a near tie (rare): the weights are not one-hot
    ++checked;
    for (int64_t c = 0; c < 6; ++c) CHECK(out.value()[i * 6 + c] == Approx(v.value()[best * 6 + c]).margin(1e-12));
  }
  CHECK(checked >= 5);
}

TEST_CASE("gradcheck: attention with shared inputs accumulates") {
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  auto x = rand_var({2, 7, 10}, g), y = rand_var({2, 7, 10}, g), z = rand_var({2, 7, 10}, g);
  // self-attention on one tensor: all three phases write the same gradient
  CHECK(max_gradcheck_error([](auto& a) { return attention(a[0], a[0], a[0], 2); }, {x}, 4) < kTol);
  CHECK(max_gradcheck_error([](auto& a) { return attention(a[0], a[0], a[1], 1); }, {x, y}, 5) < kTol);
  // two attentions over permuted inputs, summed: every gradient arrives twice
  CHECK(max_gradcheck_error([](auto& a) { return add(attention(a[0], a[1], a[2], 2), attention(a[2], a[0], a[1], 1)); },
                            {x, y, z}, 6) < kTol);
}

TEST_CASE("attention on empty tensors") {
  for (Shape s : {Shape{0, 4, 6}, Shape{2, 0, 6}, Shape{2, 3, 0}}) {
    INFO(shape_str(s));
    Var<float> q(Tensor<float>::zeros(s), true), k(Tensor<float>::zeros(s), true), v(Tensor<float>::zeros(s), true);
    Var<float> o = attention(q, k, v, 2);
    CHECK(o.shape() == s);
    backward(sum(o));
    CHECK(q.grad().shape() == s);
    CHECK(v.grad().shape() == s);
  }
}

TEST_CASE("attention rejects bad shapes with clear messages") {
  Generator g(3);
  auto a = rand_var({2, 5, 6}, g), b = rand_var({2, 5, 8}, g), flat = rand_var({10, 6}, g);
  CHECK_THROWS_AS(attention(a, a, b), std::invalid_argument);
  CHECK_THROWS_WITH(attention(a, b, a), Catch::Contains("same shape"));
  CHECK_THROWS_WITH(attention(a, a, a, 4), Catch::Contains("multiple of heads"));
  CHECK_THROWS_WITH(attention(a, a, a, 0), Catch::Contains("multiple of heads"));
  CHECK_THROWS_WITH(attention(flat, flat, flat), Catch::Contains("[N, L, C]"));
  Tape<double>::current().clear();
}

TEST_CASE("attention in float agrees with double at U-Net size and at L = 1024") {
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  for (Case c : {Case{2, 256, 64, 1}, Case{2, 256, 64, 4}, Case{1, 1024, 32, 2}}) {
    INFO("N " << c.N << " L " << c.L << " C " << c.C << " heads " << c.heads);
    const int heads = c.heads;
    const Shape s{c.N, c.L, c.C};
    Tensor<double> qd = Tensor<double>::randn(s, g), kd = Tensor<double>::randn(s, g), vd = Tensor<double>::randn(s, g),
                   rd = Tensor<double>::randn(s, g);
    Var<double> q(qd, true), k(kd, true), v(vd, true);
    Var<float> qf(qd.to<float>(), true), kf(kd.to<float>(), true), vf(vd.to<float>(), true);
    Var<double> od = attention(q, k, v, heads);
    Var<float> of = attention(qf, kf, vf, heads);
    backward(sum(mul(od, Var<double>(rd))));
    backward(sum(mul(of, Var<float>(rd.to<float>()))));
    const double eo = rel_err(of.value(), od.value()), eq = rel_err(qf.grad(), q.grad()),
                 ek = rel_err(kf.grad(), k.grad()), ev = rel_err(vf.grad(), v.grad());
    // See float_sums_tolerance: the forward is two chained sums (scores over d = C / heads, the
    // output over L keys), the backward two more (dP and dS over d, then dQ, dK, dV over L).
    const double K = std::max<double>(c.L, c.C / c.heads), bo = float_sums_tolerance(K, 2), bg = float_sums_tolerance(K, 4);
    std::printf("attention L %lld C %lld heads %d vs double: out %.2g (bound %.2g), dq %.2g dk %.2g dv %.2g (%.2g)\n",
                (long long)c.L, (long long)c.C, heads, eo, bo, eq, ek, ev, bg);
    CHECK(eo < bo);
    CHECK(eq < bg);
    CHECK(ek < bg);
    CHECK(ev < bg);
  }
}

TEST_CASE("attention forward and gradients match PyTorch") {
  if (std::string(DIFFUSE_TORCH_PYTHON).empty()) {
    DIFFUSE_SKIP("no python with torch found at configure time: PyTorch comparison skipped");
  }
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const std::vector<Case> cases{{2, 64, 64, 1}, {3, 50, 36, 4}, {2, 256, 64, 1}, {1, 100, 64, 4}};
  const fs::path dir = fs::path(DIFFUSE_BINARY_DIR) / "tests" / "torch_parity";
  fs::create_directories(dir);
  const std::string in = (dir / "attention_in.safetensors").string(),
                    out = (dir / "attention_out.safetensors").string();
  std::vector<std::vector<Tensor<float>>> inputs;
  std::vector<int32_t> heads;  // add_raw keeps pointers into it until write()
  for (const Case& c : cases) heads.push_back(c.heads);
  {
    safetensors::Writer w;
    for (size_t i = 0; i < cases.size(); ++i) {
      const Case& c = cases[i];
      const Shape s{c.N, c.L, c.C};
      inputs.push_back({Tensor<float>::randn(s, g), Tensor<float>::randn(s, g), Tensor<float>::randn(s, g),
                        Tensor<float>::randn(s, g)});
      const std::string p = case_prefix(i);
      w.add(p + "q", inputs[i][0]);
      w.add(p + "k", inputs[i][1]);
      w.add(p + "v", inputs[i][2]);
      w.add(p + "g", inputs[i][3]);
      w.add_raw(p + "heads", safetensors::DType::I32, {1}, &heads[i], sizeof(int32_t));
    }
    w.write(in);
  }
  const std::string cmd = std::string("cd '") + DIFFUSE_SOURCE_DIR + "/tests/torch' && '" + DIFFUSE_TORCH_PYTHON +
                          "' attention_ref.py '" + in + "' '" + out + "'";
  INFO(cmd);
  REQUIRE(std::system(cmd.c_str()) == 0);
  const safetensors::File ref = safetensors::File::read(out);
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    INFO("N " << c.N << " L " << c.L << " C " << c.C << " heads " << c.heads);
    const std::string p = case_prefix(i);
    Var<float> q(inputs[i][0], true), k(inputs[i][1], true), v(inputs[i][2], true);
    Var<float> o = attention(q, k, v, c.heads);
    Tape<float>::current().backward(o, &inputs[i][3]);
    const double eo = rel_err(o.value(), ref.tensor<float>(p + "out")), eq = rel_err(q.grad(), ref.tensor<float>(p + "dq")),
                 ek = rel_err(k.grad(), ref.tensor<float>(p + "dk")), ev = rel_err(v.grad(), ref.tensor<float>(p + "dv"));
    // As in the float-against-double case above (float_sums_tolerance).
    const double K = std::max<double>(c.L, c.C / c.heads), bo = float_sums_tolerance(K, 2), bg = float_sums_tolerance(K, 4);
    std::printf("attention L %lld C %lld heads %d vs PyTorch: out %.2g (bound %.2g), dq %.2g dk %.2g dv %.2g (%.2g)\n",
                (long long)c.L, (long long)c.C, (int)c.heads, eo, bo, eq, ek, ev, bg);
    CHECK(eo < bo);
    CHECK(eq < bg);
    CHECK(ek < bg);
    CHECK(ev < bg);
  }
}
