// DDPM ancestral sampling with the device U-Net: the CPU's ddpm_sample (diffusion.hpp) with
// guided_eps_model (guidance.hpp), step for step and draw for draw, so the same seed gives the
// same images up to float rounding (and, on a GPU, the device's logf/sinf/cosf in the normals).
//
//   Tensor<float> x = diffuse::cuda::ddpm_sample(net, schedule, n, labels, gen, options);  // CPU [n, H, W, C]
//
// x_T is drawn on the host (Tensor::randn, as the CPU does) and uploaded; each step runs the
// network once (the doubled batch [x; x] with labels [y; null] under guidance) and one fused
// kernel (kernels/sampler.cuh) for the guidance mix, the update and the noise, which it draws
// from the Generator's Philox stream at the offset the CPU's randn would use.
// Compiled by nvcc (GPU) or by g++ for the emulation, like cuda/unet.hpp.
#pragma once

#include <diffuse/cuda/unet.hpp>
#include <diffuse/schedule.hpp>

#include "kernels/elementwise.cuh"
#include "kernels/sampler.cuh"

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace diffuse::cuda {

struct DeviceSampleOptions {
  bool fixed_small = false;  // variance: posterior (small) or beta (large, the CPU default)
  bool clip_x0 = false;
  double clip = 1.0;
  double guidance = 0.0;     // w of classifier-free guidance (class-conditional models)
};

// n images; labels: one per image for a class-conditional model (0 .. num_classes - 1; the null
// class num_classes is used for the unconditional half), empty otherwise.
inline Tensor<float> ddpm_sample(UNetDevice& net, const NoiseSchedule& s, std::int64_t n,
                                 const std::vector<std::int32_t>& labels, Generator& g,
                                 const DeviceSampleOptions& o = {}) {
  const UNetConfig& c = net.config();
  const bool conditional = c.num_classes > 0;
  if (conditional != !labels.empty() || (conditional && static_cast<std::int64_t>(labels.size()) != n))
    throw std::invalid_argument("diffuse::cuda::ddpm_sample: " + std::to_string(labels.size()) + " labels for " +
                                std::to_string(n) + " images of a model with " + std::to_string(c.num_classes) +
                                " classes");
  const Shape shape{n, c.resolution, c.resolution, c.in_ch};
  Tensor<float> x = Tensor<float>::randn(shape, g).cuda();
  const bool guided = conditional && o.guidance != 0.0;
  const std::int64_t B = guided ? 2 * n : n, m = x.numel();
  std::vector<std::int32_t> y2(labels);
  if (guided) y2.insert(y2.end(), static_cast<std::size_t>(n), static_cast<std::int32_t>(c.num_classes));
  const Tensor<std::int32_t> yd =
      conditional ? Tensor<std::int32_t>::from(y2, {B}).cuda() : Tensor<std::int32_t>();
  Shape s2 = shape;
  s2[0] = B;
  Tensor<float> xin = guided ? Tensor<float>(s2, Device::CUDA) : x;  // unguided: x itself
  Graph graph(&net.params());
  for (int t = s.T() - 1; t >= 0; --t) {
    const Tensor<std::int32_t> td = Tensor<std::int32_t>::full({B}, t).cuda();
    if (guided) {  // [x; x]
      kernels::scale(x.data(), 1.0f, xin.data(), m);
      kernels::scale(x.data(), 1.0f, xin.data() + m, m);
    }
    const Act eps = net.forward(graph, xin, td.data(), conditional ? yd.data() : nullptr, B, nullptr);
    graph.clear();
    const kernels::DdpmStepParams p = kernels::ddpm_step_params(s, t, o.fixed_small, o.clip_x0, o.clip);
    const std::uint64_t off = p.noise ? g.advance(static_cast<std::uint64_t>(m)) : 0;  // as the CPU's randn
    kernels::ddpm_step(p, x.data(), eps->value.data(), guided ? eps->value.data() + m : nullptr, o.guidance, m, g.seed,
                       off);
  }
  return x.cpu();
}

}  // namespace diffuse::cuda
