// IDX files, the format of MNIST and Fashion-MNIST: a big-endian magic
// 0x000008DD (unsigned bytes, DD dimensions), DD big-endian uint32 sizes, then
// the bytes. Files are read plain or gzipped, told apart by the gzip magic 1f 8b
// rather than by the name (both kinds circulate under both names), and written
// gzipped when the path ends in ".gz".
//
// Reading is strict: the magic, nonzero sizes and a body of exactly the size
// the header gives (a truncated download or trailing bytes are errors, not
// silently short datasets). Errors are std::runtime_error, one line naming the
// file and what is wrong.
#pragma once

#include <zlib.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace diffuse {

// count images of rows x cols bytes, row-major, one image after another.
struct IdxImages {
  size_t count = 0, rows = 0, cols = 0;
  std::vector<uint8_t> pixels;
};

struct IdxLabels {
  std::vector<uint8_t> labels;
};

// One split of an MNIST-format dataset and the files it came from.
struct MnistSplit {
  IdxImages images;
  IdxLabels labels;
  std::string images_path, labels_path;
};

namespace detail {

inline constexpr uint32_t kIdxImagesMagic = 0x00000803, kIdxLabelsMagic = 0x00000801;

[[noreturn]] inline void idx_fail(const std::string& path, const std::string& what) {
  throw std::runtime_error("idx: " + path + ": " + what);
}

inline std::string idx_hex(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08X", static_cast<unsigned>(v));
  return buf;
}

// The decompressed bytes of a file, in order: the plain bytes, or the inflated
// gzip member(s). Streams, so a bogus header cannot make it read a whole file
// into memory first.
class IdxSource {
 public:
  explicit IdxSource(std::string path) : path_(std::move(path)), f_(path_, std::ios::binary) {
    if (!f_) idx_fail(path_, std::filesystem::exists(path_) ? "cannot open for reading" : "no such file");
    fill();
    gz_ = have_ >= 2 && in_[0] == 0x1f && in_[1] == 0x8b;
    if (gz_) {
      if (inflateInit2(&zs_, 16 + MAX_WBITS) != Z_OK) idx_fail(path_, "zlib inflateInit2 failed");
      zinit_ = true;
    }
  }
  ~IdxSource() {
    if (zinit_) inflateEnd(&zs_);
  }
  IdxSource(const IdxSource&) = delete;
  IdxSource& operator=(const IdxSource&) = delete;

  bool gzipped() const { return gz_; }

  // Fills dst[0, n) and returns how many bytes there were: fewer only at the end.
  size_t read(uint8_t* dst, size_t n) {
    size_t got = 0;
    while (got < n) {
      if (!gz_) {
        if (pos_ == have_ && !fill()) return got;
        const size_t k = std::min(n - got, have_ - pos_);
        std::copy_n(in_.data() + pos_, k, dst + got);
        pos_ += k;
        got += k;
        continue;
      }
      if (member_done_) {  // the end, another gzip member, or garbage
        if (pos_ == have_ && !fill()) return got;
        if (have_ - pos_ < 2) fill();
        if (have_ - pos_ < 2 || in_[pos_] != 0x1f || in_[pos_ + 1] != 0x8b)
          idx_fail(path_, "corrupt gzip data (bytes after the end of the compressed stream)");
        inflateReset(&zs_);
        member_done_ = false;
      }
      if (pos_ == have_) fill();  // at the end of the file inflate may still hold output
      zs_.next_in = in_.data() + pos_;
      zs_.avail_in = static_cast<uInt>(have_ - pos_);
      zs_.next_out = dst + got;
      zs_.avail_out = static_cast<uInt>(std::min<size_t>(n - got, 1u << 30));
      const int rc = inflate(&zs_, Z_NO_FLUSH);
      pos_ = have_ - zs_.avail_in;
      got = static_cast<size_t>(zs_.next_out - dst);
      if (rc == Z_STREAM_END) {
        member_done_ = true;
      } else if (rc == Z_BUF_ERROR) {  // no progress: it needs input and the file has none left
        if (!fill()) idx_fail(path_, "truncated gzip data (the compressed stream ends early)");
      } else if (rc != Z_OK) {
        idx_fail(path_, std::string("corrupt gzip data (zlib: ") + (zs_.msg ? zs_.msg : "error " + std::to_string(rc)) +
                            ")");
      }
    }
    return got;
  }

  // Reads and counts what is left (for the trailing-bytes message).
  size_t drain() {
    std::vector<uint8_t> buf(1 << 16);
    size_t total = 0, k;
    while ((k = read(buf.data(), buf.size())) > 0) total += k;
    return total;
  }

 private:
  // Moves unread input to the front and reads more; false at the end of the file.
  bool fill() {
    std::copy(in_.begin() + static_cast<std::ptrdiff_t>(pos_), in_.begin() + static_cast<std::ptrdiff_t>(have_),
              in_.begin());
    have_ -= pos_;
    pos_ = 0;
    f_.read(reinterpret_cast<char*>(in_.data() + have_), static_cast<std::streamsize>(in_.size() - have_));
    const size_t k = static_cast<size_t>(f_.gcount());
    if (f_.bad()) idx_fail(path_, "read error");
    have_ += k;
    return k > 0;
  }

  std::string path_;
  std::ifstream f_;
  std::vector<uint8_t> in_ = std::vector<uint8_t>(1 << 16);
  size_t pos_ = 0, have_ = 0;
  bool gz_ = false, zinit_ = false, member_done_ = false;
  z_stream zs_{};
};

// Reads an IDX header of `ndims` sizes with the given magic; returns the sizes.
inline std::vector<size_t> idx_read_header(IdxSource& src, const std::string& path, uint32_t magic, size_t ndims,
                                           const char* kind) {
  std::vector<uint8_t> h(4 * (1 + ndims));
  const size_t got = src.read(h.data(), h.size());
  auto be32 = [&](size_t k) {
    return uint32_t(h[4 * k]) << 24 | uint32_t(h[4 * k + 1]) << 16 | uint32_t(h[4 * k + 2]) << 8 | uint32_t(h[4 * k + 3]);
  };
  if (got >= 4 && be32(0) != magic)
    idx_fail(path, "wrong magic " + idx_hex(be32(0)) + ", expected " + idx_hex(magic) + " (" + kind + ")");
  if (got < h.size())
    idx_fail(path, "truncated: " + std::to_string(got) + " bytes, too short for the " + std::to_string(h.size()) +
                       "-byte header of " + kind);
  std::vector<size_t> dims(ndims);
  for (size_t k = 0; k < ndims; ++k) dims[k] = be32(k + 1);
  return dims;
}

// Reads exactly n body bytes, then requires the end of the data.
inline std::vector<uint8_t> idx_read_body(IdxSource& src, const std::string& path, size_t n, const std::string& what) {
  std::vector<uint8_t> body;
  size_t got = 0;
  // Grown geometrically from 64 KiB, so the memory taken is at most about twice the data actually
  // there: a header that claims more than the file holds fails before a large allocation (fixed
  // steps of 64 MiB made every short file with a big claim allocate 64 MiB; found by fuzzing).
  while (got < n) {
    const size_t step = std::min<size_t>(n - got, std::max<size_t>(got, size_t(1) << 16));
    body.resize(got + step);
    const size_t k = src.read(body.data() + got, step);
    got += k;
    if (k < step)
      idx_fail(path, "truncated: the header says " + what + " (" + std::to_string(n) + " bytes) but the data has " +
                         std::to_string(got));
  }
  uint8_t extra;
  if (src.read(&extra, 1) == 1)
    idx_fail(path, std::to_string(1 + src.drain()) + " trailing bytes after the " + std::to_string(n) +
                       " bytes of " + what + " the header describes");
  return body;
}

inline bool idx_ends_with_gz(const std::string& path) {
  return path.size() >= 3 && path.compare(path.size() - 3, 3, ".gz") == 0;
}

// Writes header + body to a temporary name, then renames: a failed write never
// leaves a partial file under the real name.
inline void idx_write(const std::string& path, uint32_t magic, const std::vector<size_t>& dims, const uint8_t* body,
                      size_t n) {
  std::vector<uint8_t> h;
  auto put = [&](uint64_t v) {
    if (v == 0 || v > 0xFFFFFFFFull) idx_fail(path, "cannot write a size of " + std::to_string(v) + " (must be 1 to 2^32-1)");
    for (int s = 24; s >= 0; s -= 8) h.push_back(static_cast<uint8_t>(v >> s));
  };
  for (int s = 24; s >= 0; s -= 8) h.push_back(static_cast<uint8_t>(magic >> s));
  for (size_t d : dims) put(d);
  const std::string tmp = path + ".tmp";
  bool ok = false;
  if (idx_ends_with_gz(path)) {
    if (gzFile gz = gzopen(tmp.c_str(), "wb")) {
      ok = gzwrite(gz, h.data(), static_cast<unsigned>(h.size())) == static_cast<int>(h.size());
      for (size_t off = 0; ok && off < n;) {
        const unsigned k = static_cast<unsigned>(std::min<size_t>(n - off, 1u << 30));
        ok = gzwrite(gz, body + off, k) == static_cast<int>(k);
        off += k;
      }
      ok = (gzclose(gz) == Z_OK) && ok;
    }
  } else {
    std::ofstream f(tmp, std::ios::binary);
    f.write(reinterpret_cast<const char*>(h.data()), static_cast<std::streamsize>(h.size()));
    f.write(reinterpret_cast<const char*>(body), static_cast<std::streamsize>(n));
    f.close();
    ok = static_cast<bool>(f);
  }
  std::error_code ec;
  if (ok) std::filesystem::rename(tmp, path, ec);
  if (!ok || ec) {
    std::filesystem::remove(tmp, ec);
    idx_fail(path, "cannot write");
  }
}

// The first existing file among the usual spellings of an MNIST file name.
inline std::string mnist_find(const std::filesystem::path& dir, const std::string& prefix, const std::string& kind) {
  // kind "images-idx3-ubyte": also "images.idx3-ubyte", as some unpackers name it.
  std::string dotted = kind;
  dotted[dotted.find('-')] = '.';
  for (const std::string& stem : {prefix + "-" + kind, prefix + "-" + dotted})
    for (const char* ext : {"", ".gz"}) {
      const std::filesystem::path p = dir / (stem + ext);
      if (std::filesystem::is_regular_file(p)) return p.string();
    }
  throw std::runtime_error("mnist: " + dir.string() + ": no " + prefix + "-" + kind + " or " + prefix + "-" + kind +
                           ".gz" + (std::filesystem::is_directory(dir) ? "" : " (no such directory)"));
}

}  // namespace detail

inline IdxImages read_idx_images(const std::string& path) {
  detail::IdxSource src(path);
  const auto d = detail::idx_read_header(src, path, detail::kIdxImagesMagic, 3, "an image file");
  if (d[0] == 0 || d[1] == 0 || d[2] == 0)
    detail::idx_fail(path, "zero size in the header (" + std::to_string(d[0]) + " images of " + std::to_string(d[1]) +
                               "x" + std::to_string(d[2]) + ")");
  IdxImages im;
  im.count = d[0];
  im.rows = d[1];
  im.cols = d[2];
  // Each size is below 2^32, so rows * cols fits; the product with count may not.
  const size_t per = im.rows * im.cols;
  if (im.count > SIZE_MAX / per) detail::idx_fail(path, "the header's sizes overflow");
  im.pixels = detail::idx_read_body(src, path, im.count * per,
                                    std::to_string(im.count) + " images of " + std::to_string(im.rows) + "x" +
                                        std::to_string(im.cols));
  return im;
}

inline IdxLabels read_idx_labels(const std::string& path) {
  detail::IdxSource src(path);
  const auto d = detail::idx_read_header(src, path, detail::kIdxLabelsMagic, 1, "a label file");
  if (d[0] == 0) detail::idx_fail(path, "zero size in the header (0 labels)");
  IdxLabels lb;
  lb.labels = detail::idx_read_body(src, path, d[0], std::to_string(d[0]) + " labels");
  return lb;
}

inline void write_idx_images(const std::string& path, const IdxImages& im) {
  const size_t lim = 0xFFFFFFFFu;
  if (im.count == 0 || im.rows == 0 || im.cols == 0 || im.count > lim || im.rows > lim || im.cols > lim ||
      im.pixels.size() % im.count != 0 || im.pixels.size() / im.count != im.rows * im.cols)
    detail::idx_fail(path, "cannot write " + std::to_string(im.count) + " images of " + std::to_string(im.rows) + "x" +
                               std::to_string(im.cols) + " from " + std::to_string(im.pixels.size()) + " pixels");
  detail::idx_write(path, detail::kIdxImagesMagic, {im.count, im.rows, im.cols}, im.pixels.data(), im.pixels.size());
}

inline void write_idx_labels(const std::string& path, const IdxLabels& lb) {
  if (lb.labels.empty()) detail::idx_fail(path, "cannot write an empty label file");
  detail::idx_write(path, detail::kIdxLabelsMagic, {lb.labels.size()}, lb.labels.data(), lb.labels.size());
}

// Loads split "train" (train-*) or "test" (t10k-*) of an MNIST-format dataset
// from dir: the official names, gzipped or not (MNIST, Fashion-MNIST, the
// output of scripts/get_mnist.sh). Checks that images and labels pair up and
// that every label is a class 0-9.
inline MnistSplit load_mnist(const std::string& dir, const std::string& split) {
  if (split != "train" && split != "test")
    throw std::invalid_argument("load_mnist: split must be \"train\" or \"test\", not \"" + split + "\"");
  const std::string prefix = split == "train" ? "train" : "t10k";
  MnistSplit s;
  s.images_path = detail::mnist_find(dir, prefix, "images-idx3-ubyte");
  s.labels_path = detail::mnist_find(dir, prefix, "labels-idx1-ubyte");
  s.images = read_idx_images(s.images_path);
  s.labels = read_idx_labels(s.labels_path);
  if (s.images.count != s.labels.labels.size())
    throw std::runtime_error("mnist: " + dir + ": " + std::to_string(s.images.count) + " images (" + s.images_path +
                             ") but " + std::to_string(s.labels.labels.size()) + " labels (" + s.labels_path + ")");
  for (size_t i = 0; i < s.labels.labels.size(); ++i)
    if (s.labels.labels[i] > 9)
      throw std::runtime_error("mnist: " + s.labels_path + ": label " + std::to_string(s.labels.labels[i]) +
                               " at index " + std::to_string(i) + " is not a class 0-9");
  return s;
}

}  // namespace diffuse
