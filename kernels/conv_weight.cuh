// Convolution weight layouts on the device: the PyTorch layout OIHW = [O, C, kh, kw] (checkpoints,
// the CPU backend) <-> OHWI = [O, kh, kw, C] (cuDNN's NHWC filter format, "KRSC", used by
// include/diffuse/backend/cuda/conv.hpp). A pure permutation: any element type, exact.
// The host versions are diffuse::cuda::conv_weight_*_host in conv.hpp.
#pragma once

#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace diffuse::kernels {

// Grid-stride over the destination (coalesced writes; the reads gather with stride C or taps).
// to_ohwi: dst[o][t][c] = src[o][c][t], else dst[o][c][t] = src[o][t][c]; t = ky * kw + kx.
template <class T>
__global__ void conv_weight_permute_kernel(const T* __restrict__ src, T* __restrict__ dst, std::int64_t O,
                                           std::int64_t C, std::int64_t taps, bool to_ohwi) {
  const std::int64_t n = O * C * taps, stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const std::int64_t o = i / (C * taps), r = i % (C * taps);
    if (to_ohwi) {
      const std::int64_t t = r / C, c = r % C;
      dst[i] = src[(o * C + c) * taps + t];
    } else {
      const std::int64_t c = r / taps, t = r % taps;
      dst[i] = src[(o * taps + t) * C + c];
    }
  }
}

namespace detail {
template <class T>
inline void conv_weight_permute(const T* src, T* dst, std::int64_t O, std::int64_t C, std::int64_t kh, std::int64_t kw,
                                bool to_ohwi, cuda::stream_t stream, unsigned block, unsigned max_blocks,
                                const char* name) {
  if (O < 0 || C < 0 || kh < 0 || kw < 0) throw std::invalid_argument(std::string(name) + ": negative size");
  if (block == 0 || block > 1024 || max_blocks == 0)
    throw std::invalid_argument(std::string(name) + ": block must be in [1, 1024] and max_blocks at least 1");
  const std::int64_t n = O * C * kh * kw;
  if (n == 0) return;  // an empty grid is an invalid launch
  if (src == dst) throw std::invalid_argument(std::string(name) + ": src and dst must not overlap");
  const std::int64_t blocks = std::min<std::int64_t>((n + block - 1) / block, max_blocks);
  cuda::launch(conv_weight_permute_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(block), 0, stream, src, dst, O,
               C, kh * kw, to_ohwi);
}
}  // namespace detail

// ohwi [O, kh, kw, C] = the weight oihw [O, C, kh, kw] (device pointers, not overlapping).
template <class T>
inline void conv_weight_oihw_to_ohwi(const T* oihw, T* ohwi, std::int64_t O, std::int64_t C, std::int64_t kh,
                                     std::int64_t kw, cuda::stream_t stream = {}, unsigned block = 256,
                                     unsigned max_blocks = 65535) {
  detail::conv_weight_permute(oihw, ohwi, O, C, kh, kw, true, stream, block, max_blocks, "conv_weight_oihw_to_ohwi");
}

// oihw [O, C, kh, kw] = the weight ohwi [O, kh, kw, C] (device pointers, not overlapping).
template <class T>
inline void conv_weight_ohwi_to_oihw(const T* ohwi, T* oihw, std::int64_t O, std::int64_t C, std::int64_t kh,
                                     std::int64_t kw, cuda::stream_t stream = {}, unsigned block = 256,
                                     unsigned max_blocks = 65535) {
  detail::conv_weight_permute(ohwi, oihw, O, C, kh, kw, false, stream, block, max_blocks, "conv_weight_ohwi_to_oihw");
}

}  // namespace diffuse::kernels
