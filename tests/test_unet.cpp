// The DDPM U-Net: parameter counts of the reference configurations, names and
// shapes, finite-difference gradients of a tiny model in double, and parity
// with the PyTorch reference (tests/torch/unet_ref.py) both ways: diffuse's
// weights run in PyTorch give the same output and gradients, and PyTorch's
// weights loaded into diffuse give the same output.
#include <catch2/catch.hpp>

#include "kernel_seed.hpp"

#include <diffuse/diffuse.hpp>
#include <diffuse/models/unet.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <string>

#include "gradcheck.hpp"
#include "compare.hpp"
#include "skip.hpp"

using namespace diffuse;
namespace fs = std::filesystem;

using diffuse::testing::rel_err;
using diffuse::testing::float_sums_tolerance;

namespace {

template <class T>
void randomise(const Module<T>& m, Generator& g, T scale) {
  for (auto& [name, p] : m.named_parameters()) {
    g.normal(p.value().data(), p.value().size());
    for (T& v : p.value()) v *= scale;
  }
}

std::string cfg_json(const UNetConfig& c) {
  nlohmann::json j = {{"in_ch", c.in_ch},
                      {"out_ch", c.out_ch},
                      {"ch", c.ch},
                      {"ch_mult", c.ch_mult},
                      {"num_res_blocks", c.num_res_blocks},
                      {"attn_resolutions", c.attn_resolutions},
                      {"dropout", c.dropout},
                      {"groups", c.groups},
                      {"resolution", c.resolution},
                      {"mid_attn", c.mid_attn},
                      {"attn_only_first", c.attn_only_first},
                      {"num_classes", c.num_classes}};
  return j.dump();
}

int run_python(const std::string& args) {
  const std::string cmd =
      std::string("cd '") + DIFFUSE_SOURCE_DIR + "/tests/torch' && '" + DIFFUSE_TORCH_PYTHON + "' unet_ref.py " + args;
  return std::system(cmd.c_str());
}

// The configurations compared with PyTorch: MNIST16 with attention after every
// 8x8 block, the CIFAR-10 layout at a quarter of its width, and the
// class-conditional MNIST16 of the MNIST trainer (10 digits + the null class).
std::vector<std::pair<std::string, UNetConfig>> parity_configs() {
  UNetConfig cifar = UNetConfig::cifar10();
  cifar.ch = 32;
  cifar.groups = 8;
  UNetConfig cond = UNetConfig::mnist16("none");
  cond.num_classes = 10;
  return {{"mnist16-ho8", UNetConfig::mnist16("ho8")}, {"cifar10-ch32", cifar}, {"mnist16-classes", cond}};
}


// The widest sum of the U-Net: a 3x3 convolution over an up block's input, its own width and the
// skip's (at most 2 ch max(ch_mult) channels).
double unet_widest_sum(const UNetConfig& c) {
  return 9.0 * 2 * c.ch * double(*std::max_element(c.ch_mult.begin(), c.ch_mult.end()));
}

// The longest chain of sums from input to output, about: conv_in and conv_out; two convolutions
// per residual block and three sums per attention block (q/k/v, the scores, the weighted values
// and the projection, counted as three chained layers); a down- or upsampling convolution per
// level but the last; the middle's two blocks and its attention.
double unet_depth(const UNetConfig& c) {
  const int64_t L = static_cast<int64_t>(c.ch_mult.size());
  double d = 2 + 4 + (c.mid_attn ? 3 : 0);
  for (int64_t i = 0, r = c.resolution; i < L; ++i, r /= 2) {
    const bool attn = std::find(c.attn_resolutions.begin(), c.attn_resolutions.end(), r) != c.attn_resolutions.end();
    d += double(2 * c.num_res_blocks + 1) * (2 + (attn ? 3 : 0)) + (i + 1 < L ? 2 : 0);
  }
  return d;
}
}  // namespace

TEST_CASE("UNet parameter counts match the reference") {
  Generator g(0);
  CHECK(UNet<float>(UNetConfig::mnist16("none"), g).num_parameters() == 1522561);
  CHECK(UNet<float>(UNetConfig::mnist16("one8"), g).num_parameters() == 1539329);
  CHECK(UNet<float>(UNetConfig::mnist16("ho8"), g).num_parameters() == 1606401);
  CHECK(UNet<float>(UNetConfig::cifar10(), g).num_parameters() == 35746307);
}

TEST_CASE("UNet parameter names follow the reference modules") {
  Generator g(0);
  UNet<float> m(UNetConfig::mnist16("one8"), g);
  std::set<std::string> names;
  for (auto& [n, p] : m.named_parameters()) names.insert(n);
  for (const char* n : {"temb.0.weight", "temb.2.bias", "conv_in.weight", "down.0.0.norm1.weight", "down.2.0.skip.weight",
                        "down.2.1.q.weight", "downsample.1.conv.bias", "mid1.conv2.weight", "up.0.0.skip.weight",
                        "up.8.0.temb_proj.weight", "upsample.1.conv.weight", "norm_out.bias", "conv_out.weight"})
    CHECK(names.count(n) == 1);
  CHECK(names.count("down.3.1.q.weight") == 0);  // "one8": a single attention block
  CHECK(names.count("mid_attn.q.weight") == 0);
}

TEST_CASE("UNet output shape, and a clear error for a wrong input") {
  Generator g(1);
  UNet<float> m(UNetConfig::mnist16("none"), g);
  NoGrad ng;
  Var<float> x(Tensor<float>::randn({3, 16, 16, 1}, g));
  CHECK(m(x, {0, 5, 199}).shape() == Shape{3, 16, 16, 1});
  Var<float> bad(Tensor<float>::randn({3, 1, 16, 16}, g));
  CHECK_THROWS_WITH(m(bad, {0, 5, 199}), Catch::Contains("expected [B, 16, 16, 1]"));
}

TEST_CASE("gradcheck: a tiny UNet with attention and class conditioning, in double") {
  UNetConfig c;
  c.in_ch = 2;
  c.out_ch = 2;
  c.ch = 4;
  c.ch_mult = {1, 2};
  c.num_res_blocks = 1;
  c.attn_resolutions = {2};
  c.groups = 2;
  c.resolution = 4;
  c.mid_attn = true;
  c.num_classes = 3;
  Generator g(7);
  UNet<double> m(c, g);
  randomise(m, g, 0.3);
  auto x = diffuse::testing::rand_var({2, 4, 4, 2}, g);
  const std::vector<int32_t> t{3, 150}, y{1, 3};
  std::vector<Var<double>> in{x};
  for (auto& [name, p] : m.named_parameters())
    if (name == "conv_in.weight" || name == "down.1.1.q.weight" || name == "mid_attn.k.bias" || name == "class_emb.weight" ||
        name == "temb.0.weight" || name == "up.0.0.norm1.weight" || name == "conv_out.bias")
      in.push_back(p);
  REQUIRE(in.size() == 8);
  CHECK(diffuse::testing::max_gradcheck_error([&](auto&) { return m(x, t, &y); }, in, 11) < 1e-6);
}

TEST_CASE("UNet matches the PyTorch reference, forward and every gradient") {
  if (std::string(DIFFUSE_TORCH_PYTHON).empty()) {
    DIFFUSE_SKIP("no python with torch found at configure time: PyTorch comparison skipped");
  }
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  const fs::path dir = fs::path(DIFFUSE_BINARY_DIR) / "tests" / "torch_parity";
  fs::create_directories(dir);
  // Every configuration's inputs first, then one python launch for all of them.
  struct Ours {
    std::string label, res;
    UNetConfig c;
    Tensor<float> out;
    std::vector<std::pair<std::string, Tensor<float>>> grads;  // PyTorch's layouts
  };
  std::vector<Ours> ours;
  std::string jobs;
  for (auto& [label, c] : parity_configs()) {
    Generator g(seed);
    UNet<float> m(c, g);
    randomise(m, g, 0.05f);
    const int64_t B = 2;
    Var<float> x(Tensor<float>::randn({B, c.resolution, c.resolution, c.in_ch}, g));
    std::vector<int32_t> t(B), y;
    g.randint(t.data(), t.size(), 1000);
    if (c.num_classes > 0) y = {3, static_cast<int32_t>(c.num_classes)};  // a digit and the null class
    m.zero_grad();
    Var<float> out = m(x, t, y.empty() ? nullptr : &y);
    Tensor<float> gy = Tensor<float>::randn(out.shape(), g);
    backward(sum(mul(out, Var<float>(gy))));
    const std::string in = (dir / ("unet_in_" + label + ".safetensors")).string(),
                      res = (dir / ("unet_out_" + label + ".safetensors")).string();
    {
      safetensors::Writer w;
      for (auto& [name, t] : m.state_dict()) w.add(name, t);  // PyTorch's layouts
      w.add("x", nhwc_to_nchw(x.value()));
      w.add("gy", nhwc_to_nchw(gy));
      w.add_raw("t", safetensors::DType::I32, {B}, t.data(), t.size() * sizeof(int32_t));
      if (!y.empty()) w.add_raw("y", safetensors::DType::I32, {B}, y.data(), y.size() * sizeof(int32_t));
      w.write(in);
    }
    jobs += " forward '" + cfg_json(c) + "' '" + in + "' '" + res + "'";
    Ours o{label, res, c, nhwc_to_nchw(out.value()), {}};
    for (auto& [name, p] : m.named_parameters()) o.grads.emplace_back(name, to_torch_layout(p.grad(), p.layout()));
    ours.push_back(std::move(o));
  }
  REQUIRE(run_python(jobs) == 0);
  for (const Ours& o : ours) {
    INFO(o.label);
    const auto ref = safetensors::File::read(o.res);
    // Bounds (float_sums_tolerance): the longest chain is every convolution, attention and
    // linear layer of the model in turn (unet_depth), the widest sum a 3x3 convolution over the
    // widest concatenation (unet_widest_sum); the backward doubles the chain.
    const double Kmax = unet_widest_sum(o.c), depth = unet_depth(o.c);
    const double eo = rel_err(o.out, ref.tensor<float>("out"));
    CHECK(eo < float_sums_tolerance(Kmax, depth));
    // Relative to each parameter's own gradient, except where that is zero up
    // to rounding: the key bias of attention has an exactly zero gradient (a
    // constant added to every key's logit for one query cancels in the
    // softmax), so there the scale is that of all gradients together.
    double total = 0;
    for (auto& [name, a] : o.grads)
      for (float v : ref.tensor<float>("grad." + name)) total += double(v) * v;
    double worst = 0;
    std::string worst_name;
    for (auto& [name, a] : o.grads) {
      const Tensor<float> r = ref.tensor<float>("grad." + name);
      REQUIRE(r.shape() == a.shape());
      double num = 0, den = 0;
      for (size_t i = 0; i < r.size(); ++i) {
        num += (double(a[i]) - r[i]) * (double(a[i]) - r[i]);
        den += double(r[i]) * r[i];
      }
      const double e = std::sqrt(num / std::max(den, 1e-8 * total));
      if (e > worst) worst = e, worst_name = name;
    }
    INFO("worst gradient " << worst_name);
    std::printf("UNet %s vs PyTorch: out %.2g (bound %.2g), worst gradient %.2g (%.2g, %s)\n", o.label.c_str(), eo,
                float_sums_tolerance(Kmax, depth), worst, float_sums_tolerance(Kmax, 2 * depth), worst_name.c_str());
    CHECK(worst < float_sums_tolerance(Kmax, 2 * depth));
  }
}

TEST_CASE("UNet loads weights written by the PyTorch reference") {
  if (std::string(DIFFUSE_TORCH_PYTHON).empty()) {
    DIFFUSE_SKIP("no python with torch found at configure time: PyTorch comparison skipped");
  }
  const fs::path dir = fs::path(DIFFUSE_BINARY_DIR) / "tests" / "torch_parity";
  fs::create_directories(dir);
  const uint64_t seed = diffuse::testing::fresh_seed() % 100000;
  INFO("seed " << seed);
  const int64_t B = 2;
  std::vector<Tensor<float>> xs;
  std::vector<std::vector<int32_t>> ys;
  std::string jobs;
  const std::vector<int32_t> t{17, 930};
  for (auto& [label, c] : parity_configs()) {
    Generator g(seed);
    Tensor<float> x = Tensor<float>::randn({B, c.resolution, c.resolution, c.in_ch}, g);
    std::vector<int32_t> y;
    if (c.num_classes > 0) y = {7, static_cast<int32_t>(c.num_classes)};
    const std::string in = (dir / ("unet_x_" + label + ".safetensors")).string(),
                      wts = (dir / ("unet_torch_weights_" + label + ".safetensors")).string(),
                      res = (dir / ("unet_torch_out_" + label + ".safetensors")).string();
    {
      safetensors::Writer w;
      w.add("x", nhwc_to_nchw(x));
      w.add_raw("t", safetensors::DType::I32, {B}, t.data(), t.size() * sizeof(int32_t));
      if (!y.empty()) w.add_raw("y", safetensors::DType::I32, {B}, y.data(), y.size() * sizeof(int32_t));
      w.write(in);
    }
    jobs += " init '" + cfg_json(c) + "' " + std::to_string(seed) + " '" + in + "' '" + wts + "' '" + res + "'";
    xs.push_back(x);
    ys.push_back(y);
  }
  REQUIRE(run_python(jobs) == 0);  // one launch for every configuration
  size_t i = 0;
  for (auto& [label, c] : parity_configs()) {
    INFO(label);
    Generator g(seed);
    UNet<float> m(c, g);
    load_weights(safetensors::File::read((dir / ("unet_torch_weights_" + label + ".safetensors")).string()), m);
    NoGrad ng;
    const std::vector<int32_t>& y = ys[i];
    const Tensor<float> out = m(Var<float>(xs[i]), t, y.empty() ? nullptr : &y).value();
    ++i;
    const double eo = rel_err(nhwc_to_nchw(out),
                              safetensors::File::read((dir / ("unet_torch_out_" + label + ".safetensors")).string())
                                  .tensor<float>("out"));
    std::printf("UNet %s with PyTorch's weights: out %.2g (bound %.2g)\n", label.c_str(), eo,
                float_sums_tolerance(unet_widest_sum(c), unet_depth(c)));
    CHECK(eo < float_sums_tolerance(unet_widest_sum(c), unet_depth(c)));  // every name and shape matched above
  }
}

TEST_CASE("a steady U-Net train step takes no new tensor memory from the system") {
  UNetConfig c = UNetConfig::mnist16("one8");
  c.ch = 16;
  Generator g(5);
  UNet<float> m(c, g);
  Adam<float> opt(m.named_parameters(), AdamOptions{});
  const NoiseSchedule s = NoiseSchedule::linear(200);
  const Tensor<float> x0 = Tensor<float>::randn({8, 16, 16, 1}, g);
  auto step = [&] {
    auto nb = make_noised_batch(s, x0, g);
    opt.zero_grad();
    backward(epsilon_loss<float>([&](const Var<float>& x, const std::vector<int32_t>& t) { return m(x, t); }, nb));
    opt.step();
  };
  const uint64_t start = detail::HostCache::instance().system_allocations();
  step();
  CHECK(detail::HostCache::instance().system_allocations() > start);  // the first step does allocate
  step();
  const uint64_t before = detail::HostCache::instance().system_allocations();
  for (int i = 0; i < 3; ++i) step();
  CHECK(detail::HostCache::instance().system_allocations() == before);
}

TEST_CASE("UNet matches the PyTorch reference in double precision") {
  if (std::string(DIFFUSE_TORCH_PYTHON).empty()) {
    DIFFUSE_SKIP("no python with torch found at configure time: PyTorch comparison skipped");
  }
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  UNetConfig c = UNetConfig::mnist16("one8");
  c.ch = 16;
  Generator g(seed);
  UNet<double> m(c, g);
  randomise(m, g, 0.1);
  const int64_t B = 2;
  Var<double> x(Tensor<double>::randn({B, 16, 16, 1}, g));
  std::vector<int32_t> t{3, 177};
  Var<double> out = m(x, t);
  Tensor<double> gy = Tensor<double>::randn(out.shape(), g);
  backward(sum(mul(out, Var<double>(gy))));
  const fs::path dir = fs::path(DIFFUSE_BINARY_DIR) / "tests" / "torch_parity";
  fs::create_directories(dir);
  const std::string in = (dir / "unet_in_double.safetensors").string(), res = (dir / "unet_out_double.safetensors").string();
  {
    safetensors::Writer w;
    for (auto& [name, t] : m.state_dict()) w.add(name, t);  // PyTorch's layouts
    w.add("x", nhwc_to_nchw(x.value()));
    w.add("gy", nhwc_to_nchw(gy));
    w.add_raw("t", safetensors::DType::I32, {B}, t.data(), t.size() * sizeof(int32_t));
    w.write(in);
  }
  REQUIRE(run_python("forward '" + cfg_json(c) + "' '" + in + "' '" + res + "'") == 0);
  const auto ref = safetensors::File::read(res);
  CHECK(rel_err(nhwc_to_nchw(out.value()), ref.tensor<double>("out")) < 1e-12);
  double total = 0;
  for (auto& [name, p] : m.named_parameters())
    for (double v : ref.tensor<double>("grad." + name)) total += v * v;
  double worst = 0;
  std::string worst_name;
  for (auto& [name, p] : m.named_parameters()) {
    const Tensor<double> r = ref.tensor<double>("grad." + name), a = to_torch_layout(p.grad(), p.layout());
    double num = 0, den = 0;
    for (size_t i = 0; i < r.size(); ++i) {
      num += (a[i] - r[i]) * (a[i] - r[i]);
      den += r[i] * r[i];
    }
    const double e = std::sqrt(num / std::max(den, 1e-16 * total));  // see the float test on k.bias
    if (e > worst) worst = e, worst_name = name;
  }
  INFO("worst gradient " << worst_name);
  CHECK(worst < 1e-10);
}
