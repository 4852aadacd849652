// The toy 2-D denoiser (layers/mlp.hpp's ToyMLP with SiLU, the 2-D trainer's model) on the CUDA
// device: eps(x, t) = net(concat(x, timestep_embedding(t))), net = Linear, SiLU, ..., Linear.
//
//   diffuse::cuda::ToyMLPDevice net(2, 128, 3, 128);   // data dim, hidden width, hidden layers, temb dim
//   net.load(cpu_model_named_tensors);                 // "net.0.weight" ... as the CPU model names them
//   diffuse::cuda::DeviceTrainer<diffuse::cuda::ToyMLPDevice> trainer(net, options);  // cuda/trainer.hpp
//
// Same parameter names and layouts as the CPU model (Linear weights [out, in]), so checkpoints
// are the same files on either device. The CPU model computes the first layer as
// W_x x + (W_e e)[distinct t] (fewer operations); here it is the literal concat: the same
// function up to float rounding. Only SiLU (the trainer's activation). Compiled by nvcc (GPU) or
// by g++ for the emulation (tests/test_emu_mlp.cpp), like cuda/unet.hpp.
#pragma once

#include <diffuse/cuda/graph.hpp>
#include <diffuse/rng.hpp>

#include "kernels/timestep_embedding.cuh"

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::cuda {

class ToyMLPDevice {
 public:
  ToyMLPDevice(std::int64_t data_dim, std::int64_t hidden, std::int64_t layers, std::int64_t temb_dim)
      : data_dim_(data_dim), temb_dim_(temb_dim) {
    if (data_dim < 1 || hidden < 1 || layers < 1 || temb_dim < 4 || temb_dim % 2)
      throw std::invalid_argument("diffuse::cuda::ToyMLPDevice: bad sizes (data_dim, hidden, layers >= 1; temb_dim even >= 4)");
    std::vector<std::int64_t> w{data_dim + temb_dim};
    for (std::int64_t i = 0; i < layers; ++i) w.push_back(hidden);
    w.push_back(data_dim);
    for (std::size_t i = 0; i + 1 < w.size(); ++i) {  // torch.nn.Sequential indices: activations between
      const std::string name = "net." + std::to_string(2 * i);
      LinearSpec l;
      l.in = w[i];
      l.out = w[i + 1];
      l.w = add_param(params_, name + ".weight", {l.out, l.in});
      l.b = add_param(params_, name + ".bias", {l.out});
      layers_.push_back(l);
    }
  }

  std::vector<Param>& params() { return params_; }
  std::int64_t num_parameters() const { return count_parameters(params_); }

  // eps for x [B, data_dim] (device) at device timesteps t. y must be null (no classes); no
  // dropout (the generator is ignored).
  Act forward(Graph& g, const Tensor<float>& x, const std::int32_t* t, const std::int32_t* y, std::int64_t B,
              Generator* /*dropout*/) {
    const Shape& s = x.shape();
    if (s.size() != 2 || s[0] != B || s[1] != data_dim_)
      throw std::invalid_argument("diffuse::cuda::ToyMLPDevice: input " + shape_str(s) + ", expected [" +
                                  std::to_string(B) + ", " + std::to_string(data_dim_) + "]");
    if (y) throw std::invalid_argument("diffuse::cuda::ToyMLPDevice: the model has no classes");
    Act emb = Graph::make({B, temb_dim_});
    {
      ProfileScope ps(g.profiler(), "timestep embedding");
      kernels::timestep_embedding(t, emb->value.data(), B, temb_dim_);
    }
    emb->requires_grad = false;
    Act h = g.concat_channels(Graph::input(x), emb);
    for (std::size_t i = 0; i < layers_.size(); ++i) h = g.linear(h, layers_[i], i + 1 < layers_.size());
    return h;
  }

  // The CPU model's named tensors (e.g. its named_parameters() values, a checkpoint) onto the
  // device: every parameter, with its shape, and nothing else (the layouts are the CPU's).
  void load(const std::vector<std::pair<std::string, Tensor<float>>>& named) {
    load_params(
        params_, named, [](const Param& p) { return p.shape; }, [](const Param&, const Tensor<float>& t) { return t; },
        "diffuse::cuda::ToyMLPDevice::load");
  }
  enum class Which { Value, Grad };
  std::vector<std::pair<std::string, Tensor<float>>> named_tensors(Which which = Which::Value) const {
    std::vector<std::pair<std::string, Tensor<float>>> out;
    for (const Param& p : params_) out.emplace_back(p.name, (which == Which::Value ? p.value : p.grad).cpu());
    return out;
  }
  // The layouts are the CPU's: only a copy to the host (or from it).
  Tensor<float> to_cpu_layout(int, const Tensor<float>& t) const { return t.cpu(); }
  Tensor<float> to_device_layout(int, const Tensor<float>& t) const { return t.cpu(); }
  int index(const std::string& name) const { return param_index(params_, name); }

 private:
  std::int64_t data_dim_, temb_dim_;
  std::vector<Param> params_;
  std::vector<LinearSpec> layers_;
};

}  // namespace diffuse::cuda
