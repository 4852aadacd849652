// Gradient-norm clipping over all parameters (torch.nn.utils.clip_grad_norm_, the CPU backend's
// clip_grad_norm in optim/adam.hpp, clip_grad_norm.hpp), on the chunk table of the Adam kernel (adam.cuh):
//
//   grad_sq_partials   one double per chunk: the sum of g^2 over the chunk, in double as the CPU
//                      does; the host adds the partials (few hundred) in chunk order
//   grad_scale         g = T(double(g) * c) for every gradient element (the CPU's rounding)
//   grad_zero          g = 0 for every gradient element (zero_grad: one launch for the model)
#pragma once

#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include "kernels/adam.cuh"

#include <algorithm>
#include <cstdint>
#include <stdexcept>

namespace diffuse::kernels {

inline constexpr unsigned kGradNormThreads = 256;  // a power of two: the tree reduction halves it

template <class T>
__global__ void grad_sq_partials_kernel(const AdamTensor<T>* __restrict__ tensors, const AdamChunk* __restrict__ chunks,
                                        std::int64_t num_chunks, double* __restrict__ partials) {
  DIFFUSE_SHARED(double, red, kGradNormThreads);
  for (std::int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const AdamChunk ch = chunks[c];
    const T* g = tensors[ch.tensor].g + ch.begin;
    double s = 0.0;
    for (std::int64_t i = threadIdx.x; i < ch.count; i += blockDim.x) {
      const double v = static_cast<double>(g[i]);
      s += v * v;
    }
    red[threadIdx.x] = s;
    __syncthreads();
    for (unsigned w = blockDim.x / 2; w > 0; w >>= 1) {
      if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
      __syncthreads();
    }
    if (threadIdx.x == 0) partials[c] = red[0];
    __syncthreads();  // red is reused by the next chunk
  }
}

template <class T>
__global__ void grad_scale_kernel(const AdamTensor<T>* __restrict__ tensors, const AdamChunk* __restrict__ chunks,
                                  std::int64_t num_chunks, double c) {
  for (std::int64_t k = blockIdx.x; k < num_chunks; k += gridDim.x) {
    const AdamChunk ch = chunks[k];
    T* g = const_cast<T*>(tensors[ch.tensor].g) + ch.begin;  // the gradients are the model's, writable
    for (std::int64_t i = threadIdx.x; i < ch.count; i += blockDim.x) g[i] = static_cast<T>(static_cast<double>(g[i]) * c);
  }
}

template <class T>
__global__ void grad_zero_kernel(const AdamTensor<T>* __restrict__ tensors, const AdamChunk* __restrict__ chunks,
                                 std::int64_t num_chunks) {
  for (std::int64_t k = blockIdx.x; k < num_chunks; k += gridDim.x) {
    const AdamChunk ch = chunks[k];
    T* g = const_cast<T*>(tensors[ch.tensor].g) + ch.begin;
    for (std::int64_t i = threadIdx.x; i < ch.count; i += blockDim.x) g[i] = T(0);
  }
}

// partials[k] = sum of g^2 over chunk k (device array of num_chunks doubles).
template <class T>
inline void grad_sq_partials(const AdamTensor<T>* tensors, const AdamChunk* chunks, std::int64_t num_chunks,
                             double* partials, cuda::stream_t stream = {}, unsigned max_blocks = 4096) {
  if (num_chunks < 0 || max_blocks == 0) throw std::invalid_argument("grad_sq_partials: bad chunk count or grid");
  if (num_chunks == 0) return;
  cuda::launch(grad_sq_partials_kernel<T>, dim3(static_cast<unsigned>(std::min<std::int64_t>(num_chunks, max_blocks))),
               dim3(kGradNormThreads), 0, stream, tensors, chunks, num_chunks, partials);
}

// Every gradient element times c.
template <class T>
inline void grad_scale(const AdamTensor<T>* tensors, const AdamChunk* chunks, std::int64_t num_chunks, double c,
                       cuda::stream_t stream = {}, unsigned max_blocks = 4096) {
  if (num_chunks < 0 || max_blocks == 0) throw std::invalid_argument("grad_scale: bad chunk count or grid");
  if (num_chunks == 0) return;
  cuda::launch(grad_scale_kernel<T>, dim3(static_cast<unsigned>(std::min<std::int64_t>(num_chunks, max_blocks))),
               dim3(kGradNormThreads), 0, stream, tensors, chunks, num_chunks, c);
}

template <class T>
inline void grad_zero(const AdamTensor<T>* tensors, const AdamChunk* chunks, std::int64_t num_chunks,
                      cuda::stream_t stream = {}, unsigned max_blocks = 4096) {
  if (num_chunks < 0 || max_blocks == 0) throw std::invalid_argument("grad_zero: bad chunk count or grid");
  if (num_chunks == 0) return;
  cuda::launch(grad_zero_kernel<T>, dim3(static_cast<unsigned>(std::min<std::int64_t>(num_chunks, max_blocks))),
               dim3(kGradNormThreads), 0, stream, tensors, chunks, num_chunks);
}

}  // namespace diffuse::kernels
