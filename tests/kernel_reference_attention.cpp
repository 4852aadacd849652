// CPU references for the attention kernel cases (see kernel_reference_attention.hpp).
#include "kernel_reference_attention.hpp"

#include <diffuse/ops/reduce.hpp>
#include <diffuse/ops/attention.hpp>

#include <cmath>
#include <stdexcept>

namespace diffuse::testing {

namespace {
std::vector<double> widen(const std::vector<float>& x) { return std::vector<double>(x.begin(), x.end()); }
}  // namespace

std::vector<double> cpu_softmax_rows(const std::vector<float>& x, std::int64_t rows, std::int64_t L) {
  std::vector<double> s = widen(x);
  if (static_cast<std::int64_t>(s.size()) != rows * L) throw std::invalid_argument("cpu_softmax_rows: size");
  diffuse::detail::softmax_rows<double>(s.data(), rows, L);
  return s;
}

std::vector<double> cpu_softmax_backward_rows(const std::vector<float>& P, const std::vector<float>& dP,
                                              std::int64_t rows, std::int64_t L) {
  if (static_cast<std::int64_t>(P.size()) != rows * L || dP.size() != P.size())
    throw std::invalid_argument("cpu_softmax_backward_rows: size");
  // As attention_backward's loop: r = (p * dp).sum(); p = p * (dp - r).
  using Arr = Eigen::Array<double, Eigen::Dynamic, 1>;
  std::vector<double> p = widen(P);
  const std::vector<double> d = widen(dP);
  for (std::int64_t i = 0; i < rows; ++i) {
    Eigen::Map<Arr> pi(p.data() + i * L, L);
    Eigen::Map<const Arr> di(d.data() + i * L, L);
    const double r = (pi * di).sum();
    pi = pi * (di - r);
  }
  return p;
}

AttentionRef cpu_attention(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                           const std::vector<float>& g, std::int64_t N, std::int64_t L, std::int64_t C,
                           std::int64_t heads) {
  const Shape shape{N, L, C};
  Var<double> vq(Tensor<double>::from(widen(q), shape), true), vk(Tensor<double>::from(widen(k), shape), true),
      vv(Tensor<double>::from(widen(v), shape), true);
  const Var<double> out = attention(vq, vk, vv, static_cast<int>(heads));
  const Tensor<double> seed = Tensor<double>::from(widen(g), shape);
  Tape<double>::current().backward(out, &seed);
  AttentionRef r;
  r.out.assign(out.value().begin(), out.value().end());
  r.dq.assign(vq.grad().begin(), vq.grad().end());
  r.dk.assign(vk.grad().begin(), vk.grad().end());
  r.dv.assign(vv.grad().begin(), vv.grad().end());
  // P through the op's own forward (the same dims and scale as attention() uses).
  const diffuse::detail::AttentionDims dims = diffuse::detail::attention_dims(N, L, C, heads);
  const double scale = 1.0 / std::sqrt(static_cast<double>(std::max<std::int64_t>(dims.d, 1)));
  Tensor<double> out2({N, L, C}), P({N, heads, L, L});
  diffuse::detail::attention_forward<double>(dims, vq.value().data(), vk.value().data(), vv.value().data(), scale,
                                             out2.data(), P.data());
  r.P.assign(P.begin(), P.end());
  return r;
}

}  // namespace diffuse::testing
