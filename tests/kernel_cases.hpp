// Every kernel in kernels/ against the CPU backend on fresh random inputs of awkward sizes.
// One source, two builds: test_emulation (g++, the kernels run through the CPU emulation) and
// test_kernels_cuda (nvcc, the kernels run on a GPU). Include it from exactly one file per test
// program (it defines TEST_CASEs).
#pragma once

#include <catch2/catch.hpp>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include <diffuse/backend/cuda/bf16.hpp>

#include "device_buffer.hpp"
#include "kernel_reference.hpp"
#include "kernel_seed.hpp"
#include "kernels/convert.cuh"
#include "kernels/reduce_sum.cuh"
#include "kernels/silu.cuh"


TEST_CASE("kernel silu_forward matches the CPU backend's silu") {
  using namespace diffuse::testing;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> dist(-12.0f, 12.0f);  // both tails of the sigmoid
  for (std::int64_t n : {1, 31, 33, 1000, 4097}) {
    for (unsigned block : {32u, 96u, 256u}) {
      for (unsigned max_blocks : {2u, 65535u}) {  // 2: the grid-stride loop goes round
        INFO("n " << n << " block " << block << " max_blocks " << max_blocks);
        std::vector<float> x(static_cast<size_t>(n));
        for (float& v : x) v = dist(gen);
        const std::vector<float> ref = cpu_silu(x);
        DeviceBuffer<float> dx(x), dy(x.size());
        diffuse::kernels::silu_forward(dx.get(), dy.get(), n, {}, block, max_blocks);
        const std::vector<float> y = dy.to_host();
        // expf and Eigen's exp are each within a few ulp; a NaN (an unwritten element) fails.
        size_t bad = 0, first_bad = 0;
        for (size_t i = 0; i < y.size(); ++i)
          if (!(std::fabs(y[i] - ref[i]) <= 8 * FLT_EPSILON * std::fabs(ref[i]) + FLT_MIN) && bad++ == 0) first_bad = i;
        INFO("first mismatch at " << first_bad << ": " << y[first_bad] << " vs " << ref[first_bad]);
        CHECK(bad == 0);
      }
    }
  }
}

TEST_CASE("kernel reduce_sum_rows matches the CPU backend's sum of each row") {
  using namespace diffuse::testing;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  struct Size {
    std::int64_t rows, cols;
  };
  for (Size s : {Size{3, 1}, Size{2, 31}, Size{5, 33}, Size{7, 1025}, Size{4, 4097}, Size{3, 0}}) {
    for (unsigned block : {32u, 96u, 256u, 1024u}) {
      for (unsigned max_blocks : {2u, 65535u}) {  // 2: blocks loop over rows
        INFO("rows " << s.rows << " cols " << s.cols << " block " << block << " max_blocks " << max_blocks);
        const size_t n = static_cast<size_t>(s.rows * s.cols);
        // Multiples of 1/256 in [-4, 4], never 0: every partial sum is exact in float (|sum| <
        // 2^15 needs 15 + 8 bits), so the kernel's result must equal the reference exactly in any
        // summation order, and a missed or doubled element always shows.
        std::uniform_int_distribution<int> k(1, 1024), sign(0, 1);
        std::vector<float> exact(n);
        for (float& v : exact) v = static_cast<float>(sign(gen) ? k(gen) : -k(gen)) / 256.0f;
        // Arbitrary floats: rounding error within a bound that grows with the terms per thread.
        std::uniform_real_distribution<float> u(-1.0f, 1.0f);
        std::vector<float> rough(n);
        for (float& v : rough) v = u(gen);

        for (const std::vector<float>* x : {&exact, &rough}) {
          const bool is_exact = x == &exact;
          INFO((is_exact ? "dyadic inputs, exact comparison" : "uniform inputs"));
          const std::vector<double> ref = cpu_row_sums(*x, s.rows, s.cols);
          DeviceBuffer<float> dx(*x), dout(static_cast<size_t>(s.rows));
          diffuse::kernels::reduce_sum_rows(dx.get(), dout.get(), s.rows, s.cols, {}, block, max_blocks);
          const std::vector<float> out = dout.to_host();
          for (std::int64_t r = 0; r < s.rows; ++r) {
            INFO("row " << r << ": " << out[r] << " vs " << ref[r]);
            if (is_exact) {
              CHECK(static_cast<double>(out[r]) == ref[r]);
            } else {
              double abs_sum = 0;
              for (std::int64_t c = 0; c < s.cols; ++c) abs_sum += std::fabs((*x)[r * s.cols + c]);
              const double terms = static_cast<double>((s.cols + block - 1) / block) + 10;  // per thread + tree
              CHECK(std::fabs(out[r] - ref[r]) <= terms * FLT_EPSILON * abs_sum + FLT_MIN);
            }
          }
        }
      }
    }
  }
}

TEST_CASE("kernel launchers reject bad configurations") {
  float* p = nullptr;
  CHECK_THROWS_AS(diffuse::kernels::reduce_sum_rows(p, p, 2, 8, {}, 48), std::invalid_argument);
  CHECK_THROWS_AS(diffuse::kernels::reduce_sum_rows(p, p, 2, 8, {}, 2048), std::invalid_argument);
  CHECK_THROWS_AS(diffuse::kernels::reduce_sum_rows(p, p, -1, 8), std::invalid_argument);
  CHECK_THROWS_AS(diffuse::kernels::silu_forward(p, p, -1), std::invalid_argument);
  CHECK_THROWS_AS(diffuse::kernels::silu_forward(p, p, 4, {}, 0), std::invalid_argument);
  CHECK_NOTHROW(diffuse::kernels::silu_forward(p, p, 0));  // nothing to do: no launch
}

TEST_CASE("kernel silu_forward on bf16: loads bf16, computes in float, stores bf16") {
  using namespace diffuse::testing;
  using diffuse::bf16;
  // Loads bf16, computes in float, stores bf16: the CPU's float SiLU of the same (bf16) inputs,
  // rounded once to bf16, except where the float results differ by rounding (then one bf16 ulp).
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> dist(-12.0f, 12.0f);
  for (std::int64_t n : {1, 33, 4097}) {
    std::vector<bf16> x(static_cast<size_t>(n));
    std::vector<float> xf(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      x[i] = bf16(dist(gen));
      xf[i] = static_cast<float>(x[i]);
    }
    const std::vector<float> expect = cpu_silu(xf);
    DeviceBuffer<bf16> dx(x), dy(x.size());  // dy starts as 0xFFFF bits: NaN until written
    diffuse::kernels::silu_forward(dx.get(), dy.get(), n, {}, 64, 3);
    const std::vector<bf16> y = dy.to_host();
    size_t bad = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      const float ref = expect[i];
      const float got = static_cast<float>(y[i]);
      const std::uint16_t want = bf16(ref).bits;
      // Rounded once: the nearest bf16, or (where a device expf one float ulp away tips the
      // rounding) the other neighbour, at most one bf16 ulp = 2^-7 of |ref| away.
      bad += !(y[i].bits == want || std::fabs(got - ref) <= std::ldexp(std::fabs(ref), -7));
    }
    CHECK(bad == 0);
  }
}

TEST_CASE("kernel convert: float -> bf16 rounds to nearest even, bf16 -> float is exact or added in float") {
  using namespace diffuse::testing;
  using diffuse::bf16;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (std::int64_t n : {1, 255, 70001}) {
    INFO("n " << n);
    std::vector<float> x(static_cast<size_t>(n)), y0(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      x[i] = normal(gen);
      y0[i] = normal(gen);
    }
    // The exact answers: bf16(x) bit for bit (the host conversion is checked against exact
    // arithmetic and PyTorch in test_bf16), then float(bf16) exactly, and y0 + float(bf16) as one
    // float addition.
    std::vector<bf16> want_b(x.size());
    diffuse::kernels::convert_host(x.data(), want_b.data(), n, false);
    DeviceBuffer<float> dx(x), dy(y0), dz(x.size());
    DeviceBuffer<bf16> db(x.size());
    diffuse::kernels::convert(dx.get(), db.get(), n, false, {}, 128, 7);  // few blocks: the grid-stride loop
    diffuse::kernels::convert(db.get(), dz.get(), n, false);
    diffuse::kernels::convert(db.get(), dy.get(), n, true);
    const std::vector<bf16> b = db.to_host();
    const std::vector<float> z = dz.to_host(), y = dy.to_host();
    size_t bad = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      const float w = static_cast<float>(want_b[i]);
      bad += b[i].bits != want_b[i].bits;
      bad += z[i] != w;
      bad += y[i] != y0[i] + w;
      bad += std::fabs(w - x[i]) > std::ldexp(std::fabs(x[i]), -8);  // half a bf16 ulp, relative
    }
    CHECK(bad == 0);
  }
  CHECK_THROWS_AS(diffuse::kernels::convert(static_cast<const float*>(nullptr), static_cast<bf16*>(nullptr), -1, false),
                  std::invalid_argument);
  diffuse::kernels::convert(static_cast<const float*>(nullptr), static_cast<bf16*>(nullptr), 0, false);  // nothing
}

TEST_CASE("kernel convert_2d writes float rows into the bf16 columns of a wider matrix, rounded once") {
  // res_block's input on the up path: the concatenation's operands written straight into their
  // columns of one bf16 [rows, C] matrix; the other columns untouched.
  using namespace diffuse::testing;
  using diffuse::bf16;
  const std::uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  struct Case {
    std::int64_t rows, width, x_ld, y_ld, col;
  };
  for (const Case c : {Case{1, 7, 7, 7, 0}, Case{37, 5, 5, 13, 8}, Case{300, 64, 70, 96, 32}, Case{5, 3, 3, 3, 0}}) {
    INFO("rows " << c.rows << " width " << c.width << " x_ld " << c.x_ld << " y_ld " << c.y_ld << " column " << c.col);
    std::vector<float> x(static_cast<size_t>(c.rows * c.x_ld));
    for (float& v : x) v = normal(gen);
    std::vector<bf16> y0(static_cast<size_t>(c.rows * c.y_ld));
    for (bf16& v : y0) v = bf16(normal(gen));
    DeviceBuffer<float> dx(x);
    DeviceBuffer<bf16> dy(y0);
    diffuse::kernels::convert_2d(dx.get(), c.x_ld, dy.get() + c.col, c.y_ld, c.rows, c.width, {}, 64, 3);
    const std::vector<bf16> y = dy.to_host();
    size_t bad = 0, changed = 0;
    for (std::int64_t r = 0; r < c.rows; ++r)
      for (std::int64_t j = 0; j < c.y_ld; ++j) {
        const size_t i = static_cast<size_t>(r * c.y_ld + j);
        const bool inside = j >= c.col && j < c.col + c.width;
        const std::uint16_t want = inside ? bf16(x[static_cast<size_t>(r * c.x_ld + j - c.col)]).bits : y0[i].bits;
        bad += y[i].bits != want;
        changed += y[i].bits != y0[i].bits;
      }
    CHECK(bad == 0);
    CHECK(changed > 0);
  }
  float* p = nullptr;
  CHECK_THROWS_WITH(diffuse::kernels::convert_2d(p, 3, static_cast<bf16*>(nullptr), 3, 2, 4), Catch::Contains("leading"));
  CHECK_THROWS_WITH(diffuse::kernels::convert_2d(p, 4, static_cast<bf16*>(nullptr), 4, -1, 4), Catch::Contains("negative"));
  diffuse::kernels::convert_2d(p, 0, static_cast<bf16*>(nullptr), 0, 0, 4);  // nothing
}
