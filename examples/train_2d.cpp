// train_2d: a DDPM on a 2-D point cloud (the report's first step).
//
// Trains the toy MLP epsilon model, samples 2,000 points, writes
//   DIR/samples.csv, DIR/samples.png (data | samples), DIR/process.png (x_T .. x_0),
//   DIR/checkpoint.safetensors
// and prints the energy distance of the samples to held-out data next to the
// floor (two independent data draws) and to N(0, I) noise. --device cuda trains and samples on
// the GPU (the same model, moved there); checkpoints are the same files on either device.
#include <CLI/CLI.hpp>
#include <diffuse/data/points2d.hpp>
#include <diffuse/diffuse.hpp>
#include <diffuse/eval/metrics2d.hpp>
#include <diffuse/viz/plot.hpp>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "device_choice.hpp"

using namespace diffuse;
using namespace diffuse::examples;
namespace fs = std::filesystem;

namespace {

struct Args {
  bool tf32 = false;
  std::string dataset = "six", data, image, schedule = "linear", sampler = "ddpm", variance = "large", out = "out/2d";
  std::string resume, lr_decay = "constant", device;
  int64_t steps = 10000, batch = 512, warmup = 100, save_every = 0, log_every = 500;
  int T = 200, ddim_steps = 50, hidden = 128, layers = 3;
  double lr = 3e-3, ema = 0.995, clip = 1.0, eta = 0.0;
  uint64_t seed = 0;
  int n_samples = 2000;
};

volatile std::sig_atomic_t g_stop = 0;

std::string config_json(const Args& a) {
  nlohmann::json j = {{"hidden", a.hidden}, {"layers", a.layers}, {"T", a.T}, {"schedule", a.schedule}};
  return j.dump();
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  CLI::App app{"Train a DDPM on a 2-D point cloud and sample from it."};
  app.add_option("--dataset", a.dataset, "built-in dataset: six, moons, swissroll, 8gaussians, checkerboard")
      ->capture_default_str();
  app.add_option("--data", a.data, "your own points: a CSV file with x,y per line (overrides --dataset)");
  app.add_option("--image", a.image, "your own shape: an image whose dark pixels become points (overrides --dataset)");
  app.add_option("--steps", a.steps, "training steps")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--batch", a.batch, "batch size")->capture_default_str()->check(CLI::PositiveNumber);
  app.add_option("--T", a.T, "diffusion steps")->capture_default_str()->check(CLI::Range(2, 100000));
  app.add_option("--schedule", a.schedule, "noise schedule: linear, cosine")->capture_default_str();
  app.add_option("--sampler", a.sampler, "sampler: ddpm, ddim")->capture_default_str();
  app.add_option("--variance", a.variance, "DDPM variance: large (beta_t) or small (posterior)")->capture_default_str();
  app.add_option("--ddim-steps", a.ddim_steps, "DDIM sampling steps")->capture_default_str();
  app.add_option("--eta", a.eta, "DDIM eta (0 = deterministic)")->capture_default_str();
  app.add_option("--lr", a.lr, "Adam learning rate")->capture_default_str();
  app.add_option("--lr-decay", a.lr_decay, "learning rate after warmup: cosine (to 0 at the last step), constant")
      ->capture_default_str()
      ->check(CLI::IsMember({"cosine", "constant"}));
  app.add_option("--warmup", a.warmup, "learning-rate warmup steps")->capture_default_str();
  app.add_option("--ema", a.ema, "EMA decay of the weights used for sampling (0 = off)")->capture_default_str();
  app.add_option("--clip", a.clip, "gradient-norm clipping (0 = off)")->capture_default_str();
  app.add_option("--hidden", a.hidden, "MLP width")->capture_default_str();
  app.add_option("--layers", a.layers, "MLP hidden layers")->capture_default_str();
  app.add_option("--samples", a.n_samples, "number of points to generate")->capture_default_str();
  app.add_option("--seed", a.seed, "random seed")->capture_default_str();
  app.add_option("--out", a.out, "output directory")->capture_default_str();
  app.add_option("--save-every", a.save_every, "also checkpoint every N steps (0 = only at the end)");
  app.add_option("--log-every", a.log_every, "progress line every N steps")->capture_default_str();
  app.add_option("--resume", a.resume, "continue training from this checkpoint");
  app.add_option("--device", a.device, "train and sample on cpu or cuda (default: cuda when a CUDA device is usable, "
                                       "else cpu); checkpoints are the same files on both")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_flag("--tf32", a.tf32, "with --device cuda: TF32 tensor cores for the GEMMs and convolutions (inputs rounded to "
                             "10 mantissa bits; FP32 otherwise)");
  CLI11_PARSE(app, argc, argv);

  try {
    std::unique_ptr<data2d::Dataset2D> data;
    const Device dev = choose_device(a.device);  // refuses cuda without a device before loading anything
    apply_tf32(a.tf32, dev);
    if (!a.data.empty())
      data = data2d::load_csv(a.data);
    else if (!a.image.empty())
      data = data2d::load_image(a.image);
    else
      data = data2d::make_dataset(a.dataset);
    if (a.sampler != "ddpm" && a.sampler != "ddim")
      throw std::invalid_argument("unknown sampler '" + a.sampler + "' (ddpm, ddim)");
    const NoiseSchedule sched = NoiseSchedule::by_name(a.schedule, a.T);
    SampleOptions so;
    so.variance = parse_variance(a.variance);
    so.steps = a.ddim_steps;
    so.eta = a.eta;
    so.device = dev;
    fs::create_directories(a.out);

    Generator init(a.seed);
    ToyMLPConfig cfg;
    cfg.hidden = a.hidden;
    cfg.layers = a.layers;
    ToyMLP<float> model(cfg, init);
    model.to(dev);  // the optimiser's state is made beside the weights
    AdamOptions ao;
    ao.lr = a.lr;
    Adam<float> opt(model.named_parameters(), ao);
    EMA<float> ema(model.named_parameters(), a.ema > 0 ? a.ema : 0.0);
    Generator rng(a.seed, uint64_t(1) << 40);  // training stream, apart from the init stream
    int64_t step = 0;
    const std::string ckpt = (fs::path(a.out) / "checkpoint.safetensors").string();
    const safetensors::Metadata meta = {{"config", config_json(a)}, {"dataset", data->name()}};
    if (!a.resume.empty()) {
      TrainState st = load_checkpoint<float>(a.resume, model, &opt, &ema);
      if (st.metadata.count("config") && st.metadata.at("config") != config_json(a))
        throw std::runtime_error("'" + a.resume + "' was trained with " + st.metadata.at("config") +
                                 ", this run asks for " + config_json(a));
      step = st.step;
      rng = st.rng;
      std::printf("resumed from %s at step %lld\n", a.resume.c_str(), static_cast<long long>(step));
    }
    auto save = [&](int64_t at) { save_checkpoint<float>(ckpt, model, &opt, &ema, at, rng, meta); };
    std::printf("train_2d: %s, %lld parameters, T=%d %s, batch %lld, %lld steps, on %s\n", data->name().c_str(),
                static_cast<long long>(model.num_parameters()), a.T, a.schedule.c_str(),
                static_cast<long long>(a.batch), static_cast<long long>(a.steps),
                device_description(dev).c_str());
    std::signal(SIGINT, [](int) { g_stop = 1; });

    auto eps_model = [&](const Var<float>& x, const std::vector<int32_t>& t) { return model(x, t); };
    Tensor<float> x0({a.batch, 2});
    const auto t0 = std::chrono::steady_clock::now();
    const int64_t start = step;
    double loss_acc = 0;
    int64_t loss_n = 0;
    for (; step < a.steps && !g_stop; ++step) {
      data->sample(rng, static_cast<size_t>(a.batch), x0.data());
      auto nb = make_noised_batch(sched, x0.to(dev), rng);
      const double lr = a.lr_decay == "cosine" ? warmup_cosine_lr(a.lr, step, a.warmup, a.steps)
                                               : warmup_lr(a.lr, step, a.warmup);
      opt.zero_grad();
      Var<float> loss = epsilon_loss<float>(eps_model, nb);
      backward(loss);
      if (a.clip > 0) clip_grad_norm(opt.params(), a.clip);
      // Read after the backward is queued (on a GPU the read waits for it); a non-finite loss
      // stops the run before the update.
      const float lv = loss.value().cpu()[0];
      if (!std::isfinite(lv))
        throw std::runtime_error("loss is " + std::to_string(lv) + " at step " + std::to_string(step) +
                                 "; try a lower --lr (last good checkpoint: " + ckpt + ")");
      opt.set_lr(lr);
      if (a.ema > 0) opt.step(ema);
      else opt.step();
      loss_acc += lv;
      ++loss_n;
      if ((step + 1) % a.log_every == 0 || step + 1 == a.steps) {
        const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const double sps = static_cast<double>(step + 1 - start) / el;
        std::printf("step %7lld/%lld  loss %.4f  %.0f steps/s  ETA %.0f s\n", static_cast<long long>(step + 1),
                    static_cast<long long>(a.steps), loss_acc / loss_n, sps, (a.steps - step - 1) / sps);
        std::fflush(stdout);
        loss_acc = 0;
        loss_n = 0;
      }
      if (a.save_every > 0 && (step + 1) % a.save_every == 0) save(step + 1);
    }
    save(step);
    if (g_stop) {
      std::printf("interrupted: checkpoint saved at step %lld in %s\n", static_cast<long long>(step), ckpt.c_str());
      return 130;
    }

    // Sample with the EMA weights, on the training device.
    if (a.ema > 0) ema.swap_into_model();
    Generator srng(a.seed, uint64_t(2) << 40);
    EpsModel<float> f = [&](const Tensor<float>& x, const std::vector<int32_t>& t) {
      NoGrad ng;
      return model(Var<float>(x), t).value();
    };
    const int nframes = 6;
    std::vector<std::pair<int, Tensor<float>>> frames;
    const int total = a.sampler == "ddpm" ? a.T : a.ddim_steps;
    SampleObserver<float> obs = [&](int remaining, const Tensor<float>& x) {
      for (int k = 0; k < nframes; ++k)
        if (remaining == total - (total * k) / (nframes - 1)) frames.emplace_back(remaining, x.to(Device::CPU));
    };
    const Shape shape{a.n_samples, 2};
    const Tensor<float> s = (a.sampler == "ddpm" ? ddpm_sample<float>(sched, f, shape, srng, so, obs)
                                                 : ddim_sample<float>(sched, f, shape, srng, so, obs))
                                .cpu();
    if (a.ema > 0) ema.swap_into_model();

    // Quality: energy distance in the model's (normalised) space, averaged
    // over kEvalSets held-out sets. One draw is too noisy to judge by: two
    // independent 2,000-point draws of the swiss roll can be 3.4x apart from
    // a third (docs/results.md); with 8 sets the worst seen was 2.3x.
    constexpr int kEvalSets = 8;
    Generator erng(a.seed ^ 0x5eedULL, uint64_t(3) << 40);
    const size_t n = static_cast<size_t>(a.n_samples);
    std::vector<float> held(2 * n), other(2 * n), shown, noise(2 * n);
    erng.normal(noise.data(), noise.size());
    double ed = 0, floor = 0, ed_noise = 0;
    for (int k = 0; k < kEvalSets; ++k) {
      data->sample(erng, n, held.data());
      data->sample(erng, n, other.data());
      ed += metrics::energy_distance(s.data(), n, held.data(), n) / kEvalSets;
      floor += metrics::energy_distance(other.data(), n, held.data(), n) / kEvalSets;
      ed_noise += metrics::energy_distance(noise.data(), n, held.data(), n) / kEvalSets;
      if (k == 0) shown = other;
    }

    // Outputs, in the data's own coordinates.
    std::vector<float> out(s.begin(), s.end());
    data->to_data_space(out.data(), n);
    data->to_data_space(shown.data(), n);
    {
      const std::string p = (fs::path(a.out) / "samples.csv").string();
      std::ofstream o(p);
      for (size_t i = 0; i < n; ++i) o << out[2 * i] << ',' << out[2 * i + 1] << '\n';
      if (!o) throw std::runtime_error("cannot write '" + p + "'");
    }
    plot::scatter_panels({{"data", shown.data(), n, plot::kBlue}, {"samples", out.data(), n, plot::kOrange}}, 360,
                         (fs::path(a.out) / "samples.png").string());
    std::vector<std::vector<float>> fr;
    std::vector<plot::Panel> panels;
    for (auto& [rem, x] : frames) fr.emplace_back(x.begin(), x.end());
    for (size_t k = 0; k < frames.size(); ++k) {
      data->to_data_space(fr[k].data(), n);
      panels.push_back({"t=" + std::to_string(frames[k].first), fr[k].data(), n, plot::kPurple});
    }
    plot::scatter_panels(panels, 220, (fs::path(a.out) / "process.png").string(),
                         plot::robust_bounds({panels.back()}, 0.005, 0.995, 0.6));
    std::printf("wrote %s/{samples.csv, samples.png, process.png, checkpoint.safetensors}\n", a.out.c_str());
    std::printf("energy distance to held-out data (V-statistic; %zu points vs %d held-out sets of %zu, mean):\n", n,
                kEvalSets, n);
    std::printf("  samples %.5f   floor (data vs data) %.5f   N(0,I) noise %.5f   samples/floor %.2f\n", ed, floor,
                ed_noise, ed / floor);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_2d: error: %s\n", e.what());
    return 1;
  }
}
