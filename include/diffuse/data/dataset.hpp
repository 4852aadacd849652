// Where the training loop's batches come from: a BatchSource fills a batch of clean examples x0
// (and their class labels, if any) on the CPU. TensorDataset holds N examples in a tensor and
// draws them either with replacement (a uniform index per example from the training stream, as
// the report's trainers did) or in epochs (a seeded permutation per epoch: every example once
// per epoch; the position is saved in checkpoints so a resumed run continues the same order).
// GeneratedSource calls a function (data drawn fresh from a distribution, e.g. 2-D point clouds).
#pragma once

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <diffuse/core/rng.hpp>
#include <diffuse/core/tensor.hpp>

namespace diffuse {

template <class T>
struct Batch {
  Tensor<T> x0;                 // [B, ...example shape], CPU
  std::vector<int32_t> labels;  // B class labels, or empty (unconditional data)
};

// State that a source keeps across steps, as strings in a checkpoint's metadata.
using SourceState = std::map<std::string, std::string>;

template <class T>
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  // Fills `out` with B examples; `g` is the training stream (the loop draws the noise from it next).
  // With data parallelism g is this rank's share of the stream (g.part of g.parts, core/rng.hpp):
  // a source then gives this rank's B of the B * parts examples one process would get, and moves
  // past all of them. Draws from g do that by themselves; other orders must (TensorDataset's epochs).
  virtual void next(int64_t B, Generator& g, Batch<T>& out) = 0;
  virtual bool has_labels() const { return false; }
  virtual SourceState state() const { return {}; }
  virtual void set_state(const SourceState&) {}
  virtual std::string describe() const = 0;
};

enum class DataOrder {
  with_replacement,  // each example drawn uniformly from the training stream
  epochs,            // a seeded permutation per epoch, each example once per epoch
};

template <class T>
class TensorDataset : public BatchSource<T> {
 public:
  // data: [N, ...] on the CPU; labels: N labels or empty; seed: the epoch permutations'.
  TensorDataset(Tensor<T> data, std::vector<int32_t> labels = {}, DataOrder order = DataOrder::with_replacement,
                uint64_t seed = 0)
      : data_(std::move(data)), labels_(std::move(labels)), order_(order), seed_(seed) {
    if (data_.dim() < 1 || data_.size(0) < 1)
      throw std::invalid_argument("diffuse: a dataset needs at least one example, got shape " + shape_str(data_.shape()));
    if (data_.device() != Device::CPU) throw std::invalid_argument("diffuse: a TensorDataset's data must be on the CPU");
    if (!labels_.empty() && static_cast<int64_t>(labels_.size()) != data_.size(0))
      throw std::invalid_argument("diffuse: " + std::to_string(labels_.size()) + " labels for " +
                                  std::to_string(data_.size(0)) + " examples");
    if (data_.size(0) > int64_t(UINT32_MAX)) throw std::invalid_argument("diffuse: a dataset holds at most 2^32-1 examples");
  }

  int64_t size() const { return data_.size(0); }
  bool has_labels() const override { return !labels_.empty(); }
  int64_t epoch() const { return epoch_; }
  int64_t position() const { return pos_; }

  void next(int64_t B, Generator& g, Batch<T>& out) override {
    const int64_t N = size(), row = data_.numel() / N;
    Shape s = data_.shape();
    s[0] = B;
    if (out.x0.shape() != s) out.x0 = Tensor<T>(s);
    out.labels.resize(labels_.empty() ? 0 : static_cast<size_t>(B));
    idx_.resize(static_cast<size_t>(B));
    if (order_ == DataOrder::with_replacement) {
      g.randint(idx_.data(), idx_.size(), static_cast<uint32_t>(N));
    } else {
      // A generator shared by data-parallel ranks (core/rng.hpp): the batch of the one process is
      // B * parts examples, this rank's share the part-th B of them; every rank moves past all.
      skip(B * g.part);
      for (auto& i : idx_) {
        if (perm_.empty() || pos_ == N) {
          if (pos_ == N) ++epoch_, pos_ = 0;
          perm_ = permutation(epoch_);
        }
        i = perm_[static_cast<size_t>(pos_++)];
      }
      skip(B * (g.parts - 1 - g.part));
    }
    for (int64_t b = 0; b < B; ++b) {
      const int64_t i = idx_[static_cast<size_t>(b)];
      std::copy(data_.data() + i * row, data_.data() + (i + 1) * row, out.x0.data() + b * row);
      if (!labels_.empty()) out.labels[static_cast<size_t>(b)] = labels_[static_cast<size_t>(i)];
    }
  }

  SourceState state() const override {
    if (order_ != DataOrder::epochs) return {};
    return {{"data.order", "epochs"}, {"data.seed", std::to_string(seed_)}, {"data.epoch", std::to_string(epoch_)},
            {"data.position", std::to_string(pos_)}};
  }
  void set_state(const SourceState& st) override {
    if (order_ != DataOrder::epochs) return;
    auto get = [&](const char* k) -> const std::string& {
      auto it = st.find(k);
      if (it == st.end()) throw std::runtime_error(std::string("diffuse: checkpoint has no '") + k + "' for the epoch order");
      return it->second;
    };
    // All of the value as a whole number ("12abc" is refused, where std::stoll read 12).
    auto number = [&](const char* k, auto& out) {
      const std::string& v = get(k);
      const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
      if (v.empty() || ec != std::errc() || end != v.data() + v.size())
        throw std::runtime_error(std::string("diffuse: checkpoint's '") + k + "' is '" + v + "', not a whole number");
    };
    uint64_t seed = 0;
    number("data.seed", seed);
    if (seed != seed_)
      throw std::runtime_error("diffuse: checkpoint's data order was seeded with " + get("data.seed") + ", this run with " +
                               std::to_string(seed_));
    number("data.epoch", epoch_);
    number("data.position", pos_);
    if (epoch_ < 0) throw std::runtime_error("diffuse: checkpoint's data epoch is negative");
    if (pos_ < 0 || pos_ > size()) throw std::runtime_error("diffuse: checkpoint's data position is outside the data set");
    perm_ = permutation(epoch_);
  }
  std::string describe() const override {
    return std::to_string(size()) + " examples" + (has_labels() ? " with labels" : "") +
           (order_ == DataOrder::epochs ? ", in epochs" : ", drawn with replacement");
  }

  // The order of epoch e: Fisher-Yates from its own counter-based stream (seed, e), so any
  // epoch's order is known without replaying the earlier ones.
  std::vector<uint32_t> permutation(int64_t e) const {
    const int64_t N = size();
    std::vector<uint32_t> p(static_cast<size_t>(N));
    for (int64_t i = 0; i < N; ++i) p[static_cast<size_t>(i)] = static_cast<uint32_t>(i);
    Generator g(seed_ ^ 0x9e3779b97f4a7c15ULL, static_cast<uint64_t>(e) << 32);
    for (int64_t i = N - 1; i > 0; --i) {
      uint32_t j;
      g.randint(&j, 1, static_cast<uint32_t>(i + 1));
      std::swap(p[static_cast<size_t>(i)], p[j]);
    }
    return p;
  }

 private:
  // Moves k places along the epoch order (as drawing k examples would).
  void skip(int64_t k) {
    const int64_t N = size();
    while (k > 0) {
      if (pos_ == N) ++epoch_, pos_ = 0, perm_.clear();
      const int64_t s = std::min(k, N - pos_);
      pos_ += s, k -= s;
    }
  }

  Tensor<T> data_;
  std::vector<int32_t> labels_;
  DataOrder order_;
  uint64_t seed_;
  int64_t epoch_ = 0, pos_ = 0;
  std::vector<uint32_t> perm_, idx_;
};

// Batches from a function fill(g, B, x0) that draws B fresh examples (and labels, if it has them).
template <class T>
class GeneratedSource : public BatchSource<T> {
 public:
  using Fill = std::function<void(Generator& g, int64_t B, Batch<T>& out)>;
  // example: the shape of one example, e.g. {2} for a 2-D point.
  GeneratedSource(Shape example, Fill fill, std::string name = "generated", bool labels = false)
      : example_(std::move(example)), fill_(std::move(fill)), name_(std::move(name)), labels_(labels) {}
  void next(int64_t B, Generator& g, Batch<T>& out) override {
    Shape s{B};
    s.insert(s.end(), example_.begin(), example_.end());
    if (out.x0.shape() != s) out.x0 = Tensor<T>(s);
    fill_(g, B, out);
  }
  bool has_labels() const override { return labels_; }
  std::string describe() const override { return name_; }

 private:
  Shape example_;
  Fill fill_;
  std::string name_;
  bool labels_;
};

}  // namespace diffuse
