// FID as pytorch-fid computes it (mseitzer/pytorch-fid, the numbers papers
// quote): its InceptionV3 (models/inception_fid.hpp), its preprocessing, its
// statistics and distance (frechet.hpp).
//
//   load_fid_weights(path, net)      pytorch-fid's state dict converted to safetensors
//                                    (scripts/fid_weights_to_safetensors.py), every name,
//                                    shape and value (finite) checked
//   fid_preprocess(images)           uint8 NHWC -> float [N, 299, 299, 3] in [-1, 1]
//   fid_features(net, images, ...)   [N, 2048] pool features, in batches, with progress
//   fid_statistics(features)         mean and N-1 covariance in double (gaussian_stats)
//   fid_of(net, images, reference)   the FID of uint8 images against reference statistics
//
// Image sets are data/image_set.hpp's (uint8 NHWC, C = 1 or 3): load_image_folder
// (data/image_folder.hpp) and load_image_npy read the fid tool's inputs.
//
// Preprocessing, as pytorch-fid's dataset and InceptionV3.forward: PIL's
// convert("RGB") (grayscale replicated to three channels, alpha dropped),
// ToTensor (uint8 / 255 in float), F.interpolate to 299x299 bilinear with
// align_corners=False and no antialias, then 2x - 1. Other FID codes (the
// TensorFlow original, torch-fidelity, clean-fid) scale with (x - 128) / 128
// and resize differently; their numbers are not comparable with these.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/core/autograd.hpp>
#include <diffuse/eval/frechet.hpp>
#include <diffuse/models/inception_fid.hpp>
#include <diffuse/data/image_set.hpp>
#include <diffuse/data/resize.hpp>
#include <diffuse/io/safetensors.hpp>

namespace diffuse {

// Loads pytorch-fid's weights into `net`. Every parameter and running
// statistic must be present with its shape; the file's classifier ("fc.*",
// unused by FID) and BatchNorm's "num_batches_tracked" are ignored; any other
// tensor is an error (a different network's file). Errors name the first
// offending tensor.
inline void load_fid_weights(const std::string& path, FidInceptionV3<float>& net) {
  const safetensors::File f = safetensors::File::read(path);
  std::set<std::string> expected;
  for (auto& [name, p] : net.named_state()) {
    expected.insert(name);
    const Shape want = torch_shape(p.shape(), p.layout());  // the file's (PyTorch's) layout
    if (!f.contains(name))
      throw std::runtime_error("fid weights '" + path + "': missing tensor '" + name + "' " + shape_str(want) +
                               " (is this pytorch-fid's pt_inception-2015-12-05 converted by "
                               "scripts/fid_weights_to_safetensors.py?)");
    const safetensors::View& v = f.at(name);
    if (v.shape != want)
      throw std::runtime_error("fid weights '" + path + "': tensor '" + name + "' has shape " + shape_str(v.shape) +
                               ", expected " + shape_str(want));
    Tensor<float> host(want);
    f.copy_converted(v, name, host.data());
    for (int64_t i = 0; i < host.numel(); ++i)  // a NaN would surface as a NaN FID, after minutes of features
      if (!std::isfinite(host.data()[i]))
        throw std::runtime_error("fid weights '" + path + "': tensor '" + name + "' has a non-finite value at element " +
                                 std::to_string(i));
    p.node()->value.copy_from(from_torch_layout(host, p.layout()));
  }
  for (const std::string& n : f.names()) {
    const bool ignored = n.rfind("fc.", 0) == 0 ||
                         (n.size() > 20 && n.compare(n.size() - 20, 20, ".num_batches_tracked") == 0);
    if (!expected.count(n) && !ignored)
      throw std::runtime_error("fid weights '" + path + "': unexpected tensor '" + n +
                               "' (not part of pytorch-fid's InceptionV3)");
  }
}

// uint8 NHWC (C = 1 or 3) -> float NHWC [n, 299, 299, 3] in [-1, 1].
inline Tensor<float> fid_preprocess(const uint8_t* pixels, int64_t n, int64_t h, int64_t w, int64_t c) {
  if (c != 1 && c != 3)
    throw std::invalid_argument("fid_preprocess: images must have 1 or 3 channels, got " + std::to_string(c));
  if (n < 1 || h < 1 || w < 1) throw std::invalid_argument("fid_preprocess: empty image batch");
  Tensor<float> x({n, h, w, 3});
  float* xd = x.data();
  const int64_t pix = n * h * w;
  for (int64_t p = 0; p < pix; ++p)
    for (int64_t ch = 0; ch < 3; ++ch)
      xd[p * 3 + ch] = static_cast<float>(pixels[p * c + (c == 3 ? ch : 0)]) / 255.0f;  // ToTensor divides
  constexpr int64_t S = FidInceptionV3<float>::kInputSize;
  Tensor<float> y = resize_bilinear(x, S, S);
  for (float& v : y) v = 2.0f * v - 1.0f;
  return y;
}

// Progress of feature extraction: images done, total, seconds elapsed.
using FidProgress = std::function<void(int64_t done, int64_t total, double seconds)>;

// Inception pool features of all images, `batch` at a time, on the network's device (each batch
// is preprocessed on the CPU, then moved there): [n, 2048] row-major floats.
inline std::vector<float> fid_features(const FidInceptionV3<float>& net, const ImageSet& im, int64_t batch,
                                       const FidProgress& progress = {}) {
  if (batch < 1) throw std::invalid_argument("fid_features: batch must be positive");
  constexpr int64_t D = FidInceptionV3<float>::kFeatures;
  std::vector<float> out(static_cast<size_t>(im.n * D));
  const int64_t per = im.height * im.width * im.channels;
  NoGrad ng;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < im.n; i += batch) {
    const int64_t b = std::min(batch, im.n - i);
    const Var<float> x(fid_preprocess(im.pixels.data() + i * per, b, im.height, im.width, im.channels).to(net.device()));
    const Tensor<float> f = net.features(x).value().cpu();
    std::copy(f.data(), f.data() + b * D, out.data() + i * D);
    if (progress)
      progress(i + b, im.n, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return out;
}

inline GaussianStats fid_statistics(const std::vector<float>& features) {
  constexpr int64_t D = FidInceptionV3<float>::kFeatures;
  return gaussian_stats(features.data(), static_cast<int64_t>(features.size()) / D, D);
}

// The FID of `images` (at least 2; 2,048 or more for a full-rank covariance) against reference
// statistics of 2,048 features (a pytorch-fid .npz: load_gaussian_stats), the network on its device.
inline double fid_of(const FidInceptionV3<float>& net, const ImageSet& images, const GaussianStats& reference,
                     int64_t batch = 50) {
  constexpr int64_t D = FidInceptionV3<float>::kFeatures;
  if (images.n < 2) throw std::invalid_argument("fid_of: FID needs at least 2 images, got " + std::to_string(images.n));
  if (static_cast<int64_t>(reference.mu.size()) != D)
    throw std::invalid_argument("fid_of: the reference statistics have " + std::to_string(reference.mu.size()) +
                                " features, FID uses 2048");
  return frechet_distance(fid_statistics(fid_features(net, images, batch)), reference);
}

}  // namespace diffuse
