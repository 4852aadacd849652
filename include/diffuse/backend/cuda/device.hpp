// What every kernel header in kernels/ includes: the device-side spellings that differ between
// nvcc and the CPU emulation (g++), so one kernel source serves both.
//
//   DIFFUSE_SHARED(T, name, n);       a __shared__ T name[n] (per block; T may be an array type
//                                     through an alias, e.g. using Row = float[33])
//   DIFFUSE_DYNAMIC_SHARED(T, name);  T* name = the block's dynamic shared memory (the launch's
//                                     shared_bytes); use it once per kernel and carve it up
//
// Under nvcc the CUDA built-ins (threadIdx, __syncthreads, __shfl_down_sync, atomicAdd, ...) are
// the real ones; otherwise <diffuse/backend/cuda/emulation.hpp> provides those the emulation supports.
#pragma once

#ifdef __CUDACC__
#include <cuda_runtime.h>

#define DIFFUSE_SHARED(T, name, n) __shared__ T name[n]
// One extern array of one type for every kernel: extern __shared__ declarations of different
// types under the same name do not compile.
#define DIFFUSE_DYNAMIC_SHARED(T, name)                                          \
  extern __shared__ __align__(16) unsigned char diffuse_dynamic_shared_bytes_[]; \
  T* const name = reinterpret_cast<T*>(diffuse_dynamic_shared_bytes_)
#else
#include <diffuse/backend/cuda/emulation.hpp>
#endif
