// Running the CUDA backend without a GPU: for its lifetime an EmulatedCuda object makes
// Device::CUDA tensors host memory and every op on them the CUDA backend's code, compiled by the
// host compiler over the CPU emulation of the CUDA execution model (src/cuda_emulation.cpp).
// So a model's CUDA path can be tested against its CPU path on any machine:
//
//   diffuse::EmulatedCuda emu;        // link diffuse::cuda_emulation (not with diffuse::cuda)
//   model.to(diffuse::Device::CUDA);  // ... every op now runs the CUDA backend's kernels
//
// The emulation is slow (each GPU thread is a CPU fiber; GEMMs and convolutions are plain loops
// in double): use small shapes. New device allocations are filled with 0xFF bytes (NaN as float)
// so that an output a kernel never writes shows in a comparison.
#pragma once

#include <diffuse/backend/cuda.hpp>
#include <diffuse/core/tensor.hpp>

namespace diffuse {

// The emulated backend (one per program; EmulatedCuda installs it).
backend::CudaBackend& emulated_cuda_backend();

class EmulatedCuda {
 public:
  EmulatedCuda();
  ~EmulatedCuda();
  EmulatedCuda(const EmulatedCuda&) = delete;
  EmulatedCuda& operator=(const EmulatedCuda&) = delete;

 private:
  const DeviceMemory* previous_memory_;
  backend::CudaBackend* previous_backend_;
};

}  // namespace diffuse
