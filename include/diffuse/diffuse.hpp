// diffuse: denoising diffusion models in C++20. The umbrella header.
#pragma once

#include "config.hpp"
#include "rng.hpp"
#include "tensor.hpp"
#include "autograd.hpp"
#include "ops.hpp"
#include "module.hpp"
#include "layers/linear.hpp"
#include "layers/timestep_embedding.hpp"
#include "layers/mlp.hpp"
#include "optim.hpp"
#include "schedule.hpp"
#include "diffusion.hpp"
#include "safetensors.hpp"
#include "checkpoint.hpp"
