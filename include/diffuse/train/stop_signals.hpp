// SIGINT/SIGTERM while training: the first one asks the loop to stop after the current step
// (it then writes a checkpoint); the handler is reset to the default, so a second one ends the
// process at once. The previous handlers come back when the guard goes.
#pragma once

#include <csignal>

namespace diffuse {

namespace detail {
inline volatile std::sig_atomic_t g_stop_signal = 0;
extern "C" inline void on_stop_signal(int sig) {
  g_stop_signal = sig;
  std::signal(sig, SIG_DFL);
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
