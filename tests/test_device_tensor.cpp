// Tensor<T> on Device::CUDA (tensor.hpp + cuda/tensor.hpp), with the CPU emulation's device
// memory (host memory posing as device memory): moves between devices, clones and copies, the
// refusals (element access through the CPU ops, no device memory registered), and a kernel run
// on a device tensor's data. test_cuda_memory runs the same moves on a real device.
#include <catch2/catch.hpp>

#include <diffuse/core/autograd.hpp>
#include <diffuse/backend/cuda/tensor.hpp>
#include <diffuse/ops/elementwise.hpp>
#include <diffuse/ops/shape.hpp>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>

#include "kernel_seed.hpp"
#include "kernels/silu.cuh"

using diffuse::Device;
using diffuse::Tensor;

namespace {
Tensor<float> random_tensor(diffuse::Shape s, std::mt19937_64& gen) {
  Tensor<float> t(std::move(s));
  std::normal_distribution<float> d(0.5f, 2.0f);
  for (float& v : t) v = d(gen);
  return t;
}
bool same_bits(const Tensor<float>& a, const Tensor<float>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}
}  // namespace

TEST_CASE("device tensor: without registered device memory a CUDA tensor is refused in one line") {
  const diffuse::DeviceMemory* before = diffuse::set_device_memory(nullptr);
  try {
    Tensor<float>({2, 3}, Device::CUDA);
    FAIL("no exception");
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()).find("CUDA tensors need the CUDA backend") != std::string::npos);
  }
  diffuse::set_device_memory(before);
}

TEST_CASE("device tensor: to(CUDA) and back keeps every bit; clone and copy_from work across devices") {
  diffuse::cuda::EmulatedDeviceMemory emulated;
  const std::uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  for (diffuse::Shape s : {diffuse::Shape{1}, diffuse::Shape{3, 5, 7}, diffuse::Shape{2, 17, 17, 33}, diffuse::Shape{0, 4}}) {
    const Tensor<float> h = random_tensor(s, gen);
    const Tensor<float> d = h.cuda();
    CHECK(d.device() == Device::CUDA);
    CHECK(d.shape() == h.shape());
    CHECK_FALSE(d.shares_storage(h));
    CHECK(d.cuda().shares_storage(d));  // already there: the same tensor
    const Tensor<float> back = d.cpu();
    CHECK(back.device() == Device::CPU);
    CHECK(same_bits(back, h));
    const Tensor<float> d2 = d.clone();  // device to device
    CHECK(d2.device() == Device::CUDA);
    CHECK_FALSE(d2.shares_storage(d));
    CHECK(same_bits(d2.to(Device::CPU), h));
    Tensor<float> d3(s, Device::CUDA), h3(s);
    d3.copy_from(h);  // host to device
    h3.copy_from(d3);  // device to host
    CHECK(same_bits(h3, h));
    CHECK(same_bits(d.reshape({-1}).cpu().reshape(s), h));  // reshape shares device storage
  }
}

TEST_CASE("device tensor: device memory without the CUDA backend: ops say so in one line") {
  diffuse::cuda::EmulatedDeviceMemory emulated;  // memory only: no backend registered in this program
  Tensor<float> d = Tensor<float>::ones({4}).cuda();
  CHECK_THROWS_WITH(d.fill(2.0f), Catch::Contains("fill on cuda") && Catch::Contains("no CUDA backend"));
  CHECK_THROWS_WITH(d.to<double>(), Catch::Contains("needs a CPU tensor"));
  const diffuse::Var<float> v(d);  // the autograd takes tensors of any device; the ops dispatch
  CHECK_THROWS_WITH(diffuse::silu(v), Catch::Contains("silu on cuda") && Catch::Contains("diffuse::cuda"));
  CHECK(diffuse::cuda_unavailable_reason().find("no CUDA backend") != std::string::npos);
}

TEST_CASE("device tensor: a kernel on device tensors (emulation) matches the CPU op") {
  diffuse::cuda::EmulatedDeviceMemory emulated;
  const std::uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  const Tensor<float> h = random_tensor({3, 5, 5, 7}, gen);
  const Tensor<float> dx = h.cuda();
  Tensor<float> dy(h.shape(), Device::CUDA);  // 0xFF until written
  diffuse::kernels::silu_forward(dx.data(), dy.data(), dx.numel(), {}, 64, 2);
  const Tensor<float> y = dy.cpu(), ref = diffuse::silu(diffuse::Var<float>(h)).value();
  size_t bad = 0;
  // Two exps (the kernel's expf, the CPU op's vectorised Eigen exp), each within 2 ulp, plus
  // 2-3 roundings a side: at most 9 eps relative together, as kernel_cases_elementwise.hpp
  // bounds SiLU (2e-7, under 2 eps, failed about 1 run in 20: 2.17e-7 at x = -1.11).
  for (size_t i = 0; i < y.size(); ++i)
    bad += !(std::fabs(y[i] - ref[i]) <= 10.0f * FLT_EPSILON * std::fabs(ref[i]) + FLT_MIN);
  CHECK(bad == 0);
}
