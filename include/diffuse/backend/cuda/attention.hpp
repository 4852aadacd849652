// Multi-head scaled dot-product attention on the device: the same function as diffuse::attention
// (include/diffuse/ops/attention.hpp), forward and backward, on device pointers.
//
// q, k, v, out: [N, L, C] row-major (L tokens of C channels per image). The channels split into
// `heads` contiguous slices of d = C / heads; head h of image n reads columns [h*d, (h+1)*d) of
// each token row in place, through the GEMMs' leading dimension C. For each (n, h):
//   S = Q K^T * d^-0.5;  P = softmax(S) over keys (rows of P);  out = P V
// P [N, heads, L, L] is written by the forward and read by the backward (keep it in between).
// Backward from G = d(loss)/d(out):
//   dV = P^T G;   dP = G V^T;   dS = P * (dP - rowsum(dP * P));   dQ = scale dS K;   dK = scale dS^T Q
// dP and dS live in the caller's workspace (attention_workspace_bytes); P is left unchanged.
//
// Work: every product is one gemm_strided_batched per group of (image, head) pairs with a
// single stride: when N >= heads, one call per head batched over the N images (stride L*C);
// otherwise one call per image batched over its heads (stride d). (A single call over all
// N*heads pairs would need two-level strides, which cuBLAS's strided API does not have.)
// The softmax kernels (kernels/softmax.cuh) run once over all N*heads*L rows.
//
// Stream: everything is queued on `stream`; the Blas is switched to it for the call and back to
// its previous stream afterwards. The emulation runs everything synchronously.
#pragma once

#include <diffuse/backend/cuda/blas.hpp>
#include <diffuse/backend/cuda/launch.hpp>

#include "kernels/softmax.cuh"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace diffuse::cuda {

// Which gradients attention_backward adds to (+=) instead of writing (=): an input whose
// gradient already holds another consumer's contribution.
struct AttentionAccumulate {
  bool dq = false, dk = false, dv = false;
};

namespace detail {

struct AttentionShape {
  std::int64_t N, L, C, heads, d;
  float scale;  // d^-0.5 rounded to float, as the CPU op's static_cast<T>(1.0 / sqrt(double(d)))
};

inline AttentionShape attention_shape(const char* who, std::int64_t N, std::int64_t L, std::int64_t C,
                                      std::int64_t heads) {
  const std::string w = std::string("diffuse::cuda::") + who + ": ";
  if (N < 0 || L < 0 || C < 0)
    throw std::invalid_argument(w + "negative size (N = " + std::to_string(N) + ", L = " + std::to_string(L) +
                                ", C = " + std::to_string(C) + ")");
  if (heads < 1 || C % heads != 0)
    throw std::invalid_argument(w + "the channel count C = " + std::to_string(C) + " must be a multiple of heads = " +
                                std::to_string(heads) + " (heads >= 1)");
  const std::int64_t d = C / heads;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(std::max<std::int64_t>(d, 1))));
  return {N, L, C, heads, d, scale};
}

// Calls f(x_offset, x_stride, p_offset, p_stride, batch) for each group of (image, head) pairs
// that one strided-batched GEMM covers: x_* locate head h of image n in a [N, L, C] tensor
// (element (token 0, channel h*d)), p_* its [L, L] block of a [N, heads, L, L] tensor.
template <class F>
inline void for_attention_groups(const AttentionShape& s, F&& f) {
  const std::int64_t LC = s.L * s.C, LL = s.L * s.L;
  if (s.N >= s.heads) {
    for (std::int64_t h = 0; h < s.heads; ++h) f(h * s.d, LC, h * LL, s.heads * LL, s.N);
  } else {
    for (std::int64_t n = 0; n < s.N; ++n) f(n * LC, s.d, n * s.heads * LL, LL, s.heads);
  }
}

// Puts blas on `stream` for its lifetime, then back on the stream it had.
class BlasStreamScope {
 public:
  BlasStreamScope(Blas& blas, stream_t stream) : blas_(blas), old_(blas.stream()) { blas_.set_stream(stream); }
  BlasStreamScope(const BlasStreamScope&) = delete;
  BlasStreamScope& operator=(const BlasStreamScope&) = delete;
  ~BlasStreamScope() {
    try {
      blas_.set_stream(old_);
    } catch (...) {  // a destructor cannot throw; the handle stays on the call's stream
    }
  }

 private:
  Blas& blas_;
  stream_t old_;
};

}  // namespace detail

// Number of floats of P: N * heads * L * L.
inline std::size_t attention_probs_elements(std::int64_t N, std::int64_t L, std::int64_t heads) {
  if (N < 0 || L < 0 || heads < 0) throw std::invalid_argument("diffuse::cuda::attention_probs_elements: negative size");
  return static_cast<std::size_t>(N) * static_cast<std::size_t>(heads) * static_cast<std::size_t>(L) *
         static_cast<std::size_t>(L);
}

// Workspace of attention_backward: dP (then dS), one float per element of P. Needed only when
// dq or dk is asked for (dv alone needs none).
inline std::size_t attention_workspace_bytes(std::int64_t N, std::int64_t L, std::int64_t heads) {
  return attention_probs_elements(N, L, heads) * sizeof(float);
}

// out = attention(q, k, v) per image and head (see the top of this file), and P [N, heads, L, L]
// the probabilities kept for the backward. All device pointers; out and P must not overlap the
// inputs or each other.
inline void attention_forward(Blas& blas, const float* q, const float* k, const float* v, float* out, float* P,
                              std::int64_t N, std::int64_t L, std::int64_t C, std::int64_t heads,
                              stream_t stream = {}) {
  const detail::AttentionShape s = detail::attention_shape("attention_forward", N, L, C, heads);
  if (N == 0 || L == 0) return;
  if (!P || (C > 0 && (!q || !k || !v || !out)))
    throw std::invalid_argument("diffuse::cuda::attention_forward: a null pointer among q, k, v, out, P");
  detail::BlasStreamScope on_stream(blas, stream);
  // S = scale Q K^T into P. C == 0 (d == 0): a product over nothing, S = 0 and a uniform P, as
  // on the CPU (the leading dimension is then raised to 1, the least a GEMM accepts).
  const std::int64_t ldx = std::max<std::int64_t>(C, 1);
  detail::for_attention_groups(s, [&](std::int64_t xo, std::int64_t xs, std::int64_t po, std::int64_t ps,
                                      std::int64_t batch) {
    gemm_strided_batched(blas, false, true, L, L, s.d, s.scale, q + xo, ldx, k + xo, ldx, 0.0f, P + po, L, batch, xs,
                         xs, ps);
  });
  kernels::softmax_forward(P, N * heads * L, L, stream);
  if (C == 0) return;
  detail::for_attention_groups(s, [&](std::int64_t xo, std::int64_t xs, std::int64_t po, std::int64_t ps,
                                      std::int64_t batch) {
    gemm_strided_batched(blas, false, false, L, s.d, L, 1.0f, P + po, L, v + xo, C, 0.0f, out + xo, C, batch, ps, xs,
                         xs);
  });
}

// Gradients of attention_forward from g = d(loss)/d(out) [N, L, C] and the forward's P: dq, dk,
// dv (each [N, L, C]; a null one is skipped) are written, or added to where `accumulate` says.
// `workspace`: attention_workspace_bytes(N, L, heads) bytes of device memory (may be null when
// dq and dk are both null). The gradients must not overlap each other, the inputs, P or the
// workspace.
inline void attention_backward(Blas& blas, const float* q, const float* k, const float* v, const float* P,
                               const float* g, float* dq, float* dk, float* dv, void* workspace, std::int64_t N,
                               std::int64_t L, std::int64_t C, std::int64_t heads, stream_t stream = {},
                               AttentionAccumulate accumulate = {}) {
  const detail::AttentionShape s = detail::attention_shape("attention_backward", N, L, C, heads);
  if (N == 0 || L == 0 || C == 0) return;  // no gradient has an element
  const bool need_ds = dq || dk;
  if (!P || !g || (dv && !v) || (need_ds && (!q || !k || !v)))
    throw std::invalid_argument("diffuse::cuda::attention_backward: a null pointer among q, k, v, P, g");
  if (need_ds && !workspace)
    throw std::invalid_argument("diffuse::cuda::attention_backward: dq or dk needs a workspace of "
                                "attention_workspace_bytes(N, L, heads) bytes");
  detail::BlasStreamScope on_stream(blas, stream);
  const std::int64_t d = s.d;
  if (dv) {  // dV = P^T G
    const float beta = accumulate.dv ? 1.0f : 0.0f;
    detail::for_attention_groups(s, [&](std::int64_t xo, std::int64_t xs, std::int64_t po, std::int64_t ps,
                                        std::int64_t batch) {
      gemm_strided_batched(blas, true, false, L, d, L, 1.0f, P + po, L, g + xo, C, beta, dv + xo, C, batch, ps, xs, xs);
    });
  }
  if (!need_ds) return;
  float* ds = static_cast<float*>(workspace);
  // dP = G V^T, then dS = P * (dP - rowsum(dP * P)) over it in place.
  detail::for_attention_groups(s, [&](std::int64_t xo, std::int64_t xs, std::int64_t po, std::int64_t ps,
                                      std::int64_t batch) {
    gemm_strided_batched(blas, false, true, L, L, d, 1.0f, g + xo, C, v + xo, C, 0.0f, ds + po, L, batch, xs, xs, ps);
  });
  kernels::softmax_backward(P, ds, N * heads * L, L, stream);
  if (dq) {  // dQ = scale dS K
    const float beta = accumulate.dq ? 1.0f : 0.0f;
    detail::for_attention_groups(s, [&](std::int64_t xo, std::int64_t xs, std::int64_t po, std::int64_t ps,
                                        std::int64_t batch) {
      gemm_strided_batched(blas, false, false, L, d, L, s.scale, ds + po, L, k + xo, C, beta, dq + xo, C, batch, ps,
                           xs, xs);
    });
  }
  if (dk) {  // dK = scale dS^T Q
    const float beta = accumulate.dk ? 1.0f : 0.0f;
    detail::for_attention_groups(s, [&](std::int64_t xo, std::int64_t xs, std::int64_t po, std::int64_t ps,
                                        std::int64_t batch) {
      gemm_strided_batched(blas, true, false, L, d, L, s.scale, ds + po, L, q + xo, C, beta, dk + xo, C, batch, ps,
                           xs, xs);
    });
  }
}

}  // namespace diffuse::cuda
