// nvcc side of cuda_unet_trainer.hpp: UNetDevice + UNetTrainer on the current CUDA device.
#include "cuda_unet_trainer.hpp"

#include <diffuse/cuda/unet.hpp>

#include <stdexcept>

namespace diffuse::examples {

namespace {

class Impl final : public CudaUNetTrainer {
 public:
  Impl(const UNetConfig& c, const CudaTrainState& init, const CudaTrainOptions& o) : net_(c) {
    net_.load(init.weights);
    cuda::UNetTrainOptions to;
    to.lr = o.lr;
    to.ema_decay = o.ema_decay;
    to.clip = o.clip;
    to.math = o.tf32 ? cuda::MathMode::TF32 : cuda::MathMode::FP32;
    trainer_ = std::make_unique<cuda::UNetTrainer>(net_, to);
    cuda::UNetTrainer::State st;
    st.m = init.m;
    st.v = init.v;
    st.ema = init.ema;
    st.steps = init.adam_steps;
    st.ema_updates = init.ema_updates;
    trainer_->set_state(st);
    cudaDeviceProp prop{};
    int dev = 0;
    DIFFUSE_CUDA_CHECK(cudaGetDevice(&dev));
    DIFFUSE_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    name_ = prop.name;
  }
  float step(const Tensor<float>& x_t, const Tensor<float>& eps, const std::vector<std::int32_t>& t,
             const std::vector<std::int32_t>& y, Generator* dropout) override {
    return trainer_->step(x_t.cuda(), eps.cuda(), t, y, dropout);
  }
  void set_lr(double lr) override { trainer_->set_lr(lr); }
  CudaTrainState state() override {
    CudaTrainState s;
    s.weights = net_.named_tensors();
    const cuda::UNetTrainer::State st = trainer_->state();
    s.m = st.m;
    s.v = st.v;
    s.ema = st.ema;
    s.adam_steps = st.steps;
    s.ema_updates = st.ema_updates;
    return s;
  }
  std::string device_name() const override { return name_; }

 private:
  cuda::UNetDevice net_;
  std::unique_ptr<cuda::UNetTrainer> trainer_;
  std::string name_;
};

}  // namespace

std::string cuda_unavailable_reason() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) return std::string("no usable CUDA device (") + cudaGetErrorString(e) + ")";
  if (n == 0) return "no CUDA device";
  return "";
}

std::unique_ptr<CudaUNetTrainer> make_cuda_unet_trainer(const UNetConfig& config, const CudaTrainState& init,
                                                        const CudaTrainOptions& options) {
  const std::string why = cuda_unavailable_reason();
  if (!why.empty()) throw std::runtime_error("--device cuda: " + why);
  return std::make_unique<Impl>(config, init, options);
}

}  // namespace diffuse::examples
