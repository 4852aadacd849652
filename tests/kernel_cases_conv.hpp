// The device convolution (include/diffuse/backend/cuda/conv.hpp: cuDNN natively, host loops in the CPU
// emulation) and the weight layout kernels (kernels/conv_weight.cuh) against the CPU backend's
// conv2d and its autograd. Included by test_emu_conv.cpp (g++) and cuda_conv.cu (nvcc).
#pragma once

#include <catch2/catch.hpp>

#include <diffuse/backend/cuda/conv.hpp>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "device_buffer.hpp"
#include "kernel_reference_conv.hpp"
#include "kernel_seed.hpp"
#include "kernels/conv_weight.cuh"

namespace diffuse::testing::conv_cases {

// How many of got[i] differ from want[i] by more than tol[i] (tol empty: must be equal); the
// first one is reported.
inline std::size_t count_bad(const char* what, const std::vector<float>& got, const std::vector<double>& want,
                             const std::vector<double>& tol) {
  std::size_t bad = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(static_cast<double>(got[i]) - want[i]);
    const bool ok = tol.empty() ? static_cast<double>(got[i]) == want[i] : d <= tol[i];
    if (!ok && bad++ == 0)
      UNSCOPED_INFO(what << ": first bad element " << i << ": " << got[i] << " vs " << want[i] << " (tolerance "
                         << (tol.empty() ? 0.0 : tol[i]) << ")");
  }
  return bad;
}

inline std::vector<double> plus(const std::vector<float>& a, const std::vector<float>& b) {
  std::vector<double> r(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) r[i] = static_cast<double>(a[i]) + static_cast<double>(b[i]);
  return r;
}

inline std::vector<double> widen(const std::vector<float>& a) { return std::vector<double>(a.begin(), a.end()); }

inline std::vector<float> abs_of(const std::vector<float>& a) {
  std::vector<float> r(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) r[i] = std::fabs(a[i]);
  return r;
}

}  // namespace diffuse::testing::conv_cases

TEST_CASE("kernel conv weight layouts: OIHW <-> OHWI on the host and on the device") {
  using namespace diffuse::testing;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  struct W {
    std::int64_t O, C, kh, kw;
  };
  for (const W s : {W{1, 1, 1, 1}, W{5, 3, 3, 3}, W{33, 5, 1, 3}, W{3, 33, 3, 1}, W{64, 33, 3, 3}}) {
    INFO("O " << s.O << " C " << s.C << " kh " << s.kh << " kw " << s.kw);
    const std::size_t n = static_cast<std::size_t>(s.O * s.C * s.kh * s.kw);
    std::vector<float> oihw(n);
    for (float& v : oihw) v = normal(gen);
    // Host: against the index arithmetic written out, and back.
    const std::vector<float> ohwi = diffuse::cuda::conv_weight_oihw_to_ohwi_host(oihw, s.O, s.C, s.kh, s.kw);
    std::size_t bad = 0;
    for (std::int64_t o = 0; o < s.O; ++o)
      for (std::int64_t c = 0; c < s.C; ++c)
        for (std::int64_t ky = 0; ky < s.kh; ++ky)
          for (std::int64_t kx = 0; kx < s.kw; ++kx)
            bad += ohwi[static_cast<std::size_t>(((o * s.kh + ky) * s.kw + kx) * s.C + c)] !=
                   oihw[static_cast<std::size_t>(((o * s.C + c) * s.kh + ky) * s.kw + kx)];
    CHECK(bad == 0);
    CHECK(diffuse::cuda::conv_weight_ohwi_to_oihw_host(ohwi, s.O, s.C, s.kh, s.kw) == oihw);
    // Device kernels: the same permutation both ways, with grids that must stride.
    for (unsigned block : {32u, 256u}) {
      for (unsigned max_blocks : {1u, 3u, 65535u}) {
        INFO("block " << block << " max_blocks " << max_blocks);
        DeviceBuffer<float> d_oihw(oihw), d_ohwi(n), d_back(n);
        diffuse::kernels::conv_weight_oihw_to_ohwi(d_oihw.get(), d_ohwi.get(), s.O, s.C, s.kh, s.kw, {}, block,
                                                   max_blocks);
        diffuse::kernels::conv_weight_ohwi_to_oihw(d_ohwi.get(), d_back.get(), s.O, s.C, s.kh, s.kw, {}, block,
                                                   max_blocks);
        CHECK(d_ohwi.to_host() == ohwi);
        CHECK(d_back.to_host() == oihw);
      }
    }
  }
  float* p = nullptr;
  CHECK_THROWS_AS(diffuse::kernels::conv_weight_oihw_to_ohwi(p, p, 2, 3, 3, 3, {}, 0), std::invalid_argument);
  CHECK_THROWS_AS(diffuse::kernels::conv_weight_ohwi_to_oihw(p, p, -1, 3, 3, 3), std::invalid_argument);
  diffuse::kernels::conv_weight_oihw_to_ohwi(p, p, 0, 3, 3, 3);  // empty: no launch
  CHECK_THROWS_AS(diffuse::cuda::conv_weight_oihw_to_ohwi_host(std::vector<float>(5), 2, 3, 1, 1),
                  std::invalid_argument);
}

#if DIFFUSE_CUDA_CONV != 0

TEST_CASE("kernel conv forward, backward data and backward filter match the CPU backend's conv2d") {
  using namespace diffuse::testing;
  using namespace diffuse::testing::conv_cases;
  using diffuse::cuda::Conv2dPlanOptions;
  using diffuse::cuda::Conv2dShape;
  using diffuse::cuda::MathMode;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  // Multiples of 1/16 in [-1, 1], never 0: every product is a multiple of 2^-8 of size <= 1 and
  // every partial sum of the sizes below (< 300 terms) needs < 9 + 8 bits, so any order of
  // summation is exact in float (and TF32 holds these inputs exactly): results must be equal.
  std::uniform_int_distribution<int> k16(1, 16), sign(0, 1);
  auto dyadic = [&] { return static_cast<float>(sign(gen) ? k16(gen) : -k16(gen)) / 16.0f; };

  struct Case {
    Conv2dShape s;
    const char* what;
  };
  const Case cases[] = {
      {{.N = 1, .H = 7, .W = 7, .C = 3, .O = 5, .kh = 3, .kw = 3, .pad_h = 1, .pad_w = 1}, "3x3 s1 p1, N 1"},
      {{.N = 3, .H = 9, .W = 6, .C = 5, .O = 33, .kh = 3, .kw = 3, .stride_h = 2, .stride_w = 2, .pad_h = 1, .pad_w = 1},
       "3x3 s2 p1, odd H, even W"},
      {{.N = 3, .H = 8, .W = 7, .C = 33, .O = 3, .kh = 3, .kw = 3, .stride_h = 2, .stride_w = 2, .pad_h = 1, .pad_w = 1},
       "3x3 s2 p1, even H, odd W"},
      {{.N = 3, .H = 6, .W = 5, .C = 33, .O = 5, .kh = 1, .kw = 1}, "1x1"},
      {{.N = 1, .H = 7, .W = 6, .C = 5, .O = 3, .kh = 1, .kw = 1, .stride_h = 2, .stride_w = 2}, "1x1 s2"},
      {{.N = 3, .H = 5, .W = 7, .C = 5, .O = 33, .kh = 1, .kw = 3, .pad_w = 1}, "1x3 p 0x1"},
      {{.N = 1, .H = 7, .W = 4, .C = 3, .O = 5, .kh = 3, .kw = 1, .pad_h = 1}, "3x1 p 1x0"},
      {{.N = 3, .H = 6, .W = 6, .C = 8, .O = 16, .kh = 3, .kw = 3}, "3x3 no padding"},
      {{.N = 3, .H = 8, .W = 8, .C = 32, .O = 64, .kh = 3, .kw = 3, .pad_h = 1, .pad_w = 1}, "3x3 s1 p1, 32 -> 64"},
  };

  diffuse::cuda::Dnn dnn;
  diffuse::cuda::Conv2dPlans plans;
  for (const Case& cs : cases) {
    const Conv2dShape& s = cs.s;
    const std::int64_t Ho = s.Ho(), Wo = s.Wo();
    const ConvRefShape rs{s.N, s.H, s.W, s.C, s.O, s.kh, s.kw, s.stride_h, s.stride_w, s.pad_h, s.pad_w};
    const std::size_t nx = static_cast<std::size_t>(s.x_elements()), nw = static_cast<std::size_t>(s.w_elements()),
                      ny = static_cast<std::size_t>(s.y_elements());
    for (const MathMode math : {MathMode::FP32, MathMode::TF32}) {
      Conv2dPlanOptions opt;
      opt.math = math;
      const diffuse::cuda::Conv2dPlan& plan = plans.get(dnn, s, opt);
      for (const bool exact : {true, false}) {
        INFO(cs.what << ": " << s.str() << ", " << (math == MathMode::FP32 ? "FP32" : "TF32") << ", "
                     << (exact ? "dyadic inputs, exact" : "normal inputs") << ", " << plan.algorithms());
        auto draw = [&](std::size_t n) {
          std::vector<float> v(n);
          for (float& e : v) e = exact ? dyadic() : normal(gen);
          return v;
        };
        const std::vector<float> x = draw(nx), w = draw(nw), dy = draw(ny), dx0 = draw(nx), dw0 = draw(nw);
        const ConvRef ref = cpu_conv2d(rs, x, w, dy);

        // Tolerances (normal inputs): a sum of n products computed in any order is within
        // n * FLT_EPSILON / 2 * sum |products| of the exact one, on either side, so the two differ by
        // at most n * FLT_EPSILON * S with S the same convolution of |x|, |w|, |dy| (computed by the
        // CPU backend: +2 terms cover its own rounding). An accumulated result adds one rounding of
        // its magnitude. TF32 rounds (or truncates) each input to 10 mantissa bits first, so each
        // product is off by up to (1 + 2^-10)^2 - 1 = 2^-9 + 2^-20 of itself: that times S more.
        std::vector<double> tol_y, tol_dx, tol_dxa, tol_dw;
        if (!exact) {
          const ConvRef mag = cpu_conv2d(rs, abs_of(x), abs_of(w), abs_of(dy));
          const double tf32 = math == MathMode::TF32 ? std::ldexp(1.0, -9) + std::ldexp(1.0, -20) : 0.0;
          auto bound = [&](const std::vector<float>& S, std::int64_t terms, const std::vector<float>* base) {
            std::vector<double> t(S.size());
            for (std::size_t i = 0; i < S.size(); ++i) {
              t[i] = (static_cast<double>(terms + 2) * FLT_EPSILON + tf32) * S[i] + FLT_MIN;
              if (base) t[i] += FLT_EPSILON * (std::fabs((*base)[i]) + S[i]);
            }
            return t;
          };
          tol_y = bound(mag.y, s.kh * s.kw * s.C, nullptr);
          tol_dx = bound(mag.dx, s.kh * s.kw * s.O, nullptr);
          tol_dxa = bound(mag.dx, s.kh * s.kw * s.O, &dx0);
          tol_dw = bound(mag.dw, s.N * Ho * Wo, &dw0);
        }

        // The weight goes to the device layout through the kernel; dw0 is given in that layout.
        DeviceBuffer<float> d_x(x), d_w_oihw(w), d_w(nw), d_dy(dy), d_y(ny), d_dx(nx), d_dxa(dx0),
            d_dw(diffuse::cuda::conv_weight_oihw_to_ohwi_host(dw0, s.O, s.C, s.kh, s.kw));
        diffuse::kernels::conv_weight_oihw_to_ohwi(d_w_oihw.get(), d_w.get(), s.O, s.C, s.kh, s.kw);
        // The workspace: the Dnn's for some calls, the caller's (exactly the bytes asked) for others.
        DeviceBuffer<unsigned char> ws(std::max<std::size_t>(plan.workspace_bytes(), 1));
        plan.forward(dnn, d_x.get(), d_w.get(), d_y.get());
        plan.backward_data(dnn, d_dy.get(), d_w.get(), d_dx.get(), false, ws.get(), plan.backward_data_workspace_bytes());
        plan.backward_data(dnn, d_dy.get(), d_w.get(), d_dxa.get(), true);
        plan.backward_filter(dnn, d_x.get(), d_dy.get(), d_dw.get(), ws.get(), plan.backward_filter_workspace_bytes());
        const std::vector<float> dw_oihw =
            diffuse::cuda::conv_weight_ohwi_to_oihw_host(d_dw.to_host(), s.O, s.C, s.kh, s.kw);

        CHECK(count_bad("y", d_y.to_host(), widen(ref.y), tol_y) == 0);
        CHECK(count_bad("dx (written)", d_dx.to_host(), widen(ref.dx), tol_dx) == 0);
        CHECK(count_bad("dx (accumulated)", d_dxa.to_host(), plus(dx0, ref.dx), tol_dxa) == 0);
        CHECK(count_bad("dw (accumulated)", dw_oihw, plus(dw0, ref.dw), tol_dw) == 0);
      }
    }
  }
  CHECK(plans.size() == 2 * (sizeof cases / sizeof cases[0]));
}

TEST_CASE("kernel conv plans: cached by shape and options, shapes checked, empty batches") {
  using diffuse::cuda::Conv2dPlanOptions;
  using diffuse::cuda::Conv2dShape;
  diffuse::cuda::Dnn dnn;
  diffuse::cuda::Conv2dPlans plans;
  const Conv2dShape s{.N = 2, .H = 5, .W = 5, .C = 3, .O = 4, .kh = 3, .kw = 3, .pad_h = 1, .pad_w = 1};
  const auto& a = plans.get(dnn, s);
  CHECK(&plans.get(dnn, s) == &a);
  Conv2dShape s2 = s;
  s2.N = 3;
  CHECK(&plans.get(dnn, s2) != &a);
  Conv2dPlanOptions tf32;
  tf32.math = diffuse::cuda::MathMode::TF32;
  CHECK(&plans.get(dnn, s, tf32) != &a);
  CHECK(plans.size() == 3);
  CHECK(a.shape().Ho() == 5);
  CHECK(a.shape().Wo() == 5);

  auto bad = [&](auto change) {
    Conv2dShape b = s;
    change(b);
    return b;
  };
  CHECK_THROWS_AS(plans.get(dnn, bad([](Conv2dShape& b) { b.stride_w = 0; })), std::invalid_argument);
  CHECK_THROWS_AS(plans.get(dnn, bad([](Conv2dShape& b) { b.pad_h = -1; })), std::invalid_argument);
  CHECK_THROWS_AS(plans.get(dnn, bad([](Conv2dShape& b) { b.C = 0; })), std::invalid_argument);
  CHECK_THROWS_WITH(plans.get(dnn, bad([](Conv2dShape& b) { b.kh = 8; })),
                    Catch::Contains("kernel larger than the padded input"));
  CHECK(plans.size() == 3);

  // N = 0: a valid plan whose calls do nothing.
  const auto& empty = plans.get(dnn, bad([](Conv2dShape& b) { b.N = 0; }));
  float* none = nullptr;
  empty.forward(dnn, none, none, none);
  empty.backward_data(dnn, none, none, none, true);
  empty.backward_filter(dnn, none, none, none);
  CHECK(empty.workspace_bytes() == 0);

  // A caller's workspace smaller than the algorithm needs is refused (cuDNN only: the host loops need none).
  if (a.forward_workspace_bytes() > 0) {
    diffuse::testing::DeviceBuffer<float> x(static_cast<std::size_t>(s.x_elements())),
        w(static_cast<std::size_t>(s.w_elements())), y(static_cast<std::size_t>(s.y_elements()));
    diffuse::testing::DeviceBuffer<unsigned char> ws(a.forward_workspace_bytes());
    CHECK_THROWS_AS(a.forward(dnn, x.get(), w.get(), y.get(), ws.get(), a.forward_workspace_bytes() - 1),
                    std::invalid_argument);
  }
}

TEST_CASE("kernel conv in BF16: bf16 tensors, float accumulation, the result rounded once to bf16") {
  using namespace diffuse::testing;
  using namespace diffuse::testing::conv_cases;
  using diffuse::bf16;
  using diffuse::cuda::Conv2dShape;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> k16(1, 16), sign(0, 1);
  auto dyadic = [&] { return static_cast<float>(sign(gen) ? k16(gen) : -k16(gen)) / 16.0f; };
  auto round_bf16 = [](std::vector<float> v) {
    for (float& e : v) e = static_cast<float>(bf16(e));
    return v;
  };
  auto to_bf16 = [](const std::vector<float>& v) {
    std::vector<bf16> r(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) r[i] = bf16(v[i]);
    return r;
  };
  auto to_float = [](const std::vector<bf16>& v) {
    std::vector<float> r(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) r[i] = static_cast<float>(v[i]);
    return r;
  };
  const Conv2dShape shapes[] = {
      {.N = 2, .H = 7, .W = 6, .C = 5, .O = 33, .kh = 3, .kw = 3, .pad_h = 1, .pad_w = 1},
      {.N = 3, .H = 9, .W = 6, .C = 33, .O = 5, .kh = 3, .kw = 3, .stride_h = 2, .stride_w = 2, .pad_h = 1, .pad_w = 1},
      {.N = 2, .H = 6, .W = 5, .C = 32, .O = 64, .kh = 1, .kw = 1},
  };
  diffuse::cuda::Dnn dnn;
  diffuse::cuda::Conv2dPlans plans;
  diffuse::cuda::Conv2dPlanOptions opt;
  opt.math = diffuse::cuda::MathMode::BF16;
  for (const Conv2dShape& s : shapes) {
    const diffuse::cuda::Conv2dPlan& plan = plans.get(dnn, s, opt);
    CHECK(plan.bf16_tensors());
    const ConvRefShape rs{s.N, s.H, s.W, s.C, s.O, s.kh, s.kw, s.stride_h, s.stride_w, s.pad_h, s.pad_w};
    const std::size_t nx = static_cast<std::size_t>(s.x_elements()), nw = static_cast<std::size_t>(s.w_elements()),
                      ny = static_cast<std::size_t>(s.y_elements());
    for (const bool exact : {true, false}) {
      INFO(s.str() << (exact ? ", dyadic inputs" : ", normal inputs") << ", " << plan.algorithms());
      auto draw = [&](std::size_t n) {
        std::vector<float> v(n);
        for (float& e : v) e = exact ? dyadic() : normal(gen);
        return v;
      };
      // Float inputs; the device sees their bf16 roundings (what the backend's conversion makes).
      const std::vector<float> x = draw(nx), w = draw(nw), dy = draw(ny);
      const std::vector<float> xr = round_bf16(x), wr = round_bf16(w), dyr = round_bf16(dy);
      DeviceBuffer<bf16> d_x(to_bf16(xr)), d_w(to_bf16(diffuse::cuda::conv_weight_oihw_to_ohwi_host(wr, s.O, s.C, s.kh, s.kw))),
          d_dy(to_bf16(dyr)), d_y(ny), d_dx(nx), d_dw(nw);
      plan.forward(dnn, d_x.get(), d_w.get(), d_y.get());
      plan.backward_data(dnn, d_dy.get(), d_w.get(), d_dx.get());
      plan.backward_filter(dnn, d_x.get(), d_dy.get(), d_dw.get());
      const std::vector<float> y = to_float(d_y.to_host()), dx = to_float(d_dx.to_host()),
                               dw = diffuse::cuda::conv_weight_ohwi_to_oihw_host(to_float(d_dw.to_host()), s.O, s.C,
                                                                                 s.kh, s.kw);
      // The reference with the same bf16 rounding applied: the CPU's float convolution of the
      // rounded inputs. Dyadic inputs are bf16 already and every sum is exact in float, so the
      // device's result must be that sum rounded to bf16, bit for bit. Normal inputs: both float
      // sums are within (n + 2) FLT_EPSILON / 2 S of the exact one (S: the convolution of the
      // magnitudes), and the result's rounding to bf16 adds up to half a bf16 ulp, 2^-8 of itself.
      const ConvRef ref = cpu_conv2d(rs, xr, wr, dyr);
      if (exact) {
        CHECK(count_bad("y", y, widen(round_bf16(ref.y)), {}) == 0);
        CHECK(count_bad("dx", dx, widen(round_bf16(ref.dx)), {}) == 0);
        CHECK(count_bad("dw", dw, widen(round_bf16(ref.dw)), {}) == 0);
        continue;
      }
      const ConvRef mag = cpu_conv2d(rs, abs_of(xr), abs_of(wr), abs_of(dyr));
      const ConvRef full = cpu_conv2d(rs, x, w, dy);  // no bf16 anywhere
      // Against the unrounded float convolution: each operand moved by up to 2^-8 of itself (of
      // the float; 2^-8 / (1 - 2^-8) of the bf16 value), so each product by less than 2^-7 + 2^-14
      // of the rounded operands' product, plus the above.
      auto bound = [&](const std::vector<float>& S, const std::vector<float>& r, std::int64_t terms, double operands) {
        std::vector<double> t(S.size());
        for (std::size_t i = 0; i < S.size(); ++i)
          t[i] = (static_cast<double>(terms + 2) * FLT_EPSILON * 1.01 + operands) * S[i] +
                 std::ldexp(std::fabs(static_cast<double>(r[i])) + operands * S[i], -8) + FLT_MIN;
        return t;
      };
      const double ops = std::ldexp(1.0, -7) + std::ldexp(1.0, -14);
      const std::int64_t ty = s.kh * s.kw * s.C, tdx = s.kh * s.kw * s.O, tdw = s.N * s.Ho() * s.Wo();
      CHECK(count_bad("y", y, widen(ref.y), bound(mag.y, ref.y, ty, 0.0)) == 0);
      CHECK(count_bad("dx", dx, widen(ref.dx), bound(mag.dx, ref.dx, tdx, 0.0)) == 0);
      CHECK(count_bad("dw", dw, widen(ref.dw), bound(mag.dw, ref.dw, tdw, 0.0)) == 0);
      CHECK(count_bad("y vs fp32", y, widen(full.y), bound(mag.y, full.y, ty, ops)) == 0);
      CHECK(count_bad("dx vs fp32", dx, widen(full.dx), bound(mag.dx, full.dx, tdx, ops)) == 0);
      CHECK(count_bad("dw vs fp32", dw, widen(full.dw), bound(mag.dw, full.dw, tdw, ops)) == 0);
      // And it is bf16: every output is a bf16 value, and not all equal the float results.
      std::size_t differs = 0;
      for (std::size_t i = 0; i < y.size(); ++i) differs += y[i] != static_cast<float>(full.y[i]);
      CHECK(differs > y.size() / 2);
    }
  }
  // A BF16 plan refuses float tensors, a float plan bf16 ones.
  const Conv2dShape s = shapes[0];
  DeviceBuffer<float> fx(static_cast<std::size_t>(s.x_elements())), fw(static_cast<std::size_t>(s.w_elements())),
      fy(static_cast<std::size_t>(s.y_elements()));
  DeviceBuffer<bf16> bx(static_cast<std::size_t>(s.x_elements())), bw(static_cast<std::size_t>(s.w_elements())),
      by(static_cast<std::size_t>(s.y_elements()));
  CHECK_THROWS_WITH(plans.get(dnn, s, opt).forward(dnn, fx.get(), fw.get(), fy.get()),
                    Catch::Contains("float tensors for a MathMode::BF16 plan"));
  CHECK_THROWS_WITH(plans.get(dnn, s).backward_data(dnn, by.get(), bw.get(), bx.get()),
                    Catch::Contains("bf16 tensors for a float plan"));
  CHECK(plans.size() == 4);
}

#else
TEST_CASE("kernel conv: cuDNN not linked") {
  WARN("diffuse::cuda was built without cuDNN (DIFFUSE_WITH_CUDNN): the device convolution is left out");
}
#endif
