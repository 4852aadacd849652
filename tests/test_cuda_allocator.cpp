// The caching allocator of include/diffuse/backend/cuda/allocator.hpp on the CPU, over a host-memory
// backend that counts what it hands out and can be told to run out of memory or to fail frees:
// bucket rounding, reuse, statistics, CachedBuffer's ownership, empty_cache, the cache limit and
// the out-of-memory path. Also: check.hpp compiles in a CPU build, and the message of a failed check.
// Random sequences use a fresh seed (shown with any failure); DIFFUSE_TEST_SEED=<n> repeats one.
#include <catch2/catch.hpp>

#include "kernel_seed.hpp"

#include <diffuse/backend/cuda/allocator.hpp>
#include <diffuse/backend/cuda/check.hpp>
#include <diffuse/backend/cuda/memory.hpp>  // declares nothing without CUDA, but must compile

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

static_assert(DIFFUSE_HAVE_CUDA_RUNTIME == 0 && DIFFUSE_HAVE_CUBLAS == 0 && DIFFUSE_HAVE_CUDNN == 0,
              "this test is the CPU build: check.hpp must not find CUDA here");

namespace {

std::uint64_t test_seed() { return diffuse::testing::fresh_seed(); }

// A "device" of host memory: at most `limit` bytes held at once; frees of unknown pointers throw.
struct HostBackend {
  static inline std::mutex mu;
  static inline std::size_t limit = std::numeric_limits<std::size_t>::max();
  static inline std::size_t held = 0;
  static inline std::uint64_t allocs = 0, frees = 0;
  static inline bool fail_frees = false;  // free the memory, then throw (a driver error after the fact)
  static inline std::unordered_map<void*, std::size_t> live;

  static const char* name() { return "host test backend"; }
  static void* allocate(std::size_t bytes) {
    std::lock_guard<std::mutex> lock(mu);
    if (bytes > limit || held > limit - bytes) return nullptr;
    void* p = std::aligned_alloc(256, bytes);  // bytes: a multiple of 512
    if (!p) return nullptr;
    live.emplace(p, bytes);
    held += bytes;
    ++allocs;
    return p;
  }
  static void free(void* p) {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = live.find(p);
    if (it == live.end()) throw std::logic_error("HostBackend::free: unknown pointer");
    held -= it->second;
    live.erase(it);
    std::free(p);
    ++frees;
    if (fail_frees) throw std::runtime_error("HostBackend::free: injected failure");
  }
  // Every test starts from a clean backend (blocks left by a test that failed half-way are freed,
  // so that its failure does not spread to the next tests).
  static void reset() {
    std::lock_guard<std::mutex> lock(mu);
    for (auto& [p, bytes] : live) std::free(p);
    live.clear();
    held = 0;
    limit = std::numeric_limits<std::size_t>::max();
    allocs = frees = 0;
    fail_frees = false;
  }
};

using Allocator = diffuse::cuda::CachingAllocator<HostBackend>;
template <class T>
using Buffer = diffuse::cuda::CachedBuffer<T, HostBackend>;

// Nothing of the backend is left once every allocator of a test is gone.
void check_backend_empty() {
  CHECK(HostBackend::live.empty());
  CHECK(HostBackend::held == 0);
}

}  // namespace

TEST_CASE("cuda allocator: bucket rounding") {
  CHECK(Allocator::round_size(0) == 0);
  CHECK(Allocator::round_size(1) == 512);
  CHECK(Allocator::round_size(512) == 512);
  CHECK(Allocator::round_size(513) == 1024);
  CHECK(Allocator::round_size(1000) == 1024);
  CHECK(Allocator::round_size(std::size_t(1) << 20) == std::size_t(1) << 20);
  CHECK(Allocator::round_size((std::size_t(1) << 20) + 1) == (std::size_t(1) << 20) + (std::size_t(1) << 17));
  CHECK(Allocator::round_size((std::size_t(3) << 20) + 1) == (std::size_t(3) << 20) + (std::size_t(1) << 18));
  CHECK(Allocator::round_size(std::size_t(1) << 30) == std::size_t(1) << 30);
  CHECK_THROWS_AS(Allocator::round_size(std::numeric_limits<std::size_t>::max()), diffuse::cuda::OutOfMemory);

  const std::uint64_t seed = test_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int> log2(0, 40);
  for (int i = 0; i < 20000; ++i) {
    const int e = log2(gen);
    const std::size_t b = std::uniform_int_distribution<std::size_t>(1, std::size_t(2) << e)(gen);
    const std::size_t r = Allocator::round_size(b);
    INFO("request " << b << " -> " << r);
    REQUIRE(r >= b);
    REQUIRE(r % 512 == 0);
    REQUIRE(r - b <= std::max<std::size_t>(511, b / 8));  // at most 12.5% above 1 MiB
    REQUIRE(Allocator::round_size(r) == r);               // a bucket size is its own bucket
    REQUIRE(Allocator::round_size(b + 1) >= r);           // monotone
  }
  // Few buckets: at most 8 sizes per power of two above 1 MiB.
  std::vector<std::size_t> buckets;
  for (std::size_t b = (std::size_t(1) << 24) + 1; b <= std::size_t(1) << 25; b += 4099) buckets.push_back(Allocator::round_size(b));
  buckets.erase(std::unique(buckets.begin(), buckets.end()), buckets.end());
  CHECK(buckets.size() == 8);
}

TEST_CASE("cuda allocator: a freed block is reused for the same bucket only") {
  HostBackend::reset();
  {
    Allocator a;
    void* p = a.allocate(1000);
    REQUIRE(p != nullptr);
    std::memset(p, 0xAB, 1024);  // the whole bucket is usable
    CHECK(a.block_size(p) == 1024);
    a.deallocate(p);
    CHECK(a.stats().bytes_cached == 1024);
    CHECK(HostBackend::allocs == 1);

    void* q = a.allocate(700);  // same bucket (1024): the same block, no new system allocation
    CHECK(q == p);
    CHECK(HostBackend::allocs == 1);
    void* r = a.allocate(1500);  // bucket 1536: a new block
    CHECK(r != p);
    CHECK(HostBackend::allocs == 2);
    void* s = a.allocate(1024);  // bucket 1024, but its only block is in use
    CHECK(s != p);
    CHECK(HostBackend::allocs == 3);

    const auto st = a.stats();
    CHECK(st.allocations == 4);
    CHECK(st.cache_hits == 1);
    CHECK(st.system_allocations == 3);
    CHECK(st.blocks_in_use == 3);
    CHECK(st.bytes_in_use == 1024 + 1536 + 1024);
    CHECK(st.bytes_cached == 0);
    a.deallocate(q);
    a.deallocate(r);
    a.deallocate(s);
    // Last in, first out within a bucket.
    CHECK(a.allocate(1024) == s);
    CHECK(a.allocate(1024) == q);
    a.deallocate(q);
    a.deallocate(s);
  }
  check_backend_empty();
}

// CUDA graphs: a captured graph replays on the addresses of its capture, so every block handed
// out or freed during the capture stays the graph's until it is released.
TEST_CASE("cuda allocator: a graph pool keeps the blocks of a capture from other requests until released") {
  HostBackend::reset();
  {
    Allocator a;
    void* before = a.allocate(1000);  // made before the capture, freed inside it
    void* cached = a.allocate(2000);
    a.deallocate(cached);
    const std::uint64_t id = a.open_graph_pool();
    CHECK(id != 0);
    CHECK_THROWS_AS(a.open_graph_pool(), std::logic_error);
    void* in = a.allocate(2000);  // a cached block may join the pool
    CHECK(in == cached);
    a.deallocate(in);
    void* again = a.allocate(2000);  // inside the capture, the pool's own block serves again
    CHECK(again == in);
    a.deallocate(before);
    void* kept = a.allocate(3000);  // outlives the capture (a gradient, the loss)
    a.close_graph_pool();
    a.deallocate(again);
    CHECK(a.stats().bytes_graph_reserved == 2048 + 1024);
    CHECK(a.stats().bytes_cached == 0);
    // After the capture no request gets a pool's block, even of its bucket.
    void* x = a.allocate(2000);
    void* y = a.allocate(1000);
    CHECK(x != again);
    CHECK(y != before);
    a.deallocate(kept);  // the pool's, though freed after the capture
    CHECK(a.stats().bytes_graph_reserved == 2048 + 1024 + 3072);
    a.empty_cache();  // never a graph's blocks
    CHECK(HostBackend::live.count(again) == 1);
    CHECK(HostBackend::live.count(kept) == 1);
    a.release_graph_pool(id);
    CHECK(a.stats().bytes_graph_reserved == 0);
    CHECK(a.stats().bytes_cached == 2048 + 1024 + 3072);
    CHECK(a.allocate(2000) == again);  // an ordinary cached block again
    a.deallocate(again);
    a.deallocate(x);
    a.deallocate(y);
    // A pool left open or unreleased when the allocator goes: its blocks are freed with the cache.
    (void)a.open_graph_pool();
    void* z = a.allocate(512);
    a.deallocate(z);
  }
  check_backend_empty();
}

TEST_CASE("cuda allocator: zero bytes, null and foreign pointers") {
  HostBackend::reset();
  {
    Allocator a;
    CHECK(a.allocate(0) == nullptr);
    CHECK_NOTHROW(a.deallocate(nullptr));
    CHECK(a.stats().allocations == 0);
    CHECK(HostBackend::allocs == 0);

    void* p = a.allocate(10);
    int local = 0;
    CHECK_THROWS_AS(a.deallocate(&local), std::invalid_argument);
    CHECK_THROWS_AS(a.block_size(&local), std::invalid_argument);
    a.deallocate(p);
    CHECK_THROWS_AS(a.deallocate(p), std::invalid_argument);  // double free
    CHECK(a.stats().blocks_cached == 1);                         // and the cache is unharmed
  }
  check_backend_empty();
}

TEST_CASE("cuda allocator: statistics follow a random sequence of allocations and frees") {
  HostBackend::reset();
  const std::uint64_t seed = test_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  {
    Allocator a;
    struct Live {
      unsigned char* p;
      std::size_t bytes, bucket;
      unsigned char tag;
    };
    std::vector<Live> live;
    std::unordered_map<std::size_t, std::size_t> cached_per_bucket;  // the model of the cache
    std::size_t in_use = 0, cached = 0, peak = 0;
    std::uint64_t hits = 0, sys = 0;
    // Few distinct sizes, as in a training step, so that buckets repeat.
    const std::size_t sizes[] = {1, 100, 511, 512, 513, 4000, 65536, 1000000, (1u << 20) + 5, 3u << 20};
    std::uniform_int_distribution<int> pick(0, 9), coin(0, 1);
    for (int step = 0; step < 3000; ++step) {
      if (live.empty() || (live.size() < 48 && coin(gen) != 0)) {
        const std::size_t bytes = sizes[pick(gen)];
        const std::size_t bucket = Allocator::round_size(bytes);
        auto* p = static_cast<unsigned char*>(a.allocate(bytes));
        REQUIRE(p != nullptr);
        if (cached_per_bucket[bucket] > 0) {
          --cached_per_bucket[bucket];
          cached -= bucket;
          ++hits;
        } else {
          ++sys;
        }
        in_use += bucket;
        peak = std::max(peak, in_use);
        const auto tag = static_cast<unsigned char>(step);
        std::memset(p, tag, bytes);  // overlapping blocks would overwrite each other's tags
        live.push_back({p, bytes, bucket, tag});
      } else {
        const std::size_t i = std::uniform_int_distribution<std::size_t>(0, live.size() - 1)(gen);
        const Live l = live[i];
        live[i] = live.back();
        live.pop_back();
        INFO("block of " << l.bytes << " bytes");
        REQUIRE(std::count(l.p, l.p + l.bytes, l.tag) == static_cast<std::ptrdiff_t>(l.bytes));
        a.deallocate(l.p);
        ++cached_per_bucket[l.bucket];
        cached += l.bucket;
        in_use -= l.bucket;
      }
      const auto st = a.stats();
      REQUIRE(st.bytes_in_use == in_use);
      REQUIRE(st.bytes_cached == cached);
      REQUIRE(st.peak_bytes_in_use == peak);
      REQUIRE(st.blocks_in_use == live.size());
      REQUIRE(st.cache_hits == hits);
      REQUIRE(st.system_allocations == sys);
      REQUIRE(st.system_frees == 0);
      REQUIRE(st.bytes_reserved() == HostBackend::held);
    }
    for (const Live& l : live) a.deallocate(l.p);
    CHECK(a.stats().bytes_in_use == 0);
    CHECK(a.stats().peak_bytes_in_use == peak);
    a.reset_peak();
    CHECK(a.stats().peak_bytes_in_use == 0);
  }
  check_backend_empty();
}

TEST_CASE("cuda allocator: CachedBuffer moves and returns its block to the cache") {
  HostBackend::reset();
  {
    Allocator a;
    Buffer<float> empty;
    CHECK(empty.data() == nullptr);
    CHECK(empty.size() == 0);
    CHECK(empty.allocator() == nullptr);

    Buffer<float> b(300, a);  // 1200 bytes -> bucket 1536
    REQUIRE(b.data() != nullptr);
    CHECK(b.size() == 300);
    CHECK(b.bytes() == 1200);
    CHECK(b.allocator() == &a);
    CHECK(a.block_size(b.data()) == 1536);
    for (std::size_t i = 0; i < b.size(); ++i) b.data()[i] = static_cast<float>(i);
    float* const p = b.data();

    Buffer<float> c(std::move(b));  // move construction: c owns the block, b is empty
    CHECK(c.data() == p);
    CHECK(c.size() == 300);
    CHECK(b.data() == nullptr);  // NOLINT(bugprone-use-after-move): the moved-from state is specified
    CHECK(b.size() == 0);
    CHECK(c.data()[299] == 299.0f);
    CHECK(a.stats().blocks_in_use == 1);

    Buffer<float> d(10, a);
    float* const q = d.data();
    d = std::move(c);  // move assignment: d's old block goes to the cache, d takes c's
    CHECK(d.data() == p);
    CHECK(c.data() == nullptr);  // NOLINT(bugprone-use-after-move)
    CHECK(a.stats().blocks_in_use == 1);
    CHECK(a.stats().bytes_cached == 512);
    auto& self = d;
    d = std::move(self);  // self-move keeps the block
    CHECK(d.data() == p);
    CHECK(a.stats().blocks_in_use == 1);

    {
      Buffer<double> e(64, a);  // 512 bytes: reuses q's block
      CHECK(static_cast<void*>(e.data()) == static_cast<void*>(q));
      CHECK(a.stats().cache_hits == 1);
    }  // destroyed: back to the cache, not to the backend
    CHECK(a.stats().bytes_cached == 512);
    CHECK(a.stats().system_frees == 0);

    d.reset();
    CHECK(d.data() == nullptr);
    CHECK(a.stats().blocks_in_use == 0);
    CHECK(a.stats().bytes_cached == 512 + 1536);
    CHECK(HostBackend::held == 512 + 1536);

    Buffer<float> z(0, a);  // an empty buffer takes nothing
    CHECK(z.data() == nullptr);
    CHECK(a.stats().allocations == 3);
    CHECK_THROWS_AS(Buffer<double>(std::numeric_limits<std::size_t>::max() / 4, a), std::length_error);
  }
  check_backend_empty();
}

TEST_CASE("cuda allocator: empty_cache gives cached blocks back, never blocks in use") {
  HostBackend::reset();
  {
    Allocator a;
    Buffer<char> keep(5000, a);
    std::memset(keep.data(), 7, keep.size());
    { Buffer<char> t1(100, a), t2(100, a), t3(2000000, a); }
    const std::size_t kept = a.block_size(keep.data());
    CHECK(a.stats().blocks_cached == 3);
    CHECK(HostBackend::held == kept + 512 + 512 + Allocator::round_size(2000000));

    a.empty_cache();
    auto st = a.stats();
    CHECK(st.blocks_cached == 0);
    CHECK(st.bytes_cached == 0);
    CHECK(st.system_frees == 3);
    CHECK(HostBackend::held == kept);
    CHECK(st.bytes_in_use == kept);
    CHECK(std::count(keep.data(), keep.data() + keep.size(), 7) == 5000);

    const std::uint64_t before = HostBackend::allocs;
    Buffer<char> again(100, a);  // the cache is empty: a new system allocation
    CHECK(HostBackend::allocs == before + 1);
    CHECK_NOTHROW(a.empty_cache());  // nothing cached: nothing happens
    CHECK(a.stats().system_frees == 3);
  }
  check_backend_empty();
}

TEST_CASE("cuda allocator: empty_cache frees every block even when the backend's free throws") {
  HostBackend::reset();
  {
    Allocator a;
    { Buffer<int> b1(10, a), b2(1000, a), b3(100000, a); }
    HostBackend::fail_frees = true;
    CHECK_THROWS_WITH(a.empty_cache(), "HostBackend::free: injected failure");
    HostBackend::fail_frees = false;
    CHECK(HostBackend::frees == 3);  // all three were tried
    CHECK(a.stats().blocks_cached == 0);
  }
  check_backend_empty();
}

TEST_CASE("cuda allocator: the cache limit sends surplus blocks back to the backend") {
  HostBackend::reset();
  {
    Allocator a(2048);
    CHECK(a.max_cached_bytes() == 2048);
    void* p[3] = {a.allocate(1024), a.allocate(1024), a.allocate(1024)};
    void* big = a.allocate(4096);
    for (void* q : p) a.deallocate(q);
    a.deallocate(big);  // larger than the limit by itself
    const auto st = a.stats();
    CHECK(st.bytes_cached == 2048);
    CHECK(st.blocks_cached == 2);
    CHECK(st.system_frees == 2);
    CHECK(HostBackend::held == 2048);
  }
  check_backend_empty();
}

TEST_CASE("cuda allocator: out of memory frees the cache, retries, then throws a clear error") {
  HostBackend::reset();
  {
    Allocator a;
    HostBackend::limit = 8192;
    void* in_use = a.allocate(4096);
    a.deallocate(a.allocate(4096));  // 4096 cached: the backend holds all 8192 bytes
    REQUIRE(HostBackend::held == 8192);

    void* p = a.allocate(3000);  // 3072: fails, the cache is emptied, the retry fits
    REQUIRE(p != nullptr);
    auto st = a.stats();
    CHECK(st.cache_flushes == 1);
    CHECK(st.bytes_cached == 0);
    CHECK(st.bytes_in_use == 4096 + 3072);
    CHECK(HostBackend::held == 4096 + 3072);

    std::string message;
    try {
      (void)a.allocate(2000);  // 2048 more: does not fit, and nothing is cached to free
    } catch (const diffuse::cuda::OutOfMemory& e) {
      message = e.what();
    }
    INFO(message);
    CHECK(message.find("out of memory") != std::string::npos);
    CHECK(message.find("host test backend") != std::string::npos);
    CHECK(message.find("2048 bytes (request 2000 bytes") != std::string::npos);
    CHECK(message.find("nothing was cached; 7168 bytes in use in 2 blocks") != std::string::npos);
    st = a.stats();
    CHECK(st.bytes_in_use == 4096 + 3072);  // a failed request changes nothing
    CHECK(st.blocks_in_use == 2);
    CHECK(st.cache_flushes == 1);  // nothing cached: no flush

    // With a cached block of a different bucket, the allocator flushes it and still fails.
    a.deallocate(p);
    CHECK_THROWS_WITH(a.allocate(5000), Catch::Contains("5120 bytes (request 5000 bytes rounded up), also after "
                                                        "freeing 3072 cached bytes; 4096 bytes in use in 1 blocks"));
    CHECK(a.stats().cache_flushes == 2);
    CHECK(a.stats().bytes_cached == 0);
    // And it keeps working afterwards.
    void* q = a.allocate(4000);
    CHECK(q != nullptr);
    a.deallocate(q);
    a.deallocate(in_use);
    HostBackend::limit = std::numeric_limits<std::size_t>::max();
  }
  check_backend_empty();
}

TEST_CASE("cuda allocator: concurrent allocations never share a block") {
  HostBackend::reset();
  const std::uint64_t seed = test_seed();
  INFO("seed " << seed);
  {
    Allocator a;
    std::vector<std::string> errors(2);
    auto worker = [&](unsigned id) {
      std::mt19937_64 gen(seed + id);
      std::uniform_int_distribution<std::size_t> size(1, 20000);
      std::vector<std::pair<unsigned char*, std::size_t>> mine;
      for (int i = 0; i < 4000; ++i) {
        if (mine.size() < 8 && (gen() & 1)) {
          const std::size_t n = size(gen);
          auto* p = static_cast<unsigned char*>(a.allocate(n));
          std::memset(p, static_cast<int>(id + 1), n);
          mine.emplace_back(p, n);
        } else if (!mine.empty()) {
          auto [p, n] = mine.back();
          mine.pop_back();
          if (std::count(p, p + n, static_cast<unsigned char>(id + 1)) != static_cast<std::ptrdiff_t>(n))
            errors[id] = "a block was written by the other thread";
          a.deallocate(p);
        }
      }
      for (auto [p, n] : mine) a.deallocate(p);
    };
    std::thread t0(worker, 0u), t1(worker, 1u);
    t0.join();
    t1.join();
    CHECK(errors[0].empty());
    CHECK(errors[1].empty());
    const auto st = a.stats();
    CHECK(st.bytes_in_use == 0);
    CHECK(st.blocks_in_use == 0);
    CHECK(st.cache_hits + st.system_allocations == st.allocations);
    CHECK(st.bytes_reserved() == HostBackend::held);
  }
  check_backend_empty();
}

TEST_CASE("cuda allocator: destroying the allocator frees its cache") {
  HostBackend::reset();
  {
    Allocator a;
    { Buffer<float> b(1000, a), c(1, a); }
    CHECK(HostBackend::held > 0);
  }
  CHECK(HostBackend::frees == 2);
  check_backend_empty();
}

TEST_CASE("cuda check: the message names the library, the call, file:line and the error") {
  using diffuse::cuda::detail::check_message;
  CHECK(check_message("CUDA", "cudaMalloc(&p, n)", "src/x.cpp", 12, "cudaErrorMemoryAllocation", "out of memory") ==
        "CUDA error: cudaMalloc(&p, n) failed at src/x.cpp:12: cudaErrorMemoryAllocation (out of memory)");
  CHECK(check_message("cuDNN", "cudnnCreate(&h)", "y.cu", 3, "CUDNN_STATUS_NOT_INITIALIZED", "") ==
        "cuDNN error: cudnnCreate(&h) failed at y.cu:3: CUDNN_STATUS_NOT_INITIALIZED");
  CHECK_THROWS_WITH(diffuse::cuda::detail::check_failed("cuBLAS", "cublasCreate(&h)", "z.cpp", 7,
                                                        "CUBLAS_STATUS_NOT_INITIALIZED", "the library was not initialized"),
                    "cuBLAS error: cublasCreate(&h) failed at z.cpp:7: CUBLAS_STATUS_NOT_INITIALIZED "
                    "(the library was not initialized)");
}
