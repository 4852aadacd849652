// The device Philox kernels (kernels/rng.cuh) against the CPU backend's Generator: the same
// numbers for the same seed and offset, and the same offsets after each draw. Included by
// test_emulation.cpp (g++, CPU emulation: everything bit for bit) and test_kernels_cuda.cu
// (nvcc, a GPU: uniforms bit for bit, normals to the device's logf/sinf/cosf rounding).
#pragma once

#include <catch2/catch.hpp>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include <diffuse/core/rng.hpp>

#include "device_buffer.hpp"
#include "kernels/rng.cuh"

TEST_CASE("kernels philox_normal and philox_uniform draw the CPU Generator's numbers") {
  using namespace diffuse::testing;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 pick(seed);
  for (unsigned block : {32u, 96u, 256u}) {
    for (unsigned max_blocks : {1u, 65535u}) {
      INFO("block " << block << " max_blocks " << max_blocks);
      const std::uint64_t s = pick(), off0 = pick() >> 20;  // a large offset: 64-bit counter arithmetic
      diffuse::Generator cpu(s, off0), gpu(s, off0);
      // Draws of awkward lengths in a row: the offsets must move in step (ceil(n / 4) blocks each).
      for (std::int64_t n : {1, 3, 4, 5, 0, 1001, 70001}) {
        INFO("n " << n);
        std::vector<float> zc(static_cast<size_t>(n)), uc(static_cast<size_t>(n));
        cpu.normal(zc.data(), zc.size());
        cpu.uniform(uc.data(), uc.size());
        DeviceBuffer<float> zd(static_cast<size_t>(n)), ud(static_cast<size_t>(n));
        diffuse::kernels::philox_normal(gpu, zd.get(), n, {}, block, max_blocks);
        diffuse::kernels::philox_uniform(gpu, ud.get(), n, {}, block, max_blocks);
        CHECK(gpu.offset == cpu.offset);
        const std::vector<float> z = zd.to_host(), u = ud.to_host();
        size_t bad_u = 0, bad_z = 0;
        for (size_t i = 0; i < z.size(); ++i) {
          bad_u += !(u[i] == uc[i]);  // integer arithmetic and exact float scaling
#ifdef __CUDACC__
          // |r| <= 5.8; device logf, sinf, cosf are within 1-2 ulp.
          bad_z += !(std::fabs(z[i] - zc[i]) <= 16 * FLT_EPSILON * 6.0f);
#else
          bad_z += !(z[i] == zc[i]);  // the same function on the same CPU
#endif
        }
        CHECK(bad_u == 0);
        CHECK(bad_z == 0);
      }
    }
  }
  diffuse::Generator g(1);
  CHECK_THROWS(diffuse::kernels::philox_normal(g, static_cast<float*>(nullptr), -1));
}

TEST_CASE("kernels philox_normal_at and philox_uniform_at draw a data-parallel rank's share of the CPU's draw") {
  using namespace diffuse::testing;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 pick(seed);
  // A share starts at element part * n of the whole draw: inside a Philox block unless 4 | part n.
  for (std::int64_t n : {1, 2, 3, 5, 6, 1001, 4099}) {
    for (std::uint32_t parts : {2u, 3u, 4u}) {
      const std::uint64_t s = pick(), off = pick() >> 20;
      const std::size_t whole = static_cast<std::size_t>(n) * parts;
      std::vector<float> zc(whole), uc(whole);
      diffuse::Generator one(s, off);  // one process: the whole normal draw, then the whole uniform draw
      one.normal(zc.data(), whole);
      one.uniform(uc.data(), whole);
      for (std::uint32_t part = 0; part < parts; ++part) {
        INFO("n " << n << " part " << part << " of " << parts);
        diffuse::Generator share(s, off);
        share.part = part, share.parts = parts;
        DeviceBuffer<float> zd(static_cast<size_t>(n)), ud(static_cast<size_t>(n));
        diffuse::kernels::philox_normal(share, zd.get(), n, {}, 64, 3);
        diffuse::kernels::philox_uniform(share, ud.get(), n, {}, 64, 3);
        CHECK(share.offset == one.offset);  // past both whole draws
        const std::vector<float> z = zd.to_host(), u = ud.to_host();
        size_t bad_u = 0, bad_z = 0;
        for (size_t i = 0; i < z.size(); ++i) {
          const size_t w = part * static_cast<size_t>(n) + i;
          bad_u += !(u[i] == uc[w]);
#ifdef __CUDACC__
          bad_z += !(std::fabs(z[i] - zc[w]) <= 16 * FLT_EPSILON * 6.0f);
#else
          bad_z += !(z[i] == zc[w]);
#endif
        }
        CHECK(bad_u == 0);
        CHECK(bad_z == 0);
      }
    }
  }
}

// Inside a captured CUDA graph a draw is placed by a device word (DrawPos::base, written before
// each replay) plus its offset within the step: the kernels must draw the CPU Generator's numbers
// at word + offset, also across the counter's 32-bit boundary and inside a rank's share.
TEST_CASE("kernels philox_normal_at and philox_uniform_at placed by a device word draw the CPU's numbers at word + offset") {
  using namespace diffuse::testing;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 pick(seed);
  for (std::int64_t n : {1, 5, 1001}) {
    for (std::uint32_t parts : {1u, 3u}) {
      const std::uint64_t s = pick(), word = (pick() >> 30) | (std::uint64_t{1} << 32), rel = pick() % 1000;
      const std::size_t whole = static_cast<std::size_t>(n) * parts;
      std::vector<float> zc(whole), uc(whole);
      diffuse::Generator one(s, word + rel);
      one.normal(zc.data(), whole);
      const std::uint64_t rel_u = one.offset - word;  // the uniform draw's place after the normal one
      one.uniform(uc.data(), whole);
      const std::uint32_t part = parts - 1;
      INFO("n " << n << " part " << part << " of " << parts << " word " << word);
      DeviceBuffer<std::uint64_t> dword(std::vector<std::uint64_t>{word});
      DeviceBuffer<float> zd(static_cast<size_t>(n)), ud(static_cast<size_t>(n));
      const std::uint64_t first = static_cast<std::uint64_t>(part) * static_cast<std::uint64_t>(n);
      diffuse::kernels::philox_normal_at(zd.get(), n, s, diffuse::DrawPos(rel, first, dword.get()), {}, 64, 3);
      diffuse::kernels::philox_uniform_at(ud.get(), n, s, diffuse::DrawPos(rel_u, first, dword.get()), {}, 64, 3);
      const std::vector<float> z = zd.to_host(), u = ud.to_host();
      size_t bad_u = 0, bad_z = 0;
      for (size_t i = 0; i < z.size(); ++i) {
        const size_t w = first + i;
        bad_u += !(u[i] == uc[w]);
#ifdef __CUDACC__
        bad_z += !(std::fabs(z[i] - zc[w]) <= 16 * FLT_EPSILON * 6.0f);
#else
        bad_z += !(z[i] == zc[w]);
#endif
      }
      CHECK(bad_u == 0);
      CHECK(bad_z == 0);
    }
  }
}
