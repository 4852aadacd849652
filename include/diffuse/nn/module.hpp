// Module: a named tree of parameters, as torch.nn.Module.
//
// Parameters are registered with local names and children with a prefix, so
// `named_parameters()` yields PyTorch-style names ("net.0.weight") that match
// the reference models and checkpoints. Buffers (batch norm's running
// statistics) are state that is saved and loaded but not trained: they are in
// `named_state()` (parameters, then buffers) and not in `parameters()`, so
// optimisers never see them.
//
// Children: a module owns its children, either as members (register_module(name, member)) or
// on the heap through a std::unique_ptr (register_module(name, ptr), also for children in a
// vector or made in a helper). Modules can be moved (a model returned from a factory, kept in
// a vector): members are found again at the same offset in the moved object, heap children
// stay where they are. Copying is not offered: a layer's Var members are handles to its
// parameters, so a copy would share them; to duplicate a model, construct a second one with
// the same config and load_state_dict(model.state_dict()).
//
// train()/eval() set a flag on the module and all its children (is_training()), which the
// Dropout module reads; the library's own models take dropout's generator instead (given
// while training, not while sampling).
//
// Devices: `to(Device::CUDA)` moves every parameter and buffer in place (the
// Vars that optimisers hold see the move), so the same object trains or
// evaluates on either device. A parameter may be stored in another layout
// than PyTorch's (conv weights are OHWI, ParamLayout::ConvOHWI);
// `state_dict()` and `load_state_dict()` convert, so checkpoints hold PyTorch's
// names and layouts whatever the device.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <diffuse/core/autograd.hpp>

namespace diffuse {

// PyTorch's shape of a tensor stored as `s` in layout `l`.
inline Shape torch_shape(const Shape& s, ParamLayout l) {
  if (l == ParamLayout::ConvOHWI && s.size() == 4) return {s[0], s[3], s[1], s[2]};
  return s;
}

// A CPU copy of t (stored in layout l, on any device) in PyTorch's layout.
template <class T>
inline Tensor<T> to_torch_layout(const Tensor<T>& t, ParamLayout l) {
  const Tensor<T> c = t.cpu();
  if (l == ParamLayout::Torch) return c.shares_storage(t) ? c.clone() : c;
  const int64_t O = c.size(0), kh = c.size(1), kw = c.size(2), C = c.size(3), taps = kh * kw;
  Tensor<T> out({O, C, kh, kw});
  for (int64_t o = 0; o < O; ++o)
    for (int64_t tp = 0; tp < taps; ++tp)
      for (int64_t ch = 0; ch < C; ++ch) out[static_cast<size_t>((o * C + ch) * taps + tp)] = c[static_cast<size_t>((o * taps + tp) * C + ch)];
  return out;
}

// A CPU tensor in PyTorch's layout -> the same numbers in layout l (a CPU tensor).
template <class T>
inline Tensor<T> from_torch_layout(const Tensor<T>& t, ParamLayout l) {
  const Tensor<T> c = t.cpu();
  if (l == ParamLayout::Torch) return c;
  if (c.dim() != 4) throw std::invalid_argument("diffuse: a conv weight must be 4-D, got " + shape_str(c.shape()));
  const int64_t O = c.size(0), C = c.size(1), kh = c.size(2), kw = c.size(3), taps = kh * kw;
  Tensor<T> out({O, kh, kw, C});
  for (int64_t o = 0; o < O; ++o)
    for (int64_t ch = 0; ch < C; ++ch)
      for (int64_t tp = 0; tp < taps; ++tp) out[static_cast<size_t>((o * taps + tp) * C + ch)] = c[static_cast<size_t>((o * C + ch) * taps + tp)];
  return out;
}

template <class T>
using NamedTensors = std::vector<std::pair<std::string, Tensor<T>>>;

template <class T>
class Module {
 public:
  Module() = default;
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;
  Module(Module&& o) noexcept { take(o); }
  Module& operator=(Module&& o) noexcept {
    if (this != &o) take(o);
    return *this;
  }

  // Training mode (the default) or evaluation mode, for this module and all its children.
  Module& train(bool on = true) {
    training_ = on;
    for (const auto& c : children_) child(c).train(on);
    return *this;
  }
  Module& eval() { return train(false); }
  bool is_training() const { return training_; }

  // The direct children, in registration order, with their names.
  std::vector<std::pair<std::string, const Module*>> named_children() const {
    std::vector<std::pair<std::string, const Module*>> out;
    for (const auto& c : children_) out.emplace_back(c.name, &child(c));
    return out;
  }

  std::vector<std::pair<std::string, Var<T>>> named_parameters() const {
    std::vector<std::pair<std::string, Var<T>>> out;
    collect("", out);
    return out;
  }
  std::vector<Var<T>> parameters() const {
    std::vector<Var<T>> out;
    for (auto& [n, v] : named_parameters()) out.push_back(v);
    return out;
  }
  std::vector<std::pair<std::string, Var<T>>> named_buffers() const {
    std::vector<std::pair<std::string, Var<T>>> out;
    collect_buffers("", out);
    return out;
  }
  // Everything a checkpoint holds for this module: parameters, then buffers.
  std::vector<std::pair<std::string, Var<T>>> named_state() const {
    std::vector<std::pair<std::string, Var<T>>> out = named_parameters();
    collect_buffers("", out);
    return out;
  }
  int64_t num_parameters() const {
    int64_t n = 0;
    for (auto& [name, v] : named_parameters()) n += v.value().numel();
    return n;
  }
  void zero_grad() {
    for (auto& [n, v] : named_parameters()) v.zero_grad();
  }

  // Moves every parameter and buffer to `dev` (a copy; nothing happens for those already
  // there). Gradients are dropped. Returns *this.
  Module& to(Device dev) {
    for (auto& [n, v] : named_state()) {
      Node<T>& node = *v.node();
      if (node.value.device() != dev) node.value = node.value.to(dev);
      node.grad = Tensor<T>();
      node.has_grad = false;
    }
    return *this;
  }
  // The device of the parameters (CPU for a module without any).
  Device device() const {
    const auto s = named_state();
    return s.empty() ? Device::CPU : s.front().second.device();
  }

  // Parameters then buffers as CPU tensors in PyTorch's names and layouts (copies).
  NamedTensors<T> state_dict() const {
    NamedTensors<T> out;
    for (const auto& [n, v] : named_state()) out.emplace_back(n, to_torch_layout(v.value(), v.layout()));
    return out;
  }
  // Copies tensors in PyTorch's layouts (a state_dict(), a checkpoint's) into the parameters and
  // buffers, on whatever device they are. Strict: every name must be given with its shape, and
  // no other name (a different model) is accepted. `who` names the source in messages.
  void load_state_dict(const NamedTensors<T>& named, const std::string& who = "state dict") {
    std::map<std::string, const Tensor<T>*> by_name;
    for (const auto& [n, t] : named) by_name[n] = &t;
    for (auto& [n, v] : named_state()) {
      auto it = by_name.find(n);
      if (it == by_name.end()) throw std::invalid_argument("diffuse: " + who + " is missing '" + n + "'");
      const Shape want = torch_shape(v.value().shape(), v.layout());
      if (it->second->shape() != want)
        throw std::invalid_argument("diffuse: " + who + ": '" + n + "' has shape " + shape_str(it->second->shape()) +
                                    ", the model expects " + shape_str(want));
      v.node()->value.copy_from(from_torch_layout(*it->second, v.layout()));
      by_name.erase(it);
    }
    if (!by_name.empty())
      throw std::invalid_argument("diffuse: " + who + " has '" + by_name.begin()->first + "', which the model does not have");
  }

 protected:
  // layout: how `init` relates to PyTorch's layout of this parameter (checkpoints convert).
  Var<T> register_parameter(const std::string& name, Tensor<T> init, ParamLayout layout = ParamLayout::Torch) {
    Var<T> v(std::move(init), true);
    v.node()->layout = layout;
    params_.emplace_back(name, v);
    return v;
  }
  Var<T> register_buffer(const std::string& name, Tensor<T> init) {
    Var<T> v(std::move(init), false);
    buffers_.emplace_back(name, v);
    return v;
  }
  // A child that is a member of this module (found at the same offset after a move).
  void register_module(const std::string& name, Module& member) {
    const std::ptrdiff_t off = reinterpret_cast<const char*>(&member) - reinterpret_cast<const char*>(this);
    if (off <= 0)
      throw std::logic_error("diffuse: register_module('" + name + "'): not a member; register a heap child by its unique_ptr");
    children_.push_back({name, off, nullptr});
  }
  // A child on the heap, owned by this module through `owner` (a member, or an element of a member vector).
  template <class M>
  void register_module(const std::string& name, const std::unique_ptr<M>& owner) {
    if (!owner) throw std::logic_error("diffuse: register_module('" + name + "'): null module");
    children_.push_back({name, 0, static_cast<Module*>(owner.get())});
  }

 private:
  void collect(const std::string& prefix, std::vector<std::pair<std::string, Var<T>>>& out) const {
    for (const auto& [n, v] : params_) {
      Var<T> p = v;
      p.set_name(prefix + n);
      out.emplace_back(prefix + n, p);
    }
    for (const auto& c : children_) child(c).collect(prefix + c.name + ".", out);
  }
  void collect_buffers(const std::string& prefix, std::vector<std::pair<std::string, Var<T>>>& out) const {
    for (const auto& [n, v] : buffers_) {
      Var<T> b = v;
      b.set_name(prefix + n);
      out.emplace_back(prefix + n, b);
    }
    for (const auto& c : children_) child(c).collect_buffers(prefix + c.name + ".", out);
  }
  struct Child {
    std::string name;
    std::ptrdiff_t offset;  // a member: its offset from this module
    Module* heap;           // a heap child (offset unused)
  };
  Module& child(const Child& c) const {
    if (c.heap) return *c.heap;
    return *reinterpret_cast<Module*>(const_cast<char*>(reinterpret_cast<const char*>(this)) + c.offset);
  }
  void take(Module& o) {
    params_ = std::move(o.params_);
    buffers_ = std::move(o.buffers_);
    children_ = std::move(o.children_);
    training_ = o.training_;
    o.params_.clear(), o.buffers_.clear(), o.children_.clear();
  }
  std::vector<std::pair<std::string, Var<T>>> params_, buffers_;
  std::vector<Child> children_;
  bool training_ = true;
};

}  // namespace diffuse
