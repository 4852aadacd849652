// The GroupNorm (+SiLU) kernels (kernels/group_norm.cuh) against the CPU backend's
// diffuse::group_norm and its autograd backward. Included by test_emu_group_norm.cpp (CPU
// emulation) and cuda_group_norm.cu (nvcc, part of test_kernels_cuda).
//
// Tolerances are first-order rounding-error bounds built from the magnitudes involved, with
// u = 2^-24 (float's unit roundoff) and D = the longest chain of float additions the kernels'
// reduction trees put any value through (from the kernel's own work split):
//   D_part = ceil(L / by) + by         per chunk partial: a thread's pixels, then the by lanes
//   D_grp  = D_part + ceil(J / 128) + 12   per (n, g): J = chunks * Cg partials over 128 threads,
//                                          two 5-level warp trees, the count multiply and divide
//   D_col  = D_part + ceil(R / 16) + 17    per channel: R = N * chunks rows over 16 lanes, + the +=
// Forward, per (n, g) with A = max|x| in the group, var its variance, nt = ceil(L / by) values
// per thread, and S_t, S_k = sum of cnt |m - mu| over the threads' and the chunks' partial means m
// (computed here from the kernel's split):
//   |d mean| <= Em = 3 D_grp u A          (Welford's step rounds 3 times)
//   |d var| <= 3 (D_grp + 3) u var        (roundings of sums of non-negative terms)
//            + 4 nt u A sd                (Welford's n kappa u, kappa <= A / sd [Chan, Golub, LeVeque])
//            + 2 / M (5 nt u A S_t + (by + 2) u A S_k)   (the partial means' errors, through the
//              exact identity var M = sum M2_t + sum cnt_t (m_t - mu)^2: d/dm_t = 2 cnt_t (m_t - mu))
//   |d rstd| / rstd <= Er = |d var| / (var + eps) / 2 + 2 u
//   |d y| <= |a| Em + |x - mu| |a| Er + 10 u (|a| (|x| + |mu|) + |b|),   a = rstd gamma, b = beta
//            (the affine map's roundings on both sides); SiLU: 1.1 |d y| + 8 u |y| (|SiLU'| < 1.1)
// A variance from sums of x and x^2 in float is off by ~ n kappa^2 u: with x ~ N(1000, 1) it fails
// (tried: rstd 3x its tolerance); all inputs have a non-zero mean.
// Backward (fed the float-rounded reference mean and rstd, as the CPU op rounds them itself):
//   dd = 0 without SiLU, else |dy| (6 u (1 + |y|) + 2.5 u (|x - mu| |a| + |b|)) (SiLU' and the
//        recomputed y on either side, |SiLU''| <= 0.5)
//   |d k1| <= Ek1 = ((D_grp + 8) u sum|gamma dv| + 2 sum|gamma| dd) / M,  Ek2 likewise with xhat
//   |d dx| <= rstd (2 |gamma| dd + 6 u (|gamma dv| + |k1| + |xhat k2|) + Ek1 + |xhat| Ek2)
//   |d dgamma| <= (D_col + 8) u sum|dv xhat| + 2 sum|xhat| dd + 2 u (|prefill| + |dgamma|), dbeta likewise
// and accumulate adds 2 u (|prefill| + |value|). These are worst-case bounds: a missing pixel or
// chunk, a wrong count or a dropped term moves results by far more.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <diffuse/backend/cuda/bf16.hpp>

#include "device_buffer.hpp"
#include "kernel_reference_group_norm.hpp"
#include "kernel_seed.hpp"
#include "kernels/group_norm.cuh"

namespace diffuse::testing::gn {

struct Shape {
  std::int64_t N, H, W, C, G;
  float mean, sd;  // of x
};

// Counts elements outside their tolerance (NaN counts) and describes the worst one.
struct Mismatch {
  std::size_t bad = 0;
  double worst = 0;  // max |got - want| / tol
  std::string where;
  void check(const char* what, std::size_t i, double got, double want, double tol) {
    const double e = std::fabs(got - want);
    const bool ok = e <= tol;
    if (!ok) ++bad;
    const double ratio = ok ? e / tol : (std::isnan(e) ? INFINITY : e / tol);
    if (!(ratio <= worst)) {
      worst = ratio;
      std::ostringstream s;
      s << what << "[" << i << "]: got " << got << ", want " << want << ", tolerance " << tol;
      where = s.str();
    }
  }
};

inline void run_case(const Shape& s, bool silu, std::mt19937_64& gen) {
  using diffuse::kernels::group_norm_grid;
  const std::int64_t N = s.N, HW = s.H * s.W, C = s.C, G = s.G, Cg = C / G;
  const std::size_t n = static_cast<std::size_t>(N * HW * C);
  const double u = FLT_EPSILON / 2;
  std::normal_distribution<float> xd(s.mean, s.sd), normal(0.0f, 1.0f);
  std::vector<float> x(n), dy(n), gamma(static_cast<std::size_t>(C)), beta(gamma.size());
  for (float& v : x) v = xd(gen);
  for (float& v : dy) v = normal(gen);
  for (float& v : gamma) v = 1.0f + 0.5f * normal(gen);
  for (float& v : beta) v = 0.5f + normal(gen);
  const float eps = 1e-5f;
  const GroupNormRef ref = cpu_group_norm(x, gamma, beta, dy, N, s.H, s.W, C, G, eps, silu);
  std::vector<float> mean_f(ref.mean.begin(), ref.mean.end()), rstd_f(ref.rstd.begin(), ref.rstd.end());

  // Per (n, g): max |x| and sd (forward bounds).
  std::vector<double> amax(static_cast<std::size_t>(N * G), 0.0);
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t ng = (i / static_cast<std::size_t>(HW * C)) * G + (i % C) / Cg;
    amax[ng] = std::max(amax[ng], std::fabs(static_cast<double>(x[i])));
  }
  auto ng_of = [&](std::size_t i) { return (i / static_cast<std::size_t>(HW * C)) * G + (i % C) / Cg; };

  for (std::int64_t chunk : {std::int64_t{0}, std::int64_t{1}, std::int64_t{3}}) {
    if (chunk == 1 && N * HW > 1024) chunk = 5;  // keep the emulation quick on the big shapes
    const unsigned max_blocks = chunk == 3 ? 7u : 65535u;
    const kernels::GroupNormGrid pl = group_norm_grid(N, HW, C, G, chunk);
    INFO("chunk_pixels " << chunk << " (L " << pl.L << ", " << pl.chunks << " chunks/sample, block " << pl.bx << "x"
                         << pl.by << ", " << pl.tiles << " tiles) max_blocks " << max_blocks);
    const double d_part = static_cast<double>((pl.L + pl.by - 1) / pl.by + pl.by);
    const double d_grp = d_part + static_cast<double>((pl.chunks * Cg + 127) / 128) + 12;
    const double d_col = d_part + static_cast<double>((N * pl.chunks + 15) / 16) + 17;
    const std::size_t ws_bytes = kernels::group_norm_workspace_bytes(N, HW, C, G, chunk);
    DeviceBuffer<float> ws(ws_bytes / sizeof(float));

    // ---- forward
    DeviceBuffer<float> dx_in(x), dgam(gamma), dbet(beta), dyout(n), dmean(static_cast<std::size_t>(N * G)),
        drstd(static_cast<std::size_t>(N * G));
    kernels::group_norm_forward(dx_in.get(), dgam.get(), dbet.get(), dyout.get(), dmean.get(), drstd.get(), N, HW, C,
                                G, eps, silu, ws.get(), {}, chunk, max_blocks);
    const std::vector<float> y = dyout.to_host(), km = dmean.to_host(), kr = drstd.to_host();
    {
      // The same launch writing bf16 (group_norm_conv2d): each value is the float one rounded once,
      // bit for bit, and the statistics are the float launch's.
      DeviceBuffer<diffuse::bf16> dy16(n);
      DeviceBuffer<float> dmean16(static_cast<std::size_t>(N * G)), drstd16(static_cast<std::size_t>(N * G));
      kernels::group_norm_forward(dx_in.get(), dgam.get(), dbet.get(), dy16.get(), dmean16.get(), drstd16.get(), N, HW,
                                  C, G, eps, silu, ws.get(), {}, chunk, max_blocks);
      const std::vector<diffuse::bf16> y16 = dy16.to_host();
      std::size_t bad = 0;
      for (std::size_t i = 0; i < n; ++i) bad += y16[i].bits != diffuse::bf16(y[i]).bits;
      CHECK(bad == 0);
      CHECK(dmean16.to_host() == km);
      CHECK(drstd16.to_host() == kr);
    }
    // The spread of the partial means around the group mean, sum of cnt |m - mu| over the
    // threads' (sum_t) and over the chunks' (sum_k) partials, as the kernel's split makes them.
    std::vector<double> sum_t(km.size(), 0.0), sum_k(km.size(), 0.0);
    for (std::int64_t b = 0; b < N; ++b)
      for (std::int64_t k = 0; k < pl.chunks; ++k) {
        const std::int64_t p0 = k * pl.L, p1 = std::min(HW, p0 + pl.L);
        for (std::int64_t c = 0; c < C; ++c) {
          const std::size_t ng = static_cast<std::size_t>(b * G + c / Cg);
          const double mu = ref.mean[ng];
          double sk = 0;
          for (std::int64_t j = 0; j < pl.by && p0 + j < p1; ++j) {
            double st = 0, cnt = 0;
            for (std::int64_t p = p0 + j; p < p1; p += pl.by, ++cnt) st += x[static_cast<std::size_t>((b * HW + p) * C + c)];
            sum_t[ng] += std::fabs(st - cnt * mu);
            sk += st;
          }
          sum_k[ng] += std::fabs(sk - static_cast<double>(p1 - p0) * mu);
        }
      }
    const double nt = static_cast<double>((pl.L + pl.by - 1) / pl.by);
    std::vector<double> em(km.size()), er(km.size());
    {
      Mismatch mm;
      for (std::size_t ng = 0; ng < km.size(); ++ng) {
        const double ve = 1.0 / (ref.rstd[ng] * ref.rstd[ng]), var = ve - eps, sd = std::sqrt(std::max(var, 0.0));
        const double A = amax[ng], M = static_cast<double>(HW * Cg);
        em[ng] = 3 * d_grp * u * A;
        // var error: roundings of the non-negative sums; Welford's n kappa u (kappa <= A / sd);
        // the thread and chunk means' errors (5 nt u A, (by + 2) u A) times 2 cnt (m - mu).
        const double dvar = 3 * (d_grp + 3) * u * var + 4 * nt * u * A * sd +
                            2 / M * (5 * nt * u * A * sum_t[ng] + (pl.by + 2) * u * A * sum_k[ng]);
        er[ng] = dvar / ve / 2 + 2 * u;
        mm.check("mean", ng, km[ng], ref.mean[ng], em[ng]);
        mm.check("rstd", ng, kr[ng], ref.rstd[ng], er[ng] * ref.rstd[ng]);
      }
      INFO(mm.where);
      CHECK(mm.bad == 0);
    }
    {
      Mismatch mm;
      for (std::size_t i = 0; i < n; ++i) {
        const std::size_t ng = ng_of(i), c = i % C;
        const double mu = ref.mean[ng], a = std::fabs(ref.rstd[ng] * gamma[c]), b = std::fabs(beta[c]);
        const double xi = x[i];
        double tol = a * em[ng] + std::fabs(xi - mu) * a * er[ng] + 10 * u * (a * (std::fabs(xi) + std::fabs(mu)) + b);
        if (silu) tol = 1.1 * tol + 8 * u * std::fabs((xi - mu) * ref.rstd[ng] * gamma[c] + beta[c]);
        mm.check("y", i, y[i], ref.y[i], tol);
      }
      INFO(mm.where);
      CHECK(mm.bad == 0);
    }

    // ---- backward, from the reference mean and rstd rounded to float (as the CPU op uses them)
    // Magnitudes in double: dv = dy (times SiLU'(y)), xhat, and their error allowance dd.
    std::vector<double> dv(n), xh(n), dd(n);
    std::vector<double> s1(static_cast<std::size_t>(N * G), 0.0), s2(s1), sd1(s1), sd2(s1), k1(s1), k2(s1);
    std::vector<double> c1(static_cast<std::size_t>(C), 0.0), c2(c1), cd1(c1), cd2(c1);
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t ng = ng_of(i), c = i % C;
      const double mu = mean_f[ng], r = rstd_f[ng], a = r * gamma[c];
      xh[i] = (x[i] - mu) * r;
      dv[i] = dy[i];
      dd[i] = 0;
      if (silu) {
        const double yv = (x[i] - mu) * a + beta[c], sg = 1 / (1 + std::exp(-yv));
        dv[i] = dy[i] * sg * (1 + yv * (1 - sg));
        dd[i] = std::fabs(dy[i]) * (6 * u * (1 + std::fabs(yv)) + 2.5 * u * (std::fabs(x[i] - mu) * std::fabs(a) + std::fabs(beta[c])));
      }
      const double ga = std::fabs(gamma[c]);
      s1[ng] += ga * std::fabs(dv[i]);
      s2[ng] += ga * std::fabs(dv[i] * xh[i]);
      sd1[ng] += ga * dd[i];
      sd2[ng] += ga * std::fabs(xh[i]) * dd[i];
      k1[ng] += gamma[c] * dv[i];
      k2[ng] += gamma[c] * dv[i] * xh[i];
      c1[c] += std::fabs(dv[i]);
      c2[c] += std::fabs(dv[i] * xh[i]);
      cd1[c] += dd[i];
      cd2[c] += std::fabs(xh[i]) * dd[i];
    }
    const double M = static_cast<double>(HW * Cg);
    for (bool accumulate : {false, true}) {
      INFO("silu " << silu << " accumulate_dx " << accumulate);
      std::vector<float> dx0(n), dg0(gamma.size()), db0(gamma.size());
      for (float& v : dx0) v = normal(gen);
      for (float& v : dg0) v = normal(gen);
      for (float& v : db0) v = normal(gen);
      DeviceBuffer<float> ddy(dy), dmf(mean_f), drf(rstd_f), ddx(accumulate ? dx0 : std::vector<float>(n, NAN)),
          ddg(dg0), ddb(db0);
      kernels::group_norm_backward(ddy.get(), dx_in.get(), dgam.get(), dbet.get(), dmf.get(), drf.get(), ddx.get(),
                                   ddg.get(), ddb.get(), N, HW, C, G, silu, accumulate, ws.get(), {}, chunk,
                                   max_blocks);
      const std::vector<float> gx = ddx.to_host(), gg = ddg.to_host(), gb = ddb.to_host();
      {
        // dy given in bf16 (group_norm_conv2d: a bf16 convolution's input gradient), read as it is:
        // bit for bit the float launch on dy's values rounded to bf16 and widened.
        std::vector<diffuse::bf16> dy16(n);
        std::vector<float> dyw(n);
        for (std::size_t i = 0; i < n; ++i) {
          dy16[i] = diffuse::bf16(dy[i]);
          dyw[i] = static_cast<float>(dy16[i]);
        }
        DeviceBuffer<diffuse::bf16> ddy16(dy16);
        DeviceBuffer<float> ddyw(dyw), dxa(accumulate ? dx0 : std::vector<float>(n, NAN)), dxb(dxa.to_host()),
            dga(dg0), dgb(dg0), dba(db0), dbb(db0);
        kernels::group_norm_backward(ddy16.get(), dx_in.get(), dgam.get(), dbet.get(), dmf.get(), drf.get(), dxa.get(),
                                     dga.get(), dba.get(), N, HW, C, G, silu, accumulate, ws.get(), {}, chunk,
                                     max_blocks);
        kernels::group_norm_backward(ddyw.get(), dx_in.get(), dgam.get(), dbet.get(), dmf.get(), drf.get(), dxb.get(),
                                     dgb.get(), dbb.get(), N, HW, C, G, silu, accumulate, ws.get(), {}, chunk,
                                     max_blocks);
        CHECK(dxa.to_host() == dxb.to_host());
        CHECK(dga.to_host() == dgb.to_host());
        CHECK(dba.to_host() == dbb.to_host());
      }
      Mismatch mx, mp;
      for (std::size_t i = 0; i < n; ++i) {
        const std::size_t ng = ng_of(i), c = i % C;
        const double ga = std::fabs(gamma[c]);
        const double ek1 = ((d_grp + 8) * u * s1[ng] + 2 * sd1[ng]) / M, ek2 = ((d_grp + 8) * u * s2[ng] + 2 * sd2[ng]) / M;
        double tol = rstd_f[ng] * (2 * ga * dd[i] +
                                   6 * u * (ga * std::fabs(dv[i]) + std::fabs(k1[ng] / M) + std::fabs(xh[i] * k2[ng] / M)) +
                                   ek1 + std::fabs(xh[i]) * ek2);
        const double want = (accumulate ? static_cast<double>(dx0[i]) : 0.0) + ref.dx[i];
        if (accumulate) tol += 2 * u * (std::fabs(dx0[i]) + std::fabs(ref.dx[i]));
        mx.check("dx", i, gx[i], want, tol);
      }
      for (std::size_t c = 0; c < gamma.size(); ++c) {
        const double wg = static_cast<double>(dg0[c]) + ref.dgamma[c], wb = static_cast<double>(db0[c]) + ref.dbeta[c];
        mp.check("dgamma", c, gg[c], wg,
                 (d_col + 8) * u * c2[c] + 2 * cd2[c] + 2 * u * (std::fabs(dg0[c]) + std::fabs(ref.dgamma[c])));
        mp.check("dbeta", c, gb[c], wb,
                 (d_col + 8) * u * c1[c] + 2 * cd1[c] + 2 * u * (std::fabs(db0[c]) + std::fabs(ref.dbeta[c])));
      }
      INFO(mx.where);
      CHECK(mx.bad == 0);
      INFO(mp.where);
      CHECK(mp.bad == 0);
    }
  }
}

}  // namespace diffuse::testing::gn

TEST_CASE("kernel group_norm forward and backward match the CPU backend's group_norm") {
  using diffuse::testing::gn::Shape;
  const std::uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  const Shape shapes[] = {
      {1, 1, 1, 1, 1, 3, 2},       // one value: var 0, xhat 0
      {1, 1, 1, 6, 3, 3, 2},       // HW = 1
      {2, 3, 5, 8, 8, 3, 2},       // C = G (Cg = 1)
      {3, 7, 9, 96, 32, 3, 2},     // C = 96, G = 32, HW = 63
      {2, 5, 13, 40, 8, 3, 2},     // C = 40, HW = 65
      {1, 16, 16, 64, 32, 3, 2},   // N = 1
      {2, 32, 32, 128, 32, 3, 2},  // a U-Net size
      {1, 3, 7, 300, 20, 3, 2},    // two channel tiles, group 10 (channels 150-164) across the boundary
      {2, 4, 5, 264, 1, 3, 2},     // G = 1 over two tiles
      {2, 9, 11, 48, 4, 1000, 1},  // mean >> sd: a cancelling variance formula would fail
  };
  for (const Shape& s : shapes)
    for (bool silu : {false, true}) {
      INFO("N " << s.N << " H " << s.H << " W " << s.W << " C " << s.C << " G " << s.G << " x ~ N(" << s.mean << ", "
                << s.sd << ") silu " << silu);
      diffuse::testing::gn::run_case(s, silu, gen);
    }
}

TEST_CASE("kernel group_norm is deterministic and checks its arguments") {
  using namespace diffuse::testing;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const std::int64_t N = 2, HW = 37, C = 40, G = 8;
  const std::size_t n = static_cast<std::size_t>(N * HW * C);
  std::vector<float> x(n), dy(n), gamma(static_cast<std::size_t>(C)), beta(gamma.size());
  for (float& v : x) v = 3 + 2 * normal(gen);
  for (float& v : dy) v = normal(gen);
  for (float& v : gamma) v = 1 + 0.5f * normal(gen);
  for (float& v : beta) v = normal(gen);
  DeviceBuffer<float> ws(diffuse::kernels::group_norm_workspace_bytes(N, HW, C, G, 2) / sizeof(float));
  auto run = [&] {
    DeviceBuffer<float> dx_(x), dy_(dy), g_(gamma), b_(beta), y_(n), m_(static_cast<std::size_t>(N * G)),
        r_(static_cast<std::size_t>(N * G)), gx_(n), gg_(std::vector<float>(gamma.size(), 0.0f)),
        gb_(std::vector<float>(gamma.size(), 0.0f));
    diffuse::kernels::group_norm_forward(dx_.get(), g_.get(), b_.get(), y_.get(), m_.get(), r_.get(), N, HW, C, G,
                                         1e-5f, true, ws.get(), {}, 2);
    diffuse::kernels::group_norm_backward(dy_.get(), dx_.get(), g_.get(), b_.get(), m_.get(), r_.get(), gx_.get(),
                                          gg_.get(), gb_.get(), N, HW, C, G, true, false, ws.get(), {}, 2);
    std::vector<float> all = y_.to_host();
    for (const auto* b : {&m_, &r_, &gx_, &gg_, &gb_}) {
      const std::vector<float> v = b->to_host();
      all.insert(all.end(), v.begin(), v.end());
    }
    return all;
  };
  const std::vector<float> a = run(), b = run();
  CHECK(std::equal(a.begin(), a.end(), b.begin(), b.end(), [](float p, float q) { return std::memcmp(&p, &q, 4) == 0; }));

  float* p = nullptr;
  using diffuse::kernels::group_norm_forward;
  CHECK_THROWS_WITH(group_norm_forward(p, p, p, p, p, p, 1, 4, 6, 4, 1e-5f, false, nullptr),
                    Catch::Contains("C % groups"));
  CHECK_THROWS_WITH(group_norm_forward(p, p, p, p, p, p, 1, 4, 6, 0, 1e-5f, false, nullptr),
                    Catch::Contains("groups"));
  CHECK_THROWS_WITH(group_norm_forward(p, p, p, p, p, p, -1, 4, 6, 3, 1e-5f, false, nullptr),
                    Catch::Contains("negative"));
  CHECK_THROWS_WITH(group_norm_forward(p, p, p, p, p, p, 1, 4, 6, 3, 0.0f, false, nullptr), Catch::Contains("eps"));
  CHECK_THROWS_WITH(group_norm_forward(p, p, p, p, p, p, 1, 4, 6, 3, 1e-5f, false, nullptr, {}, -1),
                    Catch::Contains("chunk_pixels"));
  // Nothing to do: no launch, no throw.
  CHECK_NOTHROW(group_norm_forward(p, p, p, p, p, p, 0, 4, 6, 3, 1e-5f, false, nullptr));
}

TEST_CASE("kernel group_norm on a bf16 x with float gamma and beta is the float launch on the widened values") {
  // res_block's second normalisation reads its input (a convolution's output) in bf16 and writes
  // its input's gradient in bf16: x widened exactly, all arithmetic in float, each dx rounded once.
  // So: bit for bit the float launch on the widened x (and widened dy), dx rounded to bf16 once;
  // or dx in float (res_block's first normalisation on the up path), bit for bit.
  using namespace diffuse::testing;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  struct S {
    std::int64_t N, HW, C, G;
  };
  for (const S s : {S{2, 37, 40, 8}, S{1, 64, 300, 20}, S{3, 16, 32, 32}})
    for (bool silu : {false, true})
      for (bool drop : {false, true}) {
        INFO("N " << s.N << " HW " << s.HW << " C " << s.C << " G " << s.G << " silu " << silu << " dropout " << drop);
        const std::size_t n = static_cast<std::size_t>(s.N * s.HW * s.C), ng = static_cast<std::size_t>(s.N * s.G);
        std::vector<diffuse::bf16> x16(n), dy16(n);
        std::vector<float> xw(n), dyw(n), gamma(static_cast<std::size_t>(s.C)), beta(gamma.size());
        for (std::size_t i = 0; i < n; ++i) {
          x16[i] = diffuse::bf16(2 + 3 * normal(gen));
          xw[i] = static_cast<float>(x16[i]);
          dy16[i] = diffuse::bf16(normal(gen));
          dyw[i] = static_cast<float>(dy16[i]);
        }
        for (float& v : gamma) v = 1 + 0.5f * normal(gen);
        for (float& v : beta) v = normal(gen);
        std::vector<std::uint32_t> keep((n + 31) / 32);
        for (std::uint32_t& w : keep) w = static_cast<std::uint32_t>(gen());
        const std::uint32_t* kp = nullptr;
        DeviceBuffer<std::uint32_t> dkeep(keep);
        if (drop) kp = dkeep.get();
        const float scale = drop ? 1.25f : 1.0f;
        DeviceBuffer<float> ws(diffuse::kernels::group_norm_workspace_bytes(s.N, s.HW, s.C, s.G) / sizeof(float));
        DeviceBuffer<diffuse::bf16> dx16(x16), ddy16(dy16), y16a(n), y16b(n), gx16(n);
        DeviceBuffer<float> dxw(xw), ddyw(dyw), g_(gamma), b_(beta), ma(ng), ra(ng), mb(ng), rb(ng), gxw(n),
            gga(std::vector<float>(gamma.size(), 0.5f)), gba(gga.to_host()), ggb(gga.to_host()), gbb(gga.to_host());
        diffuse::kernels::group_norm_forward(dx16.get(), g_.get(), b_.get(), y16a.get(), ma.get(), ra.get(), s.N, s.HW,
                                             s.C, s.G, 1e-6f, silu, ws.get(), {}, 0, 65535, kp, scale);
        diffuse::kernels::group_norm_forward(dxw.get(), g_.get(), b_.get(), y16b.get(), mb.get(), rb.get(), s.N, s.HW,
                                             s.C, s.G, 1e-6f, silu, ws.get(), {}, 0, 65535, kp, scale);
        const std::vector<diffuse::bf16> ya = y16a.to_host(), yb = y16b.to_host();
        std::size_t bad = 0;
        for (std::size_t i = 0; i < n; ++i) bad += ya[i].bits != yb[i].bits;
        CHECK(bad == 0);
        CHECK(ma.to_host() == mb.to_host());
        CHECK(ra.to_host() == rb.to_host());
        // A non-trivial output: values spread, and with dropout some zeros.
        std::size_t zeros = 0;
        for (const diffuse::bf16 v : ya) zeros += static_cast<float>(v) == 0.0f;
        CHECK((drop ? zeros > n / 8 : zeros < n / 8));

        diffuse::kernels::group_norm_backward(ddy16.get(), dx16.get(), g_.get(), b_.get(), ma.get(), ra.get(),
                                              gx16.get(), false, gga.get(), true, gba.get(), true, s.N, s.HW, s.C, s.G,
                                              silu, ws.get(), {}, 0, 65535, kp, scale);
        diffuse::kernels::group_norm_backward(ddyw.get(), dxw.get(), g_.get(), b_.get(), mb.get(), rb.get(), gxw.get(),
                                              false, ggb.get(), true, gbb.get(), true, s.N, s.HW, s.C, s.G, silu,
                                              ws.get(), {}, 0, 65535, kp, scale);
        const std::vector<diffuse::bf16> ga = gx16.to_host();
        const std::vector<float> gb = gxw.to_host();
        bad = 0;
        double norm = 0;
        for (std::size_t i = 0; i < n; ++i) {
          bad += ga[i].bits != diffuse::bf16(gb[i]).bits;
          norm += static_cast<double>(gb[i]) * gb[i];
        }
        CHECK(bad == 0);
        CHECK(norm > 1e-3 * static_cast<double>(n));  // a gradient, not zeros
        CHECK(gga.to_host() == ggb.to_host());
        CHECK(gba.to_host() == gbb.to_host());
        // x's gradient in float, added to a prefilled buffer (res_block's concatenated input,
        // whose gradient the skip convolution's adds to): the float launch's, bit for bit.
        std::vector<float> pre(n);
        for (float& v : pre) v = normal(gen);
        DeviceBuffer<float> gxa(pre), gxb(pre);
        diffuse::kernels::group_norm_backward(ddy16.get(), dx16.get(), g_.get(), b_.get(), ma.get(), ra.get(), gxa.get(),
                                              true, static_cast<float*>(nullptr), false, static_cast<float*>(nullptr),
                                              false, s.N, s.HW, s.C, s.G, silu, ws.get(), {}, 0, 65535, kp, scale);
        diffuse::kernels::group_norm_backward(ddyw.get(), dxw.get(), g_.get(), b_.get(), mb.get(), rb.get(), gxb.get(),
                                              true, static_cast<float*>(nullptr), false, static_cast<float*>(nullptr),
                                              false, s.N, s.HW, s.C, s.G, silu, ws.get(), {}, 0, 65535, kp, scale);
        CHECK(gxa.to_host() == gxb.to_host());
        CHECK(gxa.to_host() != pre);
      }
}
