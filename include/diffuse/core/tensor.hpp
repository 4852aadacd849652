// Tensor<T>: a shape plus a handle to contiguous, 64-byte aligned storage.
//
// Copying a Tensor copies the handle (both refer to the same numbers, as in
// PyTorch); `clone()` is the only way to copy the data, so deep copies are
// always visible in the code.
//
// Storage lives on a device: the CPU, or a CUDA device. CUDA storage comes from
// the DeviceMemory that the CUDA backend registers (src/cuda_backend.cu, linked
// through the diffuse::cuda target), or host memory posing as device memory
// under the CPU emulation of the CUDA backend (diffuse::EmulatedCuda, for
// tests). Without either, creating a CUDA tensor throws. data() of a CUDA
// tensor is a device pointer, for kernels; element access needs a CPU tensor:
// move with to(Device::CPU) / to(Device::CUDA), .cpu() / .cuda().
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <diffuse/backend/cuda.hpp>
#include <diffuse/core/config.hpp>
#include <diffuse/backend/cpu/host_cache.hpp>
#include <diffuse/core/rng.hpp>

namespace diffuse {

enum class Device : uint8_t { CPU = 0, CUDA = 1 };

inline const char* device_name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }

using Shape = std::vector<int64_t>;

inline int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

inline std::string shape_str(const Shape& s) {
  std::ostringstream o;
  o << '[';
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << ']';
  return o.str();
}

// How CUDA storage is allocated and copied (see the top of this file). A copy to the host
// waits for the device and returns with the data there; a copy from the host has taken the
// host memory when it returns (it may be reused at once) and is ordered before any device work
// queued after it; a device-to-device copy is queued in order.
struct DeviceMemory {
  enum class Copy { HostToDevice, DeviceToHost, DeviceToDevice };
  const char* name;  // for messages: "CUDA runtime", "CPU emulation"
  void* (*allocate)(size_t bytes);
  void (*free)(void* p, size_t bytes) noexcept;
  void (*copy)(void* dst, const void* src, size_t bytes, Copy kind);
};

namespace detail {
inline std::atomic<const DeviceMemory*>& device_memory_slot() {
  static std::atomic<const DeviceMemory*> slot{nullptr};
  return slot;
}
}  // namespace detail

// The registered CUDA memory, or nullptr.
inline const DeviceMemory* device_memory() { return detail::device_memory_slot().load(); }
// Registers `m` (a static object) and returns the previous one. Tensors keep the
// DeviceMemory they were allocated with, so switching affects only new tensors.
inline const DeviceMemory* set_device_memory(const DeviceMemory* m) { return detail::device_memory_slot().exchange(m); }

inline const DeviceMemory& require_device_memory() {
  const DeviceMemory* m = device_memory();
  if (!m)
    throw std::runtime_error(
        "diffuse: CUDA tensors need the CUDA backend: link the diffuse::cuda target (CMake defines it when it "
        "finds nvcc), or run under diffuse::EmulatedCuda (the CPU emulation, for tests)");
  return *m;
}

template <class T>
class Storage {
 public:
  Storage(size_t n, Device dev) : n_(n), device_(dev) {
    if (dev == Device::CPU) {
      data_ = static_cast<T*>(detail::HostCache::instance().allocate(n * sizeof(T)));
    } else {
      mem_ = &require_device_memory();
      data_ = static_cast<T*>(mem_->allocate(n * sizeof(T)));
    }
  }
  ~Storage() {
    if (mem_) mem_->free(data_, n_ * sizeof(T));
    else detail::HostCache::instance().deallocate(data_, n_ * sizeof(T));
  }
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return n_; }
  Device device() const { return device_; }
  const DeviceMemory* memory() const { return mem_; }  // nullptr for CPU storage

 private:
  T* data_ = nullptr;
  size_t n_ = 0;
  Device device_ = Device::CPU;
  const DeviceMemory* mem_ = nullptr;  // set for device storage: who frees it
};

template <class T>
class Tensor {
 public:
  Tensor() = default;
  // Uninitialised tensor of the given shape.
  explicit Tensor(Shape shape, Device dev = Device::CPU)
      : storage_(std::make_shared<Storage<T>>(static_cast<size_t>(shape_numel(shape)), dev)),
        shape_(std::move(shape)) {
    for (int64_t d : shape_)
      if (d < 0) throw std::invalid_argument("diffuse: negative dimension in shape " + shape_str(shape_));
  }

  static Tensor zeros(Shape shape, Device dev = Device::CPU) { return full(std::move(shape), T(0), dev); }
  static Tensor ones(Shape shape, Device dev = Device::CPU) { return full(std::move(shape), T(1), dev); }
  static Tensor full(Shape shape, T v, Device dev = Device::CPU) {
    Tensor t(std::move(shape), dev);
    t.fill(v);
    return t;
  }
  static Tensor from(const std::vector<T>& values, Shape shape) {
    if (static_cast<int64_t>(values.size()) != shape_numel(shape))
      throw std::invalid_argument("diffuse: " + std::to_string(values.size()) + " values for shape " +
                                  shape_str(shape));
    Tensor t(std::move(shape));
    std::copy(values.begin(), values.end(), t.data());
    return t;
  }
  // N(0, 1) / U(0, 1) draws from g: the same numbers on either device (rng.hpp's Philox
  // streams; a CUDA tensor is drawn on the device, float only).
  static Tensor randn(Shape shape, Generator& g, Device dev = Device::CPU) { return draw(std::move(shape), g, dev, true); }
  static Tensor rand(Shape shape, Generator& g, Device dev = Device::CPU) { return draw(std::move(shape), g, dev, false); }

  bool defined() const { return storage_ != nullptr; }
  Device device() const { return storage_ ? storage_->device() : Device::CPU; }
  const Shape& shape() const { return shape_; }
  int64_t dim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t size(int64_t i) const { return shape_.at(static_cast<size_t>(i < 0 ? i + dim() : i)); }
  size_t size() const { return static_cast<size_t>(shape_numel(shape_)); }
  int64_t numel() const { return shape_numel(shape_); }

  T* data() { return storage_ ? storage_->data() : nullptr; }
  const T* data() const { return storage_ ? storage_->data() : nullptr; }
  T* begin() { return data(); }
  T* end() { return data() + size(); }
  const T* begin() const { return data(); }
  const T* end() const { return data() + size(); }
  T& operator[](size_t i) { return data()[i]; }
  const T& operator[](size_t i) const { return data()[i]; }

  // True when both handles refer to the same storage.
  bool shares_storage(const Tensor& o) const { return storage_ == o.storage_; }

  Tensor clone() const {
    Tensor t(shape_, device());
    if (size()) copy_bytes(t.data(), t.memory(), data(), memory(), size() * sizeof(T));
    return t;
  }
  // A copy on `dev` (a clone when already there). Synchronous.
  Tensor to(Device dev) const {
    Tensor t(shape_, dev);
    if (size()) copy_bytes(t.data(), t.memory(), data(), memory(), size() * sizeof(T));
    return t;
  }
  Tensor cpu() const { return device() == Device::CPU ? *this : to(Device::CPU); }  // shares when already there
  Tensor cuda() const { return device() == Device::CUDA ? *this : to(Device::CUDA); }
  // Throws unless the tensor is on the CPU; `what` names the caller.
  void require_cpu(const char* what) const {
    if (device() != Device::CPU)
      throw std::invalid_argument(std::string("diffuse: ") + what + " needs a CPU tensor, got " + shape_str(shape_) +
                                  " on " + device_name(device()) + " (use .cpu())");
  }
  // Same numbers, another shape of the same element count (shares storage).
  Tensor reshape(Shape s) const {
    int64_t infer = -1, known = 1;
    for (size_t i = 0; i < s.size(); ++i) {
      if (s[i] == -1) {
        if (infer >= 0) throw std::invalid_argument("diffuse: reshape with two -1");
        infer = static_cast<int64_t>(i);
      } else {
        known *= s[i];
      }
    }
    if (infer >= 0) s[static_cast<size_t>(infer)] = known ? numel() / known : 0;
    if (shape_numel(s) != numel())
      throw std::invalid_argument("diffuse: cannot reshape " + shape_str(shape_) + " to " + shape_str(s));
    Tensor t = *this;
    t.shape_ = std::move(s);
    return t;
  }
  void fill(T v) {
    if (device() == Device::CPU) {
      std::fill(begin(), end(), v);
    } else if constexpr (std::is_same_v<T, float>) {
      if (size()) backend::require_cuda("fill").fill(data(), numel(), v);
    } else {
      copy_from(Tensor::full(shape_, v));  // other element types: filled on the host, copied up
    }
  }
  void zero() { fill(T(0)); }
  // Copies o's numbers into this tensor's storage, across devices too.
  void copy_from(const Tensor& o) {
    if (o.shape_ != shape_)
      throw std::invalid_argument("diffuse: copy_from " + shape_str(o.shape_) + " into " + shape_str(shape_));
    if (size()) copy_bytes(data(), memory(), o.data(), o.memory(), size() * sizeof(T));
  }
  template <class U>
  Tensor<U> to() const {
    require_cpu("element type conversion");
    Tensor<U> t(shape_);
    for (size_t i = 0; i < size(); ++i) t[i] = static_cast<U>((*this)[i]);
    return t;
  }

 private:
  static Tensor draw(Shape shape, Generator& g, Device dev, bool normal) {
    Tensor t(std::move(shape), dev);
    if (dev == Device::CPU) {
      if (normal) g.normal(t.data(), t.size());
      else g.uniform(t.data(), t.size());
    } else if constexpr (std::is_same_v<T, float>) {
      backend::CudaBackend& be = backend::require_cuda(normal ? "randn" : "rand");
      const DrawPos at = g.take(t.size());
      if (normal) be.normal(t.data(), t.numel(), g.seed, at.offset, at.first);
      else be.uniform(t.data(), t.numel(), g.seed, at.offset, at.first);
    } else {
      t.copy_from(draw(t.shape_, g, Device::CPU, normal));
    }
    return t;
  }
  const DeviceMemory* memory() const { return storage_ ? storage_->memory() : nullptr; }
  // Between any two storages; the device side's DeviceMemory does the copy.
  static void copy_bytes(void* dst, const DeviceMemory* dm, const void* src, const DeviceMemory* sm, size_t bytes) {
    if (!dm && !sm) {
      std::memcpy(dst, src, bytes);
      return;
    }
    using C = DeviceMemory::Copy;
    const C kind = !dm ? C::DeviceToHost : !sm ? C::HostToDevice : C::DeviceToDevice;
    (dm ? dm : sm)->copy(dst, src, bytes, kind);
  }

  std::shared_ptr<Storage<T>> storage_;
  Shape shape_;
};

}  // namespace diffuse
