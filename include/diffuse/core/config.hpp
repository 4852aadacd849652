// Version and the few macros shared by host and device code.
#pragma once

#define DIFFUSE_VERSION_MAJOR 0
#define DIFFUSE_VERSION_MINOR 1
#define DIFFUSE_VERSION_PATCH 0

// Functions that must compile for both the CPU and a CUDA device (the RNG, the
// per-element math of the samplers) are marked DIFFUSE_HD.
#if defined(__CUDACC__)
#define DIFFUSE_HD __host__ __device__
#else
#define DIFFUSE_HD
#endif

namespace diffuse {
inline constexpr const char* version() { return "0.1.0"; }
}  // namespace diffuse
