// train_cifar10: a DDPM on CIFAR-10 32x32 with the attention U-Net (the report's third step),
// the DDPM paper's recipe by default (Ho et al. 2020; docs/cifar10.md).
//
// Presets: paper (the default: the 35.7M-parameter U-Net, T = 1000 linear, Adam 2e-4, batch 128,
// warmup 5000, clip 1, EMA 0.9999, dropout 0.1, flips, 800k steps), small (a narrower U-Net for
// a run of about an hour on one GPU), tiny (a CPU smoke run); every setting can be overridden.
// Data: CIFAR-10's binary version (the folder, or cifar-10-binary.tar.gz as downloaded), a uint8
// .npy array with optional labels, or a folder of images of one size. During training:
// progress (loss, images/s, ETA), train_log.csv, checkpoints (--resume continues bit for bit),
// sample grids (--grid-every) and FID against pytorch-fid statistics (--fid-every), sampled with
// the EMA weights on the training device. At the end: DIR/{grid.png, process.png, samples.npy,
// labels.npy}. The loop is the library's (train/trainer.hpp).
#include <CLI/CLI.hpp>

#include "device_choice.hpp"
#include "flag_checks.hpp"
#include "objective_flags.hpp"
#include "image_common.hpp"
#include "ranks.hpp"

#include <diffuse/data/augment.hpp>
#include <diffuse/data/image_folder.hpp>
#include <diffuse/data/image_set.hpp>
#include <diffuse/eval/fid.hpp>
#include <diffuse/train/trainer.hpp>
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
using namespace diffuse::examples;
namespace fs = std::filesystem;

namespace {

// What a preset sets; the flags override each (a negative number or empty string: the preset's).
struct Recipe {
  UNetConfig unet;
  int T = 1000;
  int64_t steps = 800000, batch = 128, warmup = 5000, save_every = 10000, grid_every = 10000, fid_every = 50000;
  int64_t fid_samples = 10000, log_every = 100, samples = 100;
  double lr = 2e-4, ema = 0.9999, clip = 1.0;
};

Recipe preset(const std::string& name) {
  Recipe r;
  r.unet = UNetConfig::cifar10();  // ch 128, (1, 2, 2, 2), 2 blocks, attention at 16 and the middle, dropout 0.1
  if (name == "paper") return r;
  if (name == "small") {  // a quarter of the paper's width-squared: ~9M parameters
    r.unet.ch = 64;
    r.steps = 100000;
    r.warmup = 1000;
    r.ema = 0.9995;
    r.save_every = r.grid_every = 5000;
    r.fid_every = 20000;
    r.fid_samples = 5000;
    return r;
  }
  if (name == "tiny") {  // seconds per few steps on 2 CPU cores
    r.unet.ch = 16;
    r.unet.ch_mult = {1, 2};
    r.unet.num_res_blocks = 1;
    r.unet.groups = 8;
    r.T = 100;
    r.steps = 200;
    r.batch = 16;
    r.lr = 1e-3;
    r.warmup = 20;
    r.ema = 0.99;
    r.save_every = 0;
    r.grid_every = 0;
    r.fid_every = 0;
    r.fid_samples = 100;
    r.log_every = 20;
    r.samples = 16;
    return r;
  }
  throw std::invalid_argument("--preset must be paper, small or tiny, not '" + name + "'");
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// CIFAR-10 (its folder, a parent of cifar-10-batches-bin, an archive or a folder holding
// cifar-10-binary.tar.gz), a .npy array, or a folder of images.
ImageSet load_training_set(const std::string& path, const std::string& labels, std::string& kind) {
  if (ends_with(path, ".npy")) {
    kind = "npy";
    return load_image_npy(path, labels);
  }
  if (!labels.empty()) throw std::invalid_argument("--labels is for a .npy --data; CIFAR-10 and folders have their own");
  if (is_cifar10_source(path)) {
    kind = "cifar10";
    return load_cifar10(path, true);
  }
  if (!fs::exists(path))
    throw std::runtime_error("--data " + path +
                             ": no such file or folder (CIFAR-10: download cifar-10-binary.tar.gz from "
                             "https://www.cs.toronto.edu/~kriz/cifar.html into it; see docs/cifar10.md)");
  kind = "folder";
  return load_image_folder(path);
}

struct Args {
  std::string prediction = "eps";
  double min_snr = 0.0;
  std::string preset = "paper", data = "data/cifar10", labels, out = "out/cifar10", resume, schedule = "linear";
  std::string sampler = "ddpm", variance = "large", device, order = "epochs";
  std::string fid_stats, fid_weights = "data/fid/pt_inception-2015-12-05.safetensors", fid_sampler = "ddim";
  int T = -1, ddim_steps = 100, fid_steps = 100;
  int64_t steps = -1, batch = -1, warmup = -1, save_every = -1, grid_every = -1, fid_every = -1, fid_samples = -1;
  int64_t log_every = -1, samples = -1, keep = 1, ch = -1, sample_batch = 100, fid_batch = 50;
  double lr = -1, ema = -1, clip = -1, dropout = -1, label_dropout = 0.1, guidance = 1.0, eta = 0.0;
  bool class_cond = false, no_flip = false, tf32 = false, dry_run = false;
  std::string precision = "fp32";
  std::string attention = "full";
  bool cuda_graph = false;
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
  CLI::App app{"Train a DDPM on CIFAR-10 32x32 (or any image set) with the attention U-Net; the DDPM paper's recipe "
               "by default. Then sample."};
  app.add_option("--preset", a.preset, "paper (Ho et al.: 35.7M parameters, 800k steps), small (~9M, 100k steps, about "
                                       "an hour on one GPU), tiny (a CPU smoke run); flags below override it")
      ->capture_default_str()
      ->check(CLI::IsMember({"paper", "small", "tiny"}));
  app.add_option("--data", a.data, "CIFAR-10's binary version (the folder, or cifar-10-binary.tar.gz), a uint8 .npy "
                                   "[N,H,W,C] or [N,C,H,W], or a folder of images of one size")
      ->capture_default_str();
  app.add_option("--labels", a.labels, "with a .npy --data: a .npy of N integer class labels");
  app.add_flag("--class-cond", a.class_cond, "class-conditional model (needs labels), trained with label dropout for "
                                             "classifier-free guidance");
  app.add_flag("--no-flip", a.no_flip, "no random horizontal flips (the recipe flips)");
  app.add_option("--label-dropout", a.label_dropout, "with --class-cond: probability of the null class in training")
      ->capture_default_str()
      ->check(finite_in(0, 1));
  app.add_option("--guidance", a.guidance, "with --class-cond: guidance weight w at sampling, "
                                           "eps = (1+w) eps(x,y) - w eps(x,null); 0 = off")
      ->capture_default_str()
      ->check(finite_in(-1, 100));
  app.add_option("--T", a.T, "diffusion steps (preset: 1000; tiny 100)")->check(whole_in(2, 100000));
  app.add_option("--schedule", a.schedule, "noise schedule: linear (1e-4..0.02 at T = 1000), cosine or sigmoid")
      ->capture_default_str()
      ->check(CLI::IsMember({"linear", "cosine", "sigmoid"}));
  add_objective_options(app, a.prediction, a.min_snr);
  app.add_option("--ch", a.ch, "U-Net base width (paper 128, small 64, tiny 16)")->check(positive_whole());
  app.add_option("--dropout", a.dropout, "U-Net dropout (preset: 0.1)")->check(finite_in(0, 1, false, true));
  app.add_option("--steps", a.steps, "training steps (paper 800000, small 100000, tiny 200)")->check(whole_in(1, kNoMax));
  app.add_option("--batch", a.batch, "batch size (paper and small 128, tiny 16)")->check(positive_whole());
  app.add_option("--lr", a.lr, "Adam learning rate (preset: 2e-4; tiny 1e-3)")->check(finite_in(0, 10, true));
  app.add_option("--warmup", a.warmup, "linear learning-rate warmup steps (paper 5000, small 1000, tiny 20)")
      ->check(whole_in(0, kNoMax));
  app.add_option("--ema", a.ema, "EMA decay of the sampling weights, 0 = off (paper 0.9999, small 0.9995, tiny 0.99)")
      ->check(finite_in(0, 1, false, true));
  app.add_option("--clip", a.clip, "gradient-norm clipping, 0 = off (preset: 1)")->check(finite_in(0, kInf));
  app.add_option("--data-order", a.order, "batches: epochs (a seeded shuffle, each image once per epoch) or "
                                          "replacement (uniform draws)")
      ->capture_default_str()
      ->check(CLI::IsMember({"replacement", "epochs"}));
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
  app.add_option("--resume", a.resume, "continue training from this checkpoint (bit for bit)");
  app.add_option("--save-every", a.save_every, "checkpoint every N steps, 0: only at the end and on Ctrl-C "
                                               "(paper 10000, small 5000, tiny 0)")
      ->check(whole_in(0, kNoMax));
  app.add_option("--keep", a.keep, "checkpoints kept: checkpoint.safetensors and the K-1 before it")
      ->capture_default_str()
      ->check(positive_whole());
  app.add_option("--log-every", a.log_every, "progress line and train_log.csv row every N steps (preset: 100; tiny 20)")
      ->check(whole_in(1, kNoMax));
  app.add_option("--grid-every", a.grid_every, "every N steps: DIR/progress/grid-<step>.png, 100 samples with the EMA "
                                               "weights, 0 = off (paper 10000, small 5000, tiny 0)")
      ->check(whole_in(0, kNoMax));
  app.add_option("--fid-every", a.fid_every, "every N steps: FID of --fid-samples EMA samples against --fid-stats, "
                                             "logged as column fid (paper 50000, small 20000; 0 = off; needs --fid-stats)")
      ->check(whole_in(0, kNoMax));
  app.add_option("--fid-samples", a.fid_samples, "samples per FID during training (paper 10000, small 5000); the "
                                                 "published numbers use 50000 (docs/cifar10.md)")
      ->check(whole_in(2, 10000000));
  app.add_option("--fid-stats", a.fid_stats, "pytorch-fid statistics (.npz) of the training set: "
                                             "`fid DATA --save-stats FILE`");
  app.add_option("--fid-weights", a.fid_weights, "pytorch-fid's Inception weights as safetensors")->capture_default_str();
  app.add_option("--fid-batch", a.fid_batch, "images per Inception forward pass")->capture_default_str()
      ->check(positive_whole());
  app.add_option("--fid-sampler", a.fid_sampler, "sampler for the FID samples: ddpm, ddim, euler-a, dpm++2m, dpm++3m")
      ->capture_default_str()
      ->check(CLI::IsMember({"ddpm", "ddim", "euler-a", "dpm++2m", "dpm++3m"}));
  app.add_option("--fid-steps", a.fid_steps, "steps of the FID sampler (not ddpm)")->capture_default_str()
      ->check(positive_whole());
  app.add_option("--samples", a.samples, "images sampled at the end, 0: none (preset: 100; tiny 16)")
      ->check(whole_in(0, 10000000));
  app.add_option("--sample-batch", a.sample_batch, "images per sampling batch")->capture_default_str()
      ->check(positive_whole());
  app.add_option("--sampler", a.sampler,
                 "sampler for grids and the final samples: ddpm (T steps), ddim, euler-a, dpm++2m, dpm++3m")
      ->capture_default_str()
      ->check(CLI::IsMember({"ddpm", "ddim", "euler-a", "dpm++2m", "dpm++3m"}));
  app.add_option("--sample-steps,--ddim-steps", a.ddim_steps, "steps of the sampler (not ddpm)")
      ->capture_default_str()
      ->check(positive_whole());
  app.add_option("--variance", a.variance, "DDPM variance: large (beta_t, the paper's) or small (posterior)")
      ->capture_default_str()
      ->check(CLI::IsMember({"small", "large"}));
  app.add_option("--eta", a.eta, "DDIM eta (0 = deterministic)")->capture_default_str()->check(finite_in(0, 1));
  app.add_flag("--dry-run", a.dry_run, "load and check the data, build the model, print the configuration, exit");
  CLI11_PARSE(app, argc, argv);

  Ranks ranks;
  try {
    ranks = start_ranks(argc, argv);  // mpirun -np N: this process is one of N ranks
    Recipe r = preset(a.preset);
    auto pick = [](auto flag, auto dflt) { return flag < 0 ? dflt : flag; };
    r.T = pick(a.T, r.T);
    r.steps = pick(a.steps, r.steps);
    r.batch = pick(a.batch, r.batch);
    r.warmup = pick(a.warmup, r.warmup);
    r.save_every = pick(a.save_every, r.save_every);
    r.grid_every = pick(a.grid_every, r.grid_every);
    r.fid_samples = pick(a.fid_samples, r.fid_samples);
    r.log_every = pick(a.log_every, r.log_every);
    r.samples = pick(a.samples, r.samples);
    r.lr = pick(a.lr, r.lr);
    r.ema = pick(a.ema, r.ema);
    r.clip = pick(a.clip, r.clip);
    if (a.ch > 0) r.unet.ch = a.ch;
    if (a.dropout >= 0) r.unet.dropout = a.dropout;
    // FID during training only with reference statistics: the preset's interval when they are given.
    r.fid_every = a.fid_every >= 0 ? a.fid_every : (a.fid_stats.empty() ? 0 : r.fid_every);
    if (r.fid_every > 0 && a.fid_stats.empty())
      throw std::invalid_argument("--fid-every needs --fid-stats: pytorch-fid statistics of the training set "
                                  "(`fid " + a.data + " --save-stats stats.npz` writes them)");
    if (r.fid_every > 0 && r.fid_samples < 2) throw std::invalid_argument("--fid-samples must be at least 2");

    const Device dev = choose_device(a.device);  // refuses cuda without a device before loading anything
    apply_precision(a.precision, a.tf32, dev);
    apply_attention_kernel(a.attention, dev);
    check_cuda_graph(a.cuda_graph, dev);
    if (!a.dry_run && ranks.lead()) require_writable_folder("--out", a.out);  // fails now, not at the first checkpoint

    // The data, and the model sized to it.
    std::string kind;
    const ImageSet set = load_training_set(a.data, a.labels, kind);
    if (set.height != set.width)
      throw std::runtime_error("--data " + a.data + ": images are " + std::to_string(set.width) + "x" +
                               std::to_string(set.height) + "; the U-Net takes square images");
    const int64_t levels = static_cast<int64_t>(r.unet.ch_mult.size());
    if (set.height % (int64_t(1) << (levels - 1)) != 0)
      throw std::runtime_error("--data " + a.data + ": the image size " + std::to_string(set.height) +
                               " must be divisible by " + std::to_string(int64_t(1) << (levels - 1)) +
                               " (the U-Net halves it " + std::to_string(levels - 1) + " times)");
    if (a.class_cond && set.labels.empty())
      throw std::runtime_error("--class-cond needs labels: --data " + a.data + " has none" +
                               (kind == "npy" ? " (give --labels FILE.npy)" : ""));
    ModelInfo info;
    info.unet = r.unet;
    info.unet.in_ch = info.unet.out_ch = set.channels;
    info.unet.resolution = set.height;
    info.unet.num_classes = a.class_cond ? set.classes : 0;
    info.T = r.T;
    info.schedule = a.schedule;
    info.prediction = a.prediction;
    info.data = kind == "cifar10" ? "cifar10" : fs::path(a.data).filename().string();
    if (a.class_cond) info.class_names = set.class_names;
    const NoiseSchedule sched = NoiseSchedule::by_name(a.schedule, r.T);

    Generator init(a.seed);
    UNet<float> model(info.unet, init);
    model.to(dev);

    TensorDataset<float> images(image_tensor(set), a.class_cond ? set.labels : std::vector<int32_t>{},
                                a.order == "epochs" ? DataOrder::epochs : DataOrder::with_replacement, a.seed);
    RandomHorizontalFlip<float> flipped(images);
    BatchSource<float>& source = a.no_flip ? static_cast<BatchSource<float>&>(images) : flipped;

    // The FID network and the reference statistics, loaded before training so that a wrong
    // path fails now, not after hours.
    std::unique_ptr<FidInceptionV3<float>> inception;
    GaussianStats reference;
    if (r.fid_every > 0) {
      reference = load_gaussian_stats(a.fid_stats);
      if (reference.mu.size() != FidInceptionV3<float>::kFeatures)
        throw std::runtime_error("--fid-stats " + a.fid_stats + " holds statistics of " +
                                 std::to_string(reference.mu.size()) + " features, FID uses 2048");
      if (!fs::exists(a.fid_weights))
        throw std::runtime_error("--fid-weights " + a.fid_weights + " not found: convert pytorch-fid's "
                                 "pt_inception-2015-12-05-6726825d.pth with scripts/fid_weights_to_safetensors.py");
      Generator gi(0);
      inception = std::make_unique<FidInceptionV3<float>>(gi);
      load_fid_weights(a.fid_weights, *inception);
      inception->to(dev);
    }

    TrainOptions o;
    o.name = "train_cifar10";
    o.steps = r.steps;
    o.batch = r.batch;
    o.lr = r.lr;
    o.warmup = r.warmup;
    o.clip = r.clip;
    o.ema = r.ema;
    o.objective = objective_from_flags(a.prediction, a.min_snr);
    o.label_dropout = a.class_cond ? a.label_dropout : 0.0;
    o.null_class = a.class_cond ? set.classes : -1;
    o.seed = a.seed;
    o.log_every = r.log_every;
    o.save_every = r.save_every;
    o.keep = static_cast<int>(a.keep);
    o.out = a.out;
    o.resume = a.resume;
    o.identity = {{"model", info.json()}};
    o.comm = ranks.comm.get();
    o.cuda_graph = a.cuda_graph;
    Trainer<float, UNet<float>> trainer(model, sched, source, o);
    if (ranks.lead())
      std::printf("train_cifar10: preset %s, %s (%s): %lld images %lldx%lldx%lld%s, U-Net %lld parameters (ch %lld, "
                "dropout %.2f), T=%d %s, batch %lld, lr %g, warmup %lld, clip %g, EMA %g, %lld steps, on %s%s\n",
                a.preset.c_str(), a.data.c_str(), kind.c_str(), static_cast<long long>(set.n),
                static_cast<long long>(set.width), static_cast<long long>(set.height),
                static_cast<long long>(set.channels), a.no_flip ? "" : ", flips",
                static_cast<long long>(model.num_parameters()), static_cast<long long>(info.unet.ch), info.unet.dropout,
                r.T, a.schedule.c_str(), static_cast<long long>(r.batch), r.lr, static_cast<long long>(r.warmup), r.clip, r.ema,
                static_cast<long long>(r.steps), device_description(dev).c_str(), ranks.describe().c_str());
    if (r.fid_every > 0 && ranks.lead())
      std::printf("FID every %lld steps: %lld EMA samples (%s%s) against %s\n", static_cast<long long>(r.fid_every),
                  static_cast<long long>(r.fid_samples), a.fid_sampler.c_str(),
                  a.fid_sampler != "ddpm" ? (" " + std::to_string(a.fid_steps) + " steps").c_str() : "",
                  a.fid_stats.c_str());
    std::fflush(stdout);
    if (a.dry_run) return 0;

    SampleRequest req;
    req.guidance = a.class_cond ? a.guidance : 0.0;
    req.sampler = a.sampler;
    req.steps = a.sampler != "ddpm" ? a.ddim_steps : 0;
    req.eta = a.eta;
    req.variance = a.variance;
    req.batch = a.sample_batch;
    if (req.steps > r.T) throw std::invalid_argument("--sample-steps must be at most T = " + std::to_string(r.T));
    if (r.fid_every > 0 && a.fid_sampler != "ddpm" && a.fid_steps > r.T)  // unused without FID evaluations
      throw std::invalid_argument("--fid-steps must be at most T = " + std::to_string(r.T));
    const int64_t grid_n = info.unet.num_classes > 0 ? 10 * info.unet.num_classes : 100;
    auto grid_name = [&](int64_t step) {
      char name[64];
      std::snprintf(name, sizeof name, "grid-%08lld.png", static_cast<long long>(step));
      return fs::path(a.out) / "progress" / name;
    };

    if (r.fid_every > 0) {
      trainer.evaluate_every(r.fid_every, {"fid"}, [&](auto& t) {
        SampleRequest q = req;
        q.n = r.fid_samples;
        q.sampler = a.fid_sampler;
        q.steps = a.fid_sampler != "ddpm" ? a.fid_steps : 0;
        q.batch = std::max<int64_t>(a.sample_batch, 1);
        Generator srng(a.seed, uint64_t(5) << 40);  // the same noise at every evaluation
        const auto t0 = std::chrono::steady_clock::now();
        SampleResult res;
        t.with_ema_weights([&] { res = sample_images(model, info, q, srng, false); });
        const double ts = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        write_grid_png(grid_name(t.step()), res, info);  // the grid of this evaluation's samples
        const double fid = fid_of(*inception, sample_bytes(res), reference, a.fid_batch);
        std::printf("step %lld: FID %.4f (%lld EMA samples, %s%s, vs %s; sampling %.0f s, Inception %.0f s)\n",
                    static_cast<long long>(t.step()), fid, static_cast<long long>(q.n), q.sampler.c_str(),
                    q.sampler != "ddpm" ? (" " + std::to_string(q.steps) + " steps").c_str() : "",
                    a.fid_stats.c_str(), ts,
                    std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() - ts);
        std::fflush(stdout);
        return std::map<std::string, double>{{"fid", fid}};
      });
    }
    if (r.grid_every > 0)
      trainer.every(r.grid_every, [&](auto& t) {
        if (r.fid_every > 0 && t.step() % r.fid_every == 0) return;  // the FID evaluation wrote this step's grid
        SampleRequest q = req;
        q.n = grid_n;
        q.batch = std::min<int64_t>(q.n, a.sample_batch);
        Generator srng(a.seed, uint64_t(2) << 40);
        SampleResult res;
        t.with_ema_weights([&] { res = sample_images(model, info, q, srng, false); });
        write_grid_png(grid_name(t.step()), res, info);
      });

    const TrainResult tr = trainer.run();
    if (tr.status == TrainStatus::interrupted) return 130;
    if (!ranks.lead()) return 0;  // rank 0 samples and writes
    std::printf("trained %lld steps in %.0f s; checkpoint %s\n", static_cast<long long>(tr.step - tr.start_step),
                tr.seconds, tr.checkpoint.c_str());
    if (r.samples <= 0) return 0;

    Generator srng(a.seed, uint64_t(2) << 40);
    req.n = r.samples;
    const auto ts = std::chrono::steady_clock::now();
    SampleResult res;
    trainer.with_ema_weights([&] { res = sample_images(model, info, req, srng); });
    write_sample_files(a.out, res, info);
    std::printf("sampled %lld images on %s in %.0f s (%s); wrote %s/{grid.png, process.png, samples.npy, labels.npy}\n",
                static_cast<long long>(r.samples), device_name(dev),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - ts).count(), a.sampler.c_str(),
                a.out.c_str());
    return 0;
  } catch (const std::exception& e) {
    return ranks.fail("train_cifar10", e);
  }
}
