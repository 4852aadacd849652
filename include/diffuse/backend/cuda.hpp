// The CUDA backend as the ops see it: one virtual call per kernel, on raw device pointers.
//
// Every op of the library (ops/*.hpp) checks its shapes once, then runs on the device
// of its operands: the CPU code beside it, or these entries. The autograd, the modules and the
// models are ordinary host code; only the bodies of these entries are device code, compiled once
// by nvcc in src/cuda_backend.cu (what the diffuse::cuda target brings) or, for tests without a
// GPU, by the host compiler through the CPU emulation of the CUDA execution model
// (src/cuda_emulation.cpp, the diffuse::cuda_emulation target; see EmulatedCuda below).
//
// Conventions of every entry:
//  - pointers are device pointers to float, row-major, of the sizes the arguments give;
//  - `acc` (accumulate): the output is added to (+=) rather than written; a null output pointer
//    (a gradient nobody needs) is skipped;
//  - everything is queued in order on one stream; nothing waits for the device unless it says
//    so (synchronize, the entries that return a host value);
//  - sizes may be zero (nothing to do); shapes have been checked by the op.
// This header needs no CUDA headers: host code of any compiler includes it.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/backend/capture_state.hpp>
#include <diffuse/backend/cuda/bf16.hpp>
#include <diffuse/backend/op_types.hpp>
#include <diffuse/optim/step_record.hpp>

namespace diffuse {

namespace backend {

// One parameter tensor for the optimiser entries: value, gradient, Adam moments, EMA copy (null:
// none), n elements. All on the device.
struct ParamSlot {
  float* w = nullptr;
  const float* g = nullptr;
  float* m = nullptr;
  float* v = nullptr;
  float* ema = nullptr;
  std::int64_t n = 0;
  bool operator==(const ParamSlot&) const = default;
};

// The scalars of one Adam(W) step, rounded to float as the CPU's Adam rounds them (optim/adam.hpp, clip_grad_norm.hpp).
// guard: a StepRecord on the device (optim/step_record.hpp); the step is skipped there once it saw
// a non-finite step (null: never).
struct AdamArgs {
  float step_size, bc2_sqrt, b1, b2, eps, lr, wd, ema_decay;
  bool decoupled;
  const StepRecord* guard = nullptr;
};

// One reverse sampler step (diffusion/samplers.hpp): DDPM without clipping x = (x - a eps) / b + sigma z;
// DDPM with clipping x0 = clamp(ra x - rb eps), x = c1 x0 + c2 x + sigma z; DDIM
// x0 = ra x - rb eps (clamped), x = cx0 x0 + ceps eps + sigma z. z: normals at (seed, off).
struct SamplerStep {
  bool ddim = false, clip_x0 = false, noise = false;
  float a = 0, b = 1, ra = 0, rb = 0, c1 = 0, c2 = 0, cx0 = 0, ceps = 0, lim = 1, sigma = 0;
};

// A float array on the device, for the collectives.
struct DeviceArray {
  float* p = nullptr;
  std::int64_t n = 0;
};

// Collectives among the processes of a data-parallel run on device arrays (NCCL), queued on a
// stream of their own behind everything queued so far on the backend's stream, so that the work
// queued after them overlaps them; wait() makes the backend's stream wait for all of them.
class CudaCollectives {
 public:
  virtual ~CudaCollectives() = default;
  // Each array becomes the average over the ranks of that array, in place.
  virtual void all_reduce_mean(const std::vector<DeviceArray>& arrays) = 0;
  // Each array takes rank root's values.
  virtual void broadcast(const std::vector<DeviceArray>& arrays, int root) = 0;
  virtual void wait() = 0;
};

// Device work captured by CudaBackend::capture_begin / capture_end, launched as one unit (a CUDA
// graph; in the emulation, the queued work run in order). backend/cuda_graph.hpp is the public side.
class CapturedGraph {
 public:
  virtual ~CapturedGraph() = default;
  virtual void launch() = 0;  // queued on the backend's stream, after the work queued before it
};

class CudaBackend {
 public:
  virtual ~CudaBackend() = default;

  // ------------------------------------------------------------------ the device
  virtual std::string name() const = 0;                // "NVIDIA H100 80GB HBM3 (sm_90)", "CPU emulation"
  virtual std::string unavailable_reason() const = 0;  // "" when the device can be used
  virtual void synchronize() = 0;                      // waits for all queued work; reports its errors
  virtual void set_math_mode(MathMode m) = 0;
  virtual MathMode math_mode() const = 0;
  virtual void set_attention_kernel(AttentionKernel k) = 0;
  virtual AttentionKernel attention_kernel() const = 0;
  // cuDNN's algorithm choice: heuristics or timing the candidates once per shape (benchmark),
  // and whether FFT / Winograd (other rounding than a plain sum of products) may be used.
  virtual void set_conv_search(bool benchmark, bool allow_fft_winograd) = 0;
  // Times every entry with device events while on (no synchronisation); profile_table() waits for
  // the device and returns the time per entry kind divided by `steps`, then starts afresh.
  virtual void set_profiling(bool on) = 0;
  virtual std::string profile_table(std::int64_t steps) = 0;
  // CUDA graphs (use CudaGraphCapture, backend/cuda_graph.hpp): from capture_begin() on, this
  // thread's device work is recorded, not run, until capture_end() returns it as a graph;
  // capture_abort() ends a capture that failed (no graph). One capture at a time; not while
  // profiling.
  virtual void capture_begin() = 0;
  virtual std::unique_ptr<CapturedGraph> capture_end() = 0;
  virtual void capture_abort() noexcept = 0;
  // The devices this process can see, and the one it uses (chosen before any other use; 0 unless set).
  virtual int device_count() = 0;
  virtual void set_device(int device) = 0;

  // ------------------------------------------------------------------ NCCL (data parallelism)
  // "" when this program can run NCCL's collectives, else why not (built without NCCL, the emulation).
  virtual std::string nccl_unavailable_reason() const = 0;
  // A fresh NCCL unique id, as bytes: rank 0 makes it, the other ranks receive it from rank 0.
  virtual std::vector<unsigned char> nccl_unique_id() = 0;
  // This process's member of the NCCL communicator of `size` ranks named by id (every rank calls it).
  virtual std::unique_ptr<CudaCollectives> nccl_init(const std::vector<unsigned char>& id, int rank, int size) = 0;

  // ------------------------------------------------------------------ pointwise
  virtual void fill(float* y, std::int64_t n, float v) = 0;
  virtual void copy(const float* x, float* y, std::int64_t n, bool acc) = 0;             // y (+)= x
  virtual void scale(const float* x, float s, float* y, std::int64_t n, bool acc) = 0;   // y (+)= s x
  virtual void axpby(float a, const float* x, float b, float* y, std::int64_t n) = 0;    // y = a x + b y
  virtual void fill_scalar(const float* s, float alpha, float* y, std::int64_t n, bool acc) = 0;  // y (+)= alpha *s
  // y = a op b with broadcasting (d.sa, d.sb the operands' strides).
  virtual void binary(BinaryOp op, const float* a, const float* b, float* y, const BroadcastDesc& d) = 0;
  // The gradient of one operand of y = a op b from g = dL/dy: for the first operand (first =
  // true; else the second), dx[j] (+)= sum over the elements i of y that read x[j] of
  // g[i] * (Mul: the other operand at i; Add: 1; Sub: 1 for a, -1 for b). `other` is the other
  // operand (read for Mul only); dx has the operand's own elements.
  virtual void binary_backward(BinaryOp op, bool first, const float* g, const float* other, float* dx,
                               const BroadcastDesc& d, bool acc) = 0;
  // y = f(x) for f = SiLU, ReLU, GELU (erf form), or the identity (None).
  virtual void activation(Activation f, const float* x, float* y, std::int64_t n) = 0;
  // dx (+)= g * f'(x), from the saved input x.
  virtual void activation_backward(Activation f, const float* x, const float* g, float* dx, std::int64_t n,
                                   bool acc) = 0;

  // ------------------------------------------------------------------ reductions and losses
  virtual void sum(const float* x, std::int64_t n, float* out) = 0;  // *out = sum of x (one device float)
  virtual void mse(const float* a, const float* b, std::int64_t n, float* out) = 0;  // *out = mean((a - b)^2)
  // da (+)= sign * 2 (a - b) * *g / n, g the loss's upstream gradient (one device float).
  virtual void mse_backward(const float* a, const float* b, std::int64_t n, const float* g, float sign, float* da,
                            bool acc) = 0;
  // y = log_softmax(x) over rows of K; backward dx (+)= g - exp(y) * rowsum(g).
  virtual void log_softmax(const float* x, float* y, std::int64_t rows, std::int64_t K) = 0;
  virtual void log_softmax_backward(const float* y, const float* g, float* dx, std::int64_t rows, std::int64_t K,
                                    bool acc) = 0;
  // *loss = mean over rows of logsumexp(z) - z[label]; lse [rows] kept for the backward.
  virtual void cross_entropy(const float* logits, const std::int32_t* labels, std::int64_t rows, std::int64_t K,
                             float* loss, float* lse) = 0;
  // dlogits (+)= *g (softmax(z) - onehot(label)) / rows.
  virtual void cross_entropy_backward(const float* logits, const std::int32_t* labels, const float* lse,
                                      const float* g, float* dlogits, std::int64_t rows, std::int64_t K, bool acc) = 0;

  // ------------------------------------------------------------------ matrix products
  // C[m, n] = alpha op(A) op(B) + beta C, row-major with leading dimensions (gemm.hpp's contract);
  // beta == 0: C is not read.
  virtual void gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* A,
                    std::int64_t lda, const float* B, std::int64_t ldb, float beta, float* C, std::int64_t ldc) = 0;
  // `batch` such products, the i-th at A + i sa, B + i sb, C + i sc.
  virtual void gemm_batched(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                            const float* A, std::int64_t lda, std::int64_t sa, const float* B, std::int64_t ldb,
                            std::int64_t sb, float beta, float* C, std::int64_t ldc, std::int64_t sc,
                            std::int64_t batch) = 0;
  virtual void add_row_bias(float* y, const float* b, std::int64_t rows, std::int64_t C) = 0;  // y[r, :] += b
  virtual void row_bias_backward(const float* g, float* db, std::int64_t rows, std::int64_t C, bool acc) = 0;
  // The epilogue of linear_act after z = x W^T [rows, C]: z += b (+ table[idx[r]] when table is
  // given) in place, then y = f(z) (z stays for the backward; y is z itself for None).
  virtual void bias_activation(float* z, const float* b, const float* table, const std::int32_t* idx, float* y,
                               std::int64_t rows, std::int64_t C, Activation f) = 0;

  // ------------------------------------------------------------------ layout
  // y[i, :] (+)= table[idx[i], :] for N rows of D; indices checked by the op.
  virtual void gather_rows(const float* table, const std::int32_t* idx, float* y, std::int64_t N, std::int64_t D,
                           bool acc) = 0;
  // dtable[idx[i], :] += g[i, :] (duplicates add up); acc = false: dtable is first set to 0.
  virtual void scatter_rows(const std::int32_t* idx, const float* g, float* dtable, std::int64_t N, std::int64_t R,
                            std::int64_t D, bool acc) = 0;
  // dst[r * dst_ld + j] (+)= src[r * src_ld + j] for r < rows, j < width (concat, slice).
  virtual void copy_2d(const float* src, std::int64_t src_ld, float* dst, std::int64_t dst_ld, std::int64_t rows,
                       std::int64_t width, bool acc) = 0;
  // dst[r * dst_ld + j] = bf16(src[r * src_ld + j]) (one operand of a concatenation written into its
  // columns of a bf16 matrix: res_block's input on the up path under BF16).
  virtual void convert_2d(const float* src, std::int64_t src_ld, bf16* dst, std::int64_t dst_ld, std::int64_t rows,
                          std::int64_t width) = 0;
  // y (+)= x.permute(perm): x has `ndim` dims of sizes x_shape; y's dim i is x's dim perm[i].
  virtual void permute(const float* x, float* y, int ndim, const std::int64_t* x_shape, const int* perm, bool acc) = 0;

  // ------------------------------------------------------------------ image ops, NHWC
  // y = conv(x, w) + b [+ cb [N, O] per sample and channel] [+ res, y's shape]: the bias and what
  // follows the convolution in a ResBlock added in one pass over y, in that order (b, cb, res may
  // be null).
  // Under MathMode::BF16 the convolution reads x and w rounded to bf16; keep_x / keep_w (x's and
  // w's element counts; null: not kept) receive those copies for the backward, which is then
  // given them as xb / wb instead of rounding x and w again (PyTorch's autocast saves its casts
  // alike). Other modes ignore all four. x null: keep_x already holds x, in bf16 only (an
  // activation written in bf16 by its producer, group_norm_conv2d); BF16 only, as is a null x in
  // the backward with xb given. y16 (then y is null; BF16 only): the output in bf16, each value
  // the float y would hold rounded once (for a consumer that reads bf16, attention_block).
  virtual void conv2d(const ConvDesc& d, const float* x, const float* w, const float* b, const float* cb,
                      const float* res, float* y, bf16* keep_x = nullptr, bf16* keep_w = nullptr,
                      bf16* y16 = nullptr) = 0;
  // dx16 (then dx is null): x's gradient written in bf16 as the bf16 convolution computes it (not
  // widened to float; for a producer that reads bf16 gradients, group_norm_conv2d); BF16 only.
  // dy16 (then dy is null; BF16 only): the output's gradient given in bf16, as the bf16
  // convolution reads it anyway (db is then the float sum of its widened values).
  virtual void conv2d_backward(const ConvDesc& d, const float* x, const float* w, const float* dy, float* dx,
                               bool acc_dx, float* dw, bool acc_dw, float* db, bool acc_db, const bf16* xb = nullptr,
                               const bf16* wb = nullptr, bf16* dx16 = nullptr, const bf16* dy16 = nullptr) = 0;
  // y = group_norm(x) (SiLU'd when silu); mean, rstd [N * G] kept for the backward.
  // keep (null: none): dropout after it, fused (group_norm_dropout): element i of y kept when bit i
  // of keep is set (dropout_bits) and then times keep_scale; the backward masks dy alike.
  // y16 (then y is null): the output written in bf16 instead, each value rounded once from the
  // float that y would hold (group_norm_conv2d under BF16). x16 (then x is null; y16 given): x in
  // bf16 (a convolution's output written in bf16, res_block), widened exactly.
  virtual void group_norm(const float* x, const float* gamma, const float* beta, float* y, float* mean, float* rstd,
                          std::int64_t N, std::int64_t HW, std::int64_t C, std::int64_t G, float eps, bool silu,
                          const std::uint32_t* keep = nullptr, float keep_scale = 1.0f, bf16* y16 = nullptr,
                          const bf16* x16 = nullptr) = 0;
  // dy16 (then dy is null): the gradient given in bf16 (conv2d_backward's dx16), widened exactly.
  // x16 (then x is null, dy16 given): the forward's x16; x's gradient then in float (dx, written or
  // added to) or in bf16 (dx16, then dx is null; written, not accumulated), each value computed in
  // float and rounded once.
  virtual void group_norm_backward(const float* dy, const float* x, const float* gamma, const float* beta,
                                   const float* mean, const float* rstd, float* dx, bool acc_dx, float* dgamma,
                                   bool acc_gamma, float* dbeta, bool acc_beta, std::int64_t N, std::int64_t HW,
                                   std::int64_t C, std::int64_t G, bool silu, const std::uint32_t* keep = nullptr,
                                   float keep_scale = 1.0f, const bf16* dy16 = nullptr, const bf16* x16 = nullptr,
                                   bf16* dx16 = nullptr) = 0;
  // y = layer_norm over the last dimension C of `rows` rows (gamma, beta [C] may be null: no
  // affine); mean, rstd [rows] kept.
  virtual void layer_norm(const float* x, const float* gamma, const float* beta, float* y, float* mean, float* rstd,
                          std::int64_t rows, std::int64_t C, float eps) = 0;
  virtual void layer_norm_backward(const float* dy, const float* x, const float* gamma, const float* mean,
                                   const float* rstd, float* dx, bool acc_dx, float* dgamma, bool acc_gamma,
                                   float* dbeta, bool acc_beta, std::int64_t rows, std::int64_t C) = 0;
  virtual void upsample_nearest2x(const float* x, float* y, std::int64_t N, std::int64_t H, std::int64_t W,
                                  std::int64_t C) = 0;
  virtual void upsample_nearest2x_backward(const float* g, float* dx, std::int64_t N, std::int64_t H, std::int64_t W,
                                           std::int64_t C, bool acc) = 0;
  // The CPU's dropout mask: uniform draw i of (seed, at) below 1 - p keeps element i (scaled); i
  // counted from at.first (0 but in a data-parallel rank's share of a draw, core/rng.hpp's DrawPos;
  // at.base: a captured graph's device word, backend/capture_state.hpp's device_draw).
  virtual void dropout(const float* x, float* y, std::int64_t n, double p, std::uint64_t seed, DrawPos at) = 0;
  virtual void dropout_backward(const float* g, float* dx, std::int64_t n, double p, std::uint64_t seed, DrawPos at,
                                bool acc) = 0;
  // The same keep mask as bits: bits[(n + 31) / 32], bit i % 32 of word i / 32 set when element i is kept.
  virtual void dropout_bits(std::uint32_t* bits, std::int64_t n, double p, std::uint64_t seed, DrawPos at) = 0;
  // y = x + b[n, :] over the HW pixels of image n; backward db (+)= sum over pixels.
  virtual void add_channel_bias(const float* x, const float* b, float* y, std::int64_t N, std::int64_t HW,
                                std::int64_t C) = 0;
  // g16 (then g is null): the gradient given in bf16; db the float sums of its widened values.
  virtual void channel_bias_backward(const float* g, float* db, std::int64_t N, std::int64_t HW, std::int64_t C,
                                     bool acc, const bf16* g16 = nullptr) = 0;
  // Multi-head attention on [N, L, C] (ops/attention.hpp); P [N, heads, L, L] kept.
  virtual void attention(const float* q, const float* k, const float* v, float* out, float* P, std::int64_t N,
                         std::int64_t L, std::int64_t C, std::int64_t heads) = 0;
  virtual void attention_backward(const float* q, const float* k, const float* v, const float* P, const float* g,
                                  float* dq, bool acc_q, float* dk, bool acc_k, float* dv, bool acc_v, std::int64_t N,
                                  std::int64_t L, std::int64_t C, std::int64_t heads) = 0;
  // The same function by the fused kernels: lse [N, heads, L] (each query row's log-sum-exp of
  // its scaled scores) kept instead of P; the backward reads the forward's out as well. d <= 256.
  virtual void flash_attention(const float* q, const float* k, const float* v, float* out, float* lse,
                               std::int64_t N, std::int64_t L, std::int64_t C, std::int64_t heads) = 0;
  virtual void flash_attention_backward(const float* q, const float* k, const float* v, const float* out,
                                        const float* lse, const float* g, float* dq, bool acc_q, float* dk,
                                        bool acc_k, float* dv, bool acc_v, std::int64_t N, std::int64_t L,
                                        std::int64_t C, std::int64_t heads) = 0;
  // The fused kernels in bf16 (MathMode::BF16, attention_block): q, k and v packed in one bf16
  // [N, L, 3C] tensor (each token's row: q's C channels, then k's, then v's, as one 1x1
  // convolution of 3C outputs writes them); out and g [N, L, C] bf16; dqkv the three gradients
  // packed alike, written. Float arithmetic, lse and delta. out32 (null: none): the output in
  // float too, which the backward reads instead of the bf16 out (kernels/flash_attention.cuh: its
  // delta then agrees with the probabilities, as in the float kernels).
  virtual void flash_attention_bf16(const bf16* qkv, bf16* out, float* out32, float* lse, std::int64_t N,
                                    std::int64_t L, std::int64_t C, std::int64_t heads) = 0;
  virtual void flash_attention_backward_bf16(const bf16* qkv, const float* out32, const float* lse, const bf16* g,
                                             bf16* dqkv, std::int64_t N, std::int64_t L, std::int64_t C,
                                             std::int64_t heads) = 0;
  // Max pool: argmax [N, OH, OW, C] = the input pixel (h W + w) of each output's first maximum
  // (may be null when no backward follows).
  virtual void max_pool2d(const PoolDesc& d, const float* x, float* y, std::int32_t* argmax) = 0;
  virtual void max_pool2d_backward(const PoolDesc& d, const std::int32_t* argmax, const float* g, float* dx,
                                   bool acc) = 0;
  virtual void avg_pool2d(const PoolDesc& d, const float* x, float* y) = 0;
  virtual void avg_pool2d_backward(const PoolDesc& d, const float* g, float* dx, bool acc) = 0;
  // y [N, C] = mean over the HW pixels; backward dx (+)= g[n, c] / HW.
  virtual void global_avg_pool(const float* x, float* y, std::int64_t N, std::int64_t HW, std::int64_t C) = 0;
  virtual void global_avg_pool_backward(const float* g, float* dx, std::int64_t N, std::int64_t HW, std::int64_t C,
                                        bool acc) = 0;
  // Inference batch norm over `rows` pixels of C channels (ops/batch_norm.hpp's rounding).
  virtual void batch_norm_inference(const float* x, const float* w, const float* b, const float* mean,
                                    const float* var, float eps, float* y, std::int64_t rows, std::int64_t C) = 0;
  virtual void batch_norm_inference_backward(const float* g, const float* x, const float* w, const float* mean,
                                             const float* var, float eps, float* dx, bool acc_dx, float* dw,
                                             bool acc_w, float* db, bool acc_b, std::int64_t rows, std::int64_t C) = 0;
  // out [n, dim] = the sinusoidal embedding of timesteps t [n] (nn/timestep_embedding.hpp).
  virtual void timestep_embedding(const std::int32_t* t, float* out, std::int64_t n, std::int64_t dim) = 0;

  // ------------------------------------------------------------------ random numbers, diffusion
  // The CPU Generator's Philox streams: elements first .. first + n - 1 of a draw at (seed, off)
  // (core/rng.hpp; first is 0 but in a data-parallel rank's share of a draw).
  virtual void normal(float* out, std::int64_t n, std::uint64_t seed, std::uint64_t off, std::uint64_t first) = 0;
  virtual void uniform(float* out, std::int64_t n, std::uint64_t seed, std::uint64_t off, std::uint64_t first) = 0;
  // xt = coef[t_b] x0 + coef[T + t_b] eps per sample b (row elements each); coef [2 T] holds
  // sqrt(abar) then sqrt(1 - abar) as floats.
  virtual void q_sample(const float* x0, const float* eps, const std::int32_t* t, const float* coef, std::int64_t T,
                        float* xt, std::int64_t batch, std::int64_t row) = 0;
  // x <- one sampler step in place (z drawn at (seed, off) when s.noise).
  virtual void sampler_step(const SamplerStep& s, float* x, const float* eps, std::int64_t n, std::uint64_t seed,
                            std::uint64_t off) = 0;

  // ------------------------------------------------------------------ optimisers
  // Adam(W) (+ EMA where a slot has one) over all slots in one launch.
  virtual void adam_step(const std::vector<ParamSlot>& slots, const AdamArgs& a) = 0;
  // ema = d ema + (1 - d) w over all slots (nothing once `guard` saw a non-finite step).
  virtual void ema_update(const std::vector<ParamSlot>& slots, float decay, const StepRecord* guard = nullptr) = 0;
  // The sum of g^2 over all slots, in double (waits for the device: the value comes back).
  virtual double grad_sq_norm(const std::vector<ParamSlot>& slots) = 0;
  virtual void grad_scale(const std::vector<ParamSlot>& slots, double c) = 0;  // g = float(double(g) c)
  // clip_grad_norm_recorded: the sum of g^2, step_record_add(*record, sum, *loss, max_norm, step)
  // and the gradients scaled by record->scale, all queued on the device (nothing comes back).
  virtual void grad_clip_recorded(const std::vector<ParamSlot>& slots, double max_norm, const float* loss,
                                  std::int64_t step, StepRecord* record) = 0;
};

namespace detail {
inline std::atomic<CudaBackend*>& cuda_backend_slot() {
  static std::atomic<CudaBackend*> slot{nullptr};
  return slot;
}
}  // namespace detail

// The registered backend, or nullptr: src/cuda_backend.cu registers the CUDA runtime's before
// main() when the program links diffuse::cuda; EmulatedCuda installs the emulation for its scope.
inline CudaBackend* cuda_backend() { return detail::cuda_backend_slot().load(); }
// Registers b (which must outlive its use) and returns the previous one.
inline CudaBackend* set_cuda_backend(CudaBackend* b) { return detail::cuda_backend_slot().exchange(b); }

}  // namespace backend

// "" when CUDA tensors and ops can be used in this program, else why not, in one line.
inline std::string cuda_unavailable_reason() {
  backend::CudaBackend* b = backend::cuda_backend();
  if (!b)
    return "this program has no CUDA backend (built without CUDA: link the diffuse::cuda target, which CMake "
           "defines when it finds nvcc)";
  return b->unavailable_reason();
}
inline bool cuda_available() { return cuda_unavailable_reason().empty(); }

namespace backend {
// The backend for an op on CUDA operands; throws std::runtime_error naming the op and the reason.
inline CudaBackend& require_cuda(const char* op) {
  CudaBackend* b = cuda_backend();
  const std::string why = cuda_unavailable_reason();
  if (!why.empty()) throw std::runtime_error(std::string("diffuse: ") + op + " on cuda: " + why);
  return *b;
}
}  // namespace backend

// TF32 tensor cores for the device's GEMMs and convolutions (off: strict FP32, the default),
// as torch.backends.cuda.matmul.allow_tf32.
inline void set_cuda_math_mode(MathMode m) { backend::require_cuda("set_cuda_math_mode").set_math_mode(m); }
// The kernels of attention on the device (AttentionKernel: Full, the default, or Flash).
inline void set_cuda_attention_kernel(AttentionKernel k) {
  backend::require_cuda("set_cuda_attention_kernel").set_attention_kernel(k);
}
// Waits for the device to finish all queued work (for timing; copies to the host wait anyway).
inline void cuda_synchronize() {
  if (backend::CudaBackend* b = backend::cuda_backend()) b->synchronize();
}

}  // namespace diffuse
