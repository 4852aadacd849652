// LeNet (include/diffuse/models/lenet.hpp) and its evaluation helpers
// (include/diffuse/eval/lenet_score.hpp): shapes and parameter names, a gradient
// check of a tiny LeNet in double, training smoke tests (a synthetic bars task
// always; Debian's Fashion-MNIST when installed), score_samples on a toy
// problem, and the classifier file round trip. The hidden test case "[.cli]"
// writes the tiny dataset for tests/cli/check_mnist_classifier.cmake.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <numeric>
#include <string>
#include <vector>

#include <unistd.h>

#include <diffuse/diffuse.hpp>
#include <diffuse/io/idx.hpp>
#include <diffuse/models/lenet.hpp>
#include <diffuse/eval/lenet_score.hpp>
#include <diffuse/io/npy.hpp>
#include "gradcheck.hpp"

using namespace diffuse;
using Catch::Matchers::Contains;
using diffuse::testing::max_gradcheck_error;
namespace fs = std::filesystem;

#include "temp_files.hpp"
#include "skip.hpp"

using diffuse::testing::Bytes;
using diffuse::testing::read_bytes;
using diffuse::testing::TempDir;
using diffuse::testing::write_bytes;

namespace {

template <class F>
std::string error_of(F f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  FAIL("no exception");
  return {};
}

// n images s x s of class 0 (a vertical bar) or 1 (a horizontal bar) at a
// random position, 2-3 pixels wide, on noise. Labels alternate.
void bars(int64_t n, int64_t s, Generator& g, std::vector<uint8_t>& px, std::vector<int32_t>& y) {
  px.assign(static_cast<size_t>(n * s * s), 0);
  y.resize(static_cast<size_t>(n));
  std::vector<float> u(static_cast<size_t>(s * s + 2));
  for (int64_t i = 0; i < n; ++i) {
    g.uniform(u.data(), u.size());
    y[i] = static_cast<int32_t>(i % 2);
    const int64_t pos = 1 + static_cast<int64_t>(u[0] * static_cast<float>(s - 4)), w = 2 + (u[1] < 0.5f);
    uint8_t* im = px.data() + i * s * s;
    for (int64_t r = 0; r < s; ++r)
      for (int64_t c = 0; c < s; ++c) {
        const int64_t k = y[i] == 0 ? c : r;
        const bool on = k >= pos && k < pos + w;
        im[r * s + c] = static_cast<uint8_t>(on ? 200 + 55 * u[2 + r * s + c] : 60 * u[2 + r * s + c]);
      }
  }
}

struct TrainLog {
  double first_loss = 0, last_loss = 0;
};

// Adam + cross-entropy over (px, y) for `epochs`, batch B; the mean loss of the first and last epoch.
TrainLog train_epochs(LeNet<float>& net, const std::vector<uint8_t>& px, const std::vector<int32_t>& y, int epochs,
                      int64_t B, double lr) {
  const int64_t n = static_cast<int64_t>(y.size()), s = net.size();
  AdamOptions ao;
  ao.lr = lr;
  Adam<float> opt(net.named_parameters(), ao);
  TrainLog log;
  for (int e = 0; e < epochs; ++e) {
    double sum = 0;
    for (int64_t b0 = 0; b0 < n; b0 += B) {
      const int64_t b = std::min(B, n - b0);
      opt.zero_grad();
      const std::vector<int32_t> yb(y.begin() + b0, y.begin() + b0 + b);
      Var<float> loss = cross_entropy(net.logits(Var<float>(lenet_input(px.data() + b0 * s * s, b, s))), yb);
      sum += loss.value()[0] * static_cast<double>(b);
      backward(loss);
      opt.step();
    }
    if (e == 0) log.first_loss = sum / static_cast<double>(n);
    log.last_loss = sum / static_cast<double>(n);
  }
  return log;
}

double accuracy(const LeNet<float>& net, const std::vector<uint8_t>& px, const std::vector<int32_t>& y) {
  const LeNetOutputs o = lenet_run(net, px.data(), static_cast<int64_t>(y.size()));
  int64_t c = 0;
  for (size_t i = 0; i < y.size(); ++i) c += o.predicted[i] == y[i];
  return static_cast<double>(c) / static_cast<double>(y.size());
}

// A tiny MNIST-format dataset: class k is a bar at row 2 + 2k (horizontal for
// even k, column for odd k) on noise, 28x28.
MnistSplit tiny_mnist(int64_t n, uint64_t seed) {
  Generator g(seed);
  MnistSplit s;
  s.images.count = static_cast<size_t>(n);
  s.images.rows = s.images.cols = 28;
  s.images.pixels.resize(static_cast<size_t>(n * 28 * 28));
  s.labels.labels.resize(static_cast<size_t>(n));
  std::vector<float> u(28 * 28);
  for (int64_t i = 0; i < n; ++i) {
    const int k = static_cast<int>(i % 10);
    s.labels.labels[i] = static_cast<uint8_t>(k);
    g.uniform(u.data(), u.size());
    for (int r = 0; r < 28; ++r)
      for (int c = 0; c < 28; ++c) {
        const int at = (k % 2 == 0) ? r : c;
        const bool on = at >= 2 + 2 * k && at < 5 + 2 * k;
        s.images.pixels[i * 784 + r * 28 + c] = static_cast<uint8_t>(on ? 255 * (0.7 + 0.3 * u[r * 28 + c]) : 40 * u[r * 28 + c]);
      }
  }
  return s;
}

}  // namespace

TEST_CASE("LeNet shapes and parameter names") {
  Generator g(0);
  LeNet<float> net(16, g);
  std::vector<std::string> names;
  std::vector<Shape> shapes;
  for (auto& [n, p] : net.named_parameters()) {
    names.push_back(n);
    shapes.push_back(torch_shape(p.shape(), p.layout()));  // PyTorch's (conv weights are kept OHWI)
  }
  CHECK(names == std::vector<std::string>{"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "conv3.weight",
                                          "conv3.bias", "conv4.weight", "conv4.bias", "fc1.weight", "fc1.bias",
                                          "fc2.weight", "fc2.bias"});
  CHECK(shapes == std::vector<Shape>{{64, 1, 3, 3}, {64}, {64, 64, 3, 3}, {64}, {128, 64, 3, 3}, {128},
                                     {128, 128, 3, 3}, {128}, {128, 2048}, {128}, {10, 128}, {10}});
  CHECK(net.num_parameters() == 522570);
  Var<float> x(Tensor<float>::randn({3, 16, 16, 1}, g));
  CHECK(net.features(x).shape() == Shape{3, 128});
  CHECK(net.logits(x).shape() == Shape{3, 10});
  // Features are post-ReLU.
  for (float v : net.features(x).value()) REQUIRE(v >= 0.0f);

  LeNet<float> net28(28, g);
  CHECK(net28.num_parameters() == 1063242);
  CHECK(net28.named_parameters()[8].second.shape() == Shape{128, 6272});
  CHECK(net28.features(Var<float>(Tensor<float>::randn({2, 28, 28, 1}, g))).shape() == Shape{2, 128});

  CHECK_THAT(error_of([&] { net.logits(Var<float>(Tensor<float>::zeros({2, 28, 28, 1}))); }),
             Contains("expected images [N, 16, 16, 1]"));
  CHECK_THAT(error_of([&] { net.logits(Var<float>(Tensor<float>::zeros({2, 1, 16, 16}))); }), Contains("NHWC"));
  CHECK_THAT(error_of([&] { LeNet<float>(18, g); }), Contains("multiple of 4"));
}

TEST_CASE("LeNet gradients match finite differences (tiny LeNet, double)") {
  Generator g(1);
  LeNetConfig c;
  c.size = 8;
  c.c1 = 2;
  c.c2 = 3;
  c.hidden = 5;
  c.classes = 3;
  LeNet<double> net(c, g);
  std::vector<Var<double>> in = {diffuse::testing::rand_var({2, 8, 8, 1}, g)};
  for (auto& [n, p] : net.named_parameters()) in.push_back(p);
  CHECK(max_gradcheck_error([&](const std::vector<Var<double>>& v) { return net.logits(v[0]); }, in, 2) < 1e-6);
  // And through cross-entropy, as in training.
  CHECK(max_gradcheck_error([&](const std::vector<Var<double>>& v) { return cross_entropy(net.logits(v[0]), {2, 0}); },
                            in, 3) < 1e-6);
}

TEST_CASE("LeNet learns a synthetic bars task in a few seconds") {
  Generator g(2);
  std::vector<uint8_t> px, tpx;
  std::vector<int32_t> y, ty;
  bars(400, 16, g, px, y);
  bars(200, 16, g, tpx, ty);
  LeNetConfig c;
  c.c1 = 8;
  c.c2 = 16;
  c.hidden = 32;
  LeNet<float> net(c, g);
  const double before = accuracy(net, tpx, ty);
  const TrainLog log = train_epochs(net, px, y, 3, 32, 3e-3);
  const double after = accuracy(net, tpx, ty);
  INFO("accuracy " << before << " -> " << after << ", loss " << log.first_loss << " -> " << log.last_loss);
  CHECK(log.last_loss < 0.5 * log.first_loss);
  CHECK(after > 0.95);
}

TEST_CASE("LeNet learns Fashion-MNIST from 500 images") {
  const std::string dir = "/usr/share/datasets/fashion-mnist";
  if (!fs::is_directory(dir)) {
    DIFFUSE_SKIP(dir << " not found (Debian package dataset-fashion-mnist): Fashion-MNIST smoke test skipped");
  }
  const MnistSplit tr = load_mnist(dir, "train"), te = load_mnist(dir, "test");
  const int64_t n = 500, nt = 500;
  auto first = [](const IdxImages& im, int64_t k) {  // resize only the images used
    IdxImages r = im;
    r.count = static_cast<size_t>(k);
    r.pixels.resize(static_cast<size_t>(k) * 784);
    return mnist_at_size(r, 16, "area");
  };
  const std::vector<uint8_t> x = first(tr.images, n), tx = first(te.images, nt);
  std::vector<int32_t> y(tr.labels.labels.begin(), tr.labels.labels.begin() + n),
      ty(te.labels.labels.begin(), te.labels.labels.begin() + nt);
  Generator g(3);
  LeNetConfig c;
  c.c1 = 16;
  c.c2 = 32;
  c.hidden = 64;
  LeNet<float> net(c, g);
  const TrainLog log = train_epochs(net, x, y, 4, 32, 2e-3);
  const double acc = accuracy(net, tx, ty);
  INFO("test accuracy " << acc << " (chance 0.1), loss " << log.first_loss << " -> " << log.last_loss);
  CHECK(log.last_loss < 0.75 * log.first_loss);
  CHECK(acc > 0.5);
}

TEST_CASE("score_samples counts classes and scores the reference itself at FD 0") {
  const MnistSplit train = tiny_mnist(400, 10), test = tiny_mnist(200, 11);
  Generator g(4);
  LeNetConfig c;
  c.c1 = 8;
  c.c2 = 16;
  c.hidden = 32;
  LeNet<float> net(c, g);
  const std::vector<uint8_t> px = mnist_at_size(train.images, 16, "area");
  std::vector<int32_t> y(train.labels.labels.begin(), train.labels.labels.end());
  train_epochs(net, px, y, 3, 32, 3e-3);

  // "Samples": real test digits of classes 3 and 7 (as labels), 40 of them.
  const std::vector<uint8_t> tpx = mnist_at_size(test.images, 16, "area");
  std::vector<uint8_t> s;
  std::vector<int64_t> lab;
  for (size_t i = 0; i < test.labels.labels.size() && lab.size() < 40; ++i)
    if (test.labels.labels[i] == 3 || test.labels.labels[i] == 7) {
      s.insert(s.end(), tpx.begin() + static_cast<std::ptrdiff_t>(i * 256), tpx.begin() + static_cast<std::ptrdiff_t>(i * 256 + 256));
      lab.push_back(test.labels.labels[i]);
    }
  const SampleScore r = score_samples(net, s.data(), 40, 16, lab.data(), train, test);
  CHECK(r.n == 40);
  CHECK(std::accumulate(r.predicted_hist.begin(), r.predicted_hist.end(), int64_t(0)) == 40);
  CHECK(r.per_class_count[3] == 20);
  CHECK(r.per_class_count[7] == 20);
  CHECK(std::isnan(r.per_class[0]));
  CHECK(r.cond_accuracy == Approx((r.per_class[3] + r.per_class[7]) / 2));
  CHECK(r.cond_accuracy > 0.9);
  CHECK(r.n_reference == 40);  // the test split has 20 of each of 3 and 7
  // The samples are the reference itself here: FD 0 up to rounding, below the floor.
  CHECK(std::abs(r.fd) < 1e-5 * r.fd_floor);
  CHECK(r.fd_floor > 0);
  // Without labels: the whole test split is the reference; a fixed seed gives the same floor.
  const SampleScore u1 = score_samples(net, s.data(), 40, 16, nullptr, train, test);
  const SampleScore u2 = score_samples(net, s.data(), 40, 16, nullptr, train, test);
  CHECK(std::isnan(u1.cond_accuracy));
  CHECK(u1.n_reference == 200);
  CHECK(u1.fd_floor == u2.fd_floor);
  CHECK(u1.fd > r.fd);  // two classes against all ten
  CHECK_THAT(error_of([&] { score_samples(net, s.data(), 40, 28, nullptr, train, test); }),
             Contains("samples are 28x28 but the classifier takes 16x16"));
  std::vector<int64_t> bad = lab;
  bad[5] = 10;
  CHECK_THAT(error_of([&] { score_samples(net, s.data(), 40, 16, bad.data(), train, test); }),
             Contains("label 10 of sample 5"));

  TempDir d("lenet", "file");
  save_lenet(d / "c.safetensors", net, "bilinear", 0.875);
  const LeNetFile f = load_lenet(d / "c.safetensors");
  CHECK(f.resize == "bilinear");
  CHECK(f.test_accuracy == 0.875);
  CHECK(f.net->config().c2 == 16);
  const auto p0 = net.named_parameters(), p1 = f.net->named_parameters();
  for (size_t k = 0; k < p0.size(); ++k)
    CHECK(std::equal(p0[k].second.value().begin(), p0[k].second.value().end(), p1[k].second.value().begin()));
  safetensors::Writer w;
  w.add("x", Tensor<float>::zeros({1}));
  w.write(d / "other.safetensors");
  CHECK_THAT(error_of([&] { load_lenet(d / "other.safetensors"); }), Contains("is not a LeNet classifier"));
  // A file that lies about itself: metadata that describes a far larger network than its tensors
  // (refused before that network is allocated), a test accuracy that is no number, a NaN weight.
  auto rewrite = [&](const std::string& name, const std::string& key, const std::string& value, bool nan = false) {
    const safetensors::File src = safetensors::File::read(d / "c.safetensors");
    safetensors::Writer out;
    for (const std::string& n : src.names()) {
      Tensor<float> t = src.tensor<float>(n);
      if (nan && n == "fc1.weight") t[7] = std::nanf("");
      out.add(n, t);
    }
    out.metadata = src.metadata();
    if (!key.empty()) out.metadata[key] = value;
    out.write(d / name);
    return std::string(d / name);
  };
  CHECK_THAT(error_of([&] { load_lenet(rewrite("huge.safetensors", "hidden", "1000000000")); }),
             Contains("its metadata describes a LeNet of") && Contains("parameters, the file holds"));
  CHECK_THAT(error_of([&] { load_lenet(rewrite("acc.safetensors", "test_accuracy", "0.9abc")); }),
             Contains("metadata 'test_accuracy' is '0.9abc', not a number from 0 to 1"));
  CHECK_THAT(error_of([&] { load_lenet(rewrite("acc2.safetensors", "test_accuracy", "7")); }),
             Contains("not a number from 0 to 1"));
  CHECK_THAT(error_of([&] { load_lenet(rewrite("nan.safetensors", "", "", true)); }),
             Contains("tensor 'fc1.weight' has a non-finite value at element 7"));
  CHECK(load_lenet(rewrite("same.safetensors", "", "")).test_accuracy == 0.875);  // the rewrite itself is sound
}

// Not run by itself (hidden): writes DIFFUSE_CLI_DIR/{data/, samples.npy,
// labels.npy, samples28.npy} for tests/cli/check_mnist_classifier.cmake.
TEST_CASE("cli fixture: a tiny MNIST and samples", "[.cli]") {
  const char* dir = std::getenv("DIFFUSE_CLI_DIR");
  REQUIRE(dir);
  const fs::path d(dir);
  fs::create_directories(d / "data");
  const MnistSplit tr = tiny_mnist(160, 20), te = tiny_mnist(100, 21);
  write_idx_images((d / "data/train-images-idx3-ubyte").string(), tr.images);
  write_idx_labels((d / "data/train-labels-idx1-ubyte").string(), tr.labels);
  write_idx_images((d / "data/t10k-images-idx3-ubyte.gz").string(), te.images);
  write_idx_labels((d / "data/t10k-labels-idx1-ubyte.gz").string(), te.labels);
  // "Samples": the first 100 train digits (not the test reference itself, whose FD would be 0).
  const std::vector<uint8_t> s16 = mnist_at_size(tr.images, 16, "area");
  const int64_t n = 100;
  npy::save((d / "samples.npy").string(), s16.data(), {n, 1, 16, 16});
  std::vector<int64_t> lab(tr.labels.labels.begin(), tr.labels.labels.begin() + n);
  npy::save((d / "labels.npy").string(), lab.data(), {n});
  npy::save((d / "samples28.npy").string(), te.images.pixels.data(), {n, 1, 28, 28});
}
