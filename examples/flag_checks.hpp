// Checks for the tools' numeric flags and their output folder, run when the command line is
// parsed, before any work: one line naming the flag, the value and what is allowed.
//
// Why not CLI::Range: every comparison with NaN is false, so Range(0.0, 1.0) accepts "nan" (a NaN
// --ema then quietly switched the EMA off), and it accepts "inf" for an unbounded range. These
// parse the value strictly and refuse non-finite numbers first.
#pragma once

#include <CLI/CLI.hpp>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <string>
#include <system_error>
#include <unistd.h>

namespace diffuse::examples {

namespace detail {

inline std::string number_text(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%g", v);
  return b;
}

// The whole of s as a double, or false (trailing characters, empty, out of double's range).
inline bool parse_double(const std::string& s, double& out) {
  if (s.empty()) return false;
  errno = 0;
  char* end = nullptr;
  out = std::strtod(s.c_str(), &end);
  return end == s.c_str() + s.size() && errno != ERANGE;
}

}  // namespace detail

// A finite number from lo to hi; open_lo / open_hi exclude the end (a learning rate of 0 trains
// nothing, an EMA decay of 1 never moves).
inline CLI::Validator finite_in(double lo, double hi, bool open_lo = false, bool open_hi = false) {
  const std::string L = detail::number_text(lo), H = detail::number_text(hi);
  std::string allowed = "a finite number ";
  if (std::isinf(hi)) allowed += (open_lo ? "above " : "at least ") + L;
  else if (!open_lo && !open_hi) allowed += "from " + L + " to " + H;
  else allowed += (open_lo ? "above " : "at least ") + L + (open_hi ? " and below " : " and at most ") + H;
  return CLI::Validator(
      [=](std::string& s) -> std::string {
        double v = 0;
        const bool ok = detail::parse_double(s, v) && std::isfinite(v) && (open_lo ? v > lo : v >= lo) &&
                        (open_hi ? v < hi : v <= hi);
        return ok ? std::string() : "'" + s + "': expected " + allowed;
      },
      std::string("FLOAT in ") + (open_lo ? "(" : "[") + detail::number_text(lo) + ", " + detail::number_text(hi) +
          (open_hi ? ")" : "]"));
}

// A whole number in [lo, hi].
inline CLI::Validator whole_in(long long lo, long long hi) {
  const std::string allowed = "a whole number from " + std::to_string(lo) +
                              (hi == std::numeric_limits<long long>::max() ? " up" : " to " + std::to_string(hi));
  return CLI::Validator(
      [=](std::string& s) -> std::string {
        errno = 0;
        char* end = nullptr;
        const long long v = std::strtoll(s.c_str(), &end, 10);
        if (s.empty() || end != s.c_str() + s.size() || errno == ERANGE || v < lo || v > hi)
          return "'" + s + "': expected " + allowed;
        return {};
      },
      "INT >= " + std::to_string(lo));
}

inline constexpr double kInf = std::numeric_limits<double>::infinity();
inline constexpr long long kNoMax = std::numeric_limits<long long>::max();

// A whole number from 1 up (CLI::PositiveNumber's message printed the largest double in full).
inline CLI::Validator positive_whole() { return whole_in(1, kNoMax); }

// A seed: a whole number from 0 to 2^64 - 1. CLI11 reads "-1" into a uint64_t as 2^64 - 1, so a
// negative seed would silently be another seed.
inline CLI::Validator seed_value() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        errno = 0;
        char* end = nullptr;
        const bool digits = !s.empty() && s.find_first_not_of("0123456789") == std::string::npos;
        (void)std::strtoull(s.c_str(), &end, 10);
        if (!digits || end != s.c_str() + s.size() || errno == ERANGE)
          return "'" + s + "': expected a whole number from 0 to 18446744073709551615";
        return {};
      },
      "UINT");
}

namespace detail {
// Writes and removes a probe file in dir; the errors start with what (the flag and its value).
inline void probe_write(const std::string& what, const std::filesystem::path& dir, const char* not_writable) {
  const std::filesystem::path probe = dir / (".diffuse-write-test-" + std::to_string(::getpid()));
  std::FILE* f = std::fopen(probe.c_str(), "wb");
  if (!f) throw std::runtime_error(what + not_writable);
  const bool wrote = std::fputc('x', f) != EOF;
  const bool closed = std::fclose(f) == 0;
  std::error_code ec;
  std::filesystem::remove(probe, ec);
  if (!wrote || !closed) throw std::runtime_error(what + ": writing a file there failed");
}
}  // namespace detail

// --out: the folder the run writes, made now and tried with a file, so a read-only or
// impossible path fails before training rather than at its first checkpoint.
inline void require_writable_folder(const std::string& flag, const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw std::runtime_error(flag + " '" + dir + "': cannot create the folder: " + ec.message());
  if (!fs::is_directory(dir, ec)) throw std::runtime_error(flag + " '" + dir + "': not a folder");
  detail::probe_write(flag + " '" + dir + "'", dir, ": the folder is not writable");
}

// An output file named by a flag (--save-stats, --json, a classifier's --out): its folder is made
// now and a probe file written there, so an impossible or read-only path fails before the work
// whose result it would hold, not after.
inline void require_writable_file(const std::string& flag, const std::string& file) {
  namespace fs = std::filesystem;
  const fs::path parent = fs::path(file).parent_path();
  std::error_code ec;
  if (fs::is_directory(file, ec)) throw std::runtime_error(flag + " '" + file + "': is a folder, not a file");
  if (!parent.empty()) {
    fs::create_directories(parent, ec);
    if (ec) throw std::runtime_error(flag + " '" + file + "': cannot create its folder: " + ec.message());
  }
  detail::probe_write(flag + " '" + file + "'", parent.empty() ? fs::path(".") : parent, ": its folder is not writable");
}

}  // namespace diffuse::examples
