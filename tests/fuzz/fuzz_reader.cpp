// The libFuzzer harness of the readers (scripts/fuzz.sh builds it with clang's
// -fsanitize=fuzzer,address,undefined): one binary, the reader chosen at start by the environment,
// DIFFUSE_FUZZ_READER=npy (tests/fuzz/readers.hpp lists them), so one build serves every reader.
#include "readers.hpp"

#include <cstdlib>
#include <iostream>

namespace {
std::string g_reader;
}

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* r = std::getenv("DIFFUSE_FUZZ_READER");
  if (!r || !diffuse::fuzz::readers().count(r)) {
    std::cerr << "fuzz_reader: set DIFFUSE_FUZZ_READER to one of:";
    for (const auto& [name, f] : diffuse::fuzz::readers()) std::cerr << ' ' << name;
    std::cerr << '\n';
    std::exit(2);
  }
  g_reader = r;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return diffuse::fuzz::run(g_reader, data, size);
}
