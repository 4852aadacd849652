// The CUDA models (include/diffuse/cuda/unet.hpp, mlp.hpp, trainer.hpp) behind a host-only
// interface, so that tools compiled by the host compiler can use them: device code must be
// compiled by nvcc, which cuda_models.cu is (built into train_mnist, sample and train_2d when
// CUDA is enabled). Two uses per model: the train step (CudaTrainer) and the network's forward
// for sampling (CudaEpsModel). Without CUDA (cuda_models_none.cpp) the make_ functions throw
// with a one-line reason.
#pragma once

#include <diffuse/rng.hpp>
#include <diffuse/tensor.hpp>
#include <diffuse/unet_config.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::examples {

using NamedTensors = std::vector<std::pair<std::string, Tensor<float>>>;

// Weights and optimiser state in the CPU model's terms (PyTorch layouts, by name).
struct CudaTrainState {
  NamedTensors weights, m, v, ema;  // ema empty: no EMA
  std::int64_t adam_steps = 0, ema_updates = 0;
};

struct CudaTrainOptions {
  double lr = 1e-3, ema_decay = 0.0, clip = 0.0;
  bool tf32 = false;
};

class CudaTrainer {
 public:
  virtual ~CudaTrainer() = default;
  // One step on a host batch (uploaded): returns the loss before the update. y: labels (empty
  // for an unconditional model); dropout: the generator of the U-Net's dropout (or nullptr).
  virtual float step(const Tensor<float>& x_t, const Tensor<float>& eps, const std::vector<std::int32_t>& t,
                     const std::vector<std::int32_t>& y, Generator* dropout) = 0;
  virtual void set_lr(double lr) = 0;
  virtual CudaTrainState state() = 0;  // copied back to the host
  virtual std::string device_name() const = 0;
};

// The network on the device, for sampling: eps for a host batch x at timesteps t (labels y for a
// class-conditional model, nullptr otherwise); x is uploaded and eps downloaded, so the CPU
// samplers (ddpm_sample, ddim_sample, guidance) run unchanged around it.
class CudaEpsModel {
 public:
  virtual ~CudaEpsModel() = default;
  virtual Tensor<float> eps(const Tensor<float>& x, const std::vector<std::int32_t>& t,
                            const std::vector<std::int32_t>* y) = 0;
  virtual std::string device_name() const = 0;
};

// The 2-D trainer's ToyMLP (SiLU): data dimension, hidden width, hidden layers, embedding width.
struct CudaMLPSizes {
  std::int64_t data_dim = 2, hidden = 128, layers = 3, temb_dim = 128;
};

// "" when a CUDA device can be used, else why not (no CUDA in this build, no device, ...).
std::string cuda_unavailable_reason();
std::unique_ptr<CudaTrainer> make_cuda_unet_trainer(const UNetConfig& config, const CudaTrainState& init,
                                                    const CudaTrainOptions& options);
// weights: the CPU model's named parameters (PyTorch layouts), e.g. its EMA copy.
std::unique_ptr<CudaEpsModel> make_cuda_unet_model(const UNetConfig& config, const NamedTensors& weights);
std::unique_ptr<CudaTrainer> make_cuda_mlp_trainer(const CudaMLPSizes& sizes, const CudaTrainState& init,
                                                   const CudaTrainOptions& options);
std::unique_ptr<CudaEpsModel> make_cuda_mlp_model(const CudaMLPSizes& sizes, const NamedTensors& weights);

}  // namespace diffuse::examples
