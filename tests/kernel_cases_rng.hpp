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
