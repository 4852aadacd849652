// Data parallelism's gradient averaging, as PyTorch's DistributedDataParallel does it: the
// parameters are split into buckets of about 25 MB in reverse order (a forward uses them first
// to last, so the backward finishes them about last to first); the tape reports each parameter
// whose gradient is final (backward(loss, hook)), and a bucket whose gradients are all final is
// averaged over the ranks at once, while the backward goes on:
//   - CUDA tensors with NCCL: one NCCL group per bucket on a stream of its own, behind the
//     backward's work queued so far; finish() makes the backend's stream wait for them;
//   - CPU tensors: the bucket packed into one host buffer and summed with the communicator (MPI);
//   - CUDA tensors without NCCL (a build without it, the CPU emulation): through host memory and
//     the communicator, the same as the CPU.
// Buckets go out strictly in order, so every rank makes the same collectives in the same order
// whatever order its backward finishes them in. finish() sends what is left (a parameter that got
// no gradient on this step gets a zero one, the same on every rank) and waits.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include <diffuse/core/autograd.hpp>
#include <diffuse/distributed/communicator.hpp>
#include <diffuse/optim/params.hpp>

namespace diffuse {

template <class T>
class GradReducer {
 public:
  // The parameters must already be on their device (the reducer picks its road from it).
  GradReducer(Communicator& comm, NamedParams<T> params, size_t bucket_bytes = size_t(25) << 20)
      : comm_(comm), params_(std::move(params)), device_(detail::params_device(params_, "GradReducer")) {
    if (bucket_bytes == 0) throw std::invalid_argument("diffuse: GradReducer: the bucket size must be positive");
    if (device_ == Device::CUDA) {
      if constexpr (!std::is_same_v<T, float>) detail::cuda_float_only("GradReducer");
      nccl_ = comm_.cuda_collectives(&why_no_nccl_);
    }
    size_t bytes = 0;
    for (size_t k = params_.size(); k-- > 0;) {
      const size_t b = params_[k].second.value().size() * sizeof(T);
      if (buckets_.empty() || (bytes > 0 && bytes + b > bucket_bytes)) buckets_.emplace_back(), bytes = 0;
      buckets_.back().push_back(k);
      bytes += b;
      bucket_of_[params_[k].second.node()] = buckets_.size() - 1;
    }
    pending_.assign(buckets_.size(), 0);
  }

  // How the gradients travel, for the run's first line.
  std::string road() const {
    if (device_ == Device::CPU) return "the host collectives";
    return nccl_ ? std::string("NCCL, overlapped with the backward")
                 : "host memory, not NCCL (" + why_no_nccl_ + ")";
  }
  size_t buckets() const { return buckets_.size(); }

  // Before the backward of a step.
  void begin() {
    for (size_t b = 0; b < buckets_.size(); ++b) pending_[b] = buckets_[b].size();
    next_ = 0;
  }
  // The tape's hook: node's gradient is final for this step.
  void ready(const Node<T>* node) {
    auto it = bucket_of_.find(node);
    if (it == bucket_of_.end()) return;  // an input that is not one of these parameters
    if (--pending_[it->second] == 0) launch_ready();
  }
  // After the backward: the rest, then every gradient is the average over the ranks.
  void finish() {
    for (; next_ < buckets_.size(); ++next_) {
      for (size_t k : buckets_[next_]) give_gradient(params_[k].second);
      launch(next_);
    }
    if (nccl_) nccl_->wait();
  }

  // The values of `tensors` (all on this reducer's device) from rank `root` to every rank.
  void broadcast(const std::vector<Tensor<T>*>& tensors, int root) {
    if (nccl_) {
      std::vector<backend::DeviceArray> arrays;
      for (Tensor<T>* t : tensors) arrays.push_back({t->data(), t->numel()});
      nccl_->broadcast(arrays, root);
      nccl_->wait();
      return;
    }
    for (Tensor<T>* t : tensors) {
      if (t->device() == Device::CPU) {
        comm_.broadcast(t->data(), t->size() * sizeof(T), root);
      } else {
        Tensor<T> h = t->cpu();
        comm_.broadcast(h.data(), h.size() * sizeof(T), root);
        t->copy_from(h);
      }
    }
  }

 private:
  void launch_ready() {
    while (next_ < buckets_.size() && pending_[next_] == 0) launch(next_++);
  }

  // A parameter without a gradient this step gets zeros (the same on every rank).
  static void give_gradient(Var<T>& p) {
    if (p.has_grad()) return;
    GradSink<T> s = grad_sink(*p.node());
    Tensor<T>& g = p.node()->grad;
    if (g.device() == Device::CUDA) {
      if constexpr (std::is_same_v<T, float>) backend::require_cuda("GradReducer").fill(s.data, g.numel(), 0.0f);
    } else {
      std::fill(s.data, s.data + g.size(), T(0));
    }
  }

  void launch(size_t b) {
    const std::vector<size_t>& ks = buckets_[b];
    if (nccl_) {
      std::vector<backend::DeviceArray> arrays;
      for (size_t k : ks) arrays.push_back({params_[k].second.node()->grad.data(), params_[k].second.value().numel()});
      nccl_->all_reduce_mean(arrays);
      return;
    }
    // Host memory: pack, sum, unpack divided by the rank count.
    size_t n = 0;
    for (size_t k : ks) n += params_[k].second.value().size();
    host_.resize(n);
    size_t at = 0;
    for (size_t k : ks) {
      const Tensor<T>& g = params_[k].second.node()->grad;
      if (g.device() == Device::CPU) {
        std::copy(g.data(), g.data() + g.size(), host_.data() + at);
      } else {
        const Tensor<T> h = g.cpu();
        std::copy(h.data(), h.data() + h.size(), host_.data() + at);
      }
      at += g.size();
    }
    comm_.all_reduce(host_.data(), n, ReduceOp::sum);
    const T ranks = static_cast<T>(comm_.size());
    at = 0;
    for (size_t k : ks) {
      Tensor<T>& g = params_[k].second.node()->grad;
      if (g.device() == Device::CPU) {
        T* d = g.data();
        for (size_t i = 0; i < g.size(); ++i) d[i] = host_[at + i] / ranks;
      } else {
        Tensor<T> h(g.shape());
        for (size_t i = 0; i < h.size(); ++i) h.data()[i] = host_[at + i] / ranks;
        g.copy_from(h);
      }
      at += g.size();
    }
  }

  Communicator& comm_;
  NamedParams<T> params_;
  Device device_;
  backend::CudaCollectives* nccl_ = nullptr;
  std::string why_no_nccl_;
  std::vector<std::vector<size_t>> buckets_;  // parameter indices, in launch order
  std::unordered_map<const Node<T>*, size_t> bucket_of_;
  std::vector<size_t> pending_;  // gradients not yet final, per bucket
  size_t next_ = 0;              // the next bucket to send
  std::vector<T> host_;
};

}  // namespace diffuse
