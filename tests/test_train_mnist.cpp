// train_mnist and sample end to end on a tiny IDX dataset the test writes:
// the output files and their formats, exact resume (a run split in two by a
// checkpoint gives the same samples, byte for byte, as the straight run),
// the checkpoint on Ctrl-C, sampling from the checkpoint, and clear errors.
#include <catch2/catch.hpp>

#include "kernel_seed.hpp"

#include "fake_mnist.hpp"
#include "run_command.hpp"

#include <diffuse/diffuse.hpp>
#include <diffuse/io/idx.hpp>
#include <diffuse/io/npy.hpp>
#include <diffuse/io/safetensors.hpp>
#include <diffuse/io/stb.hpp>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <sys/wait.h>

using namespace diffuse;
namespace fs = std::filesystem;
using diffuse::testing::write_dataset;

namespace {

const fs::path kWork = fs::path(DIFFUSE_BINARY_DIR) / "tests" / "train_mnist_cli";
const std::string kTrain = std::string(DIFFUSE_BINARY_DIR) + "/examples/train_mnist";
const std::string kSample = std::string(DIFFUSE_BINARY_DIR) + "/examples/sample";
const std::string kClassifier = std::string(DIFFUSE_BINARY_DIR) + "/examples/mnist_classifier";
// train_mnist built with the CUDA emulation: --device cuda runs the CUDA backend's code on the CPU.
const std::string kTrainEmulated = std::string(DIFFUSE_BINARY_DIR) + "/tests/train_mnist_emulated";

// Runs a command, returns its exit status and puts stdout+stderr in out.
int run(const std::string& cmd, std::string* out = nullptr, const fs::path& log = kWork / "last_command.log") {
  return diffuse::testing::run_command(cmd, log, out);
}

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// The spread (max - min) of an 8-bit image file's pixels: 0 for a blank or constant grid, which
// a sampler that returned zeros (or NaN, written as 0) would produce.
int png_spread(const fs::path& p) {
  int w = 0, h = 0, c = 0;
  unsigned char* px = stbi_load(p.string().c_str(), &w, &h, &c, 1);
  if (!px) return -1;
  const auto [lo, hi] = std::minmax_element(px, px + static_cast<ptrdiff_t>(w) * h);
  const int spread = *hi - *lo;
  stbi_image_free(px);
  return spread;
}

int npy_u8_spread(const fs::path& p) {
  const std::vector<uint8_t> v = npy::load(p.string()).as<uint8_t>();
  if (v.empty()) return -1;
  const auto [lo, hi] = std::minmax_element(v.begin(), v.end());
  return *hi - *lo;
}

const std::string kCommon = " --ch 8 --T 50 --batch 8 --log-every 2 --sample-batch 10 --seed 3";

}  // namespace

TEST_CASE("train_mnist writes its files, resumes exactly and saves on Ctrl-C; sample reads the checkpoint") {
  fs::remove_all(kWork);
  fs::create_directories(kWork);
  const fs::path data = kWork / "data";
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed << " (DIFFUSE_TEST_SEED replays it)");
  write_dataset(data, 200, 40, seed);
  const std::string d = " --data '" + data.string() + "'";

  // Straight: 6 steps.
  std::string out;
  REQUIRE(run(kTrain + d + kCommon + " --samples 20 --steps 6 --out '" + (kWork / "straight").string() + "'", &out) == 0);
  CHECK(out.find("loss") != std::string::npos);
  CHECK(out.find("images/s") != std::string::npos);
  CHECK(out.find("ETA") != std::string::npos);
  for (const char* f : {"grid.png", "process.png", "samples.npy", "labels.npy", "checkpoint.safetensors"})
    CHECK(fs::exists(kWork / "straight" / f));
  const npy::Array s = npy::load((kWork / "straight" / "samples.npy").string());
  CHECK(s.descr == "|u1");
  CHECK(s.shape == std::vector<int64_t>{20, 1, 16, 16});
  const npy::Array l = npy::load((kWork / "straight" / "labels.npy").string());
  CHECK(l.descr == "<i8");
  CHECK(l.shape == std::vector<int64_t>{20});
  const std::vector<int64_t> labels = l.as<int64_t>();
  for (size_t i = 0; i < labels.size(); ++i) REQUIRE(labels[i] == static_cast<int64_t>(i % 10));
  // Content, not only shapes: after 6 steps the samples are still mostly noise, but not constant.
  CHECK(npy_u8_spread(kWork / "straight" / "samples.npy") > 100);
  CHECK(png_spread(kWork / "straight" / "grid.png") > 100);
  CHECK(png_spread(kWork / "straight" / "process.png") > 100);

  // Split: 3 steps, then resume to 6; same samples, byte for byte.
  const std::string split = (kWork / "split").string();
  REQUIRE(run(kTrain + d + kCommon + " --steps 3 --samples 0 --out '" + split + "'") == 0);
  REQUIRE(run(kTrain + d + kCommon + " --samples 20 --steps 6 --out '" + split + "' --resume '" + split + "/checkpoint.safetensors'",
              &out) == 0);
  CHECK(out.find("resumed from") != std::string::npos);
  CHECK(slurp(kWork / "straight" / "samples.npy") == slurp(kWork / "split" / "samples.npy"));

  // A resume into another model is refused, naming both.
  CHECK(run(kTrain + d + " --ch 16 --T 50 --steps 8 --out '" + (kWork / "other").string() + "' --resume '" + split +
                "/checkpoint.safetensors'",
            &out) == 1);
  CHECK(out.find("was trained with") != std::string::npos);

  // sample reads the checkpoint: DDIM, 5 steps, with and without guidance.
  REQUIRE(run(kSample + " '" + split + "/checkpoint.safetensors' -n 12 --sampler ddim --steps 5 --guidance 1.5 --out '" +
                  (kWork / "sampled").string() + "'",
              &out) == 0);
  CHECK(npy::load((kWork / "sampled" / "samples.npy").string()).shape == std::vector<int64_t>{12, 1, 16, 16});
  CHECK(npy_u8_spread(kWork / "sampled" / "samples.npy") > 100);
  CHECK(png_spread(kWork / "sampled" / "grid.png") > 100);
  CHECK(run(kSample + " '" + (kWork / "nope.safetensors").string() + "'", &out) == 1);
  CHECK(out.find("sample: error:") != std::string::npos);

  // Ctrl-C once training is under way (after the first progress line, at step 2): the run saves
  // its checkpoint at the step it reached and exits 130; the checkpoint resumes from that step.
  const std::string intr = (kWork / "interrupted").string();
  const int rc = diffuse::testing::run_command_interrupted(
      kTrain + d + kCommon + " --steps 1000000 --out '" + intr + "'", kWork / "interrupted.log", " images/s  elapsed ",
      &out);
  CHECK(rc == 130);
  CHECK(out.find("interrupted: checkpoint saved") != std::string::npos);
  REQUIRE(fs::exists(fs::path(intr) / "checkpoint.safetensors"));
  const int64_t at = std::stoll(safetensors::File::read(intr + "/checkpoint.safetensors").metadata().at("step"));
  CHECK(at >= 2);
  CHECK(at < 1000000);
  REQUIRE(run(kTrain + d + kCommon + " --samples 0 --steps " + std::to_string(at + 2) + " --out '" + intr +
                  "' --resume '" + intr + "/checkpoint.safetensors'",
              &out) == 0);
  CHECK(out.find("resumed from " + intr + "/checkpoint.safetensors at step " + std::to_string(at)) != std::string::npos);

  // One-digit model and a bad data folder.
  REQUIRE(run(kTrain + d + kCommon + " --steps 2 --digit 6 --samples 4 --out '" + (kWork / "six").string() + "'", &out) == 0);
  const std::vector<int64_t> six = npy::load((kWork / "six" / "labels.npy").string()).as<int64_t>();
  CHECK(six == std::vector<int64_t>(4, 6));
  CHECK(run(kTrain + " --data '" + (kWork / "missing").string() + "' --steps 1", &out) == 1);
  CHECK(out.find("train_mnist: error:") != std::string::npos);
}

// The flags no other test gives (issue 22: every flag exercised once with a valid value), each
// checked for its effect where the outputs show it.
TEST_CASE("train_mnist: attention, resize, data order, objective, checkpoints kept, grids and evaluations") {
  const fs::path work = kWork.parent_path() / "train_mnist_flags";  // not under kWork: the other case clears it
  fs::remove_all(work);
  fs::create_directories(work);
  const fs::path data = work / "data";
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed << " (DIFFUSE_TEST_SEED replays it)");
  write_dataset(data, 200, 40, seed);
  auto run = [&](const std::string& cmd, std::string* o = nullptr) { return ::run(cmd, o, work / "last_command.log"); };
  const std::string d = " --data '" + data.string() + "'";
  // A small judge for --eval-every (its accuracy does not matter here, only that it scores).
  const fs::path lenet = work / "lenet.safetensors";
  std::string out;
  REQUIRE(run(kClassifier + " train" + d + " --epochs 1 --c1 4 --c2 8 --out '" + lenet.string() + "'", &out) == 0);

  const fs::path a = work / "a";
  REQUIRE(run(kTrain + d + kCommon + " --resize bilinear --attn one8 --data-order epochs --label-dropout 0.5" +
                  " --prediction x0 --min-snr 5 --warmup 2 --save-every 2 --keep 2 --grid-every 3 --eval-every 3" +
                  " --eval-samples 10 --classifier '" + lenet.string() + "' --sampler dpm++3m --sample-steps 4" +
                  " --attention full --samples 10 --steps 6 --out '" + a.string() + "'",
              &out) == 0);
  CHECK(out.find("at 16x16 (bilinear)") != std::string::npos);
  CHECK(out.find("(dpm++3m, guidance 0.30)") != std::string::npos);
  // --save-every 2 --keep 2: the final checkpoint (step 6) and the one before it (step 4) only.
  CHECK(fs::exists(a / "checkpoint-00000004.safetensors"));
  CHECK_FALSE(fs::exists(a / "checkpoint-00000002.safetensors"));
  const safetensors::File ck = safetensors::File::read((a / "checkpoint.safetensors").string());
  CHECK(ck.metadata().at("step") == "6");
  CHECK(ck.metadata().at("prediction") == "x0");
  CHECK(ck.metadata().at("min_snr_gamma").rfind("5", 0) == 0);
  CHECK(ck.metadata().at("model").find("\"resize\":\"bilinear\"") != std::string::npos);
  // --attn one8: one attention block, at 8x8.
  const std::vector<std::string> names = ck.names();
  const auto q_weights = std::count_if(names.begin(), names.end(), [](const std::string& n) {
    return n.find(".q.weight") != std::string::npos && n.rfind("ema.", 0) != 0 && n.rfind("optim.", 0) != 0;
  });
  CHECK(q_weights == 1);
  // --grid-every 3: grids at steps 3 and 6 with content.
  CHECK(png_spread(a / "progress" / "grid-00000003.png") > 100);
  CHECK(png_spread(a / "progress" / "grid-00000006.png") > 100);
  // --eval-every 3: accuracy and FD-LeNet in train_log.csv at steps 3 and 6, nowhere else.
  std::istringstream log(slurp(a / "train_log.csv"));
  std::string line;
  std::getline(log, line);
  REQUIRE(line == "step,loss,lr,grad_norm,images_per_s,elapsed_s,accuracy,fd_lenet");
  std::vector<std::string> evaluated;
  while (std::getline(log, line)) {
    const std::string fd = line.substr(line.rfind(',') + 1);
    if (!fd.empty()) {
      evaluated.push_back(line.substr(0, line.find(',')));
      CHECK(std::stod(fd) > 0);
    }
  }
  CHECK(evaluated == std::vector<std::string>{"3", "6"});

  // --size 28 with DDPM's small variance; sample with --variance, --spacing, --raw, --n.
  const fs::path b = work / "b";
  REQUIRE(run(kTrain + d + kCommon + " --size 28 --variance small --samples 10 --steps 2 --out '" + b.string() + "'",
              &out) == 0);
  CHECK(npy::load((b / "samples.npy").string()).shape == std::vector<int64_t>{10, 1, 28, 28});
  const fs::path c = work / "c";
  REQUIRE(run(kSample + " '" + (b / "checkpoint.safetensors").string() + "' --n 6 --raw --variance small --out '" +
                  c.string() + "'",
              &out) == 0);
  CHECK(npy::load((c / "samples.npy").string()).shape == std::vector<int64_t>{6, 1, 28, 28});
  CHECK(npy_u8_spread(c / "samples.npy") > 100);
  // --raw samples with the raw weights: other images than the EMA's from the same seed.
  REQUIRE(run(kSample + " '" + (b / "checkpoint.safetensors").string() + "' --n 6 --variance small --out '" +
                  (work / "c_ema").string() + "'") == 0);
  CHECK(slurp(c / "samples.npy") != slurp(work / "c_ema" / "samples.npy"));
  // --spacing: trailing and quadratic pick other timesteps than uniform, so other images.
  std::vector<std::string> by_spacing;
  for (const char* sp : {"uniform", "trailing", "quadratic"}) {
    const fs::path e = work / (std::string("spacing_") + sp);
    REQUIRE(run(kSample + " '" + (b / "checkpoint.safetensors").string() + "' -n 4 --sampler ddim --steps 4 --spacing " +
                    sp + " --out '" + e.string() + "'") == 0);
    by_spacing.push_back(slurp(e / "samples.npy"));
  }
  CHECK(by_spacing[0] != by_spacing[1]);
  CHECK(by_spacing[0] != by_spacing[2]);
  CHECK(by_spacing[1] != by_spacing[2]);
}

// --precision bf16 end to end through the emulated CUDA backend, with the flash kernels (the
// attention block all bf16 inside, ops/attention_block.hpp) and class conditioning: each step's
// loss within the whole-model bf16 bound (2^-5 relative, tests/test_backend_models.cpp) of the
// CPU's FP32 run from the same seed, samples drawn under bf16 within a few gray levels of the
// CPU's, and a checkpoint that loads (sample reads it on the CPU).
TEST_CASE("train_mnist: bf16 on the emulated CUDA backend trains close to the CPU's FP32") {
  const fs::path work = kWork.parent_path() / "train_mnist_bf16";
  fs::remove_all(work);
  fs::create_directories(work);
  const fs::path data = work / "data";
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed << " (DIFFUSE_TEST_SEED replays it)");
  write_dataset(data, 64, 16, seed);
  auto run = [&](const std::string& cmd, std::string* o = nullptr) { return ::run(cmd, o, work / "last_command.log"); };
  const std::string args = " --data '" + data.string() + "' --ch 8 --T 50 --batch 8 --log-every 1 --attn one8" +
                           " --steps 5 --samples 4 --sample-batch 4 --sampler ddim --sample-steps 3 --seed " +
                           std::to_string(seed % 1000);
  std::string out;
  REQUIRE(run(kTrain + args + " --device cpu --out '" + (work / "cpu").string() + "'", &out) == 0);
  REQUIRE(run(kTrainEmulated + args + " --device cuda --precision bf16 --attention flash --out '" +
                  (work / "bf16").string() + "'",
              &out) == 0);
  INFO(out);
  CHECK(out.find("on cuda (CPU emulation of CUDA, bf16, flash attention)") != std::string::npos);
  auto losses = [](const fs::path& csv) {
    std::istringstream log(slurp(csv));
    std::string line;
    std::getline(log, line);  // the header: step,loss,...
    std::vector<double> l;
    while (std::getline(log, line)) l.push_back(std::stod(line.substr(line.find(',') + 1)));
    return l;
  };
  const std::vector<double> lc = losses(work / "cpu" / "train_log.csv"), lb = losses(work / "bf16" / "train_log.csv");
  REQUIRE(lc.size() == 5);
  REQUIRE(lb.size() == 5);
  for (size_t s = 0; s < lc.size(); ++s) {
    INFO("step " << s + 1 << ": loss cpu fp32 " << lc[s] << ", emulated cuda bf16 " << lb[s]);
    CHECK(std::isfinite(lb[s]));
    CHECK(std::abs(lb[s] - lc[s]) <= std::ldexp(1.0, -5) * lc[s]);
  }
  const std::vector<uint8_t> sb = npy::load((work / "bf16" / "samples.npy").string()).as<uint8_t>(),
                             sc = npy::load((work / "cpu" / "samples.npy").string()).as<uint8_t>();
  REQUIRE(sb.size() == sc.size());
  REQUIRE(!sb.empty());
  double diff = 0;
  for (size_t i = 0; i < sb.size(); ++i) diff += std::abs(int(sb[i]) - int(sc[i]));
  diff /= static_cast<double>(sb.size());
  INFO("mean |bf16 - cpu| " << diff << " gray levels");
  CHECK(npy_u8_spread(work / "bf16" / "samples.npy") > 64);
  CHECK(diff < 2.0);
  // The checkpoint written under bf16 is FP32 and samples on the CPU.
  REQUIRE(run(kSample + " '" + (work / "bf16" / "checkpoint.safetensors").string() +
                  "' --n 2 --sampler ddim --steps 2 --device cpu --out '" + (work / "again").string() + "'",
              &out) == 0);
  CHECK(npy::load((work / "again" / "samples.npy").string()).shape.size() == 4);
}
