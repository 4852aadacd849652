// The Catch2 main(), compiled once into diffuse_catch_main and linked into every test executable
// (the Catch implementation is the slow part to compile, so there is one for all).
//
// A test program may define diffuse::testing::before_tests(argc, argv): when it returns an exit
// code >= 0, main() returns it without running the tests (the GPU tests return 77, "skipped",
// when there is no CUDA device: cuda_test_main.cpp). Declared weak, so programs without one link.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

namespace diffuse::testing {
int before_tests(int argc, char** argv) __attribute__((weak));
}  // namespace diffuse::testing

int main(int argc, char** argv) {
  if (diffuse::testing::before_tests) {
    const int rc = diffuse::testing::before_tests(argc, argv);
    if (rc >= 0) return rc;
  }
  return Catch::Session().run(argc, argv);
}
