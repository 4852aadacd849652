// Module: a named tree of parameters, as torch.nn.Module.
//
// Parameters are registered with local names and children with a prefix, so
// `named_parameters()` yields PyTorch-style names ("net.0.weight") that match
// the reference models and checkpoints. Buffers (batch norm's running
// statistics) are state that is saved and loaded but not trained: they are in
// `named_state()` (parameters, then buffers) and not in `parameters()`, so
// optimisers never see them. Modules own their children as members
// and are neither copied nor moved (children are referenced by address).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "autograd.hpp"

namespace diffuse {

template <class T>
class Module {
 public:
  Module() = default;
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

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

 protected:
  Var<T> register_parameter(const std::string& name, Tensor<T> init) {
    Var<T> v(std::move(init), true);
    params_.emplace_back(name, v);
    return v;
  }
  Var<T> register_buffer(const std::string& name, Tensor<T> init) {
    Var<T> v(std::move(init), false);
    buffers_.emplace_back(name, v);
    return v;
  }
  void register_module(const std::string& name, Module& child) { children_.emplace_back(name, &child); }

 private:
  void collect(const std::string& prefix, std::vector<std::pair<std::string, Var<T>>>& out) const {
    for (const auto& [n, v] : params_) {
      Var<T> p = v;
      p.set_name(prefix + n);
      out.emplace_back(prefix + n, p);
    }
    for (const auto& [n, c] : children_) c->collect(prefix + n + ".", out);
  }
  void collect_buffers(const std::string& prefix, std::vector<std::pair<std::string, Var<T>>>& out) const {
    for (const auto& [n, v] : buffers_) {
      Var<T> b = v;
      b.set_name(prefix + n);
      out.emplace_back(prefix + n, b);
    }
    for (const auto& [n, c] : children_) c->collect_buffers(prefix + n + ".", out);
  }
  std::vector<std::pair<std::string, Var<T>>> params_, buffers_;
  std::vector<std::pair<std::string, Module*>> children_;
};

}  // namespace diffuse
