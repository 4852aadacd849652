// The kernels of kernels/elementwise.cuh against the CPU backend's ops (forward values and, through
// the autograd, backward gradients) on fresh random inputs of awkward sizes. Included by
// test_emu_elementwise.cpp (CPU emulation) and cuda_elementwise.cu (nvcc, native).
//
// Tolerances: an op that is one correctly rounded float operation on the same operands on both
// sides (add, scale, the biases, the gather and its in-order scatter, mse's gradient) must match
// exactly. SiLU terms differ by the exp implementations (CUDA's expf and Eigen's exp, each within
// 2 ulp) and the order of operations; the bounds below add up each side's rounding errors to first
// order. Column sums are checked exactly on dyadic inputs (every partial sum representable, so
// any order gives the exact sum and a missed or doubled element shows) and, on arbitrary inputs,
// against a double reference within the kernel's worst-case rounding (gamma_L = L eps times the
// sum of magnitudes, L the longest chain of float additions of the launch's plan).
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iomanip>
#include <random>
#include <vector>

#include <diffuse/backend/cuda/bf16.hpp>

#include "device_buffer.hpp"
#include "kernel_reference_elementwise.hpp"
#include "kernel_seed.hpp"
#include "kernels/elementwise.cuh"
#include "kernels/silu.cuh"

namespace diffuse::testing::elementwise_cases {

inline std::vector<float> normal_values(std::mt19937_64& gen, std::size_t n, float sigma = 1.0f) {
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> v(n);
  for (float& x : v) x = d(gen);
  return v;
}
inline std::vector<float> uniform_values(std::mt19937_64& gen, std::size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(gen);
  return v;
}
// Nonzero multiples of 1/256 in [-4, 4]: sums of up to 2^12 of them are exact in float.
inline std::vector<float> dyadic_values(std::mt19937_64& gen, std::size_t n) {
  std::uniform_int_distribution<int> k(1, 1024), sign(0, 1);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(sign(gen) ? k(gen) : -k(gen)) / 256.0f;
  return v;
}

struct Mismatch {
  std::size_t bad = 0, first = 0;
};
// Elements whose |got - ref| exceeds tol(i) (NaN, an unwritten element, always does).
template <class Ref, class Tol>
inline Mismatch compare(const std::vector<float>& got, const std::vector<Ref>& ref, Tol tol) {
  Mismatch m;
  for (std::size_t i = 0; i < got.size() && i < ref.size(); ++i)
    if (!(std::fabs(static_cast<double>(got[i]) - static_cast<double>(ref[i])) <= tol(i)) && m.bad++ == 0) m.first = i;
  if (got.size() != ref.size()) ++m.bad;
  return m;
}
inline double exact(std::size_t) { return 0.0; }

// The longest chain of float additions in a column sum of `rows` rows under the launch's plan:
// the thread's rows, the warps, the k rows of a warp step, the chunks, the old value.
inline double column_sum_chain(std::int64_t rows, std::int64_t C, unsigned block, unsigned max_chunks) {
  const auto p = diffuse::kernels::elementwise_detail::column_sum_plan(rows, C, block, max_chunks);
  const std::int64_t k = 32 / std::min<std::int64_t>(C, 32), step = static_cast<std::int64_t>(block / 32) * k;
  return static_cast<double>((p.rows_per_chunk + step - 1) / step + block / 32 + k + p.chunks + 1);
}

}  // namespace diffuse::testing::elementwise_cases

#define DIFFUSE_EW_CHECK(got, ref, tol)                                                                          \
  do {                                                                                                           \
    const auto ew_m_ = ::diffuse::testing::elementwise_cases::compare((got), (ref), (tol));                      \
    INFO(#got << ": " << ew_m_.bad << " mismatches; first at " << ew_m_.first << ": " << std::setprecision(9)    \
              << ((got).empty() ? 0.0 : static_cast<double>((got)[ew_m_.first])) << " vs "                      \
              << ((ref).empty() ? 0.0 : static_cast<double>((ref)[ew_m_.first])));                              \
    CHECK(ew_m_.bad == 0);                                                                                       \
  } while (0)

TEST_CASE("kernel elementwise add, accumulate and scale match the CPU backend") {
  using namespace diffuse::testing;
  using namespace diffuse::testing::elementwise_cases;
  namespace k = diffuse::kernels;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  for (std::int64_t n : {1, 33, 1025, 70001}) {
    for (unsigned block : {96u, 256u}) {
      for (unsigned max_blocks : {3u, 65535u}) {  // 3: the grid-stride loops go round
        INFO("n " << n << " block " << block << " max_blocks " << max_blocks);
        const std::size_t sn = static_cast<std::size_t>(n);
        const std::vector<float> a = normal_values(gen, sn), b = normal_values(gen, sn, 3.0f);
        const float s = std::uniform_real_distribution<float>(-2.0f, 2.0f)(gen);
        {
          DeviceBuffer<float> da(a), db(b), dout(sn);
          k::add(da.get(), db.get(), dout.get(), n, {}, block, max_blocks);
          k::add(da.get(), db.get(), da.get(), n, {}, block, max_blocks);  // in place
          const std::vector<float> ref = cpu_add(a, b), out = dout.to_host(), inplace = da.to_host();
          DIFFUSE_EW_CHECK(out, ref, exact);
          DIFFUSE_EW_CHECK(inplace, ref, exact);
        }
        {
          DeviceBuffer<float> dx(a), dy(b);  // y (prefilled with b) += x
          k::accumulate(dx.get(), dy.get(), n, {}, block, max_blocks);
          const std::vector<float> ref = cpu_add(b, a), y = dy.to_host();
          DIFFUSE_EW_CHECK(y, ref, exact);
        }
        {
          DeviceBuffer<float> dx(a), dy(sn);
          k::scale(dx.get(), s, dy.get(), n, {}, block, max_blocks);
          const std::vector<float> ref = cpu_scale(a, s), y = dy.to_host();
          DIFFUSE_EW_CHECK(y, ref, exact);
        }
      }
    }
  }
}

TEST_CASE("kernel elementwise silu_backward matches the backward of the CPU backend's silu") {
  using namespace diffuse::testing;
  using namespace diffuse::testing::elementwise_cases;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  for (std::int64_t n : {1, 33, 1025, 70001}) {
    for (unsigned block : {96u, 256u}) {
      for (unsigned max_blocks : {3u, 65535u}) {
        for (bool accumulate : {false, true}) {
          INFO("n " << n << " block " << block << " max_blocks " << max_blocks << " accumulate " << accumulate);
          const std::size_t sn = static_cast<std::size_t>(n);
          std::vector<float> x = uniform_values(gen, sn, -12.0f, 12.0f);  // both tails of the sigmoid
          if (n > 2) x[1] = -100.0f, x[2] = 100.0f;                         // exp overflows: s = 0, s = 1
          const std::vector<float> dy = normal_values(gen, sn), prefill = normal_values(gen, sn);
          const std::vector<float> ref = cpu_silu_backward(x, dy, accumulate ? &prefill : nullptr);
          DeviceBuffer<float> dx(x), ddy(dy), ddx = accumulate ? DeviceBuffer<float>(prefill) : DeviceBuffer<float>(sn);
          diffuse::kernels::silu_backward(dx.get(), ddy.get(), ddx.get(), n, accumulate, {}, block, max_blocks);
          const std::vector<float> got = ddx.to_host();
          // s = sigmoid(x) is within 4 eps on either side (exp 2 ulp, 1 + e, the division); carried
          // through s (1 + x (1 - s)) and the products each side errs by at most
          // 11 eps |dy| s (1 + |x|); the last rounding of the sum with the prefill adds eps |ref|.
          auto tol = [&](std::size_t i) {
            const double s = 1.0 / (1.0 + std::exp(-static_cast<double>(x[i])));
            return 24.0 * FLT_EPSILON * std::fabs(dy[i]) * s * (1.0 + std::fabs(x[i])) + FLT_EPSILON * std::fabs(ref[i]);
          };
          DIFFUSE_EW_CHECK(got, ref, tol);
        }
      }
    }
  }
}

TEST_CASE("kernel elementwise add_row_bias and row_bias_backward match the CPU backend's broadcast add") {
  using namespace diffuse::testing;
  using namespace diffuse::testing::elementwise_cases;
  namespace k = diffuse::kernels;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  for (std::int64_t rows : {1, 7, 1000}) {
    for (std::int64_t C : {1, 3, 40, 128, 257}) {
      for (unsigned block : {64u, 256u}) {
        for (unsigned max_blocks : {1u, 3u, 1024u}) {  // forward: grid-stride; backward: max_chunks
          INFO("rows " << rows << " C " << C << " block " << block << " max_blocks/chunks " << max_blocks);
          const std::size_t n = static_cast<std::size_t>(rows * C), sc = static_cast<std::size_t>(C);
          {
            const std::vector<float> y = normal_values(gen, n), b = normal_values(gen, sc);
            DeviceBuffer<float> dy(y), db(b);
            k::add_row_bias(dy.get(), db.get(), rows, C, {}, block, max_blocks);
            const std::vector<float> got = dy.to_host(), ref = cpu_add_row_bias(y, b, rows, C);
            DIFFUSE_EW_CHECK(got, ref, exact);
          }
          const std::size_t ws_bytes = k::row_bias_backward_workspace_bytes(rows, C, block, max_blocks);
          DeviceBuffer<float> ws(ws_bytes / sizeof(float));
          for (bool dyadic : {true, false}) {
            INFO((dyadic ? "dyadic inputs, exact" : "uniform inputs"));
            const std::vector<float> g = dyadic ? dyadic_values(gen, n) : uniform_values(gen, n, -1.0f, 1.0f);
            const std::vector<float> prefill = dyadic ? dyadic_values(gen, sc) : normal_values(gen, sc);
            const std::vector<double> ref = cpu_row_bias_backward(g, prefill, rows, C);
            DeviceBuffer<float> dg(g), ddb(prefill);
            k::row_bias_backward(dg.get(), ddb.get(), rows, C, ws_bytes ? ws.get() : nullptr, {}, block, max_blocks);
            const std::vector<float> got = ddb.to_host();
            std::vector<double> magnitude(sc);  // sum of |terms| per channel, the old value included
            for (std::size_t c = 0; c < sc; ++c) {
              magnitude[c] = std::fabs(prefill[c]);
              for (std::int64_t r = 0; r < rows; ++r) magnitude[c] += std::fabs(g[static_cast<std::size_t>(r * C) + c]);
            }
            const double chain = column_sum_chain(rows, C, block, max_blocks);
            // The double reference's own error is ~1e-16 relative; its rounding to float is half an ulp.
            auto tol = [&](std::size_t c) {
              return dyadic ? 0.0 : chain * FLT_EPSILON * magnitude[c] + 0.5 * FLT_EPSILON * std::fabs(ref[c]);
            };
            DIFFUSE_EW_CHECK(got, ref, tol);
          }
        }
      }
    }
  }
}

TEST_CASE("kernel elementwise conv_epilogue adds the bias, a channel bias and a residual in the CPU's order") {
  // The definition: y = ((src + b[c]) + cb[n, c]) + res in float, each term optional; what the CPU
  // backend computes for conv2d(x, w, b, opt, cb, res) once the convolution is done (test_conv2d
  // shows that equals the unfused ops bit for bit). src in place (float) or a BF16 plan's result.
  using namespace diffuse::testing;
  using namespace diffuse::testing::elementwise_cases;
  namespace k = diffuse::kernels;
  using diffuse::bf16;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  struct Size {
    std::int64_t N, HW, C;
  };
  for (Size s : {Size{1, 1, 1}, Size{3, 7, 5}, Size{2, 33, 128}}) {
    for (unsigned max_blocks : {1u, 1024u}) {
      for (int terms = 0; terms < 8; ++terms) {  // bit 0: b, bit 1: cb, bit 2: res
        const bool hb = terms & 1, hcb = terms & 2, hres = terms & 4;
        INFO("N " << s.N << " HW " << s.HW << " C " << s.C << " max_blocks " << max_blocks << " b " << hb << " cb "
                  << hcb << " res " << hres);
        const std::size_t n = static_cast<std::size_t>(s.N * s.HW * s.C);
        const std::vector<float> y = normal_values(gen, n), b = normal_values(gen, static_cast<std::size_t>(s.C)),
                                 cb = normal_values(gen, static_cast<std::size_t>(s.N * s.C)),
                                 res = normal_values(gen, n);
        std::vector<bf16> yb(n);
        for (std::size_t i = 0; i < n; ++i) yb[i] = bf16(y[i]);
        auto reference = [&](bool from_bf16) {
          std::vector<float> r(n);
          for (std::size_t i = 0; i < n; ++i) {
            const std::size_t c = i % static_cast<std::size_t>(s.C), smp = i / static_cast<std::size_t>(s.HW * s.C);
            float v = from_bf16 ? static_cast<float>(yb[i]) : y[i];
            if (hb) v = v + b[c];
            if (hcb) v = v + cb[smp * static_cast<std::size_t>(s.C) + c];
            if (hres) v = v + res[i];
            r[i] = v;
          }
          return r;
        };
        DeviceBuffer<float> db(b), dcb(cb), dres(res), dy(y), dout(n);
        DeviceBuffer<bf16> dyb(yb);
        const float* pb = hb ? db.get() : nullptr;
        const float* pcb = hcb ? dcb.get() : nullptr;
        const float* pres = hres ? dres.get() : nullptr;
        k::conv_epilogue(dy.get(), pb, pcb, pres, dy.get(), s.N, s.HW, s.C, {}, 128, max_blocks);  // in place
        const std::vector<float> got = dy.to_host(), ref = reference(false);
        DIFFUSE_EW_CHECK(got, ref, exact);
        k::conv_epilogue(dyb.get(), pb, pcb, pres, dout.get(), s.N, s.HW, s.C, {}, 128, max_blocks);  // from bf16
        const std::vector<float> got16 = dout.to_host(), ref16 = reference(true);
        DIFFUSE_EW_CHECK(got16, ref16, exact);
      }
    }
  }
  float* null = nullptr;
  CHECK_THROWS_AS(k::conv_epilogue(null, null, null, null, null, -1, 1, 1), std::invalid_argument);
}

TEST_CASE("kernel elementwise add_channel_bias and channel_bias_backward match the CPU backend's add_channel_bias") {
  using namespace diffuse::testing;
  using namespace diffuse::testing::elementwise_cases;
  namespace k = diffuse::kernels;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  struct Size {
    std::int64_t N, HW;
  };
  for (Size s : {Size{1, 1}, Size{3, 7}, Size{2, 1000}}) {
    for (std::int64_t C : {1, 3, 40, 128, 257}) {
      for (unsigned max_blocks : {1u, 3u, 1024u}) {
        for (bool accumulate : {false, true}) {
          const unsigned block = accumulate ? 64u : 256u;
          INFO("N " << s.N << " HW " << s.HW << " C " << C << " block " << block << " max_blocks/chunks "
                    << max_blocks << " accumulate " << accumulate);
          const std::size_t n = static_cast<std::size_t>(s.N * s.HW * C), nb = static_cast<std::size_t>(s.N * C);
          {
            const std::vector<float> x = normal_values(gen, n), b = normal_values(gen, nb);
            DeviceBuffer<float> dx(x), db(b), dout(n);
            k::add_channel_bias(dx.get(), db.get(), dout.get(), s.N, s.HW, C, {}, block, max_blocks);
            const std::vector<float> got = dout.to_host(), ref = cpu_add_channel_bias(x, b, s.N, s.HW, C);
            DIFFUSE_EW_CHECK(got, ref, exact);
          }
          const std::size_t ws_bytes = k::channel_bias_backward_workspace_bytes(s.N, s.HW, C, block, max_blocks);
          DeviceBuffer<float> ws(ws_bytes / sizeof(float));
          for (bool dyadic : {true, false}) {
            INFO((dyadic ? "dyadic inputs, exact" : "uniform inputs"));
            const std::vector<float> g = dyadic ? dyadic_values(gen, n) : uniform_values(gen, n, -1.0f, 1.0f);
            const std::vector<float> prefill = dyadic ? dyadic_values(gen, nb) : normal_values(gen, nb);
            const std::vector<double> ref = cpu_channel_bias_backward(g, accumulate ? &prefill : nullptr, s.N, s.HW, C);
            DeviceBuffer<float> dg(g), ddb = accumulate ? DeviceBuffer<float>(prefill) : DeviceBuffer<float>(nb);
            k::channel_bias_backward(dg.get(), ddb.get(), s.N, s.HW, C, accumulate, ws_bytes ? ws.get() : nullptr, {},
                                     block, max_blocks);
            const std::vector<float> got = ddb.to_host();
            std::vector<double> magnitude(nb);
            for (std::size_t i = 0; i < nb; ++i) {
              const std::size_t smp = i / static_cast<std::size_t>(C), c = i % static_cast<std::size_t>(C);
              magnitude[i] = accumulate ? std::fabs(prefill[i]) : 0.0;
              for (std::int64_t p = 0; p < s.HW; ++p)
                magnitude[i] += std::fabs(g[(smp * static_cast<std::size_t>(s.HW) + static_cast<std::size_t>(p)) *
                                                static_cast<std::size_t>(C) + c]);
            }
            const double chain = column_sum_chain(s.HW, C, block, max_blocks);
            auto tol = [&](std::size_t i) {
              return dyadic ? 0.0 : chain * FLT_EPSILON * magnitude[i] + 0.5 * FLT_EPSILON * std::fabs(ref[i]);
            };
            DIFFUSE_EW_CHECK(got, ref, tol);
          }
        }
      }
    }
  }
}

TEST_CASE("kernel elementwise bias_silu forward and backward match the CPU backend's linear_act SiLU epilogue") {
  using namespace diffuse::testing;
  using namespace diffuse::testing::elementwise_cases;
  namespace k = diffuse::kernels;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  for (std::int64_t rows : {1, 7, 1000}) {
    for (std::int64_t C : {1, 3, 40, 128, 257}) {
      for (unsigned max_blocks : {3u, 65535u}) {
        for (bool accumulate : {false, true}) {
          const unsigned block = accumulate ? 96u : 256u;
          INFO("rows " << rows << " C " << C << " block " << block << " max_blocks " << max_blocks << " accumulate "
                       << accumulate);
          const std::size_t n = static_cast<std::size_t>(rows * C);
          const std::vector<float> z = normal_values(gen, n, 4.0f), b = normal_values(gen, static_cast<std::size_t>(C));
          const std::vector<float> dy = normal_values(gen, n), prefill = normal_values(gen, n);
          const BiasSiluRef ref = cpu_bias_silu(z, b, dy, accumulate ? &prefill : nullptr, rows, C);
          const std::vector<float> zb_ref = cpu_add_row_bias(z, b, rows, C);
          DeviceBuffer<float> dz(z), db(b), dyv(n), ddy(dy), ddz = accumulate ? DeviceBuffer<float>(prefill)
                                                                               : DeviceBuffer<float>(n);
          k::bias_silu_forward(dz.get(), db.get(), dyv.get(), rows, C, {}, block, max_blocks);
          k::bias_silu_backward(dz.get(), ddy.get(), ddz.get(), rows, C, accumulate, {}, block, max_blocks);
          const std::vector<float> zb = dz.to_host(), y = dyv.to_host(), grad = ddz.to_host();
          DIFFUSE_EW_CHECK(zb, zb_ref, exact);  // the kept pre-activation z + b
          // silu(z): each side's exp within 2 ulp plus 2-3 roundings: at most 9 eps relative together.
          auto tol_y = [&](std::size_t i) { return 10.0 * FLT_EPSILON * std::fabs(ref.y[i]) + FLT_MIN; };
          DIFFUSE_EW_CHECK(y, ref.y, tol_y);
          // dz: the CPU's g (s + y (1 - s)) against the kernel's g s (1 + z (1 - s)), the same function;
          // to first order the CPU errs by at most eps |g| s (12 |z| + 6) and the kernel by
          // 11 eps |g| s (1 + |z|), so 24 eps |g| s (1 + |z|), and eps |ref| for the sum with the prefill.
          auto tol_dz = [&](std::size_t i) {
            const double zi = zb_ref[i], s = 1.0 / (1.0 + std::exp(-zi));
            return 24.0 * FLT_EPSILON * std::fabs(dy[i]) * s * (1.0 + std::fabs(zi)) + FLT_EPSILON * std::fabs(ref.dz[i]);
          };
          DIFFUSE_EW_CHECK(grad, ref.dz, tol_dz);
        }
      }
    }
  }
}

TEST_CASE("kernel elementwise mse_forward and mse_backward match the CPU backend's mse") {
  using namespace diffuse::testing;
  using namespace diffuse::testing::elementwise_cases;
  namespace k = diffuse::kernels;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  for (std::int64_t n : {1, 33, 1025, 70001}) {
    for (unsigned block : {64u, 256u}) {
      for (unsigned max_blocks : {1u, 3u, 1024u}) {
        for (bool accumulate : {false, true}) {
          INFO("n " << n << " block " << block << " max_blocks " << max_blocks << " accumulate " << accumulate);
          const std::size_t sn = static_cast<std::size_t>(n);
          const std::vector<float> a = normal_values(gen, sn), b = normal_values(gen, sn);
          const std::vector<float> pa = normal_values(gen, sn), pb = normal_values(gen, sn);
          const float grad_scale = accumulate ? std::uniform_real_distribution<float>(0.1f, 3.0f)(gen) : 1.0f;
          const MseRef ref = cpu_mse(a, b, grad_scale, accumulate ? &pa : nullptr, accumulate ? &pb : nullptr);

          const std::size_t ws_bytes = k::mse_forward_workspace_bytes(n, block, max_blocks);
          DeviceBuffer<float> da(a), db(b), ws(ws_bytes / sizeof(float)), loss(1);
          k::mse_forward(da.get(), db.get(), n, loss.get(), ws.get(), {}, block, max_blocks);
          const std::vector<float> got_loss = loss.to_host();
          // All terms >= 0, so the float sum errs by at most L eps of the result: (a - b)^2 costs 3
          // roundings, a thread adds m terms, two block trees of depth 10 at most, the finishing
          // thread adds ceil(blocks / block) partials, then the division and the CPU's rounding.
          const std::int64_t blocks = static_cast<std::int64_t>(ws_bytes / sizeof(float));
          const std::int64_t m = (n + block * blocks - 1) / (block * blocks);
          const double L = 3.0 + static_cast<double>(m) + 20.0 + static_cast<double>((blocks + block - 1) / block) + 2.0;
          const std::vector<float> ref_loss{ref.loss};
          auto tol_loss = [&](std::size_t) { return L * FLT_EPSILON * std::fabs(ref.loss); };
          DIFFUSE_EW_CHECK(got_loss, ref_loss, tol_loss);

          DeviceBuffer<float> dga = accumulate ? DeviceBuffer<float>(pa) : DeviceBuffer<float>(sn);
          DeviceBuffer<float> dgb = accumulate ? DeviceBuffer<float>(pb) : DeviceBuffer<float>(sn);
          k::mse_backward(da.get(), db.get(), n, grad_scale, dga.get(), accumulate, {}, block, max_blocks);
          k::mse_backward(db.get(), da.get(), n, grad_scale, dgb.get(), accumulate, {}, block, max_blocks);
          const std::vector<float> ga = dga.to_host(), gb = dgb.to_host();
          // c (a - b) is the same two roundings on both sides; with a prefill either side may fuse
          // the multiply-add (the product unrounded: at most eps |c (a - b)| apart) before the last
          // rounding (eps |ref|).
          const float c = grad_scale * 2.0f / static_cast<float>(n);
          auto tol_a = [&](std::size_t i) {
            return accumulate ? FLT_EPSILON * (std::fabs(c * (a[i] - b[i])) + std::fabs(ref.da[i])) : 0.0;
          };
          auto tol_b = [&](std::size_t i) {
            return accumulate ? FLT_EPSILON * (std::fabs(c * (a[i] - b[i])) + std::fabs(ref.db[i])) : 0.0;
          };
          DIFFUSE_EW_CHECK(ga, ref.da, tol_a);
          // db: the kernel with a and b swapped gives c (b - a), the CPU's -c (a - b) exactly.
          DIFFUSE_EW_CHECK(gb, ref.db, tol_b);
        }
      }
    }
  }
}

TEST_CASE("kernel elementwise gather_rows_add and its backward match the CPU backend's gather_rows") {
  using namespace diffuse::testing;
  using namespace diffuse::testing::elementwise_cases;
  namespace k = diffuse::kernels;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  struct Size {
    std::int64_t R, N;
  };
  // R = 11 with indices below 8: duplicates (N > 8) and rows no sample uses (8, 9, 10); R = 1:
  // every sample on the same row.
  for (Size s : {Size{11, 1}, Size{11, 7}, Size{11, 40}, Size{1, 33}}) {
    for (std::int64_t D : {1, 3, 40, 128, 257}) {
      for (unsigned block : {32u, 256u}) {
        for (unsigned max_blocks : {2u, 65535u}) {
          INFO("R " << s.R << " N " << s.N << " D " << D << " block " << block << " max_blocks " << max_blocks);
          const std::size_t nt = static_cast<std::size_t>(s.R * D), ny = static_cast<std::size_t>(s.N * D);
          std::uniform_int_distribution<std::int32_t> pick(0, static_cast<std::int32_t>(std::min<std::int64_t>(s.R, 8) - 1));
          std::vector<std::int32_t> idx(static_cast<std::size_t>(s.N));
          for (auto& v : idx) v = pick(gen);
          if (s.N >= 7) idx[3] = idx[5] = idx[6];  // duplicates for sure
          const std::vector<float> table = normal_values(gen, nt), y = normal_values(gen, ny);
          const std::vector<float> dy = normal_values(gen, ny), prefill = normal_values(gen, nt);
          DeviceBuffer<float> dtab(table), dyv(y), ddy(dy), dgrad(prefill);
          DeviceBuffer<std::int32_t> didx(idx);
          k::gather_rows_add(dtab.get(), didx.get(), dyv.get(), s.N, D, {}, block, max_blocks);
          k::gather_rows_add_backward(didx.get(), ddy.get(), dgrad.get(), s.N, s.R, D, {}, block, max_blocks);
          const std::vector<float> got = dyv.to_host(), grad = dgrad.to_host();
          const std::vector<float> ref = cpu_gather_rows_add(table, idx, y, s.R, D);
          const std::vector<float> ref_grad = cpu_gather_rows_backward(idx, dy, prefill, s.R, D);
          DIFFUSE_EW_CHECK(got, ref, exact);
          // The scatter adds in sample order from the old value, as the CPU does: bit for bit.
          DIFFUSE_EW_CHECK(grad, ref_grad, exact);
        }
      }
    }
  }
}

TEST_CASE("kernel elementwise launchers reject bad arguments") {
  namespace k = diffuse::kernels;
  using diffuse::testing::DeviceBuffer;
  DeviceBuffer<float> a(std::vector<float>(64, 1.0f)), b(std::vector<float>(64, 1.0f)), out(64);
  CHECK_THROWS_AS(k::add(a.get(), b.get(), out.get(), -1), std::invalid_argument);
  CHECK_THROWS_AS(k::add(a.get(), b.get(), out.get(), 64, {}, 0), std::invalid_argument);
  CHECK_THROWS_AS(k::silu_backward(a.get(), b.get(), out.get(), 64, false, {}, 2048), std::invalid_argument);
  CHECK_THROWS_AS(k::row_bias_backward(a.get(), out.get(), 8, 8, nullptr, {}, 48), std::invalid_argument);
  CHECK_THROWS_AS(k::row_bias_backward(a.get(), out.get(), 8, 8, nullptr, {}, 64, 0), std::invalid_argument);
  // Several chunks need a workspace.
  REQUIRE(k::row_bias_backward_workspace_bytes(1000, 1, 32, 64) > 0);
  CHECK_THROWS_AS(k::row_bias_backward(a.get(), out.get(), 1000, 1, nullptr, {}, 32, 64), std::invalid_argument);
  CHECK_THROWS_AS(k::bias_silu_forward(a.get(), b.get(), a.get(), 8, 8), std::invalid_argument);
  CHECK_THROWS_AS(k::mse_forward(a.get(), b.get(), 0, out.get(), out.get()), std::invalid_argument);
  CHECK_THROWS_AS(k::mse_forward(a.get(), b.get(), 64, out.get(), out.get(), {}, 48), std::invalid_argument);
  CHECK_THROWS_AS(k::mse_forward(a.get(), b.get(), 64, out.get(), nullptr), std::invalid_argument);
  // Empty work launches nothing; a sum over no rows adds 0.
  k::add(a.get(), b.get(), out.get(), 0);
  k::gather_rows_add_backward(static_cast<const std::int32_t*>(nullptr), a.get(), out.get(), 0, 4, 8);
  DeviceBuffer<float> db(std::vector<float>(8, 2.5f));
  k::row_bias_backward(a.get(), db.get(), 0, 8, nullptr);
  CHECK(db.to_host() == std::vector<float>(8, 2.5f));
  k::channel_bias_backward(a.get(), db.get(), 1, 0, 8, false, nullptr);
  CHECK(db.to_host() == std::vector<float>(8, 0.0f));
}
