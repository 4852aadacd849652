// Noise schedules and the quantities derived from them, in double.
//
//   alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s           (t = 0..T-1)
//   posterior q(x_{t-1} | x_t, x_0): variance beta_t (1 - abar_{t-1}) / (1 - abar_t),
//   mean coef1 x_0 + coef2 x_t with coef1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t),
//   coef2 = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t), and abar_{-1} = 1.
#pragma once

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/core/config.hpp>

namespace diffuse {

class NoiseSchedule {
 public:
  // Ho et al.'s linear betas from 1e-4 to 0.02 at T = 1000, scaled by 1000 / T so
  // that a shorter chain still ends near pure noise (as the PyTorch reference does):
  //   beta_t = linspace(beta_start * 1000/T, beta_end * 1000/T, T).
  static NoiseSchedule linear(int T, double beta_start = 1e-4, double beta_end = 0.02) {
    check_T(T);
    const double s = 1000.0 / T;
    std::vector<double> b(static_cast<size_t>(T));
    for (int t = 0; t < T; ++t)
      b[t] = T == 1 ? beta_start * s : beta_start * s + (beta_end * s - beta_start * s) * t / (T - 1);
    for (double x : b)
      if (!(x > 0 && x < 1))
        throw std::invalid_argument("diffuse: linear schedule with T = " + std::to_string(T) +
                                    " gives betas outside (0, 1); use a larger T");
    return NoiseSchedule("linear", std::move(b));
  }

  // Nichol & Dhariwal's cosine schedule: abar(t) = f(t) / f(0),
  // f(t) = cos^2(((t / T + s) / (1 + s)) pi / 2), beta_t = min(1 - abar(t+1) / abar(t), max_beta).
  static NoiseSchedule cosine(int T, double s = 0.008, double max_beta = 0.999) {
    check_T(T);
    auto f = [&](double t) {
      const double c = std::cos((t / T + s) / (1.0 + s) * M_PI / 2.0);
      return c * c;
    };
    std::vector<double> b(static_cast<size_t>(T));
    for (int t = 0; t < T; ++t) b[t] = std::min(1.0 - f(t + 1.0) / f(t), max_beta);
    return NoiseSchedule("cosine", std::move(b));
  }

  // The sigmoid schedule (Jabri et al. 2023, "Scalable adaptive computation"; Chen 2023, "On the
  // importance of noise scheduling"): abar(t) = (v_end - sigmoid((t/T (end - start) + start) / tau))
  // / (v_end - v_start), v = sigmoid(start / tau), sigmoid(end / tau), so abar(0) = 1 and abar(T) = 0;
  // beta_t = min(1 - abar(t+1) / abar(t), max_beta). Flatter than cosine at both ends.
  static NoiseSchedule sigmoid(int T, double start = -3, double end = 3, double tau = 1, double max_beta = 0.999) {
    check_T(T);
    if (!(end > start) || !(tau > 0)) throw std::invalid_argument("diffuse: sigmoid schedule needs end > start and tau > 0");
    auto sg = [](double x) { return 1.0 / (1.0 + std::exp(-x)); };
    const double v_start = sg(start / tau), v_end = sg(end / tau);
    auto f = [&](double t) { return (v_end - sg((t / T * (end - start) + start) / tau)) / (v_end - v_start); };
    std::vector<double> b(static_cast<size_t>(T));
    for (int t = 0; t < T; ++t) b[t] = std::min(1.0 - f(t + 1.0) / f(t), max_beta);
    return NoiseSchedule("sigmoid", std::move(b));
  }

  static NoiseSchedule by_name(const std::string& name, int T) {
    if (name == "linear") return linear(T);
    if (name == "cosine") return cosine(T);
    if (name == "sigmoid") return sigmoid(T);
    throw std::invalid_argument("diffuse: unknown schedule '" + name + "' (linear, cosine, sigmoid)");
  }

  int T() const { return static_cast<int>(beta.size()); }
  const std::string& name() const { return name_; }

  std::vector<double> beta, alpha, abar, abar_prev;
  std::vector<double> sqrt_abar, sqrt_one_minus_abar;
  std::vector<double> posterior_variance, posterior_coef1, posterior_coef2;

 private:
  static void check_T(int T) {
    if (T < 1) throw std::invalid_argument("diffuse: the number of diffusion steps T must be >= 1");
  }
  NoiseSchedule(std::string name, std::vector<double> b);
  std::string name_;
};

#if DIFFUSE_DEFINE_IMPL
DIFFUSE_IMPL_INLINE NoiseSchedule::NoiseSchedule(std::string name, std::vector<double> b)
    : beta(std::move(b)), name_(std::move(name)) {
  const size_t n = beta.size();
  alpha.resize(n);
  abar.resize(n);
  abar_prev.resize(n);
  sqrt_abar.resize(n);
  sqrt_one_minus_abar.resize(n);
  posterior_variance.resize(n);
  posterior_coef1.resize(n);
  posterior_coef2.resize(n);
  double prod = 1.0;
  for (size_t t = 0; t < n; ++t) {
    alpha[t] = 1.0 - beta[t];
    abar_prev[t] = prod;
    prod *= alpha[t];
    abar[t] = prod;
    sqrt_abar[t] = std::sqrt(abar[t]);
    sqrt_one_minus_abar[t] = std::sqrt(1.0 - abar[t]);
    posterior_variance[t] = beta[t] * (1.0 - abar_prev[t]) / (1.0 - abar[t]);
    posterior_coef1[t] = beta[t] * std::sqrt(abar_prev[t]) / (1.0 - abar[t]);
    posterior_coef2[t] = (1.0 - abar_prev[t]) * std::sqrt(alpha[t]) / (1.0 - abar[t]);
  }
}
#endif  // DIFFUSE_DEFINE_IMPL

}  // namespace diffuse
