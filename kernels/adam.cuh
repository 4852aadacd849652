// Adam(W) and EMA over all parameters in one launch (a "multi-tensor apply").
//
// A model has ~100-300 parameter tensors of very different sizes; one launch per tensor would
// cost a launch latency each and leave most of the GPU idle on the small ones. Instead the host
// cuts every tensor into chunks of at most `chunk` elements (plan_adam_chunks), uploads the
// tensor table and the chunk list once (they only change when the model does), and each block
// walks chunks with a grid-stride loop. Per element, the same formula and order of operations
// as the CPU backend's Adam<T>::step (torch.optim.Adam/AdamW) followed by EMA<T>::update:
//
//   AdamW:  p *= 1 - lr wd                      Adam (L2):  g += wd p
//   m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
//   p -= step_size m / (sqrt(v) / sqrt(1 - b2^t) + eps),   step_size = lr / (1 - b1^t)
//   ema = d ema + (1 - d) p                     (when the tensor has an EMA copy)
//
// The bias corrections depend on the step t and are computed on the host in double, as the CPU
// backend does (adam_step_args). With a guard (a StepRecord on the device, optim/step_record.hpp)
// the kernels do nothing once the record has seen a non-finite step: the training loop queues
// its steps without reading the loss back, and the weights stay those of the last good step.
#pragma once

#include <diffuse/backend/cuda/device.hpp>
#include <diffuse/backend/cuda/launch.hpp>
#include <diffuse/optim/step_record.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace diffuse::kernels {

// One parameter tensor, all pointers on the device. ema may be null (no EMA for this tensor).
template <class T>
struct AdamTensor {
  T* p;
  const T* g;
  T* m;
  T* v;
  T* ema;
  std::int64_t n;
};

// A piece of one tensor: elements [begin, begin + count) of tensor `tensor`.
struct AdamChunk {
  std::int32_t tensor;
  std::int32_t count;
  std::int64_t begin;
};

// The scalars of one step, rounded to T as the CPU backend rounds them.
template <class T>
struct AdamStepArgs {
  T step_size, bc2_sqrt, b1, b2, eps, lr, wd, ema_decay;
  int decoupled;                      // 1: AdamW, 0: Adam with L2 added to the gradient
  const StepRecord* guard = nullptr;  // on the device; skip the step once guard->bad_step != 0
};

// Whether a guarded step is to be skipped (read by every block: one cached load).
__device__ __forceinline__ bool step_guard_bad(const StepRecord* guard) { return guard && guard->bad_step != 0.0; }

// Step t (1-based, the value after the increment), as Adam<T>::step computes its scalars.
template <class T>
inline AdamStepArgs<T> adam_step_args(double lr, double beta1, double beta2, double eps, double weight_decay,
                                      bool decoupled, std::int64_t t, double ema_decay) {
  if (t < 1) throw std::invalid_argument("adam_step_args: the step t counts from 1");
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(t));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(t));
  return AdamStepArgs<T>{static_cast<T>(lr / bc1), static_cast<T>(std::sqrt(bc2)), static_cast<T>(beta1),
                         static_cast<T>(beta2), static_cast<T>(eps), static_cast<T>(lr),
                         static_cast<T>(weight_decay), static_cast<T>(ema_decay), decoupled ? 1 : 0};
}

// Cuts tensors of the given sizes into chunks of at most `chunk` elements, in order.
// (The default: ~2,000 chunks for a 35 M-parameter model, enough blocks to fill a large GPU.)
inline std::vector<AdamChunk> plan_adam_chunks(const std::vector<std::int64_t>& sizes, std::int32_t chunk = 16384) {
  if (chunk < 1) throw std::invalid_argument("plan_adam_chunks: chunk must be positive");
  std::vector<AdamChunk> out;
  for (std::size_t k = 0; k < sizes.size(); ++k) {
    if (sizes[k] < 0) throw std::invalid_argument("plan_adam_chunks: negative tensor size");
    for (std::int64_t b = 0; b < sizes[k]; b += chunk)
      out.push_back(AdamChunk{static_cast<std::int32_t>(k), static_cast<std::int32_t>(std::min<std::int64_t>(chunk, sizes[k] - b)), b});
  }
  return out;
}

__device__ __forceinline__ float device_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double device_sqrt(double x) { return sqrt(x); }

// One element: the CPU backend's formula and order of operations.
template <class T>
__device__ __forceinline__ void adam_ema_element(T& w, T g, T& m, T& v, T* ema, const AdamStepArgs<T>& a) {
  if (a.wd != T(0)) {
    if (a.decoupled)
      w *= T(1) - a.lr * a.wd;
    else
      g = g + a.wd * w;
  }
  m = a.b1 * m + (T(1) - a.b1) * g;
  v = a.b2 * v + (T(1) - a.b2) * (g * g);
  w -= a.step_size * m / (device_sqrt(v) / a.bc2_sqrt + a.eps);
  if (ema) *ema = a.ema_decay * *ema + (T(1) - a.ema_decay) * w;
}

// Whether a chunk's float arrays all start on 16 bytes (float4 loads and stores).
__device__ __forceinline__ bool adam_aligned16(const void* a, const void* b, const void* c, const void* d, const void* e) {
  return ((reinterpret_cast<std::uintptr_t>(a) | reinterpret_cast<std::uintptr_t>(b) | reinterpret_cast<std::uintptr_t>(c) |
           reinterpret_cast<std::uintptr_t>(d) | reinterpret_cast<std::uintptr_t>(e)) &
          15u) == 0;
}

template <class T>
__global__ void adam_ema_kernel(const AdamTensor<T>* __restrict__ tensors, const AdamChunk* __restrict__ chunks,
                                std::int64_t num_chunks, AdamStepArgs<T> a) {
  if (step_guard_bad(a.guard)) return;
  for (std::int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const AdamChunk ch = chunks[c];
    const AdamTensor<T> t = tensors[ch.tensor];
    T* p = t.p + ch.begin;
    const T* g = t.g + ch.begin;
    T* m = t.m + ch.begin;
    T* v = t.v + ch.begin;
    T* e = t.ema ? t.ema + ch.begin : nullptr;
    std::int64_t done = 0;
    if constexpr (sizeof(T) == 4) {
      // float: four elements per thread and access (memory-bound: fewer, wider transactions),
      // when every array of the chunk is 16-byte aligned; the rest one by one below.
      if (adam_aligned16(p, g, m, v, e)) {
        const std::int64_t n4 = ch.count / 4;
        for (std::int64_t i = threadIdx.x; i < n4; i += blockDim.x) {
          float4 w4 = reinterpret_cast<float4*>(p)[i], m4 = reinterpret_cast<float4*>(m)[i],
                 v4 = reinterpret_cast<float4*>(v)[i];
          const float4 g4 = reinterpret_cast<const float4*>(g)[i];
          float4 e4 = e ? reinterpret_cast<float4*>(e)[i] : float4{};
          adam_ema_element(w4.x, g4.x, m4.x, v4.x, e ? &e4.x : nullptr, a);
          adam_ema_element(w4.y, g4.y, m4.y, v4.y, e ? &e4.y : nullptr, a);
          adam_ema_element(w4.z, g4.z, m4.z, v4.z, e ? &e4.z : nullptr, a);
          adam_ema_element(w4.w, g4.w, m4.w, v4.w, e ? &e4.w : nullptr, a);
          reinterpret_cast<float4*>(p)[i] = w4;
          reinterpret_cast<float4*>(m)[i] = m4;
          reinterpret_cast<float4*>(v)[i] = v4;
          if (e) reinterpret_cast<float4*>(e)[i] = e4;
        }
        done = 4 * n4;
      }
    }
    for (std::int64_t i = done + threadIdx.x; i < ch.count; i += blockDim.x)
      adam_ema_element(p[i], g[i], m[i], v[i], e ? e + i : nullptr, a);
  }
}

// One Adam(W) + EMA step over every chunk (device arrays `tensors` and `chunks`), on `stream`.
template <class T>
inline void adam_ema_step(const AdamTensor<T>* tensors, const AdamChunk* chunks, std::int64_t num_chunks,
                          const AdamStepArgs<T>& args, cuda::stream_t stream = {}, unsigned block = 256,
                          unsigned max_blocks = 4096) {
  if (num_chunks < 0) throw std::invalid_argument("adam_ema_step: negative chunk count");
  if (block == 0 || block > 1024 || max_blocks == 0)
    throw std::invalid_argument("adam_ema_step: block must be in [1, 1024] and max_blocks at least 1");
  if (num_chunks == 0) return;
  const std::int64_t blocks = std::min<std::int64_t>(num_chunks, max_blocks);
  cuda::launch(adam_ema_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(block), 0, stream, tensors, chunks,
               num_chunks, args);
}

// ema = d ema + (1 - d) p over every chunk whose tensor has an EMA copy (EMA<T>::update alone,
// for an EMA updated apart from the optimiser step).
template <class T>
__global__ void ema_kernel(const AdamTensor<T>* __restrict__ tensors, const AdamChunk* __restrict__ chunks,
                           std::int64_t num_chunks, T decay, const StepRecord* guard) {
  if (step_guard_bad(guard)) return;
  for (std::int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const AdamChunk ch = chunks[c];
    const AdamTensor<T> t = tensors[ch.tensor];
    if (!t.ema) continue;
    const T* p = t.p + ch.begin;
    T* e = t.ema + ch.begin;
    for (std::int64_t i = threadIdx.x; i < ch.count; i += blockDim.x) e[i] = decay * e[i] + (T(1) - decay) * p[i];
  }
}

template <class T>
inline void ema_step(const AdamTensor<T>* tensors, const AdamChunk* chunks, std::int64_t num_chunks, T decay,
                     cuda::stream_t stream = {}, unsigned block = 256, unsigned max_blocks = 4096,
                     const StepRecord* guard = nullptr) {
  if (num_chunks < 0) throw std::invalid_argument("ema_step: negative chunk count");
  if (block == 0 || block > 1024 || max_blocks == 0)
    throw std::invalid_argument("ema_step: block must be in [1, 1024] and max_blocks at least 1");
  if (num_chunks == 0) return;
  const std::int64_t blocks = std::min<std::int64_t>(num_chunks, max_blocks);
  cuda::launch(ema_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(block), 0, stream, tensors, chunks, num_chunks,
               decay, guard);
}

}  // namespace diffuse::kernels
