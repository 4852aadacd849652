// Judging generated MNIST digits with a trained LeNet (models/lenet.hpp):
//
//   mnist_at_size(images, size, resize)    real 28x28 digits at the classifier's size, uint8
//   lenet_input(images, n, size)           uint8 [n, size, size] -> NHWC floats in [-1, 1]
//   lenet_run(net, images, n)              predicted classes and 128-d features, in batches
//   score_samples(net, images, n, size, labels, train, test)
//       predicted-class histogram, conditional accuracy (label = prediction) per digit,
//       FD-LeNet (Frechet distance of features, samples vs real test digits) and its
//       floor (the same statistic for real train digits, same N and class mix)
//   save_lenet / load_lenet                safetensors weights + metadata {size, resize, ...}
//
// Every image the classifier sees is uint8 at its own size: generated samples
// are uint8, so real digits are resized (area or bilinear, PyTorch's arithmetic)
// and rounded to uint8 too, and samples and references differ only in where
// they came from, not in their preprocessing.
//
// FD is biased by the sample count, so the floor uses the samples' N: a ratio
// FD / floor near 1 means "as close to the test digits as real digits are".
// The floor is itself a random draw: on data/mnist (lenet16, N = 2,000) it
// moved between 14.2 and 16.0 across class mixes, and 2,000 other random train
// digits scored as samples gave FD 17.3 (ratio 1.08 with labels, 1.15
// without), so ratios up to ~1.15 are within the noise of real data. Scoring
// the reference digits themselves gives FD 0 up to rounding (it can print as -0.0000).
#pragma once

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/core/autograd.hpp>
#include <diffuse/io/checkpoint.hpp>
#include <diffuse/eval/frechet.hpp>
#include <diffuse/io/idx.hpp>
#include <diffuse/models/lenet.hpp>
#include <diffuse/ops/loss.hpp>
#include <diffuse/data/resize.hpp>
#include <diffuse/io/safetensors.hpp>

namespace diffuse {

// The images of an MNIST split at size x size, uint8: resized from their own
// size with `resize` ("area" or "bilinear"), rounded to nearest; a copy when
// the size is already right.
inline std::vector<uint8_t> mnist_at_size(const IdxImages& im, int64_t size, const std::string& resize = "area") {
  if (resize != "area" && resize != "bilinear")
    throw std::invalid_argument("mnist_at_size: resize must be \"area\" or \"bilinear\", not \"" + resize + "\"");
  const int64_t n = static_cast<int64_t>(im.count), h = static_cast<int64_t>(im.rows), w = static_cast<int64_t>(im.cols);
  if (h == size && w == size) return im.pixels;
  std::vector<float> src(im.pixels.begin(), im.pixels.end()), dst(static_cast<size_t>(n * size * size));
  if (resize == "area")
    resize_area(src.data(), dst.data(), n, h, w, 1, size, size);
  else
    resize_bilinear(src.data(), dst.data(), n, h, w, 1, size, size);
  std::vector<uint8_t> out(dst.size());
  for (size_t i = 0; i < dst.size(); ++i) out[i] = static_cast<uint8_t>(std::clamp(std::lround(dst[i]), 0L, 255L));
  return out;
}

// uint8 images [n, size, size] -> [n, size, size, 1], pixel / 255 * 2 - 1.
inline Tensor<float> lenet_input(const uint8_t* images, int64_t n, int64_t size) {
  Tensor<float> x({n, size, size, 1});
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(images[i]) / 255.0f * 2.0f - 1.0f;
  return x;
}

struct LeNetOutputs {
  std::vector<int32_t> predicted;  // [n]
  std::vector<float> features;     // [n, hidden], row-major
  int64_t hidden = 0;
};

// Predictions and penultimate features of n uint8 images, without gradients, on the network's
// device, `batch` images at a time (bounded memory, same results as one big batch).
inline LeNetOutputs lenet_run(const LeNet<float>& net, const uint8_t* images, int64_t n, int64_t batch = 500) {
  NoGrad ng;
  const int64_t s = net.size();
  LeNetOutputs o;
  o.hidden = net.config().hidden;
  o.predicted.reserve(static_cast<size_t>(n));
  o.features.reserve(static_cast<size_t>(n * o.hidden));
  for (int64_t i = 0; i < n; i += batch) {
    const int64_t b = std::min(batch, n - i);
    const Var<float> f = net.features(Var<float>(lenet_input(images + i * s * s, b, s).to(net.device())));
    const std::vector<int32_t> p = argmax_rows(net.logits_from_features(f).value().cpu());
    o.predicted.insert(o.predicted.end(), p.begin(), p.end());
    const Tensor<float> fh = f.value().cpu();
    o.features.insert(o.features.end(), fh.begin(), fh.end());
  }
  return o;
}

struct ScoreOptions {
  std::string resize = "area";  // how real digits are brought to the classifier's size (as it was trained)
  uint64_t seed = 0;            // draw of the real train digits for the floor
  int64_t batch = 500;
};

struct SampleScore {
  int64_t n = 0;                       // samples scored
  std::vector<int64_t> predicted_hist;  // [classes]: how many samples the classifier puts in each class
  // With labels (NaN without): the fraction of samples classified as their
  // label, overall and per digit (NaN for a digit no sample asks for).
  double cond_accuracy = std::numeric_limits<double>::quiet_NaN();
  std::vector<double> per_class;
  std::vector<int64_t> per_class_count;  // samples with each label (zeros without labels)
  double fd = 0;                         // FD-LeNet: samples vs the reference test digits
  double fd_floor = 0;                   // real train digits (same N, same class mix) vs the same reference
  int64_t n_reference = 0;               // test digits in the reference
};

namespace detail {

// k distinct indices of `pool` (all of it shuffled when k = size), or k draws
// with replacement when the pool is smaller than k. Philox draws: the same
// picks on every platform.
inline std::vector<int64_t> lenet_pick(const std::vector<int64_t>& pool, int64_t k, Generator& g) {
  std::vector<int64_t> v = pool, out;
  const int64_t m = static_cast<int64_t>(v.size());
  if (m == 0 && k > 0) throw std::runtime_error("score_samples: no real images to draw from");
  if (k <= m) {
    for (int64_t i = 0; i < k; ++i) {  // partial Fisher-Yates
      uint32_t j;
      g.randint(&j, 1, static_cast<uint32_t>(m - i));
      std::swap(v[static_cast<size_t>(i)], v[static_cast<size_t>(i + j)]);
    }
    return {v.begin(), v.begin() + k};
  }
  out.resize(static_cast<size_t>(k));
  for (auto& o : out) {
    uint32_t j;
    g.randint(&j, 1, static_cast<uint32_t>(m));
    o = v[j];
  }
  return out;
}

inline std::vector<uint8_t> lenet_gather(const std::vector<uint8_t>& all, const std::vector<int64_t>& idx, int64_t px) {
  std::vector<uint8_t> out(idx.size() * static_cast<size_t>(px));
  for (size_t i = 0; i < idx.size(); ++i)
    std::copy_n(all.begin() + idx[i] * px, px, out.begin() + static_cast<std::ptrdiff_t>(i) * px);
  return out;
}

}  // namespace detail

// Scores n generated uint8 images [n, size, size] (size must be the
// classifier's). labels (may be null): the class each sample was asked for.
// The FD reference is every test digit whose label occurs in `labels` (the
// whole test split without labels); the floor draws n real train digits with
// the same per-class counts (uniformly without labels), without replacement
// where a class has enough.
inline SampleScore score_samples(const LeNet<float>& net, const uint8_t* images, int64_t n, int64_t size,
                                 const int64_t* labels, const MnistSplit& train, const MnistSplit& test,
                                 const ScoreOptions& opt = {}) {
  const int64_t K = net.config().classes, px = size * size;
  if (size != net.size())
    throw std::invalid_argument("score_samples: the samples are " + std::to_string(size) + "x" + std::to_string(size) +
                                " but the classifier takes " + std::to_string(net.size()) + "x" +
                                std::to_string(net.size()));
  if (n < 2) throw std::invalid_argument("score_samples: need at least 2 samples, got " + std::to_string(n));
  SampleScore r;
  r.n = n;
  r.predicted_hist.assign(static_cast<size_t>(K), 0);
  r.per_class.assign(static_cast<size_t>(K), std::numeric_limits<double>::quiet_NaN());
  r.per_class_count.assign(static_cast<size_t>(K), 0);
  std::vector<int64_t> correct(static_cast<size_t>(K), 0);
  if (labels)
    for (int64_t i = 0; i < n; ++i)
      if (labels[i] < 0 || labels[i] >= K)
        throw std::invalid_argument("score_samples: label " + std::to_string(labels[i]) + " of sample " +
                                    std::to_string(i) + " is not a class 0-" + std::to_string(K - 1));

  const LeNetOutputs s = lenet_run(net, images, n, opt.batch);
  for (int64_t i = 0; i < n; ++i) {
    ++r.predicted_hist[static_cast<size_t>(s.predicted[i])];
    if (labels) {
      ++r.per_class_count[static_cast<size_t>(labels[i])];
      if (s.predicted[i] == labels[i]) ++correct[static_cast<size_t>(labels[i])];
    }
  }
  if (labels) {
    int64_t c = 0;
    for (int64_t k = 0; k < K; ++k) {
      c += correct[k];
      if (r.per_class_count[k]) r.per_class[k] = static_cast<double>(correct[k]) / static_cast<double>(r.per_class_count[k]);
    }
    r.cond_accuracy = static_cast<double>(c) / static_cast<double>(n);
  }

  // Reference: test digits of the classes asked for.
  const std::vector<uint8_t> test_px = mnist_at_size(test.images, size, opt.resize);
  std::vector<int64_t> ref_idx;
  for (size_t i = 0; i < test.labels.labels.size(); ++i)
    if (!labels || (test.labels.labels[i] < K && r.per_class_count[test.labels.labels[i]] > 0)) ref_idx.push_back(static_cast<int64_t>(i));
  if (ref_idx.size() < 2) throw std::runtime_error("score_samples: fewer than 2 test digits of the classes asked for");
  r.n_reference = static_cast<int64_t>(ref_idx.size());
  const LeNetOutputs ref = lenet_run(net, detail::lenet_gather(test_px, ref_idx, px).data(), r.n_reference, opt.batch);
  const GaussianStats ref_stats = gaussian_stats(ref.features.data(), r.n_reference, ref.hidden);
  r.fd = frechet_distance(gaussian_stats(s.features.data(), n, s.hidden), ref_stats);

  // Floor: n real train digits, the same class mix.
  const std::vector<uint8_t> train_px = mnist_at_size(train.images, size, opt.resize);
  Generator g(opt.seed, uint64_t(7) << 40);
  std::vector<int64_t> floor_idx;
  if (labels) {
    for (int64_t k = 0; k < K; ++k) {
      if (!r.per_class_count[k]) continue;
      std::vector<int64_t> pool;
      for (size_t i = 0; i < train.labels.labels.size(); ++i)
        if (train.labels.labels[i] == k) pool.push_back(static_cast<int64_t>(i));
      const auto p = detail::lenet_pick(pool, r.per_class_count[k], g);
      floor_idx.insert(floor_idx.end(), p.begin(), p.end());
    }
  } else {
    std::vector<int64_t> pool(train.labels.labels.size());
    for (size_t i = 0; i < pool.size(); ++i) pool[i] = static_cast<int64_t>(i);
    floor_idx = detail::lenet_pick(pool, n, g);
  }
  const LeNetOutputs fl = lenet_run(net, detail::lenet_gather(train_px, floor_idx, px).data(), n, opt.batch);
  r.fd_floor = frechet_distance(gaussian_stats(fl.features.data(), n, fl.hidden), ref_stats);
  return r;
}

// ---------------------------------------------------------------- files
inline constexpr const char* kLeNetModel = "diffuse.lenet.v1";

// Weights (names as in models/lenet.hpp) and metadata: model, size, widths,
// resize, test_accuracy, plus `extra`.
inline void save_lenet(const std::string& path, const LeNet<float>& net, const std::string& resize,
                       double test_accuracy, safetensors::Metadata extra = {}) {
  const LeNetConfig& c = net.config();
  extra["model"] = kLeNetModel;
  extra["size"] = std::to_string(c.size);
  extra["c1"] = std::to_string(c.c1);
  extra["c2"] = std::to_string(c.c2);
  extra["hidden"] = std::to_string(c.hidden);
  extra["classes"] = std::to_string(c.classes);
  extra["resize"] = resize;
  char acc[32];
  std::snprintf(acc, sizeof acc, "%.6f", test_accuracy);
  extra["test_accuracy"] = acc;
  save_checkpoint<float>(path, net, nullptr, nullptr, 0, Generator(0), extra);
}

struct LeNetFile {
  std::unique_ptr<LeNet<float>> net;
  std::string resize = "area";
  double test_accuracy = std::numeric_limits<double>::quiet_NaN();
  safetensors::Metadata metadata;
};

// A classifier written by save_lenet (examples/mnist_classifier train).
inline LeNetFile load_lenet(const std::string& path) {
  const safetensors::File f = safetensors::File::read(path);
  const auto& m = f.metadata();
  auto it = m.find("model");
  if (it == m.end() || it->second != kLeNetModel)
    throw std::runtime_error("load_lenet: '" + path + "' is not a LeNet classifier (metadata model is '" +
                             (it == m.end() ? std::string("missing") : it->second) + "', expected " + kLeNetModel + ")");
  auto num = [&](const char* key) { return safetensors::metadata_number<int64_t>(m, key, "classifier '" + path + "'"); };
  LeNetConfig c;
  c.size = num("size");
  c.c1 = num("c1");
  c.c2 = num("c2");
  c.hidden = num("hidden");
  c.classes = num("classes");
  // The network the metadata describes must fit in the file: a claim of a huge one is refused
  // before it is allocated (the weights are then checked tensor by tensor).
  double held = 0;
  for (const std::string& n : f.names()) {
    double e = 1;
    for (int64_t d : f.at(n).shape) e *= static_cast<double>(d);
    held += e;
  }
  if (c.size >= 4 && c.c1 >= 1 && c.c2 >= 1 && c.hidden >= 1 && c.classes >= 1 && c.parameters() > held)
    throw std::runtime_error("load_lenet: '" + path + "': its metadata describes a LeNet of " +
                             std::to_string(static_cast<long long>(c.parameters())) + " parameters, the file holds " +
                             std::to_string(static_cast<long long>(held)) + " values");
  LeNetFile r;
  Generator g(0);
  r.net = std::make_unique<LeNet<float>>(c, g);
  load_weights(f, *r.net);
  r.metadata = m;
  if (m.count("resize")) r.resize = m.at("resize");
  if (m.count("test_accuracy")) {  // all of it a number (std::stod read "0.9abc" as 0.9)
    const std::string& v = m.at("test_accuracy");
    const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), r.test_accuracy);
    if (v.empty() || ec != std::errc() || end != v.data() + v.size() || !(r.test_accuracy >= 0 && r.test_accuracy <= 1))
      throw std::runtime_error("load_lenet: '" + path + "': metadata 'test_accuracy' is '" + v +
                               "', not a number from 0 to 1");
  }
  return r;
}

}  // namespace diffuse
