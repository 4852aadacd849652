// NumPy .npy / .npz reader and writer (include/diffuse/io/npy.hpp): round trips of
// every dtype, files written by numpy (np.save with format versions 1.0-3.0,
// savez, savez_compressed) read here, our files read by numpy (and .npy files
// byte-identical to np.save's), and malformed files with their messages.
// The numpy half runs DIFFUSE_TORCH_PYTHON and is skipped with a warning when
// that python cannot import numpy.
#include <catch2/catch.hpp>

#include "kernel_seed.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include <unistd.h>

#include <diffuse/io/npy.hpp>

using namespace diffuse;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

#include "temp_files.hpp"
#include "skip.hpp"

using diffuse::testing::Bytes;
using diffuse::testing::read_bytes;
using diffuse::testing::TempDir;
using diffuse::testing::write_bytes;

namespace {


template <class F>
std::string error_of(F f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  FAIL("no exception");
  return {};
}

// A python that can import numpy, or "" (the caller warns and skips).
std::string numpy_python() {
  const std::string py = DIFFUSE_TORCH_PYTHON;
  if (py.empty()) return "";
  const std::string cmd = "'" + py + "' -c 'import numpy' >/dev/null 2>&1";
  return std::system(cmd.c_str()) == 0 ? py : "";
}

// Runs `python script args`; returns the exit status, output in *out.
int run_python(const std::string& py, const std::string& script, const std::string& args, std::string* out) {
  const std::string log = script + ".log";
  const std::string cmd = "'" + py + "' '" + script + "' " + args + " >'" + log + "' 2>&1";
  const int rc = std::system(cmd.c_str());
  std::ifstream f(log);
  std::stringstream s;
  s << f.rdbuf();
  *out = s.str();
  return rc;
}

// The values both sides agree on: element i of a test array of n elements.
// Small integers, so every dtype holds them exactly (uint8: modulo 256).
double ref_value(size_t i) { return static_cast<double>(static_cast<int64_t>((i * 37) % 251) - 100); }

template <class T>
std::vector<T> ref_values(size_t n) {
  std::vector<T> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<T>(std::is_same_v<T, uint8_t> ? (i * 37) % 251 : ref_value(i));
  return v;
}

template <class T>
std::vector<T> random_values(std::mt19937_64& rng, size_t n) {
  std::vector<T> v(n);
  for (auto& x : v) {
    if constexpr (std::is_floating_point_v<T>)
      x = static_cast<T>(std::normal_distribution<double>(0, 1e3)(rng));
    else
      x = static_cast<T>(rng());
  }
  return v;
}

template <class T>
void round_trip(const TempDir& d, std::mt19937_64& rng, const std::vector<int64_t>& shape, const char* descr) {
  size_t n = 1;
  for (int64_t s : shape) n *= static_cast<size_t>(s);
  const std::vector<T> v = random_values<T>(rng, n);
  const std::string p = d / "a.npy";
  npy::save<T>(p, v.data(), shape);
  CHECK_FALSE(fs::exists(p + ".tmp"));
  // numpy's layout: data starts at a multiple of 64 bytes.
  const Bytes b = read_bytes(p);
  CHECK((b.size() - n * sizeof(T)) % 64 == 0);
  const npy::Array a = npy::load(p);
  CHECK(a.descr == descr);
  CHECK(a.shape == shape);
  CHECK_FALSE(a.fortran_order);
  CHECK(a.size() == n);
  CHECK(a.bytes.size() == n * sizeof(T));
  CHECK(a.as<T>() == v);  // bit-exact (no NaN among the values)
  const std::vector<double> dv = a.as<double>();
  for (size_t i = 0; i < n; ++i) REQUIRE(dv[i] == static_cast<double>(v[i]));
}

// A .npy file from a header dict and body, with the given version.
Bytes npy_bytes(const std::string& dict, const Bytes& body, int major = 1) {
  Bytes b = {0x93, 'N', 'U', 'M', 'P', 'Y', uint8_t(major), 0};
  std::string h = dict + "\n";
  if (major == 1) {
    b.push_back(uint8_t(h.size()));
    b.push_back(uint8_t(h.size() >> 8));
  } else {
    for (int s = 0; s < 32; s += 8) b.push_back(uint8_t(h.size() >> s));
  }
  b.insert(b.end(), h.begin(), h.end());
  b.insert(b.end(), body.begin(), body.end());
  return b;
}

}  // namespace

TEST_CASE("npy round trip of every dtype on random data") {
  TempDir d("npy", "roundtrip");
  std::mt19937_64 rng(7);
  for (const auto& shape : std::vector<std::vector<int64_t>>{{}, {1}, {5}, {3, 4}, {2, 3, 5, 7}, {0, 4}, {4, 0}}) {
    INFO("shape of " << shape.size() << " dims");
    round_trip<uint8_t>(d, rng, shape, "|u1");
    round_trip<int32_t>(d, rng, shape, "<i4");
    round_trip<int64_t>(d, rng, shape, "<i8");
    round_trip<float>(d, rng, shape, "<f4");
    round_trip<double>(d, rng, shape, "<f8");
  }
  // Large enough to cross several deflate blocks in the npz.
  std::vector<float> big = random_values<float>(rng, 200000);
  std::vector<uint8_t> img = random_values<uint8_t>(rng, 3000);
  std::map<std::string, npy::Array> m = {{"big", npy::array(big.data(), {400, 500})},
                                          {"img", npy::array(img.data(), {3, 1, 10, 100})},
                                          {"scalar", npy::array(big.data(), {})}};
  npy::save_npz(d / "m.npz", m);
  const auto r = npy::load_npz(d / "m.npz");
  REQUIRE(r.size() == 3);
  CHECK(r.at("big").descr == "<f4");
  CHECK(r.at("big").shape == std::vector<int64_t>{400, 500});
  CHECK(r.at("big").as<float>() == big);
  CHECK(r.at("img").as<uint8_t>() == img);
  CHECK(r.at("scalar").shape.empty());
  CHECK(r.at("scalar").as<float>() == std::vector<float>{big[0]});
  CHECK(fs::file_size(d / "m.npz") < 200000 * 4 + 3000);  // random floats still compress a little
  // Conversions between dtypes.
  const std::vector<int32_t> iv = {-3, 0, 7, 1000000};
  npy::save(d / "i.npy", iv.data(), {4});
  CHECK(npy::load(d / "i.npy").as<double>() == std::vector<double>{-3, 0, 7, 1000000});
  CHECK(npy::load(d / "i.npy").as<int64_t>() == std::vector<int64_t>{-3, 0, 7, 1000000});
}

TEST_CASE("npy reads files written by numpy and numpy reads ours") {
  const std::string py = numpy_python();
  if (py.empty()) {
    DIFFUSE_SKIP("no python with numpy (DIFFUSE_TORCH_PYTHON='" DIFFUSE_TORCH_PYTHON "'): numpy interop test skipped");
  }
  TempDir d("npy", "numpy");
  // Each array: dtype, shape, values ref(i) = (37 i mod 251) - 100 (uint8: 37 i mod 251).
  const std::string script = d / "npy_ref.py";
  std::ofstream(script) << R"PY(
import sys, zipfile
import numpy as np
mode, d = sys.argv[1], sys.argv[2]
DT = {'u1': np.uint8, 'i4': np.int32, 'i8': np.int64, 'f4': np.float32, 'f8': np.float64}
SHAPE = {'u1': (2, 1, 3, 4), 'i4': (5,), 'i8': (2, 3), 'f4': (3, 4, 5), 'f8': ()}
def ref(k):
    n = int(np.prod(SHAPE[k]))
    i = np.arange(n, dtype=np.int64)
    v = (i * 37) % 251 if k == 'u1' else (i * 37) % 251 - 100
    return v.astype(DT[k]).reshape(SHAPE[k])
if mode == 'write':
    for k in DT:
        np.save(f'{d}/np_{k}.npy', ref(k))
    for ver in [(1, 0), (2, 0), (3, 0)]:
        with open(f'{d}/v{ver[0]}.npy', 'wb') as f:
            np.lib.format.write_array(f, ref('f4'), version=ver)
    np.savez(f'{d}/plain.npz', **{k: ref(k) for k in DT})
    np.savez_compressed(f'{d}/comp.npz', **{k: ref(k) for k in DT})
    np.savez_compressed(f'{d}/stats.npz', mu=np.linspace(-1, 1, 64), sigma=np.eye(64) * 2.5)
    np.save(f'{d}/bool.npy', np.array([True, False, True]))
    np.save(f'{d}/i1.npy', np.array([-5, 0, 7], dtype=np.int8))
    np.save(f'{d}/fortran.npy', np.asfortranarray(np.arange(6.0).reshape(2, 3)))
    np.save(f'{d}/big_endian.npy', np.arange(3, dtype='>f4'))
    np.save(f'{d}/complex.npy', np.arange(3, dtype=np.complex64))
    np.save(f'{d}/u2.npy', np.arange(3, dtype=np.uint16))
    np.save(f'{d}/structured.npy', np.zeros(2, dtype=[('a', '<f4'), ('b', '<i4')]))
else:
    for k in DT:
        a = np.load(f'{d}/ours_{k}.npy')
        assert a.dtype == DT[k] and a.shape == SHAPE[k], (k, a.dtype, a.shape)
        assert np.array_equal(a, ref(k)), k
        b = open(f'{d}/ours_{k}.npy', 'rb').read()
        import io
        buf = io.BytesIO(); np.save(buf, ref(k))
        assert b == buf.getvalue(), f'{k}: our .npy differs from np.save bytes'
    with np.load(f'{d}/ours.npz') as z:
        assert sorted(z.files) == sorted(DT), z.files
        for k in DT:
            assert z[k].dtype == DT[k] and np.array_equal(z[k], ref(k)), k
    with zipfile.ZipFile(f'{d}/ours.npz') as z:
        assert z.testzip() is None
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
    print('numpy read ours: OK')
)PY";
  std::string out;
  REQUIRE(run_python(py, script, "write '" + d.path.string() + "'", &out) == 0);
  INFO(out);

  auto check_ref = [](const npy::Array& a, const std::string& k) {
    INFO(k);
    const std::map<std::string, std::pair<std::string, std::vector<int64_t>>> meta = {
        {"u1", {"|u1", {2, 1, 3, 4}}}, {"i4", {"<i4", {5}}}, {"i8", {"<i8", {2, 3}}},
        {"f4", {"<f4", {3, 4, 5}}},     {"f8", {"<f8", {}}}};
    CHECK(a.descr == meta.at(k).first);
    CHECK(a.shape == meta.at(k).second);
    const std::vector<double> v = a.as<double>();
    if (k == "u1")
      CHECK(a.as<uint8_t>() == ref_values<uint8_t>(a.size()));
    else
      CHECK(v == ref_values<double>(a.size()));
  };
  const std::vector<std::string> keys = {"u1", "i4", "i8", "f4", "f8"};
  for (const auto& k : keys) check_ref(npy::load(d / ("np_" + k + ".npy")), k);
  for (const char* v : {"v1", "v2", "v3"}) check_ref(npy::load(d / (std::string(v) + ".npy")), "f4");
  for (const char* z : {"plain.npz", "comp.npz"}) {
    INFO(z);
    const auto m = npy::load_npz(d / z);
    REQUIRE(m.size() == keys.size());
    for (const auto& k : keys) check_ref(m.at(k), k);
  }
  const auto st = npy::load_npz(d / "stats.npz");
  CHECK(st.at("mu").shape == std::vector<int64_t>{64});
  CHECK(st.at("mu").as<double>().back() == 1.0);
  CHECK(st.at("sigma").as<double>()[65] == 2.5);
  CHECK(npy::load(d / "bool.npy").as<int>() == std::vector<int>{1, 0, 1});
  CHECK(npy::load(d / "i1.npy").as<int>() == std::vector<int>{-5, 0, 7});
  CHECK_THAT(error_of([&] { npy::load(d / "fortran.npy"); }), Contains("fortran.npy") && Contains("fortran_order is True"));
  CHECK_THAT(error_of([&] { npy::load(d / "big_endian.npy"); }), Contains("big-endian dtype '>f4'"));
  CHECK_THAT(error_of([&] { npy::load(d / "complex.npy"); }), Contains("complex.npy") && Contains("unsupported dtype '<c8'"));
  CHECK_THAT(error_of([&] { npy::load(d / "u2.npy"); }), Contains("unsupported dtype '<u2'"));
  CHECK_THAT(error_of([&] { npy::load(d / "structured.npy"); }), Contains("structured dtypes are not supported"));

  // Ours, read by numpy.
  std::map<std::string, npy::Array> m;
  auto put = [&](const std::string& k, auto vals, const std::vector<int64_t>& shape) {
    npy::save(d / ("ours_" + k + ".npy"), vals.data(), shape);
    m[k] = npy::array(vals.data(), shape);
  };
  put("u1", ref_values<uint8_t>(24), {2, 1, 3, 4});
  put("i4", ref_values<int32_t>(5), {5});
  put("i8", ref_values<int64_t>(6), {2, 3});
  put("f4", ref_values<float>(60), {3, 4, 5});
  put("f8", ref_values<double>(1), {});
  npy::save_npz(d / "ours.npz", m);
  const int rc = run_python(py, script, "read '" + d.path.string() + "'", &out);
  INFO(out);
  CHECK(rc == 0);
  CHECK_THAT(out, Contains("numpy read ours: OK"));
}

TEST_CASE("npy malformed files give one-line errors naming the file") {
  TempDir d("npy", "bad");
  const Bytes body4(4 * 3, 0);
  auto load_err = [&](const std::string& name, const Bytes& b) {
    const std::string p = d / name;
    write_bytes(p, b);
    const std::string e = error_of([&] { npy::load(p); });
    CHECK_THAT(e, Contains(p));
    CHECK(e.find('\n') == std::string::npos);
    return e;
  };
  const std::string ok = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }";
  // Sanity: the hand-built file itself loads, in all three versions.
  for (int v : {1, 2, 3}) {
    write_bytes(d / "good.npy", npy_bytes(ok, body4, v));
    CHECK(npy::load(d / "good.npy").shape == std::vector<int64_t>{3});
  }
  CHECK_THAT(load_err("magic.npy", Bytes{'P', 'K', 3, 4, 0, 0, 0, 0, 0, 0, 0, 0}), Contains("bad magic"));
  CHECK_THAT(load_err("empty.npy", {}), Contains("bad magic"));
  CHECK_THAT(load_err("short.npy", Bytes{0x93, 'N', 'U', 'M', 'P', 'Y', 1}), Contains("truncated"));
  Bytes v4 = npy_bytes(ok, body4);
  v4[6] = 4;
  CHECK_THAT(load_err("version.npy", v4), Contains("unsupported format version 4.0"));
  Bytes hl = npy_bytes(ok, {});
  hl.resize(30);
  CHECK_THAT(load_err("header_cut.npy", hl), Contains("truncated: the header is"));
  CHECK_THAT(load_err("data_cut.npy", npy_bytes(ok, Bytes(11, 0))),
             Contains("truncated: shape (3,) of <f4 needs 12 data bytes, the file has 11"));
  CHECK_THAT(load_err("data_long.npy", npy_bytes(ok, Bytes(13, 0))), Contains("trailing bytes"));
  CHECK_THAT(load_err("fortran.npy", npy_bytes("{'descr': '<f4', 'fortran_order': True, 'shape': (3,), }", body4)),
             Contains("fortran_order is True"));
  CHECK_THAT(load_err("dtype.npy", npy_bytes("{'descr': '<c8', 'fortran_order': False, 'shape': (3,), }", body4)),
             Contains("unsupported dtype '<c8'"));
  CHECK_THAT(load_err("be.npy", npy_bytes("{'descr': '>i4', 'fortran_order': False, 'shape': (3,), }", body4)),
             Contains("big-endian"));
  CHECK_THAT(load_err("nokey.npy", npy_bytes("{'descr': '<f4', 'shape': (3,), }", body4)),
             Contains("missing key 'fortran_order'"));
  CHECK_THAT(load_err("extra.npy", npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'x': 1}", body4)),
             Contains("unexpected key 'x'"));
  CHECK_THAT(load_err("neg.npy", npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (-3,), }", body4)),
             Contains("shape is not a tuple"));
  CHECK_THAT(load_err("junk.npy", npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), } x", body4)),
             Contains("text after the closing"));
  CHECK_THAT(load_err("huge.npy",
                      npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (4611686018427387904, 8), }", body4)),
             Contains("too large"));
  CHECK_THAT(error_of([&] { npy::load(d / "missing.npy"); }), Contains("missing.npy: no such file"));
  CHECK_THAT(error_of([&] { npy::load_npz(d / "missing.npz"); }), Contains("missing.npz: no such file"));
  // Writing into a directory that does not exist names the file and leaves nothing behind.
  const float x = 1;
  CHECK_THAT(error_of([&] { npy::save(d / "no/such/dir/x.npy", &x, {1}); }), Contains("no/such/dir/x.npy: cannot write"));

  // npz: a .npy is not an npz; truncation and corruption are caught.
  const std::vector<double> v(1000, 0.5);
  npy::save(d / "plain.npy", v.data(), {1000});
  CHECK_THAT(error_of([&] { npy::load_npz(d / "plain.npy"); }), Contains("is a .npy file, not an .npz"));
  npy::save_npz(d / "z.npz", {{"v", npy::array(v.data(), {1000})}});
  Bytes z = read_bytes(d / "z.npz");
  write_bytes(d / "cut.npz", Bytes(z.begin(), z.begin() + std::ptrdiff_t(z.size() / 2)));
  CHECK_THAT(error_of([&] { npy::load_npz(d / "cut.npz"); }), Contains("cut.npz") && Contains("truncated zip"));
  // Flip a bit of the compressed data (just past the 30-byte local header and the 5-byte name).
  Bytes flipped = z;
  flipped[30 + 5 + 4] ^= 0x10;
  write_bytes(d / "flip.npz", flipped);
  const std::string fe = error_of([&] { npy::load_npz(d / "flip.npz"); });
  CHECK_THAT(fe, Contains("flip.npz member 'v.npy'"));
  CHECK((fe.find("CRC-32 mismatch") != std::string::npos || fe.find("deflate data") != std::string::npos ||
         fe.find("inflates to") != std::string::npos));
  // Raw CRC check: a stored member whose bytes changed but still parse.
  {
    const Bytes npyb = read_bytes(d / "plain.npy");
    Bytes s;
    auto le = [&](uint64_t val, int n) {
      for (int i = 0; i < n; ++i) s.push_back(uint8_t(val >> (8 * i)));
    };
    const std::string name = "v.npy";
    le(0x04034b50, 4), le(20, 2), le(0, 2), le(0, 2), le(0, 2), le(0x21, 2), le(0xDEADBEEF, 4);
    le(npyb.size(), 4), le(npyb.size(), 4), le(name.size(), 2), le(0, 2);
    s.insert(s.end(), name.begin(), name.end());
    s.insert(s.end(), npyb.begin(), npyb.end());
    const size_t cd = s.size();
    le(0x02014b50, 4), le(20, 2), le(20, 2), le(0, 2), le(0, 2), le(0, 2), le(0x21, 2), le(0xDEADBEEF, 4);
    le(npyb.size(), 4), le(npyb.size(), 4), le(name.size(), 2), le(0, 2), le(0, 2), le(0, 2), le(0, 2), le(0, 4), le(0, 4);
    s.insert(s.end(), name.begin(), name.end());
    const size_t cd_size = s.size() - cd;
    le(0x06054b50, 4), le(0, 2), le(0, 2), le(1, 2), le(1, 2), le(cd_size, 4), le(cd, 4), le(0, 2);
    write_bytes(d / "crc.npz", s);
    CHECK_THAT(error_of([&] { npy::load_npz(d / "crc.npz"); }), Contains("crc.npz member 'v.npy': CRC-32 mismatch"));
  }
}

TEST_CASE("npz truncated, corrupt, or claiming more than it holds: one-line errors naming the file") {
  TempDir d("npy", "npz_bad");
  const auto seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const std::vector<float> a = random_values<float>(rng, 300);
  const std::vector<int32_t> b = random_values<int32_t>(rng, 50);
  const std::map<std::string, npy::Array> arrays = {{"a", npy::array(a.data(), {3, 100})},
                                                     {"b", npy::array(b.data(), {50})}};
  const std::string good = d / "good.npz";
  npy::save_npz(good, arrays);
  CHECK_FALSE(fs::exists(good + ".tmp"));
  REQUIRE(npy::load_npz(good).at("a").as<float>() == a);
  const Bytes z = read_bytes(good);
  // The error of loading these bytes ("" if they load), and the file's name.
  auto load_err = [&](const std::string& name, const Bytes& bytes, std::map<std::string, npy::Array>* got = nullptr) {
    const std::string p = d / name;
    write_bytes(p, bytes);
    try {
      auto m = npy::load_npz(p);
      if (got) *got = std::move(m);
      return std::pair<std::string, std::string>{p, ""};
    } catch (const std::runtime_error& e) {
      return std::pair<std::string, std::string>{p, e.what()};
    }
  };
  // Every truncation fails (the end of central directory record is the file's last 22 bytes).
  for (size_t cut = 0; cut < z.size(); cut += 1 + rng() % 5) {
    INFO("cut at " << cut << " of " << z.size());
    const auto [p, e] = load_err("cut.npz", Bytes(z.begin(), z.begin() + std::ptrdiff_t(cut)));
    CHECK_THAT(e, Contains(p + ": ") || Contains(p + " member '"));
    CHECK(e.find('\n') == std::string::npos);
  }
  // One changed byte anywhere fails the same way, or (a date, attributes, a name) loads
  // the same arrays, under the names the central directory gives.
  for (int k = 0; k < 400; ++k) {
    Bytes c = z;
    const size_t at = rng() % c.size();
    c[at] ^= uint8_t(1 + rng() % 255);
    INFO("byte " << at << " of " << z.size() << " changed to " << int(c[at]));
    std::map<std::string, npy::Array> got;
    const auto [p, e] = load_err("flip.npz", c, &got);
    if (e.empty()) {  // the same arrays, whatever their names
      auto contents = [](const std::map<std::string, npy::Array>& m) {
        std::vector<std::tuple<std::string, std::vector<int64_t>, std::vector<uint8_t>>> v;
        for (const auto& [key, arr] : m) v.emplace_back(arr.descr, arr.shape, arr.bytes);
        std::sort(v.begin(), v.end());
        return v;
      };
      CHECK(contents(got) == contents(arrays));
    } else {
      CHECK_THAT(e, Contains(p + ": ") || Contains(p + " member '"));
      CHECK(e.find('\n') == std::string::npos);
    }
  }
  // Sizes in the directory that the file cannot hold are refused before anything is allocated.
  auto put32 = [](Bytes& f, size_t at, uint32_t v) {
    for (int i = 0; i < 4; ++i) f[at + size_t(i)] = uint8_t(v >> (8 * i));
  };
  size_t cd = 0;  // a.npy's central directory entry: the first "PK\1\2"
  while (cd + 4 <= z.size() && !(z[cd] == 'P' && z[cd + 1] == 'K' && z[cd + 2] == 1 && z[cd + 3] == 2)) ++cd;
  REQUIRE(cd + 46 < z.size());
  {
    Bytes bomb = z;  // 4 GiB from about a kilobyte
    put32(bomb, cd + 24, 0xFFFFFFF0u);
    put32(bomb, 22, 0xFFFFFFF0u);
    const auto [p, e] = load_err("bomb.npz", bomb);
    CHECK_THAT(e, Contains(p + " member 'a.npy'") && Contains("more than deflate expands"));
  }
  {
    Bytes longer = z;  // compressed data running past the end of the file
    put32(longer, cd + 20, 0x7FFFFFF0u);
    put32(longer, 18, 0x7FFFFFF0u);
    const auto [p, e] = load_err("outside.npz", longer);
    CHECK_THAT(e, Contains(p + " member 'a.npy'") && Contains("outside the file"));
  }
  // A failed write names the file and leaves nothing behind.
  const std::string nowhere = d / "no/such/dir/x.npz";
  CHECK_THAT(error_of([&] { npy::save_npz(nowhere, arrays); }), Contains(nowhere + ": cannot write"));
  CHECK_FALSE(fs::exists(nowhere + ".tmp"));
  const float x = 1;
  npy::Array bad = npy::array(&x, {1});
  bad.descr = "<c8";
  CHECK_THAT(error_of([&] { npy::save_npz(d / "bad.npz", {{"a", arrays.at("a")}, {"z", bad}}); }),
             Contains("bad.npz member 'z.npy'") && Contains("cannot write dtype '<c8'"));
  CHECK_FALSE(fs::exists(d / "bad.npz"));
  CHECK_FALSE(fs::exists(d / "bad.npz.tmp"));
}
