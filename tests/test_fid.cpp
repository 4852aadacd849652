// The FID pieces (include/diffuse/eval/fid.hpp, models/inception_fid.hpp,
// ops/batch_norm.hpp): batch norm in inference against its formula and by
// finite differences; pytorch-fid's InceptionV3 against PyTorch with random
// weights (tests/torch/inception_ref.py builds it from torchvision's blocks and
// saves a .pth that scripts/fid_weights_to_safetensors.py converts, as a user
// converts the real one); the weight loader's errors; the image inputs.
#include <catch2/catch.hpp>

#include "kernel_seed.hpp"

#include "compare.hpp"
#include "gradcheck.hpp"
#include "temp_files.hpp"

#include <diffuse/diffuse.hpp>
#include <diffuse/eval/fid.hpp>
#include <diffuse/io/npy.hpp>

#include <cmath>
#include <limits>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include "skip.hpp"

using namespace diffuse;
using diffuse::testing::max_gradcheck_error;
using diffuse::testing::rand_var;
using diffuse::testing::rel_err;
using diffuse::testing::TempDir;
namespace fs = std::filesystem;

namespace {

using diffuse::testing::fresh_seed;
bool have_torch() { return std::string(DIFFUSE_TORCH_PYTHON).size() > 0; }

// Random uint8 images [n, h, w, c] that look like small pictures: a smooth
// random field (a coarse grid upsampled) plus pixel noise, clipped.
ImageSet random_images(int64_t n, int64_t h, int64_t w, int64_t c, Generator& g) {
  ImageSet im;
  im.n = n, im.height = h, im.width = w, im.channels = c;
  const Tensor<float> coarse = Tensor<float>::rand({n, 4, 4, c}, g);
  const Tensor<float> smooth = resize_bilinear(coarse, h, w);
  const Tensor<float> noise = Tensor<float>::randn({n, h, w, c}, g);
  im.pixels.resize(static_cast<size_t>(n * h * w * c));
  for (size_t i = 0; i < im.pixels.size(); ++i)
    im.pixels[i] = static_cast<uint8_t>(std::clamp(std::lround(255.0 * smooth[i] + 20.0 * noise[i]), 0L, 255L));
  return im;
}

std::string shell_quote(const std::string& s) { return "'" + s + "'"; }

}  // namespace

// ---------------------------------------------------------------- batch norm

TEST_CASE("batch_norm_inference is (x - mean) / sqrt(var + eps) * weight + bias per channel") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const Var<double> x = rand_var({2, 3, 4, 5}, g, false), w = rand_var({5}, g, false), b = rand_var({5}, g, false);
  const Tensor<double> mean = Tensor<double>::randn({5}, g);
  Tensor<double> var = Tensor<double>::rand({5}, g);
  for (double& v : var) v = 0.1 + 2.0 * v;
  const double eps = 1e-3;
  const Var<double> y = batch_norm_inference(x, w, b, mean, var, eps);
  REQUIRE(y.shape() == x.shape());
  double worst = 0;
  for (int64_t i = 0; i < x.value().numel(); ++i) {
    const int64_t c = i % 5;
    const double want = (x.value()[i] - mean[c]) / std::sqrt(var[c] + eps) * w.value()[c] + b.value()[c];
    worst = std::max(worst, std::abs(y.value()[i] - want) / std::max(1.0, std::abs(want)));
  }
  CHECK(worst < 1e-14);
}

TEST_CASE("gradcheck: batch_norm_inference in x, weight and bias") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  auto x = rand_var({2, 3, 3, 4}, g), w = rand_var({4}, g), b = rand_var({4}, g);
  const Tensor<double> mean = Tensor<double>::randn({4}, g);
  Tensor<double> var = Tensor<double>::rand({4}, g);
  for (double& v : var) v = 0.2 + v;
  CHECK(max_gradcheck_error([&](auto& v) { return batch_norm_inference(v[0], v[1], v[2], mean, var, 1e-5); },
                            {x, w, b}, seed) < 1e-7);
  // Only x needing a gradient, and x used twice (accumulation into the same sink).
  auto xc = rand_var({1, 2, 5, 3}, g);
  const Var<double> wc = rand_var({3}, g, false), bc = rand_var({3}, g, false);
  const Tensor<double> m3 = Tensor<double>::randn({3}, g), v3 = Tensor<double>::full({3}, 0.7);
  CHECK(max_gradcheck_error(
            [&](auto& v) {
              return add(batch_norm_inference(v[0], wc, bc, m3, v3, 1e-3), batch_norm_inference(v[0], wc, bc, m3, v3, 1e-3));
            },
            {xc}, seed) < 1e-7);
}

TEST_CASE("batch_norm_inference rejects mismatched statistics") {
  Generator g(1);
  const Var<float> x(Tensor<float>::randn({1, 2, 2, 3}, g));
  const Var<float> w(Tensor<float>::full({3}, 1.0f)), b(Tensor<float>::full({3}, 0.0f));
  CHECK_THROWS_WITH(batch_norm_inference(x, w, b, Tensor<float>::full({4}, 0.0f), Tensor<float>::full({3}, 1.0f), 1e-3),
                    Catch::Contains("[3]"));
  CHECK_THROWS(batch_norm_inference(x, w, b, Tensor<float>::full({3}, 0.0f), Tensor<float>::full({3}, 1.0f), 0.0));
  BatchNorm2d<float> bn(3);
  CHECK(bn.parameters().size() == 2);  // running statistics are buffers, not trained
  CHECK(bn.named_state().size() == 4);
  CHECK(bn.named_state()[3].first == "running_var");
}

// ---------------------------------------------------------------- the network

TEST_CASE("FidInceptionV3 has pytorch-fid's tensors") {
  Generator g(0);
  FidInceptionV3<float> net(g);
  const auto st = net.named_state();
  // 94 convolutions, each with a weight and 4 BatchNorm tensors.
  CHECK(st.size() == 94 * 5);
  int64_t values = 0;
  for (auto& [n, v] : st) values += v.value().numel();
  // pytorch-fid's file: 23,885,392 values, of which fc is 2048 * 1008 + 1008.
  CHECK(values == 23885392 - 2048 * 1008 - 1008);
  bool found = false;
  for (auto& [n, v] : st)
    if (n == "Mixed_6b.branch7x7dbl_2.conv.weight") {
      found = true;
      CHECK(torch_shape(v.shape(), v.layout()) == Shape{128, 128, 7, 1});  // PyTorch's shape
      CHECK(v.shape() == Shape{128, 7, 1, 128});                             // stored OHWI
    }
  CHECK(found);
  const Var<float> x(Tensor<float>::randn({1, 64, 64, 3}, g));
  CHECK_THROWS_WITH(net.features(x), Catch::Contains("299"));
  // Strides and paddings as built (a compiler that mixes them up, as GCC 12 with AVX-512 SLP
  // vectorisation did, changes these sizes; see CMakeLists.txt).
  NoGrad ng;
  CHECK(net.c1a(Var<float>(Tensor<float>::randn({1, 9, 9, 3}, g))).shape() == Shape{1, 4, 4, 32});  // 3x3 stride 2
  CHECK(net.c2b(Var<float>(Tensor<float>::randn({1, 5, 5, 32}, g))).shape() == Shape{1, 5, 5, 64});  // 3x3 pad 1
  CHECK(net.m6a(Var<float>(Tensor<float>::randn({1, 9, 9, 288}, g))).shape() == Shape{1, 4, 4, 768});
}

TEST_CASE("fid_preprocess replicates grey, resizes as F.interpolate and scales to [-1, 1]") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  const ImageSet grey = random_images(2, 9, 7, 1, g);
  const Tensor<float> y = fid_preprocess(grey.pixels.data(), 2, 9, 7, 1);
  REQUIRE(y.shape() == Shape{2, 299, 299, 3});
  Tensor<float> x({2, 9, 7, 1});
  for (size_t i = 0; i < grey.pixels.size(); ++i) x[i] = grey.pixels[i] / 255.0f;
  const Tensor<float> r = resize_bilinear(x, 299, 299);
  for (int64_t p = 0; p < 2 * 299 * 299; ++p)
    for (int64_t c = 0; c < 3; ++c) REQUIRE(y[p * 3 + c] == 2.0f * r[p] - 1.0f);
  // Corners of an upsampled image are the corner pixels (the source index clamps at 0 and at the edge).
  CHECK(y[0] == 2.0f * (grey.pixels[0] / 255.0f) - 1.0f);
  CHECK_THROWS(fid_preprocess(grey.pixels.data(), 2, 9, 7, 2));
}

TEST_CASE("FID Inception features match pytorch-fid's network in PyTorch (random weights)") {
  if (!have_torch()) {
    DIFFUSE_SKIP("no python with torch found at configure time: Inception comparison skipped");
  }
  const uint64_t seed = fresh_seed() % 1000000;
  INFO("seed " << seed);
  Generator g(seed);
  TempDir dir("fid", "parity");
  // Colour 32x32 (CIFAR's size) and grey 28x28 (MNIST's) inputs, written as NHWC uint8.
  const ImageSet rgb = random_images(3, 32, 32, 3, g), grey = random_images(2, 28, 28, 1, g);
  npy::save<uint8_t>(dir / "rgb.npy", rgb.pixels.data(), {3, 32, 32, 3});
  npy::save<uint8_t>(dir / "grey.npy", grey.pixels.data(), {2, 28, 28, 1});
  const std::string py = shell_quote(DIFFUSE_TORCH_PYTHON), src = DIFFUSE_SOURCE_DIR;
  // One python launch: the random network, its features of both sets and its weights converted
  // by scripts/fid_weights_to_safetensors.py's convert().
  std::string cmd = "cd " + shell_quote(src + "/tests/torch") + " && " + py + " inception_ref.py --seed " +
                    std::to_string(seed) + " --pth " + shell_quote(dir / "w.pth") + " --safetensors " +
                    shell_quote(dir / "w.safetensors");
  for (const char* name : {"rgb", "grey"})
    cmd += " --images " + shell_quote(dir / (std::string(name) + ".npy")) + " --features " +
           shell_quote(dir / (std::string(name) + "_f.npy"));
  INFO(cmd);
  REQUIRE(std::system(cmd.c_str()) == 0);

  Generator gi(0);
  FidInceptionV3<float> net(gi);
  load_fid_weights(dir / "w.safetensors", net);
  for (const auto& [name, im] : {std::pair<std::string, const ImageSet*>{"rgb", &rgb}, {"grey", &grey}}) {
    INFO(name);
    const std::vector<float> ours = fid_features(net, *im, 2);
    const npy::Array theirs = npy::load(dir / (name + "_f.npy"));
    REQUIRE(theirs.shape == Shape{im->n, 2048});
    const std::vector<float> t = theirs.as<float>();
    const Tensor<float> a = Tensor<float>::from(ours, {im->n, 2048}), b = Tensor<float>::from(t, {im->n, 2048});
    const double e = rel_err(a, b);
    std::printf("FID Inception %s vs PyTorch: ||ours - torch|| / ||torch|| = %.3g\n", name.c_str(), e);
    // float_sums_tolerance: the longest chain is about 47 convolutions (the stem's 5, then the
    // 3x3-double branches of Mixed_5b-5d, 6a, the 7x7-double ones of 6b-6e, 7a, 7b, 7c), the widest
    // sum a 3x3 convolution over 448 channels (4,032 products).
    std::printf("  (bound %.3g)\n", diffuse::testing::float_sums_tolerance(4032, 47));
    CHECK(e < diffuse::testing::float_sums_tolerance(4032, 47));
    // Not a degenerate comparison: features vary between images and most units are live.
    double spread = 0, mag = 0;
    int64_t nonzero = 0;
    for (int64_t j = 0; j < 2048; ++j) {
      double m = 0;
      for (int64_t i = 0; i < im->n; ++i) m += t[i * 2048 + j] / double(im->n);
      for (int64_t i = 0; i < im->n; ++i) {
        spread += std::abs(t[i * 2048 + j] - m);
        mag += std::abs(t[i * 2048 + j]);
        nonzero += t[i * 2048 + j] != 0.0f;
      }
    }
    CHECK(spread / mag > 0.01);
    CHECK(nonzero > im->n * 2048 / 4);
  }
}

// ---------------------------------------------------------------- loading

TEST_CASE("load_fid_weights names the first missing, misshapen or foreign tensor") {
  TempDir dir("fid", "weights");
  Generator g(3);
  FidInceptionV3<float> net(g);
  auto write = [&](const std::string& path, const std::string& drop, const std::string& reshape,
                   const std::string& extra) {
    safetensors::Writer w;
    for (auto& [n, v] : net.state_dict()) {
      if (n == drop) continue;
      if (n == reshape)
        w.add(n, Tensor<float>::full({v.numel() / 2, 2}, 0.5f));
      else
        w.add(n, v);
    }
    w.add("fc.weight", Tensor<float>::full({1008, 2048}, 0.0f));
    w.add("fc.bias", Tensor<float>::full({1008}, 0.0f));
    w.add("Mixed_5b.branch1x1.bn.num_batches_tracked", Tensor<int64_t>::full({}, 7));
    if (!extra.empty()) w.add(extra, Tensor<float>::full({2}, 1.0f));
    w.write(path);
  };
  write(dir / "ok.safetensors", "", "", "");
  FidInceptionV3<float> other(g);
  load_fid_weights(dir / "ok.safetensors", other);  // fc and num_batches_tracked ignored
  CHECK(rel_err(other.named_state().back().second.value(), net.named_state().back().second.value()) == 0.0);
  CHECK(rel_err(other.m5b.named_state()[3].second.value(), net.m5b.named_state()[3].second.value()) == 0.0);

  write(dir / "missing.safetensors", "Mixed_6c.branch7x7_2.bn.running_mean", "", "");
  CHECK_THROWS_WITH(load_fid_weights(dir / "missing.safetensors", other),
                    Catch::Contains("missing tensor 'Mixed_6c.branch7x7_2.bn.running_mean'"));
  write(dir / "shape.safetensors", "", "Conv2d_4a_3x3.conv.weight", "");
  CHECK_THROWS_WITH(load_fid_weights(dir / "shape.safetensors", other),
                    Catch::Contains("'Conv2d_4a_3x3.conv.weight' has shape"));
  write(dir / "extra.safetensors", "", "", "AuxLogits.conv0.conv.weight");
  CHECK_THROWS_WITH(load_fid_weights(dir / "extra.safetensors", other),
                    Catch::Contains("unexpected tensor 'AuxLogits.conv0.conv.weight'"));
  // A weight that is not a number: refused when read, not after minutes of features.
  {
    safetensors::Writer w;
    for (auto& [n, v] : net.state_dict()) {
      Tensor<float> t = v.clone();
      if (n == "Mixed_7c.branch_pool.conv.weight") t[11] = std::numeric_limits<float>::infinity();
      w.add(n, t);
    }
    w.write(dir / "inf.safetensors");
  }
  CHECK_THROWS_WITH(load_fid_weights(dir / "inf.safetensors", other),
                    Catch::Contains("tensor 'Mixed_7c.branch_pool.conv.weight' has a non-finite value at element 11"));
}

TEST_CASE("image inputs: .npy in both layouts and folders of images") {
  const uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  TempDir dir("fid", "inputs");
  const ImageSet im = random_images(3, 5, 4, 3, g);
  // NCHW copy of the same images.
  std::vector<uint8_t> nchw(im.pixels.size());
  for (int64_t n = 0; n < 3; ++n)
    for (int64_t p = 0; p < 20; ++p)
      for (int64_t c = 0; c < 3; ++c) nchw[(n * 3 + c) * 20 + p] = im.pixels[(n * 20 + p) * 3 + c];
  npy::save<uint8_t>(dir / "nhwc.npy", im.pixels.data(), {3, 5, 4, 3});
  npy::save<uint8_t>(dir / "nchw.npy", nchw.data(), {3, 3, 5, 4});
  for (const char* f : {"nhwc.npy", "nchw.npy"}) {
    INFO(f);
    const ImageSet r = load_image_npy(dir / f);
    CHECK((r.n == 3 && r.height == 5 && r.width == 4 && r.channels == 3));
    CHECK(r.pixels == im.pixels);
  }
  npy::save<uint8_t>(dir / "grey.npy", std::vector<uint8_t>(im.pixels.begin(), im.pixels.begin() + 40).data(), {2, 5, 4});
  const ImageSet grey = load_image_npy(dir / "grey.npy");
  CHECK((grey.n == 2 && grey.channels == 1));
  npy::save<float>(dir / "float.npy", std::vector<float>(6, 0.5f).data(), {1, 2, 3});
  CHECK_THROWS_WITH(load_image_npy(dir / "float.npy"), Catch::Contains("uint8"));
  npy::save<uint8_t>(dir / "c4.npy", std::vector<uint8_t>(4 * 25 * 2).data(), {2, 5, 5, 4});
  CHECK_THROWS_WITH(load_image_npy(dir / "c4.npy"), Catch::Contains("C = 1 or 3"));

  // A folder: PNGs in name order (grey ones become RGB), other files skipped.
  fs::create_directories(dir / "pngs");
  for (int64_t n = 0; n < 3; ++n) {
    const std::string name = dir / ("pngs/img" + std::to_string(2 - n) + ".png");  // written in reverse order
    REQUIRE(stbi_write_png(name.c_str(), 4, 5, 3, im.pixels.data() + (2 - n) * 60, 12) != 0);
  }
  std::vector<uint8_t> g1(20);
  for (int i = 0; i < 20; ++i) g1[i] = static_cast<uint8_t>(i * 12);
  REQUIRE(stbi_write_png((dir / "pngs/img3.png").c_str(), 4, 5, 1, g1.data(), 4) != 0);
  diffuse::testing::write_bytes(dir / "pngs/notes.txt", {'h', 'i'});
  const ImageSet f = load_image_folder(dir / "pngs", 3);
  REQUIRE((f.n == 4 && f.height == 5 && f.width == 4 && f.channels == 3));
  CHECK(std::equal(im.pixels.begin(), im.pixels.end(), f.pixels.begin()));
  for (int i = 0; i < 20; ++i)
    for (int c = 0; c < 3; ++c) REQUIRE(f.pixels[size_t(180 + i * 3 + c)] == g1[i]);
  REQUIRE(stbi_write_png((dir / "pngs/img4.png").c_str(), 5, 5, 1, std::vector<uint8_t>(25, 9).data(), 5) != 0);
  CHECK_THROWS_WITH(load_image_folder(dir / "pngs", 3), Catch::Contains("all images must have one size"));
  CHECK_THROWS_WITH(load_image_folder(dir / "nosuch", 3), Catch::Contains("not a folder"));
}
