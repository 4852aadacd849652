// CPU references for the elementwise kernel cases (see kernel_reference_elementwise.hpp).
#include "kernel_reference_elementwise.hpp"

#include <diffuse/ops/elementwise.hpp>
#include <diffuse/ops/linear.hpp>
#include <diffuse/ops/shape.hpp>
#include <diffuse/ops/reduce.hpp>
#include <diffuse/ops/channel_bias.hpp>
#include <diffuse/ops/dropout.hpp>
#include <diffuse/ops/group_norm.hpp>
#include <diffuse/ops/nhwc.hpp>
#include <diffuse/ops/upsample.hpp>

namespace diffuse::testing {

namespace {

template <class T>
Var<T> var(const std::vector<float>& v, Shape shape, bool requires_grad = false) {
  return Var<T>(Tensor<T>::from(std::vector<T>(v.begin(), v.end()), std::move(shape)), requires_grad);
}

// Gives x's gradient buffer old contents, so the next backward accumulates into it.
template <class T>
void prefill_grad(Var<T>& x, const std::vector<float>* prefill) {
  if (!prefill) return;
  x.node()->grad = Tensor<T>::from(std::vector<T>(prefill->begin(), prefill->end()), x.shape());
  x.node()->has_grad = true;
}

// Runs the backward of `root` for the upstream gradient `seed`.
template <class T>
void backward_from(const Var<T>& root, const std::vector<float>& seed) {
  const Tensor<T> g = Tensor<T>::from(std::vector<T>(seed.begin(), seed.end()), root.shape());
  Tape<T>::current().backward(root, &g);
}

template <class T, class U = T>
std::vector<U> values(const Tensor<T>& t) {
  return std::vector<U>(t.begin(), t.end());
}

Shape flat(const std::vector<float>& v) { return {static_cast<int64_t>(v.size())}; }

}  // namespace

std::vector<float> cpu_add(const std::vector<float>& a, const std::vector<float>& b) {
  NoGrad ng;
  return values(add(var<float>(a, flat(a)), var<float>(b, flat(b))).value());
}

std::vector<float> cpu_scale(const std::vector<float>& x, float s) {
  NoGrad ng;
  return values(scale(var<float>(x, flat(x)), s).value());
}

std::vector<float> cpu_silu_backward(const std::vector<float>& x, const std::vector<float>& dy,
                                     const std::vector<float>* prefill) {
  Var<float> xv = var<float>(x, flat(x), true);
  prefill_grad(xv, prefill);
  backward_from(silu(xv), dy);
  return values(xv.grad());
}

std::vector<float> cpu_add_row_bias(const std::vector<float>& y, const std::vector<float>& b, std::int64_t rows,
                                    std::int64_t C) {
  NoGrad ng;
  return values(add(var<float>(y, {rows, C}), var<float>(b, {C})).value());
}

std::vector<double> cpu_row_bias_backward(const std::vector<float>& dy, const std::vector<float>& prefill,
                                          std::int64_t rows, std::int64_t C) {
  Var<double> b = var<double>(prefill, {C}, true);
  prefill_grad(b, &prefill);
  backward_from(add(var<double>(dy, {rows, C}), b), dy);
  return values(b.grad());
}

std::vector<float> cpu_add_channel_bias(const std::vector<float>& x, const std::vector<float>& b, std::int64_t N,
                                        std::int64_t HW, std::int64_t C) {
  NoGrad ng;
  return values(add_channel_bias(var<float>(x, {N, HW, 1, C}), var<float>(b, {N, C})).value());
}

std::vector<double> cpu_channel_bias_backward(const std::vector<float>& dy, const std::vector<float>* prefill,
                                              std::int64_t N, std::int64_t HW, std::int64_t C) {
  Var<double> b(Tensor<double>({N, C}), true);
  prefill_grad(b, prefill);
  backward_from(add_channel_bias(var<double>(dy, {N, HW, 1, C}), b), dy);
  return values(b.grad());
}

BiasSiluRef cpu_bias_silu(const std::vector<float>& z, const std::vector<float>& b, const std::vector<float>& dy,
                          const std::vector<float>* prefill, std::int64_t rows, std::int64_t C) {
  Var<float> x = var<float>(z, {rows, C}, true);
  prefill_grad(x, prefill);
  Tensor<float> eye({C, C});
  eye.fill(0.0f);
  for (std::int64_t c = 0; c < C; ++c) eye[static_cast<size_t>(c * C + c)] = 1.0f;
  const Var<float> y = linear_act(x, Var<float>(eye), var<float>(b, {C}), Activation::SiLU);
  BiasSiluRef r;
  r.y = values(y.value());
  backward_from(y, dy);
  r.dz = values(x.grad());
  return r;
}

MseRef cpu_mse(const std::vector<float>& a, const std::vector<float>& b, float grad_scale,
               const std::vector<float>* prefill_a, const std::vector<float>* prefill_b) {
  Var<float> av = var<float>(a, flat(a), true), bv = var<float>(b, flat(b), true);
  prefill_grad(av, prefill_a);
  prefill_grad(bv, prefill_b);
  const Var<float> loss = mse(av, bv);
  MseRef r;
  r.loss = loss.value()[0];
  backward_from(loss, {grad_scale});
  r.da = values(av.grad());
  r.db = values(bv.grad());
  return r;
}

std::vector<float> cpu_gather_rows_add(const std::vector<float>& table, const std::vector<std::int32_t>& idx,
                                       const std::vector<float>& y, std::int64_t R, std::int64_t D) {
  NoGrad ng;
  const std::int64_t N = static_cast<std::int64_t>(idx.size());
  return values(add(var<float>(y, {N, D}), gather_rows(var<float>(table, {R, D}), idx)).value());
}

std::vector<float> cpu_gather_rows_backward(const std::vector<std::int32_t>& idx, const std::vector<float>& dy,
                                            const std::vector<float>& prefill, std::int64_t R, std::int64_t D) {
  Var<float> table(Tensor<float>({R, D}), true);
  prefill_grad(table, &prefill);
  backward_from(gather_rows(table, idx), dy);
  return values(table.grad());
}

}  // namespace diffuse::testing
