// The image kernel cases compiled by nvcc and run natively (part of test_kernels_cuda).
#include "kernel_cases_image.hpp"
