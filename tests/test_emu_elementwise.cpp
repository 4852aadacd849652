// The elementwise kernel cases run through the CPU emulation (g++); test_kernels_cuda runs the same
// cases natively (cuda_elementwise.cu).
#include "kernel_cases_elementwise.hpp"
