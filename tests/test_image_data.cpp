// Image data sets: CIFAR-10's binary batches (as files and inside a .tar.gz written here with
// libarchive), uint8 .npy arrays, folders of PNG (every colour type, 8 and 16 bits, written here
// byte by byte with zlib) and JPEG images, all with random pixels and labels; every error on a
// bad file, the [-1, 1] conversion, and the random horizontal flip (an exact mirror, about half
// the images, the same choices on resume).
#include <catch2/catch.hpp>

#include <cstdio>

#include "kernel_seed.hpp"

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <utility>
#include <random>
#include <string>
#include <vector>

#include <zlib.h>

#include <diffuse/data/augment.hpp>
#include <diffuse/data/image_folder.hpp>
#include <diffuse/data/image_set.hpp>

#include "archive_writer.hpp"
#include "skip.hpp"
#include "temp_files.hpp"

using namespace diffuse;
using Catch::Matchers::Contains;
using diffuse::testing::Bytes;
using diffuse::testing::write_archive;
using diffuse::testing::TempDir;
using diffuse::testing::write_bytes;

namespace {

// One generator for the whole program, its seed printed once (DIFFUSE_TEST_SEED replays it).
std::mt19937_64& rng() {
  static std::mt19937_64 r([] {
    const uint64_t seed = diffuse::testing::fresh_seed();
    std::printf("test_image_data: seed %llu (DIFFUSE_TEST_SEED replays it)\n", static_cast<unsigned long long>(seed));
    return seed;
  }());
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

// A PNG written chunk by chunk (zlib for IDAT and the CRCs), so that every colour type and bit
// depth can be made: colour type 0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA; `samples`
// holds the row-major samples (palette indices for type 3), 16-bit ones big-endian as PNG stores them.
Bytes png_file(int w, int h, int depth, int type, const Bytes& samples, const Bytes& palette = {}) {
  Bytes out{0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  auto be32 = [](Bytes& b, uint32_t v) {
    for (int k = 3; k >= 0; --k) b.push_back(static_cast<uint8_t>(v >> (8 * k)));
  };
  auto chunk = [&](const char* tag, const Bytes& data) {
    be32(out, static_cast<uint32_t>(data.size()));
    Bytes body(tag, tag + 4);
    body.insert(body.end(), data.begin(), data.end());
    out.insert(out.end(), body.begin(), body.end());
    be32(out, static_cast<uint32_t>(crc32(0, body.data(), static_cast<uInt>(body.size()))));
  };
  Bytes ihdr;
  be32(ihdr, static_cast<uint32_t>(w));
  be32(ihdr, static_cast<uint32_t>(h));
  ihdr.insert(ihdr.end(), {static_cast<uint8_t>(depth), static_cast<uint8_t>(type), 0, 0, 0});
  chunk("IHDR", ihdr);
  if (type == 3) chunk("PLTE", palette);
  const int per_pixel = type == 0 || type == 3 ? 1 : type == 2 ? 3 : type == 4 ? 2 : 4;
  const size_t row = static_cast<size_t>(w * per_pixel * depth / 8);
  Bytes raw;  // each row: filter byte 0 (none), then the row
  for (int y = 0; y < h; ++y) {
    raw.push_back(0);
    raw.insert(raw.end(), samples.begin() + static_cast<std::ptrdiff_t>(y * row),
               samples.begin() + static_cast<std::ptrdiff_t>((y + 1) * row));
  }
  uLongf n = compressBound(static_cast<uLong>(raw.size()));
  Bytes z(n);
  REQUIRE(compress(z.data(), &n, raw.data(), static_cast<uLong>(raw.size())) == Z_OK);
  z.resize(n);
  chunk("IDAT", z);
  chunk("IEND", {});
  return out;
}

Bytes random_bytes(size_t n) {
  std::uniform_int_distribution<int> byte(0, 255);
  Bytes b(n);
  for (auto& v : b) v = static_cast<uint8_t>(byte(rng()));
  return b;
}

}  // namespace

TEST_CASE("CIFAR-10 loads straight from cifar-10-binary.tar.gz, the same as from the folder", "[image_data]") {
  TempDir d("image_data", "cifar_archive");
  std::vector<int32_t> labels, test_labels;
  std::vector<uint8_t> pixels, test_pixels;
  std::vector<std::pair<std::string, Bytes>> members{{"cifar-10-batches-bin/batches.meta.txt", {'c', 'a', 't'}}};
  const int per[5] = {2, 1, 3, 1, 2};
  // Stored out of order: the loader orders the batches by name, not by position in the archive.
  for (int i : {4, 2, 0, 1, 3})
    members.push_back({"cifar-10-batches-bin/data_batch_" + std::to_string(i + 1) + ".bin", {}});
  std::vector<Bytes> batch(5);
  for (int i = 0; i < 5; ++i) batch[static_cast<size_t>(i)] = cifar_records(per[i], labels, pixels);
  for (auto& [name, bytes] : members)
    for (int i = 0; i < 5; ++i)
      if (name.find("data_batch_" + std::to_string(i + 1)) != std::string::npos) bytes = batch[static_cast<size_t>(i)];
  members.push_back({"cifar-10-batches-bin/test_batch.bin", cifar_records(2, test_labels, test_pixels)});
  std::filesystem::create_directories(d.path / "dl");
  const std::string tgz = d / "dl/cifar-10-binary.tar.gz";
  write_archive(tgz, members);

  for (const std::string& src : {tgz, d / "dl"}) {  // the archive, or the folder it was downloaded to
    INFO(src);
    const ImageSet train = load_cifar10(src);
    CHECK(train.n == 9);
    CHECK(train.labels == labels);
    CHECK(train.pixels == pixels);
    CHECK(train.class_names.size() == 10);
    const ImageSet test = load_cifar10(src, false);
    CHECK(test.labels == test_labels);
    CHECK(test.pixels == test_pixels);
  }
  // An uncompressed tar reads as well.
  write_archive(d / "plain.tar", members, "");
  CHECK(load_cifar10(d / "plain.tar").pixels == pixels);
}

TEST_CASE("CIFAR-10 archives: a missing batch, a bad member, a damaged or foreign file name the problem",
          "[image_data]") {
  TempDir d("image_data", "cifar_archive_bad");
  std::vector<int32_t> l;
  std::vector<uint8_t> p;
  const Bytes good = cifar_records(1, l, p);
  std::vector<std::pair<std::string, Bytes>> m;
  for (int i = 1; i <= 5; ++i) m.push_back({"x/data_batch_" + std::to_string(i) + ".bin", good});
  m.push_back({"x/test_batch.bin", good});

  auto without3 = m;
  without3.erase(without3.begin() + 2);
  write_archive(d / "no3.tar.gz", without3);
  CHECK_THROWS_WITH(load_cifar10(d / "no3.tar.gz"), Contains("no3.tar.gz") && Contains("no data_batch_3.bin"));
  CHECK(load_cifar10(d / "no3.tar.gz", false).n == 1);  // the test split is all there

  auto odd = m;
  odd[1].second.pop_back();
  write_archive(d / "odd.tar.gz", odd);
  CHECK_THROWS_WITH(load_cifar10(d / "odd.tar.gz"),
                    Contains("odd.tar.gz:x/data_batch_2.bin") && Contains("not a whole number"));

  auto label = m;
  label[4].second[0] = 11;
  write_archive(d / "label.tar.gz", label);
  CHECK_THROWS_WITH(load_cifar10(d / "label.tar.gz"), Contains("data_batch_5.bin") && Contains("label 11"));

  // Cut in the middle of the compressed stream.
  write_archive(d / "whole.tar.gz", m);
  Bytes whole = diffuse::testing::read_bytes(d / "whole.tar.gz");
  write_bytes(d / "cut.tar.gz", Bytes(whole.begin(), whole.begin() + static_cast<std::ptrdiff_t>(whole.size() / 2)));
  CHECK_THROWS_WITH(load_cifar10(d / "cut.tar.gz"), Contains("cut.tar.gz"));

  // Compressions whose decoders allocate what a stream's header asks for are not read (an xz
  // header of a few bytes made libarchive allocate 32 MB: tests/corpus/cifar_archive/oom-xz-dictionary);
  // bzip2 is (its blocks are at most 900 KB).
  write_archive(d / "whole.tar.xz", m, "xz");
  CHECK_THROWS_WITH(load_cifar10(d / "whole.tar.xz"), Contains("whole.tar.xz") && Contains("cannot open as an archive"));
  write_archive(d / "whole.tar.bz2", m, "bzip2");
  CHECK(load_cifar10(d / "whole.tar.bz2").n == 5);

  write_bytes(d / "noise.tar.gz", random_bytes(5000));
  CHECK_THROWS_WITH(load_cifar10(d / "noise.tar.gz"), Contains("noise.tar.gz"));
  CHECK_THROWS_WITH(load_cifar10(d / "nothing_here.tar.gz"), Contains("nothing_here.tar.gz"));
}

TEST_CASE("image folders: PNG of every colour type and depth, JPEG, class subfolders", "[image_data]") {
  TempDir d("image_data", "folders");
  namespace fs = std::filesystem;
  const int W = 5, H = 4, P = W * H;
  // Grey images: 8-bit, 16-bit (read as the high byte) and grey + alpha (the alpha dropped).
  fs::create_directories(d.path / "grey");
  const Bytes g8 = random_bytes(P), g16 = random_bytes(2 * P), ga = random_bytes(2 * P);
  write_bytes(d / "grey/a.png", png_file(W, H, 8, 0, g8));
  write_bytes(d / "grey/b.png", png_file(W, H, 16, 0, g16));
  write_bytes(d / "grey/c.png", png_file(W, H, 8, 4, ga));
  write_bytes(d / "grey/readme.txt", {'n', 'o'});
  const ImageSet grey = load_image_folder(d / "grey");
  REQUIRE((grey.n == 3 && grey.width == W && grey.height == H && grey.channels == 1));
  CHECK(grey.labels.empty());
  for (int i = 0; i < P; ++i) {
    INFO("pixel " << i);
    REQUIRE(grey.pixels[static_cast<size_t>(i)] == g8[static_cast<size_t>(i)]);
    REQUIRE(grey.pixels[static_cast<size_t>(P + i)] == g16[static_cast<size_t>(2 * i)]);
    REQUIRE(grey.pixels[static_cast<size_t>(2 * P + i)] == ga[static_cast<size_t>(2 * i)]);
  }
  // Asked for RGB: the grey values replicated.
  const ImageSet grey3 = load_image_folder(d / "grey", 3);
  REQUIRE(grey3.channels == 3);
  for (int i = 0; i < 3 * P; ++i)
    for (int c = 0; c < 3; ++c) REQUIRE(grey3.pixels[static_cast<size_t>(i * 3 + c)] == grey.pixels[static_cast<size_t>(i)]);

  // Colour: RGB 8 and 16 bits, a palette, RGBA (alpha dropped), and a grey image among them.
  fs::create_directories(d.path / "colour");
  const Bytes rgb = random_bytes(3 * P), rgb16 = random_bytes(6 * P), rgba = random_bytes(4 * P), pal = random_bytes(3 * 7);
  Bytes idx(P);
  for (int i = 0; i < P; ++i) idx[static_cast<size_t>(i)] = static_cast<uint8_t>(rng()() % 7);
  write_bytes(d / "colour/1.png", png_file(W, H, 8, 2, rgb));
  write_bytes(d / "colour/2.png", png_file(W, H, 16, 2, rgb16));
  write_bytes(d / "colour/3.png", png_file(W, H, 8, 3, idx, pal));
  write_bytes(d / "colour/4.PNG", png_file(W, H, 8, 6, rgba));
  write_bytes(d / "colour/5.png", png_file(W, H, 8, 0, g8));
  const ImageSet col = load_image_folder(d / "colour");
  REQUIRE((col.n == 5 && col.channels == 3));
  auto px = [&](int img, int i, int c) { return col.pixels[static_cast<size_t>((img * P + i) * 3 + c)]; };
  for (int i = 0; i < P; ++i)
    for (int c = 0; c < 3; ++c) {
      INFO("pixel " << i << " channel " << c);
      REQUIRE(px(0, i, c) == rgb[static_cast<size_t>(i * 3 + c)]);
      REQUIRE(px(1, i, c) == rgb16[static_cast<size_t>((i * 3 + c) * 2)]);
      REQUIRE(px(2, i, c) == pal[static_cast<size_t>(idx[static_cast<size_t>(i)] * 3 + c)]);
      REQUIRE(px(3, i, c) == rgba[static_cast<size_t>(i * 4 + c)]);
      REQUIRE(px(4, i, c) == g8[static_cast<size_t>(i)]);
    }
  CHECK_THROWS_WITH(load_image_folder(d / "colour", 1), Contains("1.png") && Contains("colour image"));

  // JPEG (lossy): a smooth image comes back close.
  fs::create_directories(d.path / "jpeg");
  Bytes smooth(static_cast<size_t>(16 * 16 * 3));
  for (int y = 0; y < 16; ++y)
    for (int x = 0; x < 16; ++x)
      for (int c = 0; c < 3; ++c) smooth[static_cast<size_t>((y * 16 + x) * 3 + c)] = static_cast<uint8_t>(40 + 8 * x + 4 * y + 20 * c);
  REQUIRE(stbi_write_jpg((d / "jpeg/a.jpg").c_str(), 16, 16, 3, smooth.data(), 100) != 0);
  const ImageSet jpg = load_image_folder(d / "jpeg");
  REQUIRE((jpg.n == 1 && jpg.width == 16 && jpg.channels == 3));
  double err = 0;
  for (size_t i = 0; i < smooth.size(); ++i) err += std::abs(double(jpg.pixels[i]) - smooth[i]);
  CHECK(err / static_cast<double>(smooth.size()) < 3.0);

  // Class subfolders (torchvision's ImageFolder): labels by folder name order.
  for (const char* c : {"pets/dog", "pets/cat", "pets/empty"}) fs::create_directories(d.path / c);
  write_bytes(d / "pets/dog/x.png", png_file(W, H, 8, 0, g8));
  write_bytes(d / "pets/dog/y.png", png_file(W, H, 8, 0, g8));
  write_bytes(d / "pets/cat/z.png", png_file(W, H, 8, 2, rgb));
  const ImageSet pets = load_image_folder(d / "pets");
  CHECK(pets.n == 3);
  CHECK(pets.channels == 3);
  CHECK(pets.labels == std::vector<int32_t>{0, 1, 1});
  CHECK(pets.class_names == std::vector<std::string>{"cat", "dog"});
  CHECK(pets.classes == 2);
}

TEST_CASE("image folders: mixed sizes, undecodable and damaged files, empty folders name the file", "[image_data]") {
  TempDir d("image_data", "folders_bad");
  namespace fs = std::filesystem;
  fs::create_directories(d.path / "sizes");
  write_bytes(d / "sizes/a.png", png_file(5, 4, 8, 0, random_bytes(20)));
  write_bytes(d / "sizes/b.png", png_file(4, 4, 8, 0, random_bytes(16)));
  CHECK_THROWS_WITH(load_image_folder(d / "sizes"), Contains("b.png") && Contains("all images must have one size"));

  fs::create_directories(d.path / "garbage");
  write_bytes(d / "garbage/a.png", png_file(5, 4, 8, 0, random_bytes(20)));
  write_bytes(d / "garbage/b.jpg", random_bytes(300));
  CHECK_THROWS_WITH(load_image_folder(d / "garbage"), Contains("b.jpg") && Contains("cannot read image"));

  // A header that claims 20000 x 20000 pixels in a few bytes: refused before anything is allocated.
  fs::create_directories(d.path / "huge");
  Bytes huge = png_file(1, 1, 8, 0, random_bytes(1));
  const uint8_t big[8] = {0, 0, 0x4E, 0x20, 0, 0, 0x4E, 0x20};
  std::copy(big, big + 8, huge.begin() + 16);  // IHDR width and height, with a CRC that matches them
  const uint32_t crc = static_cast<uint32_t>(crc32(crc32(0L, nullptr, 0), huge.data() + 12, 17));
  for (int k = 0; k < 4; ++k) huge[29 + static_cast<size_t>(k)] = static_cast<uint8_t>(crc >> (24 - 8 * k));
  write_bytes(d / "huge/a.png", huge);
  CHECK_THROWS_WITH(load_image_folder(d / "huge"), Contains("a.png") && Contains("claims 20000x20000 pixels"));

  // A PNG whose pixel data was damaged: stb would decode it (it ignores CRCs); the chunk check
  // refuses it, naming the chunk. And one cut short of its IEND chunk.
  fs::create_directories(d.path / "crc");
  Bytes bad = png_file(5, 4, 8, 0, random_bytes(20));
  bad[8 + 25 + 8 + 2] ^= 0x01;  // a byte of IDAT's data (after the signature, IHDR and IDAT's header)
  write_bytes(d / "crc/a.png", bad);
  CHECK_THROWS_WITH(load_image_folder(d / "crc"), Contains("a.png") && Contains("CRC of its IDAT chunk"));
  fs::create_directories(d.path / "no_iend");
  Bytes cut = png_file(5, 4, 8, 0, random_bytes(20));
  cut.resize(cut.size() - 12);  // the IEND chunk
  write_bytes(d / "no_iend/a.png", cut);
  CHECK_THROWS_WITH(load_image_folder(d / "no_iend"), Contains("a.png") && Contains("truncated PNG"));

  // Pixel data that does not decode after a good header.
  fs::create_directories(d.path / "truncated");
  Bytes t = png_file(5, 4, 8, 2, random_bytes(60));
  t.resize(t.size() - 30);
  write_bytes(d / "truncated/a.png", t);
  CHECK_THROWS_WITH(load_image_folder(d / "truncated"), Contains("a.png"));

  // A PPM whose width has 10 digits: stb would overflow an int reading it (undefined behaviour,
  // found by scripts/fuzz.sh: tests/corpus/png/crash-ppm-10-digit-size); refused before stb.
  fs::create_directories(d.path / "pnm");
  const std::string ppm = "P6\n6655555555 5\n255\n";
  write_bytes(d / "pnm/a.ppm", Bytes(ppm.begin(), ppm.end()));
  CHECK_THROWS_WITH(load_image_folder(d / "pnm"), Contains("a.ppm") && Contains("more than 9 digits"));

  // A 16-bit PGM beside a colour image: the folder reads as RGB, and stb would overrun its buffer
  // converting the 16-bit grey samples (found by scripts/fuzz.sh through train_2d --image:
  // tests/corpus/image_points/crash-pgm-16-bit-as-rgba); refused before stb.
  fs::create_directories(d.path / "pgm16");
  write_bytes(d / "pgm16/a.png", png_file(2, 2, 8, 2, random_bytes(12)));
  std::string pgm = "P5\n2 2\n65535\n";
  pgm += std::string(8, '\x7f');
  write_bytes(d / "pgm16/b.pgm", Bytes(pgm.begin(), pgm.end()));
  CHECK_THROWS_WITH(load_image_folder(d / "pgm16"), Contains("b.pgm") && Contains("a 16-bit PGM/PPM (maximum value 65535)"));

  // A JPEG whose Huffman table claims more than 256 codes: stb wrote past its 257-entry table
  // (found by scripts/fuzz.sh: tests/corpus/png/crash-jpeg-huffman-257-codes); libjpeg-turbo,
  // which decodes JPEGs now, refuses it, and the message names the file.
  fs::create_directories(d.path / "jpeg");
  const Bytes jpg{0xFF, 0xD8, 0xFF, 0xC4, 0x00, 0x13, 0x00, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
                  0x20, 0, 0, 0, 0, 0, 0, 0xFF, 0xD9};
  write_bytes(d / "jpeg/a.jpg", jpg);
  CHECK_THROWS_WITH(load_image_folder(d / "jpeg"), Contains("a.jpg") && Contains("damaged or unsupported JPEG: Bogus Huffman table definition"));

  // A progressive JPEG whose AC scan comes before the AC table it names: stb decoded with a table
  // it never built, from uninitialised memory (found by scripts/fuzz.sh:
  // tests/corpus/png/crash-jpeg-scan-before-its-huffman-table); libjpeg-turbo's warning about
  // its stray bytes is an error here (TJFLAG_STOPONWARNING).
  fs::create_directories(d.path / "jpeg_order");
  fs::copy_file(std::string(DIFFUSE_SOURCE_DIR) + "/tests/corpus/png/crash-jpeg-scan-before-its-huffman-table",
                d / "jpeg_order/a.jpg");
  CHECK_THROWS_WITH(load_image_folder(d / "jpeg_order"),
                    Contains("a.jpg") && Contains("damaged or unsupported JPEG: Corrupt JPEG data"));

  // A JPEG that stb's JPEG test rejects, with a PPM header at byte 128: stb reading the file
  // itself rewound only to byte 128 and parsed that header, unchecked (a 10-digit number there;
  // found by scripts/fuzz.sh: tests/corpus/png/crash-ppm-header-at-byte-128-of-a-jpeg). The checks
  // and the decoders now read the same bytes from memory (stb: PNG, BMP and PNM only; JPEG:
  // libjpeg-turbo, which finds its markers damaged).
  fs::create_directories(d.path / "jpeg_ppm");
  fs::copy_file(std::string(DIFFUSE_SOURCE_DIR) + "/tests/corpus/png/crash-ppm-header-at-byte-128-of-a-jpeg",
                d / "jpeg_ppm/a.jpg");
  CHECK_THROWS_WITH(load_image_folder(d / "jpeg_ppm"),
                    Contains("a.jpg") && Contains("damaged or unsupported JPEG: Bogus marker length"));

  fs::create_directories(d.path / "empty/sub");
  CHECK_THROWS_WITH(load_image_folder(d / "empty"), Contains("empty") && Contains("no image files"));
  CHECK_THROWS_WITH(load_image_folder(d / "nosuch"), Contains("nosuch") && Contains("not a folder"));
  CHECK_THROWS_WITH(load_image_folder(d / "sizes", 2), Contains("channels"));
}

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

TEST_CASE("image folders: a JPEG gives PIL's pixels (pytorch-fid's and torchvision's loader)", "[image_data]") {
  // libjpeg-turbo with TurboJPEG's defaults (accurate integer IDCT, smooth chroma upsampling) is
  // what PIL decodes with, so FID statistics of a JPEG folder match pytorch-fid's. PIL encodes
  // random pixels at quality 75 (4:2:0 chroma in colour: upsampling exercised) at odd sizes (the
  // partial blocks at the edges), in colour and grey, and decodes them; our bytes must equal its.
  const std::string python = DIFFUSE_TORCH_PYTHON;
  if (python.empty()) DIFFUSE_SKIP("no python3 with PIL (python3-torchvision)");
  namespace fs = std::filesystem;
  TempDir d("image_data", "jpeg_pil");
  const int W = 21, H = 13;
  for (const auto& [mode, ch] : {std::pair<std::string, int>{"RGB", 3}, std::pair<std::string, int>{"L", 1}}) {
    fs::create_directories(d.path / mode);
    Bytes px(static_cast<size_t>(W * H * ch));
    for (auto& b : px) b = static_cast<uint8_t>(rng()() & 0xFF);
    write_bytes(d / (mode + ".in"), px);
    const std::string cmd = "'" + python + "' -c \"import sys; from PIL import Image; "
                            "Image.frombytes(sys.argv[1], (21, 13), open(sys.argv[2], 'rb').read())"
                            ".save(sys.argv[3], quality=75); "
                            "open(sys.argv[4], 'wb').write(Image.open(sys.argv[3]).tobytes())\" " +
                            mode + " '" + (d / (mode + ".in")) + "' '" + (d / (mode + "/a.jpg")) + "' '" +
                            (d / (mode + ".pil")) + "'";
    REQUIRE(std::system(cmd.c_str()) == 0);
    std::ifstream f(d / (mode + ".pil"), std::ios::binary);
    const Bytes pil((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    const ImageSet ours = load_image_folder(d / mode);
    INFO(mode << ": " << ours.n << " images of " << ours.width << "x" << ours.height << "x" << ours.channels);
    REQUIRE((ours.n == 1 && ours.width == W && ours.height == H && ours.channels == ch));
    REQUIRE(pil.size() == ours.pixels.size());
    size_t differ = 0, near = 0;
    for (size_t i = 0; i < pil.size(); ++i) differ += pil[i] != ours.pixels[i];
    for (size_t i = 0; i < pil.size(); ++i) near += std::abs(int(pil[i]) - int(px[i])) < 64;
    INFO(differ << " of " << pil.size() << " bytes differ from PIL's");
    CHECK(differ == 0);
    CHECK(near > pil.size() / 2);  // the decode is the image, not a constant both agree on
  }
}
