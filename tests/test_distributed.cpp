// Data parallelism across processes (include/diffuse/distributed/, TrainOptions::comm): run by ctest
// as `mpirun -np 2 test_distributed` (tests/CMakeLists.txt). Every rank runs every case; the
// reference, one process with the whole batch, is trained by each rank in-process (no
// communicator), so each rank compares its own replica with it. The seed of a case comes from
// rank 0, so that both ranks draw the same data and model.
//
// What the cases show: two ranks at batch B/2 train as one process at batch B (every random draw
// shared out, the gradients averaged), on the CPU and on the emulated CUDA device (whose
// gradients go through host memory); a two-rank run resumed from its checkpoint continues bit for
// bit, and one process can resume it; bad starts fail on every rank at once; a stop on one rank
// stops all at the same step; a replica that drifted is mended at the next checkpoint.
#define CATCH_CONFIG_EXTERNAL_INTERFACES  // the listener below
#include <catch2/catch.hpp>

#include <diffuse/backend/cuda_emulation.hpp>
#include <diffuse/data/augment.hpp>
#include <diffuse/distributed/mpi.hpp>
#include <diffuse/io/checkpoint.hpp>
#include <diffuse/models/unet.hpp>
#include <diffuse/train/trainer.hpp>

#include "compare.hpp"
#include "kernel_seed.hpp"

#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

using namespace diffuse;
using diffuse::testing::rel_err;
namespace fs = std::filesystem;

namespace {

std::unique_ptr<MpiCommunicator> g_comm;
MpiCommunicator& comm() { return *g_comm; }

// A seed drawn on rank 0 and given to all.
uint64_t shared_seed() {
  uint64_t s = diffuse::testing::fresh_seed();
  comm().broadcast(&s, sizeof s, 0);
  return s;
}

// A folder every rank names alike (rank 0's pid), made by rank 0.
fs::path shared_dir(const std::string& name) {
  int64_t pid = ::getpid();
  comm().broadcast(&pid, sizeof pid, 0);
  const fs::path d = fs::temp_directory_path() / ("diffuse_test_distributed_" + name + "_" + std::to_string(pid));
  if (comm().rank() == 0) {
    fs::remove_all(d);
    fs::create_directories(d);
  }
  comm().barrier();
  return d;
}

// A folder of this rank's own (the reference runs: one process each).
fs::path own_dir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() /
                     ("diffuse_test_distributed_" + name + "_own_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// The model of every case: a small class-conditional U-Net with dropout and attention, so that
// the label dropout, model dropout and normalisation all take part.
UNetConfig tiny_unet() {
  UNetConfig c;
  c.in_ch = c.out_ch = 1;
  c.ch = 8;
  c.ch_mult = {1, 2};
  c.num_res_blocks = 1;
  c.attn_resolutions = {4};
  c.groups = 4;
  c.resolution = 8;
  c.num_classes = 3;
  c.dropout = 0.1;
  return c;
}

struct Run {
  std::vector<double> losses, norms;
  std::vector<Tensor<float>> weights, ema, m, v;
  safetensors::Metadata meta;  // of the checkpoint it wrote (rank 0), read back by every rank
  TrainResult result;
};

struct Setup {
  uint64_t seed = 0;
  Device device = Device::CPU;
  Communicator* comm = nullptr;
  int64_t steps = 20, save_every = 0;
  fs::path out;
  std::string resume;
  FILE* log = nullptr;
  std::function<void(Trainer<float, UNet<float>>&)> hooks;
};

// 37 images (batches of 8 cross the epochs' ends), in epochs, flipped at random: every kind of
// draw a source makes.
Run train(const Setup& s) {
  const UNetConfig c = tiny_unet();
  Generator gd(s.seed, 11);
  Tensor<float> images = Tensor<float>::randn({37, 8, 8, 1}, gd);
  std::vector<int32_t> labels;
  for (int32_t i = 0; i < 37; ++i) labels.push_back(i % 3);
  TensorDataset<float> set(images, labels, DataOrder::epochs, s.seed);
  RandomHorizontalFlip<float> data(set);
  Generator init(s.seed);
  UNet<float> model(c, init);
  model.to(s.device);
  TrainOptions o;
  o.steps = s.steps, o.batch = 8, o.lr = 2e-3, o.warmup = 2, o.clip = 1.0, o.ema = 0.9, o.seed = s.seed;
  o.label_dropout = 0.3, o.null_class = 3, o.log = s.log, o.log_every = 5;
  o.save_every = s.save_every, o.out = s.out.string(), o.resume = s.resume, o.comm = s.comm;
  Trainer<float, UNet<float>> tr(model, NoiseSchedule::linear(100), data, o);
  Run r;
  tr.on_step([&](const StepInfo& i) {
    r.losses.push_back(i.loss);
    r.norms.push_back(i.grad_norm);
  });
  if (s.hooks) s.hooks(tr);
  r.result = tr.run();
  for (auto& [n, p] : model.named_parameters()) r.weights.push_back(p.value().cpu());
  for (auto& t : tr.ema().shadow()) r.ema.push_back(t.cpu());
  for (auto& t : tr.optimizer().first_moments()) r.m.push_back(t.cpu());
  for (auto& t : tr.optimizer().second_moments()) r.v.push_back(t.cpu());
  if (s.comm) s.comm->barrier();  // rank 0's checkpoint is written
  if (!s.out.empty()) r.meta = safetensors::File::read((s.out / "checkpoint.safetensors").string()).metadata();
  return r;
}

Tensor<float> flat(const std::vector<Tensor<float>>& ts) {
  std::vector<float> f;
  for (const auto& t : ts) f.insert(f.end(), t.begin(), t.end());
  return Tensor<float>::from(f, {static_cast<int64_t>(f.size())});
}

// Rank 0's copy of these tensors, bit for bit on this rank?
bool same_as_rank0(const std::vector<Tensor<float>>& ts) {
  const Tensor<float> f = flat(ts);
  std::vector<float> mine(f.begin(), f.end()), root = mine;
  comm().broadcast(root.data(), root.size() * sizeof(float), 0);
  return mine == root;
}

bool same_bits(const std::vector<Tensor<float>>& a, const std::vector<Tensor<float>>& b) {
  if (a.size() != b.size()) return false;
  for (size_t k = 0; k < a.size(); ++k)
    if (a[k].shape() != b[k].shape() || !std::equal(a[k].begin(), a[k].end(), b[k].begin())) return false;
  return true;
}

// The metadata that says where every stream and the data order stand (the same whatever the rank count).
safetensors::Metadata positions(const safetensors::Metadata& m) {
  safetensors::Metadata p;
  for (const auto& [k, v] : m)
    if (k.find("rng") != std::string::npos || k.rfind("data.", 0) == 0 || k == "step") p[k] = v;
  return p;
}

// Two ranks against one process. Where they differ: the weight gradients sum B H W rows (one
// process) or two halves of B/2 H W rows added afterwards (the ranks), and the loss is a mean of
// the ranks' means: the same numbers added in another order (each sample's forward and backward
// are the same computation either way). So each step's gradients differ by the rounding of sums
// of K = B H W = 512 terms, and the steps are a chain: the bound for the loss, the gradient norm
// and what the run changed in the weights is float_sums_tolerance(K, steps), 2.4e-5 for 20 steps
// (seen: 5e-8, 1e-6, 1.3e-6). The gradient norm is checked too because Adam is blind to a wrong
// scale of the gradients (a sum where a mean belongs would pass the losses and weights).
void check_equivalent(const Run& one, const Run& two, const std::vector<Tensor<float>>& w0) {
  REQUIRE(two.losses.size() == one.losses.size());
  const double bound = diffuse::testing::float_sums_tolerance(8.0 * 8 * 8, static_cast<double>(one.losses.size()));
  double worst_loss = 0, worst_norm = 0;
  for (size_t s = 0; s < one.losses.size(); ++s) {
    worst_loss = std::max(worst_loss, std::abs(two.losses[s] - one.losses[s]) / one.losses[s]);
    worst_norm = std::max(worst_norm, std::abs(two.norms[s] - one.norms[s]) / one.norms[s]);
  }
  std::vector<Tensor<float>> d1, d2, e1, e2;
  for (size_t k = 0; k < w0.size(); ++k) {
    Tensor<float> a = one.weights[k].clone(), b = two.weights[k].clone(), ea = one.ema[k].clone(), eb = two.ema[k].clone();
    for (size_t i = 0; i < a.size(); ++i) a[i] -= w0[k][i], b[i] -= w0[k][i], ea[i] -= w0[k][i], eb[i] -= w0[k][i];
    d1.push_back(a), d2.push_back(b), e1.push_back(ea), e2.push_back(eb);
  }
  const double dw = rel_err(flat(d2), flat(d1)), dema = rel_err(flat(e2), flat(e1));
  std::printf("rank %d: two ranks vs one process over %zu steps: losses within %.2e, gradient norms %.2e, weight "
              "changes %.2e, EMA changes %.2e (bound %.2e each)\n",
              comm().rank(), one.losses.size(), worst_loss, worst_norm, dw, dema, bound);
  CHECK(worst_loss < bound);
  CHECK(worst_norm < bound);
  CHECK(dw < bound);
  CHECK(dema < bound);
  CHECK(positions(two.meta) == positions(one.meta));  // the same draws taken, the same data order
}

}  // namespace

// A REQUIRE that fails, or an exception, ends a case on one rank while the other goes on into
// collectives nobody will join: rather than hang until ctest's timeout, end every rank at once
// (after the reporter has printed the failure).
struct AbortOnFatalFailure : Catch::TestEventListenerBase {
  using TestEventListenerBase::TestEventListenerBase;
  bool fatal = false;
  bool assertionEnded(const Catch::AssertionStats& s) override {
    const Catch::AssertionResult& r = s.assertionResult;
    if (!r.succeeded() && (r.getResultType() == Catch::ResultWas::ThrewException ||
                           (r.m_info.resultDisposition & Catch::ResultDisposition::Normal)))
      fatal = true;
    return true;
  }
  void testCaseEnded(const Catch::TestCaseStats& s) override {
    if (!fatal) return;
    std::fprintf(stderr, "test_distributed: rank %d: '%s' ended on a fatal failure: ending every rank\n",
                 comm().rank(), s.testInfo.name.c_str());
    std::fflush(stdout);
    comm().abort(1);
  }
};
CATCH_REGISTER_LISTENER(AbortOnFatalFailure)

namespace diffuse::testing {
// MPI before the tests (and MPI_Finalize when g_comm goes, after main).
int before_tests(int argc, char** argv) {
  g_comm = std::make_unique<MpiCommunicator>(&argc, &argv);
  if (comm().size() != 2)
    std::fprintf(stderr, "test_distributed: %d rank(s); the cases are written for 2 (mpirun -np 2)\n", comm().size());
  return -1;
}
}  // namespace diffuse::testing

TEST_CASE("distributed: the communicator sums, takes extremes and broadcasts over the ranks") {
  const int r = comm().rank(), n = comm().size();
  std::vector<float> f{float(r + 1), -float(r), 0.5f};
  comm().all_reduce(f.data(), f.size(), ReduceOp::sum);
  CHECK(f == std::vector<float>{float(n * (n + 1) / 2), -float(n * (n - 1) / 2), 0.5f * n});
  double d[2] = {double(r), -double(r)};
  comm().all_reduce(d, 2, ReduceOp::max);
  CHECK(d[0] == n - 1);
  CHECK(d[1] == 0);
  double e = r;
  comm().all_reduce(&e, 1, ReduceOp::min);
  CHECK(e == 0);
  char text[16] = {};
  if (r == 0) std::snprintf(text, sizeof text, "from rank 0");
  comm().broadcast(text, sizeof text, 0);
  CHECK(std::string(text) == "from rank 0");
  CHECK(comm().describe().find(std::to_string(n)) != std::string::npos);
}

TEST_CASE("distributed: two ranks at batch B/2 train as one process at batch B (CPU)") {
  const uint64_t seed = shared_seed();
  INFO("seed " << seed);
  const fs::path a = own_dir("one_cpu"), b = shared_dir("two_cpu");
  Setup s;
  s.seed = seed;
  s.out = a;
  const Run one = train(s);  // the reference: this rank alone, the whole batch
  s.comm = &comm();
  s.out = b;
  const Run two = train(s);
  Generator init(seed);
  UNet<float> fresh(tiny_unet(), init);
  std::vector<Tensor<float>> w0;
  for (auto& [n, p] : fresh.named_parameters()) w0.push_back(p.value().clone());
  check_equivalent(one, two, w0);
  // The ranks hold one model: bit for bit the same weights, EMA and moments on every rank.
  CHECK(same_as_rank0(two.weights));
  CHECK(same_as_rank0(two.ema));
  CHECK(same_as_rank0(two.m));
  CHECK(same_as_rank0(two.v));
  comm().barrier();
  if (comm().rank() == 0) fs::remove_all(b);
  fs::remove_all(a);
}

TEST_CASE("distributed: on the emulated CUDA device (gradients through host memory) two ranks train as one") {
  EmulatedCuda emu;
  const uint64_t seed = shared_seed();
  INFO("seed " << seed);
  const fs::path a = own_dir("one_cuda"), b = shared_dir("two_cuda");
  Setup s;
  s.seed = seed;
  s.device = Device::CUDA;
  s.steps = 2;  // the emulation runs every kernel as CPU fibers: slow, and the road is what is tested
  s.out = a;
  const Run one = train(s);
  s.comm = &comm();
  s.out = b;
  const Run two = train(s);
  Generator init(seed);
  UNet<float> fresh(tiny_unet(), init);
  std::vector<Tensor<float>> w0;
  for (auto& [n, p] : fresh.named_parameters()) w0.push_back(p.value().clone());
  check_equivalent(one, two, w0);
  CHECK(same_as_rank0(two.weights));
  comm().barrier();
  if (comm().rank() == 0) fs::remove_all(b);
  fs::remove_all(a);
}

TEST_CASE("distributed: a two-rank run resumed from its checkpoint continues bit for bit; one process can resume it") {
  const uint64_t seed = shared_seed();
  INFO("seed " << seed);
  const fs::path full = shared_dir("full"), cut = shared_dir("cut");
  Setup s;
  s.seed = seed;
  s.comm = &comm();
  s.out = full;
  const Run whole = train(s);
  // Stopped at step 9 by a request on rank 0 (a callback), then resumed on both ranks.
  s.out = cut;
  s.hooks = [](Trainer<float, UNet<float>>& t) { t.every(9, [](auto& tr) { tr.request_stop(); }); };
  const Run first = train(s);
  CHECK(first.result.status == TrainStatus::interrupted);
  CHECK(first.result.step == 9);
  CHECK(first.meta.at("step") == "9");
  const fs::path at9 = cut / "at9.safetensors";  // kept for the one-process resume below
  if (comm().rank() == 0) fs::copy_file(cut / "checkpoint.safetensors", at9);
  comm().barrier();
  s.hooks = nullptr;
  s.resume = (cut / "checkpoint.safetensors").string();
  const Run rest = train(s);
  CHECK(rest.result.start_step == 9);
  CHECK(rest.losses == std::vector<double>(whole.losses.begin() + 9, whole.losses.end()));
  CHECK(same_bits(rest.weights, whole.weights));
  CHECK(same_bits(rest.ema, whole.ema));
  CHECK(same_bits(rest.m, whole.m));
  CHECK(same_bits(rest.v, whole.v));
  CHECK(rest.meta == whole.meta);
  // One process resumes the two ranks' checkpoint: the streams stand where one process's would,
  // so it goes on as the ranks did, up to the order of float sums.
  if (comm().rank() == 0) {
    Setup alone;
    alone.seed = seed;
    alone.resume = at9.string();
    alone.out = own_dir("resumed_alone");
    const Run solo = train(alone);
    CHECK(solo.losses.size() == 11);
    const double bound = diffuse::testing::float_sums_tolerance(8.0 * 8 * 8, 11);  // as check_equivalent
    for (size_t k = 0; k < std::min<size_t>(solo.losses.size(), 11); ++k)
      CHECK(std::abs(solo.losses[k] - whole.losses[9 + k]) < bound * whole.losses[9 + k]);
    CHECK(positions(solo.meta) == positions(whole.meta));
    fs::remove_all(alone.out);
    fs::remove_all(full);
    fs::remove_all(cut);
  }
  comm().barrier();
}

TEST_CASE("distributed: ranks that start from different checkpoints, or a batch that does not divide, fail on every rank") {
  const uint64_t seed = shared_seed();
  const fs::path d = shared_dir("mismatch");
  Setup s;
  s.seed = seed;
  s.comm = &comm();
  s.out = d / "a";
  s.steps = 3;
  train(s);
  s.out = d / "b";
  s.steps = 5;
  train(s);
  // Rank 1 is given the other checkpoint: every rank throws, none waits for the others.
  Setup r = s;
  r.out = d / "c";
  r.steps = 8;
  r.resume = (d / (comm().rank() == 0 ? "a" : "b") / "checkpoint.safetensors").string();
  CHECK_THROWS_WITH(train(r), Catch::Contains("do not start from the same state") &&
                                  Catch::Contains("same --resume checkpoint"));
  // A batch the ranks cannot share evenly: refused when the trainer is made, before any collective.
  const UNetConfig c = tiny_unet();
  Generator g(1);
  UNet<float> m(c, g);
  TensorDataset<float> data(Tensor<float>::randn({4, 8, 8, 1}, g), {0, 1, 2, 0});
  TrainOptions o;
  o.batch = 2 * comm().size() + 1;
  o.comm = &comm();
  o.log = nullptr;
  CHECK_THROWS_WITH((Trainer<float, UNet<float>>(m, NoiseSchedule::linear(100), data, o)),
                    Catch::Contains("does not divide among " + std::to_string(comm().size()) + " processes"));
  comm().barrier();
  if (comm().rank() == 0) fs::remove_all(d);
}

TEST_CASE("distributed: a signal on one rank stops every rank after the same step, with rank 0's checkpoint") {
  const uint64_t seed = shared_seed();
  const fs::path d = shared_dir("signal");
  Setup s;
  s.seed = seed;
  s.comm = &comm();
  s.out = d;
  // SIGTERM reaches rank 1 only, during step 4 (as when a scheduler signals one process first).
  s.hooks = [](Trainer<float, UNet<float>>& t) {
    t.on_step([&t](const StepInfo& i) {
      if (i.step == 4 && t.rank() == 1) std::raise(SIGTERM);
    });
  };
  const Run r = train(s);
  CHECK(r.result.status == TrainStatus::interrupted);
  CHECK(r.result.step == 4);
  CHECK(r.losses.size() == 4);
  CHECK(r.meta.at("step") == "4");
  CHECK(r.result.checkpoint == (comm().rank() == 0 ? (d / "checkpoint.safetensors").string() : ""));
  comm().barrier();
  if (comm().rank() == 0) fs::remove_all(d);
}

TEST_CASE("distributed: weights that drifted apart on one rank are made whole at the next checkpoint") {
  const uint64_t seed = shared_seed();
  const fs::path d = shared_dir("drift");
  Setup s;
  s.seed = seed;
  s.comm = &comm();
  s.out = d;
  s.steps = 12;
  s.save_every = 10;
  // After step 3 rank 1's copy of one weight moves (as a collective that rounded differently would).
  s.hooks = [](Trainer<float, UNet<float>>& t) {
    t.on_step([&t](const StepInfo& i) {
      if (i.step == 3 && t.rank() == 1) {
        Tensor<float>& w = t.model().named_parameters().front().second.node()->value;
        w[0] += 1e-3f;
      }
    });
  };
  std::FILE* log = std::tmpfile();
  REQUIRE(log);
  s.log = log;
  const Run r = train(s);
  CHECK(same_as_rank0(r.weights));
  CHECK(same_as_rank0(r.ema));
  CHECK(same_as_rank0(r.m));
  // Rank 0 said so (the other ranks print nothing).
  std::fflush(log);
  std::rewind(log);
  std::string said(4096, '\0');
  said.resize(std::fread(said.data(), 1, said.size(), log));
  std::fclose(log);
  if (comm().rank() == 0) CHECK_THAT(said, Catch::Contains("the ranks' weights differed at step 10") &&
                                               Catch::Contains("rank 0's copied to all"));
  else CHECK(said.empty());
  comm().barrier();
  if (comm().rank() == 0) fs::remove_all(d);
}
