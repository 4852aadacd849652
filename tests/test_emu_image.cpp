// The image kernel cases run through the CPU emulation (g++); test_kernels_cuda runs the same
// cases natively (cuda_image.cu).
#include "kernel_cases_image.hpp"
