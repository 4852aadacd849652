// train_mnist's MNIST as model input; the rest of what the image examples share is in
// image_common.hpp.
#pragma once

#include "image_common.hpp"

#include <diffuse/data/resize.hpp>
#include <diffuse/io/idx.hpp>

#include <string>

namespace mnist_example {

using namespace diffuse;
using namespace diffuse::examples;

// uint8 [N, 28, 28] -> float NHWC [N, size, size, 1] in [-1, 1] (x / 127.5 - 1),
// downsampled by area averaging or bilinear (PyTorch's F.interpolate rules).
inline Tensor<float> to_model_images(const IdxImages& im, int64_t size, const std::string& resize) {
  const int64_t n = static_cast<int64_t>(im.count), h = static_cast<int64_t>(im.rows), w = static_cast<int64_t>(im.cols);
  Tensor<float> x({n, h, w, 1});
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(im.pixels[i]) / 127.5f - 1.0f;
  if (size == h && size == w) return x;
  if (resize == "area") return resize_area(x, size, size);
  if (resize == "bilinear") return resize_bilinear(x, size, size);
  throw std::invalid_argument("unknown --resize '" + resize + "' (area, bilinear)");
}

}  // namespace mnist_example
