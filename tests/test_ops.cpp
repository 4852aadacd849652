// Every op's backward against central finite differences, in double, on fresh random inputs.
#include <catch2/catch.hpp>

#include "gradcheck.hpp"

using namespace diffuse;
using diffuse::testing::max_gradcheck_error;
using diffuse::testing::rand_var;

static constexpr double kTol = 1e-6;

TEST_CASE("gradcheck: add, sub, mul with broadcasting") {
  Generator g(11);
  const std::vector<std::pair<Shape, Shape>> cases = {
      {{3, 4}, {3, 4}}, {{3, 4}, {4}}, {{2, 3, 4}, {3, 1}}, {{5}, {2, 5}}, {{2, 1, 3}, {4, 1}}};
  for (auto& [sa, sb] : cases) {
    auto a = rand_var(sa, g), b = rand_var(sb, g);
    CHECK(max_gradcheck_error([](auto& v) { return add(v[0], v[1]); }, {a, b}, 1) < kTol);
    CHECK(max_gradcheck_error([](auto& v) { return sub(v[0], v[1]); }, {a, b}, 2) < kTol);
    CHECK(max_gradcheck_error([](auto& v) { return mul(v[0], v[1]); }, {a, b}, 3) < kTol);
  }
  // the same input on both sides accumulates both contributions
  auto a = rand_var({3, 2}, g);
  CHECK(max_gradcheck_error([](auto& v) { return mul(v[0], v[0]); }, {a}, 4) < kTol);
}

TEST_CASE("broadcast values match a hand computation") {
  Var<double> a(Tensor<double>::from({1, 2, 3, 4, 5, 6}, {2, 3})), b(Tensor<double>::from({10, 20, 30}, {3}));
  Var<double> c = add(a, b);
  CHECK(c.shape() == Shape{2, 3});
  CHECK(c.value()[4] == 25.0);
  CHECK_THROWS_WITH(add(a, Var<double>(Tensor<double>::zeros({2}))), Catch::Contains("incompatible shapes"));
}

TEST_CASE("gradcheck: matmul and linear") {
  Generator g(12);
  auto a = rand_var({4, 5}, g), b = rand_var({5, 3}, g);
  CHECK(max_gradcheck_error([](auto& v) { return matmul(v[0], v[1]); }, {a, b}, 5) < kTol);
  auto x = rand_var({6, 5}, g), w = rand_var({3, 5}, g), bias = rand_var({3}, g);
  CHECK(max_gradcheck_error([](auto& v) { return linear(v[0], v[1], v[2]); }, {x, w, bias}, 6) < kTol);
  CHECK(max_gradcheck_error([](auto& v) { return linear(v[0], v[1]); }, {x, w}, 7) < kTol);
  // values: linear equals matmul with the transposed weight plus the bias
  NoGrad ng;
  Var<double> y = linear(x, w, bias);
  double ref = bias.value()[1];
  for (int k = 0; k < 5; ++k) ref += x.value()[2 * 5 + k] * w.value()[1 * 5 + k];
  CHECK(y.value()[2 * 3 + 1] == Approx(ref).epsilon(1e-12));
}

TEST_CASE("gradcheck: fused linear_act and linear_gather_act") {
  Generator g(21);
  for (int64_t in : {2, 7}) {  // 2 takes the small-inner-dimension path
    auto x = rand_var({6, in}, g), w = rand_var({5, in}, g), b = rand_var({5}, g), tab = rand_var({3, 5}, g);
    const std::vector<int32_t> idx{2, 0, 1, 2, 2, 0};
    for (Activation a : {Activation::SiLU, Activation::ReLU, Activation::None}) {
      INFO("in " << in << " activation " << static_cast<int>(a));
      CHECK(max_gradcheck_error([a](auto& v) { return linear_act(v[0], v[1], v[2], a); }, {x, w, b}, 30) < kTol);
      CHECK(max_gradcheck_error([a, &idx](auto& v) { return linear_gather_act(v[0], v[1], v[2], v[3], idx, a); },
                                {x, w, b, tab}, 31) < kTol);
      NoGrad ng;  // values equal the unfused composition
      Var<double> fused = linear_gather_act(x, w, b, tab, idx, a);
      Var<double> ref = activate(add(linear(x, w, b), gather_rows(tab, idx)), a);
      for (size_t i = 0; i < ref.value().size(); ++i) CHECK(fused.value()[i] == Approx(ref.value()[i]).margin(1e-12));
    }
  }
}

TEST_CASE("fused linear_act matches the unfused ops on a size that runs in parallel") {
  // 2*N*in*out well above the threshold at which the rows are split between threads.
  Generator g(22);
  const int64_t N = 1000, in = 96, out = 80;
  Var<float> x(Tensor<float>::randn({N, in}, g), true), w(Tensor<float>::randn({out, in}, g), true),
      b(Tensor<float>::randn({out}, g), true), R(Tensor<float>::randn({N, out}, g));
  auto grads = [&](bool fused) {
    for (Var<float>* v : {&x, &w, &b}) v->zero_grad();
    Var<float> y = fused ? linear_act(x, w, b, Activation::SiLU) : silu(linear(x, w, b));
    backward(sum(mul(y, R)));
    return std::vector<Tensor<float>>{y.value().clone(), x.grad().clone(), w.grad().clone(), b.grad().clone()};
  };
  auto f = grads(true), u = grads(false);
  for (size_t k = 0; k < f.size(); ++k) {
    double num = 0, den = 0;
    for (size_t i = 0; i < f[k].size(); ++i) {
      num += std::pow(double(f[k][i]) - u[k][i], 2);
      den += std::pow(double(u[k][i]), 2);
    }
    INFO("tensor " << k);
    CHECK(std::sqrt(num / den) < 1e-5);
  }
}

TEST_CASE("gradcheck: silu and relu") {
  Generator g(13);
  auto a = rand_var({7, 3}, g);
  CHECK(max_gradcheck_error([](auto& v) { return silu(v[0]); }, {a}, 8) < kTol);
  for (double& v : a.value()) if (std::abs(v) < 1e-3) v = 0.5;  // relu is not differentiable at 0
  CHECK(max_gradcheck_error([](auto& v) { return relu(v[0]); }, {a}, 9) < kTol);
}

TEST_CASE("gradcheck: concat, slice, gather_rows, reshape, scale") {
  Generator g(14);
  auto a = rand_var({3, 2}, g), b = rand_var({3, 4}, g), c = rand_var({2, 4}, g);
  CHECK(max_gradcheck_error([](auto& v) { return concat<double>({v[0], v[1]}, 1); }, {a, b}, 10) < kTol);
  CHECK(max_gradcheck_error([](auto& v) { return concat<double>({v[0], v[1]}, 0); }, {b, c}, 11) < kTol);
  CHECK(max_gradcheck_error([](auto& v) { return slice(v[0], 1, 1, 3); }, {b}, 12) < kTol);
  CHECK(max_gradcheck_error([](auto& v) { return gather_rows(v[0], {2, 0, 2, 1, 2}); }, {b}, 13) < kTol);
  CHECK(max_gradcheck_error([](auto& v) { return reshape(v[0], {4, 3}); }, {b}, 14) < kTol);
  CHECK(max_gradcheck_error([](auto& v) { return scale(v[0], 2.5); }, {b}, 15) < kTol);
}

TEST_CASE("gradcheck: sum, mean, mse") {
  Generator g(15);
  auto a = rand_var({4, 3}, g), b = rand_var({4, 3}, g);
  CHECK(max_gradcheck_error([](auto& v) { return sum(v[0]); }, {a}, 16) < kTol);
  CHECK(max_gradcheck_error([](auto& v) { return mean(v[0]); }, {a}, 17) < kTol);
  CHECK(max_gradcheck_error([](auto& v) { return mse(v[0], v[1]); }, {a, b}, 18) < kTol);
}

TEST_CASE("gradcheck: ToyMLP, split first layer and literal concat agree") {
  Generator g(16);
  ToyMLPConfig cfg;
  cfg.hidden = 8;
  cfg.temb_dim = 8;
  ToyMLP<double> m(cfg, g);
  auto x = rand_var({5, 2}, g);
  std::vector<int32_t> t = {3, 0, 3, 7, 1};
  std::vector<Var<double>> in = {x};
  for (auto& [n, p] : m.named_parameters()) in.push_back(p);
  CHECK(max_gradcheck_error([&](auto& v) { return m(v[0], t); }, in, 19) < kTol);
  NoGrad ng;
  Tensor<double> fast = m(x, t).value().clone();
  m.split_first_layer = false;
  Tensor<double> slow = m(x, t).value();
  for (size_t i = 0; i < fast.size(); ++i) CHECK(fast[i] == Approx(slow[i]).epsilon(1e-12));
  CHECK(m.named_parameters()[0].first == "net.0.weight");
  CHECK(m.named_parameters().back().first == "net.6.bias");
}

TEST_CASE("ToyMLP of the reference has 50,050 parameters") {
  Generator g(1);
  ToyMLP<float> m(ToyMLPConfig{}, g);
  CHECK(m.num_parameters() == 50050);
}

TEST_CASE("NoGrad records nothing") {
  Generator g(17);
  auto a = rand_var({3, 3}, g);
  Tape<double>::current().clear();
  {
    NoGrad ng;
    Var<double> b = silu(a);
    CHECK_FALSE(b.requires_grad());
  }
  CHECK(Tape<double>::current().size() == 0);
}

TEST_CASE("backward(loss, leaf_done) names each leaf once, after its last use, with its final gradient") {
  Generator g(23);
  auto w = rand_var({3, 3}, g), b = rand_var({1, 3}, g), x = rand_var({4, 3}, g);
  Var<double> c(Tensor<double>::randn({4, 3}, g));  // a constant: no gradient, never named
  // w is read twice (two matmuls), b once, x once at the start: each named when its last reader ran.
  auto loss_of = [&] { return sum(mul(add(matmul(silu(matmul(x, w)), w), b), c)); };
  Tape<double>::current().clear();
  Var<double> loss = loss_of();
  std::vector<std::pair<const Node<double>*, Tensor<double>>> named;
  backward(loss, [&](const Node<double>* n) { named.emplace_back(n, n->grad.clone()); });
  REQUIRE(named.size() == 3);
  // A later reader runs earlier in the backward: b (read last) first, x (read first) last.
  CHECK(named[0].first == b.node());
  CHECK(named[2].first == x.node());
  CHECK(named[1].first == w.node());
  for (auto& [n, grad_then] : named) {  // nothing was added after the call
    const Tensor<double>& now = n->grad;
    CHECK(std::equal(now.begin(), now.end(), grad_then.begin()));
  }
  // The same gradients as without the hook.
  std::vector<Tensor<double>> with_hook{w.grad().clone(), b.grad().clone(), x.grad().clone()};
  for (auto* v : {&w, &b, &x}) v->zero_grad();
  backward(loss_of());
  CHECK(std::equal(w.grad().begin(), w.grad().end(), with_hook[0].begin()));
  CHECK(std::equal(b.grad().begin(), b.grad().end(), with_hook[1].begin()));
  CHECK(std::equal(x.grad().begin(), x.grad().end(), with_hook[2].begin()));
  // An op recorded without its inputs: the tape cannot tell when a leaf is final, so it names none.
  Var<double> y = mul(w, w);
  Var<double> z(y.value().clone(), true);
  Tape<double>::current().record(z.node_ptr(), [y](const Tensor<double>& gz) { (void)gz; });
  int calls = 0;
  backward(sum(z), [&](const Node<double>*) { ++calls; });
  CHECK(calls == 0);
}
