// Learning-rate schedules: linear warmup, and warmup then cosine decay.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace diffuse {

// Linear warmup from lr/warmup to lr over the first `warmup` steps (step counts from 0).
inline double warmup_lr(double lr, int64_t step, int64_t warmup) {
  if (warmup <= 0) return lr;
  return lr * std::min(1.0, static_cast<double>(step + 1) / static_cast<double>(warmup));
}

// Warmup, then a cosine decay from lr to lr * final_frac at step `total`
// (Loshchilov & Hutter's schedule without restarts). Step counts from 0.
inline double warmup_cosine_lr(double lr, int64_t step, int64_t warmup, int64_t total, double final_frac = 0.0) {
  if (step < warmup) return warmup_lr(lr, step, warmup);
  const double span = static_cast<double>(std::max<int64_t>(1, total - warmup));
  const double p = std::min(1.0, static_cast<double>(step - warmup) / span);
  return lr * (final_frac + (1.0 - final_frac) * 0.5 * (1.0 + std::cos(3.14159265358979323846 * p)));
}


}  // namespace diffuse
