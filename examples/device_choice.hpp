// The tools' --device flag: "cpu", "cuda", or "" (cuda when this program has a usable CUDA
// device, else cpu). Asking for cuda where there is none fails before any work, in one line, as
// does a DIFFUSE_NUM_THREADS or OMP_NUM_THREADS that is not a thread count.
#pragma once

#include <diffuse/core/parallel.hpp>
#include <diffuse/core/tensor.hpp>

#include <stdexcept>
#include <string>

namespace diffuse::examples {

inline Device choose_device(const std::string& flag) {
  (void)num_threads();  // reads the environment's thread count now, not in the middle of the work
  if (flag == "cpu") return Device::CPU;
  const std::string why = cuda_unavailable_reason();
  if (flag.empty()) return why.empty() ? Device::CUDA : Device::CPU;
  if (flag != "cuda") throw std::invalid_argument("--device must be cpu or cuda, got '" + flag + "'");
  if (!why.empty()) throw std::runtime_error("--device cuda: " + why + " (use --device cpu)");
  return Device::CUDA;
}

// "cpu (<n> threads)", or "cuda (<the device's name>, <precision>[, flash attention])" for the tools' first line.
inline std::string device_description(Device d) {
  if (d == Device::CPU) return "cpu (" + std::to_string(num_threads()) + (num_threads() == 1 ? " thread)" : " threads)");
  // The device's settings too, so a log says how its numbers were computed.
  const backend::CudaBackend& be = backend::require_cuda("device");
  return "cuda (" + be.name() + ", " + math_mode_name(be.math_mode()) +
         (be.attention_kernel() == AttentionKernel::Flash ? ", flash attention" : "") + ")";
}

// The help text of --precision, the same in every tool.
inline constexpr const char* kPrecisionHelp =
    "with --device cuda, how the GEMMs and convolutions round their inputs: fp32 (exact float products, as the CPU), "
    "tf32 (tensor cores, inputs rounded to 10 mantissa bits) or bf16 (tensor cores, operands rounded to bf16, float "
    "accumulation; a normalisation's output that a convolution reads, a ResBlock's concatenated input and "
    "its activation between its convolutions are stored in bf16, and with --attention flash every activation of an attention block; norm statistics, softmax, loss, optimiser and weights stay float)";

// --precision fp32|tf32|bf16 (and the older --tf32, the same as --precision tf32): the device's
// MathMode for the GEMMs and convolutions; tf32 and bf16 are refused on the CPU, as is a --tf32
// that contradicts --precision. Returns the mode set.
inline MathMode apply_precision(const std::string& precision, bool tf32, Device d) {
  MathMode m;
  if (precision == "fp32") m = MathMode::FP32;
  else if (precision == "tf32") m = MathMode::TF32;
  else if (precision == "bf16") m = MathMode::BF16;
  else throw std::invalid_argument("--precision must be fp32, tf32 or bf16, got '" + precision + "'");
  if (tf32) {
    if (m == MathMode::BF16) throw std::invalid_argument("--tf32 contradicts --precision bf16 (give one of them)");
    m = MathMode::TF32;
  }
  if (m == MathMode::FP32) return m;
  if (d != Device::CUDA)
    throw std::invalid_argument(std::string(tf32 ? "--tf32" : "--precision ") + (tf32 ? "" : precision) +
                                " needs --device cuda (the CPU computes in fp32)");
  set_cuda_math_mode(m);
  return m;
}

// --cuda-graph: its help text (the same in every trainer), and its check.
inline constexpr const char* kCudaGraphHelp =
    "with --device cuda: capture the forward and backward into a CUDA graph after two steps and replay it each step "
    "(one launch, no host work per step; the same numbers). Needs a fixed batch shape and one process; "
    "when the step cannot be captured the run goes on without it, with a message";
inline void check_cuda_graph(bool on, Device d) {
  if (on && d != Device::CUDA) throw std::invalid_argument("--cuda-graph needs --device cuda");
}

// --attention full|flash: the device kernels of attention (AttentionKernel); flash is refused
// on the CPU, whose op never keeps more than a block of scores per thread anyway.
inline void apply_attention_kernel(const std::string& flag, Device d) {
  if (flag == "full") return;
  if (flag != "flash") throw std::invalid_argument("--attention must be full or flash, got '" + flag + "'");
  if (d != Device::CUDA) throw std::invalid_argument("--attention flash needs --device cuda");
  set_cuda_attention_kernel(AttentionKernel::Flash);
}

}  // namespace diffuse::examples
