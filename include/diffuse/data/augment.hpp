// Data augmentation as a BatchSource around another one. RandomHorizontalFlip mirrors each NHWC
// image of a batch left to right with probability 1/2 (torchvision's RandomHorizontalFlip, as
// the DDPM paper trains on CIFAR-10). The choices are drawn from the training stream after the
// batch, so they are part of what a checkpoint resumes: a resumed run flips the same images.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/core/rng.hpp>
#include <diffuse/data/dataset.hpp>

namespace diffuse {

// Mirrors image b of x [B, H, W, C] (NHWC) in place where flip[b] is true.
template <class T>
void flip_horizontal(Tensor<T>& x, const std::vector<uint8_t>& flip) {
  if (x.dim() != 4 || x.device() != Device::CPU || static_cast<int64_t>(flip.size()) != x.size(0))
    throw std::invalid_argument("diffuse: flip_horizontal needs a CPU [B, H, W, C] batch and B choices, got " +
                                shape_str(x.shape()) + " and " + std::to_string(flip.size()));
  const int64_t H = x.size(1), W = x.size(2), C = x.size(3);
  for (int64_t b = 0; b < x.size(0); ++b) {
    if (!flip[static_cast<size_t>(b)]) continue;
    for (int64_t h = 0; h < H; ++h) {
      T* row = x.data() + ((b * H + h) * W) * C;
      for (int64_t l = 0, r = W - 1; l < r; ++l, --r) std::swap_ranges(row + l * C, row + (l + 1) * C, row + r * C);
    }
  }
}

template <class T>
class RandomHorizontalFlip : public BatchSource<T> {
 public:
  explicit RandomHorizontalFlip(BatchSource<T>& inner) : inner_(inner) {}
  void next(int64_t B, Generator& g, Batch<T>& out) override {
    inner_.next(B, g, out);
    flip_.resize(static_cast<size_t>(B));
    g.randint(flip_.data(), flip_.size(), 2);
    flip_horizontal(out.x0, flip_);
  }
  bool has_labels() const override { return inner_.has_labels(); }
  SourceState state() const override { return inner_.state(); }
  void set_state(const SourceState& s) override { inner_.set_state(s); }
  std::string describe() const override { return inner_.describe() + ", random horizontal flips"; }
  // The choices of the last batch (1: mirrored).
  const std::vector<uint8_t>& last_flips() const { return flip_; }

 private:
  BatchSource<T>& inner_;
  std::vector<uint8_t> flip_;
};

}  // namespace diffuse
