// Tensor<T>: a shape plus a handle to contiguous, 64-byte aligned storage.
//
// Copying a Tensor copies the handle (both refer to the same numbers, as in
// PyTorch); `clone()` is the only way to copy the data, so deep copies are
// always visible in the code. Storage carries a device tag; only the CPU
// exists in this header (the CUDA backend adds its own storage).
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
#include <vector>

#include "detail/host_cache.hpp"
#include "rng.hpp"

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

template <class T>
class Storage {
 public:
  Storage(size_t n, Device dev) : n_(n), device_(dev) {
    if (dev != Device::CPU) throw std::runtime_error("diffuse: this build has no CUDA storage");
    data_ = static_cast<T*>(detail::HostCache::instance().allocate(n * sizeof(T)));
  }
  ~Storage() { detail::HostCache::instance().deallocate(data_, n_ * sizeof(T)); }
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return n_; }
  Device device() const { return device_; }

 private:
  T* data_ = nullptr;
  size_t n_ = 0;
  Device device_ = Device::CPU;
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

  static Tensor zeros(Shape shape) { return full(std::move(shape), T(0)); }
  static Tensor ones(Shape shape) { return full(std::move(shape), T(1)); }
  static Tensor full(Shape shape, T v) {
    Tensor t(std::move(shape));
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
  static Tensor randn(Shape shape, Generator& g) {
    Tensor t(std::move(shape));
    g.normal(t.data(), t.size());
    return t;
  }
  static Tensor rand(Shape shape, Generator& g) {
    Tensor t(std::move(shape));
    g.uniform(t.data(), t.size());
    return t;
  }

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
    if (size()) std::memcpy(t.data(), data(), size() * sizeof(T));
    return t;
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
  void fill(T v) { std::fill(begin(), end(), v); }
  void zero() { fill(T(0)); }
  void copy_from(const Tensor& o) {
    if (o.shape_ != shape_)
      throw std::invalid_argument("diffuse: copy_from " + shape_str(o.shape_) + " into " + shape_str(shape_));
    if (size()) std::memcpy(data(), o.data(), size() * sizeof(T));
  }
  template <class U>
  Tensor<U> to() const {
    Tensor<U> t(shape_);
    for (size_t i = 0; i < size(); ++i) t[i] = static_cast<U>((*this)[i]);
    return t;
  }

 private:
  std::shared_ptr<Storage<T>> storage_;
  Shape shape_;
};

}  // namespace diffuse
