// Training checkpoints in safetensors: model weights under their PyTorch names
// and layouts (so the file loads into the reference with load_state_dict), plus
// "ema.<name>", "optim.exp_avg.<name>", "optim.exp_avg_sq.<name>", and the step,
// optimiser step, EMA count and RNG state in the metadata. Restoring all of it
// makes a resumed run continue bit for bit. The file is the same whatever device
// trained the model: tensors are copied to the host and into PyTorch's layout to
// save (nn/module.hpp's ParamLayout), and back onto each parameter's device to load.
#pragma once

#include <cmath>

#include <map>
#include <optional>
#include <set>
#include <string>

#include <diffuse/nn/module.hpp>
#include <diffuse/optim/adam.hpp>
#include <diffuse/optim/ema.hpp>
#include <diffuse/io/safetensors.hpp>

namespace diffuse {

inline constexpr const char* kCheckpointFormat = "diffuse.checkpoint.v1";

struct TrainState {
  int64_t step = 0;
  Generator rng;
  safetensors::Metadata metadata;  // everything in the file's metadata, including the caller's extras
};

template <class T>
void save_checkpoint(const std::string& path, const Module<T>& model, Adam<T>* opt, EMA<T>* ema,
                     int64_t step, const Generator& rng, const safetensors::Metadata& extra = {}) {
  safetensors::Writer w;
  const auto params = model.named_parameters();
  auto torch = [&](size_t k, const Tensor<T>& t) { return to_torch_layout(t, params[k].second.layout()); };
  for (const auto& [name, t] : model.state_dict()) w.add(name, t);
  if (ema)
    for (size_t k = 0; k < params.size(); ++k) w.add("ema." + params[k].first, torch(k, ema->shadow()[k]));
  if (opt)
    for (size_t k = 0; k < params.size(); ++k) {
      w.add("optim.exp_avg." + params[k].first, torch(k, opt->first_moments()[k]));
      w.add("optim.exp_avg_sq." + params[k].first, torch(k, opt->second_moments()[k]));
    }
  w.metadata = extra;
  w.metadata["format"] = kCheckpointFormat;
  w.metadata["step"] = std::to_string(step);
  w.metadata["rng.seed"] = std::to_string(rng.seed);
  w.metadata["rng.offset"] = std::to_string(rng.offset);
  if (opt) w.metadata["optim.step"] = std::to_string(opt->steps());
  if (ema) w.metadata["ema.updates"] = std::to_string(ema->updates());
  w.write(path);
}

namespace detail {
inline int64_t meta_int(const safetensors::File& f, const std::string& key) {
  return safetensors::metadata_number<int64_t>(f.metadata(), key, "checkpoint '" + f.path() + "'");
}
inline uint64_t meta_uint(const safetensors::File& f, const std::string& key) {
  return safetensors::metadata_number<uint64_t>(f.metadata(), key, "checkpoint '" + f.path() + "'");
}
}  // namespace detail

namespace detail {
// A checkpoint's tensors are finite (a NaN weight would resume into a NaN loss, or sample
// noise); second moments are not negative either (Adam takes their square root).
template <class T>
void require_finite(const Tensor<T>& host, const std::string& path, const std::string& key, bool non_negative = false) {
  const T* d = host.data();
  for (int64_t i = 0; i < host.numel(); ++i)
    if (!std::isfinite(static_cast<double>(d[i])) || (non_negative && d[i] < T(0)))
      throw std::runtime_error("diffuse: '" + path + "': tensor '" + key + "' has " +
                               (std::isfinite(static_cast<double>(d[i])) ? "a negative" : "a non-finite") +
                               " value at element " + std::to_string(i));
}
}  // namespace detail

// Loads model weights (strict: every parameter and buffer present with its shape, every value
// finite). Other
// tensors in the file are ignored only if they belong to the ema./optim. groups.
template <class T>
void load_weights(const safetensors::File& f, Module<T>& model, const std::string& prefix = "") {
  std::set<std::string> expected;
  for (auto& [name, p] : model.named_state()) {
    const std::string key = prefix + name;
    expected.insert(key);
    if (!f.contains(key)) throw std::runtime_error("diffuse: '" + f.path() + "' is missing tensor '" + key + "'");
    const safetensors::View& v = f.at(key);
    const Shape want = torch_shape(p.value().shape(), p.layout());
    if (v.shape != want)
      throw std::runtime_error("diffuse: '" + f.path() + "': tensor '" + key + "' has shape " + shape_str(v.shape) +
                               ", the model expects " + shape_str(want));
    Tensor<T> host(want);
    f.copy_converted(v, key, host.data());
    detail::require_finite(host, f.path(), key);
    p.node()->value.copy_from(from_torch_layout(host, p.layout()));
  }
  if (prefix.empty())
    for (const auto& n : f.names())
      if (!expected.count(n) && n.rfind("ema.", 0) != 0 && n.rfind("optim.", 0) != 0)
        throw std::runtime_error("diffuse: '" + f.path() + "' has tensor '" + n + "' that the model does not have");
}

template <class T>
TrainState load_checkpoint(const std::string& path, Module<T>& model, Adam<T>* opt, EMA<T>* ema) {
  const safetensors::File f = safetensors::File::read(path);
  load_weights(f, model);
  const auto params = model.named_parameters();
  // A tensor of parameter k's PyTorch shape from the file, in its layout, on its device.
  auto state = [&](size_t k, const std::string& key, bool non_negative = false) {
    const Var<T>& p = params[k].second;
    const Shape want = torch_shape(p.value().shape(), p.layout());
    const Tensor<T> host = f.tensor<T>(key, &want);
    detail::require_finite(host, f.path(), key, non_negative);
    return from_torch_layout(host, p.layout()).to(p.device());
  };
  if (ema) {
    for (size_t k = 0; k < params.size(); ++k) ema->shadow()[k] = state(k, "ema." + params[k].first);
    ema->set_updates(detail::meta_int(f, "ema.updates"));
  }
  if (opt) {
    for (size_t k = 0; k < params.size(); ++k) {
      opt->first_moments()[k] = state(k, "optim.exp_avg." + params[k].first);
      opt->second_moments()[k] = state(k, "optim.exp_avg_sq." + params[k].first, true);
    }
    opt->set_steps(detail::meta_int(f, "optim.step"));
  }
  TrainState st;
  st.step = detail::meta_int(f, "step");
  if (st.step < 0) throw std::runtime_error("diffuse: checkpoint '" + f.path() + "': metadata 'step' is negative");
  st.rng = Generator(detail::meta_uint(f, "rng.seed"), detail::meta_uint(f, "rng.offset"));
  st.metadata = f.metadata();
  return st;
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(void save_checkpoint<float>(const std::string& path, const Module<float>& model,
    Adam<float>* opt, EMA<float>* ema, int64_t step, const Generator& rng, const safetensors::Metadata& extra))
DIFFUSE_FLOAT_INSTANCE(void load_weights<float>(const safetensors::File& f, Module<float>& model,
    const std::string& prefix))
DIFFUSE_FLOAT_INSTANCE(TrainState load_checkpoint<float>(const std::string& path, Module<float>& model,
    Adam<float>* opt, EMA<float>* ema))

}  // namespace diffuse
