// fresh_seed(): a new random seed for every run of a kernel test (print it with INFO so a failure
// can be replayed). Shared by the kernel_cases_*.hpp files; defines no TEST_CASE.
#pragma once

#include <cstdint>
#include <random>

namespace diffuse::testing {

inline std::uint64_t fresh_seed() {
  std::random_device rd;
  return (static_cast<std::uint64_t>(rd()) << 32) | rd();
}

}  // namespace diffuse::testing
