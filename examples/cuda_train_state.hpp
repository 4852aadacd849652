// The trainers' handover between the CPU model and a CudaTrainer (cuda_models.hpp): the weights,
// Adam's moments and step count, the EMA copy and its update count, by parameter name. Host code
// only (it uses the CPU optimisers); train_mnist and train_2d use it.
#pragma once

#include <diffuse/optim.hpp>

#include <map>
#include <string>

#include "cuda_models.hpp"

namespace diffuse::examples {

// The state of opt (and of ema when with_ema), for make_cuda_*_trainer.
inline CudaTrainState cuda_train_state(Adam<float>& opt, EMA<float>& ema, bool with_ema) {
  CudaTrainState st;
  const auto params = opt.params();
  for (size_t k = 0; k < params.size(); ++k) {
    st.weights.emplace_back(params[k].first, params[k].second.value());
    st.m.emplace_back(params[k].first, opt.first_moments()[k]);
    st.v.emplace_back(params[k].first, opt.second_moments()[k]);
    if (with_ema) st.ema.emplace_back(params[k].first, ema.shadow()[k]);
  }
  st.adam_steps = opt.steps();
  st.ema_updates = ema.updates();
  return st;
}

// st (a CudaTrainer's state()) into the CPU model (through opt's parameter handles), opt and ema.
inline void apply_cuda_train_state(const CudaTrainState& st, Adam<float>& opt, EMA<float>& ema) {
  std::map<std::string, size_t> at;
  auto params = opt.params();  // handles: writing their values writes the model's
  for (size_t k = 0; k < params.size(); ++k) at[params[k].first] = k;
  for (const auto& [n, t] : st.weights) params[at.at(n)].second.value().copy_from(t);
  for (const auto& [n, t] : st.m) opt.first_moments()[at.at(n)].copy_from(t);
  for (const auto& [n, t] : st.v) opt.second_moments()[at.at(n)].copy_from(t);
  for (const auto& [n, t] : st.ema) ema.shadow()[at.at(n)].copy_from(t);
  opt.set_steps(st.adam_steps);
  ema.set_updates(st.ema_updates);
}

}  // namespace diffuse::examples
