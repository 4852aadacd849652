// Checked CUDA, cuBLAS, cuDNN and NCCL calls:
//
//   DIFFUSE_CUDA_CHECK(cudaMalloc(&p, bytes));
//   DIFFUSE_CUBLAS_CHECK(cublasSgemm(handle, ...));
//   DIFFUSE_CUDNN_CHECK(cudnnCreate(&handle));
//
// A call that does not return success throws std::runtime_error naming the library, the call as
// written, file:line and the library's own error name and text, e.g.
//
//   CUDA error: cudaMalloc(&p, bytes) failed at src/x.cpp:12: cudaErrorMemoryAllocation (out of memory)
//
// Each macro exists where its library's header can be included: DIFFUSE_CUDA_CHECK under nvcc
// or when DIFFUSE_WITH_CUDA is defined (diffuse::cuda defines it), DIFFUSE_CUBLAS_CHECK and
// DIFFUSE_CUDNN_CHECK when, in addition, <cublas_v2.h> / <cudnn.h> are on the include path. In a
// build without them the header still compiles (a g++ CPU build may include it); using a macro
// whose library is missing fails to compile with a message saying so. DIFFUSE_NCCL_CHECK exists
// where, in addition, DIFFUSE_WITH_NCCL is defined (diffuse::cuda defines it when CMake found NCCL).
// DIFFUSE_HAVE_CUDA_RUNTIME, DIFFUSE_HAVE_CUBLAS, DIFFUSE_HAVE_CUDNN and DIFFUSE_HAVE_NCCL say (0 or
// 1) which ones are available.
//
// A translation unit that includes the CUDA headers cannot also use the CPU emulation of
// <diffuse/backend/cuda/emulation.hpp> (both define dim3, threadIdx, ...): compile kernels with nvcc, or
// without DIFFUSE_WITH_CUDA.
#pragma once

#include <stdexcept>
#include <string>

namespace diffuse::cuda::detail {

// The message of every failed check (a function, so the macros stay small and the format is
// tested on the CPU).
inline std::string check_message(const char* library, const char* call, const char* file, int line,
                                 const char* error_name, const char* error_text) {
  std::string m = std::string(library) + " error: " + call + " failed at " + file + ":" + std::to_string(line) +
                  ": " + (error_name ? error_name : "?");
  if (error_text && *error_text) m += std::string(" (") + error_text + ")";
  return m;
}

[[noreturn]] inline void check_failed(const char* library, const char* call, const char* file, int line,
                                      const char* error_name, const char* error_text) {
  throw std::runtime_error(check_message(library, call, file, line, error_name, error_text));
}

}  // namespace diffuse::cuda::detail

// ---------------------------------------------------------------- CUDA runtime
#if defined(__CUDACC__) || defined(DIFFUSE_WITH_CUDA)
#if !defined(__CUDACC__) && defined(__global__) && !defined(__CUDA_RUNTIME_H__)
#error "diffuse/backend/cuda/check.hpp: this translation unit already uses the CPU emulation (diffuse/backend/cuda/emulation.hpp), \
which cannot be mixed with the CUDA headers; compile it with nvcc or without DIFFUSE_WITH_CUDA"
#elif !__has_include(<cuda_runtime.h>)
#error "diffuse/backend/cuda/check.hpp: DIFFUSE_WITH_CUDA is defined but <cuda_runtime.h> is not on the include path \
(link diffuse::cuda, which adds the CUDA toolkit)"
#else
#include <cuda_runtime.h>
#endif
#define DIFFUSE_HAVE_CUDA_RUNTIME 1

namespace diffuse::cuda::detail {
inline void check_cuda(cudaError_t e, const char* call, const char* file, int line) {
  if (e != cudaSuccess) check_failed("CUDA", call, file, line, cudaGetErrorName(e), cudaGetErrorString(e));
}
}  // namespace diffuse::cuda::detail

#define DIFFUSE_CUDA_CHECK(call) ::diffuse::cuda::detail::check_cuda((call), #call, __FILE__, __LINE__)
#else
#define DIFFUSE_HAVE_CUDA_RUNTIME 0
#define DIFFUSE_CUDA_CHECK(call) \
  static_assert(false, "DIFFUSE_CUDA_CHECK needs the CUDA runtime: compile with nvcc or link diffuse::cuda")
#endif

// ---------------------------------------------------------------- cuBLAS
#if DIFFUSE_HAVE_CUDA_RUNTIME && __has_include(<cublas_v2.h>)
#include <cublas_v2.h>
#define DIFFUSE_HAVE_CUBLAS 1

namespace diffuse::cuda::detail {
inline void check_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS) check_failed("cuBLAS", call, file, line, cublasGetStatusName(s), cublasGetStatusString(s));
}
}  // namespace diffuse::cuda::detail

#define DIFFUSE_CUBLAS_CHECK(call) ::diffuse::cuda::detail::check_cublas((call), #call, __FILE__, __LINE__)
#else
#define DIFFUSE_HAVE_CUBLAS 0
#define DIFFUSE_CUBLAS_CHECK(call) \
  static_assert(false, "DIFFUSE_CUBLAS_CHECK needs <cublas_v2.h> and the CUDA runtime (link diffuse::cuda)")
#endif

// ---------------------------------------------------------------- cuDNN
#if DIFFUSE_HAVE_CUDA_RUNTIME && __has_include(<cudnn.h>)
#include <cudnn.h>
#define DIFFUSE_HAVE_CUDNN 1

namespace diffuse::cuda::detail {
inline void check_cudnn(cudnnStatus_t s, const char* call, const char* file, int line) {
  // cuDNN has one function for the name; its last error message, when set, adds the detail.
  if (s != CUDNN_STATUS_SUCCESS) {
    char detail[512] = {};
#if CUDNN_MAJOR >= 9
    cudnnGetLastErrorString(detail, sizeof detail);
#endif
    check_failed("cuDNN", call, file, line, cudnnGetErrorString(s), detail);
  }
}
}  // namespace diffuse::cuda::detail

#define DIFFUSE_CUDNN_CHECK(call) ::diffuse::cuda::detail::check_cudnn((call), #call, __FILE__, __LINE__)
#else
#define DIFFUSE_HAVE_CUDNN 0
#define DIFFUSE_CUDNN_CHECK(call) \
  static_assert(false, "DIFFUSE_CUDNN_CHECK needs <cudnn.h> and the CUDA runtime (diffuse::cuda with cuDNN found)")
#endif

// ---------------------------------------------------------------- NCCL (only where it is linked)
#if DIFFUSE_HAVE_CUDA_RUNTIME && defined(DIFFUSE_WITH_NCCL) && DIFFUSE_WITH_NCCL && __has_include(<nccl.h>)
#include <nccl.h>
#define DIFFUSE_HAVE_NCCL 1

namespace diffuse::cuda::detail {
inline void check_nccl(ncclResult_t r, const char* call, const char* file, int line) {
  if (r != ncclSuccess && r != ncclInProgress) check_failed("NCCL", call, file, line, ncclGetErrorString(r), ncclGetLastError(nullptr));
}
}  // namespace diffuse::cuda::detail

#define DIFFUSE_NCCL_CHECK(call) ::diffuse::cuda::detail::check_nccl((call), #call, __FILE__, __LINE__)
#else
#define DIFFUSE_HAVE_NCCL 0
#define DIFFUSE_NCCL_CHECK(call) \
  static_assert(false, "DIFFUSE_NCCL_CHECK needs <nccl.h> and the CUDA runtime (diffuse::cuda with NCCL found)")
#endif
