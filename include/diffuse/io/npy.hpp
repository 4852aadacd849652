// NumPy files: .npy (format versions 1.0 to 3.0) and .npz (a zip of .npy members,
// as numpy.savez / numpy.savez_compressed write them).
//
//   npy::save(path, data, shape)      writes a version 1.0 .npy of uint8_t ('|u1'),
//                                     int32_t ('<i4'), int64_t ('<i8'), float ('<f4')
//                                     or double ('<f8'), C order
//   npy::load(path) -> Array          dtype string, shape and raw little-endian bytes;
//                                     Array::as<T>() converts the elements to T
//   npy::load_npz(path)               member name (without ".npy") -> Array; stored or deflated
//   npy::save_npz(path, arrays)       a deflated zip that numpy.load reads (minizip)
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

#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <minizip/unzip.h>  // after the standard headers: ioapi.h defines large-file macros
#include <minizip/zip.h>
#include <zlib.h>

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
// The zip container is minizip's (Debian libminizip-dev); here: the checks
// that keep a corrupt or hostile file from allocating more than it can hold.
namespace detail {

// Deflate expands at most 1032:1 (zlib's bound for a stream of maximal
// matches): a member that claims more from its compressed size is corrupt.
inline constexpr uint64_t kMaxDeflateRatio = 1032;

struct UnzClose {
  void operator()(void* z) const { unzClose(static_cast<unzFile>(z)); }
};

inline std::string unz_error(int rc) {
  switch (rc) {
    case UNZ_ERRNO: return "read error (truncated zip?)";
    case UNZ_BADZIPFILE: return "corrupt zip entry (local header does not match the central directory)";
    case UNZ_CRCERROR: return "CRC-32 mismatch (corrupt data)";
    case Z_DATA_ERROR: return "corrupt deflate data";
    case Z_MEM_ERROR: return "out of memory while inflating";
    default: return "corrupt zip member (minizip error " + std::to_string(rc) + ")";
  }
}

// The current member of z, after its sizes were checked against the file's.
inline std::vector<uint8_t> read_member(unzFile z, const unz_file_info64& fi, uint64_t file_size,
                                        const std::string& where) {
  const uint64_t csize = fi.compressed_size, usize = fi.uncompressed_size;
  if (fi.compression_method == 0 && csize != usize) fail(where, "stored member with different sizes");
  if ((usize - std::min<uint64_t>(usize, 64)) / kMaxDeflateRatio > csize || usize > std::numeric_limits<size_t>::max())
    fail(where, "the zip directory claims " + std::to_string(usize) + " bytes from " + std::to_string(csize) +
                    " compressed, more than deflate expands (corrupt zip)");
  if (const int rc = unzOpenCurrentFile(z); rc != UNZ_OK) fail(where, unz_error(rc));
  const uint64_t data = unzGetCurrentFileZStreamPos64(z);
  if (data > file_size || csize > file_size - data) fail(where, "truncated zip (member data outside the file)");
  std::vector<uint8_t> raw(static_cast<size_t>(usize));
  size_t got = 0;
  while (got < raw.size()) {  // minizip reads in unsigned counts: chunks below 4 GiB
    const unsigned k = static_cast<unsigned>(std::min<size_t>(raw.size() - got, 1u << 30));
    const int r = unzReadCurrentFile(z, raw.data() + got, k);
    if (r < 0) fail(where, unz_error(r));
    if (r == 0) break;
    got += static_cast<size_t>(r);
  }
  if (got != raw.size())
    fail(where, (fi.compression_method == 0 ? "truncated: " : "inflates to ") + std::to_string(got) +
                    " bytes, the zip directory says " + std::to_string(usize));
  if (const int rc = unzCloseCurrentFile(z); rc != UNZ_OK) fail(where, unz_error(rc));  // checks the CRC-32
  return raw;
}

}  // namespace detail

// Every .npy member of a zip (numpy.savez, savez_compressed), keyed by its name
// without ".npy". Members are found through the central directory (zip64
// sizes and offsets included, as numpy's writer uses them); each one's CRC-32
// and size are checked. Members not ending in ".npy" are an error.
inline std::map<std::string, Array> load_npz(const std::string& path) {
  using detail::fail;
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(path, std::filesystem::exists(path) ? "cannot open for reading" : "no such file");
  uint8_t head[6] = {};
  f.read(reinterpret_cast<char*>(head), sizeof head);
  const std::streamsize got = f.gcount();
  if (got == 6 && std::memcmp(head, "\x93NUMPY", 6) == 0) fail(path, "is a .npy file, not an .npz (use npy::load)");
  if (got < 4 || detail::get_le<uint32_t>(head) != 0x04034b50u)
    fail(path, "not an .npz file (no zip local header at the start)");
  std::error_code ec;
  const uint64_t file_size = std::filesystem::file_size(path, ec);
  if (ec) fail(path, "cannot read its size (" + ec.message() + ")");
  const std::unique_ptr<void, detail::UnzClose> zip(unzOpen64(path.c_str()));
  if (!zip) fail(path, "truncated zip or corrupt central directory (no readable end of central directory record)");
  const unzFile z = static_cast<unzFile>(zip.get());
  // minizip takes bytes read past the end of the file for zeros: the end of
  // central directory record (22 bytes and the comment) must end the file.
  unz_global_info64 gi{};
  if (unzGetGlobalInfo64(z, &gi) != UNZ_OK) fail(path, "corrupt zip central directory");
  uint8_t eocd[4] = {};
  f.clear();
  f.seekg(static_cast<std::streamoff>(file_size - std::min<uint64_t>(file_size, 22 + gi.size_comment)));
  f.read(reinterpret_cast<char*>(eocd), sizeof eocd);
  if (!f || detail::get_le<uint32_t>(eocd) != 0x06054b50u)
    fail(path, "truncated zip (the end of central directory record does not end the file)");
  std::map<std::string, Array> out;
  int rc = unzGoToFirstFile(z);
  for (; rc == UNZ_OK; rc = unzGoToNextFile(z)) {
    unz_file_info64 fi{};
    if (unzGetCurrentFileInfo64(z, &fi, nullptr, 0, nullptr, 0, nullptr, 0) != UNZ_OK)
      fail(path, "corrupt zip central directory");
    std::string name(fi.size_filename, '\0');  // at most 65535: a 2-byte field
    if (!name.empty() && unzGetCurrentFileInfo64(z, nullptr, name.data(), static_cast<uLong>(name.size()), nullptr, 0,
                                                 nullptr, 0) != UNZ_OK)
      fail(path, "corrupt zip central directory");
    std::string shown = name;  // a corrupt name must not break the one-line error
    for (char& ch : shown)
      if (static_cast<unsigned char>(ch) < 32 || ch == 127) ch = '?';
    const std::string where = path + " member '" + shown + "'";
    if (fi.flag & 1) fail(where, "encrypted zip members are not supported");
    if (name.size() < 4 || name.compare(name.size() - 4, 4, ".npy") != 0) fail(where, "not a .npy member");
    if (fi.compression_method != 0 && fi.compression_method != Z_DEFLATED)
      fail(where, "unsupported zip compression method " + std::to_string(fi.compression_method) +
                      " (stored and deflate are read)");
    const std::vector<uint8_t> raw = detail::read_member(z, fi, file_size, where);
    const std::string key = name.substr(0, name.size() - 4);
    if (out.count(key)) fail(where, "duplicate member");
    out.emplace(key, detail::parse(raw.data(), raw.size(), where));
  }
  if (rc != UNZ_END_OF_LIST_OF_FILE) fail(path, "corrupt zip central directory");
  return out;
}

// Writes arrays as "<name>.npy" members, deflated, as numpy.savez_compressed
// does (numpy.load and zipfile read it); zip64 records where a member or the
// file pass 4 GiB.
inline void save_npz(const std::string& path, const std::map<std::string, Array>& arrays) {
  using detail::fail;
  const std::string tmp = path + ".tmp";
  zipFile z = zipOpen64(tmp.c_str(), APPEND_STATUS_CREATE);
  if (!z) fail(path, std::string("cannot write (") + std::strerror(errno) + ")");
  auto why = [](int rc) {
    return rc == ZIP_ERRNO ? std::string(std::strerror(errno)) : "minizip error " + std::to_string(rc);
  };
  auto check = [&](int rc, const std::string& where) {
    if (rc != ZIP_OK) fail(where, "cannot write (" + why(rc) + ")");
  };
  try {
    zip_fileinfo zi{};
    zi.tmz_date.tm_mday = 1;  // 1980-01-01 00:00: reproducible files
    zi.tmz_date.tm_year = 1980;
    zi.external_fa = 0644u << 16;  // a regular file, rw-r--r--
    for (const auto& [key, a] : arrays) {
      const std::string name = key + ".npy";
      const std::string where = path + " member '" + name + "'";
      if (key.empty() || name.size() > 65535 || name.find('\0') != std::string::npos) fail(where, "bad member name");
      const std::vector<uint8_t> raw = detail::encode(a, where);
      const int zip64 = raw.size() >= 0xF0000000u;  // deflate may grow the data a little past 4 GiB
      check(zipOpenNewFileInZip4_64(z, name.c_str(), &zi, nullptr, 0, nullptr, 0, nullptr, Z_DEFLATED,
                                    Z_DEFAULT_COMPRESSION, 0, -MAX_WBITS, DEF_MEM_LEVEL, Z_DEFAULT_STRATEGY, nullptr,
                                    0, 0x0314 /* made by Unix, zip 2.0 */, 0, zip64),
            where);
      for (size_t off = 0; off < raw.size();) {
        const unsigned k = static_cast<unsigned>(std::min<size_t>(raw.size() - off, 1u << 30));
        check(zipWriteInFileInZip(z, raw.data() + off, k), where);
        off += k;
      }
      check(zipCloseFileInZip(z), where);
    }
  } catch (...) {
    zipClose(z, nullptr);
    std::error_code ec;
    std::filesystem::remove(tmp, ec);
    throw;
  }
  const int rc = zipClose(z, nullptr);
  std::error_code ec;
  if (rc == ZIP_OK) std::filesystem::rename(tmp, path, ec);
  if (rc != ZIP_OK || ec) {
    const std::string reason = rc != ZIP_OK ? why(rc) : ec.message();
    std::filesystem::remove(tmp, ec);
    fail(path, "cannot write (" + reason + ")");
  }
}

}  // namespace diffuse::npy
