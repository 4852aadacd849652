// Device memory and streams (CUDA runtime only: under nvcc or with DIFFUSE_WITH_CUDA; elsewhere
// this header declares nothing).
//
//   diffuse::cuda::Stream s;                          // cudaStreamCreateWithFlags, destroyed with s
//   diffuse::cuda::DeviceBuffer<float> d(host);       // cudaMalloc'd (through the caching allocator)
//   d.copy_to_host(out);                              // or d.to_host(), or the _async forms on s
//
// DeviceBuffer<T> is move-only; its memory comes from device_allocator() (the current device's
// CachingAllocator, see allocator.hpp) unless another DeviceAllocator is passed, and goes back to
// that allocator's cache when the buffer is destroyed. Never managed (unified) memory. Every CUDA
// call is checked (check.hpp); a failure throws std::runtime_error naming the call, file and line.
//
// Synchronous copies use cudaMemcpy: they wait for earlier work on the legacy default stream and
// on blocking streams (Stream's default), and a sticky error of an earlier kernel surfaces there.
// The _async copies are queued on a stream; the host memory must stay valid (and, for
// copy_to_host_async, unread) until the stream has reached the copy. With pageable host memory
// the runtime stages the copy, so it overlaps little; pinned memory (cudaMallocHost) overlaps.
#pragma once

#include <diffuse/backend/cuda/allocator.hpp>
#include <diffuse/backend/cuda/check.hpp>

#if DIFFUSE_HAVE_CUDA_RUNTIME

#include <cstddef>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::cuda {

// An owned CUDA stream. flags: cudaStreamDefault (synchronises with the legacy default stream,
// the safe choice with the caching allocator) or cudaStreamNonBlocking.
class Stream {
 public:
  explicit Stream(unsigned flags = cudaStreamDefault) { DIFFUSE_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, flags)); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  Stream(Stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
  Stream& operator=(Stream&& o) noexcept {
    if (this != &o) {
      if (s_) (void)cudaStreamDestroy(s_);
      s_ = std::exchange(o.s_, nullptr);
    }
    return *this;
  }
  // A destructor cannot throw: use destroy() to see an error.
  ~Stream() {
    if (s_) (void)cudaStreamDestroy(s_);
  }

  cudaStream_t get() const noexcept { return s_; }
  operator cudaStream_t() const noexcept { return s_; }  // pass a Stream wherever a cudaStream_t goes

  // Waits for all work queued on the stream; reports an error of that work.
  void synchronize() const { DIFFUSE_CUDA_CHECK(cudaStreamSynchronize(s_)); }
  // Destroys the stream now (work already queued still completes), checked.
  void destroy() {
    cudaStream_t s = std::exchange(s_, nullptr);
    if (s) DIFFUSE_CUDA_CHECK(cudaStreamDestroy(s));
  }

 private:
  cudaStream_t s_ = nullptr;
};

template <class T>
class DeviceBuffer {
 public:
  using value_type = T;

  DeviceBuffer() noexcept = default;
  // n uninitialised elements on the current device.
  explicit DeviceBuffer(std::size_t n, DeviceAllocator& allocator = device_allocator()) : buf_(n, allocator) {}
  // A copy of `host` on the current device (synchronous).
  explicit DeviceBuffer(std::span<const T> host, DeviceAllocator& allocator = device_allocator())
      : buf_(host.size(), allocator) {
    copy_from_host(host);
  }
  explicit DeviceBuffer(const std::vector<T>& host, DeviceAllocator& allocator = device_allocator())
      : DeviceBuffer(std::span<const T>(host), allocator) {}
  DeviceBuffer(DeviceBuffer&&) noexcept = default;
  DeviceBuffer& operator=(DeviceBuffer&&) noexcept = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* data() noexcept { return buf_.data(); }
  const T* data() const noexcept { return buf_.data(); }
  std::size_t size() const noexcept { return buf_.size(); }
  std::size_t bytes() const noexcept { return buf_.bytes(); }
  bool empty() const noexcept { return buf_.empty(); }
  DeviceAllocator* allocator() const noexcept { return buf_.allocator(); }
  // Returns the memory to the allocator's cache now.
  void reset() { buf_.reset(); }

  // Whole-buffer copies: the host side must have exactly size() elements.
  void copy_from_host(std::span<const T> src) {
    check_size(src.size(), "copy_from_host");
    if (bytes()) DIFFUSE_CUDA_CHECK(cudaMemcpy(data(), src.data(), bytes(), cudaMemcpyHostToDevice));
  }
  void copy_to_host(std::span<T> dst) const {
    check_size(dst.size(), "copy_to_host");
    if (bytes()) DIFFUSE_CUDA_CHECK(cudaMemcpy(dst.data(), data(), bytes(), cudaMemcpyDeviceToHost));
  }
  std::vector<T> to_host() const {
    std::vector<T> out(size());
    copy_to_host(out);
    return out;
  }
  void copy_from_host_async(std::span<const T> src, cudaStream_t stream) {
    check_size(src.size(), "copy_from_host_async");
    if (bytes()) DIFFUSE_CUDA_CHECK(cudaMemcpyAsync(data(), src.data(), bytes(), cudaMemcpyHostToDevice, stream));
  }
  void copy_to_host_async(std::span<T> dst, cudaStream_t stream) const {
    check_size(dst.size(), "copy_to_host_async");
    if (bytes()) DIFFUSE_CUDA_CHECK(cudaMemcpyAsync(dst.data(), data(), bytes(), cudaMemcpyDeviceToHost, stream));
  }
  // Sets every byte to `value` (e.g. 0), queued on `stream`.
  void fill_bytes_async(int value, cudaStream_t stream) {
    if (bytes()) DIFFUSE_CUDA_CHECK(cudaMemsetAsync(data(), value, bytes(), stream));
  }

 private:
  void check_size(std::size_t host_size, const char* what) const {
    if (host_size != size())
      throw std::invalid_argument(std::string("diffuse::cuda::DeviceBuffer::") + what + ": host side has " +
                                  std::to_string(host_size) + " elements, the buffer " + std::to_string(size()));
  }

  CachedBuffer<T, CudaMallocBackend> buf_;
};

}  // namespace diffuse::cuda

#endif  // DIFFUSE_HAVE_CUDA_RUNTIME
