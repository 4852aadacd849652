// examples/fid end to end, with random Inception weights from
// tests/torch/inception_ref.py converted by scripts/fid_weights_to_safetensors.py:
// statistics of a .npy equal PyTorch's (numpy mean/cov of the PyTorch features),
// a PNG folder and a .npy give the same FID as their saved statistics, and the
// tool refuses bad requests with one clear line.
#include <catch2/catch.hpp>

#include "kernel_seed.hpp"

#include "run_command.hpp"

#include <diffuse/eval/fid.hpp>
#include <diffuse/io/stb.hpp>
#include <diffuse/io/npy.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <sys/wait.h>
#include "skip.hpp"

using namespace diffuse;
namespace fs = std::filesystem;

namespace {

const fs::path kWork = fs::path(DIFFUSE_BINARY_DIR) / "tests" / "fid_cli";
const std::string kFid = std::string(DIFFUSE_BINARY_DIR) + "/examples/fid";

std::string q(const std::string& s) { return "'" + s + "'"; }
std::string p(const std::string& leaf) { return (kWork / leaf).string(); }

// Runs a command, returns its exit status and puts stdout+stderr in out.
int run(const std::string& cmd, std::string* out = nullptr) {
  return diffuse::testing::run_command(cmd, kWork / "last_command.log", out);
}

// The value after the last "FID: " in the output.
double fid_value(const std::string& out) {
  const size_t k = out.rfind("FID: ");
  REQUIRE(k != std::string::npos);
  return std::stod(out.substr(k + 5));
}

double rel(const Eigen::MatrixXd& a, const Eigen::MatrixXd& b) { return (a - b).norm() / b.norm(); }

}  // namespace

TEST_CASE("fid tool: statistics match PyTorch, inputs agree, errors are clear") {
  if (std::string(DIFFUSE_TORCH_PYTHON).empty()) {
    DIFFUSE_SKIP("no python with torch found at configure time: fid tool test skipped");
  }
  fs::remove_all(kWork);
  fs::create_directories(kWork / "pngs");
  const uint64_t seed = diffuse::testing::fresh_seed() % 1000000;
  INFO("seed " << seed);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  // A: 4 colour 24x24 images as NHWC .npy; B: 3 grey 20x20 images as PNG files.
  auto smooth = [&](int64_t n, int64_t s, int64_t c) {
    std::vector<uint8_t> v(static_cast<size_t>(n * s * s * c));
    std::uniform_real_distribution<double> u(0, 1);
    for (int64_t i = 0; i < n; ++i) {
      const double a = u(rng) * 6, b = u(rng) * 6, ph = u(rng) * 6;
      for (int64_t y = 0; y < s; ++y)
        for (int64_t x = 0; x < s; ++x)
          for (int64_t ch = 0; ch < c; ++ch)
            v[size_t(((i * s + y) * s + x) * c + ch)] = static_cast<uint8_t>(
                std::clamp(128 + 100 * std::sin(a * x / s + b * y / s + ph + ch) + 30 * (u(rng) - 0.5), 0.0, 255.0));
    }
    return v;
  };
  const std::vector<uint8_t> a = smooth(4, 24, 3), b = smooth(3, 20, 1);
  npy::save<uint8_t>(p("a.npy"), a.data(), {4, 24, 24, 3});
  for (int i = 0; i < 3; ++i)
    REQUIRE(stbi_write_png(p("pngs/b" + std::to_string(i) + ".png").c_str(), 20, 20, 1, b.data() + i * 400, 20) != 0);

  const std::string py = q(DIFFUSE_TORCH_PYTHON), src = DIFFUSE_SOURCE_DIR;
  REQUIRE(run("cd " + q(src + "/tests/torch") + " && " + py + " inception_ref.py --seed " + std::to_string(seed) +
              " --pth " + q(p("w.pth")) + " --safetensors " + q(p("w.safetensors")) + " --images " + q(p("a.npy")) +
              " --features " + q(p("a_feat.npy")) + " --stats " + q(p("a.npy") + ":" + p("a_ref.npz"))) == 0);
  const std::string W = " --weights " + q(p("w.safetensors"));

  std::string out;
  // Statistics of A against numpy's mean and cov of PyTorch's features.
  REQUIRE(run(q(kFid) + " " + q(p("a.npy")) + " --save-stats " + q(p("a.npz")) + W, &out) == 0);
  CHECK(out.find("fewer than 2048") != std::string::npos);
  const GaussianStats ours = load_gaussian_stats(p("a.npz")), ref = load_gaussian_stats(p("a_ref.npz"));
  REQUIRE(ours.mu.size() == 2048);
  const double emu = (ours.mu - ref.mu).norm() / ref.mu.norm(), esig = rel(ours.sigma, ref.sigma);
  std::printf("fid tool statistics vs PyTorch+numpy: mu %.3g, sigma %.3g (relative)\n", emu, esig);
  CHECK(emu < 1e-4);
  CHECK(esig < 1e-4);  // 4 images: centred features lose a few digits to cancellation (4e-6 seen)

  // Images against images, and the same through saved statistics.
  REQUIRE(run(q(kFid) + " " + q(p("a.npy")) + " " + q(p("pngs")) + " --batch 2 --save-stats " + q(p("a2.npz")) + W,
              &out) == 0);
  const double f_images = fid_value(out);
  CHECK(out.find("3 images 20x20") != std::string::npos);  // grey PNGs, read as RGB
  REQUIRE(run(q(kFid) + " " + q(p("pngs")) + " --save-stats " + q(p("b.npz")) + W) == 0);
  REQUIRE(run(q(kFid) + " " + q(p("a.npz")) + " " + q(p("b.npz")), &out) == 0);  // no weights needed
  const double f_stats = fid_value(out);
  CHECK(f_images > 0);
  CHECK(std::abs(f_images - f_stats) <= 1e-6 * f_stats);
  // Batch size does not change the statistics beyond float rounding.
  CHECK(rel(load_gaussian_stats(p("a2.npz")).sigma, ours.sigma) < 1e-5);
  REQUIRE(run(q(kFid) + " " + q(p("a.npz")) + " " + q(p("a.npz")), &out) == 0);
  // Zero up to rounding: 4 images give a rank-3 covariance in 2,048 dimensions, whose ~2,045
  // zero eigenvalues come out as +-1e-13-sized noise; its square roots add up to ~1e-6 of the trace.
  CHECK(std::abs(fid_value(out)) < 1e-5 * 2 * ours.sigma.trace());

  // Refusals: one line on stderr, exit 1.
  npy::save<uint8_t>(p("one.npy"), std::vector<uint8_t>(a.begin(), a.begin() + 24 * 24 * 3).data(), {1, 24, 24, 3});
  CHECK(run(q(kFid) + " " + q(p("one.npy")) + " " + q(p("a.npy")) + W, &out) == 1);
  CHECK(out.find("fid: error: ") != std::string::npos);
  CHECK(out.find("at least 2") != std::string::npos);
  CHECK(run(q(kFid) + " " + q(p("a.npy")) + " " + q(p("a.npz")) + " --weights " + q(p("nosuch.safetensors")), &out) == 1);
  CHECK(out.find("fid_weights_to_safetensors.py") != std::string::npos);
  CHECK(run(q(kFid) + " " + q(p("a.npz")) + " " + q(p("a.npz")) + " --device cuda", &out) == 1);
  CHECK(out.find("CUDA") != std::string::npos);
  CHECK(run(q(kFid) + " " + q(p("a.npz")), &out) == 1);
  CHECK(out.find("--save-stats") != std::string::npos);
  CHECK(run(q(kFid) + " " + q(p("w.pth")) + " " + q(p("a.npz")), &out) == 1);
  CHECK(out.find("neither a folder") != std::string::npos);
  // Statistics with a NaN: refused when read, before A's features are computed (A here is a
  // folder that does not exist, whose error would come first if A were read first).
  {
    GaussianStats bad = ours;
    bad.mu(7) = std::nan("");
    save_gaussian_stats(p("nan.npz"), bad);
  }
  CHECK(run(q(kFid) + " " + q(p("no_such_folder")) + " " + q(p("nan.npz")) + W, &out) == 1);
  CHECK(out.find("nan.npz: mu[7] is not finite") != std::string::npos);
  CHECK(run(q(kFid) + " --help", &out) == 0);
  CHECK(out.find("pytorch-fid") != std::string::npos);
}
