// diffuse: denoising diffusion models in C++20. The umbrella header: everything below.
//
// It is convenient and slow to compile (Eigen's decompositions for the Frechet distance, stb,
// every op and model); a program pays only for what it includes, so include the folders' headers
// you use instead (the README's example includes three).
#pragma once

// core: tensors on a device, counter-based random numbers, the autograd
#include <diffuse/core/autograd.hpp>
#include <diffuse/core/config.hpp>
#include <diffuse/core/parallel.hpp>
#include <diffuse/core/rng.hpp>
#include <diffuse/core/tensor.hpp>

// ops: one signature per op, run on the device of the operands
#include <diffuse/ops/attention.hpp>
#include <diffuse/ops/attention_block.hpp>
#include <diffuse/ops/batch_norm.hpp>
#include <diffuse/ops/channel_bias.hpp>
#include <diffuse/ops/conv2d.hpp>
#include <diffuse/ops/dropout.hpp>
#include <diffuse/ops/elementwise.hpp>
#include <diffuse/ops/group_norm.hpp>
#include <diffuse/ops/group_norm_conv2d.hpp>
#include <diffuse/ops/layer_norm.hpp>
#include <diffuse/ops/linear.hpp>
#include <diffuse/ops/loss.hpp>
#include <diffuse/ops/nhwc.hpp>
#include <diffuse/ops/pool.hpp>
#include <diffuse/ops/reduce.hpp>
#include <diffuse/ops/res_block.hpp>
#include <diffuse/ops/shape.hpp>
#include <diffuse/ops/upsample.hpp>

// nn: modules and layers
#include <diffuse/nn/batch_norm.hpp>
#include <diffuse/nn/conv2d.hpp>
#include <diffuse/nn/group_norm.hpp>
#include <diffuse/nn/linear.hpp>
#include <diffuse/nn/mlp.hpp>
#include <diffuse/nn/module.hpp>
#include <diffuse/nn/timestep_embedding.hpp>

// models
#include <diffuse/models/inception_fid.hpp>
#include <diffuse/models/lenet.hpp>
#include <diffuse/models/toy_mlp.hpp>
#include <diffuse/models/unet.hpp>
#include <diffuse/models/unet_config.hpp>

// optim
#include <diffuse/optim/adam.hpp>
#include <diffuse/optim/clip_grad_norm.hpp>
#include <diffuse/optim/ema.hpp>
#include <diffuse/optim/lr_schedule.hpp>
#include <diffuse/optim/params.hpp>

// diffusion: schedules, the forward process, objectives, samplers, guidance
#include <diffuse/diffusion/denoiser.hpp>
#include <diffuse/diffusion/guidance.hpp>
#include <diffuse/diffusion/objectives.hpp>
#include <diffuse/diffusion/q_sample.hpp>
#include <diffuse/diffusion/samplers.hpp>
#include <diffuse/diffusion/schedule.hpp>
#include <diffuse/diffusion/solvers.hpp>
#include <diffuse/diffusion/timesteps.hpp>

// train: the training loop (progress, CSV log, checkpoints, resume, callbacks)
#include <diffuse/train/csv_log.hpp>
#include <diffuse/train/progress.hpp>
#include <diffuse/train/stop_signals.hpp>
#include <diffuse/train/trainer.hpp>

// distributed: data parallelism over processes (MPI with diffuse::mpi; NCCL on CUDA)
#include <diffuse/distributed/communicator.hpp>
#include <diffuse/distributed/grad_reducer.hpp>
#include <diffuse/distributed/launch.hpp>

// io: file formats
#include <diffuse/io/atomic_file.hpp>
#include <diffuse/io/checkpoint.hpp>
#include <diffuse/io/idx.hpp>
#include <diffuse/io/npy.hpp>
#include <diffuse/io/safetensors.hpp>

// data
#include <diffuse/data/augment.hpp>
#include <diffuse/data/dataset.hpp>
#include <diffuse/data/image_folder.hpp>
#include <diffuse/data/image_set.hpp>
#include <diffuse/data/points2d.hpp>
#include <diffuse/data/resize.hpp>

// eval
#include <diffuse/eval/fid.hpp>
#include <diffuse/eval/frechet.hpp>
#include <diffuse/eval/lenet_score.hpp>
#include <diffuse/eval/metrics2d.hpp>

// viz
#include <diffuse/viz/image_grid.hpp>
#include <diffuse/viz/plot.hpp>

// backends: the CUDA backend's interface (its implementation is compiled by diffuse::cuda)
#include <diffuse/backend/cuda.hpp>
#include <diffuse/backend/cuda_graph.hpp>
