// A size-bucketed caching allocator over a raw memory backend, and a typed RAII owner of one block.
//
//   CachingAllocator<Backend>  rounds each request up to a size bucket; a freed block goes back to
//                              its bucket and serves the next request of the same bucket, so a
//                              training step, which allocates the same sizes every step, takes no
//                              new memory from the backend after the first step.
//   CachedBuffer<T, Backend>   move-only owner of n T's from a CachingAllocator; its destructor
//                              returns the block to the allocator's cache.
//   CudaMallocBackend          cudaMalloc / cudaFree (only where the CUDA runtime is available:
//                              under nvcc or with DIFFUSE_WITH_CUDA, as for check.hpp), with
//                              DeviceAllocator = CachingAllocator<CudaMallocBackend> and
//                              device_allocator(), the process-wide allocator of the current device.
//
// The logic is independent of CUDA: a backend is any type with
//
//   static void* allocate(std::size_t bytes);  // nullptr when out of memory; may throw for other errors
//   static void free(void* p);                 // may throw
//   static const char* name();                 // optional, used in error messages
//
// so tests/test_cuda_allocator.cpp checks it on the CPU with a host-memory backend.
//
// Buckets: requests of up to 1 MiB round up to a multiple of 512 bytes; larger ones to one of 8
// sizes per power of two (so at most 12.5% is wasted). A cached block is reused only for a request
// of exactly its bucket (no splitting, no larger-block reuse). When the backend is out of memory,
// the allocator frees its whole cache back to the backend and tries once more; if that fails too it
// throws diffuse::cuda::OutOfMemory with the request and the allocator's state.
//
// CUDA graphs: between open_graph_pool() and close_graph_pool() (a capture), every block handed
// out, and every block freed, joins that pool, and a freed pool block serves only that pool's later
// requests (inside the capture, where stream order makes reuse safe). After the capture the pool
// stays reserved: the graph reads and writes those addresses at each replay, so no other request
// may get them, until release_graph_pool() (the graph is gone) returns its free blocks to the cache.
//
// Thread-safe (one mutex). Not stream-aware: a block freed while work queued on a stream still
// uses it may be handed to the next request at once. That is safe when all work runs in one stream
// order (the legacy default stream and streams created with cudaStreamDefault synchronise with
// cudaMemcpy and with each other); with cudaStreamNonBlocking streams, synchronise before freeing.
#pragma once

#include <diffuse/backend/cuda/check.hpp>

#include <bit>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace diffuse::cuda {

// What a backend must provide.
template <class B>
concept AllocatorBackend = requires(std::size_t bytes, void* p) {
  { B::allocate(bytes) } -> std::convertible_to<void*>;
  B::free(p);
};

// The backend (also after the allocator emptied its cache) could not provide a block.
class OutOfMemory : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct AllocatorStats {
  std::size_t bytes_in_use = 0;       // blocks handed out and not yet freed (rounded sizes)
  std::size_t bytes_cached = 0;       // freed blocks kept for reuse
  std::size_t peak_bytes_in_use = 0;  // highest bytes_in_use since construction or reset_peak()
  std::size_t blocks_in_use = 0;
  std::size_t blocks_cached = 0;
  std::uint64_t allocations = 0;         // allocate() calls for more than 0 bytes
  std::uint64_t cache_hits = 0;          // of those, served from the cache
  std::uint64_t system_allocations = 0;  // successful Backend::allocate calls
  std::uint64_t system_frees = 0;        // Backend::free calls
  std::uint64_t cache_flushes = 0;       // the cache was emptied to retry a failed Backend::allocate
  std::size_t bytes_graph_reserved = 0;  // freed blocks kept for CUDA graphs' pools (not in bytes_cached)
  // What the backend holds for this allocator: in use + cached.
  std::size_t bytes_reserved() const { return bytes_in_use + bytes_cached; }
};

template <AllocatorBackend Backend>
class CachingAllocator {
 public:
  static constexpr std::size_t kGranularity = 512;         // small requests: multiples of this
  static constexpr std::size_t kSmallLimit = 1u << 20;     // up to 1 MiB
  static constexpr unsigned kBucketsPerDoubling = 8;       // above it
  static constexpr std::size_t kMaxRequest = std::size_t(1) << (std::numeric_limits<std::size_t>::digits - 2);

  // max_cached_bytes: a freed block that would take the cache above this goes back to the backend.
  explicit CachingAllocator(std::size_t max_cached_bytes = std::numeric_limits<std::size_t>::max())
      : max_cached_(max_cached_bytes) {}
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;
  // Frees the cache and the graph pools' free blocks (graphs must not outlive the allocator).
  // Blocks still in use are not freed: their owners must not outlive the allocator.
  ~CachingAllocator() {
    try {
      while (!pool_free_.empty()) release_graph_pool(pool_free_.begin()->first);
      empty_cache();
    } catch (...) {  // a failing Backend::free during destruction: nothing left to do
    }
  }

  static const char* backend_name() {
    if constexpr (requires { Backend::name(); })
      return Backend::name();
    else
      return "backend";
  }

  // The bucket a request of `bytes` lands in (0 for 0).
  static std::size_t round_size(std::size_t bytes) {
    if (bytes == 0) return 0;
    if (bytes > kMaxRequest)
      throw OutOfMemory(std::string("diffuse::cuda::CachingAllocator: request of ") + std::to_string(bytes) +
                        " bytes is larger than any " + backend_name() + " block");
    if (bytes <= kSmallLimit) return (bytes + kGranularity - 1) / kGranularity * kGranularity;
    const unsigned log2 = static_cast<unsigned>(std::bit_width(bytes)) - 1;  // 2^log2 <= bytes
    const std::size_t step = std::size_t(1) << (log2 - std::countr_zero(kBucketsPerDoubling));
    return (bytes + step - 1) / step * step;
  }

  // A block of at least `bytes` bytes (nullptr for 0 bytes), aligned as the backend aligns.
  void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    const std::size_t size = round_size(bytes);
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.allocations;
    if (open_pool_) {  // a capture: the pool's own freed blocks first
      auto& pf = pool_free_[open_pool_];
      if (auto it = pf.find(size); it != pf.end()) {
        void* p = it->second.back();
        it->second.pop_back();
        if (it->second.empty()) pf.erase(it);
        stats_.bytes_graph_reserved -= size;
        ++stats_.cache_hits;
        track_locked(p, size);
        return p;
      }
    }
    if (auto it = free_.find(size); it != free_.end()) {
      void* p = it->second.back();
      it->second.pop_back();
      if (it->second.empty()) free_.erase(it);
      stats_.bytes_cached -= size;
      --stats_.blocks_cached;
      ++stats_.cache_hits;
      track_locked(p, size);
      return p;
    }
    void* p = Backend::allocate(size);
    const std::size_t flushed = p ? 0 : stats_.bytes_cached;
    if (!p && stats_.blocks_cached > 0) {
      ++stats_.cache_flushes;
      release_cache_locked();
      p = Backend::allocate(size);
    }
    if (!p) {
      throw OutOfMemory(std::string("diffuse::cuda::CachingAllocator: out of memory: ") + backend_name() +
                        " could not allocate " + std::to_string(size) + " bytes (request " + std::to_string(bytes) +
                        " bytes rounded up), " +
                        (flushed ? "also after freeing " + std::to_string(flushed) + " cached bytes; "
                                 : std::string("and nothing was cached; ")) +
                        std::to_string(stats_.bytes_in_use) + " bytes in use in " + std::to_string(stats_.blocks_in_use) +
                        " blocks, peak " + std::to_string(stats_.peak_bytes_in_use));
    }
    ++stats_.system_allocations;
    try {
      track_locked(p, size);
    } catch (...) {  // bookkeeping failed (std::bad_alloc): give the block back
      Backend::free(p);
      ++stats_.system_frees;
      throw;
    }
    return p;
  }

  // Returns a block from allocate() to the cache (nullptr: nothing). Throws std::invalid_argument
  // for a pointer this allocator did not hand out or that was already freed.
  void deallocate(void* p) {
    if (!p) return;
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = in_use_.find(p);
    if (it == in_use_.end())
      throw std::invalid_argument("diffuse::cuda::CachingAllocator::deallocate: pointer was not allocated here "
                                  "or was already freed");
    const std::size_t size = it->second;
    in_use_.erase(it);
    stats_.bytes_in_use -= size;
    --stats_.blocks_in_use;
    std::uint64_t pool = 0;
    if (const auto t = pool_of_.find(p); t != pool_of_.end()) pool = t->second;
    else if (open_pool_) pool = pool_of_[p] = open_pool_;  // made before the capture, freed inside it
    if (pool) {
      pool_free_[pool][size].push_back(p);
      stats_.bytes_graph_reserved += size;
      return;
    }
    if (size > max_cached_ || stats_.bytes_cached > max_cached_ - size) {
      ++stats_.system_frees;
      Backend::free(p);
      return;
    }
    try {
      free_[size].push_back(p);
    } catch (...) {  // no memory for the bookkeeping: free the block instead of caching it
      ++stats_.system_frees;
      Backend::free(p);
      return;
    }
    stats_.bytes_cached += size;
    ++stats_.blocks_cached;
  }

  // Frees every cached block to the backend (blocks in use are untouched). If a Backend::free
  // throws, the remaining blocks are still freed and the first exception is rethrown.
  void empty_cache() {
    std::lock_guard<std::mutex> lock(mu_);
    release_cache_locked();
  }

  // A capture begins: blocks handed out or freed from now on join a new pool (its id, never 0).
  std::uint64_t open_graph_pool() {
    std::lock_guard<std::mutex> lock(mu_);
    if (open_pool_) throw std::logic_error("diffuse::cuda::CachingAllocator: a graph pool is already open");
    open_pool_ = ++last_pool_;
    return open_pool_;
  }
  // The capture ended (or failed): the pool keeps its blocks, but new ones no longer join it.
  void close_graph_pool() {
    std::lock_guard<std::mutex> lock(mu_);
    open_pool_ = 0;
  }
  // The graph is gone (the device is past its last replay): the pool's freed blocks go back to
  // the cache, its blocks still in use to the cache when freed.
  void release_graph_pool(std::uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    if (id == open_pool_) open_pool_ = 0;
    if (const auto it = pool_free_.find(id); it != pool_free_.end()) {
      for (auto& [size, blocks] : it->second)
        for (void* p : blocks) {
          pool_of_.erase(p);
          stats_.bytes_graph_reserved -= size;
          free_[size].push_back(p);
          stats_.bytes_cached += size;
          ++stats_.blocks_cached;
        }
      pool_free_.erase(it);
    }
    for (auto it = pool_of_.begin(); it != pool_of_.end();)
      it = it->second == id ? pool_of_.erase(it) : std::next(it);
  }

  AllocatorStats stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }
  void reset_peak() {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.peak_bytes_in_use = stats_.bytes_in_use;
  }
  // The bucket size of a block in use; throws std::invalid_argument for any other pointer.
  std::size_t block_size(const void* p) const {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = in_use_.find(const_cast<void*>(p));
    if (it == in_use_.end()) throw std::invalid_argument("diffuse::cuda::CachingAllocator::block_size: unknown pointer");
    return it->second;
  }
  std::size_t max_cached_bytes() const { return max_cached_; }

 private:
  void track_locked(void* p, std::size_t size) {
    if (open_pool_) pool_of_[p] = open_pool_;
    in_use_.emplace(p, size);
    stats_.bytes_in_use += size;
    ++stats_.blocks_in_use;
    if (stats_.bytes_in_use > stats_.peak_bytes_in_use) stats_.peak_bytes_in_use = stats_.bytes_in_use;
  }
  void release_cache_locked() {
    std::exception_ptr first;
    for (auto& [size, blocks] : free_) {
      for (void* p : blocks) {
        ++stats_.system_frees;
        try {
          Backend::free(p);
        } catch (...) {
          if (!first) first = std::current_exception();
        }
      }
    }
    free_.clear();
    stats_.bytes_cached = 0;
    stats_.blocks_cached = 0;
    if (first) std::rethrow_exception(first);
  }

  mutable std::mutex mu_;
  std::size_t max_cached_;
  std::unordered_map<void*, std::size_t> in_use_;  // block -> bucket size
  std::map<std::size_t, std::vector<void*>> free_;  // bucket size -> cached blocks (reused last in, first out)
  // CUDA graphs' pools: the pool of each block that belongs to one, each pool's freed blocks.
  std::uint64_t open_pool_ = 0, last_pool_ = 0;
  std::unordered_map<void*, std::uint64_t> pool_of_;
  std::map<std::uint64_t, std::map<std::size_t, std::vector<void*>>> pool_free_;
  AllocatorStats stats_;
};

// Move-only owner of n elements of T in one block of a CachingAllocator<Backend>. The memory is
// not initialised (T must be trivially copyable: no constructor or destructor runs on it). The
// allocator must outlive the buffer.
template <class T, AllocatorBackend Backend>
class CachedBuffer {
  static_assert(std::is_trivially_copyable_v<T>, "CachedBuffer holds raw device memory: T must be trivially copyable");

 public:
  using value_type = T;
  using allocator_type = CachingAllocator<Backend>;

  CachedBuffer() noexcept = default;
  CachedBuffer(std::size_t n, allocator_type& allocator) : alloc_(&allocator) {
    if (n > std::numeric_limits<std::size_t>::max() / sizeof(T))
      throw std::length_error("diffuse::cuda::CachedBuffer: " + std::to_string(n) + " elements do not fit in size_t bytes");
    p_ = static_cast<T*>(allocator.allocate(n * sizeof(T)));
    n_ = n;
  }
  CachedBuffer(const CachedBuffer&) = delete;
  CachedBuffer& operator=(const CachedBuffer&) = delete;
  CachedBuffer(CachedBuffer&& o) noexcept
      : alloc_(std::exchange(o.alloc_, nullptr)), p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  CachedBuffer& operator=(CachedBuffer&& o) noexcept {
    if (this != &o) {
      reset_noexcept();
      alloc_ = std::exchange(o.alloc_, nullptr);
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  ~CachedBuffer() { reset_noexcept(); }

  // Returns the block to the allocator now; the buffer becomes empty.
  void reset() {
    T* p = std::exchange(p_, nullptr);
    n_ = 0;
    if (p) alloc_->deallocate(p);
  }

  T* data() noexcept { return p_; }
  const T* data() const noexcept { return p_; }
  std::size_t size() const noexcept { return n_; }
  std::size_t bytes() const noexcept { return n_ * sizeof(T); }
  bool empty() const noexcept { return n_ == 0; }
  allocator_type* allocator() const noexcept { return alloc_; }

 private:
  void reset_noexcept() noexcept {
    try {
      reset();
    } catch (...) {  // only a failing Backend::free (cache limit reached) can throw here; the block is lost
    }
  }

  allocator_type* alloc_ = nullptr;
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

#if DIFFUSE_HAVE_CUDA_RUNTIME
// cudaMalloc / cudaFree: device memory of the current device (never managed memory).
struct CudaMallocBackend {
  static const char* name() { return "cudaMalloc"; }
  static void* allocate(std::size_t bytes) {
    void* p = nullptr;
    // cudaMalloc is not a stream operation: legal while this thread captures a graph only in the
    // relaxed mode (the pool keeps the block for the graph, allocator above).
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    DIFFUSE_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    const cudaError_t e = cudaMalloc(&p, bytes);
    DIFFUSE_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    if (e == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();  // not a sticky error: clear it, the allocator frees its cache and retries
      return nullptr;
    }
    detail::check_cuda(e, "cudaMalloc(&p, bytes)", __FILE__, __LINE__);
    return p;
  }
  static void free(void* p) { DIFFUSE_CUDA_CHECK(cudaFree(p)); }
};

using DeviceAllocator = CachingAllocator<CudaMallocBackend>;

// The process-wide caching allocator of the current CUDA device (one per device, made on first
// use). Never destroyed: the CUDA runtime may be shut down before static destructors run, and the
// driver releases device memory at process exit anyway.
inline DeviceAllocator& device_allocator() {
  int device = 0;
  DIFFUSE_CUDA_CHECK(cudaGetDevice(&device));
  static std::mutex mu;
  static auto* const allocators = new std::map<int, std::unique_ptr<DeviceAllocator>>();
  std::lock_guard<std::mutex> lock(mu);
  std::unique_ptr<DeviceAllocator>& a = (*allocators)[device];
  if (!a) a = std::make_unique<DeviceAllocator>();
  return *a;
}
#endif

}  // namespace diffuse::cuda
