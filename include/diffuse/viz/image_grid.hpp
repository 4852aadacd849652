// Grids of images as PNG: generated samples (one row per class) and the
// denoising process (one column per timestep). Images are NHWC floats in the
// models' range [-1, 1]; each pixel is drawn as a scale x scale block so that
// 16x16 digits are visible, with optional row and column captions.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/viz/plot.hpp>

namespace diffuse::plot {

// A model value in [-1, 1] as a byte: round((v + 1) * 127.5), clamped. The
// same mapping writes samples.npy, so the grid shows exactly the saved bytes.
inline uint8_t to_byte(float v) {
  return static_cast<uint8_t>(std::lround(std::clamp((v + 1.0f) * 127.5f, 0.0f, 255.0f)));
}

struct GridOptions {
  int scale = 3;                      // screen pixels per image pixel
  int pad = 2;                        // gap between images
  std::vector<std::string> row_labels;  // drawn left of each row (empty: none)
  std::vector<std::string> col_labels;  // drawn above each column (empty: none)
};

// n images [h, w, c] (c = 1 grey or 3 RGB) from nhwc, cols per row, in reading order.
inline Canvas image_grid(const float* nhwc, int64_t n, int64_t h, int64_t w, int64_t c, int64_t cols,
                         const GridOptions& o = {}) {
  if (n <= 0 || h <= 0 || w <= 0 || (c != 1 && c != 3) || cols <= 0 || o.scale <= 0)
    throw std::invalid_argument("image_grid: need n, h, w, cols > 0 and 1 or 3 channels");
  const int64_t rows = (n + cols - 1) / cols;
  const int cw = static_cast<int>(w) * o.scale, ch = static_cast<int>(h) * o.scale;
  int left = o.pad, top = o.pad;
  for (const auto& s : o.row_labels) left = std::max(left, text_width(s, 1) + 2 * o.pad + 2);
  if (!o.col_labels.empty()) top = text_height(1) + 2 * o.pad + 2;
  Canvas cv(left + static_cast<int>(cols) * (cw + o.pad), top + static_cast<int>(rows) * (ch + o.pad), kWhite);
  for (int64_t k = 0; k < n; ++k) {
    const int x0 = left + static_cast<int>(k % cols) * (cw + o.pad), y0 = top + static_cast<int>(k / cols) * (ch + o.pad);
    const float* img = nhwc + k * h * w * c;
    for (int64_t i = 0; i < h; ++i)
      for (int64_t j = 0; j < w; ++j) {
        const float* p = img + (i * w + j) * c;
        const Color col = c == 1 ? Color{to_byte(p[0]), to_byte(p[0]), to_byte(p[0])}
                                 : Color{to_byte(p[0]), to_byte(p[1]), to_byte(p[2])};
        cv.fill_rect(x0 + static_cast<int>(j) * o.scale, y0 + static_cast<int>(i) * o.scale, o.scale, o.scale, col);
      }
  }
  for (size_t r = 0; r < o.row_labels.size() && static_cast<int64_t>(r) < rows; ++r)
    cv.text(o.pad, top + static_cast<int>(r) * (ch + o.pad) + (ch - text_height(1)) / 2, o.row_labels[r], kBlack);
  for (size_t k = 0; k < o.col_labels.size() && static_cast<int64_t>(k) < cols; ++k)
    cv.text(left + static_cast<int>(k) * (cw + o.pad), o.pad, o.col_labels[k], kBlack);
  return cv;
}

}  // namespace diffuse::plot
