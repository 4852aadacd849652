// HostCache: the process-wide host allocator behind Tensor storage and the
// GEMM pack buffers. It keeps freed blocks by size, so a training step, which
// allocates the same sizes every step, reuses them instead of taking fresh
// (page-faulting) memory from the system.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <vector>

namespace diffuse::detail {

class HostCache {
 public:
  static HostCache& instance() {
    static HostCache c;
    return c;
  }
  void* allocate(size_t bytes) {
    if (bytes == 0) bytes = 64;
    bytes = (bytes + 63) & ~size_t(63);
    {
      std::lock_guard<std::mutex> lk(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_bytes_ -= bytes;
        return p;
      }
    }
    void* p = std::aligned_alloc(64, bytes);
    if (!p) throw std::bad_alloc();
    system_allocations_.fetch_add(1, std::memory_order_relaxed);
    return p;
  }
  // Blocks that came from the system rather than the cache, since start: a
  // steady training step should add none (tests/test_unet.cpp checks).
  uint64_t system_allocations() const { return system_allocations_.load(std::memory_order_relaxed); }
  void deallocate(void* p, size_t bytes) {
    if (!p) return;
    if (bytes == 0) bytes = 64;
    bytes = (bytes + 63) & ~size_t(63);
    std::lock_guard<std::mutex> lk(mu_);
    if (cached_bytes_ + bytes > kMaxCached) {
      std::free(p);
      return;
    }
    free_[bytes].push_back(p);
    cached_bytes_ += bytes;
  }
  // Return every cached block to the system.
  void release() {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& [sz, v] : free_)
      for (void* p : v) std::free(p);
    free_.clear();
    cached_bytes_ = 0;
  }
  ~HostCache() { release(); }

 private:
  static constexpr size_t kMaxCached = size_t(1) << 31;  // 2 GiB
  std::mutex mu_;
  std::map<size_t, std::vector<void*>> free_;
  size_t cached_bytes_ = 0;
  std::atomic<uint64_t> system_allocations_{0};
};

}  // namespace diffuse::detail
