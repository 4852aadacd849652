// The group_norm kernel cases compiled by nvcc and run natively (part of test_kernels_cuda).
#include "kernel_cases_group_norm.hpp"
