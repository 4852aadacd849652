// What the CPU this process runs on can execute, detected once at run time.
// Kernels compiled with [[gnu::target(...)]] exist in every build (baseline
// x86-64 included); this says which of them may be called here.
#pragma once

// GCC and Clang on x86 (Intel's icx too): per-function target attributes and
// __builtin_cpu_supports. Elsewhere only portable code is compiled.
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define DIFFUSE_X86_TARGETS 1
#endif

namespace diffuse::detail {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
};

// The runtime checks include the OS's support for the register state
// (XGETBV), so avx2 is false on a CPU that has it under an OS that does not
// save ymm registers.
inline const CpuFeatures& cpu_features() {
  static const CpuFeatures f = [] {
    CpuFeatures r;
#ifdef DIFFUSE_X86_TARGETS
    __builtin_cpu_init();  // needed only before constructors have run; harmless after
    r.avx2 = __builtin_cpu_supports("avx2");
    r.fma = __builtin_cpu_supports("fma");
#endif
    return r;
  }();
  return f;
}

}  // namespace diffuse::detail
