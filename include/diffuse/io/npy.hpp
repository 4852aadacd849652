// NumPy files: .npy (format versions 1.0 to 3.0) and .npz (a zip of .npy members,
// as numpy.savez / numpy.savez_compressed write them).
//
//   npy::save(path, data, shape)      writes a version 1.0 .npy of uint8_t ('|u1'),
//                                     int32_t ('<i4'), int64_t ('<i8'), float ('<f4')
//                                     or double ('<f8'), C order
//   npy::load(path) -> Array          dtype string, shape and raw little-endian bytes;
//                                     Array::as<T>() converts the elements to T
//   npy::load_npz(path)               member name (without ".npy") -> Array; stored or deflated
//   npy::save_npz(path, arrays)       a deflated zip that numpy.load reads
//   npy::array(data, shape)           an Array holding a copy of data (for save_npz)
//
// Reading is strict, since these files carry samples and statistics between
// programs: the magic, a version 1.0, 2.0 or 3.0 header, the header dict
// (exactly the keys descr, fortran_order, shape), a supported little-endian
// dtype, C order, and a body of exactly shape-product * itemsize bytes. Errors
// are std::runtime_error, one line naming the file. Files are written to
// path + ".tmp" and renamed, so a failed write never leaves a partial file.
// Also read: '|i1', '|b1' (bool as 0/1) and '<u1'; big-endian data is refused.
#pragma once

#include <zlib.h>

#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace diffuse::npy {

struct Array {
  std::string descr;            // numpy's dtype string, e.g. "<f4"
  std::vector<int64_t> shape;   // () for a scalar
  bool fortran_order = false;   // always false for a loaded Array (load refuses Fortran order)
  std::vector<uint8_t> bytes;   // size() * itemsize little-endian bytes, C order

  // Number of elements: the product of shape (1 for a scalar).
  size_t size() const {
    size_t n = 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    return n;
  }
  // The elements converted to T with static_cast (so float -> int truncates).
  template <class T>
  std::vector<T> as() const;
};

namespace detail {

[[noreturn]] inline void fail(const std::string& where, const std::string& what) {
  throw std::runtime_error("npy: " + where + ": " + what);
}

template <class T>
constexpr const char* descr_of() {
  if constexpr (std::is_same_v<T, uint8_t>) return "|u1";
  else if constexpr (std::is_same_v<T, int32_t>) return "<i4";
  else if constexpr (std::is_same_v<T, int64_t>) return "<i8";
  else if constexpr (std::is_same_v<T, float>) return "<f4";
  else if constexpr (std::is_same_v<T, double>) return "<f8";
  else static_assert(sizeof(T) == 0, "npy: supported element types are uint8_t, int32_t, int64_t, float, double");
}

// Bytes per element of a readable dtype, 0 if not readable.
inline size_t itemsize(const std::string& d) {
  if (d == "|u1" || d == "<u1" || d == "|i1" || d == "|b1") return 1;
  if (d == "<i4") return 4;
  if (d == "<i8" || d == "<f8") return 8;
  if (d == "<f4") return 4;
  return 0;
}

// A little-endian value at p (files are little-endian whatever the host is).
template <class U>
inline U get_le(const uint8_t* p) {
  U v;
  std::memcpy(&v, p, sizeof(U));
  if constexpr (std::endian::native == std::endian::big && sizeof(U) > 1) {
    uint8_t b[sizeof(U)];
    std::memcpy(b, &v, sizeof(U));
    for (size_t i = 0; i < sizeof(U) / 2; ++i) std::swap(b[i], b[sizeof(U) - 1 - i]);
    std::memcpy(&v, b, sizeof(U));
  }
  return v;
}
template <class U>
inline void put_le(std::vector<uint8_t>& out, U v) {
  uint8_t b[sizeof(U)];
  std::memcpy(b, &v, sizeof(U));
  if constexpr (std::endian::native == std::endian::big)
    for (size_t i = 0; i < sizeof(U) / 2; ++i) std::swap(b[i], b[sizeof(U) - 1 - i]);
  out.insert(out.end(), b, b + sizeof(U));
}

inline std::string shape_repr(const std::vector<int64_t>& s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + (s.size() == 1 ? ",)" : ")");
}

// Element count of shape, checking for negative sizes and overflow of the byte count.
inline size_t checked_count(const std::vector<int64_t>& shape, size_t item, const std::string& where) {
  size_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) fail(where, "negative dimension in shape " + shape_repr(shape));
    if (d != 0 && n > std::numeric_limits<size_t>::max() / item / static_cast<size_t>(d))
      fail(where, "shape " + shape_repr(shape) + " is too large");
    n *= static_cast<size_t>(d);
  }
  return n;
}

// The whole .npy encoding of one array: version 1.0 header padded with spaces
// and a newline so that the data starts at a multiple of 64 bytes (numpy's alignment).
inline std::vector<uint8_t> encode(const Array& a, const std::string& where) {
  const size_t item = itemsize(a.descr);
  if (!item) fail(where, "cannot write dtype '" + a.descr + "'");
  if (a.fortran_order) fail(where, "cannot write a Fortran-order array");
  const size_t n = checked_count(a.shape, item, where);
  if (a.bytes.size() != n * item)
    fail(where, std::to_string(a.bytes.size()) + " data bytes for shape " + shape_repr(a.shape) + " of " + a.descr);
  std::string h = "{'descr': '" + a.descr + "', 'fortran_order': False, 'shape': " + shape_repr(a.shape) + ", }";
  // numpy (>= 1.20) leaves room to grow the first dimension in place; doing
  // the same makes our files byte-identical to np.save's.
  if (!a.shape.empty()) h.append(21 - std::min<size_t>(21, std::to_string(a.shape[0]).size()), ' ');
  const size_t total = 10 + h.size() + 1;
  h.append((64 - total % 64) % 64, ' ');
  h.push_back('\n');
  if (h.size() > 65535) fail(where, "header too long for format 1.0");
  std::vector<uint8_t> out(10 + h.size() + a.bytes.size());
  std::memcpy(out.data(), "\x93NUMPY\x01\x00", 8);
  out[8] = static_cast<uint8_t>(h.size() & 0xFF);  // header length, uint16 little-endian
  out[9] = static_cast<uint8_t>(h.size() >> 8);
  std::memcpy(out.data() + 10, h.data(), h.size());
  if (!a.bytes.empty()) std::memcpy(out.data() + 10 + h.size(), a.bytes.data(), a.bytes.size());
  return out;
}

// Writes bytes to path + ".tmp", then renames it to path.
inline void write_file(const std::string& path, const std::vector<uint8_t>& b) {
  const std::string tmp = path + ".tmp";
  bool ok = false;
  if (FILE* f = std::fopen(tmp.c_str(), "wb")) {
    ok = b.empty() || std::fwrite(b.data(), 1, b.size(), f) == b.size();
    ok = (std::fclose(f) == 0) && ok;
  }
  std::error_code ec;
  if (ok) std::filesystem::rename(tmp, path, ec);
  if (!ok || ec) {
    const std::string why = ok ? ec.message() : std::strerror(errno);
    std::filesystem::remove(tmp, ec);
    fail(path, "cannot write (" + why + ")");
  }
}

inline std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(path, std::filesystem::exists(path) ? "cannot open for reading" : "no such file");
  std::vector<uint8_t> b((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) fail(path, "read error");
  return b;
}

// A parser for the header: a Python dict literal of strings, True/False and
// tuples of integers, which is all numpy writes there.
class HeaderParser {
 public:
  HeaderParser(const std::string& s, const std::string& where) : s_(s), where_(where) {}

  Array parse() {
    Array a;
    bool has_descr = false, has_order = false, has_shape = false;
    expect('{');
    while (true) {
      ws();
      if (peek() == '}') break;
      const std::string key = str();
      ws();
      expect(':');
      ws();
      if (key == "descr") {
        if (peek() != '\'' && peek() != '"') bad("descr is not a plain dtype string (structured dtypes are not supported)");
        a.descr = str();
        has_descr = true;
      } else if (key == "fortran_order") {
        a.fortran_order = boolean();
        has_order = true;
      } else if (key == "shape") {
        a.shape = tuple();
        has_shape = true;
      } else {
        bad("unexpected key '" + key + "'");
      }
      ws();
      if (peek() == ',') {
        ++i_;
        continue;
      }
      ws();
      if (peek() != '}') bad("expected ',' or '}' at offset " + std::to_string(i_));
    }
    ++i_;
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\t' || s_[i_] == '\r' || s_[i_] == '\0'))
      ++i_;
    if (i_ != s_.size()) bad("text after the closing '}'");
    if (!has_descr || !has_order || !has_shape)
      bad(std::string("missing key '") + (!has_descr ? "descr" : !has_order ? "fortran_order" : "shape") + "'");
    return a;
  }

 private:
  [[noreturn]] void bad(const std::string& why) const { fail(where_, "bad header (" + why + "): " + printable()); }
  std::string printable() const {
    std::string t;
    for (char c : s_.substr(0, 200)) t += (c == '\n' ? ' ' : (c >= 32 && c < 127 ? c : '?'));
    while (!t.empty() && t.back() == ' ') t.pop_back();
    return t;
  }
  char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  void expect(char c) {
    ws();
    if (peek() != c) bad(std::string("expected '") + c + "' at offset " + std::to_string(i_));
    ++i_;
  }
  std::string str() {
    const char q = peek();
    if (q != '\'' && q != '"') bad("expected a quoted string at offset " + std::to_string(i_));
    const size_t e = s_.find(q, i_ + 1);
    if (e == std::string::npos) bad("unterminated string");
    std::string r = s_.substr(i_ + 1, e - i_ - 1);
    i_ = e + 1;
    return r;
  }
  bool boolean() {
    if (s_.compare(i_, 4, "True") == 0) return i_ += 4, true;
    if (s_.compare(i_, 5, "False") == 0) return i_ += 5, false;
    bad("fortran_order is neither True nor False");
  }
  std::vector<int64_t> tuple() {
    std::vector<int64_t> v;
    expect('(');
    while (true) {
      ws();
      if (peek() == ')') break;
      if (peek() < '0' || peek() > '9') bad("shape is not a tuple of non-negative integers");
      int64_t x = 0;
      while (peek() >= '0' && peek() <= '9') {
        if (x > (std::numeric_limits<int64_t>::max() - 9) / 10) bad("shape dimension too large");
        x = x * 10 + (s_[i_++] - '0');
      }
      if (peek() == 'L') ++i_;  // Python 2's long suffix
      v.push_back(x);
      ws();
      if (peek() == ',') {
        ++i_;
        continue;
      }
      ws();
      if (peek() != ')') bad("expected ',' or ')' in shape");
    }
    ++i_;
    return v;
  }
  const std::string& s_;
  std::string where_;
  size_t i_ = 0;
};

// Parses a whole .npy held in memory; `where` names it in errors.
inline Array parse(const uint8_t* p, size_t n, const std::string& where) {
  static const uint8_t magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  if (n < 6 || std::memcmp(p, magic, 6) != 0) fail(where, "not a .npy file (bad magic; expected \\x93NUMPY)");
  if (n < 10) fail(where, "truncated: " + std::to_string(n) + " bytes, too short for a header");
  const int major = p[6], minor = p[7];
  if (minor != 0 || major < 1 || major > 3)
    fail(where, "unsupported format version " + std::to_string(major) + "." + std::to_string(minor) +
                    " (1.0, 2.0, 3.0 are read)");
  size_t hl, off;
  if (major == 1) {
    hl = get_le<uint16_t>(p + 8);
    off = 10;
  } else {
    if (n < 12) fail(where, "truncated: " + std::to_string(n) + " bytes, too short for a header");
    hl = get_le<uint32_t>(p + 8);
    off = 12;
  }
  if (hl > n - off)
    fail(where, "truncated: the header is " + std::to_string(hl) + " bytes but only " + std::to_string(n - off) +
                    " follow");
  const std::string hs(reinterpret_cast<const char*>(p + off), hl);
  Array a = HeaderParser(hs, where).parse();
  if (a.fortran_order) fail(where, "fortran_order is True; only C-order arrays are read (save np.ascontiguousarray(x))");
  const size_t item = itemsize(a.descr);
  if (!item) {
    if (!a.descr.empty() && a.descr[0] == '>')
      fail(where, "big-endian dtype '" + a.descr + "' is not supported (save x.astype(x.dtype.newbyteorder('<')))");
    fail(where, "unsupported dtype '" + a.descr + "' (read: |u1 |i1 |b1 <i4 <i8 <f4 <f8)");
  }
  const size_t count = checked_count(a.shape, item, where);
  const size_t body = n - off - hl;
  if (body != count * item)
    fail(where, (body < count * item ? "truncated: " : "trailing bytes: ") + std::string("shape ") +
                    shape_repr(a.shape) + " of " + a.descr + " needs " + std::to_string(count * item) +
                    " data bytes, the file has " + std::to_string(body));
  if (a.descr == "<u1") a.descr = "|u1";  // the same dtype; keep one spelling
  a.bytes.assign(p + off + hl, p + n);
  return a;
}

}  // namespace detail

template <class T>
std::vector<T> Array::as() const {
  static_assert(std::is_arithmetic_v<T>, "npy::Array::as<T>: T must be an arithmetic type");
  const size_t n = size();
  std::vector<T> out(n);
  const uint8_t* b = bytes.data();
  auto conv = [&](auto tag) {
    using U = decltype(tag);
    if (bytes.size() != n * sizeof(U))
      throw std::runtime_error("npy: array of shape " + detail::shape_repr(shape) + " and dtype " + descr + " holds " +
                               std::to_string(bytes.size()) + " bytes");
    for (size_t i = 0; i < n; ++i) out[i] = static_cast<T>(detail::get_le<U>(b + i * sizeof(U)));
  };
  if (descr == "|u1" || descr == "<u1") conv(uint8_t{});
  else if (descr == "|i1") conv(int8_t{});
  else if (descr == "|b1") {
    conv(uint8_t{});
    for (T& v : out) v = static_cast<T>(v != T(0));
  } else if (descr == "<i4") conv(int32_t{});
  else if (descr == "<i8") conv(int64_t{});
  else if (descr == "<f4") conv(float{});
  else if (descr == "<f8") conv(double{});
  else throw std::runtime_error("npy: cannot convert dtype '" + descr + "'");
  return out;
}

// An Array holding a copy of n = prod(shape) elements of data.
template <class T>
inline Array array(const T* data, const std::vector<int64_t>& shape) {
  Array a;
  a.descr = detail::descr_of<T>();
  a.shape = shape;
  const size_t n = detail::checked_count(shape, sizeof(T), "array");
  a.bytes.reserve(n * sizeof(T));
  for (size_t i = 0; i < n; ++i) detail::put_le<T>(a.bytes, data[i]);
  return a;
}

template <class T>
inline void save(const std::string& path, const T* data, const std::vector<int64_t>& shape) {
  detail::write_file(path, detail::encode(array(data, shape), path));
}

inline Array load(const std::string& path) {
  const std::vector<uint8_t> b = detail::read_file(path);
  return detail::parse(b.data(), b.size(), path);
}

// ---------------------------------------------------------------- npz
namespace detail {

inline uint32_t crc32_of(const uint8_t* p, size_t n) {
  uLong c = ::crc32(0L, Z_NULL, 0);
  while (n > 0) {  // zlib takes uInt lengths
    const uInt k = static_cast<uInt>(std::min<size_t>(n, 1u << 30));
    c = ::crc32(c, p, k);
    p += k;
    n -= k;
  }
  return static_cast<uint32_t>(c);
}

// Raw inflate (zip's method 8: no zlib/gzip wrapper) of exactly `usize` output bytes.
inline std::vector<uint8_t> inflate_raw(const uint8_t* p, size_t n, size_t usize, const std::string& where) {
  std::vector<uint8_t> out(usize);
  z_stream zs{};
  if (inflateInit2(&zs, -MAX_WBITS) != Z_OK) fail(where, "zlib inflateInit2 failed");
  size_t in_done = 0, out_done = 0;
  uint8_t spare;  // one byte past usize: inflating into it means the data is longer than the directory says
  int rc;
  do {  // zlib counts in uInt: feed and drain in chunks below 4 GiB
    const bool full = out_done == usize;
    zs.next_in = const_cast<Bytef*>(p + in_done);
    zs.avail_in = static_cast<uInt>(std::min<size_t>(n - in_done, 1u << 30));
    zs.next_out = full ? &spare : out.data() + out_done;
    zs.avail_out = full ? 1u : static_cast<uInt>(std::min<size_t>(usize - out_done, 1u << 30));
    const uInt ai = zs.avail_in, ao = zs.avail_out;
    rc = inflate(&zs, Z_NO_FLUSH);
    const size_t used = ai - zs.avail_in, made = ao - zs.avail_out;
    in_done += used;
    if (full && made) {
      inflateEnd(&zs);
      fail(where, "inflates to more than the " + std::to_string(usize) + " bytes the zip directory gives");
    }
    out_done += made;
    if (rc == Z_BUF_ERROR && (used || made)) rc = Z_OK;  // progress: go on
  } while (rc == Z_OK);
  const std::string msg = zs.msg ? zs.msg : std::to_string(rc);
  inflateEnd(&zs);
  if (rc == Z_BUF_ERROR) fail(where, "truncated deflate data");
  if (rc != Z_STREAM_END) fail(where, "corrupt deflate data (zlib: " + msg + ")");
  if (out_done != usize)
    fail(where, "inflates to " + std::to_string(out_done) + " bytes, the zip directory says " + std::to_string(usize));
  return out;
}

// Raw deflate (zip's method 8) at zlib's default level.
inline std::vector<uint8_t> deflate_raw(const std::vector<uint8_t>& in, const std::string& where) {
  z_stream zs{};
  if (deflateInit2(&zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY) != Z_OK)
    fail(where, "zlib deflateInit2 failed");
  std::vector<uint8_t> out;
  std::vector<uint8_t> buf(1 << 16);
  size_t off = 0;
  int rc = Z_OK;
  do {
    const uInt k = static_cast<uInt>(std::min<size_t>(in.size() - off, 1u << 30));
    zs.next_in = const_cast<Bytef*>(in.data() + off);
    zs.avail_in = k;
    off += k;
    const int flush = off == in.size() ? Z_FINISH : Z_NO_FLUSH;
    do {
      zs.next_out = buf.data();
      zs.avail_out = static_cast<uInt>(buf.size());
      rc = deflate(&zs, flush);
      if (rc == Z_STREAM_ERROR) {
        deflateEnd(&zs);
        fail(where, "zlib deflate failed");
      }
      out.insert(out.end(), buf.data(), buf.data() + (buf.size() - zs.avail_out));
    } while (zs.avail_out == 0);
  } while (rc != Z_STREAM_END);
  deflateEnd(&zs);
  return out;
}

}  // namespace detail

// Every .npy member of a zip (numpy.savez, savez_compressed), keyed by its name
// without ".npy". Members are found through the central directory (zip64
// sizes and offsets included, as numpy's writer uses them); each one's CRC-32
// and size are checked. Members not ending in ".npy" are an error.
inline std::map<std::string, Array> load_npz(const std::string& path) {
  using detail::fail;
  using detail::get_le;
  const std::vector<uint8_t> f = detail::read_file(path);
  const uint8_t* p = f.data();
  const size_t n = f.size();
  if (n >= 6 && std::memcmp(p, "\x93NUMPY", 6) == 0) fail(path, "is a .npy file, not an .npz (use npy::load)");
  if (n < 22 || get_le<uint32_t>(p) != 0x04034b50u) fail(path, "not an .npz file (no zip local header at the start)");
  // End of central directory: 22 bytes plus a comment of up to 65535, at the end.
  size_t eocd = std::string::npos;
  for (size_t i = n - 22 + 1; i-- > 0 && n - i <= 22 + 65535;)
    if (get_le<uint32_t>(p + i) == 0x06054b50u) {
      eocd = i;
      break;
    }
  if (eocd == std::string::npos) fail(path, "truncated zip (no end of central directory record)");
  uint64_t count = get_le<uint16_t>(p + eocd + 10), cd_size = get_le<uint32_t>(p + eocd + 12),
           cd_off = get_le<uint32_t>(p + eocd + 16);
  if (count == 0xFFFF || cd_size == 0xFFFFFFFFu || cd_off == 0xFFFFFFFFu) {  // zip64
    if (eocd < 20 || get_le<uint32_t>(p + eocd - 20) != 0x07064b50u) fail(path, "zip64 locator missing");
    const uint64_t z = get_le<uint64_t>(p + eocd - 20 + 8);
    if (z + 56 > n || get_le<uint32_t>(p + z) != 0x06064b50u) fail(path, "zip64 end of central directory missing");
    count = get_le<uint64_t>(p + z + 32);
    cd_size = get_le<uint64_t>(p + z + 40);
    cd_off = get_le<uint64_t>(p + z + 48);
  }
  if (cd_off > n || cd_size > n - cd_off) fail(path, "truncated zip (central directory outside the file)");
  std::map<std::string, Array> out;
  size_t q = static_cast<size_t>(cd_off);
  const size_t cd_end = static_cast<size_t>(cd_off + cd_size);
  for (uint64_t e = 0; e < count; ++e) {
    if (q + 46 > cd_end || get_le<uint32_t>(p + q) != 0x02014b50u) fail(path, "corrupt zip central directory");
    const uint16_t flags = get_le<uint16_t>(p + q + 8), method = get_le<uint16_t>(p + q + 10);
    const uint32_t crc = get_le<uint32_t>(p + q + 16);
    uint64_t csize = get_le<uint32_t>(p + q + 20), usize = get_le<uint32_t>(p + q + 24);
    const size_t nlen = get_le<uint16_t>(p + q + 28), xlen = get_le<uint16_t>(p + q + 30),
                 clen = get_le<uint16_t>(p + q + 32);
    uint64_t loff = get_le<uint32_t>(p + q + 42);
    if (q + 46 + nlen + xlen + clen > cd_end) fail(path, "corrupt zip central directory");
    const std::string name(reinterpret_cast<const char*>(p + q + 46), nlen);
    // zip64 extra field (id 1): the 8-byte values of the fields that read 0xFFFFFFFF, in order.
    for (size_t x = q + 46 + nlen; x + 4 <= q + 46 + nlen + xlen;) {
      const uint16_t id = get_le<uint16_t>(p + x), len = get_le<uint16_t>(p + x + 2);
      if (x + 4 + len > q + 46 + nlen + xlen) fail(path, "corrupt zip extra field of '" + name + "'");
      if (id == 1) {
        size_t y = x + 4;
        auto take = [&](uint64_t& v) {
          if (v != 0xFFFFFFFFu) return;
          if (y + 8 > x + 4 + len) fail(path, "corrupt zip64 field of '" + name + "'");
          v = get_le<uint64_t>(p + y);
          y += 8;
        };
        take(usize);
        take(csize);
        take(loff);
      }
      x += 4 + len;
    }
    q += 46 + nlen + xlen + clen;
    const std::string where = path + " member '" + name + "'";
    if (flags & 1) fail(where, "encrypted zip members are not supported");
    if (name.size() < 4 || name.compare(name.size() - 4, 4, ".npy") != 0) fail(where, "not a .npy member");
    if (loff + 30 > n || get_le<uint32_t>(p + loff) != 0x04034b50u) fail(where, "local header missing");
    const size_t data = static_cast<size_t>(loff) + 30 + get_le<uint16_t>(p + loff + 26) + get_le<uint16_t>(p + loff + 28);
    if (data > n || csize > n - data) fail(where, "truncated zip (member data outside the file)");
    std::vector<uint8_t> raw;
    if (method == 0) {
      if (csize != usize) fail(where, "stored member with different sizes");
      raw.assign(p + data, p + data + csize);
    } else if (method == 8) {
      raw = detail::inflate_raw(p + data, static_cast<size_t>(csize), static_cast<size_t>(usize), where);
    } else {
      fail(where, "unsupported zip compression method " + std::to_string(method) + " (stored and deflate are read)");
    }
    if (detail::crc32_of(raw.data(), raw.size()) != crc) fail(where, "CRC-32 mismatch (corrupt data)");
    const std::string key = name.substr(0, name.size() - 4);
    if (out.count(key)) fail(where, "duplicate member");
    out.emplace(key, detail::parse(raw.data(), raw.size(), where));
  }
  return out;
}

// Writes arrays as "<name>.npy" members, deflated, as numpy.savez_compressed
// does (numpy.load and zipfile read it). Without zip64: each member and the
// whole file must stay below 4 GiB.
inline void save_npz(const std::string& path, const std::map<std::string, Array>& arrays) {
  using detail::put_le;
  std::vector<uint8_t> f, cd;
  const uint16_t dos_time = 0, dos_date = (0 << 9) | (1 << 5) | 1;  // 1980-01-01: reproducible files
  for (const auto& [key, a] : arrays) {
    const std::string name = key + ".npy";
    const std::string where = path + " member '" + name + "'";
    if (key.empty() || name.size() > 65535) detail::fail(where, "bad member name");
    const std::vector<uint8_t> raw = detail::encode(a, where);
    const std::vector<uint8_t> z = detail::deflate_raw(raw, where);
    const uint32_t crc = detail::crc32_of(raw.data(), raw.size());
    if (raw.size() >= 0xFFFFFFFFu || z.size() >= 0xFFFFFFFFu || f.size() >= 0xFFFFFFFFu)
      detail::fail(where, "too large for a zip without zip64 (4 GiB)");
    const uint32_t off = static_cast<uint32_t>(f.size());
    auto common = [&](std::vector<uint8_t>& o) {  // from "version needed" to "extra length"
      put_le<uint16_t>(o, 20);
      put_le<uint16_t>(o, 0);  // flags
      put_le<uint16_t>(o, 8);  // deflate
      put_le<uint16_t>(o, dos_time);
      put_le<uint16_t>(o, dos_date);
      put_le<uint32_t>(o, crc);
      put_le<uint32_t>(o, static_cast<uint32_t>(z.size()));
      put_le<uint32_t>(o, static_cast<uint32_t>(raw.size()));
      put_le<uint16_t>(o, static_cast<uint16_t>(name.size()));
      put_le<uint16_t>(o, 0);
    };
    put_le<uint32_t>(f, 0x04034b50u);
    common(f);
    f.insert(f.end(), name.begin(), name.end());
    f.insert(f.end(), z.begin(), z.end());
    put_le<uint32_t>(cd, 0x02014b50u);
    put_le<uint16_t>(cd, 0x0314);  // made by: Unix, zip spec 2.0
    common(cd);
    put_le<uint16_t>(cd, 0);  // comment length
    put_le<uint16_t>(cd, 0);  // disk number
    put_le<uint16_t>(cd, 0);  // internal attributes
    put_le<uint32_t>(cd, 0644u << 16);  // external attributes: a regular file, rw-r--r--
    put_le<uint32_t>(cd, off);
    cd.insert(cd.end(), name.begin(), name.end());
  }
  if (arrays.size() >= 0xFFFF || f.size() + cd.size() >= 0xFFFFFFFFu)
    detail::fail(path, "too large for a zip without zip64");
  const uint32_t cd_off = static_cast<uint32_t>(f.size());
  f.insert(f.end(), cd.begin(), cd.end());
  put_le<uint32_t>(f, 0x06054b50u);
  put_le<uint16_t>(f, 0);
  put_le<uint16_t>(f, 0);
  put_le<uint16_t>(f, static_cast<uint16_t>(arrays.size()));
  put_le<uint16_t>(f, static_cast<uint16_t>(arrays.size()));
  put_le<uint32_t>(f, static_cast<uint32_t>(cd.size()));
  put_le<uint32_t>(f, cd_off);
  put_le<uint16_t>(f, 0);
  detail::write_file(path, f);
}

}  // namespace diffuse::npy
