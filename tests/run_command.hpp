// Runs a shell command for the end-to-end CLI tests: its stdout and stderr go to `log`, are
// returned in *out and shown by Catch if the test fails; returns the exit status (-1 if killed).
#pragma once

#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <sys/wait.h>

namespace diffuse::testing {

inline int run_command(const std::string& cmd, const std::filesystem::path& log, std::string* out = nullptr) {
  const int rc = std::system((cmd + " > '" + log.string() + "' 2>&1").c_str());
  std::ifstream f(log);
  std::stringstream ss;
  ss << f.rdbuf();
  if (out) *out = ss.str();
  UNSCOPED_INFO("$ " << cmd << "\n" << ss.str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

}  // namespace diffuse::testing
