// The image-family kernels against the CPU backend, on fresh random inputs of awkward sizes:
//   kernels/image.cuh               upsample_nearest2x, concat along channels, dropout (fwd + bwd)
//   kernels/timestep_embedding.cuh  the sinusoidal timestep embedding
//   kernels/sampler.cuh             one DDPM / DDIM step (+ classifier-free guidance)
// Backward references go through the CPU autograd (kernel_reference_image.cpp). Included by
// test_emu_image.cpp (g++, the CPU emulation) and cuda_image.cu (nvcc, a GPU).
//
// Exactness: copies, the upsample gradient (the same float additions in the same order), dropout
// (one float multiply by the same scale; the mask from the same integer Philox words compared the
// same way) and all accumulations (one float add) are bit for bit on either device. The embedding
// and the sampler steps involve libm calls or fusable multiply-adds; see their tolerances.
#pragma once

#include <catch2/catch.hpp>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include <diffuse/core/rng.hpp>

#include "device_buffer.hpp"
#include "kernel_reference_image.hpp"
#include "kernel_seed.hpp"
#include "kernels/image.cuh"
#include "kernels/sampler.cuh"
#include "kernels/timestep_embedding.cuh"

namespace diffuse::testing::image_cases {

inline std::vector<float> randn(std::mt19937_64& g, std::size_t n) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = normal(g);
  return v;
}

// Elements that differ in any bit pattern other than +0 / -0 (NaN, i.e. unwritten, counts).
inline std::size_t count_unequal(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return a.size() + b.size() + 1;
  std::size_t bad = 0;
  for (std::size_t i = 0; i < a.size(); ++i) bad += !(a[i] == b[i]);
  return bad;
}

struct Launch {
  unsigned block, max_blocks;
};
// 32 threads and 2 blocks: every size above 64 goes round the grid-stride loop.
inline const std::vector<Launch>& launches() {
  static const std::vector<Launch> l = {{32, 2}, {96, 65535}, {256, 65535}};
  return l;
}

}  // namespace diffuse::testing::image_cases

TEST_CASE("kernel image upsample_nearest2x forward and backward match the CPU backend bit for bit") {
  using namespace diffuse::testing;
  using namespace diffuse::testing::image_cases;
  namespace k = diffuse::kernels;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  struct S {
    std::int64_t N, H, W, C;
  };
  for (const S s : {S{1, 1, 1, 1}, S{1, 1, 1, 3}, S{2, 1, 3, 33}, S{4, 3, 5, 3}, S{3, 7, 2, 33}, S{2, 8, 8, 64},
                    S{4, 5, 7, 35}}) {
    for (const Launch L : launches()) {
      INFO("N " << s.N << " H " << s.H << " W " << s.W << " C " << s.C << " block " << L.block << " max_blocks "
                << L.max_blocks);
      const std::size_t nin = static_cast<std::size_t>(s.N * s.H * s.W * s.C), nout = 4 * nin;
      const std::vector<float> x = randn(gen, nin), dy = randn(gen, nout), prefill = randn(gen, nin);
      DeviceBuffer<float> dx_in(x), dy_out(nout), ddy(dy), ddx(nin), ddx_acc(prefill);
      k::upsample_nearest2x_forward(dx_in.get(), dy_out.get(), s.N, s.H, s.W, s.C, {}, L.block, L.max_blocks);
      CHECK(count_unequal(dy_out.to_host(), cpu_upsample_nearest2x(x, s.N, s.H, s.W, s.C)) == 0);
      k::upsample_nearest2x_backward(ddy.get(), ddx.get(), s.N, s.H, s.W, s.C, false, {}, L.block, L.max_blocks);
      CHECK(count_unequal(ddx.to_host(), cpu_upsample_nearest2x_backward(x, dy, s.N, s.H, s.W, s.C, nullptr)) == 0);
      k::upsample_nearest2x_backward(ddy.get(), ddx_acc.get(), s.N, s.H, s.W, s.C, true, {}, L.block, L.max_blocks);
      CHECK(count_unequal(ddx_acc.to_host(), cpu_upsample_nearest2x_backward(x, dy, s.N, s.H, s.W, s.C, &prefill)) ==
            0);
    }
  }
  float* null = nullptr;
  CHECK_THROWS_AS(k::upsample_nearest2x_forward(null, null, 1, -1, 1, 1), std::invalid_argument);
  CHECK_THROWS_AS(k::upsample_nearest2x_backward(null, null, 1, 1, 1, 1, false, {}, 0), std::invalid_argument);
  k::upsample_nearest2x_forward(null, null, 0, 3, 3, 3);  // empty: no launch
}

TEST_CASE("kernel image concat_channels forward and backward match the CPU backend's concat(xs, 3)") {
  using namespace diffuse::testing;
  using namespace diffuse::testing::image_cases;
  namespace k = diffuse::kernels;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  struct S {
    std::int64_t N, H, W, Ca, Cb;
  };
  for (const S s : {S{1, 1, 1, 1, 1}, S{1, 1, 1, 3, 33}, S{2, 3, 5, 33, 3}, S{4, 7, 3, 64, 1}, S{3, 5, 5, 35, 64}}) {
    const std::int64_t P = s.N * s.H * s.W;
    for (const Launch L : launches()) {
      INFO("N " << s.N << " H " << s.H << " W " << s.W << " Ca " << s.Ca << " Cb " << s.Cb << " block " << L.block
                << " max_blocks " << L.max_blocks);
      const std::size_t na = static_cast<std::size_t>(P * s.Ca), nb = static_cast<std::size_t>(P * s.Cb);
      const std::vector<float> a = randn(gen, na), b = randn(gen, nb), dy = randn(gen, na + nb);
      const std::vector<float> pa = randn(gen, na), pb = randn(gen, nb);
      DeviceBuffer<float> da_in(a), db_in(b), dy_out(na + nb), ddy(dy);
      k::concat_channels_forward(da_in.get(), db_in.get(), dy_out.get(), P, s.Ca, s.Cb, {}, L.block, L.max_blocks);
      CHECK(count_unequal(dy_out.to_host(), cpu_concat_channels(a, b, s.N, s.H, s.W, s.Ca, s.Cb)) == 0);
      // Which inputs want a gradient, and whether each adds to one already there.
      for (int need = 1; need < 4; ++need) {
        for (int acc = 0; acc < 4; ++acc) {
          const bool need_a = need & 1, need_b = need & 2, acc_a = acc & 1, acc_b = acc & 2;
          if ((acc_a && !need_a) || (acc_b && !need_b)) continue;
          INFO("need_a " << need_a << " need_b " << need_b << " accumulate_a " << acc_a << " accumulate_b " << acc_b);
          // Written gradients start as NaN, so an element the kernel misses fails.
          DeviceBuffer<float> dga(acc_a ? pa : std::vector<float>(na, NAN)), dgb(acc_b ? pb : std::vector<float>(nb, NAN));
          k::concat_channels_backward(ddy.get(), need_a ? dga.get() : nullptr, need_b ? dgb.get() : nullptr, P, s.Ca,
                                      s.Cb, acc_a, acc_b, {}, L.block, L.max_blocks);
          const ConcatGrads ref = cpu_concat_channels_backward(a, b, dy, s.N, s.H, s.W, s.Ca, s.Cb, need_a, need_b,
                                                               acc_a ? &pa : nullptr, acc_b ? &pb : nullptr);
          if (need_a) CHECK(count_unequal(dga.to_host(), ref.da) == 0);
          if (need_b) CHECK(count_unequal(dgb.to_host(), ref.db) == 0);
        }
      }
    }
  }
  float* null = nullptr;
  CHECK_THROWS_AS(k::concat_channels_forward(null, null, null, 1, -1, 1), std::invalid_argument);
}

TEST_CASE("kernel image dropout draws the CPU dropout's mask and matches its forward and backward bit for bit") {
  using namespace diffuse::testing;
  using namespace diffuse::testing::image_cases;
  namespace k = diffuse::kernels;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  for (const double p : {0.1, 0.5, 1.0}) {
    for (const std::int64_t n : {1, 3, 5, 66, 1001, 4099}) {
      for (const Launch L : launches()) {
        // Offsets that are no multiple of 4 (and one beyond 32 bits: the counter's high word).
        const std::uint64_t s = gen(), off0 = 4 * (gen() >> 40) + 1 + gen() % 3;
        for (const std::uint64_t off : {off0, off0 + (std::uint64_t{1} << 32)}) {
          INFO("p " << p << " n " << n << " offset " << off << " block " << L.block << " max_blocks " << L.max_blocks);
          const std::size_t un = static_cast<std::size_t>(n);
          const std::vector<float> x = randn(gen, un), dy = randn(gen, un), prefill = randn(gen, un);
          const DropoutRef ref = cpu_dropout(x, dy, p, s, off, nullptr);
          const DropoutRef ref_acc = cpu_dropout(x, dy, p, s, off, &prefill);
          // The caller's side of the contract: draw the offset as the CPU op does.
          diffuse::Generator g(s, off);
          const std::uint64_t draw = g.advance(un);
          CHECK(draw == ref.draw_offset);
          CHECK(g.offset == ref.offset_after);
          DeviceBuffer<float> dx_in(x), dy_out(un), ddy(dy), ddx(un), ddx_acc(prefill);
          k::dropout_forward(dx_in.get(), dy_out.get(), n, p, s, draw, {}, L.block, L.max_blocks);
          const std::vector<float> y = dy_out.to_host();
          // x is never 0, so y != 0 is the mask: the same mask and the same scaled values.
          CHECK(count_unequal(y, ref.y) == 0);
          std::size_t kept = 0;
          for (float v : y) kept += v != 0;
          if (p == 1.0) CHECK(kept == 0);
          k::dropout_backward(ddy.get(), ddx.get(), n, p, s, draw, false, {}, L.block, L.max_blocks);
          CHECK(count_unequal(ddx.to_host(), ref.dx) == 0);
          k::dropout_backward(ddy.get(), ddx_acc.get(), n, p, s, draw, true, {}, L.block, L.max_blocks);
          CHECK(count_unequal(ddx_acc.to_host(), ref_acc.dx) == 0);
        }
      }
    }
  }
  float* null = nullptr;
  CHECK_THROWS_AS(k::dropout_forward(null, null, 4, 1.5, 1, 0), std::invalid_argument);
  CHECK_THROWS_AS(k::dropout_backward(null, null, -1, 0.5, 1, 0), std::invalid_argument);
}

TEST_CASE("kernel image dropout of a data-parallel rank's share is that share of the whole batch's dropout") {
  using namespace diffuse::testing;
  using namespace diffuse::testing::image_cases;
  namespace k = diffuse::kernels;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  for (const std::int64_t n : {1, 3, 6, 1001}) {
    for (const std::uint32_t parts : {2u, 3u}) {
      const std::size_t un = static_cast<std::size_t>(n), whole = un * parts;
      const std::uint64_t s = gen(), off = gen() >> 24;
      const std::vector<float> x = randn(gen, whole), dy = randn(gen, whole);
      const DropoutRef ref = cpu_dropout(x, dy, 0.3, s, off, nullptr);  // one process, the whole batch
      for (std::uint32_t part = 0; part < parts; ++part) {
        INFO("n " << n << " part " << part << " of " << parts);
        diffuse::Generator g(s, off);
        g.part = part, g.parts = parts;
        const diffuse::DrawPos at = g.take(un);
        CHECK(g.offset == ref.offset_after);
        const std::vector<float> xs(x.begin() + part * n, x.begin() + (part + 1) * n);
        const std::vector<float> dys(dy.begin() + part * n, dy.begin() + (part + 1) * n);
        DeviceBuffer<float> dx_in(xs), dy_out(un), ddy(dys), ddx(un);
        k::dropout_forward(dx_in.get(), dy_out.get(), n, 0.3, s, at, {}, 32, 2);
        k::dropout_backward(ddy.get(), ddx.get(), n, 0.3, s, at, false, {}, 32, 2);
        CHECK(count_unequal(dy_out.to_host(), std::vector<float>(ref.y.begin() + part * n, ref.y.begin() + (part + 1) * n)) == 0);
        CHECK(count_unequal(ddx.to_host(), std::vector<float>(ref.dx.begin() + part * n, ref.dx.begin() + (part + 1) * n)) == 0);
      }
    }
  }
}

// The mask as bits (group_norm_dropout's): bit i set exactly where the CPU's dropout keeps
// element i, for offsets inside a Philox block, a rank's share (first != 0) and awkward n.
TEST_CASE("kernel image dropout_bits holds the CPU dropout's mask") {
  using namespace diffuse::testing;
  using namespace diffuse::testing::image_cases;
  namespace k = diffuse::kernels;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  for (const double p : {0.1, 0.5, 1.0}) {
    for (const std::int64_t n : {1, 31, 32, 33, 66, 1001, 4099}) {
      for (const std::uint32_t parts : {1u, 3u}) {
        for (const Launch L : launches()) {
          const std::uint32_t part = parts - 1;  // the last share: first = part * n, no multiple of 4 for odd n
          const std::size_t un = static_cast<std::size_t>(n), whole = un * parts;
          const std::uint64_t s = gen(), off = 4 * (gen() >> 40) + 1 + gen() % 3;
          INFO("p " << p << " n " << n << " part " << part << " of " << parts << " block " << L.block);
          const std::vector<float> x = randn(gen, whole), dy = randn(gen, whole);
          const DropoutRef ref = cpu_dropout(x, dy, p, s, off, nullptr);  // x is never 0: y != 0 is the mask
          diffuse::Generator g(s, off);
          g.part = part, g.parts = parts;
          const diffuse::DrawPos at = g.take(un);
          const std::size_t words = (un + 31) / 32;
          DeviceBuffer<std::uint32_t> bits(words);  // filled with 1 bits: a word never written shows
          k::dropout_bits(bits.get(), n, p, s, at, {}, L.block, L.max_blocks);
          const std::vector<std::uint32_t> b = bits.to_host();
          std::size_t wrong = 0, kept = 0;
          for (std::size_t i = 0; i < un; ++i) {
            const bool bit = (b[i / 32] >> (i % 32)) & 1u;
            kept += bit;
            wrong += bit != (ref.y[part * un + i] != 0.0f);
          }
          for (std::size_t i = un; i < 32 * words; ++i) wrong += (b[i / 32] >> (i % 32)) & 1u;  // no bits past n
          CHECK(wrong == 0);
          if (p == 1.0) CHECK(kept == 0);
        }
      }
    }
  }
}

// Inside a captured CUDA graph a dropout mask is placed by a device word (DrawPos::base, where
// the generator stands at a replay) plus its offset within the step: forward, backward and the
// bits must be the CPU dropout's at word + offset.
TEST_CASE("kernel image dropout placed by a device word is the CPU dropout at word + offset") {
  using namespace diffuse::testing;
  using namespace diffuse::testing::image_cases;
  namespace k = diffuse::kernels;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  for (const std::int64_t n : {1, 33, 1001}) {
    for (const Launch L : launches()) {
      const std::uint64_t s = gen(), word = (gen() >> 30) | (std::uint64_t{1} << 32), rel = 4 * (gen() % 100) + 1;
      INFO("n " << n << " word " << word << " offset " << rel << " block " << L.block);
      const std::size_t un = static_cast<std::size_t>(n);
      const std::vector<float> x = randn(gen, un), dy = randn(gen, un);
      const DropoutRef ref = cpu_dropout(x, dy, 0.3, s, word + rel, nullptr);  // x is never 0: y != 0 is the mask
      DeviceBuffer<std::uint64_t> dword(std::vector<std::uint64_t>{word});
      const diffuse::DrawPos at(rel, 0, dword.get());
      DeviceBuffer<float> dx_in(x), dy_out(un), ddy(dy), ddx(un);
      k::dropout_forward(dx_in.get(), dy_out.get(), n, 0.3, s, at, {}, L.block, L.max_blocks);
      k::dropout_backward(ddy.get(), ddx.get(), n, 0.3, s, at, false, {}, L.block, L.max_blocks);
      CHECK(count_unequal(dy_out.to_host(), ref.y) == 0);
      CHECK(count_unequal(ddx.to_host(), ref.dx) == 0);
      DeviceBuffer<std::uint32_t> bits((un + 31) / 32);
      k::dropout_bits(bits.get(), n, 0.3, s, at, {}, L.block, L.max_blocks);
      const std::vector<std::uint32_t> b = bits.to_host();
      std::size_t wrong = 0;
      for (std::size_t i = 0; i < un; ++i) wrong += (((b[i / 32] >> (i % 32)) & 1u) != 0) != (ref.y[i] != 0.0f);
      CHECK(wrong == 0);
    }
  }
}

TEST_CASE("kernel image timestep_embedding matches the CPU timestep_embedding") {
  using namespace diffuse::testing;
  using namespace diffuse::testing::image_cases;
  namespace k = diffuse::kernels;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<std::int32_t> pick_t(0, 999);
  for (const std::int64_t n : {1, 3, 64, 257}) {
    for (const std::int64_t dim : {4, 6, 34, 130, 256}) {
      for (const Launch L : launches()) {
        INFO("n " << n << " dim " << dim << " block " << L.block << " max_blocks " << L.max_blocks);
        std::vector<std::int32_t> t(static_cast<std::size_t>(n));
        for (auto& v : t) v = pick_t(gen);
        t[0] = 999;  // the largest argument, t freq[0] = 999
        if (n > 1) t[1] = 0;
        const std::vector<float> ref = cpu_timestep_embedding(t, dim);
        DeviceBuffer<std::int32_t> dt(t);
        DeviceBuffer<float> out(static_cast<std::size_t>(n * dim));
        k::timestep_embedding(dt.get(), out.get(), n, dim, {}, L.block, L.max_blocks);
        const std::vector<float> e = out.to_host();
        std::size_t bad = 0;
        for (std::int64_t r = 0; r < n; ++r)
          for (std::int64_t j = 0; j < dim; ++j) {
            const std::size_t i = static_cast<std::size_t>(r * dim + j);
#ifdef __CUDACC__
            // The GPU's expf, sinf, cosf (2 ulp each) against glibc's: freq to 2 ulp and the
            // product's rounding move a = t freq by up to ~3 FLT_EPSILON |a|, sin/cos add 2 ulp
            // of a value <= 1 (derivation at the top of kernels/timestep_embedding.cuh).
            const std::int64_t half = dim / 2, kk = j % half;
            const double a = t[static_cast<std::size_t>(r)] * std::exp(-std::log(10000.0) * kk / (half - 1));
            bad += !(std::fabs(e[i] - ref[i]) <= 4 * FLT_EPSILON * (std::fabs(a) + 1));
#else
            bad += !(e[i] == ref[i]);  // the same float operations and libm calls as the CPU
#endif
          }
        CHECK(bad == 0);
      }
    }
  }
  float* null = nullptr;
  CHECK_THROWS_AS(k::timestep_embedding(static_cast<const std::int32_t*>(nullptr), null, 2, 5), std::invalid_argument);
  CHECK_THROWS_AS(k::timestep_embedding(static_cast<const std::int32_t*>(nullptr), null, 2, 2), std::invalid_argument);
}

namespace diffuse::testing::image_cases {

// Bound on |kernel - CPU| for one sampler step at element i: the magnitudes every rounding of
// the step scales with (S), times 8 FLT_EPSILON: either side rounds each of its ~7 operations
// (guidance 3, x0 or the DDPM mean 3, the noise term 2) to half an ulp of a value <= S or fuses
// some into FMAs, so the two differ by at most 7 FLT_EPSILON S. On a GPU the normals z differ
// by the device's logf/sinf/cosf: |dz| <= 16 FLT_EPSILON 6 (kernel_cases_rng.hpp), times sigma.
struct StepValues {
  float x, e, eu, z;  // eu: the unconditional eps (guided steps only)
  bool guided;
  float ga, gb;
};
inline double step_eps_scale(const StepValues& v) {
  return v.guided ? std::fabs(double(v.ga) * v.e) + std::fabs(double(v.gb) * v.eu) : std::fabs(double(v.e));
}
inline double step_scale(const diffuse::kernels::DdpmStepParams& p, const StepValues& v) {
  const double se = step_eps_scale(v), noise = p.noise ? std::fabs(double(p.sigma) * v.z) : 0.0;
  if (!p.clip_x0) return (std::fabs(double(v.x)) + std::fabs(double(p.a)) * se) / std::fabs(double(p.b)) + noise;
  const double x0 = std::fabs(double(p.ra) * v.x) + std::fabs(double(p.rb)) * se;
  return std::fabs(double(p.c1)) * x0 + std::fabs(double(p.c2) * v.x) + noise;
}
inline double step_scale(const diffuse::kernels::DdimStepParams& p, const StepValues& v) {
  const double se = step_eps_scale(v), noise = p.noise ? std::fabs(double(p.sigma) * v.z) : 0.0;
  const double x0 = std::fabs(double(p.ra) * v.x) + std::fabs(double(p.rb)) * se;
  return std::fabs(double(p.cx0)) * x0 + std::fabs(double(p.ceps)) * se + noise;
}
#ifdef __CUDACC__
inline constexpr double kNormalError = 16 * FLT_EPSILON * 6.0;
#else
inline constexpr double kNormalError = 0.0;  // the same philox_normal4 on the same CPU
#endif

}  // namespace diffuse::testing::image_cases

TEST_CASE("kernel image ddpm_step and ddim_step replay every step of the CPU samplers, guided or not") {
  using namespace diffuse::testing;
  using namespace diffuse::testing::image_cases;
  namespace k = diffuse::kernels;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::vector<SamplerConfig> configs;
  // DDPM: both variances, clipping on and off, guided and not, two schedules.
  for (const char* sched : {"linear", "cosine"})
    for (bool small : {false, true})
      for (bool clip : {false, true})
        for (double w : {0.0, 0.7}) {
          SamplerConfig c;
          c.schedule = sched, c.T = 50, c.fixed_small = small, c.clip_x0 = clip, c.clip = clip ? 1.5 : 1.0, c.w = w;
          configs.push_back(c);
        }
  // DDIM: eta 0 (no noise), 0.5, 1; a subsequence of timesteps, all of them, and one step.
  for (double eta : {0.0, 0.5, 1.0})
    for (int steps : {7, 60, 1})
      for (bool clip : {false, true}) {
        SamplerConfig c;
        c.ddim = true, c.schedule = eta == 0.5 ? "cosine" : "linear", c.T = 60, c.steps = steps, c.eta = eta;
        c.clip_x0 = clip, c.w = steps == 7 ? 2.0 : 0.0;
        configs.push_back(c);
      }
  struct BatchShape {
    std::int64_t batch, row;
  };
  std::size_t config_index = 0;
  for (SamplerConfig c : configs) {
    // Rotate the shapes and launches over the configurations: 1 element, 99 (no multiple of 4),
    // 4 x 8 x 8 x 3 (several grid-stride rounds with 32 threads in 2 blocks).
    const BatchShape bs = std::vector<BatchShape>{{1, 1}, {3, 33}, {4, 192}}[config_index % 3];
    const Launch L = launches()[config_index / 3 % launches().size()];
    ++config_index;
    c.batch = bs.batch, c.row = bs.row;
    const std::int64_t n = c.batch * c.row;
    const std::size_t un = static_cast<std::size_t>(n);
    const std::uint64_t s = gen(), eps_seed = gen();
    INFO((c.ddim ? "DDIM" : "DDPM") << " " << c.schedule << " T " << c.T << " steps " << c.steps << " eta " << c.eta
                                    << " small " << c.fixed_small << " clip " << c.clip_x0 << " w " << c.w
                                    << " batch " << c.batch << " row " << c.row << " block " << L.block
                                    << " max_blocks " << L.max_blocks << " sampler seed " << s);
    const ScheduleTables tab = cpu_schedule(c.schedule, c.T);
    const SamplerRun run = cpu_sample(c, s, eps_seed);
    const std::size_t steps = run.t.size();
    REQUIRE(steps == static_cast<std::size_t>(c.ddim && c.steps ? c.steps : c.T));
    REQUIRE(run.x.size() == steps + 1);
    // The device side's Generator: x_T is drawn first, then each step draws noise or not.
    diffuse::Generator g(s);
    g.advance(un);
    CHECK(g.offset == run.offset[0]);
    const bool guided = c.w != 0;
    const float ga = static_cast<float>(1 + c.w), gb = static_cast<float>(c.w);
    for (std::size_t st = 0; st < steps; ++st) {
      const int t = run.t[st];
      INFO("step " << st << " t " << t);
      k::DdpmStepParams pd{};
      k::DdimStepParams pi{};
      // DDIM with clipping is the clipped-DDPM kernel's form (ddim_clipped_step_params).
      const bool ddim_kernel = c.ddim && !c.clip_x0;
      if (ddim_kernel)
        pi = k::ddim_step_params(tab, t, st + 1 < steps ? run.t[st + 1] : -1, c.eta, false, c.clip);
      else if (c.ddim)
        pd = k::ddim_clipped_step_params(tab, t, st + 1 < steps ? run.t[st + 1] : -1, c.eta, c.clip);
      else
        pd = k::ddpm_step_params(tab, t, c.fixed_small, c.clip_x0, c.clip);
      const bool noise = ddim_kernel ? pi.noise : pd.noise;
      const std::uint64_t off = noise ? g.advance(un) : 0;
      CHECK(g.offset == run.offset[st + 1]);  // the same draws as the CPU sampler
      DeviceBuffer<float> dx(run.x[st]), de(run.eps_c[st]), deu(guided ? run.eps_u[st] : std::vector<float>());
      const float* eu = guided ? deu.get() : nullptr;
      if (ddim_kernel)
        k::ddim_step(pi, dx.get(), de.get(), eu, c.w, n, g.seed, off, {}, L.block, L.max_blocks);
      else
        k::ddpm_step(pd, dx.get(), de.get(), eu, c.w, n, g.seed, off, {}, L.block, L.max_blocks);
      const std::vector<float> x = dx.to_host();
      std::vector<float> z(un, 0.0f);
      if (noise) diffuse::Generator(s, off).normal(z.data(), un);  // the CPU's z, for the bound
      const float sigma = ddim_kernel ? pi.sigma : pd.sigma;
      std::size_t bad = 0;
      for (std::size_t i = 0; i < un; ++i) {
        const StepValues v{run.x[st][i], run.eps_c[st][i], guided ? run.eps_u[st][i] : 0.0f, z[i], guided, ga, gb};
        const double S = ddim_kernel ? step_scale(pi, v) : step_scale(pd, v);
        const double tol = 8 * FLT_EPSILON * S + (noise ? std::fabs(double(sigma)) * kNormalError : 0.0);
        bad += !(std::fabs(double(x[i]) - run.x[st + 1][i]) <= tol);
      }
      CHECK(bad == 0);
    }
  }
}

TEST_CASE("kernel image sampler step parameters and launchers reject bad arguments") {
  using namespace diffuse::testing;
  namespace k = diffuse::kernels;
  const ScheduleTables tab = cpu_schedule("linear", 100);
  CHECK_THROWS_AS(k::ddpm_step_params(tab, 100, false, false, 1.0), std::invalid_argument);
  CHECK_THROWS_AS(k::ddpm_step_params(tab, -1, false, false, 1.0), std::invalid_argument);
  CHECK_THROWS_AS(k::ddim_step_params(tab, 5, 5, 0.0, false, 1.0), std::invalid_argument);
  CHECK_THROWS_AS(k::ddim_step_params(tab, 5, -2, 0.0, false, 1.0), std::invalid_argument);
  CHECK(k::ddpm_step_params(tab, 0, false, false, 1.0).noise == 0);  // the last step adds no noise
  CHECK(k::ddim_step_params(tab, 3, 1, 1.0, false, 1.0).noise == 1);
  CHECK(k::ddim_step_params(tab, 3, 1, 0.0, false, 1.0).noise == 0);   // eta 0: deterministic
  CHECK(k::ddim_step_params(tab, 3, -1, 1.0, false, 1.0).noise == 0);  // to abar = 1: sigma 0
  float* null = nullptr;
  CHECK_THROWS_AS(k::ddpm_step(k::ddpm_step_params(tab, 3, false, false, 1.0), null, null, null, 0.0, -1, 1, 0),
                  std::invalid_argument);
  k::ddpm_step(k::ddpm_step_params(tab, 3, false, false, 1.0), null, null, null, 0.0, 0, 1, 0);  // empty: no launch
}
