// Image data sets: CIFAR-10's binary batches and uint8 .npy arrays (written here with random
// pixels and labels), every error on a bad file, the [-1, 1] conversion, and the random
// horizontal flip (an exact mirror, about half the images, the same choices on resume).
#include <catch2/catch.hpp>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <diffuse/data/augment.hpp>
#include <diffuse/data/image_set.hpp>

#include "temp_files.hpp"

using namespace diffuse;
using Catch::Matchers::Contains;
using diffuse::testing::Bytes;
using diffuse::testing::TempDir;
using diffuse::testing::write_bytes;

namespace {

std::mt19937_64& rng() {
  static std::mt19937_64 r(std::random_device{}());
  return r;
}

// m random CIFAR-10 records; the labels and the NHWC pixels they should load as.
Bytes cifar_records(int m, std::vector<int32_t>& labels, std::vector<uint8_t>& nhwc) {
  std::uniform_int_distribution<int> byte(0, 255), label(0, 9);
  Bytes b;
  for (int i = 0; i < m; ++i) {
    const int y = label(rng());
    labels.push_back(y);
    b.push_back(static_cast<uint8_t>(y));
    std::vector<uint8_t> planes(3072);
    for (auto& v : planes) v = static_cast<uint8_t>(byte(rng()));
    b.insert(b.end(), planes.begin(), planes.end());
    for (int p = 0; p < 1024; ++p)
      for (int c = 0; c < 3; ++c) nhwc.push_back(planes[static_cast<size_t>(c * 1024 + p)]);
  }
  return b;
}

}  // namespace

TEST_CASE("CIFAR-10 binary batches load as NHWC images with their labels", "[image_data]") {
  TempDir d("image_data", "cifar");
  const auto root = d.path / "cifar-10-batches-bin";
  std::filesystem::create_directories(root);
  std::vector<int32_t> labels;
  std::vector<uint8_t> pixels;
  const int per[5] = {3, 1, 4, 1, 5};
  for (int i = 0; i < 5; ++i)
    write_bytes((root / ("data_batch_" + std::to_string(i + 1) + ".bin")).string(), cifar_records(per[i], labels, pixels));
  std::vector<int32_t> test_labels;
  std::vector<uint8_t> test_pixels;
  write_bytes((root / "test_batch.bin").string(), cifar_records(2, test_labels, test_pixels));

  const ImageSet train = load_cifar10(d.path.string());  // the parent of cifar-10-batches-bin/
  CHECK(train.n == 14);
  CHECK(train.height == 32);
  CHECK(train.width == 32);
  CHECK(train.channels == 3);
  CHECK(train.classes == 10);
  CHECK(train.labels == labels);
  CHECK(train.pixels == pixels);
  const ImageSet test = load_cifar10(root.string(), false);
  CHECK(test.labels == test_labels);
  CHECK(test.pixels == test_pixels);

  const Tensor<float> x = image_tensor(train);
  CHECK(x.shape() == Shape{14, 32, 32, 3});
  // pixel / 255 * 2 - 1 in float, as the U-Net trainers scale MNIST; every value in [-1, 1].
  size_t wrong = 0;
  for (size_t i = 0; i < pixels.size(); ++i)
    wrong += x[i] != static_cast<float>(pixels[i]) / 255.0f * 2.0f - 1.0f || x[i] < -1.0f || x[i] > 1.0f;
  CHECK(wrong == 0);
}

TEST_CASE("CIFAR-10 loader names the file and the problem", "[image_data]") {
  TempDir d("image_data", "cifar_bad");
  std::vector<int32_t> l;
  std::vector<uint8_t> p;
  Bytes good = cifar_records(2, l, p);

  Bytes cut(good.begin(), good.end() - 100);
  write_bytes(d / "cut.bin", cut);
  CHECK_THROWS_WITH(load_cifar10_bin({d / "cut.bin"}), Contains("cut.bin") && Contains("not a whole number"));

  write_bytes(d / "empty.bin", {});
  CHECK_THROWS_WITH(load_cifar10_bin({d / "empty.bin"}), Contains("empty.bin"));

  Bytes bad = good;
  bad[3073] = 10;  // the second record's label
  write_bytes(d / "label.bin", bad);
  CHECK_THROWS_WITH(load_cifar10_bin({d / "label.bin"}), Contains("label.bin") && Contains("record 1 has label 10"));

  CHECK_THROWS_WITH(load_cifar10_bin({d / "missing.bin"}), Contains("missing.bin") && Contains("cannot read"));
  CHECK_THROWS_WITH(load_cifar10(d.path.string()), Contains("data_batch_1.bin"));
}

TEST_CASE("uint8 .npy images load from NHWC and NCHW alike, with labels", "[image_data]") {
  TempDir d("image_data", "npy");
  std::uniform_int_distribution<int> byte(0, 255), label(0, 6);
  const int64_t N = 5, H = 4, W = 6, C = 3;
  std::vector<uint8_t> nhwc(static_cast<size_t>(N * H * W * C)), nchw(nhwc.size());
  for (auto& v : nhwc) v = static_cast<uint8_t>(byte(rng()));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < H * W; ++p) nchw[static_cast<size_t>((n * C + c) * H * W + p)] = nhwc[static_cast<size_t>((n * H * W + p) * C + c)];
  std::vector<int64_t> y(N);
  for (auto& v : y) v = label(rng());
  y[2] = 6;
  npy::save<uint8_t>(d / "nhwc.npy", nhwc.data(), {N, H, W, C});
  npy::save<uint8_t>(d / "nchw.npy", nchw.data(), {N, C, H, W});
  npy::save<int64_t>(d / "y.npy", y.data(), {N});

  const ImageSet a = load_image_npy(d / "nhwc.npy", d / "y.npy");
  const ImageSet b = load_image_npy(d / "nchw.npy", d / "y.npy", 10);
  CHECK(a.n == N);
  CHECK(a.height == H);
  CHECK(a.width == W);
  CHECK(a.channels == C);
  CHECK(a.pixels == nhwc);
  CHECK(b.pixels == nhwc);
  CHECK(a.labels == std::vector<int32_t>(y.begin(), y.end()));
  CHECK(a.classes == 7);  // the largest label + 1
  CHECK(b.classes == 10);
  const ImageSet u = load_image_npy(d / "nhwc.npy");
  CHECK(u.labels.empty());
  CHECK(u.classes == 0);
  // [N, H, W] is grey; a shape that reads both ways is NCHW (as the fid tool reads it).
  npy::save<uint8_t>(d / "grey.npy", nhwc.data(), {N, H, W * C});
  const ImageSet grey = load_image_npy(d / "grey.npy");
  CHECK(grey.channels == 1);
  CHECK(grey.width == W * C);
  CHECK(grey.pixels == nhwc);
  npy::save<uint8_t>(d / "both.npy", nhwc.data(), {N, 3, H * W / 3, 3});
  const ImageSet both = load_image_npy(d / "both.npy");
  CHECK(both.channels == 3);
  CHECK(both.height == H * W / 3);
  CHECK(both.width == 3);
  CHECK(both.pixels[1] == nhwc[static_cast<size_t>(H * W)]);  // pixel 0's channel 1 is the second plane's first byte

  // Errors, each naming its file.
  std::vector<float> f(nhwc.begin(), nhwc.end());
  npy::save<float>(d / "float.npy", f.data(), {N, H, W, C});
  CHECK_THROWS_WITH(load_image_npy(d / "float.npy"), Contains("float.npy") && Contains("uint8"));
  npy::save<uint8_t>(d / "flat.npy", nhwc.data(), {N, H * W * C});
  CHECK_THROWS_WITH(load_image_npy(d / "flat.npy"), Contains("flat.npy") && Contains("2-dimensional"));
  CHECK_THROWS_WITH(load_image_npy(d / "grey.npy", d / "y.npy", 5), Contains("y.npy"));
  npy::save<uint8_t>(d / "c4.npy", nhwc.data(), {N, 2, 9, 4});
  CHECK_THROWS_WITH(load_image_npy(d / "c4.npy"), Contains("c4.npy") && Contains("C = 1 or 3"));
  npy::save<int64_t>(d / "short.npy", y.data(), {N - 1});
  CHECK_THROWS_WITH(load_image_npy(d / "nhwc.npy", d / "short.npy"), Contains("short.npy") && Contains("one label per image"));
  CHECK_THROWS_WITH(load_image_npy(d / "nhwc.npy", d / "y.npy", 5), Contains("y.npy") && Contains("label 6 outside [0, 5)"));
  npy::save<float>(d / "yf.npy", f.data(), {N});
  CHECK_THROWS_WITH(load_image_npy(d / "nhwc.npy", d / "yf.npy"), Contains("yf.npy") && Contains("integers"));
}

TEST_CASE("random horizontal flips mirror about half the images, the same ones on replay", "[image_data]") {
  const int64_t N = 64, H = 3, W = 5, C = 2;
  Generator init(rng()());
  Tensor<float> data = Tensor<float>::randn({N, H, W, C}, init);
  TensorDataset<float> inner(data, {}, DataOrder::epochs, 7);
  RandomHorizontalFlip<float> flips(inner);
  const uint64_t seed = rng()();
  Generator g(seed);
  Batch<float> b;
  flips.next(N, g, b);
  const std::vector<uint8_t> chosen = flips.last_flips();
  const std::vector<uint32_t> order = inner.permutation(0);
  int64_t mirrored = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t src = order[static_cast<size_t>(i)];
    mirrored += chosen[static_cast<size_t>(i)];
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w)
        for (int64_t c = 0; c < C; ++c) {
          const int64_t sw = chosen[static_cast<size_t>(i)] ? W - 1 - w : w;
          REQUIRE(b.x0[static_cast<size_t>(((i * H + h) * W + w) * C + c)] ==
                  data[static_cast<size_t>(((src * H + h) * W + sw) * C + c)]);
        }
  }
  CHECK(mirrored > 16);  // Binomial(64, 1/2): outside [17, 47] with probability < 1e-4
  CHECK(mirrored < 48);

  // The choices come from the training stream: the same stream position gives the same flips.
  TensorDataset<float> inner2(data, {}, DataOrder::epochs, 7);
  RandomHorizontalFlip<float> again(inner2);
  Generator g2(seed);
  Batch<float> b2;
  again.next(N, g2, b2);
  CHECK(again.last_flips() == chosen);
  CHECK(g2.offset == g.offset);
  CHECK(flips.describe() == inner.describe() + ", random horizontal flips");

  Tensor<float> wrong({N, H * W * C});
  CHECK_THROWS_WITH(flip_horizontal(wrong, chosen), Contains("[B, H, W, C]"));
}
