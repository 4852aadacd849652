// Sample quality for 2-D point clouds: the energy distance (Szekely & Rizzo).
//
//   ED(P, Q) = 2 E|X - Y| - E|X - X'| - E|Y - Y'|,   X, X' ~ P,  Y, Y' ~ Q,
//
// |.| the Euclidean norm. It is 0 iff P = Q and needs no bandwidth or binning.
// For samples a (na points) and b (nb points) we use the V-statistic, i.e. the
// energy distance between the two empirical distributions:
//
//   ED = 2/(na nb) sum_ij |a_i - b_j| - 1/na^2 sum_ij |a_i - a_j| - 1/nb^2 sum_ij |b_i - b_j|
//
// (the i = j terms, which are 0, are included in the within-set means). So
// ED >= 0 always, ED(a, a) = 0, and for two independent samples of the same
// distribution it is small but positive, of order E|X - X'| / n. Compare
// values only at equal sample sizes.
//
// Cost O(na nb + na^2 + nb^2) in double; rows are spread over the threads
// and each row sum is summed serially afterwards, so the result does not
// depend on the thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <stdexcept>
#include <vector>

#include <diffuse/core/parallel.hpp>

namespace diffuse::metrics {

namespace detail {

// Mean pairwise distance between the point sets (ax, ay) and (bx, by). With
// same == true the sets are the same and only j > i is visited (then doubled).
inline double mean_pair_distance(const std::vector<double>& ax, const std::vector<double>& ay,
                                 const std::vector<double>& bx, const std::vector<double>& by, bool same) {
  const long na = static_cast<long>(ax.size());
  const long nb = static_cast<long>(bx.size());
  std::vector<double> row(static_cast<size_t>(na), 0.0);
  const auto row_sum = [&](long i) {
    const double x = ax[static_cast<size_t>(i)], y = ay[static_cast<size_t>(i)];
    double s = 0.0;
    for (long j = same ? i + 1 : 0; j < nb; ++j) {
      const double dx = x - bx[static_cast<size_t>(j)], dy = y - by[static_cast<size_t>(j)];
      s += std::sqrt(dx * dx + dy * dy);
    }
    row[static_cast<size_t>(i)] = s;
  };
  // Triangular rows are uneven: chunks of 32 rows, handed out on demand, keep every thread busy.
  const int64_t chunks = (na + 31) / 32;
  DynamicCounter next(chunks);
  parallel_region(loop_threads(chunks, true), [&](int, int) {
    for (int64_t c; (c = next.next()) >= 0;)
      for (long i = static_cast<long>(c * 32); i < std::min<long>(na, static_cast<long>(c * 32 + 32)); ++i) row_sum(i);
  });
  double total = 0.0;
  for (double s : row) total += s;
  if (same) total *= 2.0;
  return total / (static_cast<double>(na) * static_cast<double>(nb));
}

inline void split_xy(const float* p, size_t n, std::vector<double>& x, std::vector<double>& y) {
  x.resize(n);
  y.resize(n);
  for (size_t i = 0; i < n; ++i) {
    x[i] = p[2 * i];
    y[i] = p[2 * i + 1];
  }
}

}  // namespace detail

// a: na points as x0,y0,x1,y1,...; b likewise. See the header comment.
inline double energy_distance(const float* a, size_t na, const float* b, size_t nb) {
  if (na == 0 || nb == 0) throw std::invalid_argument("energy_distance: empty point set");
  std::vector<double> ax, ay, bx, by;  // split once: contiguous, converted to double
  detail::split_xy(a, na, ax, ay);
  detail::split_xy(b, nb, bx, by);
  const double ab = detail::mean_pair_distance(ax, ay, bx, by, false);
  const double aa = detail::mean_pair_distance(ax, ay, ax, ay, true);
  const double bb = detail::mean_pair_distance(bx, by, bx, by, true);
  // Non-negative in exact arithmetic; clamp the rounding residue of ED(a, a).
  return std::max(0.0, 2.0 * ab - aa - bb);
}

inline double energy_distance(const std::vector<float>& a, const std::vector<float>& b) {
  return energy_distance(a.data(), a.size() / 2, b.data(), b.size() / 2);
}

}  // namespace diffuse::metrics
