// mnist_classifier: the LeNet that judges generated digits.
//
//   mnist_classifier train --data DIR [--size 16|28] [--resize area|bilinear] ...
//       trains LeNet (include/diffuse/models/lenet.hpp) on DIR's train split with
//       Adam + cross-entropy, prints the test-split accuracy, writes
//       DIR/lenet<size>.safetensors (metadata: size, resize, test_accuracy).
//   mnist_classifier score --classifier FILE --samples samples.npy [--labels labels.npy] --data DIR
//       predicted-class histogram, conditional accuracy (with labels), and
//       FD-LeNet of the samples against the test digits next to its floor
//       (real train digits, same N); --json FILE writes the numbers.
#include <CLI/CLI.hpp>
#include <diffuse/diffuse.hpp>
#include <diffuse/io/idx.hpp>
#include <diffuse/models/lenet.hpp>

#include "device_choice.hpp"
#include "flag_checks.hpp"
#include <diffuse/eval/lenet_score.hpp>
#include <diffuse/io/npy.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

using namespace diffuse;
namespace fs = std::filesystem;

namespace {

struct TrainArgs {
  std::string data, resize = "area", out, device;
  // Defaults: >= 98.5% test accuracy at 16x16 on the 8,000/2,000 split in about 2.5 minutes on 2 cores.
  int64_t size = 16, epochs = 15, batch = 32, shift = 1, c1 = LeNetConfig{}.c1, c2 = LeNetConfig{}.c2;
  double lr = 2e-3, weight_decay = 0.0;
  uint64_t seed = 0;
};

struct ScoreArgs {
  std::string classifier, samples, labels, data, json, device;
  uint64_t seed = 0;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Copies image src (s x s) into dst shifted by (dy, dx), filling with 0 (black).
void shift_image(const uint8_t* src, uint8_t* dst, int64_t s, int64_t dy, int64_t dx) {
  for (int64_t y = 0; y < s; ++y)
    for (int64_t x = 0; x < s; ++x) {
      const int64_t sy = y - dy, sx = x - dx;
      dst[y * s + x] = (sy >= 0 && sy < s && sx >= 0 && sx < s) ? src[sy * s + sx] : 0;
    }
}

int train(const TrainArgs& a) {
  if (a.size != 16 && a.size != 28) throw std::invalid_argument("--size must be 16 or 28, not " + std::to_string(a.size));
  const std::string out =
      a.out.empty() ? (fs::path(a.data) / ("lenet" + std::to_string(a.size) + ".safetensors")).string() : a.out;
  // Before training, not after it (the default goes beside the data: checked once that folder exists,
  // so a missing --data is reported as such and nothing is created).
  if (!a.out.empty() || fs::is_directory(a.data)) diffuse::examples::require_writable_file("--out", out);
  const MnistSplit tr = load_mnist(a.data, "train"), te = load_mnist(a.data, "test");
  const int64_t S = a.size, px = S * S, n = static_cast<int64_t>(tr.images.count);
  const std::vector<uint8_t> train_px = mnist_at_size(tr.images, S, a.resize);
  const std::vector<uint8_t> test_px = mnist_at_size(te.images, S, a.resize);
  const Device dev = diffuse::examples::choose_device(a.device);

  Generator init(a.seed);
  LeNetConfig cfg;
  cfg.size = S;
  cfg.c1 = a.c1;
  cfg.c2 = a.c2;
  LeNet<float> net(cfg, init);
  net.to(dev);
  AdamOptions ao;
  ao.lr = a.lr;
  ao.weight_decay = a.weight_decay;
  ao.decoupled = true;  // AdamW: decay the weights, not the gradient
  Adam<float> opt(net.named_parameters(), ao);
  Generator rng(a.seed, uint64_t(1) << 40);
  const int64_t steps_per_epoch = (n + a.batch - 1) / a.batch, total = steps_per_epoch * a.epochs;
  std::printf("mnist_classifier train: %lld train / %zu test digits at %lldx%lld (%s), LeNet %lld parameters, "
              "%lld epochs of batch %lld, lr %g, shift %lld, on %s\n",
              static_cast<long long>(n), te.images.count, static_cast<long long>(S), static_cast<long long>(S),
              a.resize.c_str(), static_cast<long long>(net.num_parameters()), static_cast<long long>(a.epochs),
              static_cast<long long>(a.batch), a.lr, static_cast<long long>(a.shift),
              diffuse::examples::device_description(dev).c_str());
  std::fflush(stdout);

  const auto t_start = std::chrono::steady_clock::now();
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::vector<uint8_t> xb(static_cast<size_t>(a.batch * px));
  int64_t step = 0;
  for (int64_t ep = 0; ep < a.epochs; ++ep) {
    const auto t_ep = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < n; ++i) order[i] = i;
    for (int64_t i = n - 1; i > 0; --i) {  // Fisher-Yates with Philox draws: reproducible everywhere
      uint32_t j;
      rng.randint(&j, 1, static_cast<uint32_t>(i + 1));
      std::swap(order[i], order[j]);
    }
    double loss_sum = 0;
    int64_t correct = 0;
    for (int64_t b0 = 0; b0 < n; b0 += a.batch) {
      const int64_t B = std::min(a.batch, n - b0);
      std::vector<int32_t> y(static_cast<size_t>(B));
      std::vector<uint32_t> sh(static_cast<size_t>(2 * B), 0);
      if (a.shift > 0) rng.randint(sh.data(), sh.size(), static_cast<uint32_t>(2 * a.shift + 1));
      for (int64_t k = 0; k < B; ++k) {
        const int64_t idx = order[b0 + k];
        y[k] = tr.labels.labels[idx];
        // Random shifts of up to --shift pixels: more accurate on digits off centre, as samples can be.
        shift_image(train_px.data() + idx * px, xb.data() + k * px, S, int64_t(sh[2 * k]) - a.shift,
                    int64_t(sh[2 * k + 1]) - a.shift);
      }
      opt.zero_grad();
      const Var<float> logits = net.logits(Var<float>(lenet_input(xb.data(), B, S).to(dev)));
      const Var<float> loss = cross_entropy(logits, y);
      backward(loss);
      const float lv = loss.value().cpu()[0];  // after the backward is queued (a GPU read waits for it)
      if (!std::isfinite(lv))
        throw std::runtime_error("loss is " + std::to_string(lv) + " at step " + std::to_string(step) + "; try a lower --lr");
      const std::vector<int32_t> p = argmax_rows(logits.value().cpu());
      for (int64_t k = 0; k < B; ++k) correct += p[k] == y[k];
      opt.set_lr(warmup_cosine_lr(a.lr, step, std::min<int64_t>(100, total / 10), total));
      opt.step();
      loss_sum += static_cast<double>(lv) * static_cast<double>(B);
      ++step;
    }
    const double el = seconds_since(t_ep);
    std::printf("epoch %lld/%lld  loss %.4f  train accuracy %.4f  %.0f images/s  (%.1f s)\n",
                static_cast<long long>(ep + 1), static_cast<long long>(a.epochs), loss_sum / static_cast<double>(n),
                static_cast<double>(correct) / static_cast<double>(n), static_cast<double>(n) / el, el);
    std::fflush(stdout);
  }
  const LeNetOutputs r = lenet_run(net, test_px.data(), static_cast<int64_t>(te.images.count));
  int64_t correct = 0;
  for (size_t i = 0; i < r.predicted.size(); ++i) correct += r.predicted[i] == te.labels.labels[i];
  const double acc = static_cast<double>(correct) / static_cast<double>(r.predicted.size());
  save_lenet(out, net, a.resize, acc,
             {{"epochs", std::to_string(a.epochs)}, {"seed", std::to_string(a.seed)}, {"data", a.data}});
  std::printf("test accuracy %.4f (%lld/%zu) after %.1f s; wrote %s\n", acc, static_cast<long long>(correct),
              r.predicted.size(), seconds_since(t_start), out.c_str());
  return 0;
}

// samples.npy: uint8 [N, 1, H, W], [N, H, W] or [N, H, W, 1], H = W. Returns the
// pixels (C order is the same for all three) and sets n and h.
std::vector<uint8_t> read_samples(const std::string& path, int64_t& n, int64_t& h) {
  const npy::Array a = npy::load(path);
  if (a.descr != "|u1")
    throw std::runtime_error(path + ": samples must be uint8 (dtype |u1), not " + a.descr);
  const auto& s = a.shape;
  const bool ok = (s.size() == 3 && s[1] == s[2]) || (s.size() == 4 && s[1] == 1 && s[2] == s[3]) ||
                  (s.size() == 4 && s[3] == 1 && s[1] == s[2]);
  if (!ok) {
    std::string sh;
    for (size_t i = 0; i < s.size(); ++i) sh += (i ? ", " : "") + std::to_string(s[i]);
    throw std::runtime_error(path + ": samples must be [N, 1, H, W], [N, H, W] or [N, H, W, 1] with H = W, got [" + sh + "]");
  }
  n = s[0];
  h = s.size() == 4 && s[1] == 1 ? s[2] : s[1];
  return a.bytes;
}

int score(const ScoreArgs& a) {
  if (!a.json.empty()) diffuse::examples::require_writable_file("--json", a.json);
  const Device dev = diffuse::examples::choose_device(a.device);
  const LeNetFile clf = load_lenet(a.classifier);
  clf.net->to(dev);
  const LeNet<float>& net = *clf.net;
  int64_t n = 0, h = 0;
  const std::vector<uint8_t> px = read_samples(a.samples, n, h);
  if (h != net.size())
    throw std::runtime_error(a.samples + ": images are " + std::to_string(h) + "x" + std::to_string(h) +
                             " but the classifier " + a.classifier + " takes " + std::to_string(net.size()) + "x" +
                             std::to_string(net.size()));
  std::vector<int64_t> labels;
  if (!a.labels.empty()) {
    const npy::Array l = npy::load(a.labels);
    if (l.shape.size() != 1 || l.shape[0] != n)
      throw std::runtime_error(a.labels + ": labels must be [" + std::to_string(n) + "] (one per sample), got " +
                               std::to_string(l.shape.size()) + " dimensions of " +
                               (l.shape.empty() ? std::string("-") : std::to_string(l.shape[0])));
    if (l.descr == "<f4" || l.descr == "<f8") throw std::runtime_error(a.labels + ": labels must be integers, not " + l.descr);
    labels = l.as<int64_t>();
  }
  const MnistSplit tr = load_mnist(a.data, "train"), te = load_mnist(a.data, "test");
  ScoreOptions so;
  so.resize = clf.resize;
  so.seed = a.seed;
  const auto t0 = std::chrono::steady_clock::now();
  const SampleScore r = score_samples(net, px.data(), n, h, labels.empty() ? nullptr : labels.data(), tr, te, so);

  std::printf("mnist_classifier score: %lld samples %lldx%lld, classifier %s (test accuracy %.4f, %s resize)\n",
              static_cast<long long>(n), static_cast<long long>(h), static_cast<long long>(h), a.classifier.c_str(),
              clf.test_accuracy, clf.resize.c_str());
  std::printf("predicted classes:");
  for (size_t k = 0; k < r.predicted_hist.size(); ++k) std::printf("  %zu:%lld", k, static_cast<long long>(r.predicted_hist[k]));
  std::printf("\n");
  if (!labels.empty()) {
    std::printf("conditional accuracy: %.4f (fraction of samples classified as their label)\n", r.cond_accuracy);
    std::printf("per digit:");
    for (size_t k = 0; k < r.per_class.size(); ++k)
      if (r.per_class_count[k]) std::printf("  %zu:%.3f", k, r.per_class[k]);
    std::printf("\n");
  }
  std::printf("FD-LeNet: %.4f  floor (real train vs test, same N): %.4f  ratio %.2f\n", r.fd, r.fd_floor,
              r.fd / r.fd_floor);
  std::printf("(reference: %lld test digits; %.1f s)\n", static_cast<long long>(r.n_reference), seconds_since(t0));
  if (!a.json.empty()) {
    auto num = [](double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); };
    nlohmann::json per = nlohmann::json::array();
    for (double v : r.per_class) per.push_back(num(v));
    const nlohmann::json j = {{"samples", a.samples},
                              {"labels", a.labels.empty() ? nlohmann::json(nullptr) : nlohmann::json(a.labels)},
                              {"classifier", a.classifier},
                              {"classifier_test_accuracy", num(clf.test_accuracy)},
                              {"n", r.n},
                              {"size", h},
                              {"predicted_hist", r.predicted_hist},
                              {"cond_accuracy", num(r.cond_accuracy)},
                              {"per_class", per},
                              {"per_class_count", r.per_class_count},
                              {"fd", r.fd},
                              {"fd_floor", r.fd_floor},
                              {"fd_ratio", r.fd / r.fd_floor},
                              {"n_reference", r.n_reference}};
    write_file_atomically(a.json, j.dump(2) + '\n');
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Train the LeNet MNIST classifier, or score generated digits with it."};
  app.require_subcommand(1);
  TrainArgs ta;
  CLI::App* tr = app.add_subcommand("train", "train LeNet on DIR's train split, report the test accuracy");
  tr->add_option("--data", ta.data, "MNIST-format directory (train-* and t10k-* IDX files)")->required();
  tr->add_option("--size", ta.size, "image size: 16 (resized from 28) or 28")
      ->capture_default_str()
      ->check(CLI::IsMember({16, 28}));
  tr->add_option("--resize", ta.resize, "resize from 28: area, bilinear")
      ->capture_default_str()
      ->check(CLI::IsMember({"area", "bilinear"}));
  tr->add_option("--epochs", ta.epochs, "training epochs")
      ->capture_default_str()
      ->check(diffuse::examples::positive_whole());
  tr->add_option("--batch", ta.batch, "batch size")->capture_default_str()->check(diffuse::examples::positive_whole());
  tr->add_option("--lr", ta.lr, "Adam learning rate (cosine decay to 0)")->capture_default_str()->check(diffuse::examples::finite_in(0, 10, true));
  tr->add_option("--c1", ta.c1, "channels of conv1 and conv2")
      ->capture_default_str()
      ->check(diffuse::examples::positive_whole());
  tr->add_option("--c2", ta.c2, "channels of conv3 and conv4")
      ->capture_default_str()
      ->check(diffuse::examples::positive_whole());
  tr->add_option("--weight-decay", ta.weight_decay, "AdamW weight decay (0 = Adam)")
      ->capture_default_str()
      ->check(diffuse::examples::finite_in(0, 1));
  tr->add_option("--shift", ta.shift, "augmentation: random shifts of up to this many pixels (0 = off)")
      ->capture_default_str()
      ->check(diffuse::examples::whole_in(0, 4));
  tr->add_option("--seed", ta.seed, "random seed")->capture_default_str()->check(diffuse::examples::seed_value());
  tr->add_option("--out", ta.out, "classifier file (default: DIR/lenet<size>.safetensors)");
  tr->add_option("--device", ta.device, "train on cpu or cuda (default: cuda when a CUDA device is usable, else cpu)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  ScoreArgs sa;
  CLI::App* sc = app.add_subcommand("score", "score generated digits (samples.npy) with a trained classifier");
  sc->add_option("--classifier", sa.classifier, "classifier file written by `train`")->required();
  sc->add_option("--samples", sa.samples, "uint8 [N, 1, H, W] (or [N, H, W], [N, H, W, 1]) .npy")->required();
  sc->add_option("--labels", sa.labels, "int64 [N] .npy: the class each sample was asked for");
  sc->add_option("--data", sa.data, "MNIST-format directory: the real digits for FD and its floor")->required();
  sc->add_option("--json", sa.json, "also write the numbers to this JSON file");
  sc->add_option("--seed", sa.seed, "seed of the real train digits drawn for the floor")
      ->capture_default_str()
      ->check(diffuse::examples::seed_value());
  sc->add_option("--device", sa.device, "run the classifier on cpu or cuda (default: cuda when usable, else cpu)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  CLI11_PARSE(app, argc, argv);
  try {
    return tr->parsed() ? train(ta) : score(sa);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mnist_classifier: error: %s\n", e.what());
    return 1;
  }
}
