// group_norm(x, gamma, beta, groups, eps, silu): torch.nn.GroupNorm on NHWC images, with SiLU
// fused when asked (the U-Net's norm + activation), on the device of its operands; and
// group_norm_dropout: the same followed by dropout, fused on the device.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <diffuse/core/rng.hpp>
#include <diffuse/ops/common.hpp>
#include <diffuse/ops/dropout.hpp>
#include <diffuse/ops/nhwc.hpp>

namespace diffuse {

namespace detail {

// Work split of group_norm. In NHWC a group is a run of Cg contiguous channels
// inside every pixel, so a task takes a block of whole groups of one sample and
// walks its pixels: a (sample, groups) pair. Wide blocks stream memory; narrow
// ones read a few bytes every C elements, a pattern the prefetcher misses (one
// sample of [32, 32, 128] floats, one thread: 64-byte blocks ran 2-3x slower
// than whole pixels). So a sample is split only to give the threads enough
// tasks: into blocks of at least 256 bytes for up to 4 tasks per thread, and
// of at least a cache line (64 bytes) while threads would otherwise idle.
// A group never spans two tasks and every sum runs in a fixed order, so the
// results do not depend on the thread count.
struct GroupNormPlan {
  int64_t N = 0, HW = 0, C = 0, G = 0, Cg = 0;
  int64_t gpb = 1;   // groups per task
  int64_t nblk = 1;  // tasks per sample
  int64_t tasks() const { return N * nblk; }
};

inline GroupNormPlan group_norm_plan(int64_t N, int64_t HW, int64_t C, int64_t G, size_t elem_bytes) {
  GroupNormPlan p;
  p.N = N, p.HW = HW, p.C = C, p.G = G, p.Cg = C / G;
  const int64_t threads = num_threads();
  const int64_t group_bytes = p.Cg * static_cast<int64_t>(elem_bytes);
  auto groups_for = [&](int64_t bytes) { return std::clamp<int64_t>((bytes + group_bytes - 1) / group_bytes, 1, G); };
  auto can_halve = [&](int64_t min_groups) { return 2 * p.nblk <= G && (G + 2 * p.nblk - 1) / (2 * p.nblk) >= min_groups; };
  while (N * p.nblk < 4 * threads && can_halve(groups_for(256))) p.nblk *= 2;
  while (N * p.nblk < threads && can_halve(groups_for(64))) p.nblk *= 2;
  p.gpb = (G + p.nblk - 1) / p.nblk;  // even blocks; the last may hold fewer groups
  p.nblk = (G + p.gpb - 1) / p.gpb;
  return p;
}

// A task's block of one sample's image as a [HW, cb] array with row stride C.
template <class T>
using ImgBlock = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, 0, Eigen::OuterStride<>>;
template <class T>
using CImgBlock =
    Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, 0, Eigen::OuterStride<>>;
template <class T>
using RowArr = Eigen::Array<T, 1, Eigen::Dynamic>;

}  // namespace detail

namespace detail {
// Dropout's keep mask for n elements as bits on the device (bit i of word i / 32: element i kept),
// drawn from gen exactly as dropout() draws its uniforms (the same Philox numbers, so the same mask).
inline Tensor<std::uint8_t> dropout_keep_bits(int64_t n, double p, Generator& gen) {
  const uint64_t seed = gen.seed;
  const DrawPos at = backend::device_draw(gen, static_cast<uint64_t>(n));  // as dropout() takes them
  Tensor<std::uint8_t> keep({4 * ((n + 31) / 32)}, Device::CUDA);
  backend::require_cuda("dropout").dropout_bits(reinterpret_cast<std::uint32_t*>(keep.data()), n, p, seed, at);
  return keep;
}

// keep: dropout's mask as bits (group_norm_dropout; undefined: none), applied with keep_scale.
inline Var<float> group_norm_cuda(const Var<float>& x, const Var<float>& gamma, const Var<float>& beta, int64_t groups,
                                  double eps, bool silu, Tensor<std::uint8_t> keep = {}, float keep_scale = 1.0f) {
  backend::CudaBackend& be = backend::require_cuda("group_norm");
  const int64_t N = x.size(0), HW = x.size(1) * x.size(2), C = x.size(3);
  Tensor<float> out(x.shape(), Device::CUDA);
  Tensor<float> stats({2 * N * groups}, Device::CUDA);  // mean, then rstd, per (sample, group)
  const std::uint32_t* bits = keep.defined() ? reinterpret_cast<const std::uint32_t*>(keep.data()) : nullptr;
  be.group_norm(x.value().data(), gamma.value().data(), beta.value().data(), out.data(), stats.data(),
                stats.data() + N * groups, N, HW, C, groups, static_cast<float>(eps), silu, bits, keep_scale);
  // The backward holds `keep` (the bits' owner) as it holds stats.
  return make_result<float>(std::move(out), {&x, &gamma, &beta},
                            [x, gamma, beta, stats, N, HW, C, groups, silu, keep, bits, keep_scale]() {
    return [x, gamma, beta, stats, N, HW, C, groups, silu, keep, bits, keep_scale](const Tensor<float>& g) {
      GradSink<float> sx{}, sg{}, sb{};
      if (x.requires_grad()) sx = grad_sink(*x.node());
      if (gamma.requires_grad()) sg = grad_sink(*gamma.node());
      if (beta.requires_grad()) sb = grad_sink(*beta.node());
      backend::cuda_backend()->group_norm_backward(g.data(), x.value().data(), gamma.value().data(), beta.value().data(),
                                                   stats.data(), stats.data() + N * groups, sx.data, sx.accumulate,
                                                   sg.data, sg.accumulate, sb.data, sb.accumulate, N, HW, C, groups,
                                                   silu, bits, keep_scale);
    };
  });
}
}  // namespace detail

// torch.nn.GroupNorm(groups, C, eps) on the NCHW view of x: x NHWC [N, H, W, C],
// gamma and beta [C]. Per (sample, group): mean and biased variance over
// H * W * (C / groups) values, accumulated in double. With silu = true it
// returns SiLU(group_norm(x)) as one op (the U-Net's norm + activation).
namespace detail {
// On x's shape (res_block checks a normalisation of an activation it has not made yet).
template <class T>
void check_group_norm(const Shape& xs, const Var<T>& gamma, const Var<T>& beta, int64_t groups, double eps) {
  detail::require_nhwc("group_norm", xs);
  const int64_t C = xs[3];
  if (groups <= 0 || C % groups != 0)
    throw std::invalid_argument("diffuse: group_norm: " + std::to_string(C) + " channels cannot be split into " +
                                std::to_string(groups) + " groups (C % groups must be 0)");
  for (const Var<T>* v : {&gamma, &beta})
    if (!v->defined() || v->value().dim() != 1 || v->size(0) != C)
      throw std::invalid_argument("diffuse: group_norm: gamma and beta must have shape [" + std::to_string(C) +
                                  "], got " + (v->defined() ? shape_str(v->shape()) : std::string("undefined")));
  if (!(eps > 0)) throw std::invalid_argument("diffuse: group_norm: eps must be positive");
}
template <class T>
void check_group_norm(const Var<T>& x, const Var<T>& gamma, const Var<T>& beta, int64_t groups, double eps) {
  check_group_norm(x.shape(), gamma, beta, groups, eps);
}
// The operands' device, once they are checked.
template <class T>
Device checked_group_norm_device(const Var<T>& x, const Var<T>& gamma, const Var<T>& beta, int64_t groups, double eps) {
  check_group_norm(x, gamma, beta, groups, eps);
  return op_device("group_norm", {&x, &gamma, &beta});
}
}  // namespace detail

template <class T>
Var<T> group_norm(const Var<T>& x, const Var<T>& gamma, const Var<T>& beta, int64_t groups, double eps,
                  bool silu = false) {
  detail::check_group_norm(x, gamma, beta, groups, eps);
  const int64_t N = x.size(0), HW = x.size(1) * x.size(2), C = x.size(3);
  if (detail::op_device("group_norm", {&x, &gamma, &beta}) == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) return detail::group_norm_cuda(x, gamma, beta, groups, eps, silu);
    else detail::cuda_float_only("group_norm");
  }

  const detail::GroupNormPlan pl = detail::group_norm_plan(N, HW, C, groups, sizeof(T));
  const int64_t Cg = pl.Cg;
  const double M = static_cast<double>(HW * Cg);  // values per (sample, group)
  const bool grad = Tape<T>::grad_enabled() && (x.requires_grad() || gamma.requires_grad() || beta.requires_grad());
  Tensor<T> out(x.shape());
  // The fused backward needs SiLU'(y) = s + out * (1 - s): keep s = sigmoid(y) so it needs no exp.
  Tensor<T> sig = grad && silu ? Tensor<T>(x.shape()) : Tensor<T>();
  // Per (sample, group) mean and 1/std: with x they give xhat in the backward without storing it.
  // (Tensors, not vectors: cached memory, so a steady training step allocates nothing here.)
  Tensor<double> mean({N * groups}), rstd({N * groups});
  const T* xd = x.value().data();
  const T* gd = gamma.value().data();
  const T* bd = beta.value().data();
  T* od = out.data();
  T* sd = sig.defined() ? sig.data() : nullptr;

  // Scratch per thread, not per task: the step allocates nothing per (sample, group).
  const int64_t cmax = pl.gpb * Cg;
  parallel_region(loop_threads(pl.tasks(), x.value().size() >= detail::kParallelMin), [&](int th, int team) {
    std::vector<double> acc(static_cast<size_t>(cmax)), mc(static_cast<size_t>(cmax));
    detail::RowArr<T> m(cmax), a(cmax), b(cmax);
    const auto [t0, t1] = static_range(pl.tasks(), th, team);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / pl.nblk, g0 = (t % pl.nblk) * pl.gpb, g1 = std::min(groups, g0 + pl.gpb);
      const int64_t c0 = g0 * Cg, cb = (g1 - g0) * Cg;
      const int64_t base = n * HW * C + c0;
      const T* xp = xd + base;
      // Two passes (mean, then squared deviations) rather than E[x^2] - E[x]^2, which cancels.
      std::fill(acc.begin(), acc.begin() + cb, 0.0);
      for (int64_t p = 0; p < HW; ++p)
        for (int64_t c = 0; c < cb; ++c) acc[c] += xp[p * C + c];
      for (int64_t j = g0; j < g1; ++j) {
        double s = 0;
        for (int64_t c = (j - g0) * Cg; c < (j - g0 + 1) * Cg; ++c) s += acc[c];
        mean[n * groups + j] = M > 0 ? s / M : 0.0;
      }
      for (int64_t c = 0; c < cb; ++c) mc[c] = mean[n * groups + g0 + c / Cg];
      std::fill(acc.begin(), acc.begin() + cb, 0.0);
      for (int64_t p = 0; p < HW; ++p)
        for (int64_t c = 0; c < cb; ++c) {
          const double d = xp[p * C + c] - mc[c];
          acc[c] += d * d;
        }
      for (int64_t j = g0; j < g1; ++j) {
        double s = 0;
        for (int64_t c = (j - g0) * Cg; c < (j - g0 + 1) * Cg; ++c) s += acc[c];
        rstd[n * groups + j] = 1.0 / std::sqrt((M > 0 ? s / M : 0.0) + eps);
      }
      // y = (x - mean) * (rstd * gamma) + beta, then SiLU, on the whole block at once (Eigen vectorises the exp).
      for (int64_t c = 0; c < cb; ++c) {
        m[c] = static_cast<T>(mc[c]);
        a[c] = static_cast<T>(rstd[n * groups + g0 + c / Cg] * static_cast<double>(gd[c0 + c]));
        b[c] = bd[c0 + c];
      }
      const Eigen::OuterStride<> stride(C);
      detail::CImgBlock<T> X(xp, HW, cb, stride);
      detail::ImgBlock<T> Y(od + base, HW, cb, stride);
      Y = ((X.rowwise() - m.head(cb)).rowwise() * a.head(cb)).rowwise() + b.head(cb);
      if (silu) {
        if (sd) {
          detail::ImgBlock<T> S(sd + base, HW, cb, stride);
          S = (T(1) + (-Y).exp()).inverse();
          Y = Y * S;
        } else {
          Y = Y / (T(1) + (-Y).exp());
        }
      }
    }
  });

  const Tensor<T> yv = silu && grad ? out : Tensor<T>();  // a second handle on the output, for SiLU'
  return make_result<T>(std::move(out), {&x, &gamma, &beta}, [&]() {
    return [x, gamma, beta, pl, silu, yv, sig, mean = std::move(mean), rstd = std::move(rstd)](const Tensor<T>& g) {
      const int64_t N = pl.N, HW = pl.HW, C = pl.C, G = pl.G, Cg = pl.Cg;
      const double M = static_cast<double>(HW * Cg);
      const bool gx = x.requires_grad();
      GradSink<T> sx{};
      if (gx) sx = grad_sink(*x.node());
      // Per (sample, channel): s1 = sum dy, s2 = sum dy * xhat, with dy the gradient
      // before the affine map. They give dbeta, dgamma (summed over samples) and the
      // two group means of dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
      Tensor<double> s1({N * C}), s2({N * C});
      const T* xd = x.value().data();
      const T* gd = gamma.value().data();
      const T* gr = g.data();
      const T* od = silu ? yv.data() : nullptr;
      const T* sd = silu ? sig.data() : nullptr;
      // One task; SiLU or not is a compile-time flag so that the inner loops have no branch and vectorise.
      // s: per-thread scratch of 5 rows of pl.gpb * Cg (m, r, ga, k1, k2).
      auto task = [&](int64_t t, T* s, auto silu_flag) {
        constexpr bool kSilu = decltype(silu_flag)::value;
        const int64_t n = t / pl.nblk, g0 = (t % pl.nblk) * pl.gpb, g1 = std::min(G, g0 + pl.gpb);
        const int64_t c0 = g0 * Cg, cb = (g1 - g0) * Cg, cmax = pl.gpb * Cg;
        const int64_t base = n * HW * C + c0;
        T *m = s, *r = s + cmax, *ga = s + 2 * cmax, *k1 = s + 3 * cmax, *k2 = s + 4 * cmax;
        for (int64_t c = 0; c < cb; ++c) {
          m[c] = static_cast<T>(mean[n * G + g0 + c / Cg]);
          r[c] = static_cast<T>(rstd[n * G + g0 + c / Cg]);
          ga[c] = gd[c0 + c];
        }
        // dy at one element: g, times SiLU'(y) = s + out * (1 - s) for the fused op.
        auto dy = [&](int64_t i) {
          if constexpr (kSilu) return gr[i] * (sd[i] + od[i] * (T(1) - sd[i]));
          else return gr[i];
        };
        double* a1 = s1.data() + n * C + c0;
        double* a2 = s2.data() + n * C + c0;
        std::fill(a1, a1 + cb, 0.0);
        std::fill(a2, a2 + cb, 0.0);
        for (int64_t p = 0; p < HW; ++p) {
          const int64_t i0 = base + p * C;
          for (int64_t c = 0; c < cb; ++c) {
            const T d = dy(i0 + c), xh = (xd[i0 + c] - m[c]) * r[c];
            a1[c] += d;
            a2[c] += d * xh;
          }
        }
        if (!gx) return;
        // Per group: k1 = mean(dxhat), k2 = mean(dxhat * xhat), with dxhat = dy * gamma.
        for (int64_t j = 0; j < g1 - g0; ++j) {
          double q1 = 0, q2 = 0;
          for (int64_t c = j * Cg; c < (j + 1) * Cg; ++c) {
            q1 += static_cast<double>(ga[c]) * a1[c];
            q2 += static_cast<double>(ga[c]) * a2[c];
          }
          for (int64_t c = j * Cg; c < (j + 1) * Cg; ++c) {
            k1[c] = static_cast<T>(M > 0 ? q1 / M : 0.0);
            k2[c] = static_cast<T>(M > 0 ? q2 / M : 0.0);
          }
        }
        for (int64_t p = 0; p < HW; ++p) {
          const int64_t i0 = base + p * C;
          for (int64_t c = 0; c < cb; ++c) {
            const T xh = (xd[i0 + c] - m[c]) * r[c];
            sx.put(static_cast<size_t>(i0 + c), r[c] * (ga[c] * dy(i0 + c) - k1[c] - xh * k2[c]));
          }
        }
      };
      parallel_region(loop_threads(pl.tasks(), x.value().size() >= detail::kParallelMin), [&](int th, int team) {
        std::vector<T> scratch(static_cast<size_t>(5 * pl.gpb * Cg));
        const auto [t0, t1] = static_range(pl.tasks(), th, team);
        for (int64_t t = t0; t < t1; ++t) {
          if (silu)
            task(t, scratch.data(), std::true_type{});
          else
            task(t, scratch.data(), std::false_type{});
        }
      });
      // dgamma = sum over samples of s2, dbeta of s1 (small: [N, C]).
      for (int side = 0; side < 2; ++side) {
        const Var<T>& v = side == 0 ? gamma : beta;
        if (!v.requires_grad()) continue;
        const Tensor<double>& s = side == 0 ? s2 : s1;
        GradSink<T> sk = grad_sink(*v.node());
        for (int64_t c = 0; c < C; ++c) {
          double acc = 0;
          for (int64_t n = 0; n < N; ++n) acc += s[n * C + c];
          sk.put(static_cast<size_t>(c), acc);
        }
      }
    };
  });
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Var<float> group_norm<float>(const Var<float>& x, const Var<float>& gamma,
    const Var<float>& beta, int64_t groups, double eps, bool silu))

// dropout(group_norm(x, gamma, beta, groups, eps, silu), p, gen, true) as one op: the ResBlock's
// norm + SiLU + dropout. The same draws from gen, the same mask and the same numbers as the two
// ops. On the device the mask is drawn once as bits (n / 8 bytes, kept for the backward) and
// applied inside the normalisation's own passes, forward and backward, so dropout costs no pass
// over the activations and its output is not kept; on the CPU it is the two ops. p == 0: group_norm.
template <class T>
Var<T> group_norm_dropout(const Var<T>& x, const Var<T>& gamma, const Var<T>& beta, int64_t groups, double eps,
                          bool silu, double p, Generator& gen) {
  if (!(p >= 0.0 && p <= 1.0))
    throw std::invalid_argument("diffuse: dropout probability must be in [0, 1], got " + std::to_string(p));
  if (p > 0.0 && detail::checked_group_norm_device(x, gamma, beta, groups, eps) == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) {
      return detail::group_norm_cuda(x, gamma, beta, groups, eps, silu, detail::dropout_keep_bits(x.value().numel(), p, gen),
                                     detail::dropout_scale<float>(p));
    } else {
      detail::cuda_float_only("group_norm");
    }
  }
  const Var<T> y = group_norm(x, gamma, beta, groups, eps, silu);
  return p == 0.0 ? y : dropout(y, p, gen, true);
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(Var<float> group_norm_dropout<float>(const Var<float>& x, const Var<float>& gamma,
    const Var<float>& beta, int64_t groups, double eps, bool silu, double p, Generator& gen))

}  // namespace diffuse
