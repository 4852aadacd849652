// Schedules against closed forms, q_sample statistics, samplers, optimisers,
// checkpoints and exact resume.
#include <catch2/catch.hpp>

#include <diffuse/diffuse.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <tuple>
#include <vector>

using namespace diffuse;

TEST_CASE("linear schedule matches the closed forms") {
  for (int T : {1000, 200, 50}) {
    auto s = NoiseSchedule::linear(T);
    const double b0 = 1e-4 * 1000.0 / T, b1 = 0.02 * 1000.0 / T;
    CHECK(s.beta.front() == Approx(b0).epsilon(1e-14));
    CHECK(s.beta.back() == Approx(b1).epsilon(1e-14));
    double prod = 1;
    for (int t = 0; t < T; ++t) {
      const double bt = b0 + (b1 - b0) * t / (T - 1);
      REQUIRE(s.beta[t] == Approx(bt).epsilon(1e-13));
      const double prev = prod;
      prod *= 1 - bt;
      REQUIRE(s.abar[t] == Approx(prod).epsilon(1e-12));
      REQUIRE(s.posterior_variance[t] == Approx(bt * (1 - prev) / (1 - prod)).epsilon(1e-12).margin(1e-300));
    }
    CHECK(s.posterior_variance[0] == 0.0);
    CHECK(s.abar.back() < 1e-3);  // ends near pure noise at any T
  }
}

TEST_CASE("cosine schedule matches the closed form and clips at 0.999") {
  const int T = 100;
  auto s = NoiseSchedule::cosine(T);
  auto f = [&](double t) { double c = std::cos((t / T + 0.008) / 1.008 * M_PI / 2); return c * c; };
  for (int t = 0; t < T - 1; ++t) REQUIRE(s.abar[t] == Approx(f(t + 1) / f(0)).epsilon(1e-10));
  CHECK(s.beta.back() == 0.999);
  CHECK_THROWS(NoiseSchedule::by_name("sigmoidx", 10));
}

TEST_CASE("q_sample has the right mean and variance") {
  auto s = NoiseSchedule::linear(200);
  Generator g(3);
  const int B = 4, n = 50000;
  Tensor<double> x0 = Tensor<double>::full({B, n}, 1.5);
  std::vector<int32_t> t = {0, 50, 120, 199};
  Tensor<double> eps = Tensor<double>::randn({B, n}, g);
  Tensor<double> xt = q_sample(s, x0, t, eps);
  for (int b = 0; b < B; ++b) {
    double m = 0, v = 0;
    for (int i = 0; i < n; ++i) m += xt[b * n + i];
    m /= n;
    for (int i = 0; i < n; ++i) v += (xt[b * n + i] - m) * (xt[b * n + i] - m);
    v /= n - 1;
    const double sd = std::sqrt(1 - s.abar[t[b]]);
    CHECK(m == Approx(1.5 * s.sqrt_abar[t[b]]).margin(5 * sd / std::sqrt(n)));
    CHECK(v == Approx(1 - s.abar[t[b]]).epsilon(0.03));
  }
}

// Data = the constant c, so the exact eps given x_t is (x_t - sqrt(abar_t) c) / sqrt(1 - abar_t)
// and every sampler step is a closed form in x_t and the step's noise z. The tests replay the
// sampler's draws (x_T first, then one draw per noisy step, from a copy of its generator) and
// check every step to 1e-12 in double: the answer is exact, so the tolerance is rounding only
// (values O(1), a few dozen operations per step). The coefficients are written here from the
// papers with abar alone, not taken from the schedule's posterior fields.
namespace {
EpsModel<double> point_mass_oracle(const NoiseSchedule& s, double c) {
  return [&s, c](const Tensor<double>& x, const std::vector<int32_t>& t) {
    Tensor<double> e(x.shape());
    const int64_t row = x.numel() / x.size(0);
    for (size_t i = 0; i < x.size(); ++i) {
      const double ab = s.abar[static_cast<size_t>(t[i / static_cast<size_t>(row)])];
      e[i] = (x[i] - std::sqrt(ab) * c) / std::sqrt(1 - ab);
    }
    return e;
  };
}
double max_abs_diff(const Tensor<double>& a, const Tensor<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}
}  // namespace

TEST_CASE("DDPM with an exact point-mass denoiser takes the closed-form posterior step, for each variance") {
  // Ho et al. eq. 7: x_{t-1} = c1 x0 + c2 x_t + sigma_t z with x0 = c, c1 = sqrt(abar_{t-1}) beta_t /
  // (1 - abar_t), c2 = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t); sigma_t^2 = beta_t (1 -
  // abar_{t-1}) / (1 - abar_t) ("small") or beta_t ("large"); no noise at t = 0, which lands on c.
  const NoiseSchedule s = NoiseSchedule::linear(100);
  const double c = 0.7;
  const EpsModel<double> oracle = point_mass_oracle(s, c);
  for (const Variance v : {Variance::FixedSmall, Variance::FixedLarge})
    for (const bool clip : {false, true}) {
      INFO((v == Variance::FixedSmall ? "small" : "large") << (clip ? ", x0 clipped" : ""));
      SampleOptions o;
      o.variance = v;
      o.clip_x0 = clip;
      Generator g(5), replay(5);
      const Shape shape{64, 2};
      Tensor<double> expect = Tensor<double>::randn(shape, replay);
      int calls = 0;
      double worst = 0;
      const Tensor<double> x = ddpm_sample<double>(s, oracle, shape, g, o, [&](int t, const Tensor<double>& xt) {
        ++calls;
        if (t < s.T()) {
          const double ab = s.abar[t], abp = t > 0 ? s.abar[t - 1] : 1.0, beta = 1 - ab / abp;
          const double c1 = std::sqrt(abp) * beta / (1 - ab), c2 = std::sqrt(1 - beta) * (1 - abp) / (1 - ab);
          const double sigma = t == 0 ? 0.0 : std::sqrt(v == Variance::FixedSmall ? beta * (1 - abp) / (1 - ab) : beta);
          Tensor<double> z;
          if (t > 0) z = Tensor<double>::randn(shape, replay);
          for (size_t i = 0; i < expect.size(); ++i) expect[i] = c1 * c + c2 * expect[i] + (t > 0 ? sigma * z[i] : 0.0);
        }
        worst = std::max(worst, max_abs_diff(xt, expect));
      });
      CHECK(calls == 101);
      CHECK(worst < 1e-12);
      for (double xi : x) CHECK(std::abs(xi - c) < 1e-12);
    }
}

TEST_CASE("DDIM with an exact point-mass denoiser takes the closed-form step, for eta 0, 0.5 and 1") {
  // Song et al. eq. 12 and 16: x_p = sqrt(abar_p) x0 + sqrt(1 - abar_p - sigma^2) eps + sigma z with
  // sigma = eta sqrt((1 - abar_p) / (1 - abar_t)) sqrt(1 - abar_t / abar_p), p the previous kept
  // timestep (abar_p = 1 after the last). Uniform and trailing spacing, 10 of 100 steps.
  const NoiseSchedule s = NoiseSchedule::linear(100);
  const double c = -0.4;
  const EpsModel<double> oracle = point_mass_oracle(s, c);
  for (const double eta : {0.0, 0.5, 1.0})
    for (const Spacing sp : {Spacing::Uniform, Spacing::Trailing}) {
      INFO("eta " << eta << (sp == Spacing::Uniform ? ", uniform" : ", trailing"));
      SampleOptions o;
      o.steps = 10;
      o.eta = eta;
      o.spacing = sp;
      const std::vector<int> ts = sample_timesteps(s.T(), 10, sp);
      Generator g(9), replay(9);
      const Shape shape{32, 3};
      Tensor<double> expect = Tensor<double>::randn(shape, replay);
      double worst = 0;
      int noisy = 0;
      const Tensor<double> x = ddim_sample<double>(s, oracle, shape, g, o, [&](int i, const Tensor<double>& xt) {
        if (i < static_cast<int>(ts.size())) {
          const double ab = s.abar[ts[i]], abp = i > 0 ? s.abar[ts[i - 1]] : 1.0;
          const double sigma = eta * std::sqrt((1 - abp) / (1 - ab)) * std::sqrt(1 - ab / abp);
          Tensor<double> z;
          if (sigma > 0) {
            z = Tensor<double>::randn(shape, replay);
            ++noisy;
          }
          for (size_t k = 0; k < expect.size(); ++k) {
            const double e = (expect[k] - std::sqrt(ab) * c) / std::sqrt(1 - ab);
            expect[k] = std::sqrt(abp) * c + std::sqrt(std::max(0.0, 1 - abp - sigma * sigma)) * e + (sigma > 0 ? sigma * z[k] : 0.0);
          }
        }
        worst = std::max(worst, max_abs_diff(xt, expect));
      });
      CHECK(worst < 1e-12);
      CHECK(noisy == (eta > 0 ? 9 : 0));  // every step but the last (abar_p = 1) adds noise when eta > 0
      for (double xi : x) CHECK(std::abs(xi - c) < 1e-12);
    }
  CHECK(ddim_timesteps(200, 50)[1] == 4);
  CHECK_THROWS(ddim_timesteps(10, 11));
}

TEST_CASE("Adam matches a hand-computed first step; clipping and EMA") {
  Var<double> p(Tensor<double>::from({1.0, -2.0}, {2}), true);
  NamedParams<double> ps = {{"p", p}};
  AdamOptions o;
  o.lr = 0.1;
  Adam<double> opt(ps, o);
  backward(sum(mul(p, p)));  // grad = 2p
  opt.step();
  // first step of bias-corrected Adam moves each weight by lr * sign(g) (up to eps)
  CHECK(p.value()[0] == Approx(0.9).epsilon(1e-6));
  CHECK(p.value()[1] == Approx(-1.9).epsilon(1e-6));
  opt.zero_grad();
  backward(sum(scale(p, 3.0)));  // grad = (3, 3), norm 4.243
  CHECK(clip_grad_norm(ps, 1.0) == Approx(std::sqrt(18.0)));
  CHECK(p.grad()[0] == Approx(3.0 / std::sqrt(18.0)).epsilon(1e-5));
  EMA<double> ema(ps, 0.5, false);
  p.value()[0] = 2.9;
  ema.update();
  CHECK(ema.shadow()[0][0] == Approx(0.5 * 0.9 + 0.5 * 2.9));
  CHECK(warmup_lr(1.0, 0, 10) == Approx(0.1));
  CHECK(warmup_lr(1.0, 50, 10) == 1.0);
}

namespace {
struct Run {
  Generator init{7};
  ToyMLP<float> model{ToyMLPConfig{2, 32, 2, 16, Activation::SiLU}, init};
  Adam<float> opt{model.named_parameters(), AdamOptions{}};
  EMA<float> ema{model.named_parameters(), 0.99};
  NoiseSchedule sched = NoiseSchedule::linear(50);
  Generator rng{42};
  int64_t step = 0;
  void train(int n) {
    for (int i = 0; i < n; ++i, ++step) {
      Tensor<float> x0 = Tensor<float>::randn({64, 2}, rng);
      auto nb = make_noised_batch(sched, x0, rng);
      opt.zero_grad();
      backward(epsilon_loss<float>([&](const Var<float>& x, const std::vector<int32_t>& t) { return model(x, t); }, nb));
      clip_grad_norm(opt.params(), 1.0);
      opt.step();
      ema.update();
    }
  }
};
}  // namespace

TEST_CASE("checkpoint resume is bit-exact") {
  const std::string path = (std::filesystem::temp_directory_path() / "diffuse_test_resume.safetensors").string();
  Run straight;
  straight.train(30);
  Run first;
  first.train(12);
  save_checkpoint(path, first.model, &first.opt, &first.ema, first.step, first.rng);
  Run second;
  TrainState st = load_checkpoint(path, second.model, &second.opt, &second.ema);
  second.step = st.step;
  second.rng = st.rng;
  CHECK(second.step == 12);
  second.train(18);
  auto a = straight.model.named_parameters(), b = second.model.named_parameters();
  for (size_t k = 0; k < a.size(); ++k)
    REQUIRE(std::memcmp(a[k].second.value().data(), b[k].second.value().data(), a[k].second.value().size() * 4) == 0);
  for (size_t k = 0; k < a.size(); ++k)
    REQUIRE(std::memcmp(straight.ema.shadow()[k].data(), second.ema.shadow()[k].data(), a[k].second.value().size() * 4) == 0);
  std::remove(path.c_str());
}

TEST_CASE("safetensors round trip and clear errors") {
  const std::string path = (std::filesystem::temp_directory_path() / "diffuse_test_st.safetensors").string();
  Generator g(9);
  Tensor<float> a = Tensor<float>::randn({3, 5}, g);
  Tensor<double> b = Tensor<double>::randn({7}, g);
  safetensors::Writer w;
  w.add("a.weight", a);
  w.add("b", b);
  w.metadata["hello"] = "world";
  w.write(path);
  CHECK_FALSE(std::filesystem::exists(path + ".tmp"));
  auto f = safetensors::File::read(path);
  CHECK(f.metadata().at("hello") == "world");
  Tensor<float> a2 = f.tensor<float>("a.weight");
  CHECK(std::memcmp(a.data(), a2.data(), a.size() * 4) == 0);
  CHECK(f.tensor<double>("b")[6] == b[6]);
  CHECK_THROWS_WITH(f.at("c"), Catch::Contains("no tensor 'c'"));
  Shape wrong{5, 3};
  CHECK_THROWS_WITH(f.tensor<float>("a.weight", &wrong), Catch::Contains("expected [5, 3]"));
  // a truncated file is refused with a one-line reason
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 4);
  CHECK_THROWS_WITH(safetensors::File::read(path), Catch::Contains("not a valid safetensors file"));
  {
    std::ofstream o(path, std::ios::binary);
    o << "abc";
  }
  CHECK_THROWS_WITH(safetensors::File::read(path), Catch::Contains("shorter than"));
  CHECK_THROWS_WITH(safetensors::File::read(path + ".missing"), Catch::Contains("cannot open"));
  std::remove(path.c_str());
}

namespace {
// A safetensors file written byte by byte: the 8-byte header length, the JSON header, the data.
void write_raw_safetensors(const std::string& path, const std::string& header, size_t data_bytes) {
  std::ofstream o(path, std::ios::binary);
  const uint64_t n = header.size();
  o.write(reinterpret_cast<const char*>(&n), 8);
  o << header;
  const std::vector<char> zeros(data_bytes, 0);
  o.write(zeros.data(), static_cast<std::streamsize>(zeros.size()));
}
}  // namespace

TEST_CASE("safetensors and checkpoint files that contradict themselves are refused, naming the problem") {
  const std::string path = (std::filesystem::temp_directory_path() / "diffuse_test_bad.safetensors").string();
  INFO(path);
  const auto error_of = [&] {
    try {
      safetensors::File::read(path);
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  // Two tensors sharing bytes.
  write_raw_safetensors(path, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12);
  CHECK_THAT(error_of(), Catch::Contains("tensors 'a' and 'b' overlap") && Catch::Contains(path));
  // One name twice (JSON would keep the second silently).
  write_raw_safetensors(path, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 16);
  CHECK_THAT(error_of(), Catch::Contains("tensor 'a' is named twice"));
  // A shape whose element count wraps around 2^64 to match zero bytes.
  write_raw_safetensors(path, R"({"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}})", 0);
  CHECK_THAT(error_of(), Catch::Contains("0 bytes for shape"));
  // Bytes that belong to no tensor: a hole between two, or data after the last.
  write_raw_safetensors(path, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})", 20);
  CHECK_THAT(error_of(), Catch::Contains("bytes 8 to 12 before tensor 'b' belong to no tensor"));
  write_raw_safetensors(path, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 16);
  CHECK_THAT(error_of(), Catch::Contains("8 bytes after the last tensor belong to no tensor"));
  // Adjacent tensors and an empty one are fine.
  write_raw_safetensors(path, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"e":{"dtype":"F32","shape":[0],"data_offsets":[8,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 16);
  CHECK(error_of() == "(no error)");

  // Checkpoints: metadata numbers parsed strictly, and every tensor accounted for.
  Generator g(2);
  ToyMLP<float> m(ToyMLPConfig{2, 16, 3, 8, Activation::SiLU}, g);
  // The model's state as a checkpoint; extra: one more tensor the model does not have; as_int: the
  // first parameter stored as I32 (the Writer keeps pointers: state and ints outlive write()).
  const auto write_ckpt = [&](const safetensors::Metadata& meta, const std::string& extra = "", bool as_int = false) {
    const auto state = m.state_dict();
    const std::vector<int32_t> ints(static_cast<size_t>(state.front().second.numel()), 1);
    safetensors::Writer w;
    for (const auto& [name, t] : state)
      if (as_int && name == state.front().first)
        w.add_raw(name, safetensors::DType::I32, t.shape(), ints.data(), ints.size() * sizeof(int32_t));
      else
        w.add(name, t);
    if (!extra.empty()) w.add(extra, Tensor<float>::zeros({2}));
    w.metadata = meta;
    w.write(path);
  };
  const safetensors::Metadata good = {{"format", kCheckpointFormat}, {"step", "12"}, {"rng.seed", "1"}, {"rng.offset", "0"}};
  const auto load_error = [&] {
    try {
      load_checkpoint<float>(path, m, nullptr, nullptr);
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  write_ckpt(good);
  CHECK(load_error() == "(no error)");
  for (const auto& [key, value, message] : std::vector<std::tuple<std::string, std::string, std::string>>{
           {"step", "12abc", "metadata 'step' is '12abc', not a whole number"},
           {"step", "", "metadata 'step' is '', not a whole number"},
           {"step", "-3", "metadata 'step' is negative"},
           {"rng.seed", "-1", "metadata 'rng.seed' is '-1', not a whole number"},
           {"rng.offset", "99999999999999999999999", "not a whole number in range"}}) {
    INFO(key << " = '" << value << "'");
    safetensors::Metadata bad = good;
    bad[key] = value;
    write_ckpt(bad);
    CHECK_THAT(load_error(), Catch::Contains(message) && Catch::Contains(path));
  }
  safetensors::Metadata missing = good;
  missing.erase("step");
  write_ckpt(missing);
  CHECK_THAT(load_error(), Catch::Contains("has no metadata 'step'"));
  write_ckpt(good, "net.99.weight");
  CHECK_THAT(load_error(), Catch::Contains("has tensor 'net.99.weight' that the model does not have"));
  write_ckpt(good, "", true);
  CHECK_THAT(load_error(), Catch::Contains("has dtype I32, expected F32 or F64"));
  // A NaN weight, an infinite EMA weight, a negative second moment: refused, naming the tensor.
  {
    const auto state = m.state_dict();
    const std::string first = state.front().first;
    Tensor<float> nan_w = state.front().second.clone();
    nan_w[3] = std::nanf("");
    safetensors::Writer w;
    for (const auto& [name, t] : state) w.add(name, name == first ? nan_w : t);
    w.metadata = good;
    w.write(path);
    CHECK_THAT(load_error(), Catch::Contains("tensor '" + first + "' has a non-finite value at element 3"));
  }
  {
    Adam<float> opt(m.named_parameters(), AdamOptions{});
    EMA<float> ema(m.named_parameters(), 0.9);
    save_checkpoint(path, m, &opt, &ema, 5, Generator(3));
    CHECK_NOTHROW(load_checkpoint<float>(path, m, &opt, &ema));
    const safetensors::File f = safetensors::File::read(path);
    for (const std::string& key : {std::string("ema.") + m.named_parameters().front().first,
                                  std::string("optim.exp_avg_sq.") + m.named_parameters().front().first}) {
      INFO(key);
      safetensors::Writer w;
      std::vector<Tensor<float>> kept;
      for (const std::string& name : f.names()) {
        Tensor<float> t = f.tensor<float>(name);
        if (name == key) t[0] = key[0] == 'e' ? INFINITY : -1.0f;
        kept.push_back(t);
        w.add(name, kept.back());
      }
      w.metadata = f.metadata();
      w.write(path);
      CHECK_THROWS_WITH(load_checkpoint<float>(path, m, &opt, &ema),
                        Catch::Contains("tensor '" + key + "' has a " + (key[0] == 'e' ? "non-finite" : "negative") +
                                        " value at element 0"));
    }
  }
  safetensors::Writer twice;
  twice.add("a", Tensor<float>::zeros({2}));
  CHECK_THROWS_WITH(twice.add("a", Tensor<float>::zeros({2})), Catch::Contains("duplicate tensor name 'a'"));
  std::remove(path.c_str());
}

TEST_CASE("loading weights into a model of another shape names the tensor") {
  const std::string path = (std::filesystem::temp_directory_path() / "diffuse_test_w.safetensors").string();
  Generator g(1);
  ToyMLP<float> small(ToyMLPConfig{2, 16, 3, 8, Activation::SiLU}, g), big(ToyMLPConfig{}, g);
  save_checkpoint<float>(path, small, nullptr, nullptr, 0, g);
  CHECK_THROWS_WITH(load_checkpoint<float>(path, big, nullptr, nullptr),
                    Catch::Contains("net.0.weight"));
  std::remove(path.c_str());
}
