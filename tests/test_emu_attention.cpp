// The attention kernel cases run through the CPU emulation (g++); test_kernels_cuda runs the same
// cases natively (cuda_attention.cu).
#include "kernel_cases_attention.hpp"
