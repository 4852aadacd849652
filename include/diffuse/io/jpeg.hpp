// JPEG files, decoded by libjpeg-turbo (its TurboJPEG API; Debian: libturbojpeg0-dev), the
// decoder PIL uses, so a JPEG gives the pixels pytorch-fid's dataset sees (accurate integer IDCT,
// smooth chroma upsampling: TurboJPEG's defaults for decompression).
//
//   jpeg::Info i = jpeg::read_info(bytes.data(), bytes.size(), "faces/a.jpg");  // width, height, channels
//   std::vector<uint8_t> px = jpeg::decode(bytes.data(), bytes.size(), 3, "faces/a.jpg");  // RGB rows
//
// Why not stb_image, which decodes the other formats: its JPEG decoder (v2.27, Debian's) misread
// damaged files in ways fuzzing kept finding (a Huffman table of over 256 codes, a scan before its
// table, negative bit counts); libjpeg-turbo is fuzzed continuously upstream. A warning (a file
// cut short, corrupt data) is an error here, as PIL refuses truncated files; progressive files are
// limited to 500 scans (TJFLAG_LIMITSCANS: a damaged one could ask for millions).
#pragma once

#include <turbojpeg.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace diffuse::jpeg {

struct Info {
  int width = 0, height = 0;
  int channels = 0;  // 1 (greyscale) or 3 (colour)
};

// JPEG's start-of-image marker: what a JPEG file begins with.
inline bool is_jpeg(const unsigned char* data, size_t n) { return n >= 2 && data[0] == 0xFF && data[1] == 0xD8; }

namespace detail {
struct Handle {
  tjhandle h = tjInitDecompress();
  Handle() {
    if (!h) throw std::runtime_error(std::string("jpeg: libjpeg-turbo could not start: ") + tjGetErrorStr2(nullptr));
  }
  ~Handle() { tjDestroy(h); }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  [[noreturn]] void fail(const std::string& where) const {
    throw std::runtime_error("diffuse: " + where + ": damaged or unsupported JPEG: " + tjGetErrorStr2(h));
  }
};
}  // namespace detail

inline Info read_info(const unsigned char* data, size_t n, const std::string& where) {
  detail::Handle t;
  int w = 0, h = 0, subsamp = 0, colorspace = 0;
  if (tjDecompressHeader3(t.h, data, static_cast<unsigned long>(n), &w, &h, &subsamp, &colorspace) != 0) t.fail(where);
  if (w < 1 || h < 1) throw std::runtime_error("diffuse: " + where + ": a JPEG of " + std::to_string(w) + "x" +
                                               std::to_string(h) + " pixels");
  return Info{w, h, colorspace == TJCS_GRAY ? 1 : 3};
}

// The pixels as rows of `channels` bytes: 1 (grey), 3 (RGB) or 4 (RGB and an opaque alpha),
// converted from the file's colour space by libjpeg-turbo.
inline std::vector<uint8_t> decode(const unsigned char* data, size_t n, int channels, const std::string& where) {
  if (channels != 1 && channels != 3 && channels != 4)
    throw std::invalid_argument("jpeg::decode: channels must be 1, 3 or 4, not " + std::to_string(channels));
  const Info i = read_info(data, n, where);
  detail::Handle t;
  std::vector<uint8_t> px(static_cast<size_t>(i.width) * static_cast<size_t>(i.height) * static_cast<size_t>(channels));
  const int format = channels == 1 ? TJPF_GRAY : channels == 3 ? TJPF_RGB : TJPF_RGBA;
  if (tjDecompress2(t.h, data, static_cast<unsigned long>(n), px.data(), i.width, 0, i.height, format,
                    TJFLAG_STOPONWARNING | TJFLAG_LIMITSCANS) != 0)
    t.fail(where);
  return px;
}

}  // namespace diffuse::jpeg
