// Reverse-mode automatic differentiation on a tape, for tensors on any device.
//
// A Var is a handle to a Node: a value, a gradient and a flag. Every op that
// has an input requiring a gradient appends its backward function to the
// thread's tape; `backward(loss)` runs the tape in reverse and clears it.
// Gradients land in the leaves (parameters) and accumulate until zero_grad().
// Under NoGrad (sampling, evaluation) nothing is recorded.
//
// The tape does not care where the numbers are: each op's forward and its
// backward closure run on the device of the op's operands (the CPU code of
// the op, or the CUDA backend's entries, backend/cuda.hpp), and a gradient
// lives on the device of its value.
#pragma once

#include <functional>
#include <algorithm>
#include <memory>
#include <string>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

#include <diffuse/core/tensor.hpp>

namespace diffuse {

// How a parameter's storage relates to PyTorch's layout of the same tensor (what checkpoints
// hold): the same, or a conv weight kept as [O, kh, kw, C] for PyTorch's [O, C, kh, kw].
enum class ParamLayout : uint8_t { Torch, ConvOHWI };

template <class T>
struct Node {
  Tensor<T> value;
  Tensor<T> grad;         // allocated on first use (on the value's device), kept across steps for leaves
  bool has_grad = false;  // false: `grad` holds stale numbers, treat as zero
  bool requires_grad = false;
  ParamLayout layout = ParamLayout::Torch;  // parameters only
  std::string name;       // parameters only: "blocks.0.fc1.weight"
};

template <class T>
class Var {
 public:
  Var() = default;
  explicit Var(Tensor<T> value, bool requires_grad = false) : n_(std::make_shared<Node<T>>()) {
    n_->value = std::move(value);
    n_->requires_grad = requires_grad;
  }
  bool defined() const { return n_ != nullptr; }
  Tensor<T>& value() { return n_->value; }
  const Tensor<T>& value() const { return n_->value; }
  const Shape& shape() const { return n_->value.shape(); }
  Device device() const { return n_ ? n_->value.device() : Device::CPU; }
  int64_t size(int64_t i) const { return n_->value.size(i); }
  bool requires_grad() const { return n_ && n_->requires_grad; }
  bool has_grad() const { return n_->has_grad; }
  // The accumulated gradient; an undefined tensor when none has arrived since zero_grad().
  Tensor<T> grad() const { return n_->has_grad ? n_->grad : Tensor<T>(); }
  void zero_grad() { n_->has_grad = false; }
  const std::string& name() const { return n_->name; }
  void set_name(std::string s) { n_->name = std::move(s); }
  ParamLayout layout() const { return n_->layout; }
  Node<T>* node() const { return n_.get(); }
  const std::shared_ptr<Node<T>>& node_ptr() const { return n_; }

 private:
  std::shared_ptr<Node<T>> n_;
};

// Where a backward function writes one input's gradient: a buffer of the
// input's shape, and whether to add to it (a gradient already arrived) or
// overwrite it (first contribution). Writing in place avoids a temporary per op.
template <class T>
struct GradSink {
  T* data;
  bool accumulate;
  template <class F>
  void put(size_t i, F v) {
    data[i] = accumulate ? data[i] + static_cast<T>(v) : static_cast<T>(v);
  }
};

template <class T>
inline GradSink<T> grad_sink(Node<T>& n) {
  if (!n.grad.defined() || n.grad.shape() != n.value.shape() || n.grad.device() != n.value.device())
    n.grad = Tensor<T>(n.value.shape(), n.value.device());
  const bool acc = n.has_grad;
  n.has_grad = true;
  return GradSink<T>{n.grad.data(), acc};
}

template <class T>
class Tape {
 public:
  using Backward = std::function<void(const Tensor<T>& grad_out)>;
  // Called during backward() with each leaf (a node no op on the tape produced, e.g. a parameter)
  // as soon as its gradient is final: after the last op that reads it has run (data parallelism
  // sends those gradients while the backward goes on, distributed/grad_reducer.hpp).
  using LeafDone = std::function<void(const Node<T>* leaf)>;
  struct Entry {
    std::shared_ptr<Node<T>> out;
    Backward fn;
    uint32_t in_begin = 0, in_count = 0;  // the inputs that need a gradient: inputs_[in_begin, + in_count)
    bool inputs_known = false;            // false: recorded without them (no LeafDone calls then)
  };

  static Tape& current() {
    thread_local Tape t;
    return t;
  }
  static bool& grad_enabled() {
    thread_local bool on = true;
    return on;
  }

  // An op's backward, with the inputs it sends gradients to (make_result does this).
  void record(const std::shared_ptr<Node<T>>& out, Backward fn, std::initializer_list<const Var<T>*> inputs) {
    Entry e{out, std::move(fn), static_cast<uint32_t>(inputs_.size()), 0, true};
    for (const Var<T>* v : inputs)
      if (v->requires_grad()) inputs_.push_back(v->node()), ++e.in_count;
    entries_.push_back(std::move(e));
  }
  void record(const std::shared_ptr<Node<T>>& out, Backward fn, const std::vector<Var<T>>& inputs) {
    Entry e{out, std::move(fn), static_cast<uint32_t>(inputs_.size()), 0, true};
    for (const Var<T>& v : inputs)
      if (v.requires_grad()) inputs_.push_back(v.node()), ++e.in_count;
    entries_.push_back(std::move(e));
  }
  // An op's backward without its inputs: correct gradients, but no LeafDone calls in that backward.
  void record(const std::shared_ptr<Node<T>>& out, Backward fn) { entries_.push_back({out, std::move(fn), 0, 0, false}); }
  size_t size() const { return entries_.size(); }
  void clear() {
    entries_.clear();
    inputs_.clear();
  }

  // Seeds d(loss)/d(loss) = 1 (or `seed` for a non-scalar root) and runs the tape backwards;
  // leaf_done, when given, hears of each leaf whose gradient is final.
  void backward(const Var<T>& root, const Tensor<T>* seed = nullptr, const LeafDone* leaf_done = nullptr);

 private:
  // (entry index, leaf) for each leaf read by an op of the tape, where the index is that of the
  // first entry reading it (the last to run), in ascending index order; empty when some entry
  // was recorded without its inputs.
  std::vector<std::pair<size_t, const Node<T>*>> leaf_last_uses() const;

  std::vector<Entry> entries_;
  std::vector<Node<T>*> inputs_;
};

template <class T>
std::vector<std::pair<size_t, const Node<T>*>> Tape<T>::leaf_last_uses() const {
  std::vector<std::pair<size_t, const Node<T>*>> uses;
  std::unordered_set<const Node<T>*> produced;
  for (const Entry& e : entries_) {
    if (!e.inputs_known) return {};
    produced.insert(e.out.get());
  }
  std::unordered_set<const Node<T>*> seen;
  for (size_t i = 0; i < entries_.size(); ++i)
    for (uint32_t k = 0; k < entries_[i].in_count; ++k) {
      const Node<T>* n = inputs_[entries_[i].in_begin + k];
      if (!produced.count(n) && seen.insert(n).second) uses.emplace_back(i, n);
    }
  return uses;  // ascending: the tape, running backwards, takes them from the back
}

template <class T>
void Tape<T>::backward(const Var<T>& root, const Tensor<T>* seed, const LeafDone* leaf_done) {
  Node<T>& r = *root.node();
  if (!r.requires_grad) throw std::logic_error("diffuse: backward() on a value that does not require grad");
  if (seed && (seed->shape() != r.value.shape() || seed->device() != r.value.device()))
    throw std::invalid_argument("diffuse: backward: the seed must have the root's shape " + shape_str(r.value.shape()) +
                                " and device");
  GradSink<T> s = grad_sink(r);
  const size_t n = r.value.size();
  const T* sd = seed ? seed->data() : nullptr;
  if (r.value.device() == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) {
      backend::CudaBackend& be = backend::require_cuda("backward");
      const int64_t ne = static_cast<int64_t>(n);
      if (sd) {
        be.copy(sd, s.data, ne, s.accumulate);
      } else if (s.accumulate) {
        const Tensor<T> ones = Tensor<T>::ones(r.value.shape(), Device::CUDA);
        be.copy(ones.data(), s.data, ne, true);
      } else {
        be.fill(s.data, ne, T(1));
      }
    } else {
      throw std::invalid_argument("diffuse: backward: CUDA tensors must be float");
    }
  } else if (s.accumulate) {
    for (size_t i = 0; i < n; ++i) s.data[i] += sd ? sd[i] : T(1);
  } else if (sd) {
    std::copy(sd, sd + n, s.data);
  } else {
    std::fill(s.data, s.data + n, T(1));
  }
  std::vector<std::pair<size_t, const Node<T>*>> uses;
  if (leaf_done && *leaf_done) uses = leaf_last_uses();
  // Each entry is released as soon as it has run: its closure (and the
  // activations it saved) and the gradient of its output, which no later
  // entry reads. So memory falls during the backward instead of holding
  // every activation and every intermediate gradient to the end (as PyTorch
  // frees non-leaf gradients). Leaves keep their gradients.
  for (size_t i = entries_.size(); i-- > 0;) {
    Entry& e = entries_[i];
    if (e.out->has_grad) e.fn(e.out->grad);
    e.fn = nullptr;
    e.out->grad = Tensor<T>();
    e.out->has_grad = false;
    e.out.reset();
    for (; !uses.empty() && uses.back().first == i; uses.pop_back()) (*leaf_done)(uses.back().second);
  }
  clear();
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(class Tape<float>)

// Disables recording (and so gradient tracking) in its scope, for sampling and evaluation.
class NoGrad {
 public:
  NoGrad() : f_(Tape<float>::grad_enabled()), d_(Tape<double>::grad_enabled()) {
    Tape<float>::grad_enabled() = false;
    Tape<double>::grad_enabled() = false;
  }
  ~NoGrad() {
    Tape<float>::grad_enabled() = f_;
    Tape<double>::grad_enabled() = d_;
  }
  NoGrad(const NoGrad&) = delete;
  NoGrad& operator=(const NoGrad&) = delete;

 private:
  bool f_, d_;
};

template <class T>
inline void backward(const Var<T>& loss) {
  Tape<T>::current().backward(loss);
}
// The same, telling leaf_done of each leaf (parameter) whose gradient is final (Tape::LeafDone).
template <class T>
inline void backward(const Var<T>& loss, const typename Tape<T>::LeafDone& leaf_done) {
  Tape<T>::current().backward(loss, nullptr, &leaf_done);
}

// Builds an op's result. If gradients are on and any input requires one, the
// result requires one too and `make_backward()` (called only then) is recorded.
template <class T, class MakeBackward>
inline Var<T> make_result(Tensor<T> value, std::initializer_list<const Var<T>*> inputs,
                          MakeBackward&& make_backward) {
  bool need = false;
  if (Tape<T>::grad_enabled())
    for (const Var<T>* v : inputs) need = need || v->requires_grad();
  Var<T> out(std::move(value), need);
  if (need) Tape<T>::current().record(out.node_ptr(), make_backward(), inputs);
  return out;
}

namespace detail {

// The device an op runs on: that of its defined operands, which must all agree (one clear error
// naming the op and the devices otherwise; nothing is copied behind the caller's back).
template <class T>
inline Device op_device(const char* op, std::initializer_list<const Var<T>*> vs) {
  Device d = Device::CPU;
  bool seen = false;
  for (const Var<T>* v : vs) {
    if (!v->defined()) continue;
    if (!seen) {
      d = v->device();
      seen = true;
    } else if (v->device() != d) {
      std::string devs;
      for (const Var<T>* w : vs)
        if (w->defined()) devs += std::string(devs.empty() ? "" : ", ") + device_name(w->device());
      throw std::invalid_argument(std::string("diffuse: ") + op + ": operands on different devices (" + devs +
                                  "); move them with .to(Device::...) first");
    }
  }
  return d;
}

// Throws for an op asked to run on CUDA with an element type other than float.
[[noreturn]] inline void cuda_float_only(const char* op) {
  throw std::invalid_argument(std::string("diffuse: ") + op + ": CUDA tensors must be float (double runs on the CPU)");
}

}  // namespace detail

}  // namespace diffuse
