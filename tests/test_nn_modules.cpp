// The PyTorch-like modules: Sequential and ModuleList (names as PyTorch gives them), Embedding,
// Dropout with train()/eval(), and moving modules (a model returned from a function or kept in
// a vector keeps working, and its parameters are the same nodes the optimiser holds).
#include <catch2/catch.hpp>

#include <diffuse/models/toy_mlp.hpp>
#include <diffuse/models/unet.hpp>
#include <diffuse/nn/dropout.hpp>
#include <diffuse/nn/embedding.hpp>
#include <diffuse/nn/linear.hpp>
#include <diffuse/nn/sequential.hpp>
#include <diffuse/ops/elementwise.hpp>
#include <diffuse/ops/reduce.hpp>

#include <cstdio>
#include <string>
#include <vector>

using namespace diffuse;

namespace {
std::vector<std::string> names(const Module<float>& m) {
  std::vector<std::string> n;
  for (auto& [k, v] : m.named_parameters()) n.push_back(k);
  return n;
}
std::vector<float> values(const Tensor<float>& t) { return std::vector<float>(t.begin(), t.end()); }

// PyTorch's names for the same container, when the reference is there.
std::vector<std::string> torch_names(const std::string& expr) {
  if (std::string(DIFFUSE_TORCH_PYTHON).empty()) return {};
  const std::string cmd = std::string("'") + DIFFUSE_TORCH_PYTHON + "' -c \"import torch.nn as nn; m = " + expr +
                          "; print(' '.join(k for k, _ in m.named_parameters()))\"";
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p);
  char buf[4096];
  std::string out;
  while (fgets(buf, sizeof buf, p)) out += buf;
  REQUIRE(pclose(p) == 0);
  std::vector<std::string> n;
  for (size_t i = 0, j; i < out.size(); i = j + 1) {
    j = out.find_first_of(" \n", i);
    if (j == std::string::npos) j = out.size();
    if (j > i) n.push_back(out.substr(i, j - i));
  }
  return n;
}

struct Holder : Module<float> {  // a user's model with member children
  Holder(Generator& g) : a(3, 4, g), b(4, 2, g) {
    register_module("a", a);
    register_module("b", b);
  }
  Var<float> operator()(const Var<float>& x) const { return b(silu(a(x))); }
  Linear<float> a, b;
};
Holder make_holder(uint64_t seed) {
  Generator g(seed);
  return Holder(g);  // moved out
}
}  // namespace

TEST_CASE("Sequential: applies its steps in order, names parameters by index as PyTorch does", "[nn]") {
  Generator g(11);
  Sequential<float> seq;
  Linear<float>& l0 = seq.emplace<Linear<float>>(3, 8, g);
  seq.add([](const Var<float>& x) { return silu(x); });
  Linear<float>& l2 = seq.emplace<Linear<float>>(8, 2, g);
  CHECK(seq.size() == 3);
  const std::vector<std::string> want{"0.weight", "0.bias", "2.weight", "2.bias"};
  CHECK(names(seq) == want);
  const auto tn = torch_names("nn.Sequential(nn.Linear(3, 8), nn.SiLU(), nn.Linear(8, 2))");
  if (!tn.empty()) CHECK(tn == want);
  const Var<float> x(Tensor<float>::randn({5, 3}, g));
  CHECK(values(seq(x).value()) == values(l2(silu(l0(x))).value()));
  // Gradients reach every child.
  backward(mse(seq(x), Var<float>(Tensor<float>::randn({5, 2}, g))));
  for (auto& [n, p] : seq.named_parameters()) CHECK(p.has_grad());
  // Moved, it still computes the same and its parameters are the same nodes.
  const auto before = seq.named_parameters();
  const std::vector<float> y = values(seq(x).value());
  Sequential<float> moved = std::move(seq);
  CHECK(values(moved(x).value()) == y);
  CHECK(moved.named_parameters()[0].second.node() == before[0].second.node());
  CHECK(seq.named_parameters().empty());
}

TEST_CASE("ModuleList: indexed children, typed access, PyTorch's names", "[nn]") {
  Generator g(12);
  ModuleList<float> list;
  list.emplace_back<Linear<float>>(2, 3, g);
  list.emplace_back<Embedding<float>>(4, 3, g);
  CHECK(list.size() == 2);
  const std::vector<std::string> want{"0.weight", "0.bias", "1.weight"};
  CHECK(names(list) == want);
  const auto tn = torch_names("nn.ModuleList([nn.Linear(2, 3), nn.Embedding(4, 3)])");
  if (!tn.empty()) CHECK(tn == want);
  CHECK(list.get<Embedding<float>>(1).embedding_dim() == 3);
  CHECK_THROWS_WITH(list.get<Embedding<float>>(0), Catch::Contains("item 0 is of another type"));
}

TEST_CASE("Embedding: rows by index, gradients added into the rows used, a clear error out of range", "[nn]") {
  Generator g(13);
  Embedding<float> e(5, 4, g);
  const Tensor<float> w = e.weight.value();
  const std::vector<int32_t> ids{3, 0, 3};
  const Var<float> out = e(ids);
  REQUIRE(out.shape() == Shape{3, 4});
  for (size_t r = 0; r < ids.size(); ++r)
    for (size_t c = 0; c < 4; ++c) CHECK(out.value()[r * 4 + c] == w[static_cast<size_t>(ids[r]) * 4 + c]);
  // Initialised as N(0, 1): not zeros, spread about 1.
  double sq = 0;
  for (float v : values(w)) sq += double(v) * v;
  CHECK(sq / 20 > 0.3);
  CHECK(sq / 20 < 3.0);
  backward(sum(out));
  const Tensor<float> gr = e.weight.grad();
  for (size_t c = 0; c < 4; ++c) {
    CHECK(gr[3 * 4 + c] == 2.0f);
    CHECK(gr[0 * 4 + c] == 1.0f);
    CHECK(gr[1 * 4 + c] == 0.0f);
  }
  CHECK_THROWS_WITH(e({5}), Catch::Contains("index 5 outside [0, 5)"));
}

TEST_CASE("Dropout and train()/eval(): masks in training with a generator, the identity in eval", "[nn]") {
  Generator g(14);
  Sequential<float> seq;
  Dropout<float>& d = seq.emplace<Dropout<float>>(0.5);
  const Var<float> x(Tensor<float>::randn({64, 16}, g));
  Generator rng(1);
  CHECK(seq.is_training());
  const Tensor<float> y = d(x, &rng).value();
  size_t zeros = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    if (y[i] == 0.0f) ++zeros;
    else CHECK(y[i] == Approx(2.0f * x.value()[i]));  // kept values scaled by 1/(1-p)
  }
  CHECK(zeros > y.size() / 3);
  CHECK(zeros < 2 * y.size() / 3);
  seq.eval();  // reaches the child
  CHECK(!d.is_training());
  CHECK(values(d(x, &rng).value()) == values(x.value()));
  seq.train();
  CHECK(d.is_training());
  CHECK(values(d(x, nullptr).value()) == values(x.value()));  // no generator: no dropout
  CHECK_THROWS_WITH(Dropout<float>(1.0), Catch::Contains("[0, 1)"));
}

TEST_CASE("Modules move: returned from a function, kept in a vector, models with heap children", "[nn]") {
  Generator g(15);
  const Var<float> x(Tensor<float>::randn({4, 3}, g));
  Holder h = make_holder(7);
  Generator g7(7);
  Holder ref(g7);
  CHECK(values(h(x).value()) == values(ref(x).value()));
  CHECK(names(h) == std::vector<std::string>{"a.weight", "a.bias", "b.weight", "b.bias"});
  // Children found at their new place: the parameters are the members' Vars.
  CHECK(h.named_parameters()[0].second.node() == h.a.weight.node());
  std::vector<Holder> many;
  for (uint64_t s = 0; s < 5; ++s) many.push_back(make_holder(s));  // reallocations move them
  for (uint64_t s = 0; s < 5; ++s) {
    Holder r = make_holder(s);
    CHECK(values(many[s](x).value()) == values(r(x).value()));
    CHECK(many[s].named_parameters()[2].second.node() == many[s].b.weight.node());
  }
  // The U-Net (children behind unique_ptrs) and the toy MLP (children in a vector).
  Generator gu(3);
  UNetConfig c = UNetConfig::mnist16("one8");
  c.ch = 8;
  c.groups = 4;
  c.num_classes = 10;
  UNet<float> u(c, gu);
  const Var<float> img(Tensor<float>::randn({2, 16, 16, 1}, g));
  const std::vector<int32_t> t{3, 50}, y{1, 10};
  const std::vector<float> out = values(u(img, t, &y).value());
  const size_t n_params = u.named_parameters().size();
  UNet<float> u2 = std::move(u);
  CHECK(u2.named_parameters().size() == n_params);
  CHECK(values(u2(img, t, &y).value()) == out);
  Generator gm(4);
  ToyMLP<float> m(ToyMLPConfig{}, gm);
  const Var<float> p(Tensor<float>::randn({6, 2}, g));
  const std::vector<int32_t> tt{0, 1, 2, 3, 4, 5};
  const std::vector<float> mo = values(m(p, tt).value());
  std::vector<ToyMLP<float>> ms;
  ms.push_back(std::move(m));
  CHECK(values(ms[0](p, tt).value()) == mo);
}
