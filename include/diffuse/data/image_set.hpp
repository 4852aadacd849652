// Image data sets as they are stored: uint8 pixels in NHWC order with optional class labels.
// Loaders for CIFAR-10's binary batches and for NumPy arrays check every size against the file
// before they allocate, and fail with one line that names the file; image_tensor() turns a set
// into the [-1, 1] floats the models train on (the tensor a TensorDataset holds).
//
//   ImageSet train = load_cifar10("data/cifar-10-batches-bin");          // 50,000 x 32 x 32 x 3
//   ImageSet mine = load_image_npy("x.npy", "y.npy");                     // [N,H,W,C] or [N,C,H,W]
//   TensorDataset<float> data(image_tensor(train), train.labels, DataOrder::epochs, seed);
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/core/tensor.hpp>
#include <diffuse/io/npy.hpp>

namespace diffuse {

struct ImageSet {
  int64_t n = 0, height = 0, width = 0, channels = 0;
  std::vector<uint8_t> pixels;  // n * height * width * channels bytes, [n, height, width, channels]
  std::vector<int32_t> labels;  // n class labels in [0, classes), or empty
  int32_t classes = 0;          // 0 without labels

};

// pixel / 255 * 2 - 1 as a [n, height, width, channels] float tensor on the CPU.
inline Tensor<float> image_tensor(const ImageSet& s) {
  Tensor<float> t({s.n, s.height, s.width, s.channels});
  float* p = t.data();
  for (size_t i = 0; i < s.pixels.size(); ++i) p[i] = static_cast<float>(s.pixels[i]) / 255.0f * 2.0f - 1.0f;
  return t;
}

namespace detail {

[[noreturn]] inline void image_set_error(const std::string& path, const std::string& what) {
  throw std::runtime_error("diffuse: " + path + ": " + what);
}

}  // namespace detail

// CIFAR-10's binary version (cifar-10-binary.tar.gz): every file holds records of one label byte
// (0..9) and 3,072 pixel bytes, the 1,024 red, then green, then blue values of a 32x32 image,
// rows top to bottom. The files' images in order, as NHWC.
inline ImageSet load_cifar10_bin(const std::vector<std::string>& files) {
  constexpr int64_t S = 32, plane = S * S, record = 1 + 3 * plane;
  ImageSet out;
  out.height = out.width = S;
  out.channels = 3;
  out.classes = 10;
  for (const std::string& path : files) {
    std::error_code ec;
    const auto bytes = std::filesystem::file_size(path, ec);
    if (ec) detail::image_set_error(path, "cannot read: " + ec.message());
    if (bytes == 0 || bytes % record != 0)
      detail::image_set_error(path, std::to_string(bytes) + " bytes is not a whole number of CIFAR-10 records (" +
                                        std::to_string(record) + " bytes each: a label and a 32x32 RGB image)");
    const int64_t m = static_cast<int64_t>(bytes) / record;
    std::ifstream f(path, std::ios::binary);
    std::vector<uint8_t> raw(static_cast<size_t>(bytes));
    if (!f.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(bytes)))
      detail::image_set_error(path, "cannot read " + std::to_string(bytes) + " bytes");
    const size_t base = out.pixels.size();
    out.pixels.resize(base + static_cast<size_t>(m * plane * 3));
    out.labels.reserve(out.labels.size() + static_cast<size_t>(m));
    for (int64_t i = 0; i < m; ++i) {
      const uint8_t* r = raw.data() + i * record;
      if (r[0] > 9)
        detail::image_set_error(path, "record " + std::to_string(i) + " has label " + std::to_string(r[0]) +
                                          " (CIFAR-10 labels are 0..9)");
      out.labels.push_back(r[0]);
      uint8_t* px = out.pixels.data() + base + static_cast<size_t>(i * plane * 3);
      for (int64_t p = 0; p < plane; ++p)
        for (int64_t c = 0; c < 3; ++c) px[p * 3 + c] = r[1 + c * plane + p];
    }
    out.n += m;
  }
  return out;
}

// The training (data_batch_1..5.bin) or test (test_batch.bin) split from the folder that holds
// them, or from its parent, where the archive unpacks to cifar-10-batches-bin/.
inline ImageSet load_cifar10(const std::string& dir, bool train = true) {
  namespace fs = std::filesystem;
  fs::path d(dir);
  if (!fs::exists(d / "test_batch.bin") && fs::exists(d / "cifar-10-batches-bin")) d /= "cifar-10-batches-bin";
  std::vector<std::string> files;
  if (train)
    for (int i = 1; i <= 5; ++i) files.push_back((d / ("data_batch_" + std::to_string(i) + ".bin")).string());
  else
    files.push_back((d / "test_batch.bin").string());
  for (const auto& f : files)
    if (!fs::exists(f))
      detail::image_set_error(dir, "no " + fs::path(f).filename().string() +
                                       " (expected CIFAR-10's binary version: data_batch_1.bin .. data_batch_5.bin, "
                                       "test_batch.bin)");
  return load_cifar10_bin(files);
}

// uint8 images from a .npy array [N, C, H, W], [N, H, W, C] (C = 1 or 3) or [N, H, W] (grey), with
// labels from an optional .npy of N integers (any integer dtype) in [0, classes); classes = 0
// takes the largest label + 1. A shape that reads both ways ([N, 3, H, 3]) is NCHW, the layout
// PyTorch and train_mnist write (as the fid tool reads arrays).
inline ImageSet load_image_npy(const std::string& images, const std::string& labels = "", int32_t classes = 0) {
  const npy::Array a = npy::load(images);
  if (a.descr != "|u1" && a.descr != "<u1") detail::image_set_error(images, "images must be uint8 (|u1), not " + a.descr);
  if (a.shape.size() != 4 && a.shape.size() != 3)
    detail::image_set_error(images, "images must be [N, C, H, W], [N, H, W, C] or [N, H, W], not " +
                                        std::to_string(a.shape.size()) + "-dimensional");
  std::vector<int64_t> sh = a.shape;
  if (sh.size() == 3) sh.push_back(1);  // [N, H, W] grey
  const auto ok_c = [](int64_t c) { return c == 1 || c == 3; };
  const bool nchw = a.shape.size() == 4 && ok_c(sh[1]);
  ImageSet s;
  s.n = sh[0];
  s.channels = nchw ? sh[1] : sh[3];
  s.height = nchw ? sh[2] : sh[1];
  s.width = nchw ? sh[3] : sh[2];
  if (!ok_c(s.channels))
    detail::image_set_error(images, "images must be [N, C, H, W] or [N, H, W, C] with C = 1 or 3, shape [" +
                                        std::to_string(sh[0]) + ", " + std::to_string(sh[1]) + ", " +
                                        std::to_string(sh[2]) + ", " + std::to_string(sh[3]) + "]");
  if (s.n < 1 || s.height < 1 || s.width < 1) detail::image_set_error(images, "no images");
  if (!nchw) {
    s.pixels = a.bytes;
  } else {
    const int64_t C = s.channels, HW = s.height * s.width;
    s.pixels.resize(a.bytes.size());
    for (int64_t i = 0; i < s.n; ++i)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t p = 0; p < HW; ++p)
          s.pixels[static_cast<size_t>((i * HW + p) * C + c)] = a.bytes[static_cast<size_t>((i * C + c) * HW + p)];
  }
  if (!labels.empty()) {
    const npy::Array l = npy::load(labels);
    const char kind = l.descr.size() == 3 ? l.descr[1] : '?';
    if (kind != 'i' && kind != 'u') detail::image_set_error(labels, "labels must be integers, not " + l.descr);
    if (l.shape.size() != 1 || l.shape[0] != s.n)
      detail::image_set_error(labels, "needs one label per image (" + std::to_string(s.n) + "), shape has " +
                                          std::to_string(l.size()) + " values in " + std::to_string(l.shape.size()) +
                                          " dimensions");
    const std::vector<int64_t> v = l.as<int64_t>();
    const int64_t top = *std::max_element(v.begin(), v.end()), low = *std::min_element(v.begin(), v.end());
    const int64_t limit = classes > 0 ? classes : int64_t(1) << 20;
    if (low < 0 || top >= limit)
      detail::image_set_error(labels, "label " + std::to_string(low < 0 ? low : top) + " outside [0, " +
                                          std::to_string(limit) + ")");
    s.labels.assign(v.begin(), v.end());
    s.classes = classes > 0 ? classes : static_cast<int32_t>(top + 1);
  }
  return s;
}

}  // namespace diffuse
