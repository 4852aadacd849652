// How float matrix products and convolutions on the device round their inputs (shared by the
// cuBLAS and cuDNN wrappers):
//   FP32  full float products with float accumulation: results match the CPU backend up to the
//         order of summation (cuDNN: CUDNN_FMA_MATH, never tensor cores)
//   TF32  tensor cores on Ampere and newer: the inputs are rounded to 10 mantissa bits before
//         the products (about 1e-3 relative per product), float accumulation
#pragma once

namespace diffuse::cuda {

enum class MathMode { FP32, TF32 };

}  // namespace diffuse::cuda
