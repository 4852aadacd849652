// Tensors on the CUDA device: where Tensor<T>'s Device::CUDA storage comes from (core/tensor.hpp).
//
//   #include <diffuse/backend/cuda/tensor.hpp>
//   diffuse::Tensor<float> d = host.cuda();          // or host.to(Device::CUDA); d.data() is a device pointer
//   kernel(d.data(), ...);
//   diffuse::Tensor<float> back = d.cpu();           // synchronous copy back
//
// In a CUDA build (nvcc, or a host file of a target linking diffuse::cuda) including this header
// registers CudaRuntimeMemory: cudaMalloc through the caching allocator of the current device
// (allocator.hpp); copies to the host wait for earlier work on the legacy default stream (so
// kernels queued there have finished writing what is copied back); copies from the host and
// between device buffers are queued on that stream.
//
// EmulatedDeviceMemory, in every build: "device" memory that is host memory, for running the
// device code (kernels through the CPU emulation, blas.hpp / conv.hpp's host fallbacks) on the
// CPU. Installed for the lifetime of a guard object; new allocations are filled with 0xFF bytes
// (NaN as float) so that an output a kernel never writes shows.
#pragma once

#include <diffuse/backend/capture_state.hpp>
#include <diffuse/backend/cuda/allocator.hpp>
#include <diffuse/backend/cuda/check.hpp>
#include <diffuse/core/tensor.hpp>

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <new>

namespace diffuse::cuda {

// Host memory posing as device memory (the CPU emulation).
class EmulatedDeviceMemory {
 public:
  EmulatedDeviceMemory() : previous_(set_device_memory(&memory())) {}
  ~EmulatedDeviceMemory() { set_device_memory(previous_); }
  EmulatedDeviceMemory(const EmulatedDeviceMemory&) = delete;
  EmulatedDeviceMemory& operator=(const EmulatedDeviceMemory&) = delete;

  // Under a capture of the emulated backend (backend/capture_state.hpp): blocks allocated are the
  // graph's; frees are deferred until the graph is gone (it writes and reads them at each replay);
  // a block made before the capture and freed inside it is also marked stale (refilled with 0xFF
  // before each replay: on the GPU nothing keeps its contents); copies are queued into the graph;
  // a copy to the host is refused, and one from the host must be a named input's.
  static const DeviceMemory& memory() {
    static const DeviceMemory m{
        "CPU emulation",
        [](std::size_t bytes) -> void* {
          void* p = ::operator new(bytes ? bytes : 1, std::align_val_t{256});
          std::memset(p, 0xFF, bytes);
          backend::CaptureState& c = backend::capture_state();
          if (c.active && c.emulated_memory) {
            try {
              c.emulated_memory->owned.insert(p);
            } catch (...) {
              ::operator delete(p, std::align_val_t{256});
              throw;
            }
          }
          return p;
        },
        [](void* p, std::size_t bytes) noexcept {
          try {
            backend::CaptureState& c = backend::capture_state();
            if (c.active && c.emulated_memory) {
              backend::EmulatedGraphMemory& g = *c.emulated_memory;
              if (!g.owned.count(p)) g.stale.emplace_back(p, bytes);
              g.deferred.emplace_back(p, bytes);
              return;
            }
            for (const auto& w : c.emulated_graphs)
              if (const auto g = w.lock(); g && g->owned.count(p)) {
                g->deferred.emplace_back(p, bytes);
                return;
              }
          } catch (...) {  // no memory for the bookkeeping: keep the block (leaked rather than reused too early)
            return;
          }
          ::operator delete(p, std::align_val_t{256});
        },
        [](void* dst, const void* src, std::size_t bytes, DeviceMemory::Copy kind) {
          if (backend::capture_state().active) {
            if (kind == DeviceMemory::Copy::DeviceToHost)
              backend::capture_refuse("a copy to the host inside the captured work (nothing runs until a replay)");
            if (kind == DeviceMemory::Copy::HostToDevice) src = backend::capture_upload_source(src, bytes);
            backend::device_work([dst, src, bytes] { std::memcpy(dst, src, bytes); });
            return;
          }
          std::memcpy(dst, src, bytes);
        }};
    return m;
  }

 private:
  const DeviceMemory* previous_;
};

#if DIFFUSE_HAVE_CUDA_RUNTIME
// The CUDA runtime's memory: cudaMalloc'd blocks through device_allocator(), checked cudaMemcpy.
// One device: a tensor must be freed with the device that allocated it current.
inline const DeviceMemory& cuda_runtime_memory() {
  static const DeviceMemory m{
      "CUDA runtime",
      [](std::size_t bytes) -> void* { return bytes ? device_allocator().allocate(bytes) : nullptr; },
      [](void* p, std::size_t) noexcept {
        if (!p) return;
        try {
          device_allocator().deallocate(p);
        } catch (...) {  // a destructor cannot throw; the block is lost (the allocator reported it)
        }
      },
      [](void* dst, const void* src, std::size_t bytes, DeviceMemory::Copy kind) {
        // To the host: wait for the device (the data must be there on return). From the host
        // (pageable memory, as every CPU tensor's) and device to device: queued on the legacy
        // stream. cudaMemcpyAsync stages pageable host memory before it returns, so the source may
        // be reused at once, and it does not wait for earlier kernels as cudaMemcpy would.
        // Inside a capture (backend/capture_state.hpp): on the capturing stream; to the host
        // refused; from the host only a named input's bytes, copied from its staging buffer.
        if (backend::capture_state().active) {
          if (kind == DeviceMemory::Copy::DeviceToHost)
            backend::capture_refuse("a copy to the host inside the captured work (nothing runs until a replay)");
          if (kind == DeviceMemory::Copy::HostToDevice) src = backend::capture_upload_source(src, bytes);
          DIFFUSE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice,
                                             static_cast<cudaStream_t>(backend::capture_state().stream)));
        } else if (kind == DeviceMemory::Copy::DeviceToHost) {
          DIFFUSE_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
        } else {
          const cudaMemcpyKind k = kind == DeviceMemory::Copy::HostToDevice ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToDevice;
          DIFFUSE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, k, nullptr));
        }
      }};
  return m;
}

namespace detail {
// Registered once per program, before main(), by any file that includes this header.
inline const bool cuda_runtime_memory_registered = [] {
  if (!device_memory()) set_device_memory(&cuda_runtime_memory());
  return true;
}();
}  // namespace detail
#endif

}  // namespace diffuse::cuda
