// The CUDA backend of diffuse, compiled by nvcc once per program: the diffuse::cuda target adds
// this file to its consumers' link (CMake builds it as an object library), so a program that
// links diffuse::cuda has CUDA tensors and every op on them, while its own sources stay ordinary
// C++ for the host compiler.
//
// Before main(), this registers the CUDA runtime's device memory (cudaMalloc through the caching
// allocator) and the backend (include/diffuse/backend/cuda/cuda_backend_impl.hpp). Nothing here
// touches the GPU until a CUDA tensor or op is used, so a program built with CUDA runs on a
// machine without one (and says why when asked for the device).
#include <diffuse/backend/cuda/cuda_backend_impl.hpp>

namespace diffuse::backend {
namespace {

const bool cuda_backend_registered = [] {
  // Never destroyed: tensors in other static objects may still free device memory at exit.
  static CudaBackendImpl* const impl = new CudaBackendImpl();
  if (!device_memory()) set_device_memory(&cuda::cuda_runtime_memory());
  if (!cuda_backend()) set_cuda_backend(impl);
  return true;
}();

}  // namespace
}  // namespace diffuse::backend
