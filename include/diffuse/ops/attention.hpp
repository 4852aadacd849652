// Multi-head scaled dot-product attention: the core of the DDPM U-Net's
// AttnBlock (softmax(Q K^T / sqrt(d)) V), on NHWC token tensors.
//
// q, k, v: [N, L, C] (L = H*W tokens of an NHWC image, after the caller's 1x1
// q/k/v projections, which are plain `linear` on the [N*H*W, C] view). The C
// channels are split into `heads` contiguous slices of d = C / heads; head h of
// image n uses columns [h*d, (h+1)*d) of each token row, read in place through
// the GEMM's leading dimension (lda = C), so no head is ever copied out.
//
// Work is split over (image, head, block of rows) tasks, one parallel region per pass;
// every GEMM is detail::gemm (single-threaded) inside a task.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <diffuse/backend/cpu/gemm.hpp>
#include <diffuse/ops/common.hpp>

namespace diffuse {

namespace detail {

// Shapes and blocking shared by the forward and the backward.
struct AttentionDims {
  int64_t N, L, C, heads, d, pairs;  // pairs = N * heads
  int64_t rb, nb;                    // rows per block (queries or keys) and blocks per (image, head)
  int64_t tasks() const { return pairs * nb; }
};

// Rows per block: about 96 (a multiple of the GEMM's 6-row micro-tile), so a
// block of scores (rb x L) stays in L2 at L = 1024; more, smaller blocks when
// there are too few (image, head) pairs to keep every thread busy.
inline AttentionDims attention_dims(int64_t N, int64_t L, int64_t C, int64_t heads) {
  AttentionDims a{N, L, C, heads, C / heads, N * heads, 0, 0};
  if (L <= 0 || a.pairs <= 0) return a;
  const int threads = num_threads();
  int64_t nb = (L + 95) / 96;
  while (a.pairs * nb < 2 * threads && L / (nb + 1) >= 2 * kGemmMR) ++nb;
  const int64_t rb = std::min(L, ((L + nb - 1) / nb + kGemmMR - 1) / kGemmMR * kGemmMR);
  a.rb = rb;
  a.nb = (L + rb - 1) / rb;
  return a;
}

// Number of threads for `work` flops spread over `tasks` tasks.
inline int attention_threads(double work, int64_t tasks) {
  return loop_threads(tasks, work >= kParallelMinFlops);
}

// Row-wise softmax of rows x L values in place, subtracting each row's maximum
// (exp(x - max) <= 1: no overflow however peaked the logits). Eigen's exp is vectorised.
template <class T>
inline void softmax_rows(T* s, int64_t rows, int64_t L) {
  using Arr = Eigen::Array<T, Eigen::Dynamic, 1>;
  for (int64_t i = 0; i < rows; ++i) {
    Eigen::Map<Arr> r(s + i * L, L);
    const T mx = r.maxCoeff();
    r = (r - mx).exp();
    r *= T(1) / r.sum();
  }
}

// Forward. Task (n, h, block of query rows [r0, r1)):
//   S = scale * Q[r0:r1] K^T  (rb x L, into P's rows when P is kept, else into a per-thread scratch)
//   S = softmax(S) row by row;   out[r0:r1, head h] = S V.
template <class T>
inline void attention_forward(const AttentionDims& a, const T* q, const T* k, const T* v, T scale, T* out, T* P) {
  const int64_t L = a.L, C = a.C, d = a.d, heads = a.heads;
  const int nt = attention_threads(4.0 * static_cast<double>(a.pairs) * L * L * d, a.tasks());
  DynamicCounter next(a.tasks());
  parallel_region(nt, [&](int, int) {
    Tensor<T> scratch = P ? Tensor<T>() : Tensor<T>({a.rb, L});
    for (int64_t t; (t = next.next()) >= 0;) {
      const int64_t pair = t / a.nb, n = pair / heads, h = pair % heads;
      const int64_t r0 = (t % a.nb) * a.rb, rows = std::min(a.rb, L - r0);
      const int64_t base = n * L * C + h * d;  // element (token 0, channel h*d) of image n
      T* s = P ? P + (pair * L + r0) * L : scratch.data();
      gemm<T>(false, true, rows, L, d, scale, q + base + r0 * C, C, k + base, C, T(0), s, L);
      softmax_rows(s, rows, L);
      gemm<T>(false, false, rows, d, L, T(1), s, L, v + base, C, T(0), out + base + r0 * C, C);
    }
  });
}

// Backward from G = d(loss)/d(out), with P the forward's probabilities. Three
// phases, one parallel region each (phase 2 overwrites the P that phase 1 reads):
//   1. per block of key rows:   dV = P^T G
//   2. per block of query rows: dP = G V^T (per-thread scratch), then
//      dS = P * (dP - rowsum(dP * P)) written over P in place, and dQ = scale * dS K
//   3. per block of key rows:   dK = scale * dS^T Q
// Each task writes its own rows of one head's columns: no reduction between threads.
// A null sink skips its gradient. P is consumed (it holds dS afterwards).
template <class T>
inline void attention_backward(const AttentionDims& a, const T* q, const T* k, const T* v, T scale, const T* g,
                               T* P, const GradSink<T>* sq, const GradSink<T>* sk, const GradSink<T>* sv) {
  const int64_t L = a.L, C = a.C, d = a.d, heads = a.heads, nb = a.nb, rb = a.rb;
  const bool need_ds = sq || sk;
  const double per = 2.0 * static_cast<double>(a.pairs) * L * L * d;
  const double work = (sv ? per : 0.0) + (need_ds ? per + 4.0 * a.pairs * L * L : 0.0) + (sq ? per : 0.0) +
                      (sk ? per : 0.0);
  const int nt = attention_threads(work, a.tasks());
  // The block of task t: pair, image n, head h, first row r0, row count, offset of (token 0, channel h*d).
  auto where = [&](int64_t t, int64_t& pair, int64_t& r0, int64_t& rows, int64_t& base) {
    pair = t / nb;
    r0 = (t % nb) * rb;
    rows = std::min(rb, L - r0);
    base = (pair / heads) * L * C + (pair % heads) * d;
  };
  // Tasks in any order, each on whichever thread is free (blocks differ in cost at the edges).
  auto each_task = [&](auto&& body) {
    DynamicCounter next(a.tasks());
    parallel_region(nt, [&](int, int) { body(next); });
  };
  if (sv) {
    const T beta = sv->accumulate ? T(1) : T(0);
    each_task([&](DynamicCounter& next) {
      int64_t pair, r0, rows, base;
      for (int64_t t; (t = next.next()) >= 0;) {
        where(t, pair, r0, rows, base);
        gemm<T>(true, false, rows, d, L, T(1), P + pair * L * L + r0, L, g + base, C, beta, sv->data + base + r0 * C, C);
      }
    });
  }
  if (need_ds) {
    using Arr = Eigen::Array<T, Eigen::Dynamic, 1>;
    each_task([&](DynamicCounter& next) {
      int64_t pair, r0, rows, base;
      Tensor<T> scratch({rb, L});
      T* dp = scratch.data();
      for (int64_t t; (t = next.next()) >= 0;) {
        where(t, pair, r0, rows, base);
        T* s = P + (pair * L + r0) * L;
        gemm<T>(false, true, rows, L, d, T(1), g + base + r0 * C, C, v + base, C, T(0), dp, L);
        for (int64_t i = 0; i < rows; ++i) {
          Eigen::Map<Arr> p(s + i * L, L);
          Eigen::Map<const Arr> dpi(dp + i * L, L);
          const T r = (p * dpi).sum();
          p = p * (dpi - r);
        }
        if (sq)
          gemm<T>(false, false, rows, d, L, scale, s, L, k + base, C, sq->accumulate ? T(1) : T(0),
                  sq->data + base + r0 * C, C);
      }
    });
  }
  if (sk) {
    const T beta = sk->accumulate ? T(1) : T(0);
    each_task([&](DynamicCounter& next) {
      int64_t pair, r0, rows, base;
      for (int64_t t; (t = next.next()) >= 0;) {
        where(t, pair, r0, rows, base);
        gemm<T>(true, false, rows, d, L, scale, P + pair * L * L + r0, L, q + base, C, beta, sk->data + base + r0 * C,
                C);
      }
    });
  }
}

}  // namespace detail

namespace detail {
// The fused kernels' limits (kernels/flash_attention.cuh checks them again): beyond them the
// full-matrix path runs whatever the backend's choice.
inline bool flash_attention_fits(int64_t N, int64_t C, int64_t heads) {
  return C / heads <= backend::kFlashAttentionMaxHeadDim && N * heads <= 65535;
}

inline Var<float> attention_cuda(const Var<float>& q, const Var<float>& k, const Var<float>& v, int64_t heads) {
  backend::CudaBackend& be = backend::require_cuda("attention");
  const int64_t N = q.size(0), L = q.size(1), C = q.size(2);
  const bool grad = Tape<float>::grad_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  Tensor<float> out({N, L, C}, Device::CUDA);
  if (be.attention_kernel() == AttentionKernel::Flash && flash_attention_fits(N, C, heads)) {
    // Kept for a backward: one log-sum-exp per query row and the output itself (shared storage).
    Tensor<float> lse({N, heads, L}, Device::CUDA);
    be.flash_attention(q.value().data(), k.value().data(), v.value().data(), out.data(), lse.data(), N, L, C, heads);
    Tensor<float> o = out;
    return make_result<float>(std::move(out), {&q, &k, &v}, [&]() {
      return [q, k, v, o, lse, N, L, C, heads](const Tensor<float>& g) {
        GradSink<float> sv{}, sq{}, sk{};  // the order of the full path's sinks (dV, dQ, dK)
        if (v.requires_grad()) sv = grad_sink(*v.node());
        if (q.requires_grad()) sq = grad_sink(*q.node());
        if (k.requires_grad()) sk = grad_sink(*k.node());
        backend::cuda_backend()->flash_attention_backward(q.value().data(), k.value().data(), v.value().data(),
                                                          o.data(), lse.data(), g.data(), sq.data, sq.accumulate,
                                                          sk.data, sk.accumulate, sv.data, sv.accumulate, N, L, C,
                                                          heads);
      };
    });
  }
  // The forward writes P whether or not it is kept: without a backward it is scratch.
  Tensor<float> P({N, heads, L, L}, Device::CUDA);
  be.attention(q.value().data(), k.value().data(), v.value().data(), out.data(), P.data(), N, L, C, heads);
  if (!grad) P = Tensor<float>();
  return make_result<float>(std::move(out), {&q, &k, &v}, [&]() {
    return [q, k, v, P, N, L, C, heads](const Tensor<float>& g) {
      // Sinks in the CPU's order (dV, dQ, dK): when inputs are the same Var, the first writes.
      GradSink<float> sv{}, sq{}, sk{};
      if (v.requires_grad()) sv = grad_sink(*v.node());
      if (q.requires_grad()) sq = grad_sink(*q.node());
      if (k.requires_grad()) sk = grad_sink(*k.node());
      backend::cuda_backend()->attention_backward(q.value().data(), k.value().data(), v.value().data(), P.data(),
                                                  g.data(), sq.data, sq.accumulate, sk.data, sk.accumulate, sv.data,
                                                  sv.accumulate, N, L, C, heads);
    };
  });
}
}  // namespace detail

// Multi-head attention on [N, L, C] tokens: for each image n and head h (channel
// slice [h*d, (h+1)*d), d = C / heads), out = softmax(Q K^T * d^-0.5, over keys) V.
// With heads = 1 this is the reference AttnBlock's
//   w = softmax(bmm(q, k) * C^-0.5);  h = bmm(v, w^T)
// in NHWC layout. Returns [N, L, C]; gradients flow to q, k and v (any of them
// may be the same Var).
//
// Memory: when a gradient is needed the probabilities P [N, heads, L, L] are
// kept for the backward (float: 4*N*heads*L^2 bytes, e.g. 2 MiB at N=8, L=256,
// heads=1; 32 MiB at L=1024), and the backward overwrites them with dS. Besides
// that, one block of rows x L scores per thread (at most ~100 x L). On CUDA with
// set_cuda_attention_kernel(AttentionKernel::Flash) and d <= 256, the fused kernels keep
// only the output and one log-sum-exp per query row (4*N*heads*L bytes) instead of P.
template <class T>
Var<T> attention(const Var<T>& q, const Var<T>& k, const Var<T>& v, int heads = 1) {
  if (!q.defined() || !k.defined() || !v.defined())
    throw std::invalid_argument("diffuse: attention: q, k and v must be defined");
  if (q.value().dim() != 3)
    throw std::invalid_argument("diffuse: attention: q, k, v must be [N, L, C], got q " + shape_str(q.shape()));
  if (k.shape() != q.shape() || v.shape() != q.shape())
    throw std::invalid_argument("diffuse: attention: q, k, v must have the same shape, got q " + shape_str(q.shape()) +
                                ", k " + shape_str(k.shape()) + ", v " + shape_str(v.shape()));
  const int64_t N = q.size(0), L = q.size(1), C = q.size(2);
  if (heads < 1 || C % heads != 0)
    throw std::invalid_argument("diffuse: attention: the channel count C = " + std::to_string(C) +
                                " must be a multiple of heads = " + std::to_string(heads) + " (heads >= 1)");
  if (detail::op_device("attention", {&q, &k, &v}) == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::attention_cuda(q, k, v, heads);
    else detail::cuda_float_only("attention");
  }
  const detail::AttentionDims dims = detail::attention_dims(N, L, C, heads);
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(dims.d, 1))));
  const bool grad =
      Tape<T>::grad_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  Tensor<T> out({N, L, C});
  Tensor<T> P = grad ? Tensor<T>({N, static_cast<int64_t>(heads), L, L}) : Tensor<T>();
  detail::attention_forward<T>(dims, q.value().data(), k.value().data(), v.value().data(), scale, out.data(),
                               P.defined() ? P.data() : nullptr);
  return make_result<T>(std::move(out), {&q, &k, &v}, [&]() {
    return [q, k, v, P, dims, scale, consumed = false](const Tensor<T>& g) mutable {
      if (consumed) throw std::logic_error("diffuse: attention: backward ran twice (its saved P is consumed)");
      consumed = true;
      // Sinks in the order the phases write them (dV, dQ, dK): when inputs are
      // the same Var, the first phase overwrites and the later ones accumulate.
      GradSink<T> sv{}, sq{}, sk{};
      if (v.requires_grad()) sv = grad_sink(*v.node());
      if (q.requires_grad()) sq = grad_sink(*q.node());
      if (k.requires_grad()) sk = grad_sink(*k.node());
      detail::attention_backward<T>(dims, q.value().data(), k.value().data(), v.value().data(), scale, g.data(),
                                    P.data(), q.requires_grad() ? &sq : nullptr, k.requires_grad() ? &sk : nullptr,
                                    v.requires_grad() ? &sv : nullptr);
    };
  });
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Var<float> attention<float>(const Var<float>& q, const Var<float>& k, const Var<float>& v,
    int heads))

}  // namespace diffuse
