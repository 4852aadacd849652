// BatchNorm2d in inference mode (torch.nn.BatchNorm2d after .eval()), on NHWC
// activations. Parameters "weight" and "bias"; buffers "running_mean" and
// "running_var" (PyTorch's names, so state dicts load unchanged). PyTorch's
// "num_batches_tracked" only matters in training and is not kept.
#pragma once

#include <diffuse/nn/module.hpp>
#include <diffuse/ops/batch_norm.hpp>

namespace diffuse {

template <class T>
class BatchNorm2d : public Module<T> {
 public:
  // PyTorch's initial state: weight 1, bias 0, mean 0, variance 1.
  explicit BatchNorm2d(int64_t channels, double eps = 1e-5) : eps_(eps) {
    weight = this->register_parameter("weight", Tensor<T>::full({channels}, T(1)));
    bias = this->register_parameter("bias", Tensor<T>::full({channels}, T(0)));
    running_mean = this->register_buffer("running_mean", Tensor<T>::full({channels}, T(0)));
    running_var = this->register_buffer("running_var", Tensor<T>::full({channels}, T(1)));
  }
  Var<T> operator()(const Var<T>& x) const {
    return batch_norm_inference(x, weight, bias, running_mean.value(), running_var.value(), eps_);
  }
  double eps() const { return eps_; }

  Var<T> weight, bias, running_mean, running_var;

 private:
  double eps_;
};

}  // namespace diffuse
