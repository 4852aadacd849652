// The GPU tests' gate (test_kernels_cuda, test_cuda_memory; an object library linked beside
// diffuse_catch_main, whose main() calls it first): their Catch tests run only when a CUDA device
// is present. Without one it says why and returns 77, which ctest reports as "skipped"
// (SKIP_RETURN_CODE), so a machine without a GPU neither fails nor falsely passes the GPU run.
// The device is named on stdout.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>

#include <dlfcn.h>

namespace diffuse::testing {

// Whether the driver library (libcuda) can be loaded at all.
inline bool driver_installed() {
  void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (h) dlclose(h);
  return h != nullptr;
}

int before_tests(int argc, char** argv) {
  const char* name = argc > 0 && argv[0] ? argv[0] : "cuda test";
  if (const char* slash = std::strrchr(name, '/')) name = slash + 1;
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  // Skipped only where there is no device: no driver installed at all, or a driver that finds no
  // GPU. Any other error (a driver that fails, a runtime newer than the driver) is a failure.
  const bool no_driver = e == cudaErrorInsufficientDriver && !driver_installed();
  if (e != cudaSuccess && e != cudaErrorNoDevice && !no_driver) {
    std::printf("%s: FAILED: the CUDA driver is there but cudaGetDeviceCount failed: %s\n", name, cudaGetErrorString(e));
    return 1;
  }
  if (e != cudaSuccess || devices == 0) {
    std::printf("%s: SKIPPED: no CUDA device (%s); what runs without one is tested on the CPU: the kernels "
                "through the emulation in test_emulation and test_emu_*, the caching allocator in "
                "test_cuda_allocator\n",
                name, e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount found 0 devices");
    return 77;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
    std::printf("%s: device 0 of %d: %s, compute capability %d.%d, %.1f GiB\n", name, devices, prop.name, prop.major,
                prop.minor, static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
  return -1;  // run the tests
}

}  // namespace diffuse::testing
