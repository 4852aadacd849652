// Files for tests: a fresh per-process temporary directory, removed at the
// end, and whole-file byte reads and writes.
#pragma once

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <system_error>
#include <unistd.h>
#include <vector>

namespace diffuse::testing {

using Bytes = std::vector<uint8_t>;

// <tmp>/diffuse_test_<suite>_<pid>_<leaf>: distinct per process and test case.
struct TempDir {
  std::filesystem::path path;
  TempDir(const std::string& suite, const std::string& leaf)
      : path(std::filesystem::temp_directory_path() /
             ("diffuse_test_" + suite + "_" + std::to_string(getpid()) + "_" + leaf)) {
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

inline void write_bytes(const std::string& path, const Bytes& b) {
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
}
inline Bytes read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(f), {});
}

}  // namespace diffuse::testing
