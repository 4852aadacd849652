// train_cifar10 end to end on small CIFAR-format data the test writes (as the batch files and as
// cifar-10-binary.tar.gz): the tiny preset's loss falls, the output files and their formats,
// exact resume (a run split in two by a checkpoint, the second half read from the archive, gives
// the same samples byte for byte as the straight run), class conditioning, clear errors; and FID
// during training, computed with random Inception weights, on the CPU and on the CUDA backend
// through its CPU emulation (train_cifar10_emulated: this program built with the emulation),
// which must agree.
#include <catch2/catch.hpp>

#include "kernel_seed.hpp"

#include "archive_writer.hpp"
#include "run_command.hpp"
#include "temp_files.hpp"

#include <diffuse/diffuse.hpp>
#include <diffuse/eval/fid.hpp>
#include <diffuse/io/npy.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <sstream>
#include <string>
#include <vector>
#include "skip.hpp"

using namespace diffuse;
namespace fs = std::filesystem;

namespace {

const fs::path kWork = fs::path(DIFFUSE_BINARY_DIR) / "tests" / "train_cifar10_cli";
const std::string kTrain = std::string(DIFFUSE_BINARY_DIR) + "/examples/train_cifar10";
const std::string kTrainEmulated = std::string(DIFFUSE_BINARY_DIR) + "/tests/train_cifar10_emulated";
const std::string kFid = std::string(DIFFUSE_BINARY_DIR) + "/examples/fid";
const std::string kFidEmulated = std::string(DIFFUSE_BINARY_DIR) + "/tests/fid_emulated";
const std::string kSample = std::string(DIFFUSE_BINARY_DIR) + "/examples/sample";

// Shell-quoted (built with += : GCC 12 warns falsely about "'" + s + "'").
std::string q(const std::string& p) {
  std::string r("'");
  r += p;
  r += '\'';
  return r;
}
std::string q(const fs::path& p) { return q(p.string()); }
std::string q(const char* p) { return q(std::string(p)); }

// Each case logs into its own folder (ctest runs the two cases in parallel processes).
fs::path g_log_dir = kWork;
int run(const std::string& cmd, std::string* out = nullptr) {
  return diffuse::testing::run_command(cmd, g_log_dir / "last_command.log", out);
}

// Column `name` of a CSV file with a header row, as numbers (empty cells skipped).
std::vector<double> csv_column(const fs::path& path, const std::string& name) {
  std::ifstream f(path);
  std::string line;
  REQUIRE(std::getline(f, line));
  std::vector<std::string> head;
  {
    std::stringstream ss(line);
    std::string c;
    while (std::getline(ss, c, ',')) head.push_back(c);
  }
  const auto it = std::find(head.begin(), head.end(), name);
  REQUIRE(it != head.end());
  const size_t k = static_cast<size_t>(it - head.begin());
  std::vector<double> v;
  while (std::getline(f, line)) {
    std::stringstream ss(line);
    std::string c;
    for (size_t i = 0; std::getline(ss, c, ','); ++i)
      if (i == k && !c.empty()) v.push_back(std::stod(c));
  }
  return v;
}

// CIFAR-format records: image i of class i % 10 is a square of that class's colour at a random
// place on a dark noisy background (learnable in a few dozen steps).
std::vector<uint8_t> records(int n, std::mt19937& rng) {
  std::vector<uint8_t> b;
  for (int i = 0; i < n; ++i) {
    const int k = i % 10;
    b.push_back(static_cast<uint8_t>(k));
    const int y0 = 4 + static_cast<int>(rng() % 12), x0 = 4 + static_cast<int>(rng() % 12);
    const int col[3] = {40 + 21 * k, 250 - 20 * k, (k % 3) * 100 + 30};
    for (int c = 0; c < 3; ++c)
      for (int y = 0; y < 32; ++y)
        for (int x = 0; x < 32; ++x) {
          const bool in = y >= y0 && y < y0 + 14 && x >= x0 && x < x0 + 14;
          b.push_back(static_cast<uint8_t>(in ? col[c] : static_cast<int>(rng() % 30)));
        }
  }
  return b;
}

// DIR/folder/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin, and the same files as
// DIR/archive/cifar-10-binary.tar.gz.
void write_cifar(const fs::path& dir, int per_batch, uint32_t seed) {
  std::mt19937 rng(seed);
  const fs::path bin = dir / "folder" / "cifar-10-batches-bin";
  fs::create_directories(bin);
  fs::create_directories(dir / "archive");
  std::vector<std::pair<std::string, std::vector<uint8_t>>> members;
  for (int i = 0; i <= 5; ++i) {
    const std::string name = i < 5 ? "data_batch_" + std::to_string(i + 1) + ".bin" : "test_batch.bin";
    members.push_back({"cifar-10-batches-bin/" + name, records(per_batch, rng)});
    diffuse::testing::write_bytes((bin / name).string(), members.back().second);
  }
  diffuse::testing::write_archive((dir / "archive" / "cifar-10-binary.tar.gz").string(), members);
}

const std::string kTiny = " --preset tiny --batch 8 --sampler ddim --ddim-steps 4 --sample-batch 8 --seed 5";

}  // namespace

TEST_CASE("train_cifar10: tiny learns, writes its files, resumes exactly from the archive, conditions on classes") {
  fs::remove_all(kWork);
  fs::create_directories(kWork);
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed << " (DIFFUSE_TEST_SEED replays it)");
  write_cifar(kWork / "data", 8, static_cast<uint32_t>(seed));
  const std::string folder = " --data " + q(kWork / "data" / "folder");
  const std::string archive = " --data " + q(kWork / "data" / "archive" / "cifar-10-binary.tar.gz");

  // The default is the paper's recipe.
  std::string out;
  REQUIRE(run(kTrain + folder + " --dry-run", &out) == 0);
  CHECK(out.find("preset paper") != std::string::npos);
  CHECK(out.find("U-Net 35746307 parameters (ch 128, dropout 0.10), T=1000 linear, batch 128, lr 0.0002, warmup "
                 "5000, clip 1, EMA 0.9999, 800000 steps") != std::string::npos);
  CHECK(out.find("images 32x32x3, flips") != std::string::npos);

  // The tiny preset: the loss falls within 60 steps (from about 1: the output conv starts at zero).
  REQUIRE(run(kTrain + folder + kTiny + " --steps 60 --log-every 10 --samples 8 --out " + q(kWork / "learn"), &out) == 0);
  CHECK(out.find("40 images 32x32x3, flips") != std::string::npos);
  for (const char* w : {"loss", "images/s", "ETA"}) CHECK(out.find(w) != std::string::npos);
  const std::vector<double> loss = csv_column(kWork / "learn" / "train_log.csv", "loss");
  REQUIRE(loss.size() == 6);
  CHECK(loss.back() < 0.6 * loss.front());
  for (const char* f : {"grid.png", "process.png", "samples.npy", "labels.npy", "checkpoint.safetensors"})
    CHECK(fs::exists(kWork / "learn" / f));
  const npy::Array s = npy::load((kWork / "learn" / "samples.npy").string());
  CHECK(s.descr == "|u1");
  CHECK(s.shape == std::vector<int64_t>{8, 3, 32, 32});

  // Straight 6 steps from the folder; 3 steps from the folder, then 3 more resumed from the
  // archive: the same samples, byte for byte (flips, data order and dropout included).
  REQUIRE(run(kTrain + folder + kTiny + " --steps 6 --samples 4 --out " + q(kWork / "straight")) == 0);
  const fs::path split = kWork / "split";
  REQUIRE(run(kTrain + folder + kTiny + " --steps 3 --samples 0 --out " + q(split)) == 0);
  REQUIRE(run(kTrain + archive + kTiny + " --steps 6 --samples 4 --out " + q(split) + " --resume " +
                  q(split / "checkpoint.safetensors"),
              &out) == 0);
  CHECK(out.find("resumed from") != std::string::npos);
  CHECK(diffuse::testing::read_bytes((kWork / "straight" / "samples.npy").string()) ==
        diffuse::testing::read_bytes((split / "samples.npy").string()));
  // sample reads the checkpoint (3 channels, no classes).
  REQUIRE(run(kSample + " " + q(split / "checkpoint.safetensors") + " -n 3 --sampler ddim --steps 3 --out " +
                  q(kWork / "sampled"),
              &out) == 0);
  CHECK(npy::load((kWork / "sampled" / "samples.npy").string()).shape == std::vector<int64_t>{3, 3, 32, 32});

  // Class-conditional: labels 0..9 in turn, classifier-free guidance at sampling.
  REQUIRE(run(kTrain + folder + kTiny + " --class-cond --guidance 2 --steps 2 --samples 20 --out " + q(kWork / "cond"),
              &out) == 0);
  const std::vector<int64_t> labels = npy::load((kWork / "cond" / "labels.npy").string()).as<int64_t>();
  REQUIRE(labels.size() == 20);
  for (size_t i = 0; i < labels.size(); ++i) CHECK(labels[i] == static_cast<int64_t>(i % 10));

  // The flags no other run gives (issue 22), with their effects: the configuration line shows
  // --dropout, --no-flip and --warmup; the checkpoint records the objective and --label-dropout's
  // class-conditional model; --save-every 2 --keep 2 keeps checkpoint-00000002 beside the last;
  // --grid-every 4 writes a grid; --sampler ddpm --variance small samples.
  const std::string flags = folder + " --preset tiny --batch 8 --T 40 --seed 5 --class-cond --label-dropout 0.3" +
                            " --dropout 0.2 --no-flip --data-order replacement --prediction v --min-snr 5 --warmup 2" +
                            " --attention full --sample-batch 8";
  const fs::path fl = kWork / "flags";
  REQUIRE(run(kTrain + flags + " --sampler ddpm --variance small --save-every 2 --keep 2 --grid-every 4 --samples 4" +
                  " --steps 4 --out " + q(fl),
              &out) == 0);
  CHECK(out.find("images 32x32x3, U-Net") != std::string::npos);  // no ", flips"
  CHECK(out.find("dropout 0.20), T=40 linear, batch 8, lr 0.001, warmup 2,") != std::string::npos);
  CHECK(fs::exists(fl / "checkpoint-00000002.safetensors"));
  CHECK(fs::exists(fl / "progress" / "grid-00000004.png"));
  CHECK(npy::load((fl / "samples.npy").string()).shape == std::vector<int64_t>{4, 3, 32, 32});
  {
    const safetensors::File ck = safetensors::File::read((fl / "checkpoint.safetensors").string());
    CHECK(ck.metadata().at("prediction") == "v");
    CHECK(ck.metadata().at("min_snr_gamma").rfind("5", 0) == 0);
    CHECK(ck.contains("class_emb.weight"));
  }
  REQUIRE(run(kTrain + flags + " --sampler euler-a --sample-steps 3 --samples 2 --steps 1 --out " + q(kWork / "flags_euler"),
              &out) == 0);
  CHECK(out.find("sampled 2 images on cpu") != std::string::npos);
  CHECK(out.find("(euler-a)") != std::string::npos);

  // Bad requests: one line each, exit 1.
  CHECK(run(kTrain + " --data " + q(kWork / "missing") + kTiny + " --steps 1", &out) == 1);
  CHECK(out.find("train_cifar10: error: --data") != std::string::npos);
  CHECK(run(kTrain + folder + " --preset tiny --T 40 --sampler ddim --sample-steps 50 --steps 1", &out) == 1);
  CHECK(out.find("--sample-steps must be at most T = 40") != std::string::npos);
  CHECK(run(kTrain + folder + kTiny + " --steps 1 --fid-every 1", &out) == 1);
  CHECK(out.find("--fid-every needs --fid-stats") != std::string::npos);
  CHECK(run(kTrain + folder + kTiny + " --steps 1 --fid-every 1 --fid-stats " + q(kWork / "none.npz"), &out) == 1);
  CHECK(out.find("none.npz") != std::string::npos);
  std::vector<uint8_t> px(2 * 8 * 8 * 3, 7);
  npy::save<uint8_t>((kWork / "x.npy").string(), px.data(), {2, 8, 8, 3});
  CHECK(run(kTrain + " --data " + q(kWork / "x.npy") + kTiny + " --class-cond --steps 1", &out) == 1);
  CHECK(out.find("--class-cond needs labels") != std::string::npos);
  CHECK(run(kTrain + " --help", &out) == 0);
  for (const char* f : {"--preset", "--resume", "--fid-every", "--device", "--class-cond", "--schedule"})
    CHECK(out.find(f) != std::string::npos);
}

TEST_CASE("train_cifar10: FID during training, on the CPU and on the emulated CUDA backend, agree") {
  const fs::path work = kWork.parent_path() / "train_cifar10_fid";  // apart: ctest runs the cases in parallel
  fs::remove_all(work);
  fs::create_directories(work);
  g_log_dir = work;
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed << " (DIFFUSE_TEST_SEED replays it)");
  write_cifar(work / "data", 2, static_cast<uint32_t>(seed));
  // Random Inception weights with healthy activations (tests/torch/inception_ref.py: He-scaled,
  // BatchNorm calibrated; PyTorch's default init makes the features vanish), converted as the
  // real ones are, and the statistics of the training images with them (the fid tool reading
  // CIFAR-10).
  if (std::string(DIFFUSE_TORCH_PYTHON).empty()) {
    DIFFUSE_SKIP("no python with torch found at configure time: FID during training not tested");
  }
  std::mt19937 rng(static_cast<uint32_t>(seed ^ (seed >> 32)));
  std::vector<uint8_t> calib(2 * 8 * 8 * 3);
  for (auto& v : calib) v = static_cast<uint8_t>(rng());
  npy::save<uint8_t>((work / "calib.npy").string(), calib.data(), {2, 8, 8, 3});
  const std::string py = q(DIFFUSE_TORCH_PYTHON), src = DIFFUSE_SOURCE_DIR;
  REQUIRE(run("cd " + q(src + "/tests/torch") + " && " + py + " inception_ref.py --seed " +
              std::to_string(seed % 1000000) + " --pth " + q(work / "w.pth") + " --safetensors " +
              q(work / "inception.safetensors") + " --images " + q(work / "calib.npy") + " --features " +
              q(work / "calib_f.npy")) == 0);
  std::string out;
  const std::string weights = " --weights " + q(work / "inception.safetensors");
  REQUIRE(run(kFid + " " + q(work / "data" / "folder") + weights + " --batch 5 --device cpu --save-stats " +
                  q(work / "train.npz"),
              &out) == 0);
  CHECK(out.find("CIFAR-10 train split") != std::string::npos);
  CHECK(out.find("10 images 32x32, RGB") != std::string::npos);  // 5 training batches of 2
  // --split test: the archive's test_batch.bin only.
  REQUIRE(run(kFid + " " + q(work / "data" / "archive") + weights + " --split test --batch 5 --device cpu --save-stats " +
                  q(work / "test.npz"),
              &out) == 0);
  CHECK(out.find("CIFAR-10 test split") != std::string::npos);
  CHECK(out.find("2 images 32x32, RGB") != std::string::npos);

  // Damaged statistics through --fid-stats: refused before any training, naming the file, and
  // no checkpoint written (a cut-off .npz, and an .npy that is not statistics at all).
  {
    std::ifstream in(work / "train.npz", std::ios::binary);
    const std::string whole((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::ofstream(work / "cut.npz", std::ios::binary).write(whole.data(), static_cast<std::streamsize>(whole.size() / 2));
    for (const fs::path& bad : {work / "cut.npz", work / "calib.npy"}) {
      const fs::path o = work / ("bad_" + bad.stem().string());
      REQUIRE(run(kTrain + " --data " + q(work / "data" / "archive") + " --preset tiny --batch 4 --steps 1 --fid-every 1" +
                      " --fid-stats " + q(bad) + " --fid-weights " + q(work / "inception.safetensors") +
                      " --device cpu --out " + q(o),
                  &out) == 1);
      INFO(out);
      CHECK(out.find(bad.string()) != std::string::npos);
      CHECK_FALSE(fs::exists(o / "checkpoint.safetensors"));
    }
  }

  const std::string args = " --data " + q(work / "data" / "archive") +
                           " --preset tiny --batch 4 --seed 5 --steps 1 --fid-every 1 --fid-samples 2 --fid-steps 2 --samples 0" +
                           " --fid-sampler dpm++2m --fid-batch 1" +
                           " --fid-stats " + q(work / "train.npz") + " --fid-weights " +
                           q(work / "inception.safetensors");
  REQUIRE(run(kTrain + args + " --device cpu --out " + q(work / "cpu"), &out) == 0);
  CHECK(out.find("step 1: FID") != std::string::npos);
  REQUIRE(run(kTrainEmulated + args + " --device cuda --out " + q(work / "cuda"), &out) == 0);
  CHECK(out.find("on cuda") != std::string::npos);
  const std::vector<double> fc = csv_column(work / "cpu" / "train_log.csv", "fid"),
                            fd = csv_column(work / "cuda" / "train_log.csv", "fid");
  REQUIRE(fc.size() == 1);
  REQUIRE(fd.size() == 1);
  INFO("FID cpu " << fc[0] << " cuda (emulated) " << fd[0]);
  CHECK(std::isfinite(fc[0]));
  CHECK(fc[0] > 1e-2);  // not degenerate: features that vary between images
  CHECK(std::abs(fd[0] - fc[0]) <= 1e-3 * fc[0]);
  CHECK(fs::exists(work / "cpu" / "progress" / "grid-00000001.png"));
  // The fid tool prints the same value with the network on either device.
  auto fid_value = [](const std::string& o) {
    const size_t k = o.rfind("FID: ");
    REQUIRE(k != std::string::npos);
    return std::stod(o.substr(k + 5));
  };
  const std::string fid_args = " " + q(work / "calib.npy") + " " + q(work / "train.npz") + weights;
  REQUIRE(run(kFid + fid_args + " --device cpu", &out) == 0);
  const double f_cpu = fid_value(out);
  REQUIRE(run(kFidEmulated + fid_args + " --device cuda", &out) == 0);
  const double f_cuda = fid_value(out);
  INFO("fid tool: cpu " << f_cpu << " cuda (emulated) " << f_cuda);
  CHECK(std::abs(f_cuda - f_cpu) <= 1e-4 * f_cpu);
  CHECK(fs::exists(work / "cuda" / "progress" / "grid-00000001.png"));
}

// --precision bf16 through the emulated CUDA backend (the bf16 kernels and the bf16-only
// activations of group_norm_conv2d, on the CPU): the trainer runs, says so, and its losses stay
// within the bf16 bound of the FP32 CPU run (2^-5 relative: the whole-model bound of
// test_backend_models, over only 6 steps, whose updates move the weights by ~lr); the final
// samples, drawn under bf16 without gradients, are finite images. The weights stay float.
TEST_CASE("train_cifar10: bf16 on the emulated CUDA backend trains close to the CPU's FP32") {
  const fs::path work = kWork.parent_path() / "train_cifar10_bf16";
  fs::remove_all(work);
  fs::create_directories(work);
  g_log_dir = work;
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed << " (DIFFUSE_TEST_SEED replays it)");
  write_cifar(work / "data", 2, static_cast<uint32_t>(seed));
  const std::string args = " --data " + q(work / "data" / "archive") + " --preset tiny --batch 4 --seed " +
                           std::to_string(seed % 1000) + " --steps 6 --log-every 1 --samples 2 --sampler ddim" +
                           " --sample-steps 2";
  std::string out;
  REQUIRE(run(kTrain + args + " --device cpu --out " + q(work / "cpu"), &out) == 0);
  // The full-matrix attention kernels: the flash ones (attention blocks all bf16 inside) take this
  // test from ~10 s to ~80 s in the emulation at 16x16 (256 tokens); train_mnist's bf16 test runs
  // them end to end at 8x8.
  REQUIRE(run(kTrainEmulated + args + " --device cuda --precision bf16 --out " + q(work / "bf16"), &out) == 0);
  INFO(out);
  CHECK(out.find("on cuda (CPU emulation of CUDA, bf16)") != std::string::npos);
  const std::vector<double> lc = csv_column(work / "cpu" / "train_log.csv", "loss"),
                            lb = csv_column(work / "bf16" / "train_log.csv", "loss");
  REQUIRE(lc.size() == 6);
  REQUIRE(lb.size() == 6);
  for (size_t s = 0; s < lc.size(); ++s) {
    INFO("step " << s + 1 << ": loss cpu fp32 " << lc[s] << ", emulated cuda bf16 " << lb[s]);
    CHECK(std::isfinite(lb[s]));
    CHECK(std::abs(lb[s] - lc[s]) <= std::ldexp(1.0, -5) * lc[s]);
  }
  // The samples (uint8 images: a NaN would come out as a constant image): the same seed's CPU
  // samples up to bf16's rounding, a few gray levels of the 0-255 range.
  const npy::Array sb = npy::load((work / "bf16" / "samples.npy").string()),
                   sc = npy::load((work / "cpu" / "samples.npy").string());
  REQUIRE(sb.shape == std::vector<int64_t>{2, 3, 32, 32});
  REQUIRE(sc.shape == sb.shape);
  const std::vector<int> ib = sb.as<int>(), ic = sc.as<int>();
  double diff = 0;
  for (size_t i = 0; i < ib.size(); ++i) diff += std::abs(ib[i] - ic[i]);
  diff /= static_cast<double>(ib.size());
  const auto [lo, hi] = std::minmax_element(ib.begin(), ib.end());
  INFO("bf16 samples: values " << *lo << ".." << *hi << ", mean |bf16 - cpu| " << diff << " gray levels");
  CHECK(*hi - *lo > 64);
  CHECK(diff < 2.0);
  CHECK(fs::exists(work / "bf16" / "checkpoint.safetensors"));
}

