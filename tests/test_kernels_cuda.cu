// The kernel cases of kernel_cases.hpp, compiled by nvcc and run natively on a GPU: the same
// source that test_emulation runs through the CPU emulation (kernel_cases*.hpp).
// main() is in cuda_test_main.cpp
// (it skips, exit code 77, when no CUDA device is present).
#include "kernel_cases.hpp"
#include "kernel_cases_adam.hpp"
#include "kernel_cases_rng.hpp"
#include "kernel_cases_q_sample.hpp"
// The kernel families, in this one file: each nvcc translation unit costs tens of seconds of
// fixed work (Catch2 through nvcc's front end), and CI has 2 cores.
#include "kernel_cases_group_norm.hpp"
#include "kernel_cases_elementwise.hpp"
#include "kernel_cases_image.hpp"
#include "kernel_cases_attention.hpp"
#include "kernel_cases_conv.hpp"
