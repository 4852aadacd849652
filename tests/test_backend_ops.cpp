// Every op of the public op API, forward and backward, on the CUDA backend against the CPU
// backend (backend_ops.hpp), on fresh random inputs of awkward shapes; and the ops added for
// transformer blocks (GELU, layer norm, permute) checked by finite differences in double on the
// CPU. Built twice: test_backend_ops (the emulation, in CI) and test_backend_ops_cuda (a GPU).
#include "backend_ops.hpp"
#include "gradcheck.hpp"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

using namespace diffuse;
using namespace diffuse::testing;

namespace {

Generator gen() { return Generator(fresh_seed()); }

}  // namespace

TEST_CASE("backend ops: add, sub, mul with broadcasting") {
  CudaScope cuda;
  Generator g = gen();
  INFO("seed " << g.seed);
  const std::vector<std::pair<Shape, Shape>> shapes = {
      {{7, 33}, {7, 33}}, {{7, 33}, {33}}, {{33}, {7, 33}}, {{}, {3, 5}},        {{4, 1, 3}, {2, 1}},
      {{2, 3, 4, 5}, {3, 1, 5}}, {{1}, {1}}, {{5, 1}, {1, 6}}, {{2, 1, 3, 1}, {1, 4, 1, 5}}};
  for (const auto& [sa, sb] : shapes) {
    const auto in = inputs_of({randn_t(sa, g), randn_t(sb, g)});
    const std::string what = shape_str(sa) + " and " + shape_str(sb);
    check_op("add " + what, [](const auto& v) { return add(v[0], v[1]); }, in, 1e-5, -1, true);
    check_op("sub " + what, [](const auto& v) { return sub(v[0], v[1]); }, in, 1e-5, -1, true);
    check_op("mul " + what, [](const auto& v) { return mul(v[0], v[1]); }, in, 1e-5, -1, true);
  }
  // The same Var on both sides: both gradient contributions meet in one buffer.
  check_op("mul x * x", [](const auto& v) { return mul(v[0], v[0]); }, inputs_of({randn_t({5, 9}, g)}));
  check_op("sub x - x", [](const auto& v) { return sub(v[0], v[0]); }, inputs_of({randn_t({5, 9}, g)}));
  // One input without a gradient.
  check_op("add, b constant", [](const auto& v) { return add(v[0], v[1]); },
           {{randn_t({3, 4}, g), true}, {randn_t({4}, g), false}});
}

TEST_CASE("backend ops: scale, silu, relu, gelu") {
  CudaScope cuda;
  Generator g = gen();
  for (Shape s : {Shape{1}, Shape{33}, Shape{7, 129}, Shape{3, 4, 5, 6}}) {
    Tensor<float> x = randn_t(s, g);
    for (float& v : x) v *= 4.0f;  // both tails
    const auto in = inputs_of({x});
    check_op("scale " + shape_str(s), [](const auto& v) { return scale(v[0], -1.75f); }, in);
    check_op("silu " + shape_str(s), [](const auto& v) { return silu(v[0]); }, in, 1e-6);
    check_op("relu " + shape_str(s), [](const auto& v) { return relu(v[0]); }, in, 1e-7);
    check_op("gelu " + shape_str(s), [](const auto& v) { return gelu(v[0]); }, in, 1e-6);
  }
}

TEST_CASE("backend ops: matmul, linear, linear_act, linear_gather_act") {
  CudaScope cuda;
  Generator g = gen();
  struct Mnk {
    int64_t m, k, n;
  };
  for (Mnk s : {Mnk{1, 1, 1}, Mnk{7, 33, 5}, Mnk{65, 3, 17}, Mnk{16, 128, 64}}) {
    const std::string what = std::to_string(s.m) + "x" + std::to_string(s.k) + "x" + std::to_string(s.n);
    check_op("matmul " + what, [](const auto& v) { return matmul(v[0], v[1]); },
             inputs_of({randn_t({s.m, s.k}, g), randn_t({s.k, s.n}, g)}));
    const auto lin = inputs_of({randn_t({s.m, s.k}, g), randn_t({s.n, s.k}, g), randn_t({s.n}, g)});
    check_op("linear " + what, [](const auto& v) { return linear(v[0], v[1], v[2]); }, lin);
    check_op("linear without bias " + what, [](const auto& v) { return linear(v[0], v[1]); },
             inputs_of({randn_t({s.m, s.k}, g), randn_t({s.n, s.k}, g)}));
    for (Activation a : {Activation::SiLU, Activation::ReLU, Activation::None, Activation::GELU})
      check_op("linear_act " + what + " act " + std::to_string(static_cast<int>(a)),
               [a](const auto& v) { return linear_act(v[0], v[1], v[2], a); }, lin);
    // A table of 5 rows gathered by index, repeats included.
    std::vector<int32_t> idx(static_cast<size_t>(s.m));
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int32_t>((i * 3) % 5);
    const auto gin = inputs_of({randn_t({s.m, s.k}, g), randn_t({s.n, s.k}, g), randn_t({s.n}, g), randn_t({5, s.n}, g)});
    for (Activation a : {Activation::SiLU, Activation::None})
      check_op("linear_gather_act " + what, [a, idx](const auto& v) { return linear_gather_act(v[0], v[1], v[2], v[3], idx, a); },
               gin);
  }
}

TEST_CASE("backend ops: concat, slice, gather_rows, reshape, permute, transpose") {
  CudaScope cuda;
  Generator g = gen();
  for (int64_t axis : {0, 1, 2}) {
    Shape a{3, 4, 5}, b{3, 4, 5};
    b[static_cast<size_t>(axis)] = 2;
    check_op("concat axis " + std::to_string(axis), [axis](const auto& v) { return concat<float>({v[0], v[1], v[0]}, axis); },
             inputs_of({randn_t(a, g), randn_t(b, g)}));
    check_op("slice axis " + std::to_string(axis), [axis](const auto& v) { return slice(v[0], axis, 1, 3); },
             inputs_of({randn_t({4, 5, 6}, g)}));
  }
  const std::vector<int32_t> idx{2, 0, 2, 6, 1, 2};
  check_op("gather_rows", [idx](const auto& v) { return gather_rows(v[0], idx); }, inputs_of({randn_t({7, 33}, g)}));
  check_op("reshape", [](const auto& v) { return reshape(v[0], {6, -1}); }, inputs_of({randn_t({3, 4, 5}, g)}));
  check_op("permute 3-D", [](const auto& v) { return permute(v[0], {2, 0, 1}); }, inputs_of({randn_t({3, 4, 5}, g)}));
  check_op("permute 5-D", [](const auto& v) { return permute(v[0], {4, 1, 3, 0, 2}); },
           inputs_of({randn_t({2, 3, 1, 4, 5}, g)}));
  check_op("transpose", [](const auto& v) { return transpose(v[0], 0, -1); }, inputs_of({randn_t({33, 7}, g)}));
}

TEST_CASE("backend ops: sum, mean, mse, log_softmax, cross_entropy") {
  CudaScope cuda;
  Generator g = gen();
  for (Shape s : {Shape{1}, Shape{1000}, Shape{7, 33}, Shape{3, 100, 11}}) {
    const auto in = inputs_of({randn_t(s, g)});
    check_op("sum " + shape_str(s), [](const auto& v) { return sum(v[0]); }, in);
    check_op("mean " + shape_str(s), [](const auto& v) { return mean(v[0]); }, in);
    check_op("mse " + shape_str(s), [](const auto& v) { return mse(v[0], v[1]); }, inputs_of({randn_t(s, g), randn_t(s, g)}));
    check_op("log_softmax " + shape_str(s), [](const auto& v) { return log_softmax(v[0]); }, in);
  }
  for (int64_t K : {2, 10, 33}) {
    std::vector<int32_t> labels{0, 1, 1, 0, static_cast<int32_t>(K - 1)};
    Tensor<float> z = randn_t({5, K}, g);
    for (float& v : z) v *= 5.0f;
    check_op("cross_entropy K " + std::to_string(K), [labels](const auto& v) { return cross_entropy(v[0], labels); },
             inputs_of({z}));
  }
}

TEST_CASE("backend ops: conv2d") {
  CudaScope cuda;
  Generator g = gen();
  struct Case {
    const char* what;
    Shape x;
    int64_t O, kh, kw;
    Conv2dOptions opt;
    bool bias;
  };
  for (const Case& c : {Case{"3x3 pad 1", {2, 5, 6, 3}, 4, 3, 3, {1, 1, 1, 1}, true},
                        Case{"3x3 stride 2", {2, 7, 7, 5}, 3, 3, 3, {2, 2, 1, 1}, true},
                        Case{"1x1", {3, 4, 4, 7}, 5, 1, 1, {1, 1, 0, 0}, true},
                        Case{"1x3 pad (0, 1), no bias", {2, 5, 5, 4}, 6, 1, 3, {1, 1, 0, 1}, false},
                        Case{"3x1 stride 2 no pad", {1, 9, 4, 2}, 3, 3, 1, {2, 2, 0, 0}, true}}) {
    std::vector<Tensor<float>> t{randn_t(c.x, g), randn_t({c.O, c.kh, c.kw, c.x[3]}, g)};
    if (c.bias) t.push_back(randn_t({c.O}, g));
    const Conv2dOptions opt = c.opt;
    check_op(std::string("conv2d ") + c.what,
             [opt](const auto& v) { return conv2d(v[0], v[1], v.size() > 2 ? v[2] : Var<float>(), opt); }, inputs_of(t));
  }
  // The fused epilogue (the ResBlock's): a channel bias [N, O], a residual of the output's shape,
  // both, and without the convolution's own bias; 3x3 (cuDNN, then the epilogue kernel).
  const Conv2dOptions same{1, 1, 1, 1};
  const Tensor<float> x = randn_t({2, 5, 6, 3}, g), w = randn_t({4, 3, 3, 3}, g), b = randn_t({4}, g);
  const Tensor<float> cb = randn_t({2, 4}, g), res = randn_t({2, 5, 6, 4}, g);
  check_op("conv2d + channel bias", [same](const auto& v) { return conv2d(v[0], v[1], v[2], same, v[3], Var<float>()); },
           inputs_of({x, w, b, cb}));
  check_op("conv2d + residual", [same](const auto& v) { return conv2d(v[0], v[1], v[2], same, Var<float>(), v[3]); },
           inputs_of({x, w, b, res}));
  check_op("conv2d + channel bias + residual, no bias",
           [same](const auto& v) { return conv2d(v[0], v[1], Var<float>(), same, v[2], v[3]); },
           inputs_of({x, w, cb, res}));
}

// MathMode::BF16 on the device against the CPU's FP32: the ops whose products round their
// operands to bf16 (u = 2^-8 relative each; a convolution also rounds its result). A sum of
// products with independently rounded operands is off by about u relative in norm (the errors of
// its terms have random signs), so 4u = 2^-6 bounds the output and every gradient, also when
// the gradients of an input used twice are summed (in float). The kernel tests check the
// rounding itself element by element (kernel conv in BF16, gemm in BF16 mode).
TEST_CASE("backend ops: conv2d, linear, matmul and attention in bf16 stay within 4u of FP32") {
  CudaScope cuda;
  struct RestoreFP32 {
    ~RestoreFP32() { set_cuda_math_mode(MathMode::FP32); }
  } restore;
  set_cuda_math_mode(MathMode::BF16);
  Generator g = gen();
  const double tol = std::ldexp(1.0, -6);
  for (const bool bias : {true, false}) {
    std::vector<Tensor<float>> t{randn_t({2, 7, 6, 5}, g), randn_t({33, 3, 3, 5}, g)};
    if (bias) t.push_back(randn_t({33}, g));
    const Conv2dOptions opt{1, 1, 1, 1};
    check_op(std::string("bf16 conv2d 3x3") + (bias ? "" : " no bias"),
             [opt](const auto& v) { return conv2d(v[0], v[1], v.size() > 2 ? v[2] : Var<float>(), opt); }, inputs_of(t),
             tol);
  }
  check_op("bf16 conv2d 3x3 stride 2", [](const auto& v) { return conv2d(v[0], v[1], v[2], Conv2dOptions{2, 2, 1, 1}); },
           inputs_of({randn_t({3, 9, 8, 16}, g), randn_t({8, 3, 3, 16}, g), randn_t({8}, g)}), tol);
  {
    // The backward reads the bf16 operands its forward rounded (kept, as autocast keeps its casts),
    // not the float tensors again: overwriting x and w after the forward leaves every gradient
    // bit for bit as it was (and rounding them again would give other numbers).
    const Tensor<float> x = randn_t({2, 7, 6, 5}, g), w = randn_t({9, 3, 3, 5}, g), R = randn_t({2, 7, 6, 9}, g);
    const Tensor<float> x2 = randn_t(x.shape(), g), w2 = randn_t(w.shape(), g);
    auto grads = [&](bool overwrite) {
      Var<float> xv(x.cuda(), true), wv(w.cuda(), true);
      const Var<float> y = conv2d(xv, wv, Var<float>(), Conv2dOptions{1, 1, 1, 1});
      if (overwrite) {
        xv.value().copy_from(x2);
        wv.value().copy_from(w2);
      }
      backward(sum(mul(y, Var<float>(R.cuda()))));
      return std::vector<Tensor<float>>{xv.grad().cpu(), wv.grad().cpu()};
    };
    const auto kept = grads(false), overwritten = grads(true);
    for (size_t k = 0; k < 2; ++k) {
      INFO("bf16 conv2d: gradient " << k << " after its operands were overwritten");
      CHECK(rel_err(overwritten[k], kept[k]) == 0.0);
    }
  }
  check_op("bf16 linear", [](const auto& v) { return linear(v[0], v[1], v[2]); },
           inputs_of({randn_t({65, 33}, g), randn_t({17, 33}, g), randn_t({17}, g)}), tol);
  check_op("bf16 matmul", [](const auto& v) { return matmul(v[0], v[1]); },
           inputs_of({randn_t({16, 128}, g), randn_t({128, 64}, g)}), tol);
  check_op("bf16 attention (full kernels: GEMMs in bf16, softmax in float)",
           [](const auto& v) { return attention(v[0], v[1], v[2], 2); },
           inputs_of({randn_t({2, 9, 8}, g), randn_t({2, 9, 8}, g), randn_t({2, 9, 8}, g)}), tol);
}

// group_norm_conv2d: the two ops (group_norm_dropout, then conv2d with its epilogue) on the CPU
// and on the device in FP32 and TF32; under BF16 one op whose normalised activation exists only in
// bf16. Checked against the CPU (FP32: 2e-5; BF16: the 4u bound of the test above), and, under BF16,
// against the two ops on the device bit for bit (h rounded once from the same float either way).
TEST_CASE("backend ops: group_norm_conv2d on both devices, and in bf16 bit for bit the two ops") {
  CudaScope cuda;
  struct RestoreFP32 {
    ~RestoreFP32() { set_cuda_math_mode(MathMode::FP32); }
  } restore;
  Generator g = gen();
  INFO("seed " << g.seed);
  const uint64_t seed = g.seed;
  const Conv2dOptions same{1, 1, 1, 1};
  const std::vector<Tensor<float>> t{randn_t({3, 5, 4, 8}, g), randn_t({8}, g), randn_t({8}, g),
                                     randn_t({6, 3, 3, 8}, g), randn_t({6}, g),    randn_t({3, 6}, g),
                                     randn_t({3, 5, 4, 6}, g)};
  // v: x, gamma, beta, w, b, cb, res.
  auto op = [seed, same](double p, bool silu, bool extras) {
    return [seed, same, p, silu, extras](const std::vector<Var<float>>& v) {
      Generator d(seed, 13);
      const GroupNormArgs<float> n{v[1], v[2], 4, 1e-6, silu, p, &d};
      return group_norm_conv2d(v[0], n, v[3], v[4], same, extras ? v[5] : Var<float>(), extras ? v[6] : Var<float>());
    };
  };
  auto two_ops = [seed, same](double p, bool silu, bool extras) {
    return [seed, same, p, silu, extras](const std::vector<Var<float>>& v) {
      Generator d(seed, 13);
      const Var<float> h = p > 0 ? group_norm_dropout(v[0], v[1], v[2], 4, 1e-6, silu, p, d)
                                 : group_norm(v[0], v[1], v[2], 4, 1e-6, silu);
      return conv2d(h, v[3], v[4], same, extras ? v[5] : Var<float>(), extras ? v[6] : Var<float>());
    };
  };
  struct Case {
    double p;
    bool silu, extras;
  };
  for (const MathMode m : {MathMode::FP32, MathMode::BF16}) {
    set_cuda_math_mode(m);
    const double tol = m == MathMode::BF16 ? std::ldexp(1.0, -6) : 2e-5;
    for (const Case c : {Case{0.0, true, false}, Case{0.3, true, true}, Case{0.0, false, true}}) {
      const std::string what = std::string(math_mode_name(m)) + " group_norm_conv2d p " + std::to_string(c.p) +
                               (c.silu ? " silu" : "") + (c.extras ? " + channel bias + residual" : "");
      std::vector<OpInput> in = inputs_of(t);
      if (!c.extras) in.resize(5);
      check_op(what, op(c.p, c.silu, c.extras), in, tol);
      if (m != MathMode::BF16) continue;
      // Against the two ops on the device: output and every gradient equal, used once and twice.
      INFO(what << ": against the two ops on the device");
      const Tensor<float> R = randn_t({3, 5, 4, 6}, g);
      for (const bool twice : {false, true}) {
        const OpRun a = run_op(op(c.p, c.silu, c.extras), in, R, R, Device::CUDA, twice);
        const OpRun b = run_op(two_ops(c.p, c.silu, c.extras), in, R, R, Device::CUDA, twice);
        CHECK(rel_err(a.out, b.out) == 0.0);
        for (size_t k = 0; k < in.size(); ++k) {
          INFO("gradient of input " << k << (twice ? ", inputs used twice" : ""));
          REQUIRE(a.grads[k].defined());
          CHECK(rel_err(a.grads[k], b.grads[k]) == 0.0);
        }
      }
    }
  }
  // Only some inputs needing a gradient (the normalisation's parameters frozen, x constant).
  set_cuda_math_mode(MathMode::BF16);
  std::vector<OpInput> in = inputs_of(t);
  in.resize(5);
  in[0].requires_grad = in[1].requires_grad = in[2].requires_grad = false;
  check_op("bf16 group_norm_conv2d, x and the norm's parameters constant", op(0.0, true, false), in,
           std::ldexp(1.0, -6));
  in = inputs_of(t);
  in.resize(5);
  in[3].requires_grad = in[4].requires_grad = false;
  check_op("bf16 group_norm_conv2d, the convolution's parameters constant", op(0.0, true, false), in,
           std::ldexp(1.0, -6));
  // Refusals: dropout without a generator, a probability outside [0, 1].
  Var<float> x(t[0].cuda()), ga(t[1].cuda()), be(t[2].cuda()), w(t[3].cuda());
  CHECK_THROWS_WITH(group_norm_conv2d(x, GroupNormArgs<float>{ga, be, 4, 1e-6, true, 0.2, nullptr}, w, Var<float>(), same),
                    Catch::Contains("dropout needs a generator"));
  Generator d(seed);
  CHECK_THROWS_WITH(group_norm_conv2d(x, GroupNormArgs<float>{ga, be, 4, 1e-6, true, 1.5, &d}, w, Var<float>(), same),
                    Catch::Contains("dropout probability must be in [0, 1]"));
  CHECK_THROWS_WITH(group_norm_conv2d(x, GroupNormArgs<float>{ga, be, 4, 1e-6, true, 0.0, nullptr}, Var<float>(t[3]),
                                      Var<float>(), same),
                    Catch::Contains("operands on different devices"));
}

// The backend's bf16 convolution with its output written in bf16 (y16) and its output's gradient
// read in bf16 (dy16), as attention_block uses it: y16 is the float output rounded once, and the
// backward from a bf16 dy is the backward from the same values in float (which it rounds to
// exactly them), bit for bit: dx, dw and the bias gradient.
TEST_CASE("backend ops: a bf16 convolution writes its output and reads its gradient in bf16") {
  CudaScope cuda;
  struct RestoreFP32 {
    ~RestoreFP32() { set_cuda_math_mode(MathMode::FP32); }
  } restore;
  set_cuda_math_mode(MathMode::BF16);
  backend::CudaBackend& be = *backend::cuda_backend();
  Generator g = gen();
  INFO("seed " << g.seed);
  for (const bool pointwise : {true, false}) {
    const int64_t N = 2, H = 5, W = 3, C = 6, O = 10, k = pointwise ? 1 : 3, pad = pointwise ? 0 : 1;
    const backend::ConvDesc d{N, H, W, C, O, k, k, 1, 1, pad, pad};
    const Tensor<float> x = randn_t({N, H, W, C}, g).cuda(), w = randn_t({O, k, k, C}, g).cuda(),
                        b = randn_t({O}, g).cuda(), res = randn_t({N, H, W, O}, g).cuda();
    INFO((pointwise ? "1x1" : "3x3") << " convolution");
    Tensor<float> y({N, H, W, O}, Device::CUDA);
    Tensor<bf16> y16({N, H, W, O}, Device::CUDA);
    be.conv2d(d, x.data(), w.data(), b.data(), nullptr, res.data(), y.data());
    be.conv2d(d, x.data(), w.data(), b.data(), nullptr, res.data(), nullptr, nullptr, nullptr, y16.data());
    const Tensor<float> yc = y.cpu();
    const Tensor<bf16> y16c = y16.cpu();
    size_t bad = 0;
    for (size_t i = 0; i < yc.size(); ++i) bad += y16c[i].bits != bf16(yc[i]).bits;
    CHECK(bad == 0);
    // dy in bf16, and the same values in float.
    Tensor<float> dyf = randn_t({N, H, W, O}, g);
    Tensor<bf16> dy16c({N, H, W, O});
    for (size_t i = 0; i < dyf.size(); ++i) {
      dy16c[i] = bf16(dyf[i]);
      dyf[i] = static_cast<float>(dy16c[i]);
    }
    const Tensor<float> dy = dyf.cuda();
    const Tensor<bf16> dy16 = dy16c.cuda();
    Tensor<float> dx1({N, H, W, C}, Device::CUDA), dw1(w.shape(), Device::CUDA), db1({O}, Device::CUDA);
    Tensor<float> dx2({N, H, W, C}, Device::CUDA), dw2(w.shape(), Device::CUDA), db2({O}, Device::CUDA);
    be.conv2d_backward(d, x.data(), w.data(), dy.data(), dx1.data(), false, dw1.data(), false, db1.data(), false);
    be.conv2d_backward(d, x.data(), w.data(), nullptr, dx2.data(), false, dw2.data(), false, db2.data(), false, nullptr,
                       nullptr, nullptr, dy16.data());
    CHECK(rel_err(dx2.cpu(), dx1.cpu()) == 0.0);
    CHECK(rel_err(dw2.cpu(), dw1.cpu()) == 0.0);
    CHECK(rel_err(db2.cpu(), db1.cpu()) == 0.0);
  }
  // Outside BF16 neither is accepted.
  set_cuda_math_mode(MathMode::FP32);
  const backend::ConvDesc d{1, 2, 2, 3, 4, 1, 1, 1, 1, 0, 0};
  Tensor<float> x({1, 2, 2, 3}, Device::CUDA), w({4, 1, 1, 3}, Device::CUDA), dy({1, 2, 2, 4}, Device::CUDA);
  Tensor<bf16> y16({1, 2, 2, 4}, Device::CUDA);
  CHECK_THROWS_AS(be.conv2d(d, x.data(), w.data(), nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, y16.data()),
                  std::logic_error);
  CHECK_THROWS_AS(be.conv2d_backward(d, x.data(), w.data(), nullptr, x.data(), false, nullptr, false, nullptr, false,
                                     nullptr, nullptr, nullptr, y16.data()),
                  std::logic_error);
}

// attention_block: group_norm, the q, k, v convolutions, attention and the projection with its
// residual. On the CPU, in FP32 on the device (both attention kernels) and under BF16 with the
// full-matrix kernels it is those ops; under BF16 with the flash kernels one op whose activations
// are all bf16 (checked by the profiler's names: the bf16 flash kernels ran, no float ones).
// Tolerances against the CPU: FP32 2e-5 (the attention test's 1e-5, doubled for the five ops in a
// row). BF16: 2^-5 for the output: each of the chain's bf16 roundings (h, q/k/v, the attention's
// output, the operands of the two convolutions) is u = 2^-8 relative per element, about u in
// norm, and about five stand in a row: 2^-5 = 8u (the whole-model bound of the bf16 U-Net tests).
// The same 2^-5 for the gradients of v's and the projection's parameters. The gradients behind the
// scores (x, the norm's parameters, q's and k's weights, q's bias) pass through the softmax
// backward, dS = P (dP - delta), where dP - delta cancels: their relative error is u times
// |dO| |v| / |dP - delta|, unbounded in principle and heavy-tailed in practice: over 600 runs the
// largest was 0.155 with the full-matrix kernels (whose GEMMs read bf16 operands) and 0.071 with
// the flash ones (after their delta was made consistent with P: kernels/flash_attention.cuh;
// 0.196 before), against 0.017 for the others. Their bound is 2^-1, checked with every input
// needing a gradient; the others are then checked again, alone, at 2^-5. The kernels themselves
// are checked bit for bit (kernel_cases_attention.hpp: bf16 flash = the float launch rounded; the
// bf16 convolution's y16 / dy16 above), so this test checks the wiring, where a mistake (a slice
// swapped, a term dropped, a missing scale) is an error of 0.6 or more (scripts/mutants.tsv).
// k's bias gets a gradient of exactly 0 (softmax ignores a constant added to all of a query's
// scores, and q . bk is one): on each device it is rounding noise, so it is not compared with the
// CPU's but checked to be noise: below 2^-3 (FP32: 1e-5) of q's bias gradient, a sum of the same
// size without the cancellation.
// The weights are drawn with PyTorch's init scale (1 / sqrt(C)), so the scores are O(1) as in a
// trained block.
TEST_CASE("backend ops: attention_block on both devices; in bf16 with the flash kernels all of it bf16") {
  CudaScope cuda;
  struct Restore {
    ~Restore() {
      set_cuda_math_mode(MathMode::FP32);
      set_cuda_attention_kernel(AttentionKernel::Full);
    }
  } restore;
  Generator g = gen();
  INFO("seed " << g.seed);
  const uint64_t seed = g.seed;
  struct Case {
    int64_t N, H, W, C;
    int heads;
    double p;
    bool biases;
  };
  // v: x, gamma, beta, wq, wk, wv, wo, then bq, bk, bv, bo.
  auto op = [seed](int heads, double p, bool biases) {
    return [seed, heads, p, biases](const std::vector<Var<float>>& v) {
      Generator d(seed, 21);
      const GroupNormArgs<float> n{v[1], v[2], 4, 1e-6, false, p, &d};
      const Var<float> none;
      return attention_block(v[0], n,
                             AttentionBlockParams<float>{v[3], biases ? v[7] : none, v[4], biases ? v[8] : none, v[5],
                                                         biases ? v[9] : none, v[6], biases ? v[10] : none},
                             heads);
    };
  };
  auto inputs = [&](const Case& c) {
    const double ws = 1.0 / std::sqrt(static_cast<double>(c.C));
    std::vector<Tensor<float>> t{randn_t({c.N, c.H, c.W, c.C}, g), randn_t({c.C}, g), randn_t({c.C}, g)};
    for (int i = 0; i < 4; ++i) {
      Tensor<float> w = randn_t({c.C, 1, 1, c.C}, g);
      for (size_t e = 0; e < w.size(); ++e) w[e] = static_cast<float>(w[e] * ws);
      t.push_back(w);
    }
    if (c.biases)
      for (int i = 0; i < 4; ++i) t.push_back(randn_t({c.C}, g));
    return inputs_of(t);
  };
  const Case cases[] = {{2, 3, 5, 16, 2, 0.0, true}, {2, 4, 5, 8, 1, 0.0, false}, {2, 3, 3, 12, 3, 0.3, true}};
  for (const MathMode m : {MathMode::FP32, MathMode::BF16}) {
    set_cuda_math_mode(m);
    for (const AttentionKernel k : {AttentionKernel::Full, AttentionKernel::Flash}) {
      set_cuda_attention_kernel(k);
      const bool bf16 = m == MathMode::BF16;
      const double tol = bf16 ? std::ldexp(1.0, -5) : 2e-5;
      const double grad_tol = bf16 ? std::ldexp(1.0, -1) : tol;
      for (const Case& c : cases) {
        const std::string what = std::string(math_mode_name(m)) + (k == AttentionKernel::Flash ? " flash" : " full") +
                                 " attention_block " + shape_str({c.N, c.H, c.W, c.C}) + " heads " +
                                 std::to_string(c.heads) + " p " + std::to_string(c.p) +
                                 (c.biases ? "" : " no biases");
        std::vector<OpInput> in = inputs(c);
        if (c.biases) in[8].requires_grad = false;  // k's bias: below
        check_op(what, op(c.heads, c.p, c.biases), in, tol, grad_tol);
        if (bf16) {  // v's and the projection's parameters alone, at the output's bound
          std::vector<OpInput> vp = in;
          for (size_t i = 0; i < vp.size(); ++i) vp[i].requires_grad = i == 5 || i == 6 || i == 9 || i == 10;
          check_op(what + ", v's and the projection's parameters alone", op(c.heads, c.p, c.biases), vp, tol, tol);
        }
        if (!c.biases) continue;
        INFO(what << ": k's bias gradient (exactly 0) is rounding noise");
        in[8].requires_grad = true;
        const Tensor<float> R = randn_t({c.N, c.H, c.W, c.C}, g);
        for (const Device dev : {Device::CPU, Device::CUDA}) {
          const OpRun r = run_op(op(c.heads, c.p, c.biases), in, R, R, dev, false);
          CHECK(norm2(r.grads[8]) <= (bf16 && dev == Device::CUDA ? std::ldexp(1.0, -3) : 1e-5) * norm2(r.grads[7]));
        }
      }
    }
  }
  // The kernels that ran under BF16 + flash: the bf16 ones only, forward and backward.
  set_cuda_math_mode(MathMode::BF16);
  set_cuda_attention_kernel(AttentionKernel::Flash);
  {
    backend::CudaBackend& be = *backend::cuda_backend();
    const std::vector<OpInput> in = inputs(cases[0]);
    std::vector<Var<float>> v;
    for (const auto& i : in) v.emplace_back(i.value.cuda(), true);
    be.set_profiling(true);
    backward(sum(op(2, 0.0, true)(v)));
    const std::string t = be.profile_table(1);
    be.set_profiling(false);
    INFO(t);
    auto ran = [&t](const std::string& name) {  // a row of the table: the name padded to 28 columns
      return t.find("\n" + name + std::string(28 - name.size(), ' ')) != std::string::npos;
    };
    CHECK(ran("flash attention bf16"));
    CHECK(ran("flash attention bf16 bwd"));
    for (const char* name : {"flash attention", "flash attention bwd", "attention", "attention bwd"}) {
      INFO(name);
      CHECK(!ran(name));
    }
  }
  // Only some inputs needing a gradient: x and the norm's parameters constant; q, k, v frozen
  // (their convolution's input gradient only); the projection frozen.
  check_frozen("bf16 flash attention_block", op(2, 0.0, true), inputs(cases[0]),
               {{0, 1, 2, 8}, {3, 4, 5, 7, 8, 9}, {6, 8, 10}, {0, 3, 4, 5, 6, 7, 8, 9, 10}}, std::ldexp(1.0, -5),
               std::ldexp(1.0, -1));
  // Refusals: a 3x3 projection, heads not dividing C, dropout without a generator.
  const std::vector<OpInput> in = inputs(cases[0]);
  std::vector<Var<float>> v;
  for (const auto& i : in) v.emplace_back(i.value.cuda(), false);
  const GroupNormArgs<float> n{v[1], v[2], 4, 1e-6, false, 0.0, nullptr};
  const Var<float> w3(Tensor<float>::randn({16, 3, 3, 16}, g).cuda());
  CHECK_THROWS_WITH(attention_block(v[0], n, AttentionBlockParams<float>{v[3], v[7], v[4], v[8], v[5], v[9], w3, v[10]}, 2),
                    Catch::Contains("must be 1x1 convolutions"));
  CHECK_THROWS_WITH(attention_block(v[0], n, AttentionBlockParams<float>{v[3], v[7], v[4], v[8], v[5], v[9], v[6], v[10]}, 3),
                    Catch::Contains("must be a multiple of heads"));
  CHECK_THROWS_WITH(attention_block(v[0], GroupNormArgs<float>{v[1], v[2], 4, 1e-6, false, 0.2, nullptr},
                                    AttentionBlockParams<float>{v[3], v[7], v[4], v[8], v[5], v[9], v[6], v[10]}, 2),
                    Catch::Contains("dropout needs a generator"));
}

TEST_CASE("backend ops: res_block on both devices; in bf16 the activation between its convolutions bf16") {
  CudaScope cuda;
  struct RestoreFP32 {
    ~RestoreFP32() { set_cuda_math_mode(MathMode::FP32); }
  } restore;
  Generator g = gen();
  INFO("seed " << g.seed);
  const uint64_t seed = g.seed;
  struct Case {
    int64_t N, H, W, C, O;
    double p;
    bool biases;
    int64_t Ca = 0;  // > 0: x given as two parts of Ca and C - Ca channels (the up path's concat)
  };
  // v: x (its first part), gamma1, beta1, w1, temb, gamma2, beta2, w2, then (biases) b1, b2, then
  // (C != O) w_skip, b_skip, then (Ca > 0) x's second part.
  auto parts = [](const Case& c, const std::vector<Var<float>>& v) {
    return c.Ca > 0 ? std::vector<Var<float>>{v[0], v.back()} : std::vector<Var<float>>{v[0]};
  };
  auto op = [seed, parts](const Case& c) {
    return [seed, c, parts](const std::vector<Var<float>>& v) {
      Generator d(seed, 31);
      const Var<float> none;
      const Conv2dOptions same{1, 1, 1, 1};
      const size_t k = c.biases ? 10 : 8;
      const ResBlockParams<float> p{GroupNormArgs<float>{v[1], v[2], 2, 1e-6, true, 0.0, nullptr},
                                    v[3], c.biases ? v[8] : none, same, v[4],
                                    GroupNormArgs<float>{v[5], v[6], 2, 1e-6, true, c.p, &d},
                                    v[7], c.biases ? v[9] : none, same,
                                    c.C != c.O ? v[k] : none, c.C != c.O ? v[k + 1] : none};
      return res_block(parts(c, v), p);
    };
  };
  auto inputs = [&](const Case& c) {
    auto scaled = [&](Shape s, double f) {
      Tensor<float> t = randn_t(std::move(s), g);
      for (size_t e = 0; e < t.size(); ++e) t[e] = static_cast<float>(t[e] * f);
      return t;
    };
    std::vector<Tensor<float>> t{randn_t({c.N, c.H, c.W, c.Ca > 0 ? c.Ca : c.C}, g), randn_t({c.C}, g), randn_t({c.C}, g),
                                 scaled({c.O, 3, 3, c.C}, 1 / std::sqrt(9.0 * c.C)), randn_t({c.N, c.O}, g),
                                 randn_t({c.O}, g), randn_t({c.O}, g), scaled({c.O, 3, 3, c.O}, 1 / std::sqrt(9.0 * c.O))};
    if (c.biases) {
      t.push_back(randn_t({c.O}, g));
      t.push_back(randn_t({c.O}, g));
    }
    if (c.C != c.O) {
      t.push_back(scaled({c.O, 1, 1, c.C}, 1 / std::sqrt(1.0 * c.C)));
      t.push_back(randn_t({c.O}, g));
    }
    if (c.Ca > 0) t.push_back(randn_t({c.N, c.H, c.W, c.C - c.Ca}, g));
    return inputs_of(t);
  };
  // The op as the ops it is made of, on the device (the reference of the BF16 path's difference).
  auto three_ops = [seed, parts](const Case& c) {
    return [seed, c, parts](const std::vector<Var<float>>& v) {
      Generator d(seed, 31);
      const Var<float> none;
      const Conv2dOptions same{1, 1, 1, 1};
      const size_t k = c.biases ? 10 : 8;
      const Var<float> x = c.Ca > 0 ? concat(parts(c, v), 3) : v[0];
      const Var<float> h = group_norm_conv2d(x, GroupNormArgs<float>{v[1], v[2], 2, 1e-6, true, 0.0, nullptr}, v[3],
                                             c.biases ? v[8] : none, same, v[4], none);
      const Var<float> s = c.C != c.O ? conv2d(x, v[k], v[k + 1], Conv2dOptions{}) : x;
      return group_norm_conv2d(h, GroupNormArgs<float>{v[5], v[6], 2, 1e-6, true, c.p, &d}, v[7],
                               c.biases ? v[9] : none, same, none, s);
    };
  };
  // The last two: x in two parts, with a skip convolution (under BF16 written once into a bf16 x;
  // the parts' boundary inside a group of norm1) and without (concatenated first).
  const Case cases[] = {{2, 5, 4, 8, 6, 0.0, true},      {2, 4, 3, 6, 6, 0.3, true}, {1, 3, 5, 4, 8, 0.0, false},
                        {2, 4, 4, 12, 8, 0.3, true, 5}, {2, 3, 4, 6, 6, 0.0, true, 2}};
  for (const MathMode m : {MathMode::FP32, MathMode::BF16}) {
    set_cuda_math_mode(m);
    const bool bf16 = m == MathMode::BF16;
    // BF16: operands of both convolutions and h rounded to bf16 (u = 2^-8 each, random signs):
    // a few u in norm, as group_norm_conv2d's 2^-6 for one of them; 2^-5 for two in a row, for
    // the output and the gradients of x and of the convolutions' weights (over 200 runs: at most
    // 0.013). The gradients that are sums over pixels of h's gradient (conv1's bias, temb, both
    // norms' gamma and beta) cancel: GroupNorm's input gradient sums to 0 over each group, so
    // their per-channel sums are small beside their terms and the terms' rounding is relatively
    // large: over 200 runs up to 0.104 (conv1's bias; 0.037 for the three ops under BF16, whose h
    // gradient is float; the medians 0.004 and 0.003). They are checked at 2^-2: wiring errors
    // (a missing term, a wrong buffer) give 0.5 and more.
    const double tol = bf16 ? std::ldexp(1.0, -5) : 2e-5;
    const double sum_tol = bf16 ? std::ldexp(1.0, -2) : tol;
    for (const Case& c : cases) {
      const std::string what = std::string(math_mode_name(m)) + " res_block " + shape_str({c.N, c.H, c.W, c.C}) +
                               " -> " + std::to_string(c.O) + " p " + std::to_string(c.p) +
                               (c.biases ? "" : " no biases") +
                               (c.Ca > 0 ? " in parts of " + std::to_string(c.Ca) + " and " + std::to_string(c.C - c.Ca)
                                         : std::string());
      const std::vector<OpInput> in = inputs(c);
      check_op(what, op(c), in, tol, sum_tol);
      if (!bf16) continue;
      {  // x's and the weights' gradients alone, at the output's bound
        std::vector<OpInput> part = in;
        for (size_t i = 0; i < part.size(); ++i)
          part[i].requires_grad = i == 0 || i == 3 || i == 7 || (c.C != c.O && i >= (c.biases ? 10u : 8u)) ||
                                  (c.Ca > 0 && i + 1 == part.size());
        check_op(what + ", x and the weights alone", op(c), part, tol);
      }
      // The bf16 path ran: h rounded to bf16 makes it differ from the three ops under BF16 (which
      // keep h in float), by about bf16's rounding.
      INFO(what << ": against the three ops under BF16");
      const Tensor<float> R = randn_t({c.N, c.H, c.W, c.O}, g);
      const OpRun a = run_op(op(c), in, R, R, Device::CUDA, false);
      const OpRun b = run_op(three_ops(c), in, R, R, Device::CUDA, false);
      CHECK(rel_err(a.out, b.out) > 0.0);
      CHECK(rel_err(a.out, b.out) <= std::ldexp(1.0, -6));
    }
  }
  // Only some inputs needing a gradient: x and norm1 constant; conv1 and temb constant (h's
  // gradient still made for norm2's parameters); norm2 and conv2 constant; everything but temb.
  set_cuda_math_mode(MathMode::BF16);
  check_frozen("bf16 res_block", op(cases[0]), inputs(cases[0]),
               {{0, 1, 2}, {3, 4, 8}, {5, 6, 7, 9}, {0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11}, {0, 1, 2, 3, 4, 8, 10, 11}},
               std::ldexp(1.0, -5), std::ldexp(1.0, -2));
  // x in parts: one part constant, the other; both and norm1 (no x gradient: the skip
  // convolution's weights still get theirs); the skip convolution constant.
  check_frozen("bf16 res_block in parts", op(cases[3]), inputs(cases[3]), {{0}, {12}, {0, 1, 2, 12}, {10, 11}},
               std::ldexp(1.0, -5), std::ldexp(1.0, -2));
  // Refusals, as the ops it is made of give them: dropout without a generator, a wrong time
  // embedding, no skip where the channels change, groups not dividing conv1's outputs.
  const std::vector<OpInput> in = inputs(cases[0]);
  std::vector<Var<float>> v;
  for (const auto& i : in) v.emplace_back(i.value.cuda(), false);
  const Conv2dOptions same{1, 1, 1, 1};
  auto params = [&] {
    return ResBlockParams<float>{GroupNormArgs<float>{v[1], v[2], 2, 1e-6, true, 0.0, nullptr}, v[3], v[8], same, v[4],
                                 GroupNormArgs<float>{v[5], v[6], 2, 1e-6, true, 0.0, nullptr}, v[7], v[9], same, v[10],
                                 v[11]};
  };
  ResBlockParams<float> p = params();
  p.norm2.p = 0.2;
  CHECK_THROWS_WITH(res_block(v[0], p), Catch::Contains("dropout needs a generator"));
  p = params();
  p.temb = Var<float>(Tensor<float>::randn({2, 5}, g).cuda());
  CHECK_THROWS_WITH(res_block(v[0], p), Catch::Contains("conv2d"));
  p = params();
  p.w_skip = p.b_skip = Var<float>();
  CHECK_THROWS_WITH(res_block(v[0], p), Catch::Contains("conv2d"));
  p = params();
  p.norm2.groups = 4;
  CHECK_THROWS_WITH(res_block(v[0], p), Catch::Contains("cannot be split into 4 groups"));
  p = params();
  p.w2 = Var<float>(in[7].value);  // on the CPU
  CHECK_THROWS_WITH(res_block(v[0], p), Catch::Contains("operands on different devices"));
  // Parts that do not agree in N, H, W (concat's error), or one on the CPU.
  CHECK_THROWS_WITH(res_block({v[0], Var<float>(Tensor<float>::randn({2, 4, 4, 3}, g).cuda())}, params()),
                    Catch::Contains("concat"));
  CHECK_THROWS_WITH(res_block({v[0], Var<float>(Tensor<float>::randn({2, 5, 4, 3}, g))}, params()),
                    Catch::Contains("operands on different devices"));
}

TEST_CASE("backend ops: group_norm, layer_norm, batch_norm_inference") {
  CudaScope cuda;
  Generator g = gen();
  for (bool silu : {false, true}) {
    const auto in = inputs_of({randn_t({3, 5, 4, 12}, g), randn_t({12}, g), randn_t({12}, g)});
    check_op(std::string("group_norm 4 groups") + (silu ? " + silu" : ""),
             [silu](const auto& v) { return group_norm(v[0], v[1], v[2], 4, 1e-6, silu); }, in, 2e-5);
    check_op(std::string("group_norm 1 group") + (silu ? " + silu" : ""),
             [silu](const auto& v) { return group_norm(v[0], v[1], v[2], 1, 1e-5, silu); }, in, 2e-5);
  }
  for (Shape s : {Shape{1, 1}, Shape{5, 33}, Shape{2, 3, 7}, Shape{4, 768}}) {
    const int64_t C = s.back();
    check_op("layer_norm " + shape_str(s), [](const auto& v) { return layer_norm(v[0], v[1], v[2]); },
             inputs_of({randn_t(s, g), randn_t({C}, g), randn_t({C}, g)}), 2e-5);
    check_op("layer_norm without affine " + shape_str(s),
             [](const auto& v) { return layer_norm(v[0], Var<float>(), Var<float>(), 1e-6); }, inputs_of({randn_t(s, g)}),
             2e-5);
  }
  Tensor<float> var = Tensor<float>::rand({7}, g), mu = randn_t({7}, g);
  check_op("batch_norm_inference",
           [var, mu](const auto& v) {
             return batch_norm_inference(v[0], v[1], v[2], mu.to(v[0].device()), var.to(v[0].device()), 1e-3);
           },
           inputs_of({randn_t({2, 3, 5, 7}, g), randn_t({7}, g), randn_t({7}, g)}));
}

TEST_CASE("backend ops: upsample, dropout, add_channel_bias, attention") {
  CudaScope cuda;
  Generator g = gen();
  check_op("upsample_nearest2x", [](const auto& v) { return upsample_nearest2x(v[0]); }, inputs_of({randn_t({2, 3, 5, 7}, g)}));
  // The same generator state on both devices: the same mask (the CPU's Philox draws).
  const uint64_t seed = g.seed;
  check_op("dropout 0.3",
           [seed](const auto& v) {
             Generator d(seed, 5);
             return dropout(v[0], 0.3, d, true);
           },
           inputs_of({randn_t({4, 33}, g)}));
  // group_norm_dropout: on the CPU the two ops, on the device one (the mask as bits inside the
  // normalisation's kernels); a rank's share of the draw (first = n: inside a Philox block).
  for (const uint32_t parts : {1u, 2u}) {
    check_op("group_norm + silu + dropout 0.3, " + std::to_string(parts) + " part(s)",
             [seed, parts](const auto& v) {
               Generator d(seed, 9);
               d.part = parts - 1, d.parts = parts;
               return group_norm_dropout(v[0], v[1], v[2], 4, 1e-6, true, 0.3, d);
             },
             inputs_of({randn_t({3, 5, 3, 12}, g), randn_t({12}, g), randn_t({12}, g)}), 2e-5);
  }
  check_op("group_norm + dropout 0.5 (no SiLU)",
           [seed](const auto& v) {
             Generator d(seed, 2);
             return group_norm_dropout(v[0], v[1], v[2], 2, 1e-5, false, 0.5, d);
           },
           inputs_of({randn_t({2, 7, 5, 6}, g), randn_t({6}, g), randn_t({6}, g)}), 2e-5);
  check_op("add_channel_bias", [](const auto& v) { return add_channel_bias(v[0], v[1]); },
           inputs_of({randn_t({3, 4, 5, 6}, g), randn_t({3, 6}, g)}));
  // Both device kernels: the full-matrix reference and the fused (flash) one, whose blocks of 16
  // rows leave a ragged last tile at L = 37; d = 264 is past the fused kernels' 256 (falls back).
  struct AttnShape {
    int64_t N, L, C;
    int heads;
  };
  struct RestoreFull {  // the real device's choice outlives the test: put the default back
    ~RestoreFull() { set_cuda_attention_kernel(AttentionKernel::Full); }
  } restore;
  for (AttentionKernel kernel : {AttentionKernel::Full, AttentionKernel::Flash}) {
    set_cuda_attention_kernel(kernel);
    const std::string kname = kernel == AttentionKernel::Full ? "full" : "flash";
    for (AttnShape a : {AttnShape{2, 9, 8, 1}, AttnShape{2, 9, 8, 2}, AttnShape{2, 37, 48, 3}, AttnShape{1, 21, 40, 1},
                        AttnShape{1, 5, 264, 1}}) {
      const Shape s{a.N, a.L, a.C};
      const int heads = a.heads;
      const std::string what = kname + " " + shape_str(s) + " heads " + std::to_string(heads);
      check_op("attention " + what, [heads](const auto& v) { return attention(v[0], v[1], v[2], heads); },
               inputs_of({randn_t(s, g), randn_t(s, g), randn_t(s, g)}));
      check_op("self-attention on one tensor, " + what,
               [heads](const auto& v) { return attention(v[0], v[0], v[0], heads); }, inputs_of({randn_t(s, g)}));
    }
    {  // the kernels that ran, by the profiler's names: fused ones only when asked and d <= 256
      backend::CudaBackend& be = *backend::cuda_backend();
      auto ran = [&](int64_t C) {
        be.set_profiling(true);
        Var<float> x(Tensor<float>::randn({2, 19, C}, g).to(Device::CUDA), true);
        backward(sum(attention(x, x, x, 1)));
        std::string t = be.profile_table(1);
        be.set_profiling(false);
        return t;
      };
      const bool flash = kernel == AttentionKernel::Flash;
      const std::string small = ran(8), large = ran(264);
      CHECK((small.find("flash attention bwd") != std::string::npos) == flash);
      CHECK(large.find("flash attention") == std::string::npos);
      CHECK(large.find("attention bwd") != std::string::npos);
    }
    check_op("attention " + kname + ", k constant", [](const auto& v) { return attention(v[0], v[1], v[0], 2); },
             {{randn_t({2, 19, 8}, g), true}, {randn_t({2, 19, 8}, g), false}});
  }
}

TEST_CASE("backend ops: max_pool2d, avg_pool2d, global_avg_pool") {
  CudaScope cuda;
  Generator g = gen();
  for (const PoolOptions& o : {PoolOptions{2, 2, 0, 0, 0, 0, false, true}, PoolOptions{3, 3, 2, 2, 0, 0, false, true},
                               PoolOptions{3, 3, 1, 1, 1, 1, false, false}, PoolOptions{3, 3, 2, 2, 1, 1, true, true},
                               PoolOptions{2, 3, 1, 2, 1, 1, true, false}}) {
    const std::string what = std::to_string(o.kernel_h) + "x" + std::to_string(o.kernel_w) + " stride " +
                             std::to_string(o.stride_h) + " pad " + std::to_string(o.pad_h) + (o.ceil_mode ? " ceil" : "") +
                             (o.count_include_pad ? "" : " no-pad-count");
    const auto in = inputs_of({randn_t({2, 7, 8, 3}, g)});
    check_op("max_pool2d " + what, [o](const auto& v) { return max_pool2d(v[0], o); }, in);
    check_op("avg_pool2d " + what, [o](const auto& v) { return avg_pool2d(v[0], o); }, in);
  }
  // Ties: the first maximum in window order gets the gradient on both devices.
  Tensor<float> ties = Tensor<float>::zeros({1, 4, 4, 2});
  check_op("max_pool2d ties", [](const auto& v) { return max_pool2d(v[0], 2); }, inputs_of({ties}));
  check_op("global_avg_pool", [](const auto& v) { return global_avg_pool(v[0]); }, inputs_of({randn_t({3, 5, 7, 9}, g)}));
}

TEST_CASE("backend ops: tensor-level device work matches the CPU (draws, fills, embeddings)") {
  CudaScope cuda;
  Generator g = gen();
  Generator a(g.seed, 3), b(g.seed, 3);
  const Tensor<float> cpu = Tensor<float>::randn({1001}, a), dev = Tensor<float>::randn({1001}, b, Device::CUDA);
  CHECK(a.offset == b.offset);
  CHECK(rel_err(dev.cpu(), cpu) < 1e-6);
  const Tensor<float> ucpu = Tensor<float>::rand({37}, a), udev = Tensor<float>::rand({37}, b, Device::CUDA);
  CHECK(rel_err(udev.cpu(), ucpu) < 1e-7);
  Tensor<float> f = Tensor<float>::full({3, 5}, 2.5f, Device::CUDA);
  for (float v : f.cpu()) CHECK(v == 2.5f);
  const std::vector<int32_t> t{0, 1, 999, 500, 7};
  CHECK(rel_err(timestep_embedding<float>(t, 64, Device::CUDA).cpu(), timestep_embedding<float>(t, 64)) < 1e-6);
}

TEST_CASE("backend ops: operands on different devices, or double on CUDA, are one clear error") {
  CudaScope cuda;
  Generator g = gen();
  Var<float> a(randn_t({3, 4}, g)), b(randn_t({3, 4}, g).to(Device::CUDA));
  CHECK_THROWS_WITH(add(a, b), Catch::Contains("add: operands on different devices (cpu, cuda)"));
  CHECK_THROWS_WITH(linear(a, b), Catch::Contains("linear: operands on different devices"));
  CHECK_THROWS_WITH(concat<float>({a, b}, 0), Catch::Contains("concat: operands on different devices"));
  Var<double> d(Tensor<double>::zeros({2}).to(Device::CUDA));
  CHECK_THROWS_WITH(silu(d), Catch::Contains("CUDA tensors must be float"));
}

TEST_CASE("transformer ops (gelu, layer_norm, permute, linear_act GELU) pass finite differences in double") {
  Generator g = gen();
  INFO("seed " << g.seed);
  const uint64_t s = g.seed;
  CHECK(max_gradcheck_error([](const auto& v) { return gelu(v[0]); }, {rand_var({4, 5}, g)}, s) < 1e-6);
  CHECK(max_gradcheck_error([](const auto& v) { return layer_norm(v[0], v[1], v[2]); },
                            {rand_var({3, 7}, g), rand_var({7}, g), rand_var({7}, g)}, s) < 1e-6);
  CHECK(max_gradcheck_error([](const auto& v) { return layer_norm(v[0], Var<double>(), Var<double>(), 1e-6); },
                            {rand_var({2, 3, 5}, g)}, s) < 1e-6);
  CHECK(max_gradcheck_error([](const auto& v) { return permute(v[0], {1, 2, 0}); }, {rand_var({2, 3, 4}, g)}, s) < 1e-8);
  CHECK(max_gradcheck_error([](const auto& v) { return transpose(mul(v[0], v[0]), 0, 1); }, {rand_var({3, 5}, g)}, s) <
        1e-6);
  CHECK(max_gradcheck_error([](const auto& v) { return linear_act(v[0], v[1], v[2], Activation::GELU); },
                            {rand_var({4, 3}, g), rand_var({5, 3}, g), rand_var({5}, g)}, s) < 1e-6);
}

TEST_CASE("layer_norm and gelu match PyTorch's definitions on known values") {
  // gelu(1) = 0.5 (1 + erf(1 / sqrt 2)) = 0.8413447460685429; layer_norm of (1, 2, 3) = (-1.2247, 0, 1.2247).
  Var<double> x(Tensor<double>::from({1.0, -1.0, 0.0}, {3}));
  const Tensor<double> y = gelu(x).value();
  CHECK(y[0] == Approx(0.8413447460685429).epsilon(1e-14));
  CHECK(y[1] == Approx(-0.15865525393145707).epsilon(1e-13));
  CHECK(y[2] == 0.0);
  Var<double> r(Tensor<double>::from({1.0, 2.0, 3.0}, {1, 3}));
  const Tensor<double> n = layer_norm(r, Var<double>(), Var<double>(), 1e-12).value();
  CHECK(n[0] == Approx(-1.224744871391589).epsilon(1e-10));
  CHECK(n[1] == Approx(0.0).margin(1e-12));
  CHECK(n[2] == Approx(1.224744871391589).epsilon(1e-10));
}
