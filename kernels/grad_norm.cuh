// Gradient-norm clipping over all parameters (torch.nn.utils.clip_grad_norm_, the CPU backend's
// clip_grad_norm in optim/adam.hpp, clip_grad_norm.hpp), on the chunk table of the Adam kernel (adam.cuh):
//
//   grad_sq_partials   one double per chunk: the sum of g^2 over the chunk, in double as the CPU
//                      does; the host adds the partials (few hundred) in chunk order
//   grad_scale         g = T(double(g) * c) for every gradient element (the CPU's rounding)
//   grad_zero          g = 0 for every gradient element (zero_grad: one launch for the model)
//
// and, for a training loop that never waits for the device (optim/step_record.hpp):
//
//   step_record_finish one thread adds the partials in chunk order (the host's sum) and records
//                      the step (loss, norm, clipping factor, a non-finite step) in a StepRecord
//   grad_scale_recorded  grad_scale by the record's factor, read on the device (nothing when 1)
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

// g = T(double(g) c) over every chunk: the body of grad_scale and grad_scale_recorded.
template <class T>
__device__ __forceinline__ void scale_grad_chunks(const AdamTensor<T>* __restrict__ tensors,
                                                  const AdamChunk* __restrict__ chunks, std::int64_t num_chunks,
                                                  double c) {
  for (std::int64_t k = blockIdx.x; k < num_chunks; k += gridDim.x) {
    const AdamChunk ch = chunks[k];
    T* g = const_cast<T*>(tensors[ch.tensor].g) + ch.begin;  // the gradients are the model's, writable
    for (std::int64_t i = threadIdx.x; i < ch.count; i += blockDim.x) g[i] = static_cast<T>(static_cast<double>(g[i]) * c);
  }
}

template <class T>
__global__ void grad_scale_kernel(const AdamTensor<T>* __restrict__ tensors, const AdamChunk* __restrict__ chunks,
                                  std::int64_t num_chunks, double c) {
  scale_grad_chunks(tensors, chunks, num_chunks, c);
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

// The record's step from the partials: the same additions in the same order as the host's sum.
// (A template, as every kernel here: a header's kernel must not be a non-inline definition.)
template <class T>
__global__ void step_record_finish_kernel(const double* __restrict__ partials, std::int64_t num_chunks,
                                          const T* __restrict__ loss, double max_norm, double step,
                                          StepRecord* __restrict__ record) {
  double sq = 0;  // one thread
  for (std::int64_t k = 0; k < num_chunks; ++k) sq += partials[k];
  step_record_add(*record, sq, static_cast<double>(*loss), max_norm, step);
}

template <class T>
__global__ void grad_scale_recorded_kernel(const AdamTensor<T>* __restrict__ tensors, const AdamChunk* __restrict__ chunks,
                                           std::int64_t num_chunks, const StepRecord* __restrict__ record) {
  const double c = record->scale;
  if (c < 1.0) scale_grad_chunks(tensors, chunks, num_chunks, c);
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

// Records one step (1-based `step`) whose partials grad_sq_partials wrote; `loss`: one float on the device.
template <class T>
inline void step_record_finish(const double* partials, std::int64_t num_chunks, const T* loss, double max_norm,
                               std::int64_t step, StepRecord* record, cuda::stream_t stream = {}) {
  if (num_chunks < 0 || !loss || !record) throw std::invalid_argument("step_record_finish: bad chunk count or null pointer");
  cuda::launch(step_record_finish_kernel<T>, dim3(1), dim3(1), 0, stream, partials, num_chunks, loss, max_norm,
               static_cast<double>(step), record);
}

// Every gradient element times record->scale when that is below 1.
template <class T>
inline void grad_scale_recorded(const AdamTensor<T>* tensors, const AdamChunk* chunks, std::int64_t num_chunks,
                                const StepRecord* record, cuda::stream_t stream = {}, unsigned max_blocks = 4096) {
  if (num_chunks < 0 || max_blocks == 0 || !record) throw std::invalid_argument("grad_scale_recorded: bad chunk count, grid or record");
  if (num_chunks == 0) return;
  cuda::launch(grad_scale_recorded_kernel<T>, dim3(static_cast<unsigned>(std::min<std::int64_t>(num_chunks, max_blocks))),
               dim3(kGradNormThreads), 0, stream, tensors, chunks, num_chunks, record);
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
