// StepRecord: what a training step leaves on its device for the host to read when it needs it (a
// log line, a checkpoint, a step hook), so that a step on the GPU never waits for the device.
//
// clip_grad_norm_recorded (optim/clip_grad_norm.hpp) adds each step to it where the gradients
// are: the loss, the gradient norm, the clipping factor, their sums over the current log window,
// and the first step whose loss or norm was not finite. From that step on Adam and the EMA skip
// their updates (they read the record on the device), so the weights stay those of the last good
// step until the host looks and stops the run (train/trainer.hpp).
#pragma once

#include <cmath>
#include <cstdint>

#include <diffuse/core/config.hpp>

namespace diffuse {

// Doubles only, so that it lives in a Tensor<double> of kStepRecordSize elements on any device.
struct StepRecord {
  double loss = 0, norm = 0;                     // the last step's loss and gradient norm (before clipping)
  double scale = 1;                              // the factor the last step's gradients were multiplied by
  double loss_sum = 0, norm_sum = 0, steps = 0;  // over the finite steps since the window was reset
  double bad_step = 0;                           // the first step (1-based) with a non-finite loss or norm; 0: none
  double bad_loss = 0, bad_norm = 0;             // that step's loss and norm
};
inline constexpr std::int64_t kStepRecordSize = 9;
static_assert(sizeof(StepRecord) == kStepRecordSize * sizeof(double), "StepRecord is 9 doubles");

// Whether a double is finite, the same way on the host and the device (x - x is NaN for NaN and
// for infinities, 0 otherwise).
DIFFUSE_HD inline bool step_record_finite(double x) { return x - x == 0.0; }

// One step: sq = the sum of the squared gradients (in double), its loss, the clipping threshold
// (infinite: off), the step's number. torch.nn.utils.clip_grad_norm_'s factor max_norm / (norm +
// 1e-6), applied only when below 1, and never once a step was bad (the update is skipped anyway).
DIFFUSE_HD inline void step_record_add(StepRecord& r, double sq, double loss, double max_norm, double step) {
  const double norm = sqrt(sq);
  r.loss = loss;
  r.norm = norm;
  if (r.bad_step == 0 && !(step_record_finite(loss) && step_record_finite(norm))) {
    r.bad_step = step;
    r.bad_loss = loss;
    r.bad_norm = norm;
  }
  const double c = max_norm / (norm + 1e-6);
  r.scale = r.bad_step == 0 && c < 1.0 ? c : 1.0;
  if (r.bad_step == 0) {
    r.loss_sum += loss;
    r.norm_sum += norm;
    r.steps += 1;
  }
}

}  // namespace diffuse
