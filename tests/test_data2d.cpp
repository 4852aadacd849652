// Tests for the 2-D toy datasets, the energy distance and the PNG plotter.
#include <catch2/catch.hpp>

#include "kernel_seed.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include <diffuse/data/points2d.hpp>
#include <diffuse/eval/metrics2d.hpp>
#include <diffuse/viz/image_grid.hpp>
#include <diffuse/viz/plot.hpp>

using namespace diffuse;
using Catch::Matchers::Contains;

namespace {

// A per-process temp path, so parallel test runs do not collide.
std::string temp_path(const std::string& leaf) {
  return (std::filesystem::temp_directory_path() / ("diffuse_test_" + std::to_string(getpid()) + "_" + leaf)).string();
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream(path) << text;
}

struct Moments {
  double mx = 0, my = 0, sx = 0, sy = 0;
};
Moments moments(const std::vector<float>& xy) {
  Moments m;
  const size_t n = xy.size() / 2;
  for (size_t i = 0; i < n; ++i) { m.mx += xy[2 * i]; m.my += xy[2 * i + 1]; }
  m.mx /= n;
  m.my /= n;
  for (size_t i = 0; i < n; ++i) {
    m.sx += (xy[2 * i] - m.mx) * (xy[2 * i] - m.mx);
    m.sy += (xy[2 * i + 1] - m.my) * (xy[2 * i + 1] - m.my);
  }
  m.sx = std::sqrt(m.sx / n);
  m.sy = std::sqrt(m.sy / n);
  return m;
}

std::vector<float> gaussian_cloud(uint64_t seed, size_t n, float shift_x) {
  Generator g(seed);
  std::vector<float> xy(2 * n);
  g.normal(xy.data(), xy.size());
  for (size_t i = 0; i < n; ++i) xy[2 * i] += shift_x;
  return xy;
}

}  // namespace

TEST_CASE("built-in datasets are finite, standardised and reproducible", "[data2d]") {
  for (const std::string& name : data2d::dataset_names()) {
    SECTION(name) {
      auto d = data2d::make_dataset(name);
      REQUIRE(d->name() == name);
      const size_t n = 10000;
      std::vector<float> a(2 * n), b(2 * n), c(2 * n);
      Generator g1(1234), g2(1234), g3(999);
      d->sample(g1, n, a.data());
      d->sample(g2, n, b.data());
      d->sample(g3, n, c.data());
      for (float v : a) REQUIRE(std::isfinite(v));
      const Moments m = moments(a);
      CHECK(std::abs(m.mx) < 0.5);
      CHECK(std::abs(m.my) < 0.5);
      CHECK(m.sx > 0.3);
      CHECK(m.sx < 3.0);
      CHECK(m.sy > 0.3);
      CHECK(m.sy < 3.0);
      CHECK(a == b);  // same seed, same offset: same points
      CHECK(a != c);
      CHECK(g1.offset == g2.offset);  // the draw advanced the stream
      CHECK(g1.offset > 0);

      // to_data_space and to_model_space are inverse maps.
      std::vector<float> back = a;
      d->to_data_space(back.data(), n);
      d->to_model_space(back.data(), n);
      for (size_t i = 0; i < 2 * n; ++i) REQUIRE(back[i] == Approx(a[i]).margin(1e-4));
    }
  }
}

TEST_CASE("8gaussians is the reference definition, unscaled", "[data2d]") {
  auto d = data2d::make_dataset("8gaussians");
  CHECK(d->normalization().scale == 1.0f);
  const size_t n = 4000;
  std::vector<float> xy(2 * n);
  Generator g(7);
  d->sample(g, n, xy.data());
  for (size_t i = 0; i < n; ++i) {
    const double r = std::hypot(xy[2 * i], xy[2 * i + 1]);
    REQUIRE(std::abs(r - 2.0) < 0.6);  // 6 sigma of the 0.1 std
  }
}

TEST_CASE("the six is a 32x32 raster of dark pixels, upright", "[data2d]") {
  auto six = data2d::make_six();
  CHECK(six->width() >= 28);
  CHECK(six->height() >= 28);
  CHECK(six->count() > 100);
  // In data space the points are pixel coordinates with y up: inside the raster.
  const size_t n = 5000;
  std::vector<float> xy(2 * n);
  Generator g(3);
  six->sample(g, n, xy.data());
  six->to_data_space(xy.data(), n);
  double top_x = 0, bottom_x = 0;
  size_t nt = 0, nb = 0;
  for (size_t i = 0; i < n; ++i) {
    REQUIRE(xy[2 * i] >= -1e-3);
    REQUIRE(xy[2 * i] <= six->width() + 1e-3);
    REQUIRE(xy[2 * i + 1] >= -1e-3);
    REQUIRE(xy[2 * i + 1] <= six->height() + 1e-3);
    if (xy[2 * i + 1] > 0.8 * six->height()) { top_x += xy[2 * i]; ++nt; }
    if (xy[2 * i + 1] < 0.3 * six->height()) { bottom_x += xy[2 * i]; ++nb; }
  }
  // A 6 has its stem ending at the top right and the loop at the bottom:
  // the top rows of ink lie right of the bottom rows (upside down it would flip).
  REQUIRE(nt > 0);
  REQUIRE(nb > 0);
  CHECK(top_x / nt > bottom_x / nb);
}

TEST_CASE("unknown dataset names are rejected with the valid ones listed", "[data2d]") {
  REQUIRE_THROWS_AS(data2d::make_dataset("spiral"), std::invalid_argument);
  try {
    data2d::make_dataset("spiral");
  } catch (const std::invalid_argument& e) {
    const std::string msg = e.what();
    CHECK_THAT(msg, Contains("spiral"));
    for (const std::string& name : data2d::dataset_names()) CHECK_THAT(msg, Contains(name));
  }
}

TEST_CASE("CSV loader round-trips points and standardises them", "[data2d][csv]") {
  const std::string path = temp_path("points.csv");
  write_text(path, "x, y\n  1.5 , 2\n\n-3,4.25\r\n 10 ,-1e1\n  \n+0.5,0\n");
  auto d = data2d::load_csv(path);
  auto* ps = dynamic_cast<data2d::PointSet*>(d.get());
  REQUIRE(ps != nullptr);
  REQUIRE(ps->count() == 4);
  const std::vector<float> expect = {1.5f, 2.0f, -3.0f, 4.25f, 10.0f, -10.0f, 0.5f, 0.0f};
  CHECK(ps->points() == expect);

  // Standardised: zero mean, one pooled std for both axes.
  const auto& nm = d->normalization();
  CHECK(nm.mean_x == Approx(2.25));
  CHECK(nm.mean_y == Approx(-0.9375));
  std::vector<float> model = expect;
  d->to_model_space(model.data(), 4);
  const Moments m = moments(model);
  CHECK(m.mx == Approx(0.0).margin(1e-6));
  CHECK(m.my == Approx(0.0).margin(1e-6));
  CHECK(0.5 * (m.sx * m.sx + m.sy * m.sy) == Approx(1.0).epsilon(1e-5));

  // Samples are stored points (with replacement), all of them eventually.
  const size_t n = 400;
  std::vector<float> xy(2 * n);
  Generator g(11);
  d->sample(g, n, xy.data());
  d->to_data_space(xy.data(), n);
  std::vector<int> hits(4, 0);
  for (size_t i = 0; i < n; ++i) {
    int found = -1;
    for (int k = 0; k < 4; ++k)
      if (std::abs(xy[2 * i] - expect[2 * k]) < 1e-4 && std::abs(xy[2 * i + 1] - expect[2 * k + 1]) < 1e-4) found = k;
    REQUIRE(found >= 0);
    ++hits[found];
  }
  for (int h : hits) CHECK(h > 0);
  std::remove(path.c_str());
}

TEST_CASE("CSV loader errors name the file and line", "[data2d][csv]") {
  const std::string path = temp_path("bad.csv");
  write_text(path, "x,y\n1,2\n3,4\n5;6\n7,8\n");
  REQUIRE_THROWS_WITH(data2d::load_csv(path), Contains(path + ":4"));

  write_text(path, "x,y\n1,2\n");
  REQUIRE_THROWS_WITH(data2d::load_csv(path), Contains("at least 2"));

  write_text(path, "1,2\n3,abc\n");
  REQUIRE_THROWS_WITH(data2d::load_csv(path), Contains(path + ":2"));
  std::remove(path.c_str());

  const std::string missing = temp_path("does_not_exist.csv");
  REQUIRE_THROWS_WITH(data2d::load_csv(missing), Contains(missing));
}

TEST_CASE("image loader keeps the dark pixels, y up", "[data2d][image]") {
  // 20 x 16 white image with a black 5x5 square at columns 5..9, rows 3..7.
  const int W = 20, H = 16;
  std::vector<unsigned char> rgb(3 * W * H, 255);
  for (int r = 3; r <= 7; ++r)
    for (int c = 5; c <= 9; ++c)
      for (int k = 0; k < 3; ++k) rgb[3 * (r * W + c) + k] = 0;
  const std::string path = temp_path("square.png");
  REQUIRE(stbi_write_png(path.c_str(), W, H, 3, rgb.data(), 3 * W) != 0);

  auto d = data2d::load_image(path);
  auto* pc = dynamic_cast<data2d::PixelCloud*>(d.get());
  REQUIRE(pc != nullptr);
  CHECK(pc->count() == 25);
  CHECK(pc->width() == W);
  CHECK(pc->height() == H);

  const size_t n = 5000;
  std::vector<float> xy(2 * n);
  Generator g(5);
  d->sample(g, n, xy.data());
  const Moments m = moments(xy);
  CHECK(std::abs(m.mx) < 0.05);
  CHECK(std::abs(m.my) < 0.05);
  d->to_data_space(xy.data(), n);
  // Rows 3..7 from the top are y in [H-8, H-3] with y up.
  for (size_t i = 0; i < n; ++i) {
    REQUIRE(xy[2 * i] >= 5.0f - 1e-3f);
    REQUIRE(xy[2 * i] <= 10.0f + 1e-3f);
    REQUIRE(xy[2 * i + 1] >= float(H - 8) - 1e-3f);
    REQUIRE(xy[2 * i + 1] <= float(H - 3) + 1e-3f);
  }
  std::remove(path.c_str());

  // All white: no dark pixel.
  std::vector<unsigned char> white(3 * W * H, 255);
  REQUIRE(stbi_write_png(path.c_str(), W, H, 3, white.data(), 3 * W) != 0);
  REQUIRE_THROWS_WITH(data2d::load_image(path), Contains("no dark pixel"));
  std::remove(path.c_str());

  const std::string missing = temp_path("missing.png");
  REQUIRE_THROWS_WITH(data2d::load_image(missing), Contains(missing));
}

TEST_CASE("image loader (train_2d --image) checks a file's headers before stb decodes it", "[data2d][image]") {
  // The checks of image folders: the files fuzzing found stb misreading, and a damaged PNG.
  const std::string corpus = std::string(DIFFUSE_SOURCE_DIR) + "/tests/corpus/png/";
  CHECK_THROWS_WITH(data2d::load_image(corpus + "crash-ppm-10-digit-size"),
                    Contains("load_image: ") && Contains("crash-ppm-10-digit-size"));
  // Fill bytes before the JPEG's start marker: stb skipped them and overran a Huffman table;
  // no decoder here takes the file now.
  CHECK_THROWS_WITH(data2d::load_image(corpus + "crash-jpeg-huffman-257-codes"),
                    Contains("load_image: ") && Contains("crash-jpeg-huffman-257-codes") &&
                        Contains("unknown image type"));
  CHECK_THROWS_WITH(data2d::load_image(corpus + "crash-jpeg-negative-bit-count"),
                    Contains("load_image: ") && Contains("damaged or unsupported JPEG"));
  // A 16-bit PPM (maximum value 665): stb overran its buffer converting it to RGBA (fuzzing, image_points).
  CHECK_THROWS_WITH(data2d::load_image(corpus + "crash-pgm-16-bit-as-rgba"),
                    Contains("load_image: ") && Contains("a 16-bit PGM/PPM (maximum value 665)"));
  const int W = 8, H = 8;
  std::vector<unsigned char> grey(W * H, 0);
  const std::string path = temp_path("damaged.png");
  REQUIRE(stbi_write_png(path.c_str(), W, H, 1, grey.data(), W) != 0);
  {  // one byte of the image data changed: its chunk's CRC no longer holds
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    std::string b((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    const size_t idat = b.find("IDAT");
    REQUIRE(idat != std::string::npos);
    f.seekp(static_cast<std::streamoff>(idat + 6));
    f.put(static_cast<char>(b[idat + 6] ^ 0x5a));
  }
  CHECK_THROWS_WITH(data2d::load_image(path), Contains("load_image: ") && Contains("damaged.png") && Contains("CRC"));
  std::remove(path.c_str());
}

TEST_CASE("energy distance", "[metrics]") {
  const std::vector<float> a = gaussian_cloud(1, 300, 0.0f);

  SECTION("zero for identical sets") {
    CHECK(metrics::energy_distance(a, a) < 1e-12);
  }

  SECTION("grows with the shift between Gaussian clouds") {
    double prev = -1.0;
    for (float shift : {0.0f, 0.25f, 0.5f, 1.0f, 2.0f, 4.0f}) {
      const double ed = metrics::energy_distance(a, gaussian_cloud(2, 300, shift));
      CHECK(ed >= 0.0);
      CHECK(ed > prev);
      prev = ed;
    }
  }

  SECTION("matches a naive double loop and is symmetric") {
    const std::vector<float> p = gaussian_cloud(3, 37, 0.3f), q = gaussian_cloud(4, 53, -0.2f);
    auto mean_dist = [](const std::vector<float>& u, const std::vector<float>& v) {
      double s = 0.0;
      for (size_t i = 0; i < u.size() / 2; ++i)
        for (size_t j = 0; j < v.size() / 2; ++j)
          s += std::hypot(double(u[2 * i]) - v[2 * j], double(u[2 * i + 1]) - v[2 * j + 1]);
      return s / double(u.size() / 2) / double(v.size() / 2);
    };
    const double naive = 2 * mean_dist(p, q) - mean_dist(p, p) - mean_dist(q, q);
    const double ed = metrics::energy_distance(p.data(), 37, q.data(), 53);
    CHECK(ed == Approx(naive).epsilon(1e-12).margin(1e-14));
    CHECK(metrics::energy_distance(q.data(), 53, p.data(), 37) == Approx(ed).epsilon(1e-12));
  }

  SECTION("rejects empty sets") {
    REQUIRE_THROWS_AS(metrics::energy_distance(a.data(), 0, a.data(), 10), std::invalid_argument);
  }
}

TEST_CASE("scatter panels write a readable PNG with the points drawn", "[plot]") {
  // Panel 1: one point at the centre; panel 2: one point near the top-right.
  const std::vector<float> p1 = {0.5f, 0.5f}, p2 = {0.9f, 0.9f};
  const std::vector<plot::Panel> panels = {{"data", p1.data(), 1, plot::kBlue},
                                           {"t=199", p2.data(), 1, plot::kOrange}};
  const int px = 128;
  const std::string path = temp_path("panels.png");
  plot::scatter_panels(panels, px, path, plot::Bounds{0.0f, 1.0f, 0.0f, 1.0f});

  int w = 0, h = 0, comp = 0;
  unsigned char* img = stbi_load(path.c_str(), &w, &h, &comp, 3);
  REQUIRE(img != nullptr);
  // Layout of hstack: gap 8 around and between; each panel has a title band.
  const int gap = 8, band = plot::text_height(1) + 4;
  CHECK(w == 2 * px + 3 * gap);
  CHECK(h == px + band + 2 * gap);
  auto is_white = [&](int x, int y) {
    const unsigned char* p = img + 3 * (y * w + x);
    return p[0] == 255 && p[1] == 255 && p[2] == 255;
  };
  // Data (0.5, 0.5) in panel 1 and (0.9, 0.9) in panel 2 (y up).
  CHECK_FALSE(is_white(gap + px / 2, gap + band + px / 2));
  CHECK_FALSE(is_white(2 * gap + px + int(0.9 * px), gap + band + int(0.1 * px)));
  // Where no point is drawn the panel stays white.
  CHECK(is_white(gap + px / 4, gap + band + px / 4));
  CHECK(is_white(2 * gap + px + px / 2, gap + band + px / 2));
  // The titles put ink in the band above each panel.
  bool ink = false;
  for (int y = gap; y < gap + band; ++y)
    for (int x = gap; x < gap + px; ++x) ink = ink || !is_white(x, y);
  CHECK(ink);
  stbi_image_free(img);
  std::remove(path.c_str());

  REQUIRE_THROWS_WITH(plot::scatter_panels(panels, px, "/nonexistent_dir/x.png"), Contains("/nonexistent_dir/x.png"));
}

TEST_CASE("captions draw inside the box text_width and text_height give", "[plot]") {
  const auto seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  for (int k = 0; k < 50; ++k) {
    std::string s(1 + rng() % 20, ' ');
    for (char& ch : s) ch = static_cast<char>(33 + rng() % 94);  // printable, no space
    if (k % 5 == 0) s[rng() % s.size()] = static_cast<char>(1 + rng() % 31);  // shown as '?'
    const int scale = 1 + static_cast<int>(rng() % 3), x0 = 3, y0 = 2;
    INFO("'" << s << "' at scale " << scale);
    const int w = plot::text_width(s, scale), h = plot::text_height(scale);
    plot::Canvas c(w + 2 * x0, h + 2 * y0);
    c.text(x0, y0, s, plot::kBlack, scale);
    int inked = 0, outside = 0, ink_x1 = 0;
    for (int y = 0; y < c.height(); ++y)
      for (int x = 0; x < c.width(); ++x)
        if (c.get(x, y).r == 0) {
          ++inked;
          ink_x1 = std::max(ink_x1, x + 1);
          outside += x < x0 || y < y0 || x >= x0 + w || y >= y0 + h;
        }
    CHECK(inked > 0);
    CHECK(outside == 0);
    CHECK(ink_x1 > x0 + w - 4 * scale);  // the width is the ink's, not a wider estimate
  }
  CHECK(plot::text_width("\x01\n", 2) == plot::text_width("??", 2));
  CHECK(plot::text_width("") == 0);
}

TEST_CASE("robust bounds ignore a few outliers", "[plot]") {
  std::vector<float> xy;
  for (int i = 0; i < 1000; ++i) { xy.push_back(float(i % 100) / 100.0f); xy.push_back(float(i / 10) / 100.0f); }
  xy.push_back(1000.0f);
  xy.push_back(-1000.0f);
  const plot::Bounds b = plot::robust_bounds({{"x", xy.data(), xy.size() / 2, plot::kBlue}});
  CHECK(b.xmax < 2.0f);
  CHECK(b.ymin > -1.0f);
  CHECK(b.xmax - b.xmin == Approx(b.ymax - b.ymin));  // equal aspect
}

// to_byte writes samples.npy and the grids: round((v + 1) * 127.5), clamped to [0, 255].
TEST_CASE("to_byte maps [-1, 1] to 0..255 with rounding and clamps outside", "[plot]") {
  using diffuse::plot::to_byte;
  CHECK(to_byte(-1.0f) == 0);
  CHECK(to_byte(1.0f) == 255);
  CHECK(to_byte(0.0f) == 128);  // 127.5 rounds away from zero
  CHECK(to_byte(-3.0f) == 0);
  CHECK(to_byte(7.0f) == 255);
  CHECK(to_byte(-1.0f + 1.0f / 127.5f) == 1);
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed << " (DIFFUSE_TEST_SEED replays it)");
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.2f, 1.2f);
  for (int i = 0; i < 10000; ++i) {
    const float v = u(rng);
    const double want = std::clamp((v + 1.0) * 127.5, 0.0, 255.0);
    REQUIRE(std::abs(to_byte(v) - want) <= 0.5 + 1e-4);  // float's product may round a half the other way
  }
}

// Image k of n goes to row k / cols, column k % cols; each pixel is a scale x scale block of its
// byte (grey replicated, or RGB in order); gaps and the slots after the last image stay white.
TEST_CASE("image_grid places every pixel of every image, grey and RGB", "[plot]") {
  using namespace diffuse::plot;
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed << " (DIFFUSE_TEST_SEED replays it)");
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (const int64_t c : {int64_t(1), int64_t(3)}) {
    INFO("channels " << c);
    const int64_t n = 5, h = 2, w = 3, cols = 2;
    std::vector<float> px(static_cast<size_t>(n * h * w * c));
    for (float& v : px) v = u(rng);
    GridOptions o;
    o.scale = 2;
    o.pad = 1;
    const Canvas cv = image_grid(px.data(), n, h, w, c, cols, o);
    CHECK(cv.width() == 1 + cols * (w * 2 + 1));
    CHECK(cv.height() == 1 + 3 * (h * 2 + 1));
    std::vector<int> covered(static_cast<size_t>(cv.width() * cv.height()), 0);
    int bad = 0;
    for (int64_t k = 0; k < n; ++k)
      for (int64_t i = 0; i < h; ++i)
        for (int64_t j = 0; j < w; ++j) {
          const float* p = px.data() + ((k * h + i) * w + j) * c;
          const Color want = c == 1 ? Color{to_byte(p[0]), to_byte(p[0]), to_byte(p[0])}
                                    : Color{to_byte(p[0]), to_byte(p[1]), to_byte(p[2])};
          for (int dy = 0; dy < 2; ++dy)
            for (int dx = 0; dx < 2; ++dx) {
              const int x = static_cast<int>(1 + (k % cols) * (w * 2 + 1) + j * 2 + dx);
              const int y = static_cast<int>(1 + (k / cols) * (h * 2 + 1) + i * 2 + dy);
              const Color got = cv.get(x, y);
              bad += got.r != want.r || got.g != want.g || got.b != want.b;
              covered[static_cast<size_t>(y * cv.width() + x)] = 1;
            }
        }
    CHECK(bad == 0);
    int not_white = 0;
    for (int y = 0; y < cv.height(); ++y)
      for (int x = 0; x < cv.width(); ++x)
        if (!covered[static_cast<size_t>(y * cv.width() + x)]) {
          const Color g = cv.get(x, y);
          not_white += g.r != 255 || g.g != 255 || g.b != 255;
        }
    CHECK(not_white == 0);
  }
  const std::vector<float> one(12, 0.0f);
  CHECK_THROWS_WITH(image_grid(one.data(), 1, 2, 3, 2, 1), Catch::Contains("1 or 3 channels"));
  CHECK_THROWS_WITH(image_grid(one.data(), 0, 2, 3, 1, 1), Catch::Contains("n, h, w, cols > 0"));
}
