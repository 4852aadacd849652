// cuda_unet_trainer.hpp in a build without CUDA: the trainers say so in one line.
#include "cuda_unet_trainer.hpp"

#include <stdexcept>

namespace diffuse::examples {

std::string cuda_unavailable_reason() { return "this build has no CUDA backend (configured without CUDA: DIFFUSE_CUDA=OFF or no nvcc)"; }

std::unique_ptr<CudaUNetTrainer> make_cuda_unet_trainer(const UNetConfig&, const CudaTrainState&, const CudaTrainOptions&) {
  throw std::runtime_error("--device cuda: " + cuda_unavailable_reason());
}

}  // namespace diffuse::examples
