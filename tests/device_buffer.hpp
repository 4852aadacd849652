// Device memory for the kernel tests, the same interface under nvcc (cudaMalloc) and in the CPU
// emulation (host memory). New buffers hold 0xFF bytes (NaN as float), so an output element that a
// kernel never writes fails the comparison instead of passing as a leftover zero.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef __CUDACC__
#include <cuda_runtime.h>
#endif

namespace diffuse::testing {

#ifdef __CUDACC__
inline void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}
#endif

template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t n) : n_(n) {
#ifdef __CUDACC__
    cuda_check(cudaMalloc(reinterpret_cast<void**>(&p_), std::max<std::size_t>(n, 1) * sizeof(T)), "cudaMalloc");
    cuda_check(cudaMemset(p_, 0xFF, n * sizeof(T)), "cudaMemset");
#else
    host_.resize(n);
    if (n) std::memset(static_cast<void*>(host_.data()), 0xFF, n * sizeof(T));
    p_ = host_.data();
#endif
  }
  explicit DeviceBuffer(const std::vector<T>& values) : DeviceBuffer(values.size()) {
#ifdef __CUDACC__
    cuda_check(cudaMemcpy(p_, values.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy to device");
#else
    host_ = values;
    p_ = host_.data();
#endif
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
#ifdef __CUDACC__
    cudaFree(p_);
#endif
  }

  T* get() { return p_; }
  std::size_t size() const { return n_; }

  // Waits for the device (and reports a kernel's fault) before copying back.
  std::vector<T> to_host() const {
#ifdef __CUDACC__
    cuda_check(cudaDeviceSynchronize(), "kernel");
    std::vector<T> out(n_);
    cuda_check(cudaMemcpy(out.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy to host");
    return out;
#else
    return host_;
#endif
  }

 private:
  std::size_t n_ = 0;
  T* p_ = nullptr;
#ifndef __CUDACC__
  std::vector<T> host_;
#endif
};

}  // namespace diffuse::testing
