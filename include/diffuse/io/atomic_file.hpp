// write_file_atomically(path, bytes): every output file the library and the tools write whole
// (PNG, npy, JSON, CSV of samples) goes to PATH.tmp first, each write and the close checked, and
// is then renamed over PATH. A full disk or an unwritable folder throws, naming the file and the
// system's reason, and leaves the previous PATH as it was (a rename is all or nothing); the
// half-written temporary is removed. (stb's own file writer ignores write errors: a disk that
// filled while PNGs were written ended with exit 0 and truncated images.)
#pragma once

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <system_error>

namespace diffuse {

inline void write_file_atomically(const std::string& path, const void* data, size_t n) {
  const std::string tmp = path + ".tmp";
  int err = 0;
  if (std::FILE* f = std::fopen(tmp.c_str(), "wb")) {
    if (n && std::fwrite(data, 1, n, f) != n) err = errno ? errno : EIO;
    if (std::fflush(f) != 0 && !err) err = errno ? errno : EIO;
    if (std::fclose(f) != 0 && !err) err = errno ? errno : EIO;
  } else {
    err = errno ? errno : EIO;
  }
  std::error_code ec;
  if (!err) {
    std::filesystem::rename(tmp, path, ec);
    if (ec) err = ec.value();
  }
  if (err) {
    std::filesystem::remove(tmp, ec);
    throw std::runtime_error("diffuse: cannot write '" + path + "': " + std::strerror(err));
  }
}

inline void write_file_atomically(const std::string& path, const std::string& text) {
  write_file_atomically(path, text.data(), text.size());
}

}  // namespace diffuse
