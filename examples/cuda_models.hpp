// The CUDA U-Net train step (include/diffuse/cuda/unet.hpp) behind a host-only interface, so that
// trainers compiled by the host compiler can use it: device code must be compiled by nvcc, which
// cuda_unet_trainer.cu is (built into the trainer when CUDA is enabled). Without CUDA,
// make_cuda_unet_trainer throws with a one-line reason.
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

class CudaUNetTrainer {
 public:
  virtual ~CudaUNetTrainer() = default;
  // One step on a host batch (uploaded): returns the loss before the update.
  virtual float step(const Tensor<float>& x_t, const Tensor<float>& eps, const std::vector<std::int32_t>& t,
                     const std::vector<std::int32_t>& y, Generator* dropout) = 0;
  virtual void set_lr(double lr) = 0;
  virtual CudaTrainState state() = 0;  // copied back to the host
  virtual std::string device_name() const = 0;
};

// "" when a CUDA device can be used, else why not (no CUDA in this build, no device, ...).
std::string cuda_unavailable_reason();
std::unique_ptr<CudaUNetTrainer> make_cuda_unet_trainer(const UNetConfig& config, const CudaTrainState& init,
                                                        const CudaTrainOptions& options);

}  // namespace diffuse::examples
