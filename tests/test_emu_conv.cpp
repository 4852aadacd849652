// The conv kernel cases run through the CPU emulation (g++); test_kernels_cuda runs the same
// cases natively (cuda_conv.cu).
#include "kernel_cases_conv.hpp"
