// The trainers under mpirun (DIFFUSE_MPIEXEC: `mpirun -np 2 --oversubscribe`, tests/CMakeLists.txt):
// train_mnist on two ranks against one process (losses, weights and every stream's position in
// the checkpoint), the progress line and the one set of files rank 0 writes; a rank killed mid-run
// ends the run with an error instead of a hang, leaving the last checkpoint whole; train_2d and
// train_cifar10 just work on two ranks.
#include <catch2/catch.hpp>

#include "compare.hpp"
#include "fake_mnist.hpp"
#include "kernel_seed.hpp"
#include "run_command.hpp"

#include <diffuse/io/npy.hpp>
#include <diffuse/io/safetensors.hpp>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

using namespace diffuse;
namespace fs = std::filesystem;

namespace {

const fs::path kWork = fs::path(DIFFUSE_BINARY_DIR) / "tests" / "distributed_cli";
const std::string kBin = std::string(DIFFUSE_BINARY_DIR) + "/examples/";
const std::string kMpi = std::string(DIFFUSE_MPIEXEC) + " ";

std::string q(const fs::path& p) { return "'" + p.string() + "'"; }

int run(const std::string& cmd, std::string* out = nullptr) {
  return diffuse::testing::run_command(cmd, kWork / "last_command.log", out);
}

// Column `col` of train_log.csv, one value per row.
std::vector<double> log_column(const fs::path& csv, const std::string& col) {
  std::ifstream f(csv);
  std::string line;
  std::getline(f, line);
  std::vector<std::string> head;
  std::stringstream hs(line);
  for (std::string h; std::getline(hs, h, ',');) head.push_back(h);
  const size_t k = static_cast<size_t>(std::find(head.begin(), head.end(), col) - head.begin());
  REQUIRE(k < head.size());
  std::vector<double> v;
  while (std::getline(f, line)) {
    std::stringstream ls(line);
    std::string cell;
    for (size_t i = 0; i <= k; ++i) std::getline(ls, cell, ',');
    v.push_back(std::stod(cell));
  }
  return v;
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

// The pid of the rank-`rank` process of the mpirun whose command line holds `tag`; 0 if none.
pid_t rank_pid(int rank, const std::string& tag) {
  const std::string want = "OMPI_COMM_WORLD_RANK=" + std::to_string(rank);
  for (const auto& e : fs::directory_iterator("/proc")) {
    const std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream env(e.path() / "environ"), cmd(e.path() / "cmdline");
    std::stringstream es, cs;
    es << env.rdbuf();
    cs << cmd.rdbuf();
    std::string vars = es.str(), line = cs.str();
    std::replace(vars.begin(), vars.end(), '\0', '\n');
    if (line.find(tag) != std::string::npos && line.find("mpirun") == std::string::npos &&
        (vars.find("\n" + want + "\n") != std::string::npos || vars.rfind(want + "\n", 0) == 0))
      return static_cast<pid_t>(std::stol(name));
  }
  return 0;
}

}  // namespace

TEST_CASE("train_mnist: two ranks under mpirun train as one process; rank 0 alone prints and writes") {
  fs::remove_all(kWork);
  fs::create_directories(kWork);
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed << " (DIFFUSE_TEST_SEED replays it)");
  diffuse::testing::write_dataset(kWork / "data", 100, 20, seed);
  const std::string common = " --data " + q(kWork / "data") + " --device cpu --ch 8 --T 50 --steps 20" +
                             " --log-every 1 --samples 0 --data-order epochs --seed " + std::to_string(seed % 100000);
  const std::string flags = common + " --batch 8";
  std::string one_out, two_out;
  REQUIRE(run(kBin + "train_mnist" + flags + " --out " + q(kWork / "one"), &one_out) == 0);
  REQUIRE(run(kMpi + kBin + "train_mnist" + flags + " --out " + q(kWork / "two"), &two_out) == 0);
  // One header and one progress line per step, from rank 0, saying how many ranks; no bar.
  CHECK(count(two_out, " images of all digits at 16x16") == 1);
  CHECK(count(two_out, "train_mnist: gradients averaged over 2 ranks through the host collectives, in 1 bucket") == 1);
  CHECK(two_out.find("2 ranks (MPI (") != std::string::npos);
  CHECK(count(two_out, "images/s on 2 ranks") == 20);
  CHECK(count(two_out, "trained 20 steps") == 1);
  CHECK(two_out.find('\r') == std::string::npos);
  CHECK(one_out.find(" ranks") == std::string::npos);
  // The same losses and gradient norms, step by step, up to the order of the sums over the batch
  // (K = B H W = 8 x 16 x 16 terms) through 20 steps: float_sums_tolerance(K, 20), 4.8e-5, as
  // tests/test_distributed.cpp derives it (seen about 1e-7).
  const double bound = diffuse::testing::float_sums_tolerance(8.0 * 16 * 16, 20);
  for (const char* col : {"loss", "grad_norm"}) {
    const std::vector<double> v1 = log_column(kWork / "one" / "train_log.csv", col);
    const std::vector<double> v2 = log_column(kWork / "two" / "train_log.csv", col);
    REQUIRE(v1.size() == 20);
    REQUIRE(v2.size() == 20);
    for (size_t s = 0; s < v1.size(); ++s) CHECK(std::abs(v2[s] - v1[s]) < bound * v1[s]);
  }
  // The checkpoints: every stream and the data order at the same place; weights, EMA and Adam's
  // moments within the same bound (relative to the whole tensors, which is looser than to what the
  // run changed: the weights' drift is checked that way in test_distributed).
  const auto a = safetensors::File::read((kWork / "one" / "checkpoint.safetensors").string());
  const auto b = safetensors::File::read((kWork / "two" / "checkpoint.safetensors").string());
  CHECK(a.metadata() == b.metadata());
  REQUIRE(a.names() == b.names());
  std::vector<float> wa, wb;
  for (const std::string& n : a.names()) {
    const Tensor<float> ta = a.tensor<float>(n), tb = b.tensor<float>(n);
    wa.insert(wa.end(), ta.begin(), ta.end());
    wb.insert(wb.end(), tb.begin(), tb.end());
  }
  const int64_t n = static_cast<int64_t>(wa.size());
  const double err = diffuse::testing::rel_err(Tensor<float>::from(wb, {n}), Tensor<float>::from(wa, {n}));
  std::printf("train_mnist, 20 steps: two ranks vs one process, checkpoint tensors within %.2e (bound %.2e)\n", err,
              bound);
  CHECK(err < bound);
  // Only rank 0 wrote: the folder holds what one process writes.
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(kWork / "two")) files.push_back(e.path().filename().string());
  std::sort(files.begin(), files.end());
  CHECK(files == std::vector<std::string>{"checkpoint.safetensors", "train_log.csv"});
  // A batch the two ranks cannot share: one line, before any work.
  CHECK(run(kMpi + kBin + "train_mnist" + common + " --batch 7 --out " + q(kWork / "odd"), &two_out) != 0);
  CHECK(two_out.find("batch 7 does not divide among 2 processes") != std::string::npos);
}

TEST_CASE("train_mnist under mpirun: a rank killed mid-run stops the run with an error, not a hang") {
  fs::create_directories(kWork);
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  diffuse::testing::write_dataset(kWork / "data_kill", 60, 20, seed);
  const fs::path out = kWork / "killed";
  fs::remove_all(out);
  const std::string cmd = kMpi + kBin + "train_mnist --data " + q(kWork / "data_kill") +
                          " --device cpu --ch 8 --T 50 --batch 8 --steps 1000000 --save-every 5 --log-every 10 "
                          "--samples 0 --out " + q(out);
  pid_t victim = 0;
  const auto t0 = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point t_kill;
  std::string text;
  // After the first progress line (a checkpoint exists: step 5), SIGKILL rank 1; mpirun must end
  // within 60 s, with an error.
  const int rc = diffuse::testing::run_command_until(
      cmd, kWork / "kill.log", "images/s on 2 ranks",
      [&](pid_t) {
        victim = rank_pid(1, out.string());
        t_kill = std::chrono::steady_clock::now();
        if (victim > 0) kill(victim, SIGKILL);
      },
      &text, 60);
  REQUIRE(victim > 0);
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_kill).count();
  std::printf("rank 1 killed %.1f s into the run; mpirun ended %.1f s later\n",
              std::chrono::duration<double>(t_kill - t0).count(), took);
  CHECK(rc != 0);  // -1 also when it did not end within 60 s
  CHECK(took < 60);
  CHECK(text.find("rank 1") != std::string::npos);  // the launcher names the rank that died
  // The last checkpoint is whole and loads.
  const auto f = safetensors::File::read((out / "checkpoint.safetensors").string());
  CHECK(std::stoll(f.metadata().at("step")) >= 5);
}

TEST_CASE("train_2d and train_cifar10 run as two ranks under mpirun") {
  fs::create_directories(kWork);
  std::string out;
  const fs::path d2 = kWork / "2d";
  fs::remove_all(d2);
  REQUIRE(run(kMpi + kBin + "train_2d --device cpu --steps 60 --batch 64 --log-every 20 --samples 200 --out " + q(d2),
              &out) == 0);
  CHECK(count(out, " parameters, T=") == 1);
  CHECK(count(out, "train_2d: gradients averaged over 2 ranks") == 1);
  CHECK(count(out, "images/s on 2 ranks") == 3);
  CHECK(count(out, "samples/floor") == 1);
  for (const char* f : {"samples.csv", "samples.png", "process.png", "checkpoint.safetensors", "train_log.csv"})
    CHECK(fs::exists(d2 / f));
  // CIFAR-10's trainer on a small uint8 array of 8x8 images.
  std::mt19937 rng(7);
  std::vector<uint8_t> px(24 * 8 * 8 * 3);
  for (auto& p : px) p = static_cast<uint8_t>(rng());
  npy::save<uint8_t>((kWork / "images.npy").string(), px.data(), {24, 8, 8, 3});
  const fs::path dc = kWork / "cifar";
  fs::remove_all(dc);
  REQUIRE(run(kMpi + kBin + "train_cifar10 --data " + q(kWork / "images.npy") +
                  " --device cpu --preset tiny --batch 8 --steps 4 --log-every 2 --sampler ddim --ddim-steps 2" +
                  " --samples 4 --sample-batch 4 --out " + q(dc),
              &out) == 0);
  CHECK(count(out, "train_cifar10: preset tiny") == 1);
  CHECK(count(out, "images/s on 2 ranks") == 2);
  for (const char* f : {"grid.png", "samples.npy", "checkpoint.safetensors"}) CHECK(fs::exists(dc / f));
}

TEST_CASE("a trainer built without MPI refuses to run as one of several ranks") {
  // train_cifar10_emulated is train_cifar10 built without diffuse::mpi (tests/CMakeLists.txt).
  fs::create_directories(kWork);
  std::string out;
  CHECK(run(kMpi + std::string(DIFFUSE_BINARY_DIR) + "/tests/train_cifar10_emulated --dry-run --out " +
                q(kWork / "no_mpi"),
            &out) != 0);
  CHECK(count(out, "started as one of 2 processes by an MPI launcher, but this program was built without MPI") == 2);
  CHECK_FALSE(fs::exists(kWork / "no_mpi"));
}
