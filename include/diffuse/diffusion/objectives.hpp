// Training objectives: L_simple, mean((eps_theta(x_t, t) - eps)^2) (epsilon prediction).
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <diffuse/core/autograd.hpp>
#include <diffuse/diffusion/q_sample.hpp>
#include <diffuse/ops/reduce.hpp>

namespace diffuse {

// L_simple: mean((eps_theta(x_t, t) - eps)^2). `model` maps (Var x_t, t) -> Var eps.
template <class T, class Model>
inline Var<T> epsilon_loss(Model&& model, const NoisedBatch<T>& nb) {
  return mse(model(Var<T>(nb.x_t), nb.t), Var<T>(nb.eps));
}

}  // namespace diffuse
