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

// Precompiled float code. Compiling the ops, optimisers and file formats in every translation unit
// that uses them costs seconds each; the CMake target diffuse::diffuse therefore compiles their
// float instantiations and the non-template code once, into diffuse::precompiled
// (src/precompiled.cpp), and defines DIFFUSE_PRECOMPILED=1 for its users, whose translation units
// then only declare them. Without the macro (the headers used without CMake, or
// -DDIFFUSE_PRECOMPILED=OFF) everything is compiled where it is used, as header-only code.
//
//   DIFFUSE_FLOAT_INSTANCE(decl)  after a template's definition: `extern template decl;` in a
//                                 precompiled user, `template decl;` in src/precompiled.cpp,
//                                 nothing header-only.
//   #if DIFFUSE_DEFINE_IMPL       around non-template definitions kept out of precompiled users;
//   DIFFUSE_IMPL_INLINE           their `inline` (empty where they are compiled once).
#if defined(DIFFUSE_PRECOMPILED_SOURCE)
#define DIFFUSE_FLOAT_INSTANCE(...) template __VA_ARGS__;
#define DIFFUSE_DEFINE_IMPL 1
#define DIFFUSE_IMPL_INLINE
#elif defined(DIFFUSE_PRECOMPILED) && DIFFUSE_PRECOMPILED
#define DIFFUSE_FLOAT_INSTANCE(...) extern template __VA_ARGS__;
#define DIFFUSE_DEFINE_IMPL 0
#define DIFFUSE_IMPL_INLINE
#else
#define DIFFUSE_FLOAT_INSTANCE(...)
#define DIFFUSE_DEFINE_IMPL 1
#define DIFFUSE_IMPL_INLINE inline
#endif
