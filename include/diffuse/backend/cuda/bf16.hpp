// bf16: the bfloat16 element type (1 sign, 8 exponent, 7 mantissa bits: float's range at 3
// significant digits), for device tensors and kernels.
//
// One type in every world: the same 16 bits under nvcc, in host code and in the CPU emulation,
// so buffers move between them unchanged. Conversions:
//   bf16(float)         rounds to nearest, ties to even (as __float2bfloat16_rn and PyTorch's
//                       float -> bfloat16); a NaN stays a (quiet) NaN, overflow gives infinity
//   float(bf16)         exact (the bits shifted up)
// Kernels load with static_cast<float>(x[i]), compute in float and store with static_cast<T>(v),
// so one kernel template serves float and bf16. No arithmetic operators on purpose: arithmetic
// in bf16 would round after every operation.
#pragma once

#include <cstdint>
#include <cstring>

#include <type_traits>

#include <diffuse/core/config.hpp>  // DIFFUSE_HD: __host__ __device__ under nvcc

namespace diffuse {

struct bf16 {
  std::uint16_t bits;  // no initialiser: trivial, so it can live in __shared__ arrays

  bf16() = default;
  DIFFUSE_HD explicit bf16(float f) : bits(from_float_bits(f)) {}
  DIFFUSE_HD explicit operator float() const { return bits_to_float(bits); }

  // The value with these bits.
  static DIFFUSE_HD bf16 from_bits(std::uint16_t b) {
    bf16 h;
    h.bits = b;
    return h;
  }

  DIFFUSE_HD static std::uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
#endif
  }
  DIFFUSE_HD static float bits_to_float(std::uint16_t b) {
    const std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
#endif
  }
  // Round to nearest even: add 0x7FFF plus the lowest kept bit, then truncate. A carry out of the
  // mantissa correctly bumps the exponent (up to infinity). NaN: keep the sign and top mantissa
  // bits and force the quiet bit, so a NaN whose payload sits only in the low 16 bits stays NaN.
  DIFFUSE_HD static std::uint16_t from_float_bits(float f) {
    const std::uint32_t u = float_bits(f);
    if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu) != 0)
      return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
    const std::uint32_t rounding = 0x7FFFu + ((u >> 16) & 1u);
    return static_cast<std::uint16_t>((u + rounding) >> 16);
  }
};

static_assert(sizeof(bf16) == 2 && std::is_trivial_v<bf16>, "bf16 must be 16 trivial bits");

// The type a kernel computes in for element type T: float for float and bf16, double for double.
template <class T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline bool operator==(bf16 a, bf16 b) = delete;  // ambiguous for NaN and +-0: compare bits or floats

}  // namespace diffuse
