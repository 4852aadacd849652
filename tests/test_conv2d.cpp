// conv2d (NHWC, OHWI weights): finite-difference gradients in double, float against a direct
// loop at sizes that cross the im2col block and thread boundaries, and
// PyTorch's F.conv2d (tests/torch/conv2d_ref.py) on the NCHW view with OIHW weights.
#include <catch2/catch.hpp>

#include <array>

#include "kernel_seed.hpp"

#include <diffuse/diffuse.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>

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

struct Case {
  int64_t N, H, W, C, O, kh, kw;
  Conv2dOptions opt;
};

// y[n, oy, ox, o] by the definition, in double.
template <class T>
std::vector<double> conv_direct(const Tensor<T>& x, const Tensor<T>& w, const Tensor<T>* b, const Conv2dOptions& o) {
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), O = w.size(0), kh = w.size(1),
                kw = w.size(2);
  const int64_t Ho = (H + 2 * o.pad_h - kh) / o.stride_h + 1, Wo = (W + 2 * o.pad_w - kw) / o.stride_w + 1;
  std::vector<double> y(static_cast<size_t>(N * Ho * Wo * O));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t oy = 0; oy < Ho; ++oy)
      for (int64_t ox = 0; ox < Wo; ++ox)
        for (int64_t oc = 0; oc < O; ++oc) {
          double acc = b ? static_cast<double>((*b)[oc]) : 0.0;
          for (int64_t c = 0; c < C; ++c)
            for (int64_t ky = 0; ky < kh; ++ky)
              for (int64_t kx = 0; kx < kw; ++kx) {
                const int64_t iy = oy * o.stride_h - o.pad_h + ky, ix = ox * o.stride_w - o.pad_w + kx;
                if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                acc += static_cast<double>(x[((n * H + iy) * W + ix) * C + c]) *
                       static_cast<double>(w[((oc * kh + ky) * kw + kx) * C + c]);
              }
          y[static_cast<size_t>(((n * Ho + oy) * Wo + ox) * O + oc)] = acc;
        }
  return y;
}

}  // namespace

TEST_CASE("gradcheck: conv2d, every kernel shape, stride and padding") {
  const Case cases[] = {
      {2, 4, 5, 3, 2, 1, 1, {}},                    // 1x1: the plain-GEMM path
      {2, 5, 4, 3, 4, 3, 3, {1, 1, 1, 1}},          // 3x3 same padding (the U-Net's)
      {3, 6, 5, 2, 3, 3, 3, {2, 2, 1, 1}},          // strided downsample, odd width
      {1, 4, 7, 2, 2, 1, 3, {1, 1, 0, 1}},          // 1x3, asymmetric padding (Inception's 1x7 kind)
      {2, 5, 6, 3, 2, 2, 3, {2, 1, 0, 2}},          // rectangular kernel, different strides
      {1, 3, 3, 2, 3, 3, 3, {1, 1, 0, 0}},          // no padding, one output pixel
      {2, 3, 4, 1, 2, 1, 1, {2, 2, 0, 0}},          // 1x1 with stride 2: not the pointwise path
  };
  uint64_t seed = 1;
  for (const Case& c : cases) {
    INFO("N " << c.N << " H " << c.H << " W " << c.W << " C " << c.C << " O " << c.O << " k " << c.kh << "x" << c.kw
              << " stride " << c.opt.stride_h << "," << c.opt.stride_w << " pad " << c.opt.pad_h << "," << c.opt.pad_w);
    Generator g(seed++);
    auto x = rand_var({c.N, c.H, c.W, c.C}, g), w = rand_var({c.O, c.kh, c.kw, c.C}, g), b = rand_var({c.O}, g);
    const Conv2dOptions o = c.opt;
    CHECK(max_gradcheck_error([o](auto& v) { return conv2d(v[0], v[1], v[2], o); }, {x, w, b}, seed) < 1e-6);
    // without a bias, and with only some inputs requiring gradients
    auto xc = rand_var({c.N, c.H, c.W, c.C}, g, false);
    CHECK(max_gradcheck_error([o](auto& v) { return conv2d(v[0], v[1], Var<double>(), o); }, {xc, w}, seed) < 1e-6);
    // the same x feeding two convolutions accumulates into one gradient
    CHECK(max_gradcheck_error([o](auto& v) { return add(conv2d(v[0], v[1], v[2], o), conv2d(v[0], v[1], v[2], o)); },
                              {x, w, b}, seed) < 1e-6);
  }
}

TEST_CASE("conv2d with a channel bias and a residual: the unfused ops' numbers, and their gradients") {
  // The fused epilogue adds the same terms in the same order as conv2d, add_channel_bias and add:
  // bit for bit the same output and gradients in float; and its gradients by finite differences.
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  for (const Conv2dOptions o : {Conv2dOptions{1, 1, 1, 1}, Conv2dOptions{1, 1, 0, 0}}) {
    const int64_t k = o.pad_h == 1 ? 3 : 1;
    Var<float> x(Tensor<float>::randn({2, 5, 4, 3}, g), true), w(Tensor<float>::randn({6, k, k, 3}, g), true);
    Var<float> b(Tensor<float>::randn({6}, g), true), cb(Tensor<float>::randn({2, 6}, g), true);
    Var<float> r(Tensor<float>::randn({2, 5, 4, 6}, g), true);
    const Tensor<float> gy = Tensor<float>::randn({2, 5, 4, 6}, g);
    auto grads = [&](const Var<float>& y) {
      for (Var<float>* v : {&x, &w, &b, &cb, &r}) v->zero_grad();
      Tape<float>::current().backward(y, &gy);
      std::vector<Tensor<float>> out{y.value().clone()};
      for (Var<float>* v : {&x, &w, &b, &cb, &r}) out.push_back(v->grad().clone());
      return out;
    };
    const auto fused = grads(conv2d(x, w, b, o, cb, r));
    const auto plain = grads(add(r, add_channel_bias(conv2d(x, w, b, o), cb)));
    for (size_t i = 0; i < fused.size(); ++i) {
      INFO("tensor " << i << " (output, then the gradients of x, w, b, cb, residual)");
      CHECK(std::equal(fused[i].begin(), fused[i].end(), plain[i].begin()));
    }
    auto xd = rand_var({2, 5, 4, 3}, g), wd = rand_var({6, k, k, 3}, g), bd = rand_var({6}, g);
    auto cbd = rand_var({2, 6}, g), rd = rand_var({2, 5, 4, 6}, g);
    CHECK(max_gradcheck_error([o](auto& v) { return conv2d(v[0], v[1], v[2], o, v[3], v[4]); }, {xd, wd, bd, cbd, rd},
                              seed) < 1e-6);
  }
  // The residual may be the input itself (the ResBlock without a skip convolution): x's gradient
  // then gets both contributions.
  auto xs = rand_var({2, 4, 4, 5}, g), ws = rand_var({5, 3, 3, 5}, g);
  CHECK(max_gradcheck_error([](auto& v) { return conv2d(v[0], v[1], Var<double>(), Conv2dOptions{1, 1, 1, 1},
                                                        Var<double>(), v[0]); },
                            {xs, ws}, seed) < 1e-6);
  Var<float> x(Tensor<float>::randn({2, 5, 4, 3}, g)), w(Tensor<float>::randn({6, 3, 3, 3}, g));
  CHECK_THROWS_WITH(conv2d(x, w, Var<float>(), Conv2dOptions{1, 1, 1, 1}, Var<float>(Tensor<float>::randn({2, 5}, g)),
                           Var<float>()),
                    Catch::Contains("channel bias [2, 5]: expected [2, 6]"));
  CHECK_THROWS_WITH(conv2d(x, w, Var<float>(), Conv2dOptions{1, 1, 1, 1}, Var<float>(), x),
                    Catch::Contains("residual [2, 5, 4, 3]: expected the output's shape [2, 5, 4, 6]"));
}

TEST_CASE("conv2d float matches the direct loop across blocks and threads") {
  // Enough output pixels for several im2col blocks per thread, channel
  // counts off the GEMM tile sizes, and every path (pointwise, 3x3, strided).
  const Case cases[] = {
      {3, 17, 13, 37, 21, 3, 3, {1, 1, 1, 1}},
      {4, 16, 16, 64, 32, 3, 3, {2, 2, 1, 1}},
      {5, 9, 11, 19, 70, 1, 1, {}},
      {2, 8, 8, 300, 24, 3, 3, {1, 1, 1, 1}},  // K = 2700: small blocks
  };
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed << " (DIFFUSE_TEST_SEED replays it)");
  Generator g(seed);
  for (const Case& c : cases) {
    INFO("C " << c.C << " O " << c.O << " k " << c.kh);
    Var<float> x(Tensor<float>::randn({c.N, c.H, c.W, c.C}, g), true), w(Tensor<float>::randn({c.O, c.kh, c.kw, c.C}, g), true),
        b(Tensor<float>::randn({c.O}, g), true);
    Var<float> y = conv2d(x, w, b, c.opt);
    const std::vector<double> ref = conv_direct(x.value(), w.value(), &b.value(), c.opt);
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      num += (y.value()[i] - ref[i]) * (y.value()[i] - ref[i]);
      den += ref[i] * ref[i];
    }
    // Float against double: the output sums K = C kh kw products, the input gradient O kh kw,
    // the weight and bias gradients one per output pixel (N Ho Wo); see float_sums_tolerance.
    const double Ky = double(c.C * c.kh * c.kw), Kx = double(c.O * c.kh * c.kw),
                 Kw = double(y.value().numel() / c.O);
    CHECK(std::sqrt(num / den) < float_sums_tolerance(Ky));
    // Gradients of sum(y * R) against the double implementation.
    Tensor<float> R = Tensor<float>::randn(y.shape(), g);
    backward(sum(mul(y, Var<float>(R))));
    Var<double> xd(Tensor<double>(x.shape()), true), wd(Tensor<double>(w.shape()), true), bd(Tensor<double>(b.shape()), true);
    std::copy(x.value().begin(), x.value().end(), xd.value().begin());
    std::copy(w.value().begin(), w.value().end(), wd.value().begin());
    std::copy(b.value().begin(), b.value().end(), bd.value().begin());
    Tensor<double> Rd(R.shape());
    std::copy(R.begin(), R.end(), Rd.begin());
    backward(sum(mul(conv2d(xd, wd, bd, c.opt), Var<double>(Rd))));
    const double ex = rel_err(x.grad(), xd.grad()), ew = rel_err(w.grad(), wd.grad()), eb = rel_err(b.grad(), bd.grad());
    std::printf("conv2d C %lld O %lld k %lld vs double: y %.2g (bound %.2g), dx %.2g (%.2g), dw %.2g (%.2g), db %.2g (%.2g)\n",
                (long long)c.C, (long long)c.O, (long long)c.kh, std::sqrt(num / den), float_sums_tolerance(Ky), ex,
                float_sums_tolerance(Kx), ew, float_sums_tolerance(Kw), eb, float_sums_tolerance(Kw));
    CHECK(ex < float_sums_tolerance(Kx));
    CHECK(ew < float_sums_tolerance(Kw));
    CHECK(eb < float_sums_tolerance(Kw));
  }
}

TEST_CASE("conv2d rejects bad shapes with a clear message") {
  Generator g(3);
  Var<float> x(Tensor<float>::randn({1, 4, 4, 3}, g)), w(Tensor<float>::randn({2, 3, 3, 5}, g));
  CHECK_THROWS_WITH(conv2d(x, w, Var<float>(), 1, 1), Catch::Contains("weight [O,kh,kw,C]"));
  Var<float> w2(Tensor<float>::randn({2, 7, 7, 3}, g));
  CHECK_THROWS_WITH(conv2d(x, w2, Var<float>(), 1, 1), Catch::Contains("larger than the padded input"));
  Var<float> w3(Tensor<float>::randn({2, 3, 3, 3}, g)), b3(Tensor<float>::randn({3}, g));
  CHECK_THROWS_WITH(conv2d(x, w3, b3, 1, 1), Catch::Contains("bias"));
}

TEST_CASE("conv2d matches PyTorch F.conv2d, forward and gradients") {
  if (std::string(DIFFUSE_TORCH_PYTHON).empty()) {
    DIFFUSE_SKIP("no python with torch found at configure time: PyTorch comparison skipped");
  }
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Case cases[] = {
      {4, 16, 16, 32, 64, 3, 3, {1, 1, 1, 1}},
      {2, 16, 16, 64, 64, 3, 3, {2, 2, 1, 1}},
      {3, 8, 8, 96, 64, 1, 1, {}},
      {2, 9, 10, 5, 7, 1, 3, {1, 2, 0, 1}},
  };
  const fs::path dir = fs::path(DIFFUSE_BINARY_DIR) / "tests" / "torch_parity";
  fs::create_directories(dir);
  // Every case into one file and one python run (starting torch costs a second or two).
  struct Result {
    Tensor<float> y, dx, dw, db;
  };
  std::vector<Result> ours;
  std::vector<std::array<int64_t, 4>> opts;
  opts.reserve(std::size(cases));  // no reallocation: the writer holds pointers into it
  safetensors::Writer wr;
  for (const Case& c : cases) {
    // The weight is drawn in PyTorch's [O, C, kh, kw] and converted as a checkpoint is loaded
    // (from_torch_layout); its gradient goes back as a checkpoint is saved (to_torch_layout), so
    // both conversions are checked against PyTorch too, not only against each other.
    Tensor<float> w_torch = Tensor<float>::randn({c.O, c.C, c.kh, c.kw}, g);
    for (auto& v : w_torch) v *= 0.1f;
    Var<float> x(Tensor<float>::randn({c.N, c.H, c.W, c.C}, g), true),
        w(from_torch_layout(w_torch, ParamLayout::ConvOHWI), true), b(Tensor<float>::randn({c.O}, g), true);
    Var<float> y = conv2d(x, w, b, c.opt);
    Tensor<float> gy = Tensor<float>::randn(y.shape(), g);
    backward(sum(mul(y, Var<float>(gy))));
    const std::string k = "c" + std::to_string(ours.size()) + ".";
    wr.add(k + "x", nhwc_to_nchw(x.value()));
    wr.add(k + "w", w_torch);
    wr.add(k + "b", b.value());
    wr.add(k + "gy", nhwc_to_nchw(gy));
    opts.push_back({c.opt.stride_h, c.opt.stride_w, c.opt.pad_h, c.opt.pad_w});  // add_raw keeps a pointer
    wr.add_raw(k + "opt", safetensors::DType::I64, {4}, opts.back().data(), sizeof(int64_t) * 4);
    ours.push_back({nhwc_to_nchw(y.value()), nhwc_to_nchw(x.grad()), to_torch_layout(w.grad(), ParamLayout::ConvOHWI),
                    b.grad().clone()});
  }
  const std::string in = (dir / "conv_in.safetensors").string(), out = (dir / "conv_out.safetensors").string();
  wr.write(in);
  const std::string cmd = std::string("cd '") + DIFFUSE_SOURCE_DIR + "/tests/torch' && '" + DIFFUSE_TORCH_PYTHON +
                          "' conv2d_ref.py '" + in + "' '" + out + "'";
  REQUIRE(std::system(cmd.c_str()) == 0);
  const auto ref = safetensors::File::read(out);
  for (size_t i = 0; i < ours.size(); ++i) {
    INFO("case " << i);
    const std::string k = "c" + std::to_string(i) + ".";
    // Float against float (see float_sums_tolerance): y sums C kh kw products, dx O kh kw (at most;
    // strided cases fewer), dw and db one per output pixel.
    const Case& c = cases[i];
    const double Ky = double(c.C * c.kh * c.kw), Kx = double(c.O * c.kh * c.kw),
                 Kw = double(ours[i].y.numel() / c.O);
    const double ey = rel_err(ours[i].y, ref.tensor<float>(k + "y")), ex = rel_err(ours[i].dx, ref.tensor<float>(k + "dx")),
                 ew = rel_err(ours[i].dw, ref.tensor<float>(k + "dw")), eb = rel_err(ours[i].db, ref.tensor<float>(k + "db"));
    std::printf("conv2d case %zu vs PyTorch: y %.2g (bound %.2g), dx %.2g (%.2g), dw %.2g (%.2g), db %.2g (%.2g)\n", i, ey,
                float_sums_tolerance(Ky), ex, float_sums_tolerance(Kx), ew, float_sums_tolerance(Kw), eb,
                float_sums_tolerance(Kw));
    CHECK(ey < float_sums_tolerance(Ky));
    CHECK(ex < float_sums_tolerance(Kx));
    CHECK(ew < float_sums_tolerance(Kw));
    CHECK(eb < float_sums_tolerance(Kw));
  }
}
