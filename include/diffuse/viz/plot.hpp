// A tiny raster plotter: RGB8 canvas, scatter panels, stb_easy_font's bitmap
// glyphs for titles, PNG output through stb_image_write. Enough to look at 2-D
// point clouds (data vs samples, a reverse process over t) without a plotting stack.
//
// Pixel (x, y) has y pointing down (image convention); scatter panels map the
// data's y axis up.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/io/atomic_file.hpp>
#include <diffuse/io/stb.hpp>

// stb_easy_font is all static functions and data: each translation unit gets
// its own copy, and the ones a unit does not call are not warnings.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wold-style-cast"
#pragma GCC diagnostic ignored "-Wcast-align"
#pragma GCC diagnostic ignored "-Wconversion"
#pragma GCC diagnostic ignored "-Wsign-conversion"
#pragma GCC diagnostic ignored "-Wdouble-promotion"
#endif
#if __has_include(<stb_easy_font.h>)
#include <stb_easy_font.h>
#else
#include <stb/stb_easy_font.h>  // Debian libstb-dev without -I/usr/include/stb
#endif
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

namespace diffuse::plot {

struct Color {
  uint8_t r = 0, g = 0, b = 0;
};

inline constexpr Color kWhite{255, 255, 255};
inline constexpr Color kBlack{0, 0, 0};
inline constexpr Color kGrey{170, 170, 170};
// matplotlib's tab10 first colours: distinct and readable on white.
inline constexpr Color kBlue{31, 119, 180};
inline constexpr Color kOrange{255, 127, 14};
inline constexpr Color kGreen{44, 160, 44};
inline constexpr Color kRed{214, 39, 40};
inline constexpr Color kPurple{148, 103, 189};

namespace detail {

// Captions use stb_easy_font's glyphs (ASCII 32..126; anything else shows as '?'),
// one line: up to 9 font pixels from the top of a capital to the bottom of a
// descender, a proportional advance of 3 to 9 (6 for digits) with the spacing.
inline std::string printable(const std::string& s) {
  std::string t = s.substr(0, 10000);  // wider than any canvas even at scale 1
  for (char& ch : t)
    if (static_cast<unsigned char>(ch) < 32 || static_cast<unsigned char>(ch) > 126) ch = '?';
  return t;
}

// A glyph stroke: font pixels [x, x+w) x [y, y+h), origin at the text's top-left.
struct Stroke {
  int x, y, w, h;
};

// The quads stb_easy_font_print emits for s, as integer rectangles.
inline std::vector<Stroke> strokes(const std::string& s) {
  struct Vertex {  // stb_easy_font's vertex layout
    float x, y, z;
    unsigned char rgba[4];
  };
  static_assert(sizeof(Vertex) == 16);
  std::string t = printable(s);
  std::vector<Vertex> v(4 * 11 * t.size());  // at most 11 quads a glyph ('X' has the most)
  const int bytes = static_cast<int>(v.size() * sizeof(Vertex));
  const int quads = stb_easy_font_print(0.0f, 0.0f, t.data(), nullptr, v.data(), bytes);
  std::vector<Stroke> out;
  out.reserve(static_cast<size_t>(quads));
  for (int q = 0; q < quads; ++q) {  // vertices: top-left, top-right, bottom-right, bottom-left
    const Vertex& a = v[4 * static_cast<size_t>(q)];
    const Vertex& b = v[4 * static_cast<size_t>(q) + 2];
    const int x0 = static_cast<int>(std::lround(a.x)), y0 = static_cast<int>(std::lround(a.y));
    out.push_back({x0, y0, static_cast<int>(std::lround(b.x)) - x0, static_cast<int>(std::lround(b.y)) - y0});
  }
  return out;
}

}  // namespace detail

// Width: the sum of stb_easy_font's advances (the last glyph's spacing
// included); height: capitals and descenders (9 font pixels; the font's 12-pixel
// line height adds only the gap to a next line). scale multiplies both.
inline int text_width(const std::string& s, int scale = 1) {
  std::string t = detail::printable(s);
  return stb_easy_font_width(t.data()) * scale;
}
inline int text_height(int scale = 1) { return 9 * scale; }

class Canvas {
 public:
  Canvas() = default;
  Canvas(int width, int height, Color bg = kWhite) : w_(width), h_(height) {
    if (width <= 0 || height <= 0) throw std::invalid_argument("Canvas: width and height must be positive");
    px_.resize(3 * static_cast<size_t>(width) * static_cast<size_t>(height));
    for (size_t i = 0; i < px_.size(); i += 3) {
      px_[i] = bg.r;
      px_[i + 1] = bg.g;
      px_[i + 2] = bg.b;
    }
  }

  int width() const { return w_; }
  int height() const { return h_; }
  // RGB8, row-major, row 0 at the top.
  const std::vector<uint8_t>& pixels() const { return px_; }

  bool inside(int x, int y) const { return x >= 0 && y >= 0 && x < w_ && y < h_; }
  Color get(int x, int y) const {
    const uint8_t* p = &px_[idx(x, y)];
    return Color{p[0], p[1], p[2]};
  }
  // Drawing calls clip silently: callers can draw partly off-canvas.
  void set(int x, int y, Color c) {
    if (!inside(x, y)) return;
    uint8_t* p = &px_[idx(x, y)];
    p[0] = c.r;
    p[1] = c.g;
    p[2] = c.b;
  }
  // alpha in [0, 1]: "over" compositing onto what is there.
  void blend(int x, int y, Color c, float alpha) {
    if (!inside(x, y) || alpha <= 0.0f) return;
    alpha = std::min(alpha, 1.0f);
    uint8_t* p = &px_[idx(x, y)];
    const uint8_t src[3] = {c.r, c.g, c.b};
    for (int k = 0; k < 3; ++k)
      p[k] = static_cast<uint8_t>(std::lround(static_cast<float>(p[k]) + alpha * (static_cast<float>(src[k]) - p[k])));
  }

  void fill_rect(int x, int y, int w, int h, Color c) {
    for (int j = std::max(y, 0); j < std::min(y + h, h_); ++j)
      for (int i = std::max(x, 0); i < std::min(x + w, w_); ++i) set(i, j, c);
  }
  // 1-pixel outline of the rectangle [x, x+w) x [y, y+h).
  void frame(int x, int y, int w, int h, Color c) {
    for (int i = x; i < x + w; ++i) { set(i, y, c); set(i, y + h - 1, c); }
    for (int j = y; j < y + h; ++j) { set(x, j, c); set(x + w - 1, j, c); }
  }

  // Antialiased disc centred at (cx, cy) in continuous pixel coordinates
  // (pixel (i, j) spans [i, i+1) x [j, j+1)): coverage falls off linearly over
  // one pixel at the rim, which keeps sub-pixel dots visible and smooth.
  void dot(float cx, float cy, float radius, Color c, float alpha = 1.0f) {
    const int x0 = static_cast<int>(std::floor(cx - radius - 1.0f)), x1 = static_cast<int>(std::ceil(cx + radius + 1.0f));
    const int y0 = static_cast<int>(std::floor(cy - radius - 1.0f)), y1 = static_cast<int>(std::ceil(cy + radius + 1.0f));
    for (int j = std::max(y0, 0); j <= std::min(y1, h_ - 1); ++j)
      for (int i = std::max(x0, 0); i <= std::min(x1, w_ - 1); ++i) {
        const float dx = static_cast<float>(i) + 0.5f - cx, dy = static_cast<float>(j) + 0.5f - cy;
        const float cover = std::clamp(radius + 0.5f - std::sqrt(dx * dx + dy * dy), 0.0f, 1.0f);
        if (cover > 0.0f) blend(i, j, c, alpha * cover);
      }
  }

  // Text with its top-left corner at (x, y), each font pixel a scale x scale block.
  void text(int x, int y, const std::string& s, Color c, int scale = 1) {
    for (const detail::Stroke& r : detail::strokes(s))
      fill_rect(x + r.x * scale, y + r.y * scale, r.w * scale, r.h * scale, c);
  }

  // Copies src with its top-left corner at (x, y), clipped.
  void blit(const Canvas& src, int x, int y) {
    for (int j = 0; j < src.h_; ++j)
      for (int i = 0; i < src.w_; ++i) set(x + i, y + j, src.get(i, j));
  }

  void write_png(const std::string& path) const {
    if (px_.empty()) throw std::runtime_error("write_png: empty canvas for '" + path + "'");
    // Encoded in memory, then written whole through write_file_atomically (stb's file writer
    // does not check its writes).
    std::vector<unsigned char> png;
    auto append = [](void* ctx, void* data, int size) {
      auto* v = static_cast<std::vector<unsigned char>*>(ctx);
      v->insert(v->end(), static_cast<unsigned char*>(data), static_cast<unsigned char*>(data) + size);
    };
    if (!stbi_write_png_to_func(append, &png, w_, h_, 3, px_.data(), 3 * w_))
      throw std::runtime_error("write_png: cannot encode '" + path + "'");
    write_file_atomically(path, png.data(), png.size());
  }

 private:
  size_t idx(int x, int y) const { return 3 * (static_cast<size_t>(y) * static_cast<size_t>(w_) + static_cast<size_t>(x)); }

  int w_ = 0, h_ = 0;
  std::vector<uint8_t> px_;
};

// Data-space rectangle shown by a scatter panel.
struct Bounds {
  float xmin = -1.0f, xmax = 1.0f, ymin = -1.0f, ymax = 1.0f;
};

// One scatter panel: a title and n points x0,y0,x1,y1,... (not owned).
struct Panel {
  std::string title;
  const float* xy = nullptr;
  size_t n = 0;
  Color colour = kBlue;
};

// Bounds covering the [lo_q, hi_q] quantiles of every panel's points per axis
// (so a few stray samples do not shrink the picture), padded by pad x range on
// each side. With equal_aspect the shorter axis is widened around its centre
// so square panels show shapes undistorted.
inline Bounds robust_bounds(const std::vector<Panel>& panels, double lo_q = 0.005, double hi_q = 0.995,
                            double pad = 0.10, bool equal_aspect = true) {
  std::vector<float> xs, ys;
  for (const Panel& p : panels)
    for (size_t i = 0; i < p.n; ++i)
      if (std::isfinite(p.xy[2 * i]) && std::isfinite(p.xy[2 * i + 1])) {
        xs.push_back(p.xy[2 * i]);
        ys.push_back(p.xy[2 * i + 1]);
      }
  if (xs.empty()) return Bounds{};
  auto quantile = [](std::vector<float>& v, double q) {
    const size_t k = static_cast<size_t>(std::floor(q * static_cast<double>(v.size() - 1) + 0.5));
    std::nth_element(v.begin(), v.begin() + static_cast<long>(k), v.end());
    return static_cast<double>(v[k]);
  };
  double x0 = quantile(xs, lo_q), x1 = quantile(xs, hi_q);
  double y0 = quantile(ys, lo_q), y1 = quantile(ys, hi_q);
  // A degenerate axis (all values equal) gets a unit range.
  if (!(x1 > x0)) { x0 -= 0.5; x1 += 0.5; }
  if (!(y1 > y0)) { y0 -= 0.5; y1 += 0.5; }
  double px = pad * (x1 - x0), py = pad * (y1 - y0);
  x0 -= px; x1 += px; y0 -= py; y1 += py;
  if (equal_aspect) {
    const double half = 0.5 * std::max(x1 - x0, y1 - y0);
    const double cx = 0.5 * (x0 + x1), cy = 0.5 * (y0 + y1);
    x0 = cx - half; x1 = cx + half; y0 = cy - half; y1 = cy + half;
  }
  return Bounds{static_cast<float>(x0), static_cast<float>(x1), static_cast<float>(y0), static_cast<float>(y1)};
}

// Dot size and opacity that keep both 500 and 50,000 points readable: dense
// clouds get fainter dots so overlap shows density instead of a solid blob.
inline float default_dot_radius(int panel_px) { return std::max(0.9f, static_cast<float>(panel_px) / 320.0f); }
inline float default_dot_alpha(size_t n) {
  return std::clamp(static_cast<float>(std::sqrt(3000.0 / static_cast<double>(std::max<size_t>(n, 1)))), 0.2f, 0.85f);
}

// Scatter of n points into the rectangle [x, x+w) x [y, y+h) of the canvas,
// data bounds b, y axis up; points outside b are skipped; thin grey frame.
inline void draw_scatter(Canvas& c, int x, int y, int w, int h, const Bounds& b, const float* xy, size_t n,
                         Color colour, float radius, float alpha) {
  const float sx = static_cast<float>(w) / (b.xmax - b.xmin), sy = static_cast<float>(h) / (b.ymax - b.ymin);
  for (size_t i = 0; i < n; ++i) {
    const float px = xy[2 * i], py = xy[2 * i + 1];
    if (!(px >= b.xmin && px <= b.xmax && py >= b.ymin && py <= b.ymax)) continue;  // also drops NaN
    c.dot(static_cast<float>(x) + (px - b.xmin) * sx, static_cast<float>(y) + (b.ymax - py) * sy, radius, colour, alpha);
  }
  c.frame(x, y, w, h, kGrey);
}

// One titled panel: title band on top, then a panel_px x panel_px scatter.
inline Canvas render_panel(const Panel& p, int panel_px, const Bounds& b) {
  const int scale = std::max(1, panel_px / 128);
  const int band = text_height(scale) + 4 * scale;
  Canvas c(panel_px, panel_px + band);
  std::string title = p.title;
  while (!title.empty() && text_width(title, scale) > panel_px) title.pop_back();  // clip long titles
  c.text((panel_px - text_width(title, scale)) / 2, 2 * scale, title, kBlack, scale);
  draw_scatter(c, 0, band, panel_px, panel_px, b, p.xy, p.n, p.colour, default_dot_radius(panel_px),
               default_dot_alpha(p.n));
  return c;
}

// Side by side, top-aligned, gap pixels of background between and around.
inline Canvas hstack(const std::vector<Canvas>& parts, int gap = 8, Color bg = kWhite) {
  if (parts.empty()) throw std::invalid_argument("hstack: no panels");
  int w = gap, h = 0;
  for (const Canvas& p : parts) { w += p.width() + gap; h = std::max(h, p.height()); }
  Canvas out(w, h + 2 * gap, bg);
  int x = gap;
  for (const Canvas& p : parts) { out.blit(p, x, gap); x += p.width() + gap; }
  return out;
}

// The usual figure: panels side by side, all on common bounds (robust_bounds
// over every panel unless given), written to a PNG at path.
inline void scatter_panels(const std::vector<Panel>& panels, int panel_px, const std::string& path,
                           std::optional<Bounds> bounds = std::nullopt) {
  if (panel_px < 16) throw std::invalid_argument("scatter_panels: panel_px must be at least 16");
  const Bounds b = bounds ? *bounds : robust_bounds(panels);
  std::vector<Canvas> parts;
  parts.reserve(panels.size());
  for (const Panel& p : panels) parts.push_back(render_panel(p, panel_px, b));
  hstack(parts).write_png(path);
}

}  // namespace diffuse::plot
