// Host side of a kernel launch, the same call for nvcc and for the CPU emulation:
//
//   diffuse::cuda::launch(kernel<float>, grid, block, shared_bytes, stream, args...);
//
// Under nvcc it is kernel<<<grid, block, shared_bytes, stream>>>(args...) and throws
// std::runtime_error when the launch is refused (it does not wait for the kernel). In the
// emulation it runs the whole grid on the CPU before it returns; the stream is ignored.
// A function rather than a macro around <<<>>>: it checks the launch and takes template
// kernels without extra parentheses.
#pragma once

#include <diffuse/backend/cuda/device.hpp>

#include <cstddef>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

namespace diffuse::cuda {

#ifdef __CUDACC__
using stream_t = cudaStream_t;

template <class... P, class... A>
inline void launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t shared_bytes, stream_t stream, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "diffuse::cuda::launch: wrong number of kernel arguments");
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<A>(args)...);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("diffuse::cuda::launch: ") + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}
#else
using stream_t = void*;  // the emulation has no streams; pass nullptr or {}

template <class... P, class... A>
inline void launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t shared_bytes, stream_t, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "diffuse::cuda::launch: wrong number of kernel arguments");
  // Converted once, as a launch copies its arguments; each thread gets its own copy. Shared, not
  // on the stack: a launch inside a captured graph runs at each replay, after this returns.
  const auto params = std::make_shared<const std::tuple<P...>>(std::forward<A>(args)...);
  diffuse::emu::launch(grid, block, shared_bytes, [kernel, params] { std::apply(kernel, *params); });
}
#endif

}  // namespace diffuse::cuda
