// bf16 (include/diffuse/backend/cuda/bf16.hpp): every bit pattern round-trips, float -> bf16 rounds to
// nearest even (checked against exact arithmetic and against PyTorch's conversion). A kernel on
// bf16 data: kernel_cases.hpp ("kernel silu_forward on bf16").
#include <catch2/catch.hpp>

#include <diffuse/backend/cuda/bf16.hpp>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernel_seed.hpp"
#include "temp_files.hpp"
#include "skip.hpp"

using diffuse::bf16;

namespace {

float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Nearest bf16 to a finite float by exact arithmetic: the two bf16 neighbours (truncation and the
// next value away from zero) compared in double, ties to the even mantissa.
std::uint16_t nearest_bf16(float f) {
  const std::uint32_t u = float_bits(f);
  const std::uint16_t lo = static_cast<std::uint16_t>(u >> 16), hi = static_cast<std::uint16_t>(lo + 1);
  if ((u & 0xFFFFu) == 0) return lo;
  const double x = f, a = bf16::bits_to_float(lo), b = bf16::bits_to_float(hi);  // b may be inf
  const double da = std::fabs(x - a), db = std::isinf(b) ? INFINITY : std::fabs(b - x);
  if ((u & 0xFFFFu) == 0x8000u) return (lo & 1u) ? hi : lo;  // exactly halfway: even wins
  if (std::isinf(b)) {
    // Above the largest bf16: round as if the exponent went on (2^128); halfway or more -> inf.
    return (u & 0xFFFFu) >= 0x8000u ? hi : lo;
  }
  return da < db ? lo : hi;
}

}  // namespace

TEST_CASE("bf16: every bit pattern survives bf16 -> float -> bf16") {
  for (std::uint32_t b = 0; b <= 0xFFFFu; ++b) {
    const bf16 h = bf16::from_bits(static_cast<std::uint16_t>(b));
    const float f = static_cast<float>(h);
    const std::uint16_t back = bf16(f).bits;
    const bool nan = ((b & 0x7F80u) == 0x7F80u) && (b & 0x7Fu);
    if (nan) {
      REQUIRE(std::isnan(f));
      REQUIRE(back == (b | 0x40u));  // quieted, sign and payload's top bits kept
    } else {
      REQUIRE(float_bits(f) == b << 16);
      REQUIRE(back == b);
    }
  }
}

TEST_CASE("bf16: float -> bf16 rounds to nearest, ties to even") {
  const std::uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<std::uint32_t> any;
  size_t bad = 0, checked = 0;
  for (int i = 0; i < 1000000; ++i) {
    std::uint32_t u = any(gen);
    if (i % 4 == 1) u = (u & 0xFFFF0000u) | 0x8000u;                 // exact ties
    if (i % 4 == 2) u = (u & 0xFFFF0000u) | (0x8000u + (i & 1 ? 1 : -1));  // just off a tie
    const float f = bits_float(u);
    if (std::isnan(f)) continue;
    ++checked;
    bad += bf16(f).bits != nearest_bf16(f);
  }
  CHECK(checked > 900000);
  CHECK(bad == 0);
  // The edges: the largest float overflows to infinity, the largest bf16 stays, signed zeros and
  // subnormals keep their bits' meaning.
  CHECK(bf16(FLT_MAX).bits == 0x7F80u);
  CHECK(bf16(-FLT_MAX).bits == 0xFF80u);
  CHECK(bf16(bits_float(0x7F7F0000u)).bits == 0x7F7Fu);
  CHECK(bf16(-0.0f).bits == 0x8000u);
  CHECK(bf16(bits_float(0x00018000u)).bits == 0x0002u);  // subnormal tie, odd lower -> up to even
  CHECK(bf16(bits_float(0x00008000u)).bits == 0x0000u);  // subnormal tie, even lower -> stays
  CHECK(std::isinf(static_cast<float>(bf16(INFINITY))));
  CHECK(std::isnan(static_cast<float>(bf16(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(std::isnan(static_cast<float>(bf16(bits_float(0x7F800001u)))));  // payload only in the low bits
}

TEST_CASE("bf16: conversion matches PyTorch's float -> bfloat16") {
  const std::string python = DIFFUSE_TORCH_PYTHON;
  if (python.empty()) {
    DIFFUSE_SKIP("no python with torch: PyTorch comparison skipped");
  }
  const std::uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<std::uint32_t> any;
  std::vector<std::uint32_t> in;
  for (int i = 0; i < 200000; ++i) {
    std::uint32_t u = any(gen);
    if (i % 3 == 1) u = (u & 0xFFFF0000u) | 0x8000u;
    if (std::isnan(bits_float(u))) continue;  // PyTorch's NaN bits are its own choice
    in.push_back(u);
  }
  for (std::uint32_t u : {0x7F7FFFFFu, 0xFF7FFFFFu, 0x7F7F8000u, 0x00000001u, 0x80008000u, 0x3F808000u})
    in.push_back(u);
  const diffuse::testing::TempDir dir("bf16", "torch");
  const std::string fin = dir / "in.bin", fout = dir / "out.bin";
  {
    std::ofstream o(fin, std::ios::binary);
    o.write(reinterpret_cast<const char*>(in.data()), static_cast<std::streamsize>(in.size() * 4));
  }
  // Appended piece by piece: g++ 12 warns falsely (-Wrestrict) on a long chain of string +.
  std::string cmd = python;
  cmd += " -c \"import torch,numpy as np; a=np.fromfile('";
  cmd += fin;
  cmd += "',dtype=np.float32); b=torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy(); b.tofile('";
  cmd += fout;
  cmd += "')\"";
  REQUIRE(std::system(cmd.c_str()) == 0);
  std::vector<std::uint16_t> ref(in.size());
  std::ifstream i(fout, std::ios::binary);
  i.read(reinterpret_cast<char*>(ref.data()), static_cast<std::streamsize>(ref.size() * 2));
  REQUIRE(static_cast<size_t>(i.gcount()) == ref.size() * 2);
  size_t bad = 0;
  for (size_t k = 0; k < in.size(); ++k) bad += bf16(bits_float(in[k])).bits != ref[k];
  CHECK(bad == 0);
}
