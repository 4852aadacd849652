// train_log.csv: one row per logged step with fixed columns (step first), empty cells for figures
// not measured at that step (an evaluation between log lines). A resumed run keeps the rows up
// to the step it resumes from and drops the rest (they belong to the run that was cut short),
// so the file always describes one training history.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/core/config.hpp>
#include <diffuse/io/atomic_file.hpp>

namespace diffuse {

class CsvLog {
 public:
  CsvLog() = default;
  // columns: after "step". resume_step < 0: a fresh log (an old file is replaced).
  CsvLog(std::string path, std::vector<std::string> columns, int64_t resume_step);
  CsvLog(const CsvLog&) = delete;
  CsvLog& operator=(const CsvLog&) = delete;
  CsvLog(CsvLog&& o) noexcept { *this = std::move(o); }
  CsvLog& operator=(CsvLog&& o) noexcept {
    std::swap(path_, o.path_), std::swap(columns_, o.columns_), std::swap(f_, o.f_);
    return *this;
  }
  ~CsvLog() {
    if (f_) std::fclose(f_);
  }

  const std::string& path() const { return path_; }
  // One row; values by column name (unknown names are an error: a typo would lose a figure).
  void row(int64_t step, const std::map<std::string, double>& values);

 private:
  std::string path_;
  std::vector<std::string> columns_;
  FILE* f_ = nullptr;
};

#if DIFFUSE_DEFINE_IMPL
DIFFUSE_IMPL_INLINE CsvLog::CsvLog(std::string path, std::vector<std::string> columns, int64_t resume_step)
    : path_(std::move(path)) {
  columns_.push_back("step");
  columns_.insert(columns_.end(), columns.begin(), columns.end());
  std::string header;
  for (size_t i = 0; i < columns_.size(); ++i) header += (i ? "," : "") + columns_[i];
  std::vector<std::string> kept{header};
  namespace fs = std::filesystem;
  if (resume_step >= 0 && fs::exists(path_)) {
    std::ifstream in(path_);
    std::string first, l;
    std::getline(in, first);
    if (first == header) {
      while (std::getline(in, l)) {
        if (l.empty()) continue;
        int64_t s = 0;
        try { s = std::stoll(l.substr(0, l.find(','))); } catch (...) { continue; }
        if (s <= resume_step) kept.push_back(l);
      }
    } else {
      // Other columns (other evaluations): keep the old log beside the new one.
      const std::string old = path_ + ".old";
      fs::rename(path_, old);
      std::fprintf(stderr, "diffuse: %s had other columns; kept as %s\n", path_.c_str(), old.c_str());
    }
  }
  std::string text;
  for (const auto& l : kept) text += l + '\n';
  write_file_atomically(path_, text);  // the kept rows, whole or not at all
  f_ = std::fopen(path_.c_str(), "a");
  if (!f_) throw std::runtime_error("diffuse: cannot append to '" + path_ + "'");
}

DIFFUSE_IMPL_INLINE void CsvLog::row(int64_t step, const std::map<std::string, double>& values) {
  if (!f_) return;
  size_t used = 0;
  std::string line = std::to_string(step);
  for (size_t i = 1; i < columns_.size(); ++i) {
    line += ',';
    auto it = values.find(columns_[i]);
    if (it == values.end()) continue;
    ++used;
    char b[32];
    std::snprintf(b, sizeof b, "%.9g", it->second);
    line += b;
  }
  if (used != values.size()) throw std::invalid_argument("diffuse: a log row has a figure that is not a column of " + path_);
  // Checked: a full disk stops the run with the file's name and the reason, rather than a log
  // that silently ends (or a row cut in half) while training goes on.
  const int wrote = std::fprintf(f_, "%s\n", line.c_str());
  if (wrote < 0 || std::fflush(f_) != 0) {
    const int err = errno ? errno : EIO;
    std::clearerr(f_);
    throw std::runtime_error("diffuse: cannot append to '" + path_ + "': " + std::strerror(err));
  }
}
#endif  // DIFFUSE_DEFINE_IMPL

}  // namespace diffuse
