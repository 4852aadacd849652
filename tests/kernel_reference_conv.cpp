// CPU references for the conv kernel cases, computed by the CPU backend (host compiler only).
#include "kernel_reference_conv.hpp"

#include <diffuse/core/autograd.hpp>
#include <diffuse/nn/module.hpp>
#include <diffuse/ops/conv2d.hpp>

namespace diffuse::testing {

ConvRef cpu_conv2d(const ConvRefShape& s, const std::vector<float>& x, const std::vector<float>& w_oihw,
                   const std::vector<float>& dy) {
  Var<float> xv(Tensor<float>::from(x, {s.N, s.H, s.W, s.C}), true);
  // The CPU op takes OHWI weights (as the device does); the cases keep PyTorch's OIHW.
  Var<float> wv(from_torch_layout(Tensor<float>::from(w_oihw, {s.O, s.C, s.kh, s.kw}), ParamLayout::ConvOHWI), true);
  const Var<float> y = conv2d(xv, wv, Var<float>(), Conv2dOptions{s.stride_h, s.stride_w, s.pad_h, s.pad_w});
  // The output gradient is the tape's seed: conv2d's backward receives dy itself.
  const Tensor<float> seed = Tensor<float>::from(dy, y.shape());
  Tape<float>::current().backward(y, &seed);
  ConvRef r;
  r.y.assign(y.value().begin(), y.value().end());
  const Tensor<float> gx = xv.grad(), gw = to_torch_layout(wv.grad(), ParamLayout::ConvOHWI);
  r.dx.assign(gx.begin(), gx.end());
  r.dw.assign(gw.begin(), gw.end());
  return r;
}

}  // namespace diffuse::testing
