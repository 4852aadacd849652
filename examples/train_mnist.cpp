// train_mnist: a DDPM on MNIST digits (the report's second step).
//
// Class-conditional by default (all ten digits, labels dropped to a "null"
// class with probability --label-dropout so that sampling can use
// classifier-free guidance), or one digit with --digit D (unconditional).
// Writes DIR/grid.png, DIR/process.png, DIR/samples.npy, DIR/labels.npy and
// DIR/checkpoint.safetensors; with a LeNet classifier (mnist_classifier train)
// it also prints the samples' accuracy and FD-LeNet. The loop is the library's
// (train/trainer.hpp): this file is flags, data, model and callbacks (sample grids and LeNet
// scores during training with --grid-every / --eval-every).
#include <CLI/CLI.hpp>

#include "device_choice.hpp"
#include "flag_checks.hpp"
#include "objective_flags.hpp"
#include "mnist_common.hpp"
#include "ranks.hpp"

#include <diffuse/eval/lenet_score.hpp>
#include <diffuse/train/trainer.hpp>
#if DIFFUSE_EMULATED_CUDA
#include <diffuse/backend/cuda_emulation.hpp>
#endif

#include <cmath>
#include <memory>
#include <optional>
#include <cstdio>

using namespace diffuse;
using namespace mnist_example;
using namespace diffuse::examples;
namespace fs = std::filesystem;

namespace {

struct Args {
  std::string prediction = "eps";
  double min_snr = 0.0;
  bool tf32 = false;
  std::string precision = "fp32";
  std::string attention = "full";
  bool cuda_graph = false;
  std::string data = "data/mnist", out = "out/mnist", resume, schedule = "linear", resize = "area", attn = "none";
  std::string sampler = "ddpm", variance = "large", classifier, device, order = "replacement";
  int64_t size = 16, digit = -1, steps = 0, batch = 64, warmup = 200, save_every = 500, log_every = 50, keep = 1;
  int64_t grid_every = 0, eval_every = 0, eval_samples = 200;
  int64_t ch = 32, samples = -1, sample_batch = 100;
  int T = 200, ddim_steps = 50;
  double lr = 1e-3, ema = 0.999, clip = 1.0, label_dropout = 0.1, guidance = 0.3, eta = 0.0;
  uint64_t seed = 0;
};

}  // namespace

int main(int argc, char** argv) {
#if DIFFUSE_EMULATED_CUDA
  // The tests' build of this program (tests/CMakeLists.txt): --device cuda runs the CUDA backend's
  // code on the CPU through the emulation of the CUDA execution model.
  EmulatedCuda emulated_cuda;
#endif
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
      ->check(whole_in(-1, 9));
  app.add_option("--label-dropout", a.label_dropout, "probability of training with the null class (classifier-free guidance)")
      ->capture_default_str()
      ->check(finite_in(0, 1));
  app.add_option("--guidance", a.guidance, "guidance weight w at sampling: eps = (1+w) eps(x,y) - w eps(x,null); 0 = off")
      ->capture_default_str()
      ->check(finite_in(-1, 100));
  app.add_option("--T", a.T, "diffusion steps")->capture_default_str()->check(whole_in(2, 100000));
  app.add_option("--schedule", a.schedule, "noise schedule: linear, cosine, sigmoid")
      ->capture_default_str()
      ->check(CLI::IsMember({"linear", "cosine", "sigmoid"}));
  add_objective_options(app, a.prediction, a.min_snr);
  app.add_option("--ch", a.ch, "U-Net base width (the reference's MNIST16 model: 32)")
      ->capture_default_str()
      ->check(whole_in(1, 4096));
  app.add_option("--attn", a.attn, "U-Net attention: none, one8, ho8 (the reference's MNIST16 variants)")
      ->capture_default_str()
      ->check(CLI::IsMember({"none", "one8", "ho8"}));
  app.add_option("--steps", a.steps, "training steps (default: 3000 for all digits, 1000 with --digit)")
      ->check(whole_in(1, kNoMax));
  app.add_option("--batch", a.batch, "batch size")->capture_default_str()->check(positive_whole());
  app.add_option("--lr", a.lr, "Adam learning rate")->capture_default_str()->check(finite_in(0, 10, true));
  app.add_option("--warmup", a.warmup, "linear learning-rate warmup steps")->capture_default_str()->check(whole_in(0, kNoMax));
  app.add_option("--ema", a.ema, "EMA decay of the weights used for sampling (0 = off)")
      ->capture_default_str()
      ->check(finite_in(0, 1, false, true));
  app.add_option("--clip", a.clip, "gradient-norm clipping (0 = off)")->capture_default_str()->check(finite_in(0, kInf));
  app.add_option("--seed", a.seed, "random seed")->capture_default_str()->check(diffuse::examples::seed_value());
  app.add_option("--device", a.device, "train and sample on cpu or cuda (default: cuda when a CUDA device is usable, "
                                       "else cpu); checkpoints are the same files on both")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--precision", a.precision, kPrecisionHelp)
      ->capture_default_str()
      ->check(CLI::IsMember({"fp32", "tf32", "bf16"}));
  app.add_flag("--tf32", a.tf32, "the same as --precision tf32");
  app.add_option("--attention", a.attention,
                 "with --device cuda: attention by the full-matrix kernels (cuBLAS, the score matrix kept for the backward) "
                 "or the fused flash kernels (one log-sum-exp per query kept; head dims up to 256)")
      ->capture_default_str()
      ->check(CLI::IsMember({"full", "flash"}));
  app.add_flag("--cuda-graph", a.cuda_graph, kCudaGraphHelp);
  app.add_option("--out", a.out, "output directory")->capture_default_str();
  app.add_option("--resume", a.resume, "continue training from this checkpoint");
  app.add_option("--save-every", a.save_every, "checkpoint every N steps (0: only at the end and on Ctrl-C)")
      ->capture_default_str()
      ->check(whole_in(0, kNoMax));
  app.add_option("--keep", a.keep, "checkpoints kept: checkpoint.safetensors and the K-1 before it (checkpoint-<step>)")
      ->capture_default_str()
      ->check(positive_whole());
  app.add_option("--log-every", a.log_every, "progress line and train_log.csv row every N steps")
      ->capture_default_str()
      ->check(whole_in(1, kNoMax));
  app.add_option("--data-order", a.order, "batches: replacement (uniform draws) or epochs (a seeded shuffle, each image "
                                          "once per epoch)")
      ->capture_default_str()
      ->check(CLI::IsMember({"replacement", "epochs"}));
  app.add_option("--grid-every", a.grid_every, "every N steps: DIR/progress/grid-<step>.png sampled with the EMA weights "
                                               "(0 = off)")
      ->capture_default_str()
      ->check(whole_in(0, kNoMax));
  app.add_option("--eval-every", a.eval_every, "every N steps: sample --eval-samples images with the EMA weights and log "
                                               "their LeNet accuracy and FD-LeNet (needs the classifier; 0 = off)")
      ->capture_default_str()
      ->check(whole_in(0, kNoMax));
  app.add_option("--eval-samples", a.eval_samples, "images per evaluation during training")
      ->capture_default_str()
      ->check(whole_in(2, 1000000));
  app.add_option("--samples", a.samples, "images to sample at the end (default: 500 for all digits, 200 with --digit; 0: none)")
      ->check(whole_in(0, 10000000));
  app.add_option("--sample-batch", a.sample_batch, "images per sampling batch")
      ->capture_default_str()
      ->check(whole_in(1, 1000000));
  app.add_option("--sampler", a.sampler, "sampler: ddpm (T steps), ddim, euler-a, dpm++2m, dpm++3m")
      ->capture_default_str()
      ->check(CLI::IsMember({"ddpm", "ddim", "euler-a", "dpm++2m", "dpm++3m"}));
  app.add_option("--sample-steps,--ddim-steps", a.ddim_steps, "sampling steps of every sampler but ddpm")
      ->capture_default_str()
      ->check(positive_whole());
  app.add_option("--variance", a.variance, "DDPM variance: large (beta_t) or small (posterior)")
      ->capture_default_str()
      ->check(CLI::IsMember({"small", "large"}));
  app.add_option("--eta", a.eta, "DDIM eta (0 = deterministic)")->capture_default_str()->check(finite_in(0, 1));
  app.add_option("--classifier", a.classifier,
                 "LeNet checkpoint for scoring the samples (default: DATA/lenet<size>.safetensors if present)");
  CLI11_PARSE(app, argc, argv);

  const auto t_start = std::chrono::steady_clock::now();
  Ranks ranks;
  try {
    ranks = start_ranks(argc, argv);  // mpirun -np N: this process is one of N ranks
    // Defaults sized so that a run fits the goals on 2 cores (docs/results.md):
    // all digits in under 30 minutes, one digit in under 10, sampling included.
    if (a.steps <= 0) a.steps = a.digit < 0 ? 3000 : 1000;
    if (a.samples < 0) a.samples = a.digit < 0 ? 500 : 200;
    const Device dev = choose_device(a.device);  // refuses cuda without a device before loading anything
    apply_precision(a.precision, a.tf32, dev);
    apply_attention_kernel(a.attention, dev);
    check_cuda_graph(a.cuda_graph, dev);
    if (ranks.lead()) require_writable_folder("--out", a.out);  // a read-only --out fails now, not at the first checkpoint
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
    info.prediction = a.prediction;
    info.digit = a.digit;
    info.resize = a.resize;
    const NoiseSchedule sched = NoiseSchedule::by_name(a.schedule, a.T);

    Generator init(a.seed);
    UNet<float> model(info.unet, init);
    model.to(dev);  // the optimiser's state is made beside the weights

    // The kept images (and their labels for the class-conditional model).
    Tensor<float> images({N, S, S, 1});
    std::vector<int32_t> labels;
    for (int64_t k = 0; k < N; ++k) {
      const int64_t i = keep[static_cast<size_t>(k)];
      std::copy(all.data() + i * S * S, all.data() + (i + 1) * S * S, images.data() + k * S * S);
      if (a.digit < 0) labels.push_back(train.labels.labels[static_cast<size_t>(i)]);
    }
    TensorDataset<float> source(std::move(images), std::move(labels),
                                a.order == "epochs" ? DataOrder::epochs : DataOrder::with_replacement, a.seed);
    TrainOptions o;
    o.name = "train_mnist";
    o.steps = a.steps;
    o.batch = a.batch;
    o.lr = a.lr;
    o.warmup = a.warmup;
    o.clip = a.clip;
    o.ema = a.ema;
    o.objective = objective_from_flags(a.prediction, a.min_snr);
    o.label_dropout = a.digit < 0 ? a.label_dropout : 0.0;
    o.null_class = 10;
    o.seed = a.seed;
    o.log_every = a.log_every;
    o.save_every = a.save_every;
    o.keep = static_cast<int>(a.keep);
    o.out = a.out;
    o.resume = a.resume;
    o.identity = {{"model", info.json()}};
    o.comm = ranks.comm.get();
    o.cuda_graph = a.cuda_graph;
    Trainer<float, UNet<float>> trainer(model, sched, source, o);
    if (ranks.lead())
      std::printf("train_mnist: %s, %lld images of %s at %lldx%lld (%s), U-Net %lld parameters, T=%d %s, batch %lld, "
                "%lld steps, on %s%s\n",
                a.data.c_str(), static_cast<long long>(N), a.digit < 0 ? "all digits" : ("digit " + std::to_string(a.digit)).c_str(),
                static_cast<long long>(S), static_cast<long long>(S), a.resize.c_str(),
                static_cast<long long>(model.num_parameters()), a.T, a.schedule.c_str(), static_cast<long long>(a.batch),
                static_cast<long long>(a.steps), device_description(dev).c_str(), ranks.describe().c_str());
    std::fflush(stdout);

    SampleRequest req;
    req.guidance = a.digit < 0 ? a.guidance : 0.0;
    req.sampler = a.sampler;
    req.steps = a.sampler != "ddpm" ? a.ddim_steps : 0;
    req.eta = a.eta;
    req.variance = a.variance;
    req.batch = a.sample_batch;

    // The classifier for scores, during training (--eval-every) and at the end.
    std::string clf = a.classifier;
    const fs::path def = fs::path(a.data) / ("lenet" + std::to_string(S) + ".safetensors");
    if (clf.empty() && fs::exists(def)) clf = def.string();
    std::optional<LeNetFile> lenet;
    std::optional<MnistSplit> test;
    auto score = [&](const SampleResult& res) {
      if (!lenet) lenet = load_lenet(clf), test = load_mnist(a.data, "test");
      std::vector<uint8_t> bytes(res.images.size());
      for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = plot::to_byte(res.images[i]);
      const std::vector<int64_t> lab(res.labels.begin(), res.labels.end());
      ScoreOptions sco;
      sco.resize = lenet->resize;
      return score_samples(*lenet->net, bytes.data(), res.images.size(0), S, lab.data(), train, *test, sco);
    };
    if (a.eval_every > 0) {
      if (clf.empty())
        throw std::runtime_error("--eval-every needs a LeNet classifier: none at " + def.string() +
                                 " (`mnist_classifier train --data " + a.data + " --size " + std::to_string(S) +
                                 "` makes one, or give --classifier)");
      trainer.evaluate_every(a.eval_every, {"accuracy", "fd_lenet"}, [&](auto& t) {
        SampleRequest r = req;
        r.n = a.eval_samples;
        Generator srng(a.seed, uint64_t(2) << 40);
        SampleResult res;
        t.with_ema_weights([&] { res = sample_images(model, info, r, srng, false); });
        const SampleScore sc = score(res);
        return std::map<std::string, double>{{"accuracy", sc.cond_accuracy}, {"fd_lenet", sc.fd}};
      });
    }
    if (a.grid_every > 0)
      trainer.every(a.grid_every, [&](auto& t) {
        SampleRequest r = req;
        r.n = info.unet.num_classes > 0 ? 100 : 64;
        r.batch = std::min<int64_t>(r.n, a.sample_batch);
        Generator srng(a.seed, uint64_t(2) << 40);
        SampleResult res;
        t.with_ema_weights([&] { res = sample_images(model, info, r, srng, false); });
        char name[64];
        std::snprintf(name, sizeof name, "grid-%08lld.png", static_cast<long long>(t.step()));
        write_grid_png(fs::path(a.out) / "progress" / name, res, info);
      });

    const TrainResult tr = trainer.run();
    if (tr.status == TrainStatus::interrupted) return 130;
    if (!ranks.lead()) return 0;  // rank 0 samples and scores
    std::printf("trained %lld steps in %.0f s; checkpoint %s\n", static_cast<long long>(tr.step - tr.start_step),
                tr.seconds, tr.checkpoint.c_str());
    if (a.samples <= 0) return 0;

    // Sample with the EMA weights, from a stream of its own, on the training device.
    Generator srng(a.seed, uint64_t(2) << 40);
    req.n = a.samples;
    const auto ts = std::chrono::steady_clock::now();
    SampleResult res;
    trainer.with_ema_weights([&] { res = sample_images(model, info, req, srng); });
    write_sample_files(a.out, res, info);
    std::printf("sampled %lld images on %s in %.0f s (%s, guidance %.2f); wrote %s/{grid.png, process.png, samples.npy, "
                "labels.npy}\n",
                static_cast<long long>(a.samples), device_name(dev),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - ts).count(), a.sampler.c_str(),
                req.guidance, a.out.c_str());

    // Score with the LeNet classifier when there is one.
    if (clf.empty()) {
      std::printf("no classifier at %s: `mnist_classifier train --data %s --size %lld` makes one to score samples\n",
                  def.string().c_str(), a.data.c_str(), static_cast<long long>(S));
      std::printf("total time %.0f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count());
      return 0;
    }
    const SampleScore r = score(res);
    const LeNetFile& lf = *lenet;
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
    return ranks.fail("train_mnist", e);
  }
}
