// Device memory and the CUDA libraries on a GPU (test_cuda_memory; main() in cuda_test_main.cpp
// skips with exit code 77 without a device). Built wherever CUDA is enabled, so nvcc compiles the
// memory headers and the link against cudart, cuBLAS and cuDNN is exercised on every CUDA build.
//
//   DeviceBuffer: host -> device -> host round trips (synchronous, on a Stream, and from code the
//   host compiler built: cuda_memory_host.cpp), the memory is device memory, it comes from and
//   returns to the caching allocator; out of memory on the real device; checked-call messages;
//   a kernel on a Stream; cuBLAS SGEMM against a CPU loop; a cuDNN handle and a checked error.
// Random inputs use a fresh seed (shown with any failure); DIFFUSE_TEST_SEED=<n> repeats one.
#include <catch2/catch.hpp>

#include <diffuse/backend/cuda/check.hpp>
#include <diffuse/backend/cuda/memory.hpp>

#include "kernels/silu.cuh"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

static_assert(DIFFUSE_HAVE_CUDA_RUNTIME == 1, "nvcc: check.hpp must see the CUDA runtime");

namespace diffuse::testing {
// cuda_memory_host.cpp (compiled by the host compiler with DIFFUSE_WITH_CUDA, not by nvcc).
std::vector<std::uint32_t> round_trip_host_compiled(const std::vector<std::uint32_t>& x);
std::vector<float> tensor_round_trip_host_compiled(const std::vector<float>& x, const char** memory_name);
}  // namespace diffuse::testing

namespace {

using diffuse::cuda::DeviceBuffer;
using diffuse::cuda::Stream;

std::uint64_t test_seed() {
  if (const char* s = std::getenv("DIFFUSE_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  std::random_device rd;
  return (static_cast<std::uint64_t>(rd()) << 32) | rd();
}

std::vector<std::uint32_t> random_bits(std::mt19937_64& gen, std::size_t n) {
  std::vector<std::uint32_t> v(n);
  for (auto& x : v) x = static_cast<std::uint32_t>(gen());
  return v;
}

std::string what_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no exception)";
}

}  // namespace

TEST_CASE("DeviceBuffer: host -> device -> host keeps every bit") {
  const std::uint64_t seed = test_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  for (std::size_t n : {std::size_t(1), std::size_t(7), std::size_t(1000), std::size_t(65537), (std::size_t(1) << 20) + 3}) {
    INFO("n " << n);
    const std::vector<std::uint32_t> x = random_bits(gen, n);

    DeviceBuffer<std::uint32_t> d(x);
    REQUIRE(d.size() == n);
    REQUIRE(d.bytes() == n * 4);
    cudaPointerAttributes attr{};
    DIFFUSE_CUDA_CHECK(cudaPointerGetAttributes(&attr, d.data()));
    CHECK(attr.type == cudaMemoryTypeDevice);  // device memory, not managed or host memory
    CHECK(d.to_host() == x);

    // The copy back reads the device: overwrite it there, then restore it.
    DIFFUSE_CUDA_CHECK(cudaMemset(d.data(), 0, d.bytes()));
    CHECK(d.to_host() == std::vector<std::uint32_t>(n, 0u));
    d.copy_from_host(x);
    std::vector<std::uint32_t> back(n);
    d.copy_to_host(back);
    CHECK(back == x);

    // Asynchronous copies on a stream.
    Stream s;
    DeviceBuffer<std::uint32_t> e(n);
    std::vector<std::uint32_t> y(n, 0u);
    e.fill_bytes_async(0xFF, s);
    e.copy_from_host_async(x, s);
    e.copy_to_host_async(y, s);
    s.synchronize();
    CHECK(y == x);

    // The same through code compiled by the host compiler (g++ with DIFFUSE_WITH_CUDA).
    CHECK(diffuse::testing::round_trip_host_compiled(x) == x);
  }
}

TEST_CASE("Tensor on Device::CUDA: host -> device -> device clone -> host keeps every bit") {
  std::mt19937 gen(std::random_device{}());
  std::normal_distribution<float> d(0.0f, 3.0f);
  std::vector<float> x(100003);
  for (float& v : x) v = d(gen);
  const char* name = nullptr;
  const std::vector<float> back = diffuse::testing::tensor_round_trip_host_compiled(x, &name);
  CHECK(std::string(name) == "CUDA runtime");
  REQUIRE(back.size() == x.size());
  CHECK(std::memcmp(back.data(), x.data(), x.size() * sizeof(float)) == 0);
}

TEST_CASE("DeviceBuffer: memory comes from the caching allocator and returns to it") {
  auto& a = diffuse::cuda::device_allocator();
  a.empty_cache();
  const auto s0 = a.stats();
  float* first = nullptr;
  {
    DeviceBuffer<float> b(1000);  // 4000 bytes -> bucket 4096
    first = b.data();
    CHECK(b.allocator() == &a);
    CHECK(a.stats().bytes_in_use == s0.bytes_in_use + 4096);
    CHECK(a.stats().system_allocations == s0.system_allocations + 1);
  }
  CHECK(a.stats().bytes_cached == 4096);
  {
    DeviceBuffer<float> c(900);  // 3600 bytes: the same bucket, so the same block
    CHECK(c.data() == first);
    CHECK(a.stats().system_allocations == s0.system_allocations + 1);
    CHECK(a.stats().cache_hits == s0.cache_hits + 1);

    DeviceBuffer<float> moved(std::move(c));  // move-only: the block changes owner, nothing is copied
    CHECK(moved.data() == first);
    CHECK(c.data() == nullptr);  // NOLINT(bugprone-use-after-move)
    CHECK(c.empty());
    DeviceBuffer<float> other(10);
    other = std::move(moved);  // other's old block returns to the cache
    CHECK(other.data() == first);
    CHECK(a.stats().blocks_in_use == s0.blocks_in_use + 1);
  }
  CHECK(a.stats().bytes_in_use == s0.bytes_in_use);
  a.empty_cache();
  CHECK(a.stats().bytes_cached == 0);

  DeviceBuffer<float> empty;
  CHECK(empty.data() == nullptr);
  CHECK(empty.to_host().empty());
  DeviceBuffer<float> three(3);
  std::vector<float> two(2);
  CHECK_THROWS_AS(three.copy_to_host(two), std::invalid_argument);
  CHECK_THROWS_AS(three.copy_from_host(two), std::invalid_argument);
}

TEST_CASE("caching allocator on cudaMalloc: out of memory is a clear error, and the device keeps working") {
  std::size_t free_bytes = 0, total_bytes = 0;
  DIFFUSE_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  INFO("device memory: " << free_bytes << " free of " << total_bytes);
  const std::string message = what_of([&] { DeviceBuffer<char> huge(4 * total_bytes); });
  INFO(message);
  CHECK(message.find("out of memory: cudaMalloc could not allocate") != std::string::npos);
  CHECK(cudaGetLastError() == cudaSuccess);  // the failed cudaMalloc left no error behind
  DeviceBuffer<int> ok(std::vector<int>{1, 2, 3});
  CHECK(ok.to_host() == std::vector<int>{1, 2, 3});
}

TEST_CASE("checked CUDA calls name the call, the file and line, and the error") {
  const std::string message = what_of([] { DIFFUSE_CUDA_CHECK(cudaSetDevice(-1)); });
  INFO(message);
  CHECK(message.rfind("CUDA error: cudaSetDevice(-1) failed at ", 0) == 0);
  CHECK(message.find("test_cuda_memory.cu:") != std::string::npos);
  CHECK(message.find("cudaErrorInvalidDevice") != std::string::npos);
  (void)cudaGetLastError();
  int device = -1;
  DIFFUSE_CUDA_CHECK(cudaGetDevice(&device));
  CHECK(device == 0);
}

TEST_CASE("a kernel on a Stream between asynchronous copies") {
  const std::uint64_t seed = test_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> dist(-12.0f, 12.0f);
  const std::size_t n = 100003;
  std::vector<float> x(n), y(n);
  for (float& v : x) v = dist(gen);
  Stream s;
  DeviceBuffer<float> dx(n), dy(n);
  dx.copy_from_host_async(x, s);
  dy.fill_bytes_async(0xFF, s);  // NaN: an element the kernel misses fails
  diffuse::kernels::silu_forward(dx.data(), dy.data(), static_cast<std::int64_t>(n), s);
  dy.copy_to_host_async(y, s);
  s.synchronize();
  std::size_t bad = 0, first_bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double ref = x[i] / (1.0 + std::exp(-static_cast<double>(x[i])));
    if (!(std::fabs(y[i] - ref) <= 8 * FLT_EPSILON * std::fabs(ref) + FLT_MIN) && bad++ == 0) first_bad = i;
  }
  INFO("first mismatch at " << first_bad << ": silu(" << x[first_bad] << ") = " << y[first_bad]);
  CHECK(bad == 0);
}

#if defined(DIFFUSE_WITH_CUBLAS)
TEST_CASE("cuBLAS SGEMM (row-major through the column-major API) matches a CPU loop") {
  const std::uint64_t seed = test_seed();
  INFO("seed " << seed);
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);

  cublasHandle_t handle = nullptr;
  DIFFUSE_CUBLAS_CHECK(cublasCreate(&handle));
  Stream s;
  DIFFUSE_CUBLAS_CHECK(cublasSetStream(handle, s));
  DIFFUSE_CUBLAS_CHECK(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));  // full fp32, no TF32

  struct Case {
    int m, n, k;
    bool ta, tb;  // C = alpha op(A) op(B) + beta C, all row-major
  };
  for (Case c : {Case{1, 1, 1, false, false}, Case{67, 45, 129, false, false}, Case{33, 70, 17, true, false},
                 Case{128, 96, 300, false, true}, Case{256, 200, 256, true, true}}) {
    INFO("m " << c.m << " n " << c.n << " k " << c.k << " transA " << c.ta << " transB " << c.tb);
    const float alpha = 1.5f, beta = -0.5f;
    std::vector<float> A(static_cast<std::size_t>(c.m) * c.k), B(static_cast<std::size_t>(c.k) * c.n),
        C0(static_cast<std::size_t>(c.m) * c.n);
    for (float& v : A) v = u(gen);
    for (float& v : B) v = u(gen);
    for (float& v : C0) v = u(gen);
    // op(A)[i][p]: A is stored m x k, or k x m when transposed; likewise B.
    auto a = [&](int i, int p) { return c.ta ? A[static_cast<std::size_t>(p) * c.m + i] : A[static_cast<std::size_t>(i) * c.k + p]; };
    auto b = [&](int p, int j) { return c.tb ? B[static_cast<std::size_t>(j) * c.k + p] : B[static_cast<std::size_t>(p) * c.n + j]; };

    DeviceBuffer<float> dA(A), dB(B), dC(C0);
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: B first, then A.
    DIFFUSE_CUBLAS_CHECK(cublasSgemm(handle, c.tb ? CUBLAS_OP_T : CUBLAS_OP_N, c.ta ? CUBLAS_OP_T : CUBLAS_OP_N, c.n,
                                     c.m, c.k, &alpha, dB.data(), c.tb ? c.k : c.n, dA.data(), c.ta ? c.m : c.k, &beta,
                                     dC.data(), c.n));
    s.synchronize();
    const std::vector<float> C = dC.to_host();

    std::size_t bad = 0;
    double worst = 0;
    for (int i = 0; i < c.m; ++i) {
      for (int j = 0; j < c.n; ++j) {
        double dot = 0, mag = 0;
        for (int p = 0; p < c.k; ++p) {
          dot += static_cast<double>(a(i, p)) * b(p, j);
          mag += std::fabs(static_cast<double>(a(i, p)) * b(p, j));
        }
        const std::size_t ij = static_cast<std::size_t>(i) * c.n + j;
        const double ref = alpha * dot + beta * C0[ij];
        const double bound = (c.k + 3) * FLT_EPSILON * (std::fabs(alpha) * mag + std::fabs(beta * C0[ij])) + FLT_MIN;
        const double err = std::fabs(C[ij] - ref);
        worst = std::max(worst, err / bound);
        if (!(err <= bound)) ++bad;
      }
    }
    INFO("largest error / bound " << worst);
    CHECK(bad == 0);
  }

  // A refused call: the message names cuBLAS, the call and the status.
  const float one = 1.0f;
  DeviceBuffer<float> d1(1);
  const std::string message = what_of([&] {
    DIFFUSE_CUBLAS_CHECK(cublasSgemm(handle, CUBLAS_OP_N, CUBLAS_OP_N, -1, 1, 1, &one, d1.data(), 1, d1.data(), 1, &one,
                                     d1.data(), 1));
  });
  INFO(message);
  CHECK(message.rfind("cuBLAS error: cublasSgemm(", 0) == 0);
  CHECK(message.find("CUBLAS_STATUS_INVALID_VALUE") != std::string::npos);
  DIFFUSE_CUBLAS_CHECK(cublasDestroy(handle));
}
#else
TEST_CASE("cuBLAS: not linked") {
  WARN("CMake found no CUDA::cublas: diffuse::cuda was built without cuBLAS, its test is left out");
}
#endif

#if defined(DIFFUSE_WITH_CUDNN)
TEST_CASE("cuDNN: a handle on a stream, the library version, a checked error") {
  const std::size_t version = cudnnGetVersion();
  INFO("cuDNN runtime " << version << ", header " << CUDNN_VERSION);
#if CUDNN_MAJOR >= 9
  CHECK(version / 10000 == CUDNN_MAJOR);  // the library matches the header it was compiled with
#endif
  cudnnHandle_t handle = nullptr;
  DIFFUSE_CUDNN_CHECK(cudnnCreate(&handle));
  Stream s;
  DIFFUSE_CUDNN_CHECK(cudnnSetStream(handle, s));

  cudnnTensorDescriptor_t desc = nullptr;
  DIFFUSE_CUDNN_CHECK(cudnnCreateTensorDescriptor(&desc));
  DIFFUSE_CUDNN_CHECK(cudnnSetTensor4dDescriptor(desc, CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, 2, 3, 5, 7));
  std::size_t bytes = 0;
  DIFFUSE_CUDNN_CHECK(cudnnGetTensorSizeInBytes(desc, &bytes));
  CHECK(bytes == 2 * 3 * 5 * 7 * sizeof(float));

  const std::string message = what_of(
      [&] { DIFFUSE_CUDNN_CHECK(cudnnSetTensor4dDescriptor(desc, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, -1, 1, 1, 1)); });
  INFO(message);
  CHECK(message.rfind("cuDNN error: cudnnSetTensor4dDescriptor(", 0) == 0);
  CHECK(message.find("CUDNN_STATUS_BAD_PARAM") != std::string::npos);

  DIFFUSE_CUDNN_CHECK(cudnnDestroyTensorDescriptor(desc));
  DIFFUSE_CUDNN_CHECK(cudnnDestroy(handle));
}
#else
TEST_CASE("cuDNN: not linked") {
  WARN("CMake found no cuDNN (set CUDNN_ROOT): diffuse::cuda was built without it, its test is left out");
}
#endif
