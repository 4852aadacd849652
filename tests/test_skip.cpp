// The skip mechanism itself (tests/skip.hpp), run by two ctest tests in tests/CMakeLists.txt: with
// DIFFUSE_TEST_FORCE_SKIP set the case skips, which ctest must report as skipped; with
// DIFFUSE_REQUIRE_ALL_TESTS=1 as well, the same skip must fail.
#include "skip.hpp"

#include <cstdlib>

TEST_CASE("DIFFUSE_SKIP skips, or fails where every test is required") {
  if (std::getenv("DIFFUSE_TEST_FORCE_SKIP")) DIFFUSE_SKIP("forced by DIFFUSE_TEST_FORCE_SKIP");
  FAIL("run without DIFFUSE_TEST_FORCE_SKIP: this case only checks the skip");
}
