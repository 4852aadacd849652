// Classifier-free guidance (Ho & Salimans 2021) for class-conditional image
// models: train with some labels replaced by a "null" class, then sample with
//   eps = (1 + w) eps(x, t, y) - w eps(x, t, null)
// so w = 0 is the plain conditional model and larger w trades diversity for
// fidelity to the class. (Some code bases write eps_null + s (eps_y - eps_null);
// that s is 1 + w here.)
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <diffuse/core/autograd.hpp>
#include <diffuse/diffusion/samplers.hpp>
#include <diffuse/ops/shape.hpp>
#include <diffuse/core/rng.hpp>
#include <diffuse/core/tensor.hpp>

namespace diffuse {

// A class-conditional epsilon network: eps = f(x, t, y), y in 0..num_classes
// (num_classes = null).
template <class T>
using ClassEpsModel =
    std::function<Tensor<T>(const Tensor<T>& x, const std::vector<int32_t>& t, const std::vector<int32_t>& y)>;

// Each label becomes the null class with probability p (one uniform draw per label).
inline std::vector<int32_t> drop_labels(const std::vector<int32_t>& y, double p, int32_t null_class, Generator& g) {
  if (p < 0 || p > 1) throw std::invalid_argument("diffuse: label dropout must be in [0, 1], got " + std::to_string(p));
  std::vector<int32_t> out = y;
  if (p == 0 || y.empty()) return out;
  std::vector<float> u(y.size());
  g.uniform(u.data(), u.size());
  for (size_t i = 0; i < y.size(); ++i)
    if (u[i] < static_cast<float>(p)) out[i] = null_class;
  return out;
}

// cond <- (1 + w) cond - w uncond, elementwise (on the tensors' device).
template <class T>
inline void guide_combine(Tensor<T>& cond, const Tensor<T>& uncond, double w) {
  if (cond.shape() != uncond.shape() || cond.device() != uncond.device())
    throw std::invalid_argument("diffuse: guidance needs equal shapes on one device, got " + shape_str(cond.shape()) +
                                " and " + shape_str(uncond.shape()));
  const T a = static_cast<T>(1 + w), b = static_cast<T>(w);
  if (cond.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) {
      backend::require_cuda("guidance").axpby(-b, uncond.data(), a, cond.data(), cond.numel());
      return;
    } else {
      detail::cuda_float_only("guidance");
    }
  }
  T* c = cond.data();
  const T* u = uncond.data();
  for (size_t i = 0; i < cond.size(); ++i) c[i] = a * c[i] - b * u[i];
}

// The guided epsilon model for fixed labels y (one per image): with w != 0 one
// forward pass over the doubled batch [x; x] with labels [y; null], which keeps
// the GEMMs large, then guide_combine.
template <class T>
EpsModel<T> guided_eps_model(ClassEpsModel<T> f, std::vector<int32_t> y, int32_t null_class, double w) {
  return [f = std::move(f), y = std::move(y), null_class, w](const Tensor<T>& x, const std::vector<int32_t>& t) {
    const int64_t B = x.size(0);
    if (static_cast<int64_t>(y.size()) != B || static_cast<int64_t>(t.size()) != B)
      throw std::invalid_argument("diffuse: guided model got " + std::to_string(B) + " images, " +
                                  std::to_string(t.size()) + " timesteps and " + std::to_string(y.size()) + " labels");
    if (w == 0) return f(x, t, y);
    // [x; x] and the halves of the result through the ops, so on x's device.
    NoGrad ng;
    const Tensor<T> x2 = concat<T>({Var<T>(x), Var<T>(x)}, 0).value();
    std::vector<int32_t> t2(t), y2(y);
    t2.insert(t2.end(), t.begin(), t.end());
    y2.insert(y2.end(), y.size(), null_class);
    const Var<T> e2(f(x2, t2, y2));
    Tensor<T> cond = slice(e2, 0, 0, B).value();
    const Tensor<T> uncond = slice(e2, 0, B, 2 * B).value();
    guide_combine(cond, uncond, w);
    return cond;
  };
}

// The same from the model itself (a denoiser taking labels): guided_eps_model<float>(unet, y, 10, 0.3).
template <class T, class M>
  requires takes_labels_v<M, T> || takes_dropout_rng_v<M, T>
inline EpsModel<T> guided_eps_model(const M& model, std::vector<int32_t> y, int32_t null_class, double w) {
  return guided_eps_model<T>(ClassEpsModel<T>(class_eps_model<T>(model)), std::move(y), null_class, w);
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(EpsModel<float> guided_eps_model<float>(ClassEpsModel<float> f, std::vector<int32_t> y,
    int32_t null_class, double w))

}  // namespace diffuse
