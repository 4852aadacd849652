// cuda_models.hpp in a build without CUDA: the tools say so in one line.
#include "cuda_models.hpp"

#include <stdexcept>

namespace diffuse::examples {

std::string cuda_unavailable_reason() { return "this build has no CUDA backend (configured without CUDA: DIFFUSE_CUDA=OFF or no nvcc)"; }

namespace {
[[noreturn]] void refuse() { throw std::runtime_error("--device cuda: " + cuda_unavailable_reason()); }
}  // namespace

std::unique_ptr<CudaTrainer> make_cuda_unet_trainer(const UNetConfig&, const CudaTrainState&, const CudaTrainOptions&) {
  refuse();
}
std::unique_ptr<CudaEpsModel> make_cuda_unet_model(const UNetConfig&, const NamedTensors&) { refuse(); }
std::unique_ptr<CudaTrainer> make_cuda_mlp_trainer(const CudaMLPSizes&, const CudaTrainState&, const CudaTrainOptions&) {
  refuse();
}
std::unique_ptr<CudaEpsModel> make_cuda_mlp_model(const CudaMLPSizes&, const NamedTensors&) { refuse(); }

}  // namespace diffuse::examples
