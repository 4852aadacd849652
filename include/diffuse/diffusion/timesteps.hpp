// Which of the schedule's T timesteps a K-step sampler visits (timestep spacing), ascending:
//
//   uniform    i T / K, i = 0..K-1 (integer division): DDIM's "uniform" (Song et al. 2021), the
//              library's DDIM default; starts at T - T/K, ends at t = 0 (diffusers: "leading")
//   linspace   round(i (T - 1) / (K - 1)): both ends of the chain, t = T - 1 and t = 0
//   trailing   round((i + 1) T / K) - 1: starts at t = T - 1, ends at round(T / K) - 1
//              (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed":
//              the first step at full noise; better at few steps)
//   quadratic  floor((i sqrt(0.8 T) / (K - 1))^2): DDIM's CIFAR-10 choice, dense near t = 0 (where
//              two would coincide, the later one is moved up by one: DDIM's code repeats them)
//
// round() is to nearest even, as NumPy's (diffusers computes these spacings with it). Every list
// has K distinct timesteps in [0, T-1] (a spacing that would repeat one for this K
// and T is refused). The sampler's last step goes from the smallest to abar = 1 (no noise).
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace diffuse {

enum class Spacing { Uniform, Linspace, Trailing, Quadratic };

inline Spacing parse_spacing(const std::string& s) {
  if (s == "uniform") return Spacing::Uniform;
  if (s == "linspace") return Spacing::Linspace;
  if (s == "trailing") return Spacing::Trailing;
  if (s == "quadratic") return Spacing::Quadratic;
  throw std::invalid_argument("diffuse: unknown timestep spacing '" + s + "' (uniform, linspace, trailing, quadratic)");
}

inline const char* spacing_name(Spacing s) {
  switch (s) {
    case Spacing::Uniform: return "uniform";
    case Spacing::Linspace: return "linspace";
    case Spacing::Trailing: return "trailing";
    case Spacing::Quadratic: return "quadratic";
  }
  return "?";
}

// The K timesteps of `spacing` among T, ascending (see the top of this file).
inline std::vector<int> sample_timesteps(int T, int K, Spacing spacing = Spacing::Uniform) {
  if (K < 1 || K > T)
    throw std::invalid_argument("diffuse: sampling steps must be in [1, T = " + std::to_string(T) + "], got " +
                                std::to_string(K));
  std::vector<int> ts(static_cast<size_t>(K));
  for (int i = 0; i < K; ++i) {
    switch (spacing) {
      case Spacing::Uniform: ts[i] = static_cast<int>(static_cast<int64_t>(i) * T / K); break;
      case Spacing::Linspace:
        ts[i] = K == 1 ? T - 1 : static_cast<int>(std::nearbyint(static_cast<double>(i) * (T - 1) / (K - 1)));
        break;
      case Spacing::Trailing:
        ts[i] = static_cast<int>(std::nearbyint(static_cast<double>(i + 1) * T / K)) - 1;
        break;
      case Spacing::Quadratic: {
        const double c = K == 1 ? 0.0 : static_cast<double>(i) * std::sqrt(0.8 * T) / (K - 1);
        ts[i] = std::max(static_cast<int>(std::floor(c * c)), i > 0 ? ts[i - 1] + 1 : 0);
        break;
      }
    }
  }
  for (int i = 0; i < K; ++i)
    if (ts[i] < 0 || ts[i] > T - 1 || (i > 0 && ts[i] <= ts[i - 1]))
      throw std::invalid_argument(std::string("diffuse: ") + spacing_name(spacing) + " spacing gives repeated timesteps for " +
                                  std::to_string(K) + " steps of T = " + std::to_string(T) + "; use fewer steps or another spacing");
  return ts;
}

}  // namespace diffuse
