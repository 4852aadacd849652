// train_mnist: a DDPM on MNIST digits (the report's second step).
//
// Class-conditional by default (all ten digits, labels dropped to a "null"
// class with probability --label-dropout so that sampling can use
// classifier-free guidance), or one digit with --digit D (unconditional).
// Writes DIR/grid.png, DIR/process.png, DIR/samples.npy, DIR/labels.npy and
// DIR/checkpoint.safetensors; with a LeNet classifier (mnist_classifier train)
// it also prints the samples' accuracy and FD-LeNet.
#include <CLI/CLI.hpp>

#include "device_choice.hpp"
#include "mnist_common.hpp"

#include <diffuse/eval/lenet_score.hpp>

#include <cmath>
#include <csignal>
#include <memory>
#include <cstdio>

using namespace diffuse;
using namespace mnist_example;
using namespace diffuse::examples;
namespace fs = std::filesystem;

namespace {

volatile std::sig_atomic_t g_stop = 0;

struct Args {
  bool tf32 = false;
  std::string data = "data/mnist", out = "out/mnist", resume, schedule = "linear", resize = "area", attn = "none";
  std::string sampler = "ddpm", variance = "large", classifier, device;
  int64_t size = 16, digit = -1, steps = 0, batch = 64, warmup = 200, save_every = 500, log_every = 50;
  int64_t ch = 32, samples = -1, sample_batch = 100;
  int T = 200, ddim_steps = 50;
  double lr = 1e-3, ema = 0.999, clip = 1.0, label_dropout = 0.1, guidance = 0.3, eta = 0.0;
  uint64_t seed = 0;
};

}  // namespace

int main(int argc, char** argv) {
  Args a;
  CLI::App app{"Train a DDPM on MNIST digits (class-conditional, or one digit with --digit), then sample."};
  app.add_option("--data", a.data, "folder with the MNIST IDX files (scripts/get_mnist.sh builds data/mnist)")
      ->capture_default_str();
  app.add_option("--size", a.size, "image size: 16 (downsampled, as in the report) or 28")
      ->capture_default_str()
      ->check(CLI::IsMember({16, 28}));
  app.add_option("--resize", a.resize, "downsampling from 28: area or bilinear")
      ->capture_default_str()
      ->check(CLI::IsMember({"area", "bilinear"}));
  app.add_option("--digit", a.digit, "train on this digit only (unconditional model); -1: all ten, class-conditional")
      ->capture_default_str()
      ->check(CLI::Range(-1, 9));
  app.add_option("--label-dropout", a.label_dropout, "probability of training with the null class (classifier-free guidance)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--guidance", a.guidance, "guidance weight w at sampling: eps = (1+w) eps(x,y) - w eps(x,null); 0 = off")
      ->capture_default_str();
  app.add_option("--T", a.T, "diffusion steps")->capture_default_str()->check(CLI::Range(2, 100000));
  app.add_option("--schedule", a.schedule, "noise schedule: linear, cosine")
      ->capture_default_str()
      ->check(CLI::IsMember({"linear", "cosine"}));
  app.add_option("--ch", a.ch, "U-Net base width (the reference's MNIST16 model: 32)")->capture_default_str();
  app.add_option("--attn", a.attn, "U-Net attention: none, one8, ho8 (the reference's MNIST16 variants)")
      ->capture_default_str()
      ->check(CLI::IsMember({"none", "one8", "ho8"}));
  app.add_option("--steps", a.steps, "training steps (default: 3000 for all digits, 1000 with --digit)");
  app.add_option("--batch", a.batch, "batch size")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--lr", a.lr, "Adam learning rate")->capture_default_str();
  app.add_option("--warmup", a.warmup, "linear learning-rate warmup steps")->capture_default_str();
  app.add_option("--ema", a.ema, "EMA decay of the weights used for sampling (0 = off)")->capture_default_str();
  app.add_option("--clip", a.clip, "gradient-norm clipping (0 = off)")->capture_default_str();
  app.add_option("--seed", a.seed, "random seed")->capture_default_str();
  app.add_option("--device", a.device, "train and sample on cpu or cuda (default: cuda when a CUDA device is usable, "
                                       "else cpu); checkpoints are the same files on both")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_flag("--tf32", a.tf32, "with --device cuda: TF32 tensor cores for the GEMMs and convolutions (inputs rounded to "
                             "10 mantissa bits; FP32 otherwise)");
  app.add_option("--out", a.out, "output directory")->capture_default_str();
  app.add_option("--resume", a.resume, "continue training from this checkpoint");
  app.add_option("--save-every", a.save_every, "checkpoint every N steps (0: only at the end and on Ctrl-C)")
      ->capture_default_str();
  app.add_option("--log-every", a.log_every, "progress line every N steps")->capture_default_str();
  app.add_option("--samples", a.samples, "images to sample at the end (default: 500 for all digits, 200 with --digit; 0: none)");
  app.add_option("--sample-batch", a.sample_batch, "images per sampling batch")->capture_default_str();
  app.add_option("--sampler", a.sampler, "sampler: ddpm, ddim")
      ->capture_default_str()
      ->check(CLI::IsMember({"ddpm", "ddim"}));
  app.add_option("--ddim-steps", a.ddim_steps, "DDIM sampling steps")->capture_default_str();
  app.add_option("--variance", a.variance, "DDPM variance: large (beta_t) or small (posterior)")
      ->capture_default_str()
      ->check(CLI::IsMember({"small", "large"}));
  app.add_option("--eta", a.eta, "DDIM eta (0 = deterministic)")->capture_default_str();
  app.add_option("--classifier", a.classifier,
                 "LeNet checkpoint for scoring the samples (default: DATA/lenet<size>.safetensors if present)");
  CLI11_PARSE(app, argc, argv);

  const auto t_start = std::chrono::steady_clock::now();
  try {
    // Defaults sized so that a run fits the goals on 2 cores (docs/results.md):
    // all digits in under 30 minutes, one digit in under 10, sampling included.
    if (a.steps <= 0) a.steps = a.digit < 0 ? 3000 : 1000;
    if (a.samples < 0) a.samples = a.digit < 0 ? 500 : 200;
    const Device dev = choose_device(a.device);  // refuses cuda without a device before loading anything
    apply_tf32(a.tf32, dev);
    // Data: the training split (one digit, or all with labels).
    const MnistSplit train = load_mnist(a.data, "train");
    Tensor<float> all = to_model_images(train.images, a.size, a.resize);
    std::vector<int64_t> keep;
    for (size_t i = 0; i < train.labels.labels.size(); ++i)
      if (a.digit < 0 || train.labels.labels[i] == a.digit) keep.push_back(static_cast<int64_t>(i));
    const int64_t N = static_cast<int64_t>(keep.size()), S = a.size;
    if (N == 0) throw std::runtime_error("no training images of digit " + std::to_string(a.digit));

    ModelInfo info;
    info.unet = UNetConfig::mnist16(a.attn);
    info.unet.ch = a.ch;
    info.unet.resolution = S;
    if (S == 28) info.unet.attn_resolutions = a.attn == "none" ? std::vector<int64_t>{} : std::vector<int64_t>{14};
    info.unet.num_classes = a.digit < 0 ? 10 : 0;
    info.T = a.T;
    info.schedule = a.schedule;
    info.digit = a.digit;
    info.resize = a.resize;
    const NoiseSchedule sched = NoiseSchedule::by_name(a.schedule, a.T);

    Generator init(a.seed);
    UNet<float> model(info.unet, init);
    model.to(dev);  // the optimiser's state is made beside the weights
    AdamOptions ao;
    ao.lr = a.lr;
    Adam<float> opt(model.named_parameters(), ao);
    EMA<float> ema(model.named_parameters(), a.ema > 0 ? a.ema : 0.0);
    Generator rng(a.seed, uint64_t(1) << 40);  // training stream, apart from the init stream
    Generator drop_rng(a.seed, uint64_t(3) << 40);
    int64_t step = 0;
    fs::create_directories(a.out);
    const std::string ckpt = (fs::path(a.out) / "checkpoint.safetensors").string();
    if (!a.resume.empty()) {
      {  // The model first, so that a mismatch names both models rather than one tensor.
        const safetensors::Metadata m = safetensors::File::read(a.resume).metadata();
        if (!m.count("model") || m.at("model") != info.json())
          throw std::runtime_error("'" + a.resume + "' was trained with " +
                                   (m.count("model") ? m.at("model") : std::string("(no model metadata)")) +
                                   ", this run asks for " + info.json());
      }
      TrainState st = load_checkpoint<float>(a.resume, model, &opt, &ema);
      step = st.step;
      rng = st.rng;
      if (st.metadata.count("dropout_rng.offset"))
        drop_rng = Generator(a.seed, std::stoull(st.metadata.at("dropout_rng.offset")));
      std::printf("resumed from %s at step %lld\n", a.resume.c_str(), static_cast<long long>(step));
    }
    auto save = [&](int64_t at) {
      save_checkpoint<float>(ckpt, model, &opt, &ema, at, rng,
                             {{"model", info.json()}, {"dropout_rng.offset", std::to_string(drop_rng.offset)}});
    };
    std::printf("train_mnist: %s, %lld images of %s at %lldx%lld (%s), U-Net %lld parameters, T=%d %s, batch %lld, "
                "%lld steps, on %s\n",
                a.data.c_str(), static_cast<long long>(N), a.digit < 0 ? "all digits" : ("digit " + std::to_string(a.digit)).c_str(),
                static_cast<long long>(S), static_cast<long long>(S), a.resize.c_str(),
                static_cast<long long>(model.num_parameters()), a.T, a.schedule.c_str(), static_cast<long long>(a.batch),
                static_cast<long long>(a.steps), device_description(dev).c_str());
    std::fflush(stdout);
    std::signal(SIGINT, [](int) { g_stop = 1; });

    Tensor<float> x0({a.batch, S, S, 1});
    std::vector<uint32_t> idx(static_cast<size_t>(a.batch));
    std::vector<int32_t> y(static_cast<size_t>(a.batch));
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t start = step;
    double loss_acc = 0;
    int64_t loss_n = 0;
    for (; step < a.steps && !g_stop; ++step) {
      rng.randint(idx.data(), idx.size(), static_cast<uint32_t>(N));
      for (int64_t b = 0; b < a.batch; ++b) {
        const int64_t i = keep[idx[static_cast<size_t>(b)]];
        std::copy(all.data() + i * S * S, all.data() + (i + 1) * S * S, x0.data() + b * S * S);
        y[static_cast<size_t>(b)] = train.labels.labels[static_cast<size_t>(i)];
      }
      const std::vector<int32_t> yd = a.digit < 0 ? drop_labels(y, a.label_dropout, 10, drop_rng) : y;
      auto nb = make_noised_batch(sched, x0.to(dev), rng);
      opt.zero_grad();
      Var<float> loss = epsilon_loss<float>(
          [&](const Var<float>& x, const std::vector<int32_t>& t) { return model(x, t, a.digit < 0 ? &yd : nullptr); },
          nb);
      backward(loss);
      if (a.clip > 0) clip_grad_norm(opt.params(), a.clip);
      // Read after the backward is queued (on a GPU the read waits for it); a non-finite loss
      // stops the run before the update.
      const float lv = loss.value().cpu()[0];
      if (!std::isfinite(lv))
        throw std::runtime_error("loss is " + std::to_string(lv) + " at step " + std::to_string(step) +
                                 "; try a lower --lr (last checkpoint: " + ckpt + ")");
      opt.set_lr(warmup_lr(a.lr, step, a.warmup));
      if (a.ema > 0) opt.step(ema);
      else opt.step();
      loss_acc += lv;
      ++loss_n;
      if ((step + 1) % a.log_every == 0 || step + 1 == a.steps) {
        const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const double sps = static_cast<double>(step + 1 - start) / el;
        std::printf("step %6lld/%lld  loss %.4f  %.0f images/s  elapsed %.0f s  ETA %.0f s\n",
                    static_cast<long long>(step + 1), static_cast<long long>(a.steps), loss_acc / loss_n,
                    sps * static_cast<double>(a.batch), el, static_cast<double>(a.steps - step - 1) / sps);
        std::fflush(stdout);
        loss_acc = 0;
        loss_n = 0;
      }
      if (a.save_every > 0 && (step + 1) % a.save_every == 0) save(step + 1);
    }
    save(step);
    if (g_stop) {
      std::printf("interrupted: checkpoint saved at step %lld in %s (continue with --resume %s)\n",
                  static_cast<long long>(step), ckpt.c_str(), ckpt.c_str());
      return 130;
    }
    const double train_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("trained %lld steps in %.0f s; checkpoint %s\n", static_cast<long long>(step - start), train_s,
                ckpt.c_str());
    if (a.samples <= 0) return 0;

    // Sample with the EMA weights, from a stream of its own, on the training device.
    if (a.ema > 0) ema.swap_into_model();
    Generator srng(a.seed, uint64_t(2) << 40);
    SampleRequest req;
    req.n = a.samples;
    req.guidance = a.digit < 0 ? a.guidance : 0.0;
    req.sampler = a.sampler;
    req.steps = a.sampler == "ddim" ? a.ddim_steps : 0;
    req.eta = a.eta;
    req.variance = a.variance;
    req.batch = a.sample_batch;
    const auto ts = std::chrono::steady_clock::now();
    const SampleResult res = sample_images(model, info, req, srng);
    if (a.ema > 0) ema.swap_into_model();
    write_sample_files(a.out, res, info.unet.num_classes);
    std::printf("sampled %lld images on %s in %.0f s (%s, guidance %.2f); wrote %s/{grid.png, process.png, samples.npy, "
                "labels.npy}\n",
                static_cast<long long>(a.samples), device_name(dev),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - ts).count(), a.sampler.c_str(),
                req.guidance, a.out.c_str());

    // Score with the LeNet classifier when there is one.
    std::string clf = a.classifier;
    const fs::path def = fs::path(a.data) / ("lenet" + std::to_string(S) + ".safetensors");
    if (clf.empty() && fs::exists(def)) clf = def.string();
    if (clf.empty()) {
      std::printf("no classifier at %s: `mnist_classifier train --data %s --size %lld` makes one to score samples\n",
                  def.string().c_str(), a.data.c_str(), static_cast<long long>(S));
      std::printf("total time %.0f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count());
      return 0;
    }
    const LeNetFile lf = load_lenet(clf);
    const MnistSplit test = load_mnist(a.data, "test");
    std::vector<uint8_t> bytes(res.images.size());
    for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = plot::to_byte(res.images[i]);
    const std::vector<int64_t> lab(res.labels.begin(), res.labels.end());
    ScoreOptions sco;
    sco.resize = lf.resize;
    const SampleScore r = score_samples(*lf.net, bytes.data(), a.samples, S, lab.data(), train, test, sco);
    std::printf("classifier %s (test accuracy %.4f)\n", clf.c_str(), lf.test_accuracy);
    std::printf("conditional accuracy: %.4f (fraction of samples classified as their %s)\n", r.cond_accuracy,
                a.digit < 0 ? "label" : "digit");
    if (a.digit < 0) {
      std::printf("per digit:");
      for (size_t k = 0; k < r.per_class.size(); ++k)
        if (r.per_class_count[k]) std::printf("  %zu:%.3f", k, r.per_class[k]);
      std::printf("\n");
    }
    std::printf("FD-LeNet: %.4f  floor (real train vs test, same N): %.4f  ratio %.2f\n", r.fd, r.fd_floor,
                r.fd / r.fd_floor);
    std::printf("total time %.0f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_mnist: error: %s\n", e.what());
    return 1;
  }
}
