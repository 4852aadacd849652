// Runs a shell command for the end-to-end CLI tests: its stdout and stderr go to `log`, are
// returned in *out and shown by Catch if the test fails; returns the exit status (-1 if killed).
#pragma once

#include <catch2/catch.hpp>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

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

// Starts cmd (one command: the shell exec's it, so a signal reaches the tool itself), waits until
// its output contains `marker` (at most timeout_s), then calls act(pid) and returns the command's
// exit status once it has ended (at most timeout_s after act); -1 if a signal ended it, if the
// marker never came or if it did not end in time (then it is killed). Waiting for the marker,
// not a fixed delay, makes act land mid-training on a slow or loaded machine too.
inline int run_command_until(const std::string& cmd, const std::filesystem::path& log, const std::string& marker,
                             const std::function<void(pid_t)>& act, std::string* out = nullptr, int timeout_s = 300) {
  const pid_t pid = fork();
  if (pid == 0) {
    const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) _exit(127);
    dup2(fd, 1);
    dup2(fd, 2);
    execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  REQUIRE(pid > 0);
  const auto read_log = [&] {
    std::ifstream f(log);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  };
  bool seen = false, ended = false;
  int status = 0;
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (std::chrono::steady_clock::now() < until) {
    if (waitpid(pid, &status, WNOHANG) == pid) {
      ended = true;
      break;
    }
    if (!seen && read_log().find(marker) != std::string::npos) {
      seen = true;
      act(pid);
      until = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (!ended) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
  }
  const std::string text = read_log();
  if (out) *out = text;
  UNSCOPED_INFO("$ " << cmd << "  (at '" << marker << "': " << (seen ? "acted" : "never seen") << "; "
                     << (ended ? "ended" : "killed: it did not end in time") << ")\n"
                     << text);
  return seen && ended && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// run_command_until with SIGINT as the act: Ctrl-C mid-run.
inline int run_command_interrupted(const std::string& cmd, const std::filesystem::path& log,
                                   const std::string& marker, std::string* out = nullptr, int timeout_s = 300) {
  return run_command_until(cmd, log, marker, [](pid_t pid) { kill(pid, SIGINT); }, out, timeout_s);
}

}  // namespace diffuse::testing
