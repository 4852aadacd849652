// The q_sample kernel (kernels/q_sample.cuh) against the CPU backend's q_sample, each sample at
// its own random timestep. Included by test_emulation.cpp and test_kernels_cuda.cu.
#pragma once

#include <catch2/catch.hpp>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "device_buffer.hpp"
#include "kernel_reference.hpp"
#include "kernels/q_sample.cuh"

TEST_CASE("kernel q_sample matches the CPU backend's q_sample") {
  using namespace diffuse::testing;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int T = 200;
  std::uniform_int_distribution<std::int32_t> pick_t(0, T - 1);
  for (auto [batch, row] : {std::pair<std::int64_t, std::int64_t>{1, 1}, {3, 33}, {7, 256}, {5, 1025}, {64, 257}}) {
    for (unsigned block : {32u, 256u}) {
      for (unsigned max_blocks : {2u, 65535u}) {
        INFO("batch " << batch << " row " << row << " block " << block << " max_blocks " << max_blocks);
        std::vector<float> x0(static_cast<size_t>(batch * row)), eps(x0.size());
        for (float& v : x0) v = normal(gen);
        for (float& v : eps) v = normal(gen);
        std::vector<std::int32_t> t(static_cast<size_t>(batch));
        for (auto& v : t) v = pick_t(gen);
        t[0] = batch > 1 ? T - 1 : t[0];  // the last timestep: almost all noise
        const QSampleRef ref = cpu_q_sample(T, x0, eps, t, row);
        DeviceBuffer<float> dx(x0), de(eps), da(ref.sqrt_abar), db(ref.sqrt_one_minus_abar), dxt(x0.size());
        DeviceBuffer<std::int32_t> dt(t);
        diffuse::kernels::q_sample(dx.get(), de.get(), dt.get(), da.get(), db.get(), dxt.get(), batch, row, {}, block,
                                   max_blocks);
        const std::vector<float> xt = dxt.to_host();
        // A couple of ulp of the two products' sizes: either side may fuse the multiply-add.
        size_t bad = 0;
        for (size_t i = 0; i < xt.size(); ++i) {
          const std::int32_t ts = t[i / static_cast<size_t>(row)];
          const float scale = ref.sqrt_abar[ts] * std::fabs(x0[i]) + ref.sqrt_one_minus_abar[ts] * std::fabs(eps[i]);
          bad += !(std::fabs(xt[i] - ref.xt[i]) <= 2 * FLT_EPSILON * scale);
        }
        CHECK(bad == 0);
      }
    }
  }
}
