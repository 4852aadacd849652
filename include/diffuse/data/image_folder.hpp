// A folder of image files as an ImageSet (data/image_set.hpp), for any data set that is not
// CIFAR-10 or a NumPy array, and for the fid tool's folder inputs.
//
//   ImageSet s = load_image_folder("faces");             // faces/*.png: unlabelled
//   ImageSet s = load_image_folder("pets");              // pets/cat/*.jpg, pets/dog/*.jpg: labels 0, 1
//   ImageSet s = load_image_folder("faces", 3);          // grey images replicated to RGB
//
// Files with the extensions below, sorted by name (not recursive). Subfolders of image files
// instead of images make a labelled set, torchvision's ImageFolder convention: class k is the
// k-th subfolder in name order (class_names). Decoding is stb_image's: PNG of any colour type
// (palette expanded, 16 bits per sample reduced to the high byte), JPEG (baseline and
// progressive), BMP, PGM/PPM. An alpha channel is dropped, not composited (PIL's convert("RGB"),
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
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/data/image_set.hpp>
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

// A binary PGM/PPM header (P5, P6): width, height and maximum value, each at most 9 digits. stb
// reads them into an int without an overflow check (undefined behaviour on a 10-digit size;
// found by scripts/fuzz.sh).
inline void check_pnm_header(const std::filesystem::path& p, const std::vector<unsigned char>& b) {
  size_t at = 2;
  for (int field = 0; field < 3; ++field) {
    while (at < b.size() && (std::isspace(b[at]) || b[at] == '#')) {
      if (b[at] == '#')
        while (at < b.size() && b[at] != '\n') ++at;
      else
        ++at;
    }
    size_t digits = 0;
    while (at < b.size() && std::isdigit(b[at])) ++at, ++digits;
    if (digits > 9) image_set_error(p.string(), "damaged PGM/PPM header: a number of more than 9 digits");
    if (digits == 0) return;  // not a number: stb refuses the header itself
  }
}

// A JPEG's Huffman tables (DHT segments, wherever they are: progressive files have them between
// scans): each may define at most 256 codes. stb fills a 257-entry array from the counts without
// checking their sum (an out-of-bounds write on a damaged file; found by scripts/fuzz.sh).
inline void check_jpeg_huffman(const std::filesystem::path& p, const std::vector<unsigned char>& b) {
  size_t at = 0;
  while (at < b.size() && b[at] == 0xFF) ++at;
  ++at;  // SOI (0xD8), with any fill bytes before it
  while (at < b.size()) {
    if (b[at] != 0xFF) {  // entropy-coded data after a scan: on to the next marker
      ++at;
      continue;
    }
    while (at < b.size() && b[at] == 0xFF) ++at;
    if (at >= b.size()) return;
    const unsigned m = b[at++];
    if (m == 0x00 || m == 0x01 || (m >= 0xD0 && m <= 0xD7)) continue;  // a stuffed byte, TEM, RSTn
    if (m == 0xD9) return;                                             // EOI
    if (at + 2 > b.size()) return;  // cut short: stb reports it
    const size_t len = (size_t(b[at]) << 8) | b[at + 1];
    if (len < 2) return;
    const size_t end = std::min(b.size(), at + len);  // stb reads a segment cut short as zeros
    if (m == 0xC4) {
      for (size_t q = at + 2; q < end;) {
        size_t n = 0;  // bytes past the end count as 0, as stb reads them
        for (size_t i = 0; i < 16; ++i) n += q + 1 + i < b.size() ? b[q + 1 + i] : 0;
        if (n > 256)
          image_set_error(p.string(), "damaged JPEG: a Huffman table of " + std::to_string(n) + " codes (at most 256)");
        q += 17 + n;
      }
    }
    at = end;
  }
}

// The checks stb leaves out, by the file's content (stb decodes by content, not extension).
inline void check_image_bytes(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  const std::vector<unsigned char> b((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (b.size() >= 8 && std::equal(sig, sig + 8, b.begin())) check_png_chunks(p, b);
  else if (b.size() >= 2 && b[0] == 'P' && (b[1] == '5' || b[1] == '6')) check_pnm_header(p, b);
  else if (!b.empty() && b[0] == 0xFF) check_jpeg_huffman(p, b);
}

// An image file's size and channels from its header, after the checks above, refusing one that
// claims more pixels than its file could encode (deflate and JPEG stay under 2,048:1): what may be
// given to stb to decode.
inline void checked_image_info(const std::filesystem::path& p, int& w, int& h, int& comp) {
  check_image_bytes(p);
  if (!stbi_info(p.string().c_str(), &w, &h, &comp))
    image_set_error(p.string(), std::string("cannot read image: ") + stbi_failure_reason());
  const auto bytes = std::filesystem::file_size(p);
  if (static_cast<double>(w) * h * comp > 2048.0 * static_cast<double>(bytes) + 65536.0)
    image_set_error(p.string(), "claims " + std::to_string(w) + "x" + std::to_string(h) + " pixels in " +
                                    std::to_string(bytes) + " bytes: a damaged file");
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
    detail::checked_image_info(p, w, h, comp);
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
    int w = 0, h = 0, comp = 0;
    unsigned char* px = stbi_load(files[i].string().c_str(), &w, &h, &comp, static_cast<int>(s.channels));
    if (!px) detail::image_set_error(files[i].string(), std::string("cannot decode image: ") + stbi_failure_reason());
    if (w != s.width || h != s.height) {  // the header said otherwise: the file changed under us
      stbi_image_free(px);
      detail::image_set_error(files[i].string(), "changed size while being read");
    }
    std::copy(px, px + per, s.pixels.begin() + static_cast<std::ptrdiff_t>(i * per));
    stbi_image_free(px);
  }
  if (!labels.empty()) {
    s.labels = std::move(labels);
    s.classes = static_cast<int32_t>(s.class_names.size());
  }
  return s;
}

}  // namespace diffuse
