// nvcc side of cuda_models.hpp: the device models (UNetDevice, ToyMLPDevice) with the device
// trainer (training) or alone (sampling), on the current CUDA device.
#include "cuda_models.hpp"

#include <diffuse/cuda/mlp.hpp>
#include <diffuse/cuda/trainer.hpp>
#include <diffuse/cuda/unet.hpp>

#include <stdexcept>

namespace diffuse::examples {

namespace {

std::string current_device_name() {
  cudaDeviceProp prop{};
  int dev = 0;
  DIFFUSE_CUDA_CHECK(cudaGetDevice(&dev));
  DIFFUSE_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  return prop.name;
}

void require_device() {
  const std::string why = cuda_unavailable_reason();
  if (!why.empty()) throw std::runtime_error("--device cuda: " + why);
}

// Net: cuda::UNetDevice or cuda::ToyMLPDevice, already constructed.
template <class Net>
class Trainer final : public CudaTrainer {
 public:
  Trainer(std::unique_ptr<Net> net, const CudaTrainState& init, const CudaTrainOptions& o)
      : net_(std::move(net)), name_(current_device_name()) {
    net_->load(init.weights);
    cuda::DeviceTrainOptions to;
    to.lr = o.lr;
    to.ema_decay = o.ema_decay;
    to.clip = o.clip;
    to.math = o.tf32 ? cuda::MathMode::TF32 : cuda::MathMode::FP32;
    trainer_ = std::make_unique<cuda::DeviceTrainer<Net>>(*net_, to);
    typename cuda::DeviceTrainer<Net>::State st;
    st.m = init.m;
    st.v = init.v;
    st.ema = init.ema;
    st.steps = init.adam_steps;
    st.ema_updates = init.ema_updates;
    trainer_->set_state(st);
  }
  float step(const Tensor<float>& x_t, const Tensor<float>& eps, const std::vector<std::int32_t>& t,
             const std::vector<std::int32_t>& y, Generator* dropout) override {
    return trainer_->step(x_t.cuda(), eps.cuda(), t, y, dropout);
  }
  void set_lr(double lr) override { trainer_->set_lr(lr); }
  CudaTrainState state() override {
    CudaTrainState s;
    s.weights = net_->named_tensors();
    const auto st = trainer_->state();
    s.m = st.m;
    s.v = st.v;
    s.ema = st.ema;
    s.adam_steps = st.steps;
    s.ema_updates = st.ema_updates;
    return s;
  }
  std::string device_name() const override { return name_; }

 private:
  std::unique_ptr<Net> net_;
  std::unique_ptr<cuda::DeviceTrainer<Net>> trainer_;
  std::string name_;
};

template <class Net>
class EpsModel final : public CudaEpsModel {
 public:
  EpsModel(std::unique_ptr<Net> net, const NamedTensors& weights, bool conditional)
      : net_(std::move(net)), graph_(&net_->params()), conditional_(conditional), name_(current_device_name()) {
    net_->load(weights);
  }
  Tensor<float> eps(const Tensor<float>& x, const std::vector<std::int32_t>& t,
                    const std::vector<std::int32_t>* y) override {
    const std::int64_t B = static_cast<std::int64_t>(t.size());
    if (conditional_ != (y != nullptr) || (y && static_cast<std::int64_t>(y->size()) != B))
      throw std::invalid_argument("CudaEpsModel::eps: labels do not fit the model");
    const Tensor<std::int32_t> td = Tensor<std::int32_t>::from(t, {B}).cuda();
    const Tensor<std::int32_t> yd = y ? Tensor<std::int32_t>::from(*y, {B}).cuda() : Tensor<std::int32_t>();
    const cuda::Act out = net_->forward(graph_, x.cuda(), td.data(), y ? yd.data() : nullptr, B, nullptr);
    graph_.clear();  // no backward: drop the tape and its activations
    return out->value.cpu();
  }
  std::string device_name() const override { return name_; }

 private:
  std::unique_ptr<Net> net_;
  cuda::Graph graph_;
  bool conditional_;
  std::string name_;
};

std::unique_ptr<cuda::ToyMLPDevice> make_mlp(const CudaMLPSizes& s) {
  return std::make_unique<cuda::ToyMLPDevice>(s.data_dim, s.hidden, s.layers, s.temb_dim);
}

}  // namespace

std::string cuda_unavailable_reason() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) return std::string("no usable CUDA device (") + cudaGetErrorString(e) + ")";
  if (n == 0) return "no CUDA device";
  return "";
}

std::unique_ptr<CudaTrainer> make_cuda_unet_trainer(const UNetConfig& config, const CudaTrainState& init,
                                                    const CudaTrainOptions& options) {
  require_device();
  return std::make_unique<Trainer<cuda::UNetDevice>>(std::make_unique<cuda::UNetDevice>(config), init, options);
}

std::unique_ptr<CudaEpsModel> make_cuda_unet_model(const UNetConfig& config, const NamedTensors& weights) {
  require_device();
  return std::make_unique<EpsModel<cuda::UNetDevice>>(std::make_unique<cuda::UNetDevice>(config), weights,
                                                      config.num_classes > 0);
}

std::unique_ptr<CudaTrainer> make_cuda_mlp_trainer(const CudaMLPSizes& sizes, const CudaTrainState& init,
                                                   const CudaTrainOptions& options) {
  require_device();
  return std::make_unique<Trainer<cuda::ToyMLPDevice>>(make_mlp(sizes), init, options);
}

std::unique_ptr<CudaEpsModel> make_cuda_mlp_model(const CudaMLPSizes& sizes, const NamedTensors& weights) {
  require_device();
  return std::make_unique<EpsModel<cuda::ToyMLPDevice>>(make_mlp(sizes), weights, false);
}

}  // namespace diffuse::examples
