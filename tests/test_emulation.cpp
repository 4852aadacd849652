// The CPU emulation of the CUDA execution model (include/diffuse/backend/cuda/emulation.hpp): indices,
// barriers, shared memory, warp shuffles and votes, atomics, limits and deadlock reports; then
// every kernel in kernels/ through it (kernel_cases.hpp, shared with the nvcc build).
#include <catch2/catch.hpp>

#include <diffuse/backend/cuda/launch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "kernel_cases.hpp"
#include "kernel_cases_adam.hpp"
#include "kernel_cases_rng.hpp"
#include "kernel_cases_q_sample.hpp"

// Built twice: with the x86-64 stack switch (the default there) and as test_emulation_ucontext.
#if defined(DIFFUSE_EMU_UCONTEXT)
static_assert(DIFFUSE_EMU_FAST_SWITCH == 0, "test_emulation_ucontext must run the ucontext fibers");
#elif defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
static_assert(DIFFUSE_EMU_FAST_SWITCH == 1, "the emulation should use its own stack switch on x86-64");
#endif

using diffuse::cuda::launch;
using diffuse::testing::DeviceBuffer;
using diffuse::testing::fresh_seed;

namespace {

constexpr unsigned kFull = 0xffffffffu;

// Restores the emulation's limits when a test that changes them ends, however it ends.
struct LimitsGuard {
  diffuse::emu::Limits saved = diffuse::emu::limits();
  ~LimitsGuard() { diffuse::emu::limits() = saved; }
};

std::vector<float> random_floats(std::mt19937_64& gen, size_t n) {
  std::uniform_real_distribution<float> d(-100.0f, 100.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(gen);
  return v;
}

// ---------------------------------------------------------------- kernels under test

// 12 numbers per thread: threadIdx, blockIdx, blockDim, gridDim.
__global__ void record_indices(unsigned* out, unsigned* count) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned per_block = blockDim.x * blockDim.y * blockDim.z;
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  unsigned* o = out + 12 * (block * per_block + t);
  const dim3 v[4] = {threadIdx, blockIdx, blockDim, gridDim};
  for (int k = 0; k < 4; ++k) {
    o[3 * k] = v[k].x;
    o[3 * k + 1] = v[k].y;
    o[3 * k + 2] = v[k].z;
  }
  atomicAdd(count, 1u);
}

// Each block reverses its blockDim.x values through shared memory.
template <bool kSync>
__global__ void reverse_in_shared(const float* in, float* out) {
  DIFFUSE_SHARED(float, s, 1024);
  const unsigned n = blockDim.x, t = threadIdx.x;
  s[t] = in[blockIdx.x * n + t];
  if constexpr (kSync) __syncthreads();
  out[blockIdx.x * n + t] = s[n - 1 - t];
}

template <class T>
__global__ void all_shuffles(const T* in, const int* src, unsigned delta, int lane_mask, int width, T* out) {
  const unsigned t = threadIdx.x + blockIdx.x * blockDim.x;
  const T v = in[t];
  out[4 * t + 0] = __shfl_sync(kFull, v, src[t], width);
  out[4 * t + 1] = __shfl_up_sync(kFull, v, delta, width);
  out[4 * t + 2] = __shfl_down_sync(kFull, v, delta, width);
  out[4 * t + 3] = __shfl_xor_sync(kFull, v, lane_mask, width);
}

// Lanes of 3-D blocks are numbered x fastest, then y, then z.
__global__ void xor_lane_8(int* out) {
  const int t = static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
  out[t] = __shfl_xor_sync(kFull, static_cast<int>(threadIdx.x + 100 * threadIdx.y + 10000 * threadIdx.z), 8);
}

// Two groups per warp at once, each with its own mask, in divergent branches.
__global__ void divergent_warp_ops(const float* in, const int* pred, float* shfl, unsigned* ballot, int* any, int* all) {
  const unsigned t = threadIdx.x + blockIdx.x * blockDim.x, lane = threadIdx.x % 32;
  const float v = in[t];
  if (lane % 2 == 0)
    shfl[t] = __shfl_xor_sync(0x55555555u, v, 2);
  else
    shfl[t] = __shfl_down_sync(0xAAAAAAAAu, v, 2);
  const unsigned low = 0x000FFFFFu;
  if (lane < 20) {
    ballot[t] = __ballot_sync(low, pred[t]);
    any[t] = __any_sync(low, pred[t]);
    all[t] = __all_sync(low, pred[t]);
  } else {
    ballot[t] = __ballot_sync(~low, pred[t]);
    any[t] = __any_sync(~low, pred[t]);
    all[t] = __all_sync(~low, pred[t]);
  }
}

// Lanes at or past `live` return first; the others vote and shuffle with the full mask.
__global__ void warp_ops_after_exit(const int* pred, const float* in, unsigned live, unsigned* ballot, int* all,
                                    float* shfl) {
  const unsigned t = threadIdx.x;
  if (t % 32 >= live) return;
  ballot[t] = __ballot_sync(kFull, pred[t]);
  all[t] = __all_sync(kFull, pred[t]);
  shfl[t] = __shfl_down_sync(kFull, in[t], 1);
}

template <bool kSync>
__global__ void rotate_in_warp(const float* in, float* out) {
  DIFFUSE_SHARED(float, s, 32);
  const unsigned lane = threadIdx.x;
  s[lane] = in[lane];
  if constexpr (kSync) __syncwarp();
  out[lane] = s[(lane + 1) % 32];
}

struct AtomicsOut {
  unsigned* tickets;
  unsigned* counter;
  float* fsum;
  double* dsum;
  int* imax;
  int* imin;
  unsigned long long* usum;
  int* owner;     // slot -> thread that claimed it (atomicCAS from -1)
  int* claimed;   // per thread: 1 if its atomicCAS saw -1
};
__global__ void atomics(const float* xf, const double* xd, const int* xi, const int* slot, int n, AtomicsOut o) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  o.tickets[i] = atomicAdd(o.counter, 1u);
  atomicAdd(o.fsum, xf[i]);
  atomicAdd(o.dsum, xd[i]);
  atomicMax(o.imax, xi[i]);
  atomicMin(o.imin, xi[i]);
  atomicAdd(o.usum, static_cast<unsigned long long>(xi[i] & 0xffff));
  o.claimed[i] = atomicCAS(&o.owner[slot[i]], -1, i) == -1;
}

// Reverses through dynamic shared memory (blockDim.x + 1 floats) while a static array holds
// per-block tags; extra[block] is the dynamic float past the ones written.
__global__ void dynamic_reverse(const float* in, float* out, int* tags_out, float* extra) {
  DIFFUSE_DYNAMIC_SHARED(float, dyn);
  DIFFUSE_SHARED(int, tags, 4);
  const unsigned n = blockDim.x, t = threadIdx.x;
  dyn[t] = in[blockIdx.x * n + t];
  if (t < 4) tags[t] = static_cast<int>(1000 * blockIdx.x + t);
  __syncthreads();
  out[blockIdx.x * n + t] = dyn[n - 1 - t];
  if (t < 4) tags_out[blockIdx.x * 4 + t] = tags[t];
  if (t == 0) extra[blockIdx.x] = dyn[n];
}

__global__ void big_static_shared(float* out) {
  DIFFUSE_SHARED(float, big, 12 * 1024 + 1);  // 48 KiB + 4 bytes
  big[threadIdx.x] = 1.0f;
  out[threadIdx.x] = big[threadIdx.x];
}
__global__ void medium_static_shared(float* out) {
  DIFFUSE_SHARED(float, medium, 8 * 1024);  // 32 KiB
  medium[threadIdx.x] = 2.0f;
  out[threadIdx.x] = medium[threadIdx.x];
}

__global__ void early_return_before_barrier(float* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}
__global__ void barriers_at_two_sites(float* out) {
  if (threadIdx.x < 16)
    __syncthreads();
  else
    __syncthreads();
  out[threadIdx.x] = 1.0f;
}
__global__ void shuffle_against_barrier(float* out) {
  float v = out[threadIdx.x];
  if (threadIdx.x < 16)
    v = __shfl_down_sync(kFull, v, 1);
  else
    __syncthreads();
  out[threadIdx.x] = v;
}
__global__ void mask_without_own_lane(float* out) {
  out[threadIdx.x] = __shfl_sync(0x1u, out[threadIdx.x], 0);
}
__global__ void shuffle_width_3(float* out) {
  out[threadIdx.x] = __shfl_sync(kFull, out[threadIdx.x], 0, 3);
}
__global__ void nested_launch(float* out) {
  launch(early_return_before_barrier, 1, 32, 0, nullptr, out);
}

}  // namespace

// ---------------------------------------------------------------- tests

TEST_CASE("emulation: every thread of a 3-D grid runs once and sees its indices") {
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  auto draw = [&](unsigned lo, unsigned hi) { return std::uniform_int_distribution<unsigned>(lo, hi)(gen); };
  for (int rep = 0; rep < 4; ++rep) {
    const dim3 grid(draw(1, 4), draw(1, 3), draw(1, 3)), block(draw(1, 9), draw(1, 5), draw(1, 4));
    INFO("grid " << grid.x << "x" << grid.y << "x" << grid.z << " block " << block.x << "x" << block.y << "x" << block.z);
    const unsigned per_block = block.x * block.y * block.z, blocks = grid.x * grid.y * grid.z;
    DeviceBuffer<unsigned> out(12 * size_t{per_block} * blocks), count(std::vector<unsigned>{0});
    launch(record_indices, grid, block, 0, nullptr, out.get(), count.get());
    const std::vector<unsigned> o = out.to_host();
    CHECK(count.to_host()[0] == per_block * blocks);
    size_t bad = 0;
    for (unsigned b = 0; b < blocks; ++b)
      for (unsigned t = 0; t < per_block; ++t) {
        const unsigned want[12] = {t % block.x, t / block.x % block.y, t / (block.x * block.y),
                                   b % grid.x,  b / grid.x % grid.y,  b / (grid.x * grid.y),
                                   block.x,     block.y,              block.z,
                                   grid.x,      grid.y,               grid.z};
        for (int k = 0; k < 12; ++k) bad += o[12 * (size_t{b} * per_block + t) + k] != want[k];
      }
    CHECK(bad == 0);
  }
  DeviceBuffer<int> lanes(64);
  launch(xor_lane_8, 1, dim3(8, 4, 2), 0, nullptr, lanes.get());
  const std::vector<int> l = lanes.to_host();
  for (int z = 0; z < 2; ++z)
    for (int y = 0; y < 4; ++y)
      for (int x = 0; x < 8; ++x) CHECK(l[x + 8 * y + 32 * z] == x + 100 * (y ^ 1) + 10000 * z);
}

TEST_CASE("emulation: __syncthreads orders shared memory, and a missing barrier shows") {
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  for (unsigned n : {1u, 31u, 33u, 1000u, 1024u}) {
    INFO("block " << n);
    const unsigned blocks = 3;
    const std::vector<float> x = random_floats(gen, size_t{n} * blocks);
    DeviceBuffer<float> in(x), out(x.size()), racy(x.size());
    launch(reverse_in_shared<true>, blocks, n, 0, nullptr, in.get(), out.get());
    const std::vector<float> y = out.to_host();
    size_t bad = 0;
    for (unsigned b = 0; b < blocks; ++b)
      for (unsigned t = 0; t < n; ++t) bad += y[b * n + t] != x[b * n + n - 1 - t];
    CHECK(bad == 0);
    // Without the barrier thread 0 reads s[n-1] before thread n-1 wrote it: the 0xFF fill (NaN).
    launch(reverse_in_shared<false>, blocks, n, 0, nullptr, in.get(), racy.get());
    const std::vector<float> r = racy.to_host();
    for (unsigned b = 0; b < blocks; ++b) CHECK(std::isnan(r[b * n]) == (n > 1));
  }
}

TEMPLATE_TEST_CASE("emulation: the four shuffles match CUDA's definitions", "", double, int) {
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  const unsigned threads = 64;  // two warps, which must not mix
  std::vector<TestType> x(threads);
  std::uniform_int_distribution<int> value(-1000000, 1000000);
  for (TestType& v : x) v = static_cast<TestType>(value(gen)) / (std::is_floating_point_v<TestType> ? 7 : 1);
  std::vector<int> src(threads);
  for (int& s : src) s = std::uniform_int_distribution<int>(0, 63)(gen);  // >= width: taken modulo width
  for (int width : {1, 2, 4, 8, 16, 32}) {
    const unsigned delta = std::uniform_int_distribution<unsigned>(0, static_cast<unsigned>(width))(gen);
    const int lane_mask = std::uniform_int_distribution<int>(0, 31)(gen);
    INFO("width " << width << " delta " << delta << " laneMask " << lane_mask);
    DeviceBuffer<TestType> in(x), out(4 * threads);
    DeviceBuffer<int> srcs(src);
    launch(all_shuffles<TestType>, 2, threads / 2, 0, nullptr, in.get(), srcs.get(), delta, lane_mask, width, out.get());
    const std::vector<TestType> y = out.to_host();
    for (unsigned t = 0; t < threads; ++t) {
      // CUDA Programming Guide, warp shuffle functions: lanes form segments of `width`; idx
      // reads lane srcLane % width of the segment; up/down leave the first/last delta lanes of a
      // segment unchanged; xor may read an earlier segment but a later one gives its own value.
      const unsigned lane = t % 32, base = t - lane, seg = lane / width * width, w = static_cast<unsigned>(width);
      const unsigned idx = base + seg + static_cast<unsigned>(src[t]) % w;
      const unsigned up = lane - seg >= delta ? t - delta : t;
      const unsigned down = lane - seg + delta < w ? t + delta : t;
      const unsigned x_lane = lane ^ static_cast<unsigned>(lane_mask);
      const unsigned xr = x_lane < seg + w ? base + x_lane : t;
      INFO("thread " << t);
      CHECK(y[4 * t + 0] == x[idx]);
      CHECK(y[4 * t + 1] == x[up]);
      CHECK(y[4 * t + 2] == x[down]);
      CHECK(y[4 * t + 3] == x[xr]);
    }
  }
}

TEST_CASE("emulation: shuffles and votes in divergent branches with partial masks") {
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  const unsigned threads = 64;
  for (double p_true : {0.5, 1.0, 0.0, 0.95}) {
    INFO("P(predicate) " << p_true);
    const std::vector<float> x = random_floats(gen, threads);
    std::vector<int> pred(threads);
    std::bernoulli_distribution coin(p_true);
    for (int& v : pred) v = coin(gen) ? std::uniform_int_distribution<int>(1, 9)(gen) : 0;  // any non-zero is true
    DeviceBuffer<float> in(x), shfl(threads);
    DeviceBuffer<int> pr(pred), any(threads), all(threads);
    DeviceBuffer<unsigned> ballot(threads);
    launch(divergent_warp_ops, 2, threads / 2, 0, nullptr, in.get(), pr.get(), shfl.get(), ballot.get(), any.get(), all.get());
    const std::vector<float> s = shfl.to_host();
    const std::vector<unsigned> b = ballot.to_host();
    const std::vector<int> an = any.to_host(), al = all.to_host();
    for (unsigned t = 0; t < threads; ++t) {
      INFO("thread " << t);
      const unsigned lane = t % 32, base = t - lane;
      const unsigned from = lane % 2 == 0 ? t ^ 2u : (lane + 2 <= 31 ? t + 2 : t);
      CHECK(s[t] == x[from]);
      const unsigned group = lane < 20 ? 0x000FFFFFu : 0xFFF00000u;
      unsigned votes = 0;
      for (unsigned j = 0; j < 32; ++j)
        if (((group >> j) & 1u) && pred[base + j] != 0) votes |= 1u << j;
      CHECK(b[t] == votes);
      CHECK(an[t] == (votes != 0 ? 1 : 0));
      CHECK(al[t] == (votes == group ? 1 : 0));
    }
  }
}

TEST_CASE("emulation: exited and missing lanes leave warp intrinsics; reading them gives garbage") {
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  const unsigned threads = 40;  // warp 1 has 8 lanes: lanes 8..31 do not exist
  for (bool all_true : {false, true}) {
    const unsigned live = 24;   // lanes 24..31 of warp 0 return first
    const std::vector<float> x = random_floats(gen, threads);
    std::vector<int> pred(threads);
    for (int& v : pred) v = all_true ? 1 : std::uniform_int_distribution<int>(0, 1)(gen);
    DeviceBuffer<int> pr(pred), all(threads);
    DeviceBuffer<float> in(x), shfl(threads);
    DeviceBuffer<unsigned> ballot(threads);
    launch(warp_ops_after_exit, 1, threads, 0, nullptr, pr.get(), in.get(), live, ballot.get(), all.get(), shfl.get());
    const std::vector<unsigned> b = ballot.to_host();
    const std::vector<int> al = all.to_host();
    const std::vector<float> s = shfl.to_host();
    for (unsigned w = 0; w < 2; ++w) {
      const unsigned base = 32 * w, lanes = std::min(live, threads - base);
      unsigned votes = 0;
      for (unsigned j = 0; j < lanes; ++j) votes |= (pred[base + j] != 0 ? 1u : 0u) << j;
      for (unsigned j = 0; j < lanes; ++j) {
        INFO("warp " << w << " lane " << j);
        CHECK(b[base + j] == votes);
        CHECK(al[base + j] == (votes == (1u << lanes) - 1u ? 1 : 0));
        if (j + 1 < lanes)
          CHECK(s[base + j] == x[base + j + 1]);
        else
          CHECK(std::isnan(s[base + j]));  // its source lane exited or does not exist
      }
    }
  }
  // So reduce_sum_rows_kernel in a block that is not a whole number of warps (48 threads) gets a
  // wrong sum: the partial warp's shuffles read missing lanes and its partial is dropped. That is
  // why its launcher insists on multiples of 32.
  std::vector<float> row(100);
  for (float& v : row) v = static_cast<float>(std::uniform_int_distribution<int>(1, 9)(gen));  // exact sums
  DeviceBuffer<float> in(row), out(1), good(1);
  for (unsigned block : {48u, 64u}) {
    DeviceBuffer<float>& o = block == 48 ? out : good;
    launch(diffuse::kernels::reduce_sum_rows_kernel<float>, 1, block, 0, nullptr, in.get(), o.get(), std::int64_t{1},
           std::int64_t{100});
  }
  float total = 0;
  for (float v : row) total += v;
  CHECK(good.to_host()[0] == total);
  CHECK(out.to_host()[0] != total);
}

TEST_CASE("emulation: __syncwarp orders shared memory within a warp") {
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  const std::vector<float> x = random_floats(gen, 32);
  DeviceBuffer<float> in(x), out(32), racy(32);
  launch(rotate_in_warp<true>, 1, 32, 0, nullptr, in.get(), out.get());
  const std::vector<float> y = out.to_host();
  for (unsigned l = 0; l < 32; ++l) CHECK(y[l] == x[(l + 1) % 32]);
  launch(rotate_in_warp<false>, 1, 32, 0, nullptr, in.get(), racy.get());
  CHECK(std::isnan(racy.to_host()[0]));
}

TEST_CASE("emulation: atomics from many blocks, on one and on several host threads") {
  LimitsGuard guard;
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  const unsigned block = 96, blocks = 37;
  const int n = static_cast<int>(block * blocks) - 5;  // the last block is partly idle
  const int slots = 50;
  for (int host_threads : {1, 3}) {
    INFO("host threads " << host_threads);
    diffuse::emu::limits().host_threads = host_threads;
    // Dyadic values (multiples of 1/64 below 64): float and double sums are exact in any order.
    std::uniform_int_distribution<int> k(-4096, 4096), big(-2000000000, 2000000000), slot(0, slots - 1);
    std::vector<float> xf(n);
    std::vector<double> xd(n);
    std::vector<int> xi(n), sl(n);
    for (int i = 0; i < n; ++i) {
      xf[i] = static_cast<float>(k(gen)) / 64.0f;
      xd[i] = static_cast<double>(k(gen)) / 64.0;
      xi[i] = big(gen);
      sl[i] = slot(gen);
    }
    const float f0 = static_cast<float>(k(gen)) / 64.0f;
    const double d0 = static_cast<double>(k(gen)) / 64.0;
    const unsigned c0 = static_cast<unsigned>(k(gen) + 5000);
    DeviceBuffer<float> dxf(xf), fsum(std::vector<float>{f0});
    DeviceBuffer<double> dxd(xd), dsum(std::vector<double>{d0});
    DeviceBuffer<int> dxi(xi), dsl(sl), imax(std::vector<int>{std::numeric_limits<int>::min()}),
        imin(std::vector<int>{std::numeric_limits<int>::max()}), owner(std::vector<int>(slots, -1)), claimed(n);
    DeviceBuffer<unsigned> tickets(n), counter(std::vector<unsigned>{c0});
    DeviceBuffer<unsigned long long> usum(std::vector<unsigned long long>{7});
    const AtomicsOut o{tickets.get(), counter.get(), fsum.get(), dsum.get(), imax.get(),
                       imin.get(),    usum.get(),    owner.get(), claimed.get()};
    launch(atomics, blocks, block, 0, nullptr, dxf.get(), dxd.get(), dxi.get(), dsl.get(), n, o);

    std::vector<unsigned> t = tickets.to_host();
    std::sort(t.begin(), t.end());
    bool permutation = true;
    for (int i = 0; i < n; ++i) permutation = permutation && t[i] == c0 + static_cast<unsigned>(i);
    CHECK(permutation);  // each thread drew a distinct ticket
    CHECK(counter.to_host()[0] == c0 + static_cast<unsigned>(n));
    float fs = f0;
    double ds = d0;
    unsigned long long us = 7;
    for (int i = 0; i < n; ++i) {
      fs += xf[i];
      ds += xd[i];
      us += static_cast<unsigned long long>(xi[i] & 0xffff);
    }
    CHECK(fsum.to_host()[0] == fs);
    CHECK(dsum.to_host()[0] == ds);
    CHECK(usum.to_host()[0] == us);
    CHECK(imax.to_host()[0] == *std::max_element(xi.begin(), xi.end()));
    CHECK(imin.to_host()[0] == *std::min_element(xi.begin(), xi.end()));
    // atomicCAS: exactly one thread claimed each slot that was aimed at, and owns it.
    const std::vector<int> own = owner.to_host(), cl = claimed.to_host();
    std::set<int> aimed(sl.begin(), sl.end());
    int claims = 0;
    for (int i = 0; i < n; ++i) {
      claims += cl[i];
      if (cl[i]) CHECK(own[sl[i]] == i);
    }
    CHECK(claims == static_cast<int>(aimed.size()));
    for (int s = 0; s < slots; ++s) CHECK((own[s] == -1) == (aimed.count(s) == 0));
  }
}

TEST_CASE("emulation: dynamic shared memory, apart from static shared memory") {
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  for (unsigned n : {1u, 33u, 1000u, std::uniform_int_distribution<unsigned>(2, 1024)(gen)}) {
    INFO("block " << n);
    const unsigned blocks = 3;
    const std::vector<float> x = random_floats(gen, size_t{n} * blocks);
    DeviceBuffer<float> in(x), out(x.size()), extra(blocks);
    DeviceBuffer<int> tags(4 * blocks);
    launch(dynamic_reverse, blocks, n, (n + 1) * sizeof(float), nullptr, in.get(), out.get(), tags.get(), extra.get());
    const std::vector<float> y = out.to_host(), e = extra.to_host();
    const std::vector<int> tg = tags.to_host();
    size_t bad = 0;
    for (unsigned b = 0; b < blocks; ++b) {
      for (unsigned t = 0; t < n; ++t) bad += y[b * n + t] != x[b * n + n - 1 - t];
      for (unsigned t = 0; t < std::min(n, 4u); ++t) CHECK(tg[b * 4 + t] == static_cast<int>(1000 * b + t));
      CHECK(std::isnan(e[b]));  // never written: the fill
    }
    CHECK(bad == 0);
  }
}

TEST_CASE("emulation: launch and shared-memory limits are enforced") {
  LimitsGuard guard;
  DeviceBuffer<float> out(1024);
  using Catch::Contains;
  CHECK_THROWS_WITH(launch(medium_static_shared, 1, 1025, 0, nullptr, out.get()), Contains("invalid block (1025,1,1)"));
  CHECK_THROWS_AS(launch(medium_static_shared, 1, dim3(32, 32, 2), 0, nullptr, out.get()), std::logic_error);
  CHECK_THROWS_AS(launch(medium_static_shared, 1, dim3(1, 1, 65), 0, nullptr, out.get()), std::logic_error);
  CHECK_THROWS_WITH(launch(medium_static_shared, dim3(0), 32, 0, nullptr, out.get()), Contains("invalid grid"));
  CHECK_THROWS_WITH(launch(big_static_shared, 1, 32, 0, nullptr, out.get()), Contains("static shared memory of 49156 bytes"));
  CHECK_THROWS_WITH(launch(dynamic_reverse, 1, 32, 48 * 1024 + 4, nullptr, out.get(), out.get(), nullptr, out.get()),
                    Contains("dynamic shared memory of 49156 bytes"));
  // 32 KiB static + 20000 dynamic bytes: over the default 48 KiB, within an opted-in 100 KiB.
  CHECK_THROWS_WITH(launch(medium_static_shared, 1, 32, 20000, nullptr, out.get()), Contains("static (32768) + dynamic (20000)"));
  diffuse::emu::limits().max_shared_bytes = 100 * 1024;
  CHECK_NOTHROW(launch(medium_static_shared, 1, 32, 20000, nullptr, out.get()));
  CHECK(out.to_host()[31] == 2.0f);
  CHECK_THROWS_WITH((void)threadIdx.x, Contains("outside a kernel"));
  CHECK_THROWS_WITH(launch(nested_launch, 1, 1, 0, nullptr, out.get()), Contains("dynamic parallelism"));
}

TEST_CASE("emulation: deadlocks and warp-intrinsic misuse are reported, and later launches still work") {
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  DeviceBuffer<float> out(random_floats(gen, 64));
  using Catch::Contains;
  CHECK_THROWS_WITH(launch(early_return_before_barrier, 2, 64, 0, nullptr, out.get()),
                    Contains("deadlock") && Contains("63 threads wait at __syncthreads()") &&
                        Contains("1 thread exited, first (5,0,0)") && Contains("early return"));
  // Two groups of 16, each at its own __syncthreads() line.
  std::string two_sites;
  try {
    launch(barriers_at_two_sites, 1, 32, 0, nullptr, out.get());
  } catch (const std::logic_error& e) {
    two_sites = e.what();
  }
  INFO(two_sites);
  const std::string site = "16 threads wait at __syncthreads() (test_emulation.cpp:";
  const size_t first = two_sites.find(site), second = two_sites.find(site, first + 1);
  REQUIRE(second != std::string::npos);
  CHECK(two_sites.substr(first + site.size(), 4) != two_sites.substr(second + site.size(), 4));
  CHECK_THROWS_WITH(launch(shuffle_against_barrier, 1, 32, 0, nullptr, out.get()),
                    Contains("16 threads wait at __shfl_down_sync mask 0xffffffff in warp 0") &&
                        Contains("16 threads wait at __syncthreads()"));
  CHECK_THROWS_WITH(launch(mask_without_own_lane, 1, 2, 0, nullptr, out.get()),
                    Contains("thread (1,0,0) calls __shfl_sync with mask 0x00000001, which does not name its own lane 1"));
  CHECK_THROWS_WITH(launch(shuffle_width_3, 1, 32, 0, nullptr, out.get()), Contains("width 3"));
  // The abandoned fibers do not disturb the next launch.
  const std::vector<float> x = random_floats(gen, 64);
  DeviceBuffer<float> in(x), rev(64);
  launch(reverse_in_shared<true>, 1, 64, 0, nullptr, in.get(), rev.get());
  const std::vector<float> y = rev.to_host();
  size_t bad = 0;
  for (unsigned t = 0; t < 64; ++t) bad += y[t] != x[63 - t];
  CHECK(bad == 0);
}
