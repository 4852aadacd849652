// The group_norm kernel cases run through the CPU emulation (g++); test_kernels_cuda runs the same
// cases natively (cuda_group_norm.cu).
#include "kernel_cases_group_norm.hpp"
