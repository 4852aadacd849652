// fid: the Frechet Inception Distance as pytorch-fid computes it.
//
//   fid A B [--weights FILE] [--batch N] [--device cpu|cuda] [--save-stats OUT.npz]
//   fid A --save-stats OUT.npz          statistics of A only (pytorch-fid --save-stats)
//
// A and B: a folder of images (png, jpg, bmp, pgm, ppm; sorted by name; grey
// replicated to RGB), a uint8 .npy [N, C, H, W] or [N, H, W, C] (C = 1 or 3,
// e.g. the trainers' samples.npy), CIFAR-10's binary version (its folder or
// cifar-10-binary.tar.gz; the training split, or --split test), or an .npz of
// statistics (mu, sigma) as pytorch-fid and --save-stats write them.
// Prints "FID: <value>" last.
#include <CLI/CLI.hpp>

#include <diffuse/data/image_folder.hpp>
#include <diffuse/eval/fid.hpp>

#include "device_choice.hpp"
#include "flag_checks.hpp"
#if DIFFUSE_EMULATED_CUDA
#include <diffuse/backend/cuda_emulation.hpp>
#endif

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>

using namespace diffuse;
using diffuse::examples::choose_device;
namespace fs = std::filesystem;

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The network is loaded only when some input is images, not statistics.
struct Network {
  std::string weights;
  Device device = Device::CPU;
  std::unique_ptr<FidInceptionV3<float>> net;
  const FidInceptionV3<float>& get() {
    if (!net) {
      if (!fs::exists(weights))
        throw std::runtime_error("Inception weights '" + weights +
                                 "' not found: download pytorch-fid's pt_inception-2015-12-05-6726825d.pth and "
                                 "convert it with scripts/fid_weights_to_safetensors.py (see the README), or pass "
                                 "--weights FILE");
      Generator g(0);
      net = std::make_unique<FidInceptionV3<float>>(g);
      load_fid_weights(weights, *net);
      net->to(device);
    }
    return *net;
  }
};

GaussianStats statistics_of(const std::string& path, Network& network, int64_t batch, const std::string& split) {
  if (ends_with(path, ".npz")) {
    GaussianStats s = load_gaussian_stats(path);
    if (s.mu.size() != FidInceptionV3<float>::kFeatures)
      throw std::runtime_error("'" + path + "' holds statistics of " + std::to_string(s.mu.size()) +
                               " features, FID uses 2048");
    std::printf("%s: statistics (2048 features)\n", path.c_str());
    return s;
  }
  ImageSet im;
  if (is_cifar10_source(path)) {
    im = load_cifar10(path, split == "train");
    std::printf("%s: CIFAR-10 %s split\n", path.c_str(), split.c_str());
  } else if (fs::is_directory(path))
    im = load_image_folder(path, 3);  // RGB, as pytorch-fid's convert("RGB")
  else if (ends_with(path, ".npy"))
    im = load_image_npy(path);
  else
    throw std::runtime_error("'" + path + "' is neither a folder of images, a .npy of uint8 images, CIFAR-10 "
                             "(its folder or .tar.gz) nor an .npz of statistics");
  if (im.n < 2)
    throw std::runtime_error("'" + path + "' has " + std::to_string(im.n) +
                             " image(s): FID needs at least 2 (and 2,048 or more for a full-rank covariance)");
  std::printf("%s: %lld images %lldx%lld, %s\n", path.c_str(), static_cast<long long>(im.n),
              static_cast<long long>(im.width), static_cast<long long>(im.height), im.channels == 1 ? "grey (replicated to RGB)" : "RGB");
  if (im.n < 2048)
    std::fprintf(stderr,
                 "fid: warning: %s has %lld images, fewer than 2048: the covariance is singular and FID is biased "
                 "upwards; compare only values computed with the same number of images\n",
                 path.c_str(), static_cast<long long>(im.n));
  const FidInceptionV3<float>& net = network.get();
  double last = -1;
  const std::vector<float> f = fid_features(net, im, batch, [&](int64_t done, int64_t total, double sec) {
    if (done < total && sec - last < 5.0) return;  // a line every 5 s, and the last
    last = sec;
    const double rate = done / std::max(sec, 1e-9);
    std::printf("  features %lld/%lld  %.1f images/s  ETA %.0f s\n", static_cast<long long>(done),
                static_cast<long long>(total), rate, (total - done) / rate);
    std::fflush(stdout);
  });
  return fid_statistics(f);
}

}  // namespace

int main(int argc, char** argv) {
#if DIFFUSE_EMULATED_CUDA
  // The tests' build of this program (tests/CMakeLists.txt): --device cuda runs the CUDA backend's
  // code on the CPU through the emulation of the CUDA execution model.
  EmulatedCuda emulated_cuda;
#endif
  std::string a, b, save_stats, device, split = "train";
  Network network;
  network.weights = "data/fid/pt_inception-2015-12-05.safetensors";
  int64_t batch = 50;
  CLI::App app{
      "FID between two image sets, computed as pytorch-fid computes it (its InceptionV3, preprocessing and\n"
      "statistics). Inputs: a folder of images, a uint8 .npy [N, C, H, W] or [N, H, W, C], CIFAR-10's binary\n"
      "version (its folder or cifar-10-binary.tar.gz), or an .npz of statistics (mu, sigma). With --save-stats,\n"
      "the statistics of A are written; B is then optional. Prints \"FID: <value>\" last."};
  app.add_option("A", a, "first image set or statistics")->required();
  app.add_option("B", b, "second image set or statistics");
  app.add_option("--weights", network.weights, "pytorch-fid's Inception weights as safetensors")->capture_default_str();
  app.add_option("--batch", batch, "images per forward pass")
      ->capture_default_str()
      ->check(diffuse::examples::positive_whole());
  app.add_option("--device", device, "run the Inception network on cpu or cuda (default: cuda when a CUDA device is "
                                     "usable, else cpu)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--split", split, "the CIFAR-10 split of a CIFAR-10 input")
      ->capture_default_str()
      ->check(CLI::IsMember({"train", "test"}));
  app.add_option("--save-stats", save_stats, "write the statistics of A to this .npz (pytorch-fid's format)");
  CLI11_PARSE(app, argc, argv);
  try {
    network.device = choose_device(device);  // refuses cuda without a device before loading anything
    if (b.empty() && save_stats.empty()) throw std::runtime_error("give two inputs A B, or A with --save-stats OUT.npz");
    if (!save_stats.empty()) diffuse::examples::require_writable_file("--save-stats", save_stats);
    const auto t0 = std::chrono::steady_clock::now();
    // A statistics file B is read (and checked) before A's features take minutes to compute.
    std::optional<GaussianStats> sb_first;
    if (!b.empty() && ends_with(b, ".npz")) sb_first = statistics_of(b, network, batch, split);
    const GaussianStats sa = statistics_of(a, network, batch, split);
    if (!save_stats.empty()) {
      save_gaussian_stats(save_stats, sa);
      std::printf("wrote statistics of %s to %s\n", a.c_str(), save_stats.c_str());
    }
    if (b.empty()) return 0;
    const GaussianStats sb = sb_first ? *sb_first : statistics_of(b, network, batch, split);
    const double fid = frechet_distance(sa, sb);
    std::printf("time %.1f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    std::printf("FID: %.6f\n", fid);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fid: error: %s\n", e.what());
    return 1;
  }
}
