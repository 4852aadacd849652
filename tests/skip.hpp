// DIFFUSE_SKIP(reason): a test that cannot run its check (no torch, numpy, scipy, python3 or
// Fashion-MNIST here) says why and returns; the line it prints ("diffuse-skip: ...") makes ctest
// report it as skipped (SKIP_REGULAR_EXPRESSION in tests/CMakeLists.txt), not passed. Where the
// setup has installed everything (`./run.sh test` on Debian sets DIFFUSE_REQUIRE_ALL_TESTS=1), a
// skip is a failure instead: the reference it needed should have been there.
#pragma once

#include <catch2/catch.hpp>

#include <cstdlib>
#include <iostream>
#include <string>

namespace diffuse::testing {
inline bool all_tests_required() {
  const char* v = std::getenv("DIFFUSE_REQUIRE_ALL_TESTS");
  return v && *v && std::string(v) != "0";
}
}  // namespace diffuse::testing

// DIFFUSE_SKIP_NO_HARDWARE(reason): the same report, for a check this machine's hardware cannot
// run (a CPU without AVX2 for that GEMM path): no setup can install it, so a skip even where every
// test is required, as the GPU tests skip on a machine without a device.
#define DIFFUSE_SKIP_NO_HARDWARE(reason)                        \
  do {                                                          \
    std::cout << "diffuse-skip: " << reason << std::endl;       \
    WARN("skipped: " << reason);                                \
    return;                                                     \
  } while (false)

#define DIFFUSE_SKIP(reason)                                                                              \
  do {                                                                                                    \
    if (::diffuse::testing::all_tests_required())                                                         \
      FAIL("cannot run, but DIFFUSE_REQUIRE_ALL_TESTS is set (the setup installed its references): " \
           << reason);                                                                                    \
    std::cout << "diffuse-skip: " << reason << std::endl;                                                 \
    WARN("skipped: " << reason);                                                                          \
    return;                                                                                               \
  } while (false)
