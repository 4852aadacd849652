// Part of test_cuda_memory compiled by the host compiler, not nvcc: the memory headers in an
// ordinary C++ translation unit with DIFFUSE_WITH_CUDA (as host code of the library will be).
#include <diffuse/backend/cuda/memory.hpp>
#include <diffuse/backend/cuda/tensor.hpp>

#include <cstdint>
#include <vector>

static_assert(DIFFUSE_HAVE_CUDA_RUNTIME == 1, "diffuse::cuda defines DIFFUSE_WITH_CUDA: check.hpp must see the runtime");

namespace diffuse::testing {

std::vector<std::uint32_t> round_trip_host_compiled(const std::vector<std::uint32_t>& x) {
  diffuse::cuda::Stream stream;
  diffuse::cuda::DeviceBuffer<std::uint32_t> d(x.size());
  std::vector<std::uint32_t> out(x.size(), 0u);
  d.copy_from_host_async(x, stream);
  d.copy_to_host_async(out, stream);
  stream.synchronize();
  return out;
}

// Tensor<float> to the device (the CUDA runtime's registered memory), a device-side clone, back.
std::vector<float> tensor_round_trip_host_compiled(const std::vector<float>& x, const char** memory_name) {
  const diffuse::Tensor<float> h = diffuse::Tensor<float>::from(x, {static_cast<std::int64_t>(x.size())});
  const diffuse::Tensor<float> d = h.cuda().clone();
  *memory_name = diffuse::device_memory() ? diffuse::device_memory()->name : "none";
  const diffuse::Tensor<float> back = d.cpu();
  return std::vector<float>(back.begin(), back.end());
}

}  // namespace diffuse::testing
