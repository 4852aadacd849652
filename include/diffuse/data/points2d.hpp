// 2-D point-cloud datasets for the toy trainer.
//
// Every dataset samples in "model space": roughly zero mean and unit scale,
// because the forward diffusion mixes data with N(0, I) noise and assumes the
// data live on that scale. The map back to the user's own coordinates ("data
// space": pixel coordinates, CSV units, the usual sklearn/FFJORD coordinates)
// is kept explicit in a Normalization, model = (data - mean) / scale, with one
// scalar scale for both axes so shapes are not distorted.
//
// All randomness comes from the caller's diffuse::Generator, so a dataset, a
// seed and an offset fully determine the points.
#pragma once

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <diffuse/data/image_folder.hpp>
#include <diffuse/io/stb.hpp>
#include <diffuse/core/rng.hpp>

namespace diffuse::data2d {

// model = (data - mean) / scale.
struct Normalization {
  float mean_x = 0.0f;
  float mean_y = 0.0f;
  float scale = 1.0f;

  // From the first and second moments of the data (per-axis variances). One
  // scale, the RMS of the two standard deviations, keeps the aspect ratio.
  static Normalization from_moments(double mx, double my, double var_x, double var_y) {
    Normalization n;
    n.mean_x = static_cast<float>(mx);
    n.mean_y = static_cast<float>(my);
    const double s = std::sqrt(0.5 * (var_x + var_y));
    // A degenerate cloud (all points equal) has no scale to remove: keep 1.
    n.scale = (s > 1e-12 && std::isfinite(s)) ? static_cast<float>(s) : 1.0f;
    return n;
  }

  // Standardise an empirical point set xy[0..2n): zero mean, pooled unit std.
  static Normalization standardize(const float* xy, size_t n) {
    double mx = 0.0, my = 0.0;
    for (size_t i = 0; i < n; ++i) { mx += static_cast<double>(xy[2 * i]); my += static_cast<double>(xy[2 * i + 1]); }
    mx /= static_cast<double>(n);
    my /= static_cast<double>(n);
    double vx = 0.0, vy = 0.0;  // two-pass: no cancellation for far-off-origin data
    for (size_t i = 0; i < n; ++i) {
      const double dx = static_cast<double>(xy[2 * i]) - mx, dy = static_cast<double>(xy[2 * i + 1]) - my;
      vx += dx * dx;
      vy += dy * dy;
    }
    return from_moments(mx, my, vx / static_cast<double>(n), vy / static_cast<double>(n));
  }

  void to_model(float* xy, size_t n) const {
    const float inv = 1.0f / scale;
    for (size_t i = 0; i < n; ++i) {
      xy[2 * i] = (xy[2 * i] - mean_x) * inv;
      xy[2 * i + 1] = (xy[2 * i + 1] - mean_y) * inv;
    }
  }
  void to_data(float* xy, size_t n) const {
    for (size_t i = 0; i < n; ++i) {
      xy[2 * i] = xy[2 * i] * scale + mean_x;
      xy[2 * i + 1] = xy[2 * i + 1] * scale + mean_y;
    }
  }
};

// A distribution over the plane that the trainer can draw batches from.
class Dataset2D {
 public:
  virtual ~Dataset2D() = default;
  virtual std::string name() const { return "custom"; }
  // Writes n points in model space as x0,y0,x1,y1,... (xy has 2n floats).
  virtual void sample(Generator& g, size_t n, float* xy) = 0;

  const Normalization& normalization() const { return norm_; }
  // In place, n points: model space -> the user's original coordinates (for output).
  void to_data_space(float* xy, size_t n) const { norm_.to_data(xy, n); }
  // In place, n points: original coordinates -> model space.
  void to_model_space(float* xy, size_t n) const { norm_.to_model(xy, n); }

 protected:
  Normalization norm_;
};

// ---------------------------------------------------------------------------
// Raster clouds: "six" and load_image. Each sample picks a dark pixel uniformly
// and jitters uniformly inside it, so the density is piecewise constant.
// Data space is pixel units, x = column, y = (height - 1 - row): y points up so
// the picture is not upside down; pixel (col,row) covers [col,col+1) x [y,y+1).
class PixelCloud : public Dataset2D {
 public:
  // pixels: indices row * width + col of the dark pixels, row 0 at the top.
  PixelCloud(std::string name, int width, int height, std::vector<uint32_t> pixels)
      : name_(std::move(name)), width_(width), height_(height), pixels_(std::move(pixels)) {
    if (width <= 0 || height <= 0 || pixels_.empty())
      throw std::invalid_argument("PixelCloud '" + name_ + "': empty raster or no dark pixel");
    // Exact moments of the jittered cloud: pixel centres plus the variance
    // 1/12 of a uniform jitter on a unit interval.
    double mx = 0.0, my = 0.0;
    for (uint32_t p : pixels_) { mx += px_x(p) + 0.5; my += px_y(p) + 0.5; }
    const double m = static_cast<double>(pixels_.size());
    mx /= m;
    my /= m;
    double vx = 0.0, vy = 0.0;
    for (uint32_t p : pixels_) {
      const double dx = px_x(p) + 0.5 - mx, dy = px_y(p) + 0.5 - my;
      vx += dx * dx;
      vy += dy * dy;
    }
    norm_ = Normalization::from_moments(mx, my, vx / m + 1.0 / 12.0, vy / m + 1.0 / 12.0);
  }

  std::string name() const override { return name_; }
  int width() const { return width_; }
  int height() const { return height_; }
  size_t count() const { return pixels_.size(); }  // number of dark pixels
  const std::vector<uint32_t>& pixels() const { return pixels_; }

  // Draws: randint(n) for the pixel, then uniform(2n) for the jitter.
  void sample(Generator& g, size_t n, float* xy) override {
    std::vector<uint32_t> idx(n);
    g.randint(idx.data(), n, static_cast<uint32_t>(pixels_.size()));
    g.uniform(xy, 2 * n);  // jitter in (0,1), written in place then offset
    for (size_t i = 0; i < n; ++i) {
      const uint32_t p = pixels_[idx[i]];
      xy[2 * i] += static_cast<float>(px_x(p));
      xy[2 * i + 1] += static_cast<float>(px_y(p));
    }
    norm_.to_model(xy, n);
  }

 private:
  double px_x(uint32_t p) const { return static_cast<double>(p % static_cast<uint32_t>(width_)); }
  double px_y(uint32_t p) const {
    return static_cast<double>(height_ - 1) - static_cast<double>(p / static_cast<uint32_t>(width_));
  }

  std::string name_;
  int width_, height_;
  std::vector<uint32_t> pixels_;
};

namespace detail {

// A handwritten-looking 6, '#' = ink, 32x32, row 0 at the top. Drawn as a
// thick stroke (a curved stem into a closed lower loop, slight right lean).
inline constexpr const char* kSixArt[] = {
    "................................",
    "................................",
    "........................###.....",
    "....................########....",
    ".................###########....",
    "...............############.....",
    "..............########..........",
    ".............######.............",
    "............#####...............",
    "...........#####................",
    "..........#####.................",
    "..........####..................",
    ".........####...................",
    ".........####...................",
    "........###########.............",
    "........#############...........",
    ".......###############..........",
    ".......#######...######.........",
    ".......#####.......####.........",
    "......#####.........###.........",
    "......####..........####........",
    "......####..........####........",
    "......###...........###.........",
    "......####.........####.........",
    "......####.........####.........",
    ".......####.......####..........",
    ".......#####....######..........",
    "........#############...........",
    ".........###########............",
    "..........########..............",
    "................................",
    "................................",
};

inline std::vector<uint32_t> ascii_pixels(const char* const* rows, int height, int width) {
  std::vector<uint32_t> px;
  for (int r = 0; r < height; ++r)
    for (int c = 0; c < width; ++c)
      if (rows[r][c] == '#') px.push_back(static_cast<uint32_t>(r * width + c));
  return px;
}

inline std::string_view trim(std::string_view s) {
  const char* ws = " \t\r\n\f\v";
  const size_t b = s.find_first_not_of(ws);
  if (b == std::string_view::npos) return {};
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

// One finite number filling the whole field (from_chars: locale-independent).
inline bool parse_number(std::string_view s, float& out) {
  s = trim(s);
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);  // from_chars rejects '+'
  if (s.empty()) return false;
  double v = 0.0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || !std::isfinite(v)) return false;
  out = static_cast<float>(v);
  return std::isfinite(out);
}

}  // namespace detail

// The digit 6 drawn as points (pixel units of a 32x32 raster in data space).
inline std::unique_ptr<PixelCloud> make_six() {
  constexpr int kH = static_cast<int>(sizeof(detail::kSixArt) / sizeof(detail::kSixArt[0]));
  constexpr int kW = 32;
  return std::make_unique<PixelCloud>("six", kW, kH, detail::ascii_pixels(detail::kSixArt, kH, kW));
}

// ---------------------------------------------------------------------------
// sklearn.datasets.make_moons: outer arc (cos t, sin t), inner arc
// (1 - cos t, 1/2 - sin t), t ~ U(0, pi), plus N(0, noise^2) per coordinate.
// sklearn splits n exactly in half; here each point picks its arc at random so
// draws are i.i.d. Data space is sklearn's coordinates.
class Moons : public Dataset2D {
 public:
  explicit Moons(float noise = 0.06f) : noise_(noise) {
    // Exact moments of the equal mixture of the two arcs.
    const double pi = 3.14159265358979323846, s2 = static_cast<double>(noise) * static_cast<double>(noise);
    const double var_x = 0.75;                      // E x^2 = 1, E x = 1/2
    const double var_y = 0.625 - 1.0 / pi - 0.0625;  // E y^2 = 5/8 - 1/pi, E y = 1/4
    norm_ = Normalization::from_moments(0.5, 0.25, var_x + s2, var_y + s2);
  }
  std::string name() const override { return "moons"; }

  // Draws: randint(n) arc, uniform(n) angle, normal(2n) noise.
  void sample(Generator& g, size_t n, float* xy) override {
    std::vector<uint8_t> arc(n);
    std::vector<float> t(n);
    g.randint(arc.data(), n, 2);
    g.uniform(t.data(), n);
    g.normal(xy, 2 * n);
    const float pi = 3.14159265358979f;
    for (size_t i = 0; i < n; ++i) {
      const float c = std::cos(pi * t[i]), s = std::sin(pi * t[i]);
      const float x = arc[i] ? 1.0f - c : c, y = arc[i] ? 0.5f - s : s;
      xy[2 * i] = x + noise_ * xy[2 * i];
      xy[2 * i + 1] = y + noise_ * xy[2 * i + 1];
    }
    norm_.to_model(xy, n);
  }

 private:
  float noise_;
};

// sklearn.datasets.make_swiss_roll projected on its (x, z) plane:
// t = 1.5 pi (1 + 2u), (x, z) = (t cos t, t sin t), plus N(0, noise^2).
// Data space is sklearn's coordinates (|x|, |z| up to ~14).
class SwissRoll : public Dataset2D {
 public:
  explicit SwissRoll(float noise = 0.5f) : noise_(noise) {
    // Moments by composite Simpson over t (smooth integrand, 4096 intervals is
    // exact to float precision); the noise adds noise^2 to each variance.
    const double pi = 3.14159265358979323846, a = 1.5 * pi, b = 4.5 * pi;
    const int m = 4096;
    const double h = (b - a) / m;
    double sx = 0, sy = 0, sxx = 0, syy = 0;
    for (int k = 0; k <= m; ++k) {
      const double t = a + k * h, w = (k == 0 || k == m) ? 1.0 : (k % 2 ? 4.0 : 2.0);
      const double x = t * std::cos(t), y = t * std::sin(t);
      sx += w * x; sy += w * y; sxx += w * x * x; syy += w * y * y;
    }
    const double f = h / 3.0 / (b - a);  // Simpson weight over the uniform density
    const double mx = sx * f, my = sy * f;
    const double s2 = static_cast<double>(noise) * static_cast<double>(noise);
    norm_ = Normalization::from_moments(mx, my, sxx * f - mx * mx + s2, syy * f - my * my + s2);
  }
  std::string name() const override { return "swissroll"; }

  // Draws: uniform(n) position along the roll, normal(2n) noise.
  void sample(Generator& g, size_t n, float* xy) override {
    std::vector<float> u(n);
    g.uniform(u.data(), n);
    g.normal(xy, 2 * n);
    const float a = 1.5f * 3.14159265358979f;
    for (size_t i = 0; i < n; ++i) {
      const float t = a * (1.0f + 2.0f * u[i]);
      xy[2 * i] = t * std::cos(t) + noise_ * xy[2 * i];
      xy[2 * i + 1] = t * std::sin(t) + noise_ * xy[2 * i + 1];
    }
    norm_.to_model(xy, n);
  }

 private:
  float noise_;
};

// 8 Gaussians, std 0.1, centred on the circle of radius 2 at angles k pi/4.
// This is exactly the PyTorch reference's eight_gaussians; it is deliberately
// left unscaled (identity normalisation) so numbers compare one to one.
class EightGaussians : public Dataset2D {
 public:
  std::string name() const override { return "8gaussians"; }

  // Draws: randint(n) component, normal(2n) offsets.
  void sample(Generator& g, size_t n, float* xy) override {
    std::vector<uint8_t> k(n);
    g.randint(k.data(), n, 8);
    g.normal(xy, 2 * n);
    for (size_t i = 0; i < n; ++i) {
      const float ang = static_cast<float>(k[i]) * (2.0f * 3.14159265358979f / 8.0f);
      xy[2 * i] = 2.0f * std::cos(ang) + 0.1f * xy[2 * i];
      xy[2 * i + 1] = 2.0f * std::sin(ang) + 0.1f * xy[2 * i + 1];
    }
  }
};

// FFJORD's "checkerboard" (Grathwohl et al. 2019, toy_data.py): 8 filled
// squares of a 4x4 board on [-4, 4]^2 (squares of side 2). Data space is
// FFJORD's coordinates; the model sees them divided by their std sqrt(16/3).
class Checkerboard : public Dataset2D {
 public:
  Checkerboard() { norm_ = Normalization::from_moments(0.0, 0.0, 16.0 / 3.0, 16.0 / 3.0); }
  std::string name() const override { return "checkerboard"; }

  // Draws: uniform(2n) as (x1, x2_) pairs, randint(n) for the row pair.
  void sample(Generator& g, size_t n, float* xy) override {
    std::vector<uint8_t> r(n);
    g.uniform(xy, 2 * n);
    g.randint(r.data(), n, 2);
    for (size_t i = 0; i < n; ++i) {
      // x1 = 4u - 2; x2 = u' - 2r + (floor(x1) mod 2), all times 2.
      const float x1 = 4.0f * xy[2 * i] - 2.0f;
      const int col = static_cast<int>(std::floor(x1));
      const float x2 = xy[2 * i + 1] - 2.0f * static_cast<float>(r[i]) + static_cast<float>(((col % 2) + 2) % 2);
      xy[2 * i] = 2.0f * x1;
      xy[2 * i + 1] = 2.0f * x2;
    }
    norm_.to_model(xy, n);
  }
};

// ---------------------------------------------------------------------------
// An empirical distribution: sample() draws stored points with replacement.
// The points are kept in the user's coordinates; the normalisation
// standardises them (zero mean, one pooled std for both axes).
class PointSet : public Dataset2D {
 public:
  PointSet(std::string name, std::vector<float> xy) : name_(std::move(name)), xy_(std::move(xy)) {
    if (xy_.size() % 2 != 0) throw std::invalid_argument("PointSet '" + name_ + "': odd number of coordinates");
    if (count() < 2) throw std::invalid_argument("PointSet '" + name_ + "': need at least 2 points");
    if (count() > 0xFFFFFFFFull) throw std::invalid_argument("PointSet '" + name_ + "': too many points");
    norm_ = Normalization::standardize(xy_.data(), count());
  }
  std::string name() const override { return name_; }
  size_t count() const { return xy_.size() / 2; }
  // The raw points in the user's coordinates, x0,y0,x1,y1,...
  const std::vector<float>& points() const { return xy_; }

  // Draws: randint(n) indices.
  void sample(Generator& g, size_t n, float* xy) override {
    std::vector<uint32_t> idx(n);
    g.randint(idx.data(), n, static_cast<uint32_t>(count()));
    for (size_t i = 0; i < n; ++i) {
      xy[2 * i] = xy_[2 * size_t{idx[i]}];
      xy[2 * i + 1] = xy_[2 * size_t{idx[i]} + 1];
    }
    norm_.to_model(xy, n);
  }

 private:
  std::string name_;
  std::vector<float> xy_;
};

// Reads "x,y" lines. Tolerated: a header (a first non-blank line that is not
// two numbers), blank lines, '#' comment lines, spaces around the values, CRLF.
// Throws std::runtime_error naming the file (and line) otherwise.
inline std::vector<float> read_csv_points(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("load_csv: cannot open '" + path + "'");
  std::vector<float> xy;
  std::string line;
  bool seen_content = false;
  for (size_t lineno = 1; std::getline(in, line); ++lineno) {
    const std::string_view s = detail::trim(line);
    if (s.empty() || s.front() == '#') continue;
    const size_t comma = s.find(',');
    float x = 0.0f, y = 0.0f;
    const bool ok = comma != std::string_view::npos && detail::parse_number(s.substr(0, comma), x) &&
                    detail::parse_number(s.substr(comma + 1), y);
    const bool header = !ok && !seen_content;
    seen_content = true;
    if (header) continue;
    if (!ok)
      throw std::runtime_error("load_csv: " + path + ":" + std::to_string(lineno) + ": expected 'x,y' (two numbers), got '" +
                               std::string(s.substr(0, 60)) + "'");
    xy.push_back(x);
    xy.push_back(y);
  }
  if (in.bad()) throw std::runtime_error("load_csv: read error on '" + path + "'");
  if (xy.size() < 4)
    throw std::runtime_error("load_csv: '" + path + "' has " + std::to_string(xy.size() / 2) +
                             " point(s); need at least 2");
  return xy;
}

inline std::unique_ptr<Dataset2D> load_csv(const std::string& path) {
  return std::make_unique<PointSet>(std::filesystem::path(path).stem().string(), read_csv_points(path));
}

// A PNG, JPEG, BMP or binary PGM/PPM (JPEG by libjpeg-turbo, io/jpeg.hpp; the rest by stb_image,
// io/stb.hpp), read as image folders read a file (data/image_folder.hpp). A pixel is "dark" when
// its luminance (Rec. 601, composited over white so transparent backgrounds
// count as paper) is below threshold * 255. Aspect ratio is kept (pixels are
// square and one scale is used for both axes).
inline std::unique_ptr<Dataset2D> load_image(const std::string& path, float threshold = 0.5f) {
  int w = 0, h = 0, comp = 0;
  if (!std::filesystem::is_regular_file(path)) throw std::runtime_error("load_image: cannot read '" + path + "': no such file");
  // The checks of image folders (PNG chunks and CRCs, PNM and JPEG headers stb would misread, a
  // pixel count the file cannot justify) before stb decodes the same bytes.
  std::vector<unsigned char> pixels;
  try {
    const std::vector<unsigned char> bytes = ::diffuse::detail::image_file_bytes(path);
    ::diffuse::detail::checked_image_info(path, bytes, w, h, comp);
    if (static_cast<uint64_t>(w) * static_cast<uint64_t>(h) > 0xFFFFFFFFull)  // pixel indices are 32-bit
      throw std::runtime_error("'" + path + "' is too large");
    pixels = ::diffuse::detail::decode_image(path, bytes, w, h, 4);
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(std::string("load_image: ") + e.what());
  }
  const unsigned char* rgba = pixels.data();
  std::vector<uint32_t> dark;
  const float cut = threshold * 255.0f;
  for (int r = 0; r < h; ++r)
    for (int c = 0; c < w; ++c) {
      const unsigned char* p = rgba + 4 * (static_cast<size_t>(r) * static_cast<size_t>(w) + static_cast<size_t>(c));
      const float lum = 0.299f * p[0] + 0.587f * p[1] + 0.114f * p[2];
      const float a = p[3] / 255.0f;
      if (a * lum + (1.0f - a) * 255.0f < cut) dark.push_back(static_cast<uint32_t>(r * w + c));
    }
  if (dark.empty())
    throw std::runtime_error("load_image: '" + path + "' has no dark pixel (luminance < " +
                             std::to_string(threshold) + " * 255)");
  return std::make_unique<PixelCloud>(std::filesystem::path(path).stem().string(), w, h, std::move(dark));
}

// ---------------------------------------------------------------------------
inline const std::vector<std::string>& dataset_names() {
  static const std::vector<std::string> names = {"six", "moons", "swissroll", "8gaussians", "checkerboard"};
  return names;
}

// A built-in dataset by name; std::invalid_argument listing the valid names otherwise.
inline std::unique_ptr<Dataset2D> make_dataset(const std::string& name) {
  if (name == "six") return make_six();
  if (name == "moons") return std::make_unique<Moons>();
  if (name == "swissroll") return std::make_unique<SwissRoll>();
  if (name == "8gaussians") return std::make_unique<EightGaussians>();
  if (name == "checkerboard") return std::make_unique<Checkerboard>();
  std::string valid;
  for (const auto& n : dataset_names()) valid += (valid.empty() ? "" : ", ") + n;
  throw std::invalid_argument("unknown dataset '" + name + "' (valid: " + valid + ")");
}

}  // namespace diffuse::data2d
