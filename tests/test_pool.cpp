// Pooling and classification loss (include/diffuse/ops/pool.hpp, ops/loss.hpp):
// finite-difference gradients in double on fresh random inputs (the seed is
// printed on failure), PyTorch's window and divisor rules on hand-checkable
// inputs, argument checks, thread-count independence, and parity with PyTorch
// (tests/torch/pool_ref.py) when torch is present.
#include <catch2/catch.hpp>

#include "kernel_seed.hpp"

#include "compare.hpp"
#include "gradcheck.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <numeric>
#include <random>
#include <string>
#include <tuple>

#include <diffuse/core/parallel.hpp>
#include "skip.hpp"

using namespace diffuse;
using diffuse::testing::max_gradcheck_error;
using diffuse::testing::rand_var;
using diffuse::testing::rel_err;
namespace fs = std::filesystem;

namespace {

constexpr double kTol = 1e-6;

using diffuse::testing::fresh_seed;

// A random permutation of evenly spaced values: no two elements closer than
// 4 / n, so no window has a tie and the finite difference (step 1e-6) never
// changes which element is the maximum.
Var<double> distinct_var(const Shape& s, Generator& g) {
  const size_t n = static_cast<size_t>(shape_numel(s));
  std::vector<double> key(n);
  g.uniform(key.data(), n);
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t(0));
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return key[a] < key[b]; });
  Tensor<double> t(s);
  for (size_t r = 0; r < n; ++r) t[order[r]] = (static_cast<double>(r) - 0.5 * static_cast<double>(n)) * 4.0 / n;
  return Var<double>(t, true);
}

struct PoolCase {
  const char* name;
  PoolOptions o;
  Shape s;  // NHWC
};

std::string describe(const PoolOptions& o) {
  return "kernel " + std::to_string(o.kernel_h) + "x" + std::to_string(o.kernel_w) + " stride " +
         std::to_string(o.stride_h) + "x" + std::to_string(o.stride_w) + " pad " + std::to_string(o.pad_h) + "x" +
         std::to_string(o.pad_w) + (o.ceil_mode ? " ceil" : "") + (o.count_include_pad ? "" : " exclude-pad");
}

// The configurations of both the gradchecks and the PyTorch comparison (count_include_pad is varied there).
const std::vector<PoolCase>& pool_cases() {
  static const std::vector<PoolCase> c = {
      {"2x2 stride 2", {2, 2, 2, 2, 0, 0, false}, {2, 7, 9, 3}},
      {"3x3 stride 2 pad 1", {3, 3, 2, 2, 1, 1, false}, {2, 7, 9, 3}},
      {"3x3 stride 1 pad 1 (Inception)", {3, 3, 1, 1, 1, 1, false}, {2, 7, 9, 3}},
      // ceil_mode: the last row / column windows hang past the input (no padding to count)
      {"2x2 stride 2 ceil", {2, 2, 2, 2, 0, 0, true}, {2, 7, 9, 3}},
      // ceil_mode with padding on even sizes: 5x5 outputs instead of 4x4, the last window past the padded edge
      {"3x3 stride 2 pad 1 ceil", {3, 3, 2, 2, 1, 1, true}, {2, 8, 10, 3}},
      // ceil_mode where PyTorch drops the last row (it would start in the right padding): 3 rows, not 4
      {"2x2 stride 3 pad 1 ceil", {2, 2, 3, 3, 1, 1, true}, {2, 7, 9, 3}},
      {"3x2 stride 2x1 pad 1x0 ceil", {3, 2, 2, 1, 1, 0, true}, {2, 7, 9, 3}},
      {"1x1 stride 2", {1, 1, 2, 2, 0, 0, false}, {2, 7, 9, 3}},
  };
  return c;
}

void set_threads(int n) { diffuse::set_num_threads(n); }
int max_threads() { return diffuse::num_threads(); }

bool have_torch() { return std::string(DIFFUSE_TORCH_PYTHON).size() > 0; }

}  // namespace

// ---------------------------------------------------------------- output size and window rules

TEST_CASE("pool output sizes follow PyTorch, ceil_mode included") {
  using detail::pool_out_size;
  // (in, k, stride, pad, ceil) -> out, values from torch.nn.functional.max_pool2d
  CHECK(pool_out_size(7, 2, 2, 0, false) == 3);
  CHECK(pool_out_size(7, 2, 2, 0, true) == 4);
  CHECK(pool_out_size(8, 3, 2, 1, false) == 4);
  CHECK(pool_out_size(8, 3, 2, 1, true) == 5);
  CHECK(pool_out_size(7, 3, 1, 1, false) == 7);
  CHECK(pool_out_size(7, 2, 3, 1, true) == 3);  // 4 without the rule that the last window starts inside
  CHECK(pool_out_size(9, 2, 3, 1, true) == 4);
  CHECK(pool_out_size(7, 3, 2, 0, true) == 3);
  CHECK(pool_out_size(1, 2, 2, 0, false) == 0);  // too small: max_pool2d throws
  CHECK(pool_out_size(1, 2, 2, 0, true) == 1);
}

TEST_CASE("avg_pool2d divisors: count_include_pad, and ceil_mode windows past the padded edge") {
  Var<double> ones(Tensor<double>::ones({1, 7, 9, 2}));
  {  // 3x3 stride 1 pad 1: with padding counted, corners 4/9, edges 6/9, inside 1; without, all 1
    const Tensor<double> a = avg_pool2d(ones, 3, 1, 1, false, true).value();
    const Tensor<double> b = avg_pool2d(ones, 3, 1, 1, false, false).value();
    REQUIRE(a.shape() == Shape{1, 7, 9, 2});
    auto at = [](const Tensor<double>& t, int64_t h, int64_t w) { return t[(h * 9 + w) * 2 + 1]; };
    CHECK(at(a, 0, 0) == Approx(4.0 / 9));
    CHECK(at(a, 6, 8) == Approx(4.0 / 9));
    CHECK(at(a, 0, 4) == Approx(6.0 / 9));
    CHECK(at(a, 3, 8) == Approx(6.0 / 9));
    CHECK(at(a, 3, 4) == 1.0);
    for (double v : b) CHECK(v == 1.0);
  }
  {  // 2x2 stride 2 ceil: the last windows hold 1 or 2 elements and no padding: the divisor is theirs
    const Tensor<double> a = avg_pool2d(ones, 2, 2, 0, true, true).value();
    REQUIRE(a.shape() == Shape{1, 4, 5, 2});
    for (double v : a) CHECK(v == 1.0);
  }
  {  // 2x2 stride 3 pad 1 ceil on 7x9 (PyTorch: [[.25 .5 .5 .25] [.5 1 1 .5] [.5 1 1 .5]]): the last
     // column's window [8, 10) ends exactly at the padded edge, so it counts its padding
    const Tensor<double> a = avg_pool2d(ones, PoolOptions{2, 2, 3, 3, 1, 1, true, true}).value();
    REQUIRE(a.shape() == Shape{1, 3, 4, 2});
    const double want[3][4] = {{0.25, 0.5, 0.5, 0.25}, {0.5, 1, 1, 0.5}, {0.5, 1, 1, 0.5}};
    for (int64_t h = 0; h < 3; ++h)
      for (int64_t w = 0; w < 4; ++w) CHECK(a[(h * 4 + w) * 2] == want[h][w]);
  }
  {  // 3x3 stride 2 pad 1 ceil on 8 rows: the last window [7, 10) is cut at the padded edge 9: divisor 2 per axis
    Var<double> o8(Tensor<double>::ones({1, 8, 8, 1}));
    const Tensor<double> a = avg_pool2d(o8, 3, 2, 1, true, true).value();
    REQUIRE(a.shape() == Shape{1, 5, 5, 1});
    CHECK(a[24] == Approx(1.0 / 4));  // one input element of a 2x2 padded window
    CHECK(a[4] == Approx(2.0 / 6));   // rows [-1, 2) by columns [7, 9): 3x2 counted, 2x1 real
  }
}

TEST_CASE("max_pool2d: values, padding never wins, ties go to the first maximum") {
  Generator g(fresh_seed());
  // All negative inputs: -inf padding must not be the maximum.
  Tensor<double> neg = Tensor<double>::rand({1, 5, 5, 2}, g);
  for (double& v : neg) v = -1.0 - v;
  Var<double> x(neg);
  Var<double> y = max_pool2d(x, 3, 2, 1);
  REQUIRE(y.shape() == Shape{1, 3, 3, 2});
  for (int64_t oh = 0; oh < 3; ++oh)
    for (int64_t ow = 0; ow < 3; ++ow)
      for (int64_t c = 0; c < 2; ++c) {
        double m = -INFINITY;
        for (int64_t h = std::max<int64_t>(0, 2 * oh - 1); h < std::min<int64_t>(5, 2 * oh + 2); ++h)
          for (int64_t w = std::max<int64_t>(0, 2 * ow - 1); w < std::min<int64_t>(5, 2 * ow + 2); ++w)
            m = std::max(m, neg[(h * 5 + w) * 2 + c]);
        CHECK(y.value()[(oh * 3 + ow) * 2 + c] == m);
      }
  // A constant image: every window is one big tie; each output's gradient goes to its window's first element.
  Var<double> flat(Tensor<double>::full({1, 4, 6, 1}, 0.5), true);
  Var<double> z = max_pool2d(flat, 2);
  backward(sum(z));
  const Tensor<double> gx = flat.grad();
  for (int64_t h = 0; h < 4; ++h)
    for (int64_t w = 0; w < 6; ++w) CHECK(gx[h * 6 + w] == ((h % 2 == 0 && w % 2 == 0) ? 1.0 : 0.0));
  // Overlapping windows (3x3 stride 1): a shared maximum collects the gradient of every window it wins.
  Tensor<double> one_peak = Tensor<double>::zeros({1, 3, 3, 1});
  one_peak[4] = 1.0;
  Var<double> p(one_peak, true);
  backward(sum(max_pool2d(p, 3, 1, 1)));
  CHECK(p.grad()[4] == 9.0);
  CHECK(p.grad()[0] == 0.0);
}

TEST_CASE("pool argument checks") {
  Var<double> x(Tensor<double>::ones({1, 5, 5, 2}));
  CHECK_THROWS_WITH(max_pool2d(x, 3, 1, 2), Catch::Contains("at most half the kernel size"));
  CHECK_THROWS_WITH(avg_pool2d(x, 2, 1, 2), Catch::Contains("at most half the kernel size"));
  CHECK_THROWS_WITH(max_pool2d(x, 6), Catch::Contains("too small"));
  CHECK_THROWS_WITH(max_pool2d(x, 0), Catch::Contains("kernel size must be positive"));
  CHECK_THROWS_WITH(avg_pool2d(x, 2, -1), Catch::Contains("stride must be positive"));
  Var<double> flat(Tensor<double>::ones({5, 5}));
  CHECK_THROWS_WITH(max_pool2d(flat, 2), Catch::Contains("NHWC"));
  CHECK_THROWS_WITH(avg_pool2d(flat, 2), Catch::Contains("NHWC"));
  CHECK_THROWS_WITH(global_avg_pool(flat), Catch::Contains("NHWC"));
  // stride 0 (the default) means the kernel size, as PyTorch's stride=None
  CHECK(max_pool2d(x, 2).shape() == Shape{1, 2, 2, 2});
  CHECK(avg_pool2d(x, PoolOptions{3, 1}).shape() == Shape{1, 1, 5, 2});
}

// ---------------------------------------------------------------- gradchecks

TEST_CASE("gradcheck: max_pool2d on inputs without ties") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  for (const PoolCase& c : pool_cases()) {
    INFO(c.name << ": " << describe(c.o) << " on " << shape_str(c.s));
    auto x = distinct_var(c.s, g);
    const PoolOptions o = c.o;
    CHECK(max_gradcheck_error([o](auto& v) { return max_pool2d(v[0], o); }, {x}, seed + 1) < kTol);
  }
}

TEST_CASE("gradcheck: avg_pool2d with and without counting the padding") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  for (const PoolCase& c : pool_cases()) {
    for (bool include_pad : {true, false}) {
      PoolOptions o = c.o;
      o.count_include_pad = include_pad;
      INFO(c.name << ": " << describe(o) << " on " << shape_str(c.s));
      auto x = rand_var(c.s, g);
      CHECK(max_gradcheck_error([o](auto& v) { return avg_pool2d(v[0], o); }, {x}, seed + 1) < kTol);
    }
  }
}

TEST_CASE("gradcheck: global_avg_pool, and its values") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  auto x = rand_var({3, 5, 7, 4}, g);
  CHECK(max_gradcheck_error([](auto& v) { return global_avg_pool(v[0]); }, {x}, seed + 1) < kTol);
  NoGrad ng;
  const Tensor<double> y = global_avg_pool(x).value();
  REQUIRE(y.shape() == Shape{3, 4});
  for (int64_t n = 0; n < 3; ++n)
    for (int64_t c = 0; c < 4; ++c) {
      double s = 0;
      for (int64_t p = 0; p < 35; ++p) s += x.value()[(n * 35 + p) * 4 + c];
      CHECK(y[n * 4 + c] == Approx(s / 35).epsilon(1e-14));
    }
}

TEST_CASE("gradcheck: pools inside a graph, the gradient accumulating from two uses") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  auto x = distinct_var({2, 6, 5, 3}, g);
  auto f = [](auto& v) {
    return add(reshape(global_avg_pool(max_pool2d(v[0], 3, 1, 1)), {2, 3}),
               global_avg_pool(avg_pool2d(v[0], PoolOptions{3, 3, 2, 2, 1, 1, true, false})));
  };
  CHECK(max_gradcheck_error(f, {x}, seed + 1) < kTol);
}

TEST_CASE("gradcheck: cross_entropy and log_softmax") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  for (const auto& [N, K] : std::vector<std::pair<int64_t, int64_t>>{{1, 2}, {5, 7}, {16, 10}}) {
    INFO("N " << N << " K " << K);
    auto z = rand_var({N, K}, g);
    for (double& v : z.value()) v *= 3.0;
    std::vector<int32_t> y(static_cast<size_t>(N));
    for (int64_t i = 0; i < N; ++i) y[i] = static_cast<int32_t>(Tensor<double>::rand({1}, g)[0] * K) % K;
    CHECK(max_gradcheck_error([&](auto& v) { return cross_entropy(v[0], y); }, {z}, seed + 1) < kTol);
    CHECK(max_gradcheck_error([](auto& v) { return log_softmax(v[0]); }, {z}, seed + 2) < kTol);
    // the value: mean of lse - z[y], from the definition
    NoGrad ng;
    double want = 0;
    for (int64_t i = 0; i < N; ++i) {
      double s = 0;
      for (int64_t j = 0; j < K; ++j) s += std::exp(z.value()[i * K + j]);
      want += std::log(s) - z.value()[i * K + y[i]];
    }
    // Absolute margin too: the reference formula cancels (lse - z[y]) when the loss is tiny.
    CHECK(cross_entropy(z, y).value()[0] == Approx(want / N).epsilon(1e-13).margin(1e-13));
  }
  // log_softmax over the last dimension of a 3-D tensor
  auto z3 = rand_var({2, 3, 4}, g);
  CHECK(max_gradcheck_error([](auto& v) { return log_softmax(v[0]); }, {z3}, seed + 3) < kTol);
}

TEST_CASE("cross_entropy is stable for large logits, and its gradient is (softmax - onehot) / N") {
  Var<double> z(Tensor<double>::from({1000.0, 0.0, -1000.0, 800.0, 801.0, 799.0}, {2, 3}), true);
  Var<double> l = cross_entropy(z, {0, 2});
  // row 0: loss ~ 0; row 1: lse = 801 + log(1 + e^-1 + e^-2), minus 799
  const double lse1 = 801.0 + std::log(1.0 + std::exp(-1.0) + std::exp(-2.0));
  CHECK(std::isfinite(l.value()[0]));
  CHECK(l.value()[0] == Approx((lse1 - 799.0) / 2).epsilon(1e-14));
  backward(l);
  const Tensor<double> gz = z.grad();
  CHECK(gz[0] == Approx(0.0).margin(1e-300));
  CHECK(gz[5] == Approx((std::exp(799.0 - lse1) - 1.0) / 2).epsilon(1e-12));
  double row = 0;
  for (int j = 3; j < 6; ++j) row += gz[j];
  CHECK(std::abs(row) < 1e-12);  // lse ~ 801 carries an absolute rounding error of ~1e-13
  // float: no overflow either
  Var<float> zf(Tensor<float>::from({1000.f, 0.f, -1000.f, 800.f, 801.f, 799.f}, {2, 3}));
  CHECK(std::isfinite(cross_entropy(zf, {0, 2}).value()[0]));
}

TEST_CASE("cross_entropy rejects labels out of range and a wrong label count") {
  Var<float> z(Tensor<float>::zeros({3, 4}), true);
  CHECK_THROWS_AS(cross_entropy(z, {0, 4, 1}), std::out_of_range);
  CHECK_THROWS_WITH(cross_entropy(z, {0, 4, 1}), Catch::Contains("label 4 of row 1 outside [0, 4)"));
  CHECK_THROWS_WITH(cross_entropy(z, {0, 1, -1}), Catch::Contains("label -1 of row 2 outside [0, 4)"));
  CHECK_THROWS_WITH(cross_entropy(z, {0, 1}), Catch::Contains("2 labels for 3 rows"));
  Var<float> bad(Tensor<float>::zeros({3}));
  CHECK_THROWS_WITH(cross_entropy(bad, {0, 1, 2}), Catch::Contains("logits [N, K]"));
  CHECK(Tape<float>::current().size() == 0);  // nothing recorded by the failed calls
}

TEST_CASE("argmax_rows: the first maximum of each row") {
  const Tensor<float> t = Tensor<float>::from({1, 3, 2, 3, 5, 5, 5, 5, -1, -2, -3, -4}, {3, 4});
  CHECK(argmax_rows(t) == std::vector<int32_t>{1, 0, 0});
  const Tensor<double> n = Tensor<double>::from({1, NAN, 7}, {1, 3});
  CHECK(argmax_rows(n) == std::vector<int32_t>{1});
  CHECK_THROWS_WITH(argmax_rows(Tensor<float>::zeros({4})), Catch::Contains("2-D"));
}

// ---------------------------------------------------------------- threads

TEST_CASE("pools on a size that runs in parallel: the same bits with one thread and with many") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Tensor<float> x0 = Tensor<float>::randn({4, 17, 15, 64}, g);  // 65,280 elements: split between threads
  const Tensor<float> r = Tensor<float>::randn({4, 9, 8, 64}, g), rg = Tensor<float>::randn({4, 64}, g);
  auto bits = [&](int threads) {
    const int before = max_threads();
    set_threads(threads);
    std::vector<Tensor<float>> res;
    for (int op = 0; op < 3; ++op) {
      Var<float> x(x0, true);
      Var<float> y = op == 0   ? max_pool2d(x, 3, 2, 1, true)
                     : op == 1 ? avg_pool2d(x, 3, 2, 1, true, false)
                               : global_avg_pool(x);
      backward(sum(mul(y, Var<float>(op < 2 ? r : rg))));
      res.push_back(y.value());
      res.push_back(x.grad());
    }
    set_threads(before);
    return res;
  };
  auto one = bits(1), all = bits(16);
  for (size_t k = 0; k < one.size(); ++k) CHECK(std::equal(one[k].begin(), one[k].end(), all[k].begin()));
}

// ---------------------------------------------------------------- PyTorch

TEST_CASE("max_pool2d, avg_pool2d, global_avg_pool, log_softmax and cross_entropy match PyTorch") {
  if (!have_torch()) {
    DIFFUSE_SKIP("no python with torch found at configure time: PyTorch comparison skipped");
  }
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  // One run per (configuration, op): max; avg counting the padding; avg not counting it. Plus max on
  // inputs full of ties (values rounded to halves), where the gradient must go to the same element.
  struct Run {
    std::string label;
    PoolOptions o;
    int op;  // 0 max, 1 avg
    Tensor<float> x, r;
    Tensor<float> out, grad;
  };
  std::vector<Run> runs;
  for (const PoolCase& c : pool_cases()) {
    for (int variant = 0; variant < 4; ++variant) {
      Run run;
      run.o = c.o;
      run.op = variant == 0 || variant == 3 ? 0 : 1;
      run.o.count_include_pad = variant != 2;
      run.label = std::string(c.name) + (variant == 0 ? " max" : variant == 1 ? " avg" : variant == 2 ? " avg exclude-pad" : " max with ties");
      run.x = Tensor<float>::randn(c.s, g);
      if (variant == 3)
        for (float& v : run.x) v = std::round(2.0f * v) / 2.0f;
      runs.push_back(std::move(run));
    }
  }
  const fs::path dir = fs::path(DIFFUSE_BINARY_DIR) / "tests" / "torch_parity";
  fs::create_directories(dir);
  const std::string in = (dir / "pool_in.safetensors").string(), out = (dir / "pool_out.safetensors").string();
  // Our side first: the output shapes give the shapes of the random output gradients r.
  for (Run& run : runs) {
    Var<float> x(run.x, true);
    Var<float> y = run.op == 0 ? max_pool2d(x, run.o) : avg_pool2d(x, run.o);
    run.r = Tensor<float>::randn(y.shape(), g);
    backward(sum(mul(y, Var<float>(run.r))));
    run.out = y.value();
    run.grad = x.grad();
  }
  const Tensor<float> gap_x = Tensor<float>::randn({2, 7, 9, 3}, g), gap_r = Tensor<float>::randn({2, 3}, g);
  const Tensor<float> ls_x = Tensor<float>::randn({6, 11}, g), ls_r = Tensor<float>::randn({6, 11}, g);
  struct CE {
    Tensor<float> z;
    std::vector<int32_t> y;
  };
  std::vector<CE> ces;
  for (const auto& [N, K, scale, offset] : std::vector<std::tuple<int64_t, int64_t, float, float>>{
           {2, 3, 1.0f, 0.0f}, {8, 10, 3.0f, 0.0f}, {5, 7, 4.0f, 1000.0f}, {1, 2, 1.0f, -50.0f}}) {
    CE ce{Tensor<float>::randn({N, K}, g), {}};
    for (float& v : ce.z) v = offset + scale * v;
    const Tensor<float> u = Tensor<float>::rand({N}, g);
    for (int64_t i = 0; i < N; ++i) ce.y.push_back(std::min<int32_t>(static_cast<int32_t>(u[i] * K), K - 1));
    ces.push_back(std::move(ce));
  }
  {
    safetensors::Writer w;
    for (size_t i = 0; i < runs.size(); ++i) {
      const Run& run = runs[i];
      const std::string k = "case" + std::to_string(i) + ".";
      w.add(k + "x", nhwc_to_nchw(run.x));
      w.add(k + "r", nhwc_to_nchw(run.r));
      const PoolOptions& o = run.o;
      w.add(k + "params", Tensor<double>::from({double(run.op), double(o.kernel_h), double(o.kernel_w),
                                                double(o.stride_h), double(o.stride_w), double(o.pad_h),
                                                double(o.pad_w), double(o.ceil_mode), double(o.count_include_pad)},
                                               {9}));
    }
    w.add("ncases", Tensor<double>::full({1}, double(runs.size())));
    w.add("gap.x", nhwc_to_nchw(gap_x));
    w.add("gap.r", gap_r);
    w.add("ls.x", ls_x);
    w.add("ls.r", ls_r);
    for (size_t j = 0; j < ces.size(); ++j) {
      const std::string k = "ce" + std::to_string(j) + ".";
      w.add(k + "logits", ces[j].z);
      Tensor<int64_t> y({static_cast<int64_t>(ces[j].y.size())});
      for (size_t i = 0; i < ces[j].y.size(); ++i) y[i] = ces[j].y[i];
      w.add(k + "labels", y);
    }
    w.add("nce", Tensor<double>::full({1}, double(ces.size())));
    w.write(in);
  }
  const std::string cmd = std::string("cd '") + DIFFUSE_SOURCE_DIR + "/tests/torch' && '" + DIFFUSE_TORCH_PYTHON +
                          "' pool_ref.py '" + in + "' '" + out + "'";
  INFO(cmd);
  REQUIRE(std::system(cmd.c_str()) == 0);
  const safetensors::File ref = safetensors::File::read(out);

  constexpr double kParity = 1e-5;
  double worst_fwd = 0, worst_grad = 0;
  auto check = [&](const Tensor<float>& ours_nhwc, const std::string& name, bool is_grad) {
    INFO(name);
    const Tensor<float> theirs = ref.tensor<float>(name);
    const Tensor<float> ours = ours_nhwc.dim() == 4 ? nhwc_to_nchw(ours_nhwc) : ours_nhwc;
    const double e = rel_err(ours, theirs);
    double& worst = is_grad ? worst_grad : worst_fwd;
    worst = std::max(worst, e);
    CHECK(e < kParity);
  };
  for (size_t i = 0; i < runs.size(); ++i) {
    INFO("case " << i << ": " << runs[i].label << ", " << describe(runs[i].o) << " on " << shape_str(runs[i].x.shape()));
    const std::string k = "case" + std::to_string(i) + ".";
    check(runs[i].out, k + "out", false);
    check(runs[i].grad, k + "grad.x", true);
  }
  {
    Var<float> x(gap_x, true);
    Var<float> y = global_avg_pool(x);
    backward(sum(mul(y, Var<float>(gap_r))));
    check(y.value(), "gap.out", false);
    check(x.grad(), "gap.grad.x", true);
  }
  {
    Var<float> x(ls_x, true);
    Var<float> y = log_softmax(x);
    backward(sum(mul(y, Var<float>(ls_r))));
    check(y.value(), "ls.out", false);
    check(x.grad(), "ls.grad.x", true);
  }
  for (size_t j = 0; j < ces.size(); ++j) {
    INFO("cross_entropy case " << j << ": logits " << shape_str(ces[j].z.shape()));
    const std::string k = "ce" + std::to_string(j) + ".";
    Var<float> z(ces[j].z, true);
    Var<float> l = cross_entropy(z, ces[j].y);
    backward(l);
    check(l.value().reshape({1}), k + "loss", false);
    check(z.grad(), k + "grad", true);
    CHECK(argmax_rows(ces[j].z) == [&] {
      const Tensor<int64_t> a = ref.tensor<int64_t>(k + "argmax");
      return std::vector<int32_t>(a.begin(), a.end());
    }());
  }
  std::printf("pool and loss ops vs PyTorch: worst relative error, forward %.3g, gradients %.3g\n", worst_fwd,
              worst_grad);
}
