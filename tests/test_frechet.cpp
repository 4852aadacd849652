// Frechet distance and Gaussian statistics (include/diffuse/eval/frechet.hpp):
// closed forms (1-D, identical, commuting covariances, a zero covariance),
// errors, the stats file round trip, and pytorch-fid's formula with
// scipy.linalg.sqrtm (tests/torch/frechet_ref.py) on random, nearly singular
// and n < d statistics, plus the covariance against numpy.cov. The scipy half
// is skipped with a warning when DIFFUSE_TORCH_PYTHON cannot import scipy.
#include <Eigen/QR>  // random orthogonal matrices
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include <diffuse/eval/frechet.hpp>

using namespace diffuse;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;
using RowMat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

#include "temp_files.hpp"
#include "skip.hpp"

using diffuse::testing::Bytes;
using diffuse::testing::read_bytes;
using diffuse::testing::TempDir;
using diffuse::testing::write_bytes;

namespace {

Eigen::MatrixXd randn(std::mt19937_64& rng, int64_t r, int64_t c) {
  std::normal_distribution<double> nd;
  Eigen::MatrixXd m(r, c);
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < c; ++j) m(i, j) = nd(rng);
  return m;
}

// B B^T / k + jitter I with B d x k: SPD of rank k (plus the jitter).
GaussianStats random_stats(std::mt19937_64& rng, int64_t d, int64_t k, double jitter, double mean_scale) {
  GaussianStats s;
  s.mu = mean_scale * randn(rng, d, 1).col(0);
  const Eigen::MatrixXd B = randn(rng, d, k);
  s.sigma = B * B.transpose() / static_cast<double>(k) + jitter * Eigen::MatrixXd::Identity(d, d);
  s.sigma = 0.5 * (s.sigma + s.sigma.transpose()).eval();
  return s;
}

// Stats of n samples x = mu + L z (z standard normal), in float, via gaussian_stats.
GaussianStats sampled_stats(std::mt19937_64& rng, int64_t n, int64_t d, double shift) {
  const Eigen::MatrixXd L = randn(rng, d, d) / std::sqrt(static_cast<double>(d));
  const Eigen::MatrixXd Z = randn(rng, n, d);
  const RowMat X = (Z * L.transpose()).array() + shift;
  const std::vector<float> f(X.data(), X.data() + X.size());
  return gaussian_stats(f.data(), n, d);
}

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

std::string scipy_python() {
  const std::string py = DIFFUSE_TORCH_PYTHON;
  if (py.empty()) return "";
  const std::string cmd = "'" + py + "' -c 'import numpy, scipy.linalg' >/dev/null 2>&1";
  return std::system(cmd.c_str()) == 0 ? py : "";
}

}  // namespace

TEST_CASE("frechet distance of 1-D Gaussians is (m1-m2)^2 + (s1-s2)^2") {
  for (auto [m1, s1, m2, s2] : std::vector<std::array<double, 4>>{{0, 1, 0, 1}, {1, 2, -3, 0.5}, {10, 1e-3, 9, 30}}) {
    GaussianStats a{Eigen::VectorXd::Constant(1, m1), Eigen::MatrixXd::Constant(1, 1, s1 * s1)};
    GaussianStats b{Eigen::VectorXd::Constant(1, m2), Eigen::MatrixXd::Constant(1, 1, s2 * s2)};
    const double want = (m1 - m2) * (m1 - m2) + (s1 - s2) * (s1 - s2);
    CHECK(frechet_distance(a, b) == Approx(want).epsilon(1e-12).margin(1e-12));
    CHECK(frechet_distance(b, a) == Approx(want).epsilon(1e-12).margin(1e-12));
  }
}

TEST_CASE("frechet distance of identical statistics is 0") {
  std::mt19937_64 rng(1);
  for (int64_t d : {1, 8, 64, 128}) {
    const GaussianStats s = random_stats(rng, d, d, 0.01, 3.0);
    CHECK(std::abs(frechet_distance(s, s)) < 1e-9);
    // Rank-deficient too. tr sqrtm is not Lipschitz at singular matrices: a
    // rounding-level eigenvalue delta ~ 1e-16 |S| in a null direction adds
    // sqrt(delta) ~ 1e-8 |S|, for each of the d/2 of them (scipy too).
    const GaussianStats r = random_stats(rng, d, std::max<int64_t>(1, d / 2), 0.0, 1.0);
    CHECK(std::abs(frechet_distance(r, r)) < 1e-7 * static_cast<double>(d) * r.sigma.norm());
  }
}

TEST_CASE("frechet distance of commuting covariances has a closed form") {
  std::mt19937_64 rng(2);
  const int64_t d = 32;
  // S1 = Q D1 Q^T, S2 = Q D2 Q^T: tr sqrtm(S1 S2) = sum sqrt(d1 d2), so
  // FD = |mu1 - mu2|^2 + sum (sqrt(d1) - sqrt(d2))^2. Q = I is the diagonal case.
  Eigen::HouseholderQR<Eigen::MatrixXd> qr(randn(rng, d, d));
  const Eigen::MatrixXd Qr = qr.householderQ();
  // With Q = I the zero variances are exact zeros: 1e-12. With a rotation they
  // become rounding-level eigenvalues, whose square roots add ~1e-8 each (see above).
  for (const auto& [Q, tol] : {std::pair<Eigen::MatrixXd, double>{Eigen::MatrixXd::Identity(d, d), 1e-12}, {Qr, 1e-8}}) {
    std::uniform_real_distribution<double> u(0.0, 4.0);
    Eigen::VectorXd d1(d), d2(d);
    for (int64_t i = 0; i < d; ++i) d1(i) = u(rng), d2(i) = (i % 5 == 0) ? 0.0 : u(rng);  // some zero variances
    GaussianStats a{randn(rng, d, 1).col(0), Q * d1.asDiagonal() * Q.transpose()};
    GaussianStats b{randn(rng, d, 1).col(0), Q * d2.asDiagonal() * Q.transpose()};
    const double want = (a.mu - b.mu).squaredNorm() + (d1.cwiseSqrt() - d2.cwiseSqrt()).squaredNorm();
    CHECK(frechet_distance(a, b) == Approx(want).epsilon(tol));
  }
  // A zero covariance (a constant feature vector): FD = |dmu|^2 + tr S2.
  const GaussianStats z{Eigen::VectorXd::Zero(d), Eigen::MatrixXd::Zero(d, d)};
  const GaussianStats s = random_stats(rng, d, d, 0.1, 1.0);
  CHECK(frechet_distance(z, s) == Approx(s.mu.squaredNorm() + s.sigma.trace()).epsilon(1e-12));
  CHECK(frechet_distance(s, z) == Approx(s.mu.squaredNorm() + s.sigma.trace()).epsilon(1e-12));
}

TEST_CASE("gaussian_stats is the mean and the N-1 covariance") {
  // x = (1, 2), (3, 6), (5, 7): mean (3, 5); deviations (-2,-3), (0,1), (2,2).
  const std::vector<double> x = {1, 2, 3, 6, 5, 7};
  const GaussianStats s = gaussian_stats(x.data(), 3, 2);
  CHECK(s.mu(0) == 3.0);
  CHECK(s.mu(1) == 5.0);
  CHECK(s.sigma(0, 0) == Approx(8.0 / 2));
  CHECK(s.sigma(0, 1) == Approx(10.0 / 2));
  CHECK(s.sigma(1, 0) == s.sigma(0, 1));
  CHECK(s.sigma(1, 1) == Approx(14.0 / 2));
  const std::vector<float> xf(x.begin(), x.end());
  CHECK(gaussian_stats(xf.data(), 3, 2).sigma.isApprox(s.sigma, 1e-12));
  CHECK_THAT(error_of([&] { gaussian_stats(x.data(), 1, 2); }), Contains("at least 2 samples"));
}

TEST_CASE("frechet distance rejects bad statistics") {
  std::mt19937_64 rng(3);
  const GaussianStats a = random_stats(rng, 4, 4, 0.1, 1.0), b = random_stats(rng, 5, 5, 0.1, 1.0);
  CHECK_THAT(error_of([&] { frechet_distance(a, b); }), Contains("different or inconsistent sizes"));
  GaussianStats n = a;
  n.sigma(1, 1) = std::nan("");
  CHECK_THAT(error_of([&] { frechet_distance(a, n); }), Contains("not finite"));
  GaussianStats neg = a;
  neg.sigma = -neg.sigma;  // negative definite: sqrt would be imaginary
  CHECK_THAT(error_of([&] { frechet_distance(neg, a); }), Contains("imaginary component"));
}

TEST_CASE("gaussian stats files round trip") {
  TempDir dir("frechet", "stats");
  std::mt19937_64 rng(4);
  const GaussianStats s = random_stats(rng, 16, 16, 0.1, 1.0);
  save_gaussian_stats(dir / "s.npz", s);
  const GaussianStats r = load_gaussian_stats(dir / "s.npz");
  CHECK(r.mu == s.mu);
  CHECK(r.sigma == s.sigma);
  // Non-finite values and a negative variance are refused when the file is read.
  GaussianStats bad = s;
  bad.sigma(3, 5) = std::numeric_limits<double>::infinity();
  save_gaussian_stats(dir / "inf.npz", bad);
  CHECK_THAT(error_of([&] { load_gaussian_stats(dir / "inf.npz"); }), Contains("inf.npz: sigma[3, 5] is not finite"));
  bad = s;
  bad.mu(2) = std::nan("");
  save_gaussian_stats(dir / "nan.npz", bad);
  CHECK_THAT(error_of([&] { load_gaussian_stats(dir / "nan.npz"); }), Contains("nan.npz: mu[2] is not finite"));
  bad = s;
  bad.sigma(4, 4) = -1.0;
  save_gaussian_stats(dir / "neg.npz", bad);
  CHECK_THAT(error_of([&] { load_gaussian_stats(dir / "neg.npz"); }), Contains("sigma[4, 4] is negative"));
}

TEST_CASE("frechet distance matches pytorch-fid with scipy sqrtm") {
  const std::string py = scipy_python();
  if (py.empty()) {
    DIFFUSE_SKIP("no python with numpy and scipy (DIFFUSE_TORCH_PYTHON='" DIFFUSE_TORCH_PYTHON "'): scipy comparison skipped");
  }
  TempDir dir("frechet", "scipy");
  std::mt19937_64 rng(5);
  std::map<std::string, std::pair<GaussianStats, GaussianStats>> cases;
  cases["spd8"] = {random_stats(rng, 8, 8, 0.05, 1.0), random_stats(rng, 8, 8, 0.05, 1.0)};
  cases["spd64"] = {random_stats(rng, 64, 64, 0.05, 0.3), random_stats(rng, 64, 64, 0.05, 0.3)};
  cases["spd64_close"] = {random_stats(rng, 64, 64, 0.5, 0.01), {}};
  {  // a small perturbation of the first: FD small next to the traces
    GaussianStats p = cases["spd64_close"].first;
    const Eigen::MatrixXd E = 0.01 * randn(rng, 64, 64);
    p.sigma += E * E.transpose();
    p.mu.array() += 0.01;
    cases["spd64_close"].second = p;
  }
  cases["nearly_singular64"] = {random_stats(rng, 64, 32, 1e-9, 1.0), random_stats(rng, 64, 32, 1e-9, 1.0)};
  cases["few_samples64"] = {sampled_stats(rng, 40, 64, 0.0), sampled_stats(rng, 40, 64, 0.2)};
  cases["few_samples8"] = {sampled_stats(rng, 5, 8, 0.0), sampled_stats(rng, 6, 8, 0.5)};

  std::map<std::string, npy::Array> in;
  auto put = [&](const std::string& name, int k, const GaussianStats& s) {
    const int64_t d = s.mu.size();
    const RowMat sr = s.sigma;  // row-major: the .npy layout
    in[name + ".mu" + std::to_string(k)] = npy::array(s.mu.data(), {d});
    in[name + ".sigma" + std::to_string(k)] = npy::array(sr.data(), {d, d});
  };
  for (auto& [name, ab] : cases) {
    put(name, 1, ab.first);
    put(name, 2, ab.second);
  }
  // Correlated float features for the covariance check.
  const int64_t n = 300, d = 16;
  const Eigen::MatrixXd L = randn(rng, d, d);
  const RowMat X = ((randn(rng, n, d) * L.transpose()).array() + 5.0).matrix();
  const std::vector<float> feat(X.data(), X.data() + X.size());
  in["features"] = npy::array(feat.data(), {n, d});
  npy::save_npz(dir / "in.npz", in);

  const std::string cmd = "'" + py + "' '" DIFFUSE_SOURCE_DIR "/tests/torch/frechet_ref.py' '" + (dir / "in.npz") +
                          "' '" + (dir / "out.npz") + "' > '" + (dir / "log") + "' 2>&1";
  const int rc = std::system(cmd.c_str());
  {
    std::ifstream f(dir / "log");
    std::stringstream s;
    s << f.rdbuf();
    INFO(s.str());
    REQUIRE(rc == 0);
  }
  const auto out = npy::load_npz(dir / "out.npz");
  for (auto& [name, ab] : cases) {
    const double ref = out.at(name + ".fd").as<double>()[0];
    const double ours = frechet_distance(ab.first, ab.second);
    INFO(name << ": ours " << ours << ", scipy " << ref << ", scipy took the eps retry: "
              << out.at(name + ".eps").as<double>()[0]);
    CHECK(std::abs(ours - ref) <= 1e-6 * std::abs(ref));
  }
  const GaussianStats s = gaussian_stats(feat.data(), n, d);
  const std::vector<double> mu = out.at("cov_mu").as<double>(), sg = out.at("cov_sigma").as<double>();
  const Eigen::VectorXd mref = Eigen::Map<const Eigen::VectorXd>(mu.data(), d);
  const RowMat sref = Eigen::Map<const RowMat>(sg.data(), d, d);
  CHECK((s.mu - mref).norm() <= 1e-12 * mref.norm());
  CHECK((s.sigma - sref).norm() <= 1e-12 * sref.norm());
}
