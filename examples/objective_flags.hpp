// The trainers' --prediction and --min-snr flags (the library's Objective), the same in every tool.
#pragma once

#include <CLI/CLI.hpp>
#include <diffuse/diffusion/objectives.hpp>

#include "flag_checks.hpp"

#include <string>

namespace diffuse::examples {

inline void add_objective_options(CLI::App& app, std::string& prediction, double& min_snr) {
  app.add_option("--prediction", prediction, "what the network predicts: eps (the noise), x0 (the data) or v "
                                             "(alpha eps - sigma x0); recorded in the checkpoint")
      ->capture_default_str()
      ->check(CLI::IsMember({"eps", "x0", "v"}));
  app.add_option("--min-snr", min_snr, "min-SNR-gamma loss weighting with this gamma (5 in Hang et al. 2023); 0: off")
      ->capture_default_str()
      ->check(finite_in(0, 1e6));  // CLI::Range would let NaN through
}

inline Objective objective_from_flags(const std::string& prediction, double min_snr) {
  return Objective{parse_prediction(prediction), min_snr};
}

}  // namespace diffuse::examples
