// A folder of image files as an ImageSet (data/image_set.hpp), for any data set that is not
// CIFAR-10 or a NumPy array, and for the fid tool's folder inputs.
//
//   ImageSet s = load_image_folder("faces");             // faces/*.png: unlabelled
//   ImageSet s = load_image_folder("pets");              // pets/cat/*.jpg, pets/dog/*.jpg: labels 0, 1
//   ImageSet s = load_image_folder("faces", 3);          // grey images replicated to RGB
//
// Files with the extensions below, sorted by name (not recursive). Subfolders of image files
// instead of images make a labelled set, torchvision's ImageFolder convention: class k is the
// k-th subfolder in name order (class_names). Decoding: JPEG (baseline and progressive) by
// libjpeg-turbo (io/jpeg.hpp: PIL's decoder, so pytorch-fid's pixels), PNG of any colour type
// (palette expanded, 16 bits per sample reduced to the high byte), BMP and 8-bit PGM/PPM by
// stb_image. An alpha channel is dropped, not composited (PIL's convert("RGB"),
// what pytorch-fid does). channels 0 keeps 1 when every image is grey, else 3 (grey ones
// replicated); channels 1 refuses colour images (no colour-to-grey conversion). All images must
// have one size.
// Every header is read and checked before any pixel is decoded (a PNG's chunk CRCs too); an image that claims more pixels
// than its file could encode (deflate and JPEG stay under 2,048:1) is refused before allocating.
#pragma once

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/data/image_set.hpp>
#include <diffuse/io/jpeg.hpp>
#include <diffuse/io/stb.hpp>

#include <zlib.h>

namespace diffuse {

// The extensions read (case-insensitive).
inline bool is_image_file(const std::filesystem::path& p) {
  std::string e = p.extension().string();
  std::transform(e.begin(), e.end(), e.begin(), [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  return e == ".png" || e == ".jpg" || e == ".jpeg" || e == ".bmp" || e == ".pgm" || e == ".ppm";
}

namespace detail {

inline std::vector<std::filesystem::path> image_files_in(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.is_regular_file() && is_image_file(e.path())) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  return files;
}

// A PNG file's chunk structure, checked before stb decodes it (stb ignores the CRCs, so a damaged
// file decoded to wrong pixels): the signature, every chunk inside the file, every chunk's CRC-32
// over its type and data, and an IEND chunk (else the file was cut short).
inline void check_png_chunks(const std::filesystem::path& p, const std::vector<unsigned char>& b) {
  auto be32 = [&](size_t at) {
    return (uint32_t(b[at]) << 24) | (uint32_t(b[at + 1]) << 16) | (uint32_t(b[at + 2]) << 8) | uint32_t(b[at + 3]);
  };
  size_t at = 8;
  while (true) {
    if (b.size() - at < 12) image_set_error(p.string(), "truncated PNG (no IEND chunk)");
    const uint64_t len = be32(at);
    if (len > b.size() - at - 12)
      image_set_error(p.string(), "truncated PNG: a chunk of " + std::to_string(len) + " bytes runs past the end");
    const std::string type(reinterpret_cast<const char*>(&b[at + 4]), 4);
    const uint32_t want = be32(at + 8 + static_cast<size_t>(len));
    const uint32_t got = static_cast<uint32_t>(::crc32(::crc32(0L, nullptr, 0), &b[at + 4], static_cast<uInt>(len + 4)));
    if (got != want) image_set_error(p.string(), "damaged PNG: the CRC of its " + type + " chunk does not match");
    at += 12 + static_cast<size_t>(len);
    if (type == "IEND") return;
  }
}

// A binary PGM/PPM header (P5, P6): width, height and maximum value, each at most 9 digits, and
// 8 bits per sample. stb reads the numbers into an int without an overflow check (undefined
// behaviour on a 10-digit size), and a 16-bit file (maximum value over 255) whose channels it
// converts overruns its buffer (a PGM read as RGB, or as RGBA by train_2d --image); both found by
// scripts/fuzz.sh.
inline void check_pnm_header(const std::filesystem::path& p, const std::vector<unsigned char>& b) {
  // stb's own reading of the header, step for step (stbi__pnm_info): c is the character in hand,
  // `at` the next one; a comment runs to a newline or a carriage return.
  size_t at = 2;
  auto eof = [&] { return at >= b.size(); };
  auto get = [&]() -> unsigned char { return eof() ? 0 : b[at++]; };
  auto space = [](unsigned char ch) { return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\v' || ch == '\f' || ch == '\r'; };
  unsigned char c = get();
  for (int field = 0; field < 3; ++field) {
    for (;;) {  // stbi__pnm_skip_whitespace
      while (!eof() && space(c)) c = get();
      if (eof() || c != '#') break;
      while (!eof() && c != '\n' && c != '\r') c = get();
    }
    long value = 0;
    int digits = 0;
    while (!eof() && c >= '0' && c <= '9') {  // stbi__pnm_getinteger, which has no overflow check
      if (++digits > 9) image_set_error(p.string(), "damaged PGM/PPM header: a number of more than 9 digits");
      value = value * 10 + (c - '0');
      c = get();
    }
    if (field == 2 && value > 255)
      image_set_error(p.string(), "a 16-bit PGM/PPM (maximum value " + std::to_string(value) +
                                      "): only 8-bit ones are read (save it with 8 bits per sample)");
  }
}

// A file's bytes, all of them: the checks below and stb read the same buffer (stb reading a file
// itself can only rewind within its first 128 bytes, so after a failed JPEG test it took bytes
// 128 on for a PPM header that none of these checks had seen; found by scripts/fuzz.sh).
inline std::vector<unsigned char> image_file_bytes(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) image_set_error(p.string(), "cannot open");
  std::vector<unsigned char> b((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) image_set_error(p.string(), "cannot read");
  if (b.size() > 0x7fffffffu) image_set_error(p.string(), "larger than 2 GiB: not an image this reads");
  return b;
}

// The checks stb leaves out, by the file's content (stb decodes by content, not extension).
inline void check_image_bytes(const std::filesystem::path& p, const std::vector<unsigned char>& b) {
  static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (b.size() >= 8 && std::equal(sig, sig + 8, b.begin())) check_png_chunks(p, b);
  else if (b.size() >= 2 && b[0] == 'P' && (b[1] == '5' || b[1] == '6')) check_pnm_header(p, b);
}

// An image's size and channels from its header (libjpeg-turbo's for a JPEG, io/jpeg.hpp; stb's,
// after the checks above, for the rest), refusing one that claims more pixels than its file could
// encode (deflate and JPEG stay under 2,048:1): what may then be decoded (decode_image).
inline void checked_image_info(const std::filesystem::path& p, const std::vector<unsigned char>& b, int& w, int& h,
                               int& comp) {
  if (jpeg::is_jpeg(b.data(), b.size())) {
    const jpeg::Info i = jpeg::read_info(b.data(), b.size(), p.string());
    w = i.width, h = i.height, comp = i.channels;
  } else {
    check_image_bytes(p, b);
    if (!stbi_info_from_memory(b.data(), static_cast<int>(b.size()), &w, &h, &comp))
      image_set_error(p.string(), std::string("cannot read image: ") + stbi_failure_reason());
  }
  if (static_cast<double>(w) * h * comp > 2048.0 * static_cast<double>(b.size()) + 65536.0)
    image_set_error(p.string(), "claims " + std::to_string(w) + "x" + std::to_string(h) + " pixels in " +
                                    std::to_string(b.size()) + " bytes: a damaged file");
}

// The pixels of checked bytes as rows of `channels` channels (1, 3, or 4 with an opaque alpha):
// libjpeg-turbo for a JPEG, stb for the rest, each converting the channels. Refuses a decode whose
// size differs from (w, h), the header's.
inline std::vector<unsigned char> decode_image(const std::filesystem::path& p, const std::vector<unsigned char>& b,
                                               int w, int h, int channels) {
  if (jpeg::is_jpeg(b.data(), b.size())) return jpeg::decode(b.data(), b.size(), channels, p.string());
  int dw = 0, dh = 0, comp = 0;
  unsigned char* px = stbi_load_from_memory(b.data(), static_cast<int>(b.size()), &dw, &dh, &comp, channels);
  if (!px) image_set_error(p.string(), std::string("cannot decode image: ") + stbi_failure_reason());
  const std::unique_ptr<unsigned char, void (*)(void*)> owned(px, stbi_image_free);
  if (dw != w || dh != h) image_set_error(p.string(), "decodes to another size than its header says");
  return std::vector<unsigned char>(px, px + static_cast<size_t>(w) * static_cast<size_t>(h) * static_cast<size_t>(channels));
}

}  // namespace detail

inline ImageSet load_image_folder(const std::string& dir, int64_t channels = 0) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir)) detail::image_set_error(dir, "not a folder");
  if (channels != 0 && channels != 1 && channels != 3)
    detail::image_set_error(dir, "channels must be 0 (as the images are), 1 or 3, not " + std::to_string(channels));
  // The files, and their labels when the images are in class subfolders.
  std::vector<fs::path> files = detail::image_files_in(dir);
  std::vector<int32_t> labels;
  ImageSet s;
  if (files.empty()) {
    std::vector<fs::path> sub;
    for (const auto& e : fs::directory_iterator(dir))
      if (e.is_directory()) sub.push_back(e.path());
    std::sort(sub.begin(), sub.end());
    for (const fs::path& d : sub) {
      const std::vector<fs::path> f = detail::image_files_in(d);
      if (f.empty()) continue;
      files.insert(files.end(), f.begin(), f.end());
      labels.insert(labels.end(), f.size(), static_cast<int32_t>(s.class_names.size()));
      s.class_names.push_back(d.filename().string());
    }
  }
  if (files.empty())
    detail::image_set_error(dir, "no image files (png, jpg, jpeg, bmp, pgm, ppm), in it or in class subfolders");

  // Headers first: one size, the channels, and a pixel count the file can justify.
  bool colour = false;
  for (const fs::path& p : files) {
    int w = 0, h = 0, comp = 0;
    detail::checked_image_info(p, detail::image_file_bytes(p), w, h, comp);
    if (s.n == 0) {
      s.width = w;
      s.height = h;
    } else if (w != s.width || h != s.height) {
      detail::image_set_error(p.string(), "is " + std::to_string(w) + "x" + std::to_string(h) + ", " +
                                              files.front().string() + " is " + std::to_string(s.width) + "x" +
                                              std::to_string(s.height) + ": all images must have one size");
    }
    if (comp >= 3) {
      if (channels == 1)
        detail::image_set_error(p.string(), "is a colour image; this set was asked for grey (1 channel)");
      colour = true;
    }
    ++s.n;
  }
  s.channels = channels != 0 ? channels : (colour ? 3 : 1);

  // Then the pixels.
  const size_t per = static_cast<size_t>(s.width) * static_cast<size_t>(s.height) * static_cast<size_t>(s.channels);
  s.pixels.resize(per * files.size());
  for (size_t i = 0; i < files.size(); ++i) {
    // Read and checked again: the file may have changed since its header was read.
    const std::vector<unsigned char> b = detail::image_file_bytes(files[i]);
    int w = 0, h = 0, comp = 0;
    detail::checked_image_info(files[i], b, w, h, comp);
    if (w != s.width || h != s.height) detail::image_set_error(files[i].string(), "changed size while being read");
    const std::vector<unsigned char> px = detail::decode_image(files[i], b, w, h, static_cast<int>(s.channels));
    std::copy(px.begin(), px.end(), s.pixels.begin() + static_cast<std::ptrdiff_t>(i * per));
  }
  if (!labels.empty()) {
    s.labels = std::move(labels);
    s.classes = static_cast<int32_t>(s.class_names.size());
  }
  return s;
}

}  // namespace diffuse
