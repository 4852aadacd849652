// MathMode (FP32 or TF32 for the device's GEMMs and convolutions) for the cuBLAS and cuDNN
// wrappers; defined with the ops' shared types (backend/op_types.hpp).
#pragma once

#include <diffuse/backend/op_types.hpp>

namespace diffuse::cuda {

using diffuse::MathMode;

}  // namespace diffuse::cuda
