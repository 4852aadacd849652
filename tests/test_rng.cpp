// Tests for include/diffuse/core/rng.hpp: Philox4x32-10 known-answer vectors,
// distribution moments, and the reproducibility contract of Generator.
#include <diffuse/core/rng.hpp>

#include <catch2/catch.hpp>
#include <diffuse/core/parallel.hpp>

#include <algorithm>
#include <array>
#include <stdexcept>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace {

using Block = std::array<uint32_t, 4>;

// Independent Philox4x32-10 with a full 4-word counter, written after the
// Random123 reference (philox.h): round, then (bump key, round) x 9.
Block ref_philox4x32_10(Block ctr, std::array<uint32_t, 2> key) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  auto round = [](const Block& c, const std::array<uint32_t, 2>& k) {
    const uint64_t p0 = uint64_t{M0} * c[0];
    const uint64_t p1 = uint64_t{M1} * c[2];
    const auto hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const auto hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    return Block{hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0};
  };
  ctr = round(ctr, key);
  for (int r = 1; r < 10; ++r) {
    key[0] += W0;
    key[1] += W1;
    ctr = round(ctr, key);
  }
  return ctr;
}

Block as_block(const diffuse::Philox4& p) { return {p.v[0], p.v[1], p.v[2], p.v[3]}; }

struct Kat {
  Block ctr;
  std::array<uint32_t, 2> key;
  Block expected;
};

// Random123 kat_vectors, philox4x32 10 rounds.
const Kat kKats[] = {
    {{0x00000000u, 0x00000000u, 0x00000000u, 0x00000000u},
     {0x00000000u, 0x00000000u},
     {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
    {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
     {0xffffffffu, 0xffffffffu},
     {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
    {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
     {0xa4093822u, 0x299f31d0u},
     {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
};

struct Moments {
  double mean, var;
};
template <class T>
Moments moments(const std::vector<T>& x) {
  double s = 0, s2 = 0;
  for (T v : x) s += v;
  const double mean = s / static_cast<double>(x.size());
  for (T v : x) s2 += (v - mean) * (v - mean);
  return {mean, s2 / static_cast<double>(x.size() - 1)};
}

}  // namespace

TEST_CASE("philox4x32_10 matches the all-zero known-answer vector", "[rng]") {
  CHECK(as_block(diffuse::philox4x32_10(0, 0)) == kKats[0].expected);
}

TEST_CASE("reference 4-word Philox matches all Random123 known-answer vectors", "[rng]") {
  for (const Kat& k : kKats) {
    CHECK(ref_philox4x32_10(k.ctr, k.key) == k.expected);
  }
}

TEST_CASE("philox4x32_10 equals the 4-word Philox with counter words 2 and 3 zero", "[rng]") {
  std::mt19937_64 gen(20260101);
  for (int t = 0; t < 2000; ++t) {
    const uint64_t ctr = gen(), seed = gen();
    const Block ref = ref_philox4x32_10(
        {static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), 0u, 0u},
        {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)});
    REQUIRE(as_block(diffuse::philox4x32_10(ctr, seed)) == ref);
  }
}

TEST_CASE("uniform draws lie in (0, 1) with the right moments", "[rng]") {
  CHECK(diffuse::uint_to_uniform(0u) > 0.0f);
  CHECK(diffuse::uint_to_uniform(0xffffffffu) < 1.0f);

  const size_t n = 1000000;
  std::vector<float> u(n);
  diffuse::Generator g(7);
  g.uniform(u.data(), n);
  size_t outside = 0;
  for (float v : u) outside += !(v > 0.0f && v < 1.0f);
  CHECK(outside == 0);
  const Moments m = moments(u);
  // 5 sigma: sd(mean) = sqrt(1/12 / n); sd(var) = sqrt((1/80 - 1/144) / n).
  CHECK(std::abs(m.mean - 0.5) < 5.0 * std::sqrt(1.0 / 12.0 / n));
  CHECK(std::abs(m.var - 1.0 / 12.0) < 5.0 * std::sqrt((1.0 / 80.0 - 1.0 / 144.0) / n));
}

TEST_CASE("normal draws have mean 0 and variance 1", "[rng]") {
  const size_t n = 1000000;
  std::vector<float> z(n);
  diffuse::Generator g(1234);
  g.normal(z.data(), n);
  size_t nonfinite = 0;
  for (float v : z) nonfinite += !std::isfinite(v);
  CHECK(nonfinite == 0);
  const Moments m = moments(z);
  // 5 sigma: sd(mean) = 1/sqrt(n); sd(var) = sqrt(2/n).
  CHECK(std::abs(m.mean) < 5.0 / std::sqrt(double(n)));
  CHECK(std::abs(m.var - 1.0) < 5.0 * std::sqrt(2.0 / n));
}

TEST_CASE("Generator draws are a pure function of seed and offset", "[rng]") {
  const size_t n = 1003;
  std::vector<float> a(n), b(n);
  diffuse::Generator ga(42, 17), gb(42, 17);
  ga.normal(a.data(), n);
  gb.normal(b.data(), n);
  CHECK(a == b);
  for (size_t i = 0; i < n; ++i) REQUIRE(a[i] == diffuse::philox_normal(42, 17, i));
  std::vector<float> u(n);
  diffuse::Generator(42, 17).uniform(u.data(), n);
  for (size_t i = 0; i < n; ++i) REQUIRE(u[i] == diffuse::philox_uniform(42, 17, i));

  diffuse::Generator gc(43, 17);  // a different seed gives different numbers
  std::vector<float> c(n);
  gc.normal(c.data(), n);
  CHECK(a != c);

  std::vector<double> d(n);  // the element type does not change the stream
  diffuse::Generator(42, 17).normal(d.data(), n);
  for (size_t i = 0; i < n; ++i) REQUIRE(static_cast<float>(d[i]) == a[i]);
}

TEST_CASE("Generator results do not depend on the thread count", "[rng]") {
  const size_t n = size_t{1} << 18;  // above the parallel threshold of the draws
  const int saved = diffuse::num_threads();
  std::vector<float> z1(n), z2(n), u1(n), u2(n);

  diffuse::set_num_threads(1);
  {
    diffuse::Generator g(99, 5);
    g.normal(z1.data(), n);
    g.uniform(u1.data(), n);
  }
  diffuse::set_num_threads(2);
  {
    diffuse::Generator g(99, 5);
    g.normal(z2.data(), n);
    g.uniform(u2.data(), n);
  }
  diffuse::set_num_threads(saved);

  CHECK(z1 == z2);
  CHECK(u1 == u2);
}

TEST_CASE("consecutive draws do not overlap", "[rng]") {
  for (size_t n : {size_t{1}, size_t{5}, size_t{8}, size_t{1000}, size_t{100001}}) {
    CAPTURE(n);
    const uint64_t blocks = (n + 3) / 4;
    diffuse::Generator g(5, 0);
    std::vector<float> a(n), b(n);
    g.normal(a.data(), n);
    CHECK(g.offset == blocks);
    g.normal(b.data(), n);
    CHECK(g.offset == 2 * blocks);

    // The second draw starts at the first unused block ...
    std::vector<float> expect(n);
    diffuse::Generator(5, blocks).normal(expect.data(), n);
    CHECK(b == expect);
    // ... so it differs from the first one.
    size_t equal = 0;
    for (size_t i = 0; i < n; ++i) equal += (a[i] == b[i]);
    CHECK(equal <= n / 1000);
  }
}

TEST_CASE("randint stays below hi and covers the range", "[rng]") {
  diffuse::Generator g(3);
  const uint32_t hi = 10;
  std::vector<int> k(100000);
  g.randint(k.data(), k.size(), hi);
  std::array<size_t, hi> counts{};
  for (int v : k) {
    REQUIRE(v >= 0);
    REQUIRE(v < static_cast<int>(hi));
    ++counts[static_cast<size_t>(v)];
  }
  for (size_t c : counts) CHECK(c > 9000);  // expected 10000, sd ~95
}

TEST_CASE("a generator shared by data-parallel ranks draws each rank's slice of the one process's draw", "[rng]") {
  // Part p of P, drawing n numbers, gets elements [p n, (p + 1) n) of the draw of P n numbers
  // that one process makes at the same offset, and every part ends where that process ends; a
  // part that starts inside a Philox block (4 does not divide p n) too.
  std::mt19937_64 pick(std::random_device{}());
  for (size_t n : {size_t{1}, size_t{2}, size_t{3}, size_t{5}, size_t{7}, size_t{64}, size_t{1001}, size_t{70001}}) {
    for (uint32_t parts : {1u, 2u, 3u, 4u}) {
      const uint64_t seed = pick(), off = pick() >> 24;
      const size_t whole = n * parts;
      diffuse::Generator one(seed, off);
      std::vector<float> z(whole), u(whole);
      std::vector<uint32_t> k(whole);
      one.normal(z.data(), whole);
      one.uniform(u.data(), whole);
      one.randint(k.data(), whole, 1000);
      for (uint32_t part = 0; part < parts; ++part) {
        INFO("n " << n << " part " << part << " of " << parts);
        diffuse::Generator g(seed, off);
        g.part = part, g.parts = parts;
        std::vector<float> zs(n), us(n);
        std::vector<uint32_t> ks(n);
        g.normal(zs.data(), n);
        g.uniform(us.data(), n);
        g.randint(ks.data(), n, 1000);
        CHECK(g.offset == one.offset);
        const size_t at = part * n;
        CHECK(std::equal(zs.begin(), zs.end(), z.begin() + static_cast<std::ptrdiff_t>(at)));
        CHECK(std::equal(us.begin(), us.end(), u.begin() + static_cast<std::ptrdiff_t>(at)));
        CHECK(std::equal(ks.begin(), ks.end(), k.begin() + static_cast<std::ptrdiff_t>(at)));
      }
    }
  }
  // A whole-draw offset (Generator::advance) has no meaning for a share.
  diffuse::Generator g(1);
  g.parts = 2;
  CHECK_THROWS_AS(g.advance(4), std::logic_error);
}
