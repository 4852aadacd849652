// fresh_seed(): a new random seed for every run of a randomised test, the one seed mechanism of
// the suite (print it with INFO so a failure can be replayed: DIFFUSE_TEST_SEED=<seed> makes
// every call return it). Used by the kernel_cases_*.hpp files and every CPU test that draws its
// inputs; defines no TEST_CASE.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <random>

namespace diffuse::testing {

inline std::uint64_t fresh_seed() {
  if (const char* s = std::getenv("DIFFUSE_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  std::random_device rd;
  return (static_cast<std::uint64_t>(rd()) << 32) | rd();
}

}  // namespace diffuse::testing
