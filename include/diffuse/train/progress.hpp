// What a long run prints: a line every N steps (step, loss, learning rate, gradient norm,
// images/s, elapsed, ETA) and, when the output is a terminal, a bar redrawn in place between
// those lines.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>

#include <unistd.h>

#include <diffuse/core/config.hpp>

namespace diffuse {

enum class ProgressBar { automatic, on, off };  // automatic: on when the stream is a terminal

// 42s, 3m05s, 2h07m; "?" for a non-finite or negative time.
inline std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  char b[32];
  const long long r = static_cast<long long>(std::llround(s));
  if (r < 60) std::snprintf(b, sizeof b, "%llds", r);
  else if (r < 3600) std::snprintf(b, sizeof b, "%lldm%02llds", r / 60, r % 60);
  else std::snprintf(b, sizeof b, "%lldh%02lldm", r / 3600, (r / 60) % 60);
  return b;
}

class Progress {
 public:
  Progress(FILE* out, int64_t total, ProgressBar bar)
      : out_(out), total_(std::max<int64_t>(total, 1)),
        bar_(out && (bar == ProgressBar::on || (bar == ProgressBar::automatic && ::isatty(::fileno(out))))) {}
  ~Progress() { finish(); }

  bool bar_enabled() const { return bar_; }
  // Data parallelism: the line says how many processes the images/s (of the whole batch) are from.
  void set_ranks(int n) { ranks_ = n; }

  // The line: every figure of the last window.
  void line(int64_t step, double loss, double lr, double grad_norm, double images_per_s, double elapsed_s,
            double eta_s) {
    if (!out_) return;
    clear_bar();
    const std::string on = ranks_ > 1 ? " on " + std::to_string(ranks_) + " ranks" : "";
    std::fprintf(out_, "step %*lld/%lld  loss %.4f  lr %.2e  grad %.3f  %.0f images/s%s  elapsed %s  ETA %s\n",
                 width(), static_cast<long long>(step), static_cast<long long>(total_), loss, lr, grad_norm,
                 images_per_s, on.c_str(), format_duration(elapsed_s).c_str(), format_duration(eta_s).c_str());
    std::fflush(out_);
  }
  // Any other message (evaluations, checkpoints), below the bar.
  void message(const std::string& s) {
    if (!out_) return;
    clear_bar();
    std::fprintf(out_, "%s\n", s.c_str());
    std::fflush(out_);
  }
  // Redraws the bar (at most ~10 times a second).
  void bar(int64_t step, double loss, double eta_s);
  // Whether bar() would redraw now (so that the loss is fetched only then).
  bool bar_due(int64_t step) const {
    return bar_ && (!drawn_ || std::chrono::steady_clock::now() - last_ >= std::chrono::milliseconds(100) ||
                    step >= total_);
  }
  void finish() { clear_bar(); }

 private:
  int width() const { return static_cast<int>(std::to_string(total_).size()); }
  void clear_bar() {
    if (!drawn_) return;
    std::fprintf(out_, "\r\033[K");
    drawn_ = false;
  }
  FILE* out_;
  int64_t total_;
  int ranks_ = 1;
  bool bar_, drawn_ = false;
  std::chrono::steady_clock::time_point last_{};
};

#if DIFFUSE_DEFINE_IMPL
DIFFUSE_IMPL_INLINE void Progress::bar(int64_t step, double loss, double eta_s) {
  if (!bar_) return;
  const auto now = std::chrono::steady_clock::now();
  if (drawn_ && now - last_ < std::chrono::milliseconds(100) && step < total_) return;
  last_ = now;
  constexpr int W = 30;
  const double f = std::clamp(static_cast<double>(step) / static_cast<double>(total_), 0.0, 1.0);
  const int fill = static_cast<int>(f * W);
  std::string b(static_cast<size_t>(fill), '=');
  if (fill < W) b += '>';
  b.resize(W, ' ');
  std::fprintf(out_, "\r[%s] %3.0f%%  %lld/%lld  loss %.4f  ETA %s\033[K", b.c_str(), 100 * f,
               static_cast<long long>(step), static_cast<long long>(total_), loss, format_duration(eta_s).c_str());
  std::fflush(out_);
  drawn_ = true;
}
#endif  // DIFFUSE_DEFINE_IMPL

}  // namespace diffuse
