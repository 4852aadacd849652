// Time per kind of device op, for finding where a train step's time goes without a profiler tool.
//
//   diffuse::cuda::OpProfiler prof;     // the CUDA backend owns one (CudaBackend::set_profiling)
//   { ProfileScope s(&prof, "gemm"); ... }   // a scope around each backend entry
//   ... steps ...
//   prof.table(steps);                  // waits for the device; a table of ms per step by entry
//
// Under nvcc each scope records a pair of CUDA events in the stream (no synchronisation, so the
// step's overlap of host and device is kept); the events are read when the table is printed. In
// the CPU emulation (g++) the scopes time the host, which runs the kernels synchronously.
// Scopes do not nest: an op's own kernels are inside one scope.
#pragma once

#include <diffuse/backend/cuda/check.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::cuda {

class OpProfiler {
 public:
  OpProfiler() = default;
  OpProfiler(const OpProfiler&) = delete;
  OpProfiler& operator=(const OpProfiler&) = delete;
  ~OpProfiler() {
#ifdef __CUDACC__
    for (auto& [a, b] : events_) cudaEventDestroy(a), cudaEventDestroy(b);
#endif
  }

  void begin(const char* name) {
    names_.emplace_back(name);
#ifdef __CUDACC__
    if (names_.size() > events_.size()) {
      cudaEvent_t a, b;
      DIFFUSE_CUDA_CHECK(cudaEventCreate(&a));
      DIFFUSE_CUDA_CHECK(cudaEventCreate(&b));
      events_.emplace_back(a, b);
    }
    DIFFUSE_CUDA_CHECK(cudaEventRecord(events_[names_.size() - 1].first, nullptr));
#else
    start_ = std::chrono::steady_clock::now();
#endif
  }
  void end() {
#ifdef __CUDACC__
    DIFFUSE_CUDA_CHECK(cudaEventRecord(events_[names_.size() - 1].second, nullptr));
#else
    host_ms_.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_).count());
#endif
  }

  // Milliseconds by op kind since the last collect() (waits for the device), added to the totals.
  void collect() {
#ifdef __CUDACC__
    if (!names_.empty()) DIFFUSE_CUDA_CHECK(cudaEventSynchronize(events_[names_.size() - 1].second));
#endif
    for (std::size_t i = 0; i < names_.size(); ++i) {
#ifdef __CUDACC__
      float ms = 0;
      DIFFUSE_CUDA_CHECK(cudaEventElapsedTime(&ms, events_[i].first, events_[i].second));
#else
      const double ms = host_ms_[i];
#endif
      Total& t = totals_[names_[i]];
      t.ms += ms;
      ++t.calls;
    }
    names_.clear();
    host_ms_.clear();
  }

  struct Total {
    double ms = 0;
    std::int64_t calls = 0;
  };
  const std::map<std::string, Total>& totals() {
    collect();
    return totals_;
  }
  void reset() {
    collect();
    totals_.clear();
  }

  // A table, largest first: ms per step (totals / steps), calls per step, share of the sum.
  std::string table(std::int64_t steps) {
    collect();
    std::vector<std::pair<std::string, Total>> rows(totals_.begin(), totals_.end());
    std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.ms > b.second.ms; });
    double sum = 0;
    for (const auto& r : rows) sum += r.second.ms;
    const double n = static_cast<double>(std::max<std::int64_t>(steps, 1));
    std::string out;
    char line[160];
    std::snprintf(line, sizeof line, "%-28s %10s %8s %7s\n", "op", "ms/step", "calls", "share");
    out += line;
    for (const auto& [name, t] : rows) {
      std::snprintf(line, sizeof line, "%-28s %10.3f %8.1f %6.1f%%\n", name.c_str(), t.ms / n,
                    static_cast<double>(t.calls) / n, sum > 0 ? 100.0 * t.ms / sum : 0.0);
      out += line;
    }
    std::snprintf(line, sizeof line, "%-28s %10.3f\n", "sum of ops", sum / n);
    return out + line;
  }
  void print(std::FILE* f, std::int64_t steps) { std::fputs(table(steps).c_str(), f); }

 private:
  std::vector<std::string> names_;  // the scopes since the last collect, in order
#ifdef __CUDACC__
  std::vector<std::pair<cudaEvent_t, cudaEvent_t>> events_;  // a pool, reused after each collect
#endif
  std::vector<double> host_ms_;
  std::chrono::steady_clock::time_point start_{};
  std::map<std::string, Total> totals_;
};

// Opens a scope on p (a null profiler: nothing) for the lifetime of the object.
class ProfileScope {
 public:
  ProfileScope(OpProfiler* p, const char* name) : p_(p) {
    if (p_) p_->begin(name);
  }
  ~ProfileScope() {
    if (p_) p_->end();
  }
  ProfileScope(const ProfileScope&) = delete;
  ProfileScope& operator=(const ProfileScope&) = delete;

 private:
  OpProfiler* p_;
};

}  // namespace diffuse::cuda
