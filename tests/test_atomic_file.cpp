// Outputs that cannot fail silently (issue 21): write_file_atomically and the writers built on it
// (PNG through plot::Canvas, the CSV log's rows, npy), on a disk that fills up and in a folder
// that does not exist. A full disk is simulated in a child process with RLIMIT_FSIZE (writes past
// the limit fail with EFBIG once SIGXFSZ is ignored), which needs no privileges; the parent checks
// the child's verdict, so a failed check or a crash in the child fails the test.
#include <catch2/catch.hpp>

#include "kernel_seed.hpp"
#include "temp_files.hpp"

#include <diffuse/io/atomic_file.hpp>
#include <diffuse/io/npy.hpp>
#include <diffuse/train/csv_log.hpp>
#include <diffuse/viz/plot.hpp>

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

using namespace diffuse;
using diffuse::testing::Bytes;
using diffuse::testing::read_bytes;
using diffuse::testing::TempDir;
namespace fs = std::filesystem;

namespace {

// Runs body in a child whose files may not grow past limit bytes; returns what it returned (a
// step number: 0 when every check in it held), or -1 when it died.
int with_file_size_limit(rlim_t limit, const std::function<int()>& body) {
  std::fflush(nullptr);
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    std::signal(SIGXFSZ, SIG_IGN);
    rlimit r{limit, limit};
    if (setrlimit(RLIMIT_FSIZE, &r) != 0) _exit(100);
    int rc = 101;
    try {
      rc = body();
    } catch (...) {
      rc = 102;  // an exception the body did not expect
    }
    _exit(rc);
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Whether f throws a std::exception whose message contains every one of the parts.
bool throws_with(const std::function<void()>& f, const std::vector<std::string>& parts) {
  try {
    f();
  } catch (const std::exception& e) {
    const std::string m = e.what();
    for (const auto& p : parts)
      if (m.find(p) == std::string::npos) return false;
    return true;
  }
  return false;
}

Bytes random_bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Bytes b(n);
  for (auto& v : b) v = static_cast<uint8_t>(rng());
  return b;
}

}  // namespace

TEST_CASE("write_file_atomically writes, replaces, and leaves no temporary") {
  TempDir d("atomic", "basic");
  const std::string p = d / "a.bin";
  const Bytes one = random_bytes(1000, diffuse::testing::fresh_seed()), two = random_bytes(10, 7);
  write_file_atomically(p, one.data(), one.size());
  CHECK(read_bytes(p) == one);
  write_file_atomically(p, two.data(), two.size());
  CHECK(read_bytes(p) == two);
  write_file_atomically(p, std::string());
  CHECK(fs::file_size(p) == 0);
  CHECK_FALSE(fs::exists(p + ".tmp"));
  // A folder that does not exist: the error names the file and the reason.
  CHECK(throws_with([&] { write_file_atomically(d / "no/such/a.bin", std::string("x")); },
                    {"cannot write '" + d / "no/such/a.bin" + "'", "No such file or directory"}));
}

TEST_CASE("a full disk: every writer throws, naming the file, and the previous file survives") {
  TempDir d("atomic", "full");
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed << " (DIFFUSE_TEST_SEED replays it)");
  const Bytes old = random_bytes(512, seed), big = random_bytes(100000, seed + 1);
  const std::string bin = d / "out.bin", png = d / "grid.png", npy = d / "samples.npy", csv = d / "log.csv";
  write_file_atomically(bin, old.data(), old.size());
  write_file_atomically(png, old.data(), old.size());
  write_file_atomically(npy, old.data(), old.size());

  // 8 KiB per file: the old contents fit, the new ones do not.
  const int rc = with_file_size_limit(8192, [&]() -> int {
    if (!throws_with([&] { write_file_atomically(bin, big.data(), big.size()); }, {"cannot write '" + bin + "'", "large"}))
      return 1;
    // A noise image does not compress below the limit: 200 x 200 RGB.
    plot::Canvas c(200, 200);
    std::mt19937 rng(static_cast<uint32_t>(seed));
    for (int y = 0; y < 200; ++y)
      for (int x = 0; x < 200; ++x) c.set(x, y, {uint8_t(rng()), uint8_t(rng()), uint8_t(rng())});
    if (!throws_with([&] { c.write_png(png); }, {"cannot write '" + png + "'"})) return 2;
    const std::vector<float> v(20000, 0.5f);
    if (!throws_with([&] { npy::save(npy, v.data(), {20000}); }, {npy, "cannot write"})) return 3;
    // The CSV log: rows until the limit, then an error rather than a log that silently ends.
    CsvLog log(csv, {"loss"}, -1);
    bool threw = false;
    for (int step = 1; step <= 2000 && !threw; ++step) {
      try {
        log.row(step, {{"loss", 0.123456789 * step}});
      } catch (const std::runtime_error& e) {
        threw = std::string(e.what()).find("cannot append to '" + csv + "'") != std::string::npos;
        if (!threw) return 4;
      }
    }
    if (!threw) return 5;
    return 0;
  });
  INFO("child returned " << rc << " (1 raw bytes, 2 PNG, 3 npy, 4/5 CSV log; 102 an unexpected exception, -1 a crash)");
  REQUIRE(rc == 0);
  // The previous files are whole, and no temporary is left beside them.
  CHECK(read_bytes(bin) == old);
  CHECK(read_bytes(png) == old);
  CHECK(read_bytes(npy) == old);
  for (const std::string& p : {bin, png, npy}) CHECK_FALSE(fs::exists(p + ".tmp"));
  // Without the limit the same writes succeed.
  write_file_atomically(bin, big.data(), big.size());
  CHECK(read_bytes(bin) == big);
}
