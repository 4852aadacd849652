// The small types that an op and its backends share: which pointwise function, how two shapes
// broadcast, the geometry of a convolution or a pooling window. Plain structs of integers, so
// the CPU ops (ops/*.hpp) and the CUDA backend (backend/cuda.hpp) describe the same
// call the same way.
#pragma once

#include <cstdint>

namespace diffuse {

// The activation after a linear layer (linear_act) and the pointwise ops of the API.
enum class Activation : std::uint8_t { SiLU, ReLU, None, GELU };

enum class BinaryOp : std::uint8_t { Add, Sub, Mul };

// How float matrix products and convolutions on the device round their inputs:
//   FP32  full float products, float accumulation (matches the CPU up to the order of summation;
//         cuDNN: CUDNN_FMA_MATH, never tensor cores)
//   TF32  tensor cores (Ampere and newer): inputs rounded to 10 mantissa bits, float accumulation
//   BF16  tensor cores in bfloat16 (PyTorch's bf16 autocast of matmuls and convolutions): each
//         product's two operands rounded to bf16 (8 significant bits), float accumulation; a
//         convolution's output is rounded to bf16 as well (cuDNN writes bf16 tensors), a GEMM's
//         is not. Everything else (normalisations, softmax, the loss, the optimiser, the
//         weights and the stored activations) stays in float.
enum class MathMode : std::uint8_t { FP32, TF32, BF16 };

// "fp32", "tf32", "bf16".
inline const char* math_mode_name(MathMode m) {
  return m == MathMode::BF16 ? "bf16" : m == MathMode::TF32 ? "tf32" : "fp32";
}

// Which device kernels compute attention (ops/attention.hpp) on CUDA operands:
//   Full   the reference: cuBLAS GEMMs and a softmax kernel over the whole [L, L] score matrix
//          P, which is kept for the backward (4 N heads L^2 bytes)
//   Flash  fused kernels (kernels/flash_attention.cuh): online softmax, only one log-sum-exp
//          per query row kept, P recomputed in the backward; head dims up to 256 (a larger one
//          falls back to Full). CUDA-core FP32: less memory, not yet measured for speed.
enum class AttentionKernel : std::uint8_t { Full, Flash };

namespace backend {

inline constexpr int kMaxDims = 8;
// The fused attention kernels' largest head dimension (kernels::kFlashMaxHeadDim).
inline constexpr std::int64_t kFlashAttentionMaxHeadDim = 256;

// Two operands broadcast to an output of `ndim` dimensions (NumPy's rules): the output sizes
// and, per output dimension, each operand's element stride (0 where it is broadcast). Row-major.
struct BroadcastDesc {
  int ndim = 0;
  std::int64_t out[kMaxDims] = {};
  std::int64_t sa[kMaxDims] = {};
  std::int64_t sb[kMaxDims] = {};
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= out[i];
    return n;
  }
};

// conv2d on NHWC x [N, H, W, C] with an OHWI weight [O, kh, kw, C]; y [N, Ho, Wo, O].
struct ConvDesc {
  std::int64_t N = 0, H = 0, W = 0, C = 0, O = 0, kh = 0, kw = 0;
  std::int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0;
  std::int64_t Ho() const { return (H + 2 * pad_h - kh) / stride_h + 1; }
  std::int64_t Wo() const { return (W + 2 * pad_w - kw) / stride_w + 1; }
};

// A pooling window over NHWC x [N, H, W, C] -> [N, OH, OW, C] (ops/pool.hpp has the rules).
// Output row i reads input rows [max(start, 0), min(start + k, H)) with start = i stride - pad;
// its padded length (count_include_pad's divisor) is min(start + k, H + pad) - start.
struct PoolDesc {
  std::int64_t N = 0, H = 0, W = 0, C = 0, OH = 0, OW = 0;
  std::int64_t kernel_h = 1, kernel_w = 1, stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0;
  bool count_include_pad = true;
};

}  // namespace backend
}  // namespace diffuse
