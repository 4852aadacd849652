// Containers, as torch.nn.Sequential and torch.nn.ModuleList: children owned on the heap and
// named by their index ("0.weight", "2.bias"), so names match PyTorch's for the same list.
#pragma once

#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <diffuse/nn/module.hpp>

namespace diffuse {

// Modules (or parameter-free functions, e.g. an activation) applied in order: x -> f_n(...f_0(x)).
// A function takes an index as nn.SiLU does in PyTorch, so Linear, silu, Linear names its
// parameters 0.* and 2.*. seq(x, &rng) hands the generator to the steps that take one (Dropout).
template <class T>
class Sequential : public Module<T> {
 public:
  using Fn = std::function<Var<T>(const Var<T>&)>;
  using Step = std::function<Var<T>(const Var<T>&, Generator*)>;
  Sequential() = default;

  // Appends a module callable as m(Var) -> Var; returns it.
  template <class M>
  M& add(std::unique_ptr<M> m) {
    static_assert(std::is_base_of_v<Module<T>, M>, "Sequential::add: a Module<T>");
    M& ref = *m;
    owned_.push_back(std::move(m));
    this->register_module(std::to_string(steps_.size()), owned_.back());
    if constexpr (std::is_invocable_v<const M&, const Var<T>&, Generator*>)
      steps_.push_back([p = &ref](const Var<T>& x, Generator* g) { return (*p)(x, g); });
    else
      steps_.push_back([p = &ref](const Var<T>& x, Generator*) { return (*p)(x); });
    return ref;
  }
  template <class M, class... Args>
  M& emplace(Args&&... args) {
    return add(std::make_unique<M>(std::forward<Args>(args)...));
  }
  // Appends a parameter-free step.
  Sequential& add(Fn f) {
    if (!f) throw std::invalid_argument("diffuse: Sequential::add: empty function");
    steps_.push_back([f = std::move(f)](const Var<T>& x, Generator*) { return f(x); });
    return *this;
  }

  Var<T> operator()(Var<T> x, Generator* rng = nullptr) const {
    for (const Step& f : steps_) x = f(x, rng);
    return x;
  }
  size_t size() const { return steps_.size(); }

 private:
  std::vector<std::unique_ptr<Module<T>>> owned_;
  std::vector<Step> steps_;
};

// A list of modules of any kinds, indexed as the caller likes (no forward of its own).
template <class T>
class ModuleList : public Module<T> {
 public:
  ModuleList() = default;

  template <class M>
  M& push_back(std::unique_ptr<M> m) {
    static_assert(std::is_base_of_v<Module<T>, M>, "ModuleList::push_back: a Module<T>");
    M& ref = *m;
    items_.push_back(std::move(m));
    this->register_module(std::to_string(items_.size() - 1), items_.back());
    return ref;
  }
  template <class M, class... Args>
  M& emplace_back(Args&&... args) {
    return push_back(std::make_unique<M>(std::forward<Args>(args)...));
  }

  size_t size() const { return items_.size(); }
  bool empty() const { return items_.empty(); }
  Module<T>& operator[](size_t i) const { return *items_.at(i); }
  // Item i as its own type (an error naming the index when it is another).
  template <class M>
  M& get(size_t i) const {
    M* p = dynamic_cast<M*>(items_.at(i).get());
    if (!p) throw std::invalid_argument("diffuse: ModuleList item " + std::to_string(i) + " is of another type");
    return *p;
  }

 private:
  std::vector<std::unique_ptr<Module<T>>> items_;
};

}  // namespace diffuse
