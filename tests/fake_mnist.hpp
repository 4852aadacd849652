// A tiny MNIST in the real file format (gzipped IDX), for the tools' end-to-end tests.
#pragma once

#include <diffuse/io/idx.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <utility>

namespace diffuse::testing {

// Ten classes of 28x28 "digits": class k is a bar at angle k * 18 degrees
// through a random centre, with random grey noise.
inline void write_dataset(const std::filesystem::path& dir, size_t n_train, size_t n_test, uint64_t seed) {
  std::filesystem::create_directories(dir);
  std::mt19937 rng(static_cast<uint32_t>(seed ^ (seed >> 32)));
  for (auto [name, n] : {std::pair<std::string, size_t>{"train", n_train}, {"t10k", n_test}}) {
    IdxImages im;
    im.count = n;
    im.rows = im.cols = 28;
    im.pixels.resize(n * 28 * 28);
    IdxLabels lb;
    for (size_t i = 0; i < n; ++i) {
      const int k = static_cast<int>(i % 10);
      lb.labels.push_back(static_cast<uint8_t>(k));
      const double a = k * 3.14159265 / 10, cy = 10 + rng() % 8, cx = 10 + rng() % 8;
      for (int y = 0; y < 28; ++y)
        for (int x = 0; x < 28; ++x) {
          const double d = std::abs(-(y - cy) * std::cos(a) + (x - cx) * std::sin(a));
          im.pixels[i * 784 + static_cast<size_t>(y * 28 + x)] =
              static_cast<uint8_t>(d < 1.5 ? 230 + rng() % 25 : rng() % 20);
        }
    }
    write_idx_images((dir / (name + "-images-idx3-ubyte.gz")).string(), im);
    write_idx_labels((dir / (name + "-labels-idx1-ubyte.gz")).string(), lb);
  }
}

}  // namespace diffuse::testing
