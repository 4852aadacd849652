// The CUDA backend run on the CPU through the emulation of the CUDA execution model: the same
// source as src/cuda_backend.cu (backend/cuda/cuda_backend_impl.hpp), compiled by the host
// compiler, so every kernel runs as CPU fibers, cuBLAS and cuDNN are host loops and "device"
// memory is host memory. The diffuse::cuda_emulation target; EmulatedCuda
// (backend/cuda_emulation.hpp) installs it. Never linked together with diffuse::cuda.
#include <diffuse/backend/cuda/cuda_backend_impl.hpp>
#include <diffuse/backend/cuda_emulation.hpp>

namespace diffuse {

backend::CudaBackend& emulated_cuda_backend() {
  static backend::CudaBackendImpl* const impl = new backend::CudaBackendImpl();  // never destroyed, as the real one
  return *impl;
}

EmulatedCuda::EmulatedCuda()
    : previous_memory_(set_device_memory(&cuda::EmulatedDeviceMemory::memory())),
      previous_backend_(backend::set_cuda_backend(&emulated_cuda_backend())) {}

EmulatedCuda::~EmulatedCuda() {
  backend::set_cuda_backend(previous_backend_);
  set_device_memory(previous_memory_);
}

}  // namespace diffuse
