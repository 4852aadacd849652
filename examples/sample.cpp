// sample: images from a train_mnist or train_cifar10 checkpoint, with DDPM, DDIM, Euler-ancestral
// or DPM-Solver++ (2M, 3M), any number of steps and timestep spacing, and classifier-free guidance. Writes DIR/grid.png, DIR/process.png,
// DIR/samples.npy (uint8 [N, C, H, W]) and DIR/labels.npy (int64 [N]), the files the trainers
// write, so mnist_classifier and fid score either.
// --device cuda samples on the GPU (the model moved there; the sampler's draws are the CPU's
// Philox streams, so a seed gives the same images on either device, up to float rounding).
#include <CLI/CLI.hpp>

#include "device_choice.hpp"
#include "flag_checks.hpp"
#include "image_common.hpp"

using namespace diffuse;
using namespace diffuse::examples;
namespace fs = std::filesystem;

int main(int argc, char** argv) {
  std::string checkpoint, out = "out/sample", sampler = "ddpm", variance = "large", device, spacing = "uniform";
  int64_t n = 100, batch = 100;
  int steps = 50;
  double guidance = 0.3, eta = 0.0;
  uint64_t seed = 0;
  bool raw = false;
  CLI::App app{"Sample images from a train_mnist or train_cifar10 checkpoint."};
  app.add_option("checkpoint", checkpoint, "checkpoint.safetensors written by train_mnist or train_cifar10")->required();
  app.add_option("-n,--n", n, "number of images (class-conditional: the classes in turn)")
      ->capture_default_str()
      ->check(positive_whole());
  app.add_option("--guidance", guidance, "guidance weight w: eps = (1+w) eps(x,y) - w eps(x,null); 0 = off")
      ->capture_default_str()
      ->check(finite_in(-1, 100));
  app.add_option("--sampler", sampler,
                 "ddpm (ancestral, all T steps), ddim, euler-a (Euler-ancestral), dpm++2m or dpm++3m (DPM-Solver++ "
                 "multistep, second or third order)")
      ->capture_default_str()
      ->check(CLI::IsMember({"ddpm", "ddim", "euler-a", "dpm++2m", "dpm++3m"}));
  app.add_option("--steps", steps, "steps = network evaluations of every sampler but ddpm (which takes T)")
      ->capture_default_str()
      ->check(positive_whole());
  app.add_option("--spacing", spacing,
                 "their timesteps: uniform (i T / steps, DDIM's), linspace (T-1 down to 0), trailing (from T-1), "
                 "quadratic")
      ->capture_default_str()
      ->check(CLI::IsMember({"uniform", "linspace", "trailing", "quadratic"}));
  app.add_option("--variance", variance, "DDPM variance: large (beta_t) or small (posterior)")
      ->capture_default_str()
      ->check(CLI::IsMember({"small", "large"}));
  app.add_option("--eta", eta, "DDIM eta (0 = deterministic)")->capture_default_str()->check(finite_in(0, 1));
  app.add_option("--batch", batch, "images per sampling batch")->capture_default_str()->check(positive_whole());
  app.add_option("--seed", seed, "random seed")->capture_default_str()->check(diffuse::examples::seed_value());
  app.add_option("--out", out, "output directory")->capture_default_str();
  app.add_option("--device", device, "run the network on cpu or cuda (default: cuda when a CUDA device is usable, else cpu)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_flag("--raw", raw, "use the raw weights instead of their EMA");
  CLI11_PARSE(app, argc, argv);

  try {
    const Device dev = choose_device(device);  // refuses cuda without a device before loading anything
    require_writable_folder("--out", out);       // before the sampling, not after it
    const safetensors::File f = safetensors::File::read(checkpoint);
    const ModelInfo info = ModelInfo::from_checkpoint(f);
    Generator init(0);
    UNet<float> model(info.unet, init);
    const bool has_ema = f.contains("ema." + model.named_parameters().front().first);
    if (!raw && !has_ema) std::printf("note: %s has no EMA weights; using the raw ones\n", checkpoint.c_str());
    load_weights(f, model, raw || !has_ema ? "" : "ema.");
    model.to(dev);
    model.eval();  // no dropout while sampling
    const bool stepped = sampler != "ddpm";
    if (stepped && steps > info.T)
      throw std::invalid_argument("--steps " + std::to_string(steps) + " is more than the model's T = " +
                                  std::to_string(info.T));
    SampleRequest req;
    req.n = n;
    req.guidance = info.unet.num_classes > 0 ? guidance : 0.0;
    req.sampler = sampler;
    req.steps = stepped ? steps : 0;
    req.spacing = spacing;
    req.eta = eta;
    req.variance = variance;
    req.batch = batch;
    std::printf("sample: %s (%s, %lldx%lld, T=%d %s), %lld images, %s%s, guidance %.2f, on %s\n", checkpoint.c_str(),
                info.unet.num_classes > 0 ? "class-conditional"
                : info.data == "mnist" ? ("digit " + std::to_string(info.digit)).c_str() : "unconditional",
                static_cast<long long>(info.unet.resolution), static_cast<long long>(info.unet.resolution), info.T,
                info.schedule.c_str(), static_cast<long long>(n), sampler.c_str(),
                stepped ? (" " + std::to_string(steps) + " steps, " + spacing + " spacing").c_str() : "", req.guidance,
                device_description(dev).c_str());
    Generator g(seed, uint64_t(2) << 40);
    const auto t0 = std::chrono::steady_clock::now();
    const SampleResult res = sample_images(model, info, req, g);
    write_sample_files(out, res, info);
    std::printf("sampled %lld images in %.1f s; wrote %s/{grid.png, process.png, samples.npy, labels.npy}\n",
                static_cast<long long>(n), std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                out.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sample: error: %s\n", e.what());
    return 1;
  }
}
