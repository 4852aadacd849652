// CPU references for the image kernel cases (kernel_cases_image.hpp), computed by the CPU
// backend: the ops of include/diffuse/ops/ (upsample, dropout, shape, ...) forward and, through the
// autograd, backward; the timestep embedding; the DDPM / DDIM samplers. Defined in
// kernel_reference_image.cpp (host compiler only: nvcc never parses Eigen or the autograd).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace diffuse::testing {

// Backward references take `prefill`: null, the input's gradient is written (first gradient to
// arrive); otherwise the input's gradient already holds *prefill and the op adds to it (the
// autograd's GradSink accumulate path).

// diffuse::upsample_nearest2x on x [N, H, W, C].
std::vector<float> cpu_upsample_nearest2x(const std::vector<float>& x, std::int64_t N, std::int64_t H, std::int64_t W,
                                          std::int64_t C);
// dx from the gradient dy [N, 2H, 2W, C] of upsample_nearest2x(x).
std::vector<float> cpu_upsample_nearest2x_backward(const std::vector<float>& x, const std::vector<float>& dy,
                                                   std::int64_t N, std::int64_t H, std::int64_t W, std::int64_t C,
                                                   const std::vector<float>* prefill);

// diffuse::concat({a, b}, 3) of a [N, H, W, Ca] and b [N, H, W, Cb].
std::vector<float> cpu_concat_channels(const std::vector<float>& a, const std::vector<float>& b, std::int64_t N,
                                       std::int64_t H, std::int64_t W, std::int64_t Ca, std::int64_t Cb);
// The gradients of a and b (empty when that input does not require grad) from dy.
struct ConcatGrads {
  std::vector<float> da, db;
};
ConcatGrads cpu_concat_channels_backward(const std::vector<float>& a, const std::vector<float>& b,
                                         const std::vector<float>& dy, std::int64_t N, std::int64_t H, std::int64_t W,
                                         std::int64_t Ca, std::int64_t Cb, bool need_a, bool need_b,
                                         const std::vector<float>* prefill_a, const std::vector<float>* prefill_b);

// diffuse::dropout(x, p, gen, training = true) with gen = Generator(seed, offset), x of n
// elements, then its backward from dy: the output, dx, and the generator's offsets.
struct DropoutRef {
  std::vector<float> y, dx;
  std::uint64_t draw_offset = 0;   // the offset the op drew its mask at
  std::uint64_t offset_after = 0;  // gen.offset after the op
};
DropoutRef cpu_dropout(const std::vector<float>& x, const std::vector<float>& dy, double p, std::uint64_t seed,
                       std::uint64_t offset, const std::vector<float>* prefill);

// diffuse::timestep_embedding<float>(t, dim): [t.size(), dim].
std::vector<float> cpu_timestep_embedding(const std::vector<std::int32_t>& t, std::int64_t dim);

// A NoiseSchedule's tables (the members ddpm_step_params / ddim_step_params read).
struct ScheduleTables {
  std::vector<double> beta, alpha, abar, sqrt_abar, sqrt_one_minus_abar, posterior_variance, posterior_coef1,
      posterior_coef2;
  int T() const { return static_cast<int>(beta.size()); }
};
ScheduleTables cpu_schedule(const std::string& name, int T);

// A whole run of the CPU sampler, diffuse::ddpm_sample or diffuse::ddim_sample on shape [B, row]
// from Generator(seed), with a stand-in model that returns fresh random eps at every call (from
// eps_seed; with guidance w != 0, through diffuse::guided_eps_model, random conditional and
// unconditional halves). The kernel test replays every step from the same states and eps.
// (ddim_sample has no separate step function: this runs the real sampler and observes each step.)
struct SamplerRun {
  std::vector<std::vector<float>> x;        // x[0] = x_T; x[k + 1] = the state after step k
  std::vector<std::vector<float>> eps_c;    // the model output at step k (the conditional half)
  std::vector<std::vector<float>> eps_u;    // the unconditional half at step k (w != 0 only)
  std::vector<int> t;                       // the model timestep of step k (descending)
  std::vector<std::uint64_t> offset;        // gen.offset when x[k] was observed
};
struct SamplerConfig {
  bool ddim = false;
  std::string schedule = "linear";
  int T = 20;
  int steps = 0;  // DDIM: number of steps (0 = T)
  std::int64_t batch = 1, row = 1;
  bool fixed_small = false, clip_x0 = false;
  double clip = 1.0, eta = 0.0, w = 0.0;
};
SamplerRun cpu_sample(const SamplerConfig& c, std::uint64_t seed, std::uint64_t eps_seed);

}  // namespace diffuse::testing
