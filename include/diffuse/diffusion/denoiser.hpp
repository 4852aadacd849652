// A denoiser is the model itself: anything callable as model(x_t, t), model(x_t, t, labels) or
// model(x_t, t, labels, dropout_rng) on Vars (UNet, ToyMLP, a user's module). The training loop
// and the samplers call it through denoise(); eps_model()/class_eps_model() make the Tensor
// callables the sampler steps use (under NoGrad, so sampling records no tape).
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include <diffuse/core/autograd.hpp>
#include <diffuse/core/rng.hpp>

namespace diffuse {

using Labels = std::vector<int32_t>;

template <class M, class T>
inline constexpr bool takes_labels_v =
    std::is_invocable_v<const M&, const Var<T>&, const std::vector<int32_t>&, const Labels*>;
template <class M, class T>
inline constexpr bool takes_dropout_rng_v =
    std::is_invocable_v<const M&, const Var<T>&, const std::vector<int32_t>&, const Labels*, Generator*>;
template <class M, class T>
inline constexpr bool is_denoiser_v = takes_dropout_rng_v<M, T> || takes_labels_v<M, T> ||
                                      std::is_invocable_v<const M&, const Var<T>&, const std::vector<int32_t>&>;

// model(x, t[, y[, rng]]) with whatever the model takes. y: one label per image or null
// (unconditional); rng: dropout on (training) when given and the model has dropout.
template <class T, class M>
inline Var<T> denoise(const M& model, const Var<T>& x, const std::vector<int32_t>& t, const Labels* y = nullptr,
                      Generator* rng = nullptr) {
  static_assert(is_denoiser_v<M, T>, "diffuse: a denoiser is callable as model(Var x, t) or model(Var x, t, labels*)");
  if constexpr (takes_dropout_rng_v<M, T>) {
    return model(x, t, y, rng);
  } else if constexpr (takes_labels_v<M, T>) {
    return model(x, t, y);
  } else {
    if (y) throw std::invalid_argument("diffuse: the data has class labels but the model takes none");
    return model(x, t);
  }
}

// The sampler's view of a model: x_t, t -> predicted eps as a Tensor, no tape. The model is
// held by reference: it must outlive the callable.
template <class T, class M>
inline std::function<Tensor<T>(const Tensor<T>&, const std::vector<int32_t>&)> eps_model(const M& model) {
  return [&model](const Tensor<T>& x, const std::vector<int32_t>& t) {
    NoGrad ng;
    return denoise<T>(model, Var<T>(x), t).value();
  };
}

// The same with labels: x_t, t, y -> eps (for classifier-free guidance).
template <class T, class M>
inline std::function<Tensor<T>(const Tensor<T>&, const std::vector<int32_t>&, const Labels&)> class_eps_model(
    const M& model) {
  return [&model](const Tensor<T>& x, const std::vector<int32_t>& t, const Labels& y) {
    NoGrad ng;
    return denoise<T>(model, Var<T>(x), t, &y).value();
  };
}

}  // namespace diffuse
