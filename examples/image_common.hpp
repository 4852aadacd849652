// Shared by the image examples (train_mnist, train_cifar10, sample): the model's description in
// checkpoint metadata, and sampling a labelled batch of images with classifier-free guidance,
// with its output files (grids, the denoising process, samples.npy, labels.npy).
#pragma once

#include <diffuse/diffuse.hpp>
#include <diffuse/diffusion/guidance.hpp>
#include <diffuse/viz/image_grid.hpp>
#include <diffuse/models/unet.hpp>
#include <diffuse/io/npy.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace diffuse::examples {

// What a checkpoint must record to be sampled from without the trainer's flags.
// train_mnist's checkpoints hold the first five keys (their resume compares this text, so it
// stays as it was); train_cifar10's add the data set and its class names.
struct ModelInfo {
  UNetConfig unet;
  int T = 200;
  std::string schedule = "linear";
  std::string prediction = "eps";  // what the network predicts (parse_prediction): eps, x0, v
  int64_t digit = -1;  // MNIST: >= 0 trained on this digit only (unconditional model)
  std::string resize = "area";  // MNIST: how 28x28 became the model's size
  std::string data = "mnist";   // what the model was trained on: mnist, cifar10, or a file or folder
  std::vector<std::string> class_names;  // class k's name (empty: the number)

  std::string json() const {
    nlohmann::json j{{"unet", unet_config_to_json(unet)}, {"T", T}, {"schedule", schedule}};
    if (prediction != "eps") j["prediction"] = prediction;  // older readers: eps, the only one then
    if (data == "mnist") {
      j["digit"] = digit;
      j["resize"] = resize;
    } else {
      j["data"] = data;
      j["class_names"] = class_names;
    }
    return j.dump();
  }
  static ModelInfo from_json(const std::string& s) {
    const nlohmann::json j = nlohmann::json::parse(s);
    ModelInfo m;
    m.unet = unet_config_from_json(j.at("unet"));
    m.T = j.at("T").get<int>();
    m.schedule = j.at("schedule").get<std::string>();
    m.prediction = j.value("prediction", std::string("eps"));
    parse_prediction(m.prediction);  // refuses an unknown one
    m.data = j.value("data", std::string("mnist"));
    m.digit = j.value("digit", int64_t(-1));
    m.resize = j.value("resize", std::string("area"));
    m.class_names = j.value("class_names", std::vector<std::string>{});
    return m;
  }
  static ModelInfo from_checkpoint(const safetensors::File& f) {
    auto it = f.metadata().find("model");
    if (it == f.metadata().end())
      throw std::runtime_error("'" + f.path() + "' has no 'model' metadata: not a train_mnist or train_cifar10 checkpoint");
    return from_json(it->second);
  }
  // "3" or the class's name.
  std::string class_name(int64_t k) const {
    return k >= 0 && k < static_cast<int64_t>(class_names.size()) ? class_names[static_cast<size_t>(k)]
                                                                   : std::to_string(k);
  }
};

struct SampleRequest {
  int64_t n = 100;         // images
  double guidance = 0.0;   // classifier-free guidance weight w (class-conditional models)
  std::string sampler = "ddpm";   // parse_sampler: ddpm, ddim, euler-a, dpm++2m, dpm++3m
  std::string variance = "large";  // DDPM: large (beta_t) or small (posterior)
  int steps = 0;           // steps of every sampler but DDPM (0: T)
  std::string spacing = "uniform";  // their timesteps (parse_spacing)
  double eta = 0.0;        // DDIM
  int64_t batch = 100;     // images per sampling batch (a guided batch runs 2x this through the net)
  int process_frames = 8;  // columns of process.png
};

struct SampleResult {
  Tensor<float> images;          // [n, H, W, C] in [-1, 1]
  std::vector<int32_t> labels;   // n labels (the digit for a single-digit model)
  Tensor<float> process;         // [rows * frames, H, W, C]: row r = image r of the first batch
  std::vector<int> process_t;    // the timestep of each column
  int64_t process_rows = 0;
};

// Samples req.n images with the model as it is (swap in the EMA weights before calling), on the
// model's device: the images stay there until a batch is done. Class-conditional models get
// labels 0,1,..,K-1,0,1,.. so that every batch holds every class; the first batch's first K
// images (at most 8 for an unconditional model) are traced through the process.
inline SampleResult sample_images(const UNet<float>& model, const ModelInfo& info, const SampleRequest& req,
                                  Generator& g, bool progress = true) {
  const NoiseSchedule sched = NoiseSchedule::by_name(info.schedule, info.T);
  const Prediction pred = parse_prediction(info.prediction);
  // The network's output as eps, whatever it predicts (before guidance combines two of them).
  auto net = [&model, &sched, pred](const Tensor<float>& x, const std::vector<int32_t>& t, const std::vector<int32_t>* y) {
    NoGrad ng;
    return prediction_to_eps<float>(sched, pred, model(Var<float>(x), t, y).value(), x, t);
  };
  const int64_t R = info.unet.resolution, K = info.unet.num_classes, C = info.unet.in_ch, P = R * R * C;
  SampleOptions so;
  so.device = model.device();
  so.clip_x0 = true;
  so.variance = parse_variance(req.variance);
  so.steps = req.steps;
  so.spacing = parse_spacing(req.spacing);
  so.eta = req.eta;
  const SamplerKind kind = parse_sampler(req.sampler);
  SampleResult out;
  out.images = Tensor<float>({req.n, R, R, C});
  out.labels.resize(static_cast<size_t>(req.n));
  for (int64_t i = 0; i < req.n; ++i)
    out.labels[static_cast<size_t>(i)] = K > 0 ? static_cast<int32_t>(i % K) : static_cast<int32_t>(std::max<int64_t>(info.digit, 0));
  const int total = kind == SamplerKind::DDPM ? info.T : (req.steps > 0 ? req.steps : info.T);
  const int F = std::max(2, req.process_frames);
  out.process_rows = std::min<int64_t>(K > 0 ? K : 8, std::min(req.batch, req.n));
  std::vector<Tensor<float>> frames;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t b0 = 0; b0 < req.n; b0 += req.batch) {
    const int64_t B = std::min(req.batch, req.n - b0);
    std::vector<int32_t> y(out.labels.begin() + b0, out.labels.begin() + b0 + B);
    EpsModel<float> eps;
    if (K > 0) {
      ClassEpsModel<float> f = [&](const Tensor<float>& x, const std::vector<int32_t>& t, const std::vector<int32_t>& yy) {
        return net(x, t, &yy);
      };
      eps = guided_eps_model<float>(f, y, static_cast<int32_t>(K), req.guidance);
    } else {
      eps = [&](const Tensor<float>& x, const std::vector<int32_t>& t) { return net(x, t, nullptr); };
    }
    SampleObserver<float> obs;
    if (b0 == 0)
      obs = [&](int remaining, const Tensor<float>& x) {
        for (int k = 0; k < F; ++k)
          if (remaining == total - (total * k) / (F - 1)) {
            frames.push_back(x.to(Device::CPU));
            out.process_t.push_back(remaining);
          }
      };
    const Tensor<float> s = sample_with<float>(kind, sched, eps, {B, R, R, C}, g, so, obs).cpu();
    std::copy(s.data(), s.data() + s.size(), out.images.data() + b0 * P);
    if (progress) {
      const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double ips = static_cast<double>(b0 + B) / el;
      std::printf("sampled %lld/%lld images  %.1f images/s  ETA %.0f s\n", static_cast<long long>(b0 + B),
                  static_cast<long long>(req.n), ips, static_cast<double>(req.n - b0 - B) / ips);
      std::fflush(stdout);
    }
  }
  const int64_t rows = out.process_rows, nf = static_cast<int64_t>(frames.size());
  out.process = Tensor<float>({rows * nf, R, R, C});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < nf; ++k)
      std::copy(frames[k].data() + r * P, frames[k].data() + (r + 1) * P, out.process.data() + (r * nf + k) * P);
  return out;
}

// A grid of samples as a PNG: one row per class for a class-conditional model (the first
// grid_cols samples of each, the row captioned with the class's name), else the first
// grid_cols^2 samples.
inline void write_grid_png(const std::filesystem::path& path, const SampleResult& s, const ModelInfo& info,
                           int64_t grid_cols = 10) {
  if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path());
  const int64_t num_classes = info.unet.num_classes;
  const int64_t n = s.images.size(0), R = s.images.size(1), C = s.images.size(3), P = R * R * C;
  plot::GridOptions go;
  std::vector<float> grid;
  int64_t cols = grid_cols, shown = 0;
  if (num_classes > 0) {
    // Row d: the first grid_cols samples of digit d.
    cols = std::min(grid_cols, n / num_classes);
    if (cols < 1) cols = 1;
    for (int64_t d = 0; d < num_classes; ++d) {
      go.row_labels.push_back(info.class_name(d));
      int64_t got = 0;
      for (int64_t i = 0; i < n && got < cols; ++i)
        if (s.labels[static_cast<size_t>(i)] == d) {
          grid.insert(grid.end(), s.images.data() + i * P, s.images.data() + (i + 1) * P);
          ++got;
        }
      for (; got < cols; ++got) grid.insert(grid.end(), static_cast<size_t>(P), -1.0f);  // blank
    }
    shown = num_classes * cols;
  } else {
    shown = std::min<int64_t>(n, grid_cols * grid_cols);
    grid.assign(s.images.data(), s.images.data() + shown * P);
  }
  if (R >= 32) go.scale = 2;  // CIFAR's 32x32: a 10x10 grid fits a screen at 2x
  plot::image_grid(grid.data(), shown, R, R, C, cols, go).write_png(path.string());
}

// The samples as bytes, NHWC (plot::to_byte, what samples.npy and the grids hold).
inline ImageSet sample_bytes(const SampleResult& s) {
  ImageSet im;
  im.n = s.images.size(0);
  im.height = s.images.size(1);
  im.width = s.images.size(2);
  im.channels = s.images.size(3);
  im.pixels.resize(s.images.size());
  for (size_t i = 0; i < im.pixels.size(); ++i) im.pixels[i] = plot::to_byte(s.images[i]);
  return im;
}

// DIR/grid.png, DIR/process.png, DIR/samples.npy (uint8 [N, C, H, W]) and DIR/labels.npy (int64 [N]).
inline void write_sample_files(const std::filesystem::path& dir, const SampleResult& s, const ModelInfo& info,
                               int64_t grid_cols = 10) {
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  const int64_t num_classes = info.unet.num_classes;
  const int64_t n = s.images.size(0), R = s.images.size(1), C = s.images.size(3);
  const ImageSet im = sample_bytes(s);
  std::vector<uint8_t> bytes(im.pixels.size());  // NHWC -> NCHW, the layout PyTorch writes
  for (int64_t i = 0; i < n; ++i)
    for (int64_t p = 0; p < R * R; ++p)
      for (int64_t c = 0; c < C; ++c)
        bytes[static_cast<size_t>((i * C + c) * R * R + p)] = im.pixels[static_cast<size_t>((i * R * R + p) * C + c)];
  npy::save<uint8_t>((dir / "samples.npy").string(), bytes.data(), {n, C, R, R});
  std::vector<int64_t> lab(s.labels.begin(), s.labels.end());
  npy::save<int64_t>((dir / "labels.npy").string(), lab.data(), {n});
  write_grid_png(dir / "grid.png", s, info, grid_cols);
  plot::GridOptions gp;
  if (R >= 32) gp.scale = 2;
  if (num_classes > 0)
    for (int64_t r = 0; r < s.process_rows; ++r) gp.row_labels.push_back(info.class_name(s.labels[static_cast<size_t>(r)]));
  for (int t : s.process_t) gp.col_labels.push_back("t=" + std::to_string(t));
  const int64_t nf = static_cast<int64_t>(s.process_t.size());
  if (nf > 0)
    plot::image_grid(s.process.data(), s.process.size(0), R, R, C, nf, gp).write_png((dir / "process.png").string());
}

}  // namespace diffuse::examples
