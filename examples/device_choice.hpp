// The tools' --device flag: "cpu", "cuda", or "" (cuda when this program has a usable CUDA
// device, else cpu). Asking for cuda where there is none fails before any work, in one line.
#pragma once

#include <diffuse/core/tensor.hpp>

#include <stdexcept>
#include <string>

namespace diffuse::examples {

inline Device choose_device(const std::string& flag) {
  if (flag == "cpu") return Device::CPU;
  const std::string why = cuda_unavailable_reason();
  if (flag.empty()) return why.empty() ? Device::CUDA : Device::CPU;
  if (flag != "cuda") throw std::invalid_argument("--device must be cpu or cuda, got '" + flag + "'");
  if (!why.empty()) throw std::runtime_error("--device cuda: " + why + " (use --device cpu)");
  return Device::CUDA;
}

// "cpu", or "cuda (<the device's name>)" for the tools' first line.
inline std::string device_description(Device d) {
  if (d == Device::CPU) return "cpu";
  return "cuda (" + backend::require_cuda("device").name() + ")";
}

// --tf32: TF32 tensor cores for the device's GEMMs and convolutions; refused on the CPU.
inline void apply_tf32(bool tf32, Device d) {
  if (!tf32) return;
  if (d != Device::CUDA) throw std::invalid_argument("--tf32 needs --device cuda");
  set_cuda_math_mode(MathMode::TF32);
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
