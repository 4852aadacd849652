// SIGINT/SIGTERM while training: the first one asks the loop to stop after the current step
// (it then writes a checkpoint); a second one ends the process at once, unless it comes within
// half a second of the first: timeout(1) sends its signal to the program and again to its
// process group, and that echo must not kill the checkpoint the first one asked for. The
// previous handlers come back when the guard goes.
#pragma once

#include <atomic>
#include <csignal>
#include <cstdint>
#include <ctime>

namespace diffuse {

namespace detail {
inline volatile std::sig_atomic_t g_stop_signal = 0;
inline std::atomic<int64_t> g_stop_signal_ms{0};  // lock-free: safe in a handler
extern "C" inline void on_stop_signal(int sig) {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);  // async-signal-safe
  const int64_t now = static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
  if (g_stop_signal == 0) {
    g_stop_signal = sig;
    g_stop_signal_ms = now;
    return;
  }
  if (now - g_stop_signal_ms < 500) return;  // the echo of the first
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}
}  // namespace detail

class StopSignals {
 public:
  explicit StopSignals(bool install = true) : installed_(install) {
    detail::g_stop_signal = 0;
    if (!installed_) return;
    old_int_ = std::signal(SIGINT, detail::on_stop_signal);
    old_term_ = std::signal(SIGTERM, detail::on_stop_signal);
  }
  ~StopSignals() {
    if (!installed_) return;
    std::signal(SIGINT, old_int_);
    std::signal(SIGTERM, old_term_);
  }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  // The signal that asked to stop, or 0.
  int requested() const { return detail::g_stop_signal; }

 private:
  bool installed_;
  void (*old_int_)(int) = SIG_DFL;
  void (*old_term_)(int) = SIG_DFL;
};

}  // namespace diffuse
