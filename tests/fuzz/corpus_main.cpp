// The fuzz corpus as a regression test (ctest fuzz_corpus_<reader>): every file of
// tests/corpus/<reader>/ through its reader, compiled with the normal compiler (and under
// ./run.sh sanitize with ASan + UBSan). Each file must be refused or read; a crash fails the test.
//
//   fuzz_corpus READER DIR          prints each input's verdict and the count
//   fuzz_corpus --make-seeds DIR    writes the seeds only the library can write (checkpoint, lenet)
#include "readers.hpp"

#include <algorithm>
#include <fstream>
#include <iostream>
#include <iterator>
#include <vector>

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--make-seeds") {
    diffuse::fuzz::make_seeds(argv[2]);
    return 0;
  }
  if (argc != 3 || !diffuse::fuzz::readers().count(argv[1])) {
    std::cerr << "usage: fuzz_corpus READER DIR; readers:";
    for (const auto& [name, f] : diffuse::fuzz::readers()) std::cerr << ' ' << name;
    std::cerr << '\n';
    return 2;
  }
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::directory_iterator(argv[2]))
    if (e.is_regular_file()) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  if (files.empty()) {
    std::cerr << "fuzz_corpus: no inputs in " << argv[2] << '\n';
    return 1;
  }
  size_t read = 0;
  for (const auto& p : files) {
    std::ifstream f(p, std::ios::binary);
    const std::vector<uint8_t> b((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    std::string why;
    const bool ok = diffuse::fuzz::try_read(argv[1], b.data(), b.size(), &why);
    read += ok;
    std::cout << p.filename().string() << ": " << (ok ? "read" : "refused: " + why) << '\n';
  }
  std::cout << "fuzz_corpus " << argv[1] << ": " << files.size() << " inputs, " << read << " read, "
            << files.size() - read << " refused, none crashed\n";
  std::error_code ec;
  std::filesystem::remove_all(diffuse::fuzz::scratch(), ec);
  return 0;
}
