// Frechet distance between Gaussians fitted to feature vectors: the distance
// behind FID (Inception features) and FD-LeNet (include/diffuse/eval/lenet_score.hpp).
//
//   gaussian_stats(features, n, d)   mean and covariance (N - 1, as numpy.cov(rowvar=False))
//                                    of n feature rows of d values, in double
//   frechet_distance(a, b)           ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrtm(S1 S2)
//   save_gaussian_stats / load_gaussian_stats
//                                    .npz with float64 arrays "mu" [d] and "sigma" [d, d],
//                                    the layout of pytorch-fid's statistics files
//
// tr sqrtm(S1 S2) is computed by a symmetric route instead of scipy's sqrtm of
// the non-symmetric product: S1 S2 is similar to M = S1^1/2 S2 S1^1/2
// (S1^1/2 (S1^1/2 S2 S1^1/2) S1^-1/2 where S1 is invertible, and by continuity
// otherwise), M is symmetric PSD, so tr sqrtm(S1 S2) = sum_i sqrt(lambda_i(M)).
// Two symmetric eigendecompositions in double; everything else follows
// pytorch-fid's calculate_frechet_distance, as far as it applies:
//  - the traces of S1 and S2 are those of the given matrices;
//  - if the result is not finite, 1e-6 is added to both diagonals for the
//    square-root term and it is computed again (and an error thrown if that is
//    still not finite: NaN or Inf in the statistics);
//  - pytorch-fid takes the real part of scipy's complex result and raises if
//    the diagonal's imaginary part exceeds 1e-3. Here eigenvalues are real;
//    tiny negative ones (rounding in a PSD matrix) are clamped to 0, which is
//    the real part of their complex square root. The imaginary part they stand
//    for, sqrt(-lambda), is refused above 1e-3 * max(1, sqrt(lambda_max)) (the
//    scale makes the check independent of the features' units where they are
//    large; it is pytorch-fid's 1e-3 for unit-scale statistics).
// Where this differs from scipy.linalg.sqrtm: scipy's Schur recursion divides
// by sums of square roots of eigenvalues and fails (NaN, hence pytorch-fid's
// eps retry) when the product has exactly zero eigenvalues, e.g. a feature that
// is constant in both sets (a dead ReLU unit). This route stays finite there and
// returns the eps-free value; pytorch-fid's regularised value differs by about
// sqrt(1e-6 * s) per such dimension (s: that feature's variance in the other set).
// Otherwise the two agree to about 1e-6 relative or better (tested against scipy).
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <diffuse/core/config.hpp>
#include <diffuse/io/npy.hpp>

#if DIFFUSE_DEFINE_IMPL
#include <Eigen/Eigenvalues>  // only where the distance is compiled (seconds of compile time)
#endif

namespace diffuse {

struct GaussianStats {
  Eigen::VectorXd mu;     // [d]
  Eigen::MatrixXd sigma;  // [d, d], symmetric
};

// Mean and unbiased covariance of n rows of d features (row-major), in double
// whatever T is (float statistics give wrong FIDs). Needs n >= 2.
template <class T>
GaussianStats gaussian_stats(const T* features, int64_t n, int64_t d) {
  static_assert(std::is_floating_point_v<T>, "gaussian_stats: features must be float or double");
  if (n < 2 || d < 1)
    throw std::invalid_argument("gaussian_stats: need at least 2 samples of at least 1 feature, got " +
                                std::to_string(n) + " x " + std::to_string(d));
  using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::MatrixXd X = Eigen::Map<const RowMat>(features, n, d).template cast<double>();
  GaussianStats s;
  s.mu = X.colwise().mean().transpose();
  const Eigen::MatrixXd Xc = X.rowwise() - s.mu.transpose();
  // A rank update fills one triangle; mirroring it makes sigma exactly symmetric.
  s.sigma = Eigen::MatrixXd::Zero(d, d);
  s.sigma.selfadjointView<Eigen::Lower>().rankUpdate(Xc.transpose(), 1.0 / static_cast<double>(n - 1));
  s.sigma.triangularView<Eigen::StrictlyUpper>() = s.sigma.transpose();
  return s;
}

// Frechet distance between N(a.mu, a.sigma) and N(b.mu, b.sigma); see the top of this file.
DIFFUSE_IMPL_INLINE double frechet_distance(const GaussianStats& a, const GaussianStats& b);
// Statistics files as pytorch-fid writes them (np.savez_compressed(path, mu=..., sigma=...)).
DIFFUSE_IMPL_INLINE void save_gaussian_stats(const std::string& path, const GaussianStats& s);
DIFFUSE_IMPL_INLINE GaussianStats load_gaussian_stats(const std::string& path);

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(GaussianStats gaussian_stats<float>(const float* features, int64_t n, int64_t d))

#if DIFFUSE_DEFINE_IMPL
namespace detail {

// sum_i sqrt(lambda_i(S1^1/2 S2 S1^1/2)) = tr sqrtm(S1 S2) for symmetric PSD S1, S2.
DIFFUSE_IMPL_INLINE double trace_sqrt_product(const Eigen::MatrixXd& s1, const Eigen::MatrixXd& s2) {
  auto imaginary_check = [](const Eigen::VectorXd& ev, const char* what) {
    const double lmin = ev.minCoeff(), lmax = std::max(ev.maxCoeff(), 0.0);
    if (lmin < 0 && std::sqrt(-lmin) > 1e-3 * std::max(1.0, std::sqrt(lmax)))
      throw std::domain_error(std::string("frechet_distance: ") + what + " has eigenvalue " + std::to_string(lmin) +
                              " (largest " + std::to_string(lmax) +
                              "): an imaginary component in sqrtm; are the covariances positive semi-definite?");
  };
  const Eigen::MatrixXd a1 = 0.5 * (s1 + s1.transpose());
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> e1(a1);
  if (e1.info() != Eigen::Success) return std::numeric_limits<double>::quiet_NaN();
  imaginary_check(e1.eigenvalues(), "sigma1");
  const Eigen::VectorXd r = e1.eigenvalues().cwiseMax(0.0).cwiseSqrt();
  const Eigen::MatrixXd A = e1.eigenvectors() * r.asDiagonal() * e1.eigenvectors().transpose();
  Eigen::MatrixXd M = A * (0.5 * (s2 + s2.transpose())) * A;
  M = 0.5 * (M + M.transpose()).eval();
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> e2(M, Eigen::EigenvaluesOnly);
  if (e2.info() != Eigen::Success) return std::numeric_limits<double>::quiet_NaN();
  imaginary_check(e2.eigenvalues(), "sigma1^1/2 sigma2 sigma1^1/2");
  return e2.eigenvalues().cwiseMax(0.0).cwiseSqrt().sum();
}

}  // namespace detail

DIFFUSE_IMPL_INLINE double frechet_distance(const GaussianStats& a, const GaussianStats& b) {
  const int64_t d = a.mu.size();
  if (d == 0 || a.sigma.rows() != d || a.sigma.cols() != d || b.mu.size() != d || b.sigma.rows() != d ||
      b.sigma.cols() != d)
    throw std::invalid_argument("frechet_distance: statistics of different or inconsistent sizes (mu " +
                                std::to_string(a.mu.size()) + " and " + std::to_string(b.mu.size()) + ", sigma " +
                                std::to_string(a.sigma.rows()) + "x" + std::to_string(a.sigma.cols()) + " and " +
                                std::to_string(b.sigma.rows()) + "x" + std::to_string(b.sigma.cols()) + ")");
  const double base = (a.mu - b.mu).squaredNorm() + a.sigma.trace() + b.sigma.trace();
  double fd = base - 2.0 * detail::trace_sqrt_product(a.sigma, b.sigma);
  if (!std::isfinite(fd)) {  // pytorch-fid's guard for a singular product
    const double eps = 1e-6;
    const Eigen::MatrixXd off = eps * Eigen::MatrixXd::Identity(d, d);
    fd = base - 2.0 * detail::trace_sqrt_product(a.sigma + off, b.sigma + off);
    if (!std::isfinite(fd))
      throw std::domain_error("frechet_distance: not finite even with 1e-6 added to the diagonals "
                              "(NaN or Inf in the statistics?)");
  }
  return fd;
}

DIFFUSE_IMPL_INLINE void save_gaussian_stats(const std::string& path, const GaussianStats& s) {
  const int64_t d = s.mu.size();
  if (s.sigma.rows() != d || s.sigma.cols() != d)
    throw std::invalid_argument("save_gaussian_stats: " + path + ": mu and sigma sizes differ");
  const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> sr = s.sigma;
  npy::save_npz(path, {{"mu", npy::array(s.mu.data(), {d})}, {"sigma", npy::array(sr.data(), {d, d})}});
}

DIFFUSE_IMPL_INLINE GaussianStats load_gaussian_stats(const std::string& path) {
  const auto m = npy::load_npz(path);
  if (!m.count("mu") || !m.count("sigma"))
    throw std::runtime_error("load_gaussian_stats: " + path + ": needs arrays 'mu' and 'sigma'");
  const npy::Array &mu = m.at("mu"), &sg = m.at("sigma");
  if (mu.shape.size() != 1 || sg.shape.size() != 2 || sg.shape[0] != mu.shape[0] || sg.shape[1] != mu.shape[0])
    throw std::runtime_error("load_gaussian_stats: " + path + ": mu must be [d] and sigma [d, d]");
  const int64_t d = mu.shape[0];
  GaussianStats s;
  const std::vector<double> mv = mu.as<double>(), sv = sg.as<double>();
  s.mu = Eigen::Map<const Eigen::VectorXd>(mv.data(), d);
  s.sigma = Eigen::Map<const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(sv.data(), d, d);
  // Checked here, when the file is read, not minutes later when a distance is taken.
  for (int64_t i = 0; i < d; ++i)
    if (!std::isfinite(s.mu(i)))
      throw std::runtime_error("load_gaussian_stats: " + path + ": mu[" + std::to_string(i) + "] is not finite");
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j)
      if (!std::isfinite(s.sigma(i, j)))
        throw std::runtime_error("load_gaussian_stats: " + path + ": sigma[" + std::to_string(i) + ", " +
                                 std::to_string(j) + "] is not finite");
  for (int64_t i = 0; i < d; ++i)
    if (s.sigma(i, i) < 0)
      throw std::runtime_error("load_gaussian_stats: " + path + ": sigma[" + std::to_string(i) + ", " +
                               std::to_string(i) + "] is negative: not a covariance");
  return s;
}

#endif  // DIFFUSE_DEFINE_IMPL

}  // namespace diffuse
