// Counter-based random numbers (Philox4x32-10, Salmon et al. 2011).
//
// A draw is a pure function of (seed, offset, element index): element i of a
// draw that starts at `offset` comes from block (offset + i / 4), lane i % 4.
// So the same seed and offset give the same numbers on the CPU and on a GPU,
// in any thread count and any partition of the work.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <algorithm>

#include <diffuse/core/config.hpp>
#include <diffuse/core/parallel.hpp>

namespace diffuse {

struct Philox4 {
  uint32_t v[4];
};

// One Philox4x32-10 block: 4 random 32-bit words for counter `ctr` and key `seed`.
DIFFUSE_HD inline Philox4 philox4x32_10(uint64_t ctr, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Uniform in (0, 1): never 0 (log() is safe) and never 1. 23 bits, so that
// the largest value, 1 - 2^-24, is exact in float (24 bits would round to 1).
DIFFUSE_HD inline float uint_to_uniform(uint32_t x) {
  return (static_cast<float>(x >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

// Element i of a uniform(0,1) draw at (seed, offset).
DIFFUSE_HD inline float philox_uniform(uint64_t seed, uint64_t offset, uint64_t i) {
  const Philox4 b = philox4x32_10(offset + i / 4, seed);
  return uint_to_uniform(b.v[i % 4]);
}

// Element i of a standard normal draw at (seed, offset). Box-Muller on lane
// pairs (0,1) and (2,3) of a block; float math so CPU and GPU agree to rounding.
DIFFUSE_HD inline float philox_normal(uint64_t seed, uint64_t offset, uint64_t i) {
  const Philox4 b = philox4x32_10(offset + i / 4, seed);
  const unsigned lane = static_cast<unsigned>(i % 4);
  const unsigned pair = lane & 2u;
  const float u1 = uint_to_uniform(b.v[pair]);
  const float u2 = uint_to_uniform(b.v[pair + 1]);
  const float r = sqrtf(-2.0f * logf(u1));
  const float theta = 6.2831853071795864769f * u2;
  return (lane & 1u) ? r * sinf(theta) : r * cosf(theta);
}

// All four normals of block `ctr`, lanes 0..3: the same values as
// philox_normal for those elements, at a quarter of the Philox work and half
// the log/sin/cos calls.
DIFFUSE_HD inline void philox_normal4(uint64_t seed, uint64_t ctr, float out[4]) {
  const Philox4 b = philox4x32_10(ctr, seed);
  for (unsigned pair = 0; pair < 4; pair += 2) {
    const float u1 = uint_to_uniform(b.v[pair]);
    const float u2 = uint_to_uniform(b.v[pair + 1]);
    const float r = sqrtf(-2.0f * logf(u1));
    const float theta = 6.2831853071795864769f * u2;
    out[pair] = r * cosf(theta);
    out[pair + 1] = r * sinf(theta);
  }
}

// Where a draw of n numbers lies in its stream: element i is element first + i of the numbers
// that start at block `offset` (block offset + (first + i) / 4, lane (first + i) % 4). `first` is
// 0 except in one process's share of a data-parallel draw (Generator::part).
//
// base (device draws inside a captured CUDA graph only, backend/capture_state.hpp): a device word
// added to offset when the kernel runs, so each replay of the graph draws where the generator
// stands then, as the same code run eagerly would. Null everywhere else.
struct DrawPos {
  uint64_t offset = 0;
  uint64_t first = 0;
  const uint64_t* base = nullptr;
  // An offset alone: a whole draw.
  DIFFUSE_HD constexpr DrawPos(uint64_t off = 0, uint64_t first_element = 0, const uint64_t* base_word = nullptr)
      : offset(off), first(first_element), base(base_word) {}
  // The Philox counter of block blk of the draw (blk counted from the draw's start).
  DIFFUSE_HD uint64_t counter(uint64_t blk) const { return (base ? *base : 0) + offset + blk; }
};

// The Philox blocks that hold elements [first, first + n) of a draw, counted from block first / 4.
DIFFUSE_HD inline uint64_t draw_blocks(uint64_t first, uint64_t n) { return n == 0 ? 0 : (first + n - 1) / 4 - first / 4 + 1; }

// A stream: the seed plus how many Philox blocks have been used. Each draw of
// n numbers takes ceil(n / 4) blocks. The state is two integers, saved in checkpoints.
//
// Data parallelism: with parts = N > 1 the generator is process `part`'s share of a stream that N
// processes draw from together, each for its 1/N of every batch. A draw of n numbers then gives
// elements [part n, (part + 1) n) of the draw of N n numbers that one process with the whole batch
// makes, and the stream moves past all N n of them: the N shares of every batch-shaped draw (the
// noise, the timesteps, the dropout masks, the examples drawn) are exactly the single process's,
// and the offset, which checkpoints hold, is the single process's whatever N is.
struct Generator {
  uint64_t seed = 0;
  uint64_t offset = 0;
  uint32_t part = 0, parts = 1;  // not part of the state: the process's place among the ranks

  Generator() = default;
  explicit Generator(uint64_t s, uint64_t off = 0) : seed(s), offset(off) {}

  // Reserves a draw of n numbers (this process's share of one, with parts > 1); where it lies.
  DrawPos take(uint64_t n) {
    const DrawPos d{offset, static_cast<uint64_t>(part) * n};
    offset += (n * parts + 3) / 4;
    return d;
  }
  // The offset of a whole draw of n numbers (a generator that is not shared: parts == 1).
  uint64_t advance(uint64_t n) {
    if (parts != 1) throw std::logic_error("diffuse: Generator::advance on a generator shared by data-parallel ranks");
    return take(n).offset;
  }

  template <class T>
  void normal(T* out, size_t n) {
    for_blocks(take(n), n, [&](const uint64_t ctr, const size_t i, const unsigned l0, const unsigned l1) {
      float z[4];
      philox_normal4(seed, ctr, z);
      for (unsigned l = l0; l < l1; ++l) out[i + l - l0] = static_cast<T>(z[l]);
    });
  }
  template <class T>
  void uniform(T* out, size_t n) {
    for_blocks(take(n), n, [&](const uint64_t ctr, const size_t i, const unsigned l0, const unsigned l1) {
      const Philox4 b = philox4x32_10(ctr, seed);
      for (unsigned l = l0; l < l1; ++l) out[i + l - l0] = static_cast<T>(uint_to_uniform(b.v[l]));
    });
  }
  // Integers uniform in [0, hi) (hi small: the modulo bias is below 2^-32 * hi).
  template <class I>
  void randint(I* out, size_t n, uint32_t hi) {
    for_blocks(take(n), n, [&](const uint64_t ctr, const size_t i, const unsigned l0, const unsigned l1) {
      const Philox4 b = philox4x32_10(ctr, seed);
      for (unsigned l = l0; l < l1; ++l) out[i + l - l0] = static_cast<I>(static_cast<uint64_t>(b.v[l]) * hi >> 32);
    }, false);
  }
  float uniform1() { float u; uniform(&u, 1); return u; }
  float normal1() { float z; normal(&z, 1); return z; }

  // f(counter, i, l0, l1) for each Philox block of the draw at d: lanes [l0, l1) of block
  // `counter` are elements i, i + 1, ... of the output.
  template <class F>
  static void for_blocks(const DrawPos d, const size_t n, F&& f, const bool may_parallel = true) {
    if (d.base) throw std::logic_error("diffuse: a draw placed by a device word (a captured CUDA graph's) on the CPU");
    const uint64_t b0 = d.first / 4, blocks = draw_blocks(d.first, n);
    parallel_for(static_cast<int64_t>(blocks), may_parallel && n > (1u << 16), [&](int64_t j) {
      const uint64_t blk = b0 + static_cast<uint64_t>(j);
      const uint64_t e0 = std::max<uint64_t>(blk * 4, d.first), e1 = std::min<uint64_t>(blk * 4 + 4, d.first + n);
      f(d.offset + blk, static_cast<size_t>(e0 - d.first), static_cast<unsigned>(e0 - blk * 4),
        static_cast<unsigned>(e1 - blk * 4));
    });
  }
};

}  // namespace diffuse
