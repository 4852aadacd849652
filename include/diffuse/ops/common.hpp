// What the op headers share: row-major Eigen views, the thresholds below which a loop stays on
// one thread, parallel_rows (one parallel region over row blocks), shape errors, and host indices
// uploaded for the CUDA backend.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/backend/op_types.hpp>
#include <diffuse/core/autograd.hpp>

#include <diffuse/core/parallel.hpp>

namespace diffuse {

namespace detail {
template <class T>
using MatR = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using MapR = Eigen::Map<MatR<T>>;
template <class T>
using CMapR = Eigen::Map<const MatR<T>>;

inline constexpr size_t kParallelMin = size_t(1) << 15;  // below this, threads cost more than they give

[[noreturn]] inline void shape_error(const char* op, const Shape& a, const Shape& b) {
  throw std::invalid_argument(std::string("diffuse: ") + op + ": incompatible shapes " + shape_str(a) + " and " +
                              shape_str(b));
}

// Below this much work (in flops, or ~flops for elementwise passes) one thread
// does it all. The pool's workers spin briefly between regions, so a fork/join
// costs a few microseconds; measured on the toy train step (2 cores), thresholds
// from 3e4 to 1e5 were equally good and 4e6 was 15-20% slower.
inline constexpr double kParallelMinFlops = 1e5;

template <class F>
inline void parallel_rows(int64_t m, double flops, F&& f) {
  const int nt = flops >= kParallelMinFlops ? loop_threads(m / 16, true) : 1;
  if (nt <= 1) {
    f(int64_t(0), m);
    return;
  }
  parallel_region(nt, [&](int64_t id, int64_t n) {
    // Chunks are multiples of 8 rows so that every thread's block starts aligned.
    const int64_t chunk = ((m + n - 1) / n + 7) / 8 * 8;
    const int64_t r0 = std::min(m, id * chunk), r1 = std::min(m, r0 + chunk);
    if (r1 > r0) f(r0, r1);
  });
}

template <class T>
using RowVec = Eigen::Matrix<T, 1, Eigen::Dynamic>;

// Host indices as a device int32 tensor (an asynchronous upload: no wait for the device). Copied
// straight from idx's own memory, so that inside a captured CUDA graph an input named to the
// capture (CudaGraphCapture::input: the timesteps, the labels) is recognised by its address.
inline Tensor<int32_t> device_indices(const std::vector<int32_t>& idx) {
  Tensor<int32_t> d({static_cast<int64_t>(idx.size())}, Device::CUDA);
  if (!idx.empty()) require_device_memory().copy(d.data(), idx.data(), idx.size() * sizeof(int32_t), DeviceMemory::Copy::HostToDevice);
  return d;
}

}  // namespace detail

}  // namespace diffuse
