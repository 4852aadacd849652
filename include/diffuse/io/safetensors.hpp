// The safetensors format: an 8-byte little-endian header length N, N bytes of
// JSON ({"name": {"dtype", "shape", "data_offsets": [begin, end]}, ...,
// "__metadata__": {string: string}}), then the raw little-endian tensor bytes.
// Files are written to a temporary name and renamed, so a crash mid-write
// never leaves a truncated file under the real name.
#pragma once

#include <algorithm>
#include <bit>
#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <unistd.h>
#include <vector>

#include <diffuse/core/tensor.hpp>

#if DIFFUSE_DEFINE_IMPL
#include <nlohmann/json.hpp>  // the header's JSON, only where the parser and writer are compiled
#endif

namespace diffuse::safetensors {

static_assert(std::endian::native == std::endian::little, "diffuse: safetensors I/O assumes a little-endian host");

enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F64: return "F64";
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::I16: return "I16";
    case DType::I8: return "I8";
    case DType::U8: return "U8";
    case DType::BOOL: return "BOOL";
  }
  return "?";
}
inline size_t dtype_size(DType d) {
  switch (d) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: return 2;
    default: return 1;
  }
}
inline bool parse_dtype(const std::string& s, DType& out) {
  for (DType d : {DType::F64, DType::F32, DType::F16, DType::BF16, DType::I64, DType::I32, DType::I16, DType::I8,
                  DType::U8, DType::BOOL})
    if (s == dtype_name(d)) { out = d; return true; }
  return false;
}
template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::F32; }
template <> constexpr DType dtype_of<double>() { return DType::F64; }
template <> constexpr DType dtype_of<int64_t>() { return DType::I64; }
template <> constexpr DType dtype_of<int32_t>() { return DType::I32; }
template <> constexpr DType dtype_of<uint8_t>() { return DType::U8; }

struct View {
  DType dtype;
  Shape shape;
  const uint8_t* data;
  size_t nbytes;
};

using Metadata = std::map<std::string, std::string>;

// Metadata value `key` of m as a whole number of type Int, all of it: "12abc", "", " 12", a sign
// on an unsigned type and values out of range are refused (std::stoll read "12abc" as 12), in one
// line naming `where` (the file) and the key.
template <class Int>
inline Int metadata_number(const Metadata& m, const std::string& key, const std::string& where) {
  const auto it = m.find(key);
  if (it == m.end()) throw std::runtime_error("diffuse: " + where + " has no metadata '" + key + "'");
  const std::string& s = it->second;
  Int v{};
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || end != s.data() + s.size())
    throw std::runtime_error("diffuse: " + where + ": metadata '" + key + "' is '" + s + "', not a whole number" +
                             (ec == std::errc::result_out_of_range ? " in range" : ""));
  return v;
}

// A whole file read into memory; views point into it.
class File {
 public:
  static File read(const std::string& path) {
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    if (!f) throw std::runtime_error("diffuse: cannot open '" + path + "': " + std::strerror(errno));
    const auto size = static_cast<uint64_t>(f.tellg());
    f.seekg(0);
    File r;
    r.path_ = path;
    r.buf_.resize(size);
    if (size && !f.read(reinterpret_cast<char*>(r.buf_.data()), static_cast<std::streamsize>(size)))
      throw std::runtime_error("diffuse: cannot read '" + path + "'");
    r.parse();
    return r;
  }

  const std::string& path() const { return path_; }
  const Metadata& metadata() const { return meta_; }
  std::vector<std::string> names() const {
    std::vector<std::string> n;
    for (auto& [k, v] : views_) n.push_back(k);
    return n;
  }
  bool contains(const std::string& name) const { return views_.count(name) != 0; }
  const View& at(const std::string& name) const {
    auto it = views_.find(name);
    if (it == views_.end()) throw std::runtime_error("diffuse: '" + path_ + "' has no tensor '" + name + "'");
    return it->second;
  }
  // The tensor converted to T (from F32 or F64); checks the shape when one is given.
  template <class T>
  Tensor<T> tensor(const std::string& name, const Shape* expect = nullptr) const {
    const View& v = at(name);
    if (expect && v.shape != *expect)
      throw std::runtime_error("diffuse: '" + path_ + "': tensor '" + name + "' has shape " + shape_str(v.shape) +
                               ", expected " + shape_str(*expect));
    Tensor<T> t(v.shape);
    copy_converted(v, name, t.data());
    return t;
  }
  template <class T>
  void copy_converted(const View& v, const std::string& name, T* out) const {
    const size_t n = static_cast<size_t>(shape_numel(v.shape));
    if (v.dtype == dtype_of<T>()) {
      std::memcpy(out, v.data, n * sizeof(T));
    } else if (v.dtype == DType::F32) {
      for (size_t i = 0; i < n; ++i) { float x; std::memcpy(&x, v.data + 4 * i, 4); out[i] = static_cast<T>(x); }
    } else if (v.dtype == DType::F64) {
      for (size_t i = 0; i < n; ++i) { double x; std::memcpy(&x, v.data + 8 * i, 8); out[i] = static_cast<T>(x); }
    } else {
      throw std::runtime_error("diffuse: '" + path_ + "': tensor '" + name + "' has dtype " + dtype_name(v.dtype) +
                               ", expected F32 or F64");
    }
  }

 private:
  [[noreturn]] void bad(const std::string& why) const {
    throw std::runtime_error("diffuse: '" + path_ + "' is not a valid safetensors file: " + why);
  }
  void parse();
  std::string path_;
  std::vector<uint8_t> buf_;
  std::map<std::string, View> views_;
  Metadata meta_;
};

#if DIFFUSE_DEFINE_IMPL
DIFFUSE_IMPL_INLINE void File::parse() {
  if (buf_.size() < 8) bad("shorter than its 8-byte header length");
  uint64_t hlen;
  std::memcpy(&hlen, buf_.data(), 8);
  if (hlen > buf_.size() - 8) bad("header length " + std::to_string(hlen) + " exceeds the file size");
  nlohmann::json h;
  std::string duplicate;  // JSON keeps the last of two equal keys silently: a name given twice is refused
  try {
    int depth = 0;
    std::set<std::string> top;
    h = nlohmann::json::parse(buf_.begin() + 8, buf_.begin() + 8 + static_cast<std::ptrdiff_t>(hlen),
                              [&](int, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) {
                                using E = nlohmann::json::parse_event_t;
                                if (ev == E::object_start) ++depth;
                                else if (ev == E::object_end) --depth;
                                else if (ev == E::key && depth == 1 && !top.insert(parsed.get<std::string>()).second &&
                                         duplicate.empty())
                                  duplicate = parsed.get<std::string>();
                                return true;
                              });
  } catch (const std::exception& e) {
    bad(std::string("header JSON: ") + e.what());
  }
  if (!duplicate.empty()) bad("tensor '" + duplicate + "' is named twice in the header");
  if (!h.is_object()) bad("header is not a JSON object");
  const uint8_t* base = buf_.data() + 8 + hlen;
  const uint64_t avail = buf_.size() - 8 - hlen;
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) bad("__metadata__ is not an object");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) bad("metadata value '" + m.key() + "' is not a string");
        meta_[m.key()] = m->get<std::string>();
      }
      continue;
    }
    const auto& e = *it;
    View v{};
    try {
      if (!parse_dtype(e.at("dtype").get<std::string>(), v.dtype)) bad("tensor '" + it.key() + "': unknown dtype");
      for (const auto& d : e.at("shape")) v.shape.push_back(d.get<int64_t>());
      const uint64_t b = e.at("data_offsets").at(0).get<uint64_t>(), en = e.at("data_offsets").at(1).get<uint64_t>();
      if (b > en || en > avail) bad("tensor '" + it.key() + "': data offsets outside the file");
      // The element count without overflow: a product that wraps could match any byte count.
      uint64_t numel = 1;
      for (int64_t d : v.shape) {
        if (d < 0) bad("tensor '" + it.key() + "': negative dimension");
        const uint64_t ud = static_cast<uint64_t>(d);
        if (ud != 0 && numel > avail / ud) numel = avail + 1;  // more elements than the file has bytes
        else numel *= ud;
      }
      if (numel > avail || en - b != numel * dtype_size(v.dtype))
        bad("tensor '" + it.key() + "': " + std::to_string(en - b) + " bytes for shape " + shape_str(v.shape));
      v.data = base + b;
      v.nbytes = en - b;
    } catch (const nlohmann::json::exception& ex) {
      bad("tensor '" + it.key() + "': " + ex.what());
    }
    views_[it.key()] = v;
  }
  // No two tensors may share bytes (a file that aliases one tensor's data as another's is
  // self-contradicting); empty tensors take no bytes.
  std::vector<std::pair<const View*, const std::string*>> by_start;
  for (const auto& [name, v] : views_)
    if (v.nbytes) by_start.push_back({&v, &name});
  std::sort(by_start.begin(), by_start.end(), [](const auto& x, const auto& y) { return x.first->data < y.first->data; });
  for (size_t i = 1; i < by_start.size(); ++i)
    if (by_start[i].first->data < by_start[i - 1].first->data + by_start[i - 1].first->nbytes)
      bad("tensors '" + *by_start[i - 1].second + "' and '" + *by_start[i].second + "' overlap");
  // Nor may bytes belong to no tensor (the format's rule: the buffer is entirely indexed, no holes):
  // a hole or trailing data means the header and the data disagree.
  uint64_t at = 0;
  for (const auto& [v, name] : by_start) {
    const uint64_t start = static_cast<uint64_t>(v->data - base);
    if (start != at)
      bad("bytes " + std::to_string(at) + " to " + std::to_string(start) + " before tensor '" + *name +
          "' belong to no tensor");
    at = start + v->nbytes;
  }
  if (at != avail)
    bad(std::to_string(avail - at) + " bytes after the last tensor belong to no tensor");
}
#endif  // DIFFUSE_DEFINE_IMPL

class Writer {
 public:
  template <class T>
  void add(const std::string& name, const Tensor<T>& t) {
    add_raw(name, dtype_of<T>(), t.shape(), t.data(), t.size() * sizeof(T));
    keep_.push_back(std::make_shared<Tensor<T>>(t));  // hold the storage until written
  }
  // `data` must stay valid until write().
  void add_raw(const std::string& name, DType d, const Shape& shape, const void* data, size_t nbytes) {
    if (name == "__metadata__" || index_.count(name)) throw std::invalid_argument("diffuse: duplicate tensor name '" + name + "'");
    index_[name] = entries_.size();
    entries_.push_back({name, d, shape, static_cast<const uint8_t*>(data), nbytes});
  }
  Metadata metadata;

  void write(const std::string& path) const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    Shape shape;
    const uint8_t* data;
    size_t nbytes;
  };
  std::vector<Entry> entries_;
  std::map<std::string, size_t> index_;
  std::vector<std::shared_ptr<void>> keep_;
};

#if DIFFUSE_DEFINE_IMPL
DIFFUSE_IMPL_INLINE void Writer::write(const std::string& path) const {
  nlohmann::json h = nlohmann::json::object();
  uint64_t off = 0;
  for (const auto& e : entries_) {
    h[e.name] = {{"dtype", dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {off, off + e.nbytes}}};
    off += e.nbytes;
  }
  if (!metadata.empty()) h["__metadata__"] = metadata;
  std::string hs = h.dump();
  while ((8 + hs.size()) % 8) hs.push_back(' ');
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw std::runtime_error("diffuse: cannot write '" + tmp + "': " + std::strerror(errno));
  const uint64_t hl = hs.size();
  bool ok = std::fwrite(&hl, 8, 1, f) == 1 && std::fwrite(hs.data(), 1, hs.size(), f) == hs.size();
  for (const auto& e : entries_) ok = ok && (e.nbytes == 0 || std::fwrite(e.data, 1, e.nbytes, f) == e.nbytes);
  ok = ok && std::fflush(f) == 0 && ::fsync(fileno(f)) == 0;
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) {
    const std::string err = std::strerror(errno);
    std::remove(tmp.c_str());
    throw std::runtime_error("diffuse: writing '" + tmp + "' failed: " + err);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0)
    throw std::runtime_error("diffuse: cannot rename '" + tmp + "' to '" + path + "': " + std::strerror(errno));
}
#endif  // DIFFUSE_DEFINE_IMPL

}  // namespace diffuse::safetensors
