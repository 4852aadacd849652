// Image data sets as they are stored: uint8 pixels in NHWC order with optional class labels.
// Loaders for CIFAR-10's binary batches and for NumPy arrays check every size against the file
// before they allocate, and fail with one line that names the file; image_tensor() turns a set
// into the [-1, 1] floats the models train on (the tensor a TensorDataset holds).
//
//   ImageSet train = load_cifar10("data/cifar-10-batches-bin");          // 50,000 x 32 x 32 x 3
//   ImageSet test = load_cifar10("cifar-10-binary.tar.gz", false);       // the download, unopened
//   ImageSet mine = load_image_npy("x.npy", "y.npy");                     // [N,H,W,C] or [N,C,H,W]
//   TensorDataset<float> data(image_tensor(train), train.labels, DataOrder::epochs, seed);
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <archive.h>
#include <archive_entry.h>

#include <diffuse/core/tensor.hpp>
#include <diffuse/io/npy.hpp>

namespace diffuse {

struct ImageSet {
  int64_t n = 0, height = 0, width = 0, channels = 0;
  std::vector<uint8_t> pixels;  // n * height * width * channels bytes, [n, height, width, channels]
  std::vector<int32_t> labels;  // n class labels in [0, classes), or empty
  int32_t classes = 0;          // 0 without labels
  std::vector<std::string> class_names;  // the classes' names when the source has them, else empty
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
// rows top to bottom.
inline const std::vector<std::string>& cifar10_class_names() {
  static const std::vector<std::string> names{"airplane", "automobile", "bird", "cat", "deer",
                                              "dog", "frog", "horse", "ship", "truck"};
  return names;
}

namespace detail {

constexpr int64_t kCifarSide = 32, kCifarPlane = kCifarSide * kCifarSide, kCifarRecord = 1 + 3 * kCifarPlane;

inline ImageSet empty_cifar10() {
  ImageSet out;
  out.height = out.width = kCifarSide;
  out.channels = 3;
  out.classes = 10;
  out.class_names = cifar10_class_names();
  return out;
}

inline void check_cifar10_size(const std::string& name, uint64_t bytes) {
  if (bytes == 0 || bytes % kCifarRecord != 0)
    image_set_error(name, std::to_string(bytes) + " bytes is not a whole number of CIFAR-10 records (" +
                              std::to_string(kCifarRecord) + " bytes each: a label and a 32x32 RGB image)");
}

// Appends the records of one file's bytes (named `name` in errors) to `out`.
inline void append_cifar10_records(const std::string& name, const std::vector<uint8_t>& raw, ImageSet& out) {
  check_cifar10_size(name, raw.size());
  const int64_t m = static_cast<int64_t>(raw.size()) / kCifarRecord, plane = kCifarPlane;
  const size_t base = out.pixels.size();
  out.pixels.resize(base + static_cast<size_t>(m * plane * 3));
  out.labels.reserve(out.labels.size() + static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) {
    const uint8_t* r = raw.data() + i * kCifarRecord;
    if (r[0] > 9)
      image_set_error(name, "record " + std::to_string(i) + " has label " + std::to_string(r[0]) +
                                " (CIFAR-10 labels are 0..9)");
    out.labels.push_back(r[0]);
    uint8_t* px = out.pixels.data() + base + static_cast<size_t>(i * plane * 3);
    for (int64_t p = 0; p < plane; ++p)
      for (int64_t c = 0; c < 3; ++c) px[p * 3 + c] = r[1 + c * plane + p];
  }
  out.n += m;
}

inline std::vector<std::string> cifar10_split_files(bool train) {
  std::vector<std::string> f;
  if (train)
    for (int i = 1; i <= 5; ++i) f.push_back("data_batch_" + std::to_string(i) + ".bin");
  else
    f.push_back("test_batch.bin");
  return f;
}

}  // namespace detail

// The files' images in order, as NHWC, with their labels.
inline ImageSet load_cifar10_bin(const std::vector<std::string>& files) {
  ImageSet out = detail::empty_cifar10();
  for (const std::string& path : files) {
    std::error_code ec;
    const auto bytes = std::filesystem::file_size(path, ec);
    if (ec) detail::image_set_error(path, "cannot read: " + ec.message());
    detail::check_cifar10_size(path, bytes);  // before allocating
    std::ifstream f(path, std::ios::binary);
    std::vector<uint8_t> raw(static_cast<size_t>(bytes));
    if (!f.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(bytes)))
      detail::image_set_error(path, "cannot read " + std::to_string(bytes) + " bytes");
    detail::append_cifar10_records(path, raw, out);
  }
  return out;
}

// The training (data_batch_1..5.bin) or test (test_batch.bin) split straight from an archive of
// the binary batches, cifar-10-binary.tar.gz as downloaded (libarchive reads it): a tar file,
// plain, gzipped or bzip2ed. Not xz, lzma, zstd and the others libarchive knows: their decoders
// allocate the dictionary or window a stream's header asks for (an xz header of a few bytes made
// libarchive allocate 32 MB; found by scripts/fuzz.sh), which the file cannot justify. Members
// are found by file name in any folder of the archive. A member's size is checked before it is
// read, and must be one the archive could hold (gzip compresses at most 1,032:1), so a damaged
// archive cannot make this allocate gigabytes.
inline ImageSet load_cifar10_archive(const std::string& path, bool train = true) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const auto archive_bytes = fs::file_size(path, ec);
  if (ec) detail::image_set_error(path, "cannot read: " + ec.message());
  std::unique_ptr<archive, int (*)(archive*)> a(archive_read_new(), archive_read_free);
  if (!a) detail::image_set_error(path, "libarchive: out of memory");
  archive_read_support_filter_gzip(a.get());
  archive_read_support_filter_bzip2(a.get());
  archive_read_support_format_tar(a.get());
  const auto fail = [&](const std::string& what) {
    const char* why = archive_error_string(a.get());
    detail::image_set_error(path, what + (why ? std::string(": ") + why : std::string()));
  };
  if (archive_read_open_filename(a.get(), path.c_str(), 1 << 16) != ARCHIVE_OK) fail("cannot open as an archive");
  const std::vector<std::string> wanted = detail::cifar10_split_files(train);
  std::map<std::string, std::vector<uint8_t>> found;
  archive_entry* e = nullptr;
  int r = ARCHIVE_OK;
  while ((r = archive_read_next_header(a.get(), &e)) == ARCHIVE_OK || r == ARCHIVE_WARN) {
    const char* pn = archive_entry_pathname(e);
    const std::string member = pn ? pn : "";
    const std::string base = fs::path(member).filename().string();
    if (archive_entry_filetype(e) != AE_IFREG || std::find(wanted.begin(), wanted.end(), base) == wanted.end()) continue;
    const std::string name = path + ":" + member;
    if (found.count(base)) detail::image_set_error(name, "a second " + base + " in the archive");
    if (!archive_entry_size_is_set(e)) detail::image_set_error(name, "the archive does not record the member's size");
    const auto size = static_cast<uint64_t>(archive_entry_size(e));
    detail::check_cifar10_size(name, size);
    if (static_cast<double>(size) > 1032.0 * static_cast<double>(archive_bytes) + 65536.0)
      detail::image_set_error(name, "claims " + std::to_string(size) + " bytes, more than an archive of " +
                                        std::to_string(archive_bytes) + " bytes can hold");
    std::vector<uint8_t> raw(static_cast<size_t>(size));
    size_t got = 0;
    while (got < raw.size()) {
      const la_ssize_t n = archive_read_data(a.get(), raw.data() + got, raw.size() - got);
      if (n < 0) fail(member + ": cannot read");
      if (n == 0) break;
      got += static_cast<size_t>(n);
    }
    if (got != raw.size())
      detail::image_set_error(name, "ends after " + std::to_string(got) + " of " + std::to_string(size) + " bytes");
    found.emplace(base, std::move(raw));
  }
  if (r != ARCHIVE_EOF) fail("damaged archive");
  ImageSet out = detail::empty_cifar10();
  for (const std::string& w : wanted) {
    auto it = found.find(w);
    if (it == found.end())
      detail::image_set_error(path, "no " + w + " in the archive (expected CIFAR-10's binary version, " +
                                        "cifar-10-binary.tar.gz)");
    detail::append_cifar10_records(path + ":" + w, it->second, out);
    std::vector<uint8_t>().swap(it->second);
  }
  return out;
}

// Whether load_cifar10 takes `path`: an archive file (.tar.gz, .tgz, .tar), or a folder holding
// the batches, cifar-10-batches-bin/ or cifar-10-binary.tar.gz. (The tools use it to tell
// CIFAR-10 from a folder of images.)
inline bool is_cifar10_source(const std::string& path) {
  namespace fs = std::filesystem;
  const auto ends = [&](const char* s) {
    const std::string e(s);
    return path.size() >= e.size() && path.compare(path.size() - e.size(), e.size(), e) == 0;
  };
  if (fs::is_regular_file(path)) return ends(".tar.gz") || ends(".tgz") || ends(".tar");
  const fs::path d(path);
  return fs::is_directory(d) && (fs::exists(d / "data_batch_1.bin") || fs::exists(d / "test_batch.bin") ||
                                 fs::exists(d / "cifar-10-batches-bin") || fs::exists(d / "cifar-10-binary.tar.gz"));
}

// The training or test split from: the folder of the batches; its parent, where the archive
// unpacks to cifar-10-batches-bin/; an archive (cifar-10-binary.tar.gz, not unpacked); or a folder
// holding that archive.
inline ImageSet load_cifar10(const std::string& path, bool train = true) {
  namespace fs = std::filesystem;
  if (fs::is_regular_file(path)) return load_cifar10_archive(path, train);
  if (!fs::is_directory(path)) detail::image_set_error(path, "no such file or folder");
  fs::path d(path);
  const std::vector<std::string> names = detail::cifar10_split_files(train);
  if (!fs::exists(d / names.front()) && fs::exists(d / "cifar-10-batches-bin" / names.front()))
    d /= "cifar-10-batches-bin";
  if (!fs::exists(d / names.front()) && fs::is_regular_file(d / "cifar-10-binary.tar.gz"))
    return load_cifar10_archive((d / "cifar-10-binary.tar.gz").string(), train);
  std::vector<std::string> files;
  for (const auto& n : names) {
    files.push_back((d / n).string());
    if (!fs::exists(files.back()))
      detail::image_set_error(path, "no " + n + " (expected CIFAR-10's binary version: data_batch_1.bin .. " +
                                        "data_batch_5.bin, test_batch.bin, or cifar-10-binary.tar.gz)");
  }
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
