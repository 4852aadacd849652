// FidInceptionV3<T>: the InceptionV3 of pytorch-fid (the 2015 TensorFlow graph
// that FID is defined with), up to its 2,048-d pool features.
//
// Built as pytorch-fid's fid_inception_v3() builds it: torchvision's
// inception_v3 (1008 classes, no aux head) with Mixed_5b..5d replaced by
// FID-InceptionA, Mixed_6b..6e by FID-InceptionC, Mixed_7b by FID-InceptionE_1
// and Mixed_7c by FID-InceptionE_2; Mixed_6a (B) and Mixed_7a (D) as torchvision
// has them. Every convolution is conv (no bias) + BatchNorm (eps 1e-3) + ReLU
// ("BasicConv2d"). What the FID blocks change: A, C and E_1 average-pool their
// pool branch 3x3/1 pad 1 WITHOUT counting the padding (TensorFlow's rule),
// E_2 max-pools it instead. Parameter names are pytorch-fid's state-dict keys,
// e.g. "Mixed_5b.branch5x5_2.conv.weight", "Mixed_5b.branch5x5_2.bn.running_var",
// so its weights load unchanged (see include/diffuse/eval/fid.hpp for the loader;
// the unused classifier "fc.*" is not part of this module).
//
// Input: NHWC [N, 299, 299, 3] scaled to [-1, 1]; features(x): [N, 2048].
// Spatial sizes 299 -> 149 -> 147 -> 147 -> 73 -> 73 -> 71 -> 35 -> 17 -> 8.
// 470 tensors, 21,820,000 values (weights, BN affine and running statistics).
#pragma once

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/nn/module.hpp>
#include <diffuse/ops/elementwise.hpp>
#include <diffuse/ops/shape.hpp>
#include <diffuse/ops/pool.hpp>
#include <diffuse/nn/batch_norm.hpp>
#include <diffuse/nn/conv2d.hpp>

namespace diffuse {

namespace inception {

// conv (no bias) -> BatchNorm(eps 0.001) -> ReLU, as torchvision's BasicConv2d.
template <class T>
class BasicConv2d : public Module<T> {
 public:
  BasicConv2d(int64_t in, int64_t out, int64_t kh, int64_t kw, Generator& g, Conv2dOptions opt = {})
      : conv(in, out, kh, kw, g, opt, false), bn(out, 0.001) {
    this->register_module("conv", conv);
    this->register_module("bn", bn);
  }
  BasicConv2d(int64_t in, int64_t out, int64_t k, Generator& g, int64_t stride = 1, int64_t pad = 0)
      : BasicConv2d(in, out, k, k, g, Conv2dOptions{stride, stride, pad, pad}) {}
  Var<T> operator()(const Var<T>& x) const { return relu(bn(conv(x))); }

  Conv2d<T> conv;
  BatchNorm2d<T> bn;
};

// Holds a block's convolutions by name, in registration order.
template <class T>
class Block : public Module<T> {
 protected:
  BasicConv2d<T>& add(const std::string& name, std::unique_ptr<BasicConv2d<T>> c) {
    this->register_module(name, c);
    convs_.push_back(std::move(c));
    return *convs_.back();
  }
  static Conv2dOptions pad(int64_t ph, int64_t pw) { return Conv2dOptions{1, 1, ph, pw}; }
  // The FID pool branches' average pool: 3x3, stride 1, pad 1, padding not counted.
  static Var<T> avg3_no_pad(const Var<T>& x) { return avg_pool2d(x, 3, 1, 1, false, false); }

 private:
  std::vector<std::unique_ptr<BasicConv2d<T>>> convs_;
};

// FID-InceptionA (Mixed_5b/5c/5d): [1x1 64, 5x5 64, 3x3dbl 96, pool pool_features].
template <class T>
class BlockA : public Block<T> {
 public:
  BlockA(int64_t in, int64_t pool_features, Generator& g)
      : b1(this->add("branch1x1", std::make_unique<BasicConv2d<T>>(in, 64, 1, g))),
        b5_1(this->add("branch5x5_1", std::make_unique<BasicConv2d<T>>(in, 48, 1, g))),
        b5_2(this->add("branch5x5_2", std::make_unique<BasicConv2d<T>>(48, 64, 5, g, 1, 2))),
        d1(this->add("branch3x3dbl_1", std::make_unique<BasicConv2d<T>>(in, 64, 1, g))),
        d2(this->add("branch3x3dbl_2", std::make_unique<BasicConv2d<T>>(64, 96, 3, g, 1, 1))),
        d3(this->add("branch3x3dbl_3", std::make_unique<BasicConv2d<T>>(96, 96, 3, g, 1, 1))),
        pool(this->add("branch_pool", std::make_unique<BasicConv2d<T>>(in, pool_features, 1, g))) {}
  Var<T> operator()(const Var<T>& x) const {
    return concat<T>({b1(x), b5_2(b5_1(x)), d3(d2(d1(x))), pool(this->avg3_no_pad(x))}, 3);
  }

 private:
  BasicConv2d<T>&b1, &b5_1, &b5_2, &d1, &d2, &d3, &pool;
};

// InceptionB (Mixed_6a, torchvision's): [3x3/2 384, 3x3dbl/2 96, max pool 3/2].
template <class T>
class BlockB : public Block<T> {
 public:
  BlockB(int64_t in, Generator& g)
      : b3(this->add("branch3x3", std::make_unique<BasicConv2d<T>>(in, 384, 3, g, 2, 0))),
        d1(this->add("branch3x3dbl_1", std::make_unique<BasicConv2d<T>>(in, 64, 1, g))),
        d2(this->add("branch3x3dbl_2", std::make_unique<BasicConv2d<T>>(64, 96, 3, g, 1, 1))),
        d3(this->add("branch3x3dbl_3", std::make_unique<BasicConv2d<T>>(96, 96, 3, g, 2, 0))) {}
  Var<T> operator()(const Var<T>& x) const { return concat<T>({b3(x), d3(d2(d1(x))), max_pool2d(x, 3, 2)}, 3); }

 private:
  BasicConv2d<T>&b3, &d1, &d2, &d3;
};

// FID-InceptionC (Mixed_6b..6e): [1x1 192, 7x7 192, 7x7dbl 192, pool 192], c7 inner channels.
template <class T>
class BlockC : public Block<T> {
 public:
  BlockC(int64_t in, int64_t c7, Generator& g)
      : b1(this->add("branch1x1", std::make_unique<BasicConv2d<T>>(in, 192, 1, g))),
        s1(this->add("branch7x7_1", std::make_unique<BasicConv2d<T>>(in, c7, 1, g))),
        s2(this->add("branch7x7_2", std::make_unique<BasicConv2d<T>>(c7, c7, 1, 7, g, this->pad(0, 3)))),
        s3(this->add("branch7x7_3", std::make_unique<BasicConv2d<T>>(c7, 192, 7, 1, g, this->pad(3, 0)))),
        d1(this->add("branch7x7dbl_1", std::make_unique<BasicConv2d<T>>(in, c7, 1, g))),
        d2(this->add("branch7x7dbl_2", std::make_unique<BasicConv2d<T>>(c7, c7, 7, 1, g, this->pad(3, 0)))),
        d3(this->add("branch7x7dbl_3", std::make_unique<BasicConv2d<T>>(c7, c7, 1, 7, g, this->pad(0, 3)))),
        d4(this->add("branch7x7dbl_4", std::make_unique<BasicConv2d<T>>(c7, c7, 7, 1, g, this->pad(3, 0)))),
        d5(this->add("branch7x7dbl_5", std::make_unique<BasicConv2d<T>>(c7, 192, 1, 7, g, this->pad(0, 3)))),
        pool(this->add("branch_pool", std::make_unique<BasicConv2d<T>>(in, 192, 1, g))) {}
  Var<T> operator()(const Var<T>& x) const {
    return concat<T>({b1(x), s3(s2(s1(x))), d5(d4(d3(d2(d1(x))))), pool(this->avg3_no_pad(x))}, 3);
  }

 private:
  BasicConv2d<T>&b1, &s1, &s2, &s3, &d1, &d2, &d3, &d4, &d5, &pool;
};

// InceptionD (Mixed_7a, torchvision's): [3x3/2 320, 7x7x3/2 192, max pool 3/2].
template <class T>
class BlockD : public Block<T> {
 public:
  BlockD(int64_t in, Generator& g)
      : a1(this->add("branch3x3_1", std::make_unique<BasicConv2d<T>>(in, 192, 1, g))),
        a2(this->add("branch3x3_2", std::make_unique<BasicConv2d<T>>(192, 320, 3, g, 2, 0))),
        s1(this->add("branch7x7x3_1", std::make_unique<BasicConv2d<T>>(in, 192, 1, g))),
        s2(this->add("branch7x7x3_2", std::make_unique<BasicConv2d<T>>(192, 192, 1, 7, g, this->pad(0, 3)))),
        s3(this->add("branch7x7x3_3", std::make_unique<BasicConv2d<T>>(192, 192, 7, 1, g, this->pad(3, 0)))),
        s4(this->add("branch7x7x3_4", std::make_unique<BasicConv2d<T>>(192, 192, 3, g, 2, 0))) {}
  Var<T> operator()(const Var<T>& x) const {
    return concat<T>({a2(a1(x)), s4(s3(s2(s1(x)))), max_pool2d(x, 3, 2)}, 3);
  }

 private:
  BasicConv2d<T>&a1, &a2, &s1, &s2, &s3, &s4;
};

// FID-InceptionE (Mixed_7b with the uncounted average pool, Mixed_7c with max pool):
// [1x1 320, 3x3 (1x3, 3x1) 768, 3x3dbl (1x3, 3x1) 768, pool 192].
template <class T>
class BlockE : public Block<T> {
 public:
  BlockE(int64_t in, bool max_pool_branch, Generator& g)
      : max_pool_(max_pool_branch),
        b1(this->add("branch1x1", std::make_unique<BasicConv2d<T>>(in, 320, 1, g))),
        t1(this->add("branch3x3_1", std::make_unique<BasicConv2d<T>>(in, 384, 1, g))),
        t2a(this->add("branch3x3_2a", std::make_unique<BasicConv2d<T>>(384, 384, 1, 3, g, this->pad(0, 1)))),
        t2b(this->add("branch3x3_2b", std::make_unique<BasicConv2d<T>>(384, 384, 3, 1, g, this->pad(1, 0)))),
        d1(this->add("branch3x3dbl_1", std::make_unique<BasicConv2d<T>>(in, 448, 1, g))),
        d2(this->add("branch3x3dbl_2", std::make_unique<BasicConv2d<T>>(448, 384, 3, g, 1, 1))),
        d3a(this->add("branch3x3dbl_3a", std::make_unique<BasicConv2d<T>>(384, 384, 1, 3, g, this->pad(0, 1)))),
        d3b(this->add("branch3x3dbl_3b", std::make_unique<BasicConv2d<T>>(384, 384, 3, 1, g, this->pad(1, 0)))),
        pool(this->add("branch_pool", std::make_unique<BasicConv2d<T>>(in, 192, 1, g))) {}
  Var<T> operator()(const Var<T>& x) const {
    const Var<T> t = t1(x), d = d2(d1(x));
    const Var<T> p = max_pool_ ? max_pool2d(x, 3, 1, 1) : this->avg3_no_pad(x);
    return concat<T>({b1(x), t2a(t), t2b(t), d3a(d), d3b(d), pool(p)}, 3);
  }

 private:
  bool max_pool_;
  BasicConv2d<T>&b1, &t1, &t2a, &t2b, &d1, &d2, &d3a, &d3b, &pool;
};

}  // namespace inception

template <class T>
class FidInceptionV3 : public Module<T> {
 public:
  static constexpr int64_t kInputSize = 299;
  static constexpr int64_t kFeatures = 2048;

  // Random weights (PyTorch's default conv init, BatchNorm at its initial
  // state): only a shape to load real weights into, or for tests.
  explicit FidInceptionV3(Generator& g)
      : c1a(3, 32, 3, g, 2, 0), c2a(32, 32, 3, g), c2b(32, 64, 3, g, 1, 1), c3b(64, 80, 1, g), c4a(80, 192, 3, g),
        m5b(192, 32, g), m5c(256, 64, g), m5d(288, 64, g), m6a(288, g), m6b(768, 128, g), m6c(768, 160, g),
        m6d(768, 160, g), m6e(768, 192, g), m7a(768, g), m7b(1280, false, g), m7c(2048, true, g) {
    this->register_module("Conv2d_1a_3x3", c1a);
    this->register_module("Conv2d_2a_3x3", c2a);
    this->register_module("Conv2d_2b_3x3", c2b);
    this->register_module("Conv2d_3b_1x1", c3b);
    this->register_module("Conv2d_4a_3x3", c4a);
    this->register_module("Mixed_5b", m5b);
    this->register_module("Mixed_5c", m5c);
    this->register_module("Mixed_5d", m5d);
    this->register_module("Mixed_6a", m6a);
    this->register_module("Mixed_6b", m6b);
    this->register_module("Mixed_6c", m6c);
    this->register_module("Mixed_6d", m6d);
    this->register_module("Mixed_6e", m6e);
    this->register_module("Mixed_7a", m7a);
    this->register_module("Mixed_7b", m7b);
    this->register_module("Mixed_7c", m7c);
  }

  // x: NHWC [N, 299, 299, 3] in [-1, 1] -> pool features [N, 2048].
  Var<T> features(const Var<T>& x) const {
    const Shape& s = x.shape();
    if (s.size() != 4 || s[1] != kInputSize || s[2] != kInputSize || s[3] != 3)
      throw std::invalid_argument("FidInceptionV3: expected NHWC images [N, 299, 299, 3], got " + shape_str(s));
    Var<T> h = max_pool2d(c2b(c2a(c1a(x))), 3, 2);  // 149 -> 147 -> 147 -> 73
    h = max_pool2d(c4a(c3b(h)), 3, 2);              // 73 -> 71 -> 35
    h = m5d(m5c(m5b(h)));                           // 35: 256, 288, 288 channels
    h = m6e(m6d(m6c(m6b(m6a(h)))));                 // 17, 768
    h = m7c(m7b(m7a(h)));                           // 8, 1280 -> 2048
    return global_avg_pool(h);
  }

  inception::BasicConv2d<T> c1a, c2a, c2b, c3b, c4a;
  inception::BlockA<T> m5b, m5c, m5d;
  inception::BlockB<T> m6a;
  inception::BlockC<T> m6b, m6c, m6d, m6e;
  inception::BlockD<T> m7a;
  inception::BlockE<T> m7b, m7c;
};

}  // namespace diffuse
