// Outside consumer of an installed CUDA build of diffuse: the host-side CUDA headers compile with
// the C++ compiler and link against what diffuse::cuda brings (cudart, and cuBLAS / cuDNN when
// diffuse was built with them). Built only; running it would need a GPU.
#include <diffuse/cuda/memory.hpp>

#include <cstdio>

int main() {
  diffuse::cuda::DeviceBuffer<float> buffer(16);
  diffuse::cuda::Stream stream;
  buffer.fill_bytes_async(0, stream);
  stream.synchronize();
#if defined(DIFFUSE_WITH_CUBLAS)
  std::printf("%s\n", cublasGetStatusName(CUBLAS_STATUS_SUCCESS));
#endif
#if defined(DIFFUSE_WITH_CUDNN)
  std::printf("cuDNN %zu\n", cudnnGetVersion());
#endif
  return buffer.size() == 16 ? 0 : 1;
}
