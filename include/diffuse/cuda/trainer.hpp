// Adam(W) + EMA (+ gradient-norm clipping) for a device model: the CPU trainers' step
// (examples/train_mnist.cpp, train_2d.cpp: zero_grad, forward, MSE, backward, clip_grad_norm,
// Adam::step, EMA::update) on the device, the optimiser over all parameters in one launch
// (kernels/adam.cuh), the clipping over the same chunk table (kernels/grad_norm.cuh).
//
//   diffuse::cuda::DeviceTrainer<Net> trainer(net, options);
//   float loss = trainer.step(x_t, eps, t, y, &dropout_gen);   // x_t, eps on the device
//
// Net is a device model (cuda/unet.hpp's UNetDevice, cuda/mlp.hpp's ToyMLPDevice) with
//   std::vector<Param>& params();
//   Act forward(Graph&, const Tensor<float>& x, const std::int32_t* t, const std::int32_t* y,
//               std::int64_t B, Generator* dropout);
//   Tensor<float> to_cpu_layout(int i, const Tensor<float>&), to_device_layout(int i, ...);
//   int index(const std::string& name);  named_tensors();
// Compiled by nvcc (GPU) or by g++ for the emulation, like graph.hpp.
#pragma once

#include <diffuse/cuda/graph.hpp>
#include <diffuse/rng.hpp>

#include "kernels/adam.cuh"
#include "kernels/grad_norm.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::cuda {

struct DeviceTrainOptions {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  bool decoupled = false;  // AdamW
  double ema_decay = 0.0;  // 0: no EMA
  bool ema_warmup = true;  // decay min(d, (1 + n) / (10 + n)) after n updates, as EMA<T>
  double clip = 0.0;       // gradient-norm clipping (0: off)
  MathMode math = MathMode::FP32;  // TF32: tensor cores for GEMMs and convolutions
  ConvSearch conv_search = ConvSearch::Heuristic;  // or Benchmark: time cuDNN's candidates once
  bool conv_fft_winograd = false;  // let cuDNN use FFT / Winograd (not a plain sum of products)
};

template <class Net>
class DeviceTrainer {
 public:
  DeviceTrainer(Net& net, const DeviceTrainOptions& o) : net_(net), o_(o), graph_(&net.params(), o.math) {
    graph_.set_conv_search(o.conv_search, o.conv_fft_winograd);
    std::vector<kernels::AdamTensor<float>> tensors;
    std::vector<std::int64_t> sizes;
    for (Param& p : net_.params()) {
      m_.push_back(Tensor<float>::zeros(p.shape).cuda());
      v_.push_back(Tensor<float>::zeros(p.shape).cuda());
      if (o_.ema_decay > 0) ema_.push_back(p.value.clone());
      tensors.push_back({p.value.data(), p.grad.data(), m_.back().data(), v_.back().data(),
                       o_.ema_decay > 0 ? ema_.back().data() : nullptr, p.value.numel()});
      sizes.push_back(p.value.numel());
    }
    const std::vector<kernels::AdamChunk> plan = kernels::plan_adam_chunks(sizes);
    num_chunks_ = static_cast<std::int64_t>(plan.size());
    table_ = upload(tensors);
    chunks_ = upload(plan);
    partials_ = Tensor<double>({num_chunks_}, Device::CUDA);
    kernels::grad_zero(table(), chunks(), num_chunks_);
  }

  // One step on a batch: x_t and eps [B, res, res, C] device tensors, t and y host vectors of B
  // (y empty for an unconditional model). Returns the loss (before the update). gen: dropout.
  float step(const Tensor<float>& x_t, const Tensor<float>& eps, const std::vector<std::int32_t>& t,
             const std::vector<std::int32_t>& y, Generator* gen) {
    const std::int64_t B = static_cast<std::int64_t>(t.size());
    const Tensor<std::int32_t> td = ints(t), yd = ints(y);
    const Act out = net_.forward(graph_, x_t, td.data(), y.empty() ? nullptr : yd.data(), B, gen);
    const Act loss = graph_.mse(out, eps);
    graph_.backward(loss);
    const float loss_value = loss->value.cpu()[0];
    if (!std::isfinite(loss_value)) throw std::runtime_error("diffuse::cuda::DeviceTrainer: the loss is not finite");
    last_grad_norm_ = clip();
    ++t_;
    const double decay = o_.ema_decay > 0 ? (o_.ema_warmup ? std::min(o_.ema_decay, (1.0 + ema_updates_) / (10.0 + ema_updates_))
                                                           : o_.ema_decay)
                                          : 0.0;
    const kernels::AdamStepArgs<float> a =
        kernels::adam_step_args<float>(o_.lr, o_.beta1, o_.beta2, o_.eps, o_.weight_decay, o_.decoupled, t_, decay);
    {
      ProfileScope ps(graph_.profiler(), "adam+ema, zero grads");
      kernels::adam_ema_step(table(), chunks(), num_chunks_, a);
      kernels::grad_zero(table(), chunks(), num_chunks_);
    }
    if (o_.ema_decay > 0) ++ema_updates_;
    return loss_value;
  }

  // The optimiser's state as CPU tensors in PyTorch layouts, by parameter name (for checkpoints,
  // in the CPU Adam / EMA's terms: first and second moments, the EMA weights, step counts).
  struct State {
    std::vector<std::pair<std::string, Tensor<float>>> m, v, ema;
    std::int64_t steps = 0, ema_updates = 0;
  };
  State state() {
    State st;
    const std::vector<Param>& ps = net_.params();
    for (std::size_t k = 0; k < ps.size(); ++k) {
      const int i = static_cast<int>(k);
      st.m.emplace_back(ps[k].name, net_.to_cpu_layout(i, m_[k]));
      st.v.emplace_back(ps[k].name, net_.to_cpu_layout(i, v_[k]));
      if (!ema_.empty()) st.ema.emplace_back(ps[k].name, net_.to_cpu_layout(i, ema_[k]));
    }
    st.steps = t_;
    st.ema_updates = ema_updates_;
    return st;
  }
  // Restores state() (e.g. from a checkpoint written by either device); every tensor by name.
  void set_state(const State& st) {
    auto put = [&](const std::vector<std::pair<std::string, Tensor<float>>>& named, std::vector<Tensor<float>>& dst,
                   const char* what) {
      for (const auto& [n, t] : named) {
        const int i = net_.index(n);
        if (i < 0) throw std::invalid_argument(std::string("diffuse::cuda::DeviceTrainer: ") + what + " of unknown tensor " + n);
        dst[static_cast<std::size_t>(i)].copy_from(net_.to_device_layout(i, t));
      }
    };
    put(st.m, m_, "first moment");
    put(st.v, v_, "second moment");
    if (!ema_.empty()) put(st.ema, ema_, "EMA");
    t_ = st.steps;
    ema_updates_ = st.ema_updates;
  }

  double last_grad_norm() const { return last_grad_norm_; }
  Graph& graph() { return graph_; }  // e.g. graph().set_profiler(&p) to time each op
  std::int64_t steps() const { return t_; }
  void set_lr(double lr) { o_.lr = lr; }
  // The EMA weights as CPU tensors (PyTorch layouts), in the model's order.
  std::vector<std::pair<std::string, Tensor<float>>> ema_tensors() {
    std::vector<std::pair<std::string, Tensor<float>>> out;
    if (ema_.empty()) return out;
    std::vector<Param>& ps = net_.params();
    for (std::size_t k = 0; k < ps.size(); ++k) std::swap(ps[k].value, ema_[k]);
    out = net_.named_tensors();
    for (std::size_t k = 0; k < ps.size(); ++k) std::swap(ps[k].value, ema_[k]);
    return out;
  }

 private:
  template <class T>
  static Tensor<std::uint8_t> upload(const std::vector<T>& v) {
    Tensor<std::uint8_t> h({static_cast<std::int64_t>(v.size() * sizeof(T))});
    if (!v.empty()) std::memcpy(h.data(), v.data(), v.size() * sizeof(T));
    return h.cuda();
  }
  static Tensor<std::int32_t> ints(const std::vector<std::int32_t>& v) {
    return Tensor<std::int32_t>::from(v, {static_cast<std::int64_t>(v.size())}).cuda();
  }
  const kernels::AdamTensor<float>* table() const {
    return reinterpret_cast<const kernels::AdamTensor<float>*>(table_.data());
  }
  const kernels::AdamChunk* chunks() const { return reinterpret_cast<const kernels::AdamChunk*>(chunks_.data()); }
  // clip_grad_norm: the norm from per-chunk sums of squares (added on the host in order).
  double clip() {
    if (o_.clip <= 0) return 0.0;
    ProfileScope ps(graph_.profiler(), "clip grad norm");
    kernels::grad_sq_partials(table(), chunks(), num_chunks_, partials_.data());
    const Tensor<double> part = partials_.cpu();
    double sq = 0;
    for (std::int64_t k = 0; k < num_chunks_; ++k) sq += part[static_cast<std::size_t>(k)];
    const double norm = std::sqrt(sq), c = o_.clip / (norm + 1e-6);
    if (c < 1.0) kernels::grad_scale(table(), chunks(), num_chunks_, c);
    return norm;
  }

  Net& net_;
  DeviceTrainOptions o_;
  Graph graph_;
  std::vector<Tensor<float>> m_, v_, ema_;
  Tensor<std::uint8_t> table_, chunks_;
  Tensor<double> partials_;
  std::int64_t num_chunks_ = 0, t_ = 0, ema_updates_ = 0;
  double last_grad_norm_ = 0.0;
};

}  // namespace diffuse::cuda
