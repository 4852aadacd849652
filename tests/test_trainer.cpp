// The library's training loop (train/trainer.hpp): each behaviour the trainers rely on, on small
// models that train in milliseconds: resume continues bit for bit (also after SIGINT, also in the
// epoch order, with label dropout and model dropout streams), the progress line and bar, the CSV
// log (and its truncation on resume), checkpoints every N kept K, a non-finite loss stopping the
// run with the step and leaving the last checkpoint intact, callbacks and evaluations, EMA that
// is really updated, label dropout, the learning-rate schedule, the epoch order of TensorDataset.
#include <catch2/catch.hpp>

#include <diffuse/models/toy_mlp.hpp>
#include <diffuse/nn/linear.hpp>
#include <diffuse/nn/timestep_embedding.hpp>
#include <diffuse/ops/dropout.hpp>
#include <diffuse/ops/elementwise.hpp>
#include <diffuse/ops/linear.hpp>
#include <diffuse/ops/shape.hpp>
#include <diffuse/train/trainer.hpp>

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

using namespace diffuse;
namespace fs = std::filesystem;

namespace {

// A small class-conditional 2-D denoiser written from the public layers (as a user would):
// linear2(dropout(silu(linear1(x) + W_t e(t) + emb[y]))). Records the labels it was given.
class CondMLP : public Module<float> {
 public:
  CondMLP(int64_t classes, Generator& g, double dropout = 0.0)
      : l1_(2, 32, g), lt_(16, 32, g), l2_(32, 2, g), classes_(classes), dropout_(dropout) {
    register_module("l1", l1_);
    register_module("lt", lt_);
    register_module("l2", l2_);
    emb_ = register_parameter("emb", Tensor<float>::randn({classes + 1, 32}, g));
  }
  Var<float> operator()(const Var<float>& x, const std::vector<int32_t>& t, const Labels* y, Generator* rng) const {
    Var<float> h = add(l1_(x), lt_(Var<float>(timestep_embedding<float>(t, 16, x.device()))));
    if (y) {
      seen.insert(seen.end(), y->begin(), y->end());
      h = add(h, gather_rows(emb_, *y));
    }
    h = silu(h);
    if (rng && dropout_ > 0) h = dropout(h, dropout_, *rng, true);
    return l2_(h);
  }
  mutable std::vector<int32_t> seen;

 private:
  Linear<float> l1_, lt_, l2_;
  Var<float> emb_;
  int64_t classes_;
  double dropout_;
};

// Points around one of 3 centres, labelled by their centre; fixed, so TensorDataset can hold them.
TensorDataset<float> labelled_points(int64_t n, DataOrder order, uint64_t seed = 11) {
  Generator g(seed);
  Tensor<float> x = Tensor<float>::randn({n, 2}, g);
  std::vector<int32_t> y(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    y[static_cast<size_t>(i)] = static_cast<int32_t>(i % 3);
    x[static_cast<size_t>(2 * i)] = 0.2f * x[static_cast<size_t>(2 * i)] + static_cast<float>(i % 3) - 1.0f;
  }
  return TensorDataset<float>(x, y, order, seed);
}

TrainOptions small_options(const std::string& out, int64_t steps) {
  TrainOptions o;
  o.steps = steps;
  o.batch = 8;
  o.lr = 5e-3;
  o.warmup = 3;
  o.lr_decay = LrDecay::cosine;
  o.clip = 0.5;
  o.ema = 0.9;
  o.label_dropout = 0.3;
  o.null_class = 3;
  o.seed = 5;
  o.out = out;
  o.log = nullptr;
  o.log_every = 4;
  return o;
}

fs::path fresh_dir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("diffuse_test_trainer_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::vector<std::vector<float>> weights(const Module<float>& m) {
  std::vector<std::vector<float>> w;
  for (auto& [n, p] : m.named_parameters()) {
    const Tensor<float> c = p.value().cpu();
    w.emplace_back(c.begin(), c.end());
  }
  return w;
}

std::vector<std::string> read_lines(const fs::path& p) {
  std::ifstream in(p);
  std::vector<std::string> l;
  for (std::string s; std::getline(in, s);) l.push_back(s);
  return l;
}

std::string read_all(FILE* f) {
  std::fflush(f);
  std::rewind(f);
  std::string s;
  char b[4096];
  for (size_t n; (n = std::fread(b, 1, sizeof b, f)) > 0;) s.append(b, n);
  return s;
}

const NoiseSchedule kSched = NoiseSchedule::linear(50);

}  // namespace

TEST_CASE("trainer: resume continues bit for bit (epoch order, label and model dropout)", "[trainer]") {
  for (DataOrder order : {DataOrder::epochs, DataOrder::with_replacement}) {
    const fs::path a = fresh_dir("full"), b = fresh_dir("cut");
    std::vector<double> full_losses, resumed_losses;
    std::vector<std::vector<float>> full_w, full_ema;
    {
      Generator init(1);
      CondMLP m(3, init, 0.2);
      auto data = labelled_points(13, order);  // 13 examples, batch 8: epochs end mid-batch
      Trainer<float, CondMLP> tr(m, kSched, data, small_options(a.string(), 20));
      tr.on_step([&](const StepInfo& s) { full_losses.push_back(s.loss); });
      REQUIRE(tr.run().status == TrainStatus::finished);
      full_w = weights(m);
      for (auto& t : tr.ema().shadow()) full_ema.emplace_back(t.begin(), t.end());
    }
    {
      Generator init(1);
      CondMLP m(3, init, 0.2);
      auto data = labelled_points(13, order);
      Trainer<float, CondMLP> tr(m, kSched, data, small_options(b.string(), 20));
      tr.every(8, [](auto& t) { t.request_stop(); });  // mid-epoch
      CHECK(tr.run().status == TrainStatus::interrupted);
    }
    {
      Generator init(99);  // other initial weights: everything must come from the checkpoint
      CondMLP m(3, init, 0.2);
      auto data = labelled_points(13, order);
      TrainOptions o = small_options(b.string(), 20);
      o.resume = (b / "checkpoint.safetensors").string();
      Trainer<float, CondMLP> tr(m, kSched, data, o);
      CHECK(tr.step() == 8);
      tr.on_step([&](const StepInfo& s) { resumed_losses.push_back(s.loss); });
      tr.run();
      REQUIRE(resumed_losses.size() == 12);
      for (size_t i = 0; i < 12; ++i) CHECK(resumed_losses[i] == full_losses[8 + i]);
      CHECK(weights(m) == full_w);
      std::vector<std::vector<float>> e;
      for (auto& t : tr.ema().shadow()) e.emplace_back(t.begin(), t.end());
      CHECK(e == full_ema);
    }
    // The CSV log of the resumed run is the uninterrupted run's, row for row, but for the timing.
    auto strip = [](std::vector<std::string> rows) {
      for (auto& r : rows) {
        std::stringstream ss(r);
        std::string f, out;
        for (int k = 0; std::getline(ss, f, ','); ++k)
          if (k < 4) out += f + ",";
        r = out;
      }
      return rows;
    };
    CHECK(strip(read_lines(a / "train_log.csv")) == strip(read_lines(b / "train_log.csv")));
    fs::remove_all(a);
    fs::remove_all(b);
  }
}

TEST_CASE("trainer: SIGINT stops after the step with a checkpoint; resuming gives the uninterrupted run", "[trainer]") {
  const fs::path a = fresh_dir("sig_full"), b = fresh_dir("sig_cut");
  ToyMLPConfig c;
  c.hidden = 16, c.layers = 2, c.temb_dim = 16;
  auto fill = [](Generator& g, int64_t B, Batch<float>& out) { g.normal(out.x0.data(), static_cast<size_t>(2 * B)); };
  std::vector<std::vector<float>> full;
  {
    Generator init(3);
    ToyMLP<float> m(c, init);
    GeneratedSource<float> src({2}, fill, "gaussian");
    TrainOptions o = small_options(a.string(), 15);
    o.label_dropout = 0;
    Trainer<float, ToyMLP<float>> tr(m, kSched, src, o);
    tr.run();
    full = weights(m);
  }
  void (*before)(int) = std::signal(SIGINT, SIG_IGN);
  std::signal(SIGINT, before);
  {
    Generator init(3);
    ToyMLP<float> m(c, init);
    GeneratedSource<float> src({2}, fill, "gaussian");
    TrainOptions o = small_options(b.string(), 15);
    o.label_dropout = 0;
    Trainer<float, ToyMLP<float>> tr(m, kSched, src, o);
    // Twice at once, as timeout(1) signals (the program, then its process group): the second
    // is the first's echo and must not end the process before the checkpoint.
    tr.every(6, [](auto&) {
      std::raise(SIGINT);
      std::raise(SIGINT);
    });
    const TrainResult r = tr.run();
    CHECK(r.status == TrainStatus::interrupted);
    CHECK(r.signal == SIGINT);
    CHECK(r.step == 6);
    CHECK(safetensors::File::read(r.checkpoint).metadata().at("step") == "6");
  }
  // The previous handler is back.
  CHECK(std::signal(SIGINT, before) == before);
  {
    Generator init(4);
    ToyMLP<float> m(c, init);
    GeneratedSource<float> src({2}, fill, "gaussian");
    TrainOptions o = small_options(b.string(), 15);
    o.label_dropout = 0;
    o.resume = (b / "checkpoint.safetensors").string();
    Trainer<float, ToyMLP<float>> tr(m, kSched, src, o);
    CHECK(tr.run().step == 15);
    CHECK(weights(m) == full);
  }
  fs::remove_all(a);
  fs::remove_all(b);
}

TEST_CASE("trainer: progress line every N steps, a bar only when asked or on a terminal", "[trainer]") {
  Generator init(2);
  CondMLP m(3, init);
  auto data = labelled_points(20, DataOrder::epochs);
  for (ProgressBar bar : {ProgressBar::automatic, ProgressBar::on}) {
    FILE* f = std::tmpfile();
    REQUIRE(f);
    TrainOptions o = small_options("", 10);
    o.log = f;
    o.log_every = 5;
    o.bar = bar;
    Trainer<float, CondMLP> tr(m, kSched, data, o);
    tr.run();
    const std::string s = read_all(f);
    std::fclose(f);
    INFO(s);
    for (const char* want : {"step  5/10  loss ", "step 10/10  loss ", "  lr ", "  grad ", " images/s  elapsed ", "  ETA "})
      CHECK(s.find(want) != std::string::npos);
    // A temporary file is no terminal: no bar unless asked for.
    CHECK((s.find("\r[") != std::string::npos) == (bar == ProgressBar::on));
    if (bar == ProgressBar::on) CHECK(s.find("100%") != std::string::npos);
    // The bar's loss is read back from the device record when the bar redraws: never the
    // record's untouched 0.
    CHECK(s.find("loss 0.0000") == std::string::npos);
  }
  CHECK(format_duration(42) == "42s");
  CHECK(format_duration(185) == "3m05s");
  CHECK(format_duration(7620) == "2h07m");
  CHECK(format_duration(NAN) == "?");
}

TEST_CASE("trainer: train_log.csv holds the figures and the evaluations; the learning rate follows warmup + cosine",
          "[trainer]") {
  const fs::path d = fresh_dir("csv");
  Generator init(2);
  CondMLP m(3, init);
  auto data = labelled_points(20, DataOrder::epochs);
  TrainOptions o = small_options(d.string(), 12);
  o.log_every = 4;
  Trainer<float, CondMLP> tr(m, kSched, data, o);
  std::vector<StepInfo> steps;
  tr.on_step([&](const StepInfo& s) { steps.push_back(s); });
  int evals = 0;
  tr.evaluate_every(3, {"probe"}, [&](auto& t) {
    ++evals;
    return std::map<std::string, double>{{"probe", 100.0 + static_cast<double>(t.step())}};
  });
  tr.run();
  CHECK(evals == 4);
  REQUIRE(steps.size() == 12);
  for (const StepInfo& s : steps) CHECK(s.lr == warmup_cosine_lr(o.lr, s.step - 1, o.warmup, o.steps));
  const auto rows = read_lines(d / "train_log.csv");
  REQUIRE(rows.size() == 1 + 6);  // steps 3, 4, 6, 8, 9, 12
  CHECK(rows[0] == "step,loss,lr,grad_norm,images_per_s,elapsed_s,probe");
  CHECK(rows[1].rfind("3,,,,,,103", 0) == 0);
  // Row at step 8: the mean loss and gradient norm of steps 5..8.
  std::stringstream ss(rows[4]);
  std::vector<std::string> f;
  for (std::string x; std::getline(ss, x, ',');) f.push_back(x);
  REQUIRE(f.size() >= 6);
  CHECK(f[0] == "8");
  double loss = 0, norm = 0;
  for (int k = 4; k < 8; ++k) loss += steps[k].loss / 4, norm += steps[k].grad_norm / 4;
  CHECK(std::stod(f[1]) == Approx(loss).epsilon(1e-7));
  CHECK(std::stod(f[3]) == Approx(norm).epsilon(1e-7));
  CHECK(std::stod(f[2]) == Approx(steps[7].lr).epsilon(1e-7));
  CHECK(std::stod(f[4]) > 0);
  CHECK(rows[6].rfind("12,", 0) == 0);
  CHECK(rows[6].substr(rows[6].size() - 4) == ",112");
  fs::remove_all(d);
}

TEST_CASE("trainer: checkpoints every N steps, the last K kept, resume truncates the log", "[trainer]") {
  const fs::path d = fresh_dir("keep");
  Generator init(2);
  CondMLP m(3, init);
  auto data = labelled_points(20, DataOrder::epochs);
  TrainOptions o = small_options(d.string(), 20);
  o.save_every = 5;
  o.keep = 3;
  {
    Trainer<float, CondMLP> tr(m, kSched, data, o);
    tr.run();
  }
  std::set<std::string> files;
  for (auto& e : fs::directory_iterator(d)) files.insert(e.path().filename().string());
  CHECK(files == std::set<std::string>{"checkpoint.safetensors", "checkpoint-00000010.safetensors",
                                       "checkpoint-00000015.safetensors", "train_log.csv"});
  CHECK(safetensors::File::read((d / "checkpoint.safetensors").string()).metadata().at("step") == "20");
  CHECK(safetensors::File::read((d / "checkpoint-00000010.safetensors").string()).metadata().at("step") == "10");
  // Resuming from step 10: the log keeps rows up to 10, then this run's.
  o.resume = (d / "checkpoint-00000010.safetensors").string();
  o.steps = 14;
  {
    Generator init2(2);
    CondMLP m2(3, init2);
    auto data2 = labelled_points(20, DataOrder::epochs);
    Trainer<float, CondMLP> tr(m2, kSched, data2, o);
    tr.run();
  }
  std::vector<std::string> steps_logged;
  for (auto& r : read_lines(d / "train_log.csv")) steps_logged.push_back(r.substr(0, r.find(',')));
  CHECK(steps_logged == std::vector<std::string>{"step", "4", "8", "12", "14"});
  // keep = 1: only checkpoint.safetensors.
  const fs::path d1 = fresh_dir("keep1");
  o = small_options(d1.string(), 10);
  o.save_every = 3;
  {
    Trainer<float, CondMLP> tr(m, kSched, data, o);
    tr.run();
  }
  files.clear();
  for (auto& e : fs::directory_iterator(d1)) files.insert(e.path().filename().string());
  CHECK(files == std::set<std::string>{"checkpoint.safetensors", "train_log.csv"});
  fs::remove_all(d);
  fs::remove_all(d1);
}

namespace {
// CondMLP that turns its input into NaN at one call.
class Poisoned : public Module<float> {
 public:
  Poisoned(Generator& g, int bad_call) : net_(3, g), bad_(bad_call) { register_module("net", net_); }
  Var<float> operator()(const Var<float>& x, const std::vector<int32_t>& t, const Labels* y) const {
    if (++calls_ != bad_) return net_(x, t, y, nullptr);
    Tensor<float> v = x.value().clone();
    v[1] = NAN;
    return net_(Var<float>(v), t, y, nullptr);
  }

 private:
  CondMLP net_;
  int bad_;
  mutable int calls_ = 0;
};
}  // namespace

// A NaN loss at step 13 stops the run naming that step, with no update from it and the last
// checkpoint (step 10) intact. With a step hook the loop reads the loss every step; without one
// only for a log line (every 4), a checkpoint (every 5) and the end, so the NaN is seen at step
// 15: Adam and the EMA skipped steps 13-15 (the record said so where the weights are), and the
// run must end exactly as the hooked one.
TEST_CASE("trainer: a non-finite loss stops the run naming the step, with the last good step's weights, EMA and checkpoint", "[trainer]") {
  std::vector<std::vector<float>> w[2], ema[2];
  std::string msg[2];
  int64_t steps[2] = {0, 0}, adam_t[2] = {0, 0}, ema_n[2] = {0, 0};
  for (int hooked = 0; hooked < 2; ++hooked) {
    const fs::path d = fresh_dir("nan_late");  // the same path: the messages must be equal
    Generator init(2);
    Poisoned m(init, 13);
    auto data = labelled_points(20, DataOrder::epochs);
    TrainOptions o = small_options(d.string(), 30);
    o.save_every = 5;
    Trainer<float, Poisoned> tr(m, kSched, data, o);
    int64_t seen = 0;
    std::vector<std::vector<float>> w12;
    if (hooked)
      tr.on_step([&](const StepInfo& s) {
        seen = s.step;
        if (s.step == 12) w12 = weights(m);
      });
    try {
      tr.run();
      FAIL("a NaN loss did not stop the run");
    } catch (const std::runtime_error& e) {
      msg[hooked] = e.what();
    }
    w[hooked] = weights(m);
    if (hooked) {
      CHECK(seen == 12);  // the hook never saw the bad step
      CHECK(w[hooked] == w12);  // no update from the bad step
    }
    CHECK_THROWS_WITH(tr.save(), Catch::Contains("non-finite step"));  // its streams are past step 12
    for (auto& t : tr.ema().shadow()) ema[hooked].emplace_back(t.begin(), t.end());
    steps[hooked] = tr.step(), adam_t[hooked] = tr.optimizer().steps(), ema_n[hooked] = tr.ema().updates();
    const safetensors::File f = safetensors::File::read((d / "checkpoint.safetensors").string());
    CHECK(f.metadata().at("step") == "10");
    CHECK(f.contains("net.l1.weight"));  // it loads into the wrapped model's names
    CHECK(msg[hooked].find("last good checkpoint: " + (d / "checkpoint.safetensors").string() + " at step 10") !=
          std::string::npos);
    fs::remove_all(d);
  }
  INFO(msg[0]);
  CHECK(msg[0].find("loss is nan at step 13; no update from it on, the weights are step 12's") != std::string::npos);
  CHECK(msg[0] == msg[1]);
  CHECK(w[0] == w[1]);
  CHECK(ema[0] == ema[1]);
  CHECK(steps[0] == 12);
  CHECK(steps[1] == 12);
  CHECK(adam_t[0] == 12);
  CHECK(adam_t[1] == 12);
  CHECK(ema_n[0] == ema_n[1]);
}

TEST_CASE("trainer: callbacks see the EMA weights, the EMA is updated, label dropout reaches the model", "[trainer]") {
  Generator init(2);
  CondMLP m(3, init);
  const auto w0 = weights(m);
  auto data = labelled_points(20, DataOrder::epochs);
  TrainOptions o = small_options("", 40);
  o.label_dropout = 0.5;
  Trainer<float, CondMLP> tr(m, kSched, data, o);
  int calls = 0;
  tr.every(10, [&](auto& t) {
    ++calls;
    const auto live = weights(m);
    std::vector<std::vector<float>> shadow;
    for (auto& s : t.ema().shadow()) shadow.emplace_back(s.begin(), s.end());
    CHECK(m.is_training());
    t.with_ema_weights([&] {
      CHECK(weights(m) == shadow);
      CHECK(!m.is_training());
    });
    CHECK(m.is_training());
    CHECK(weights(m) == live);
    CHECK(shadow != live);  // the average lags the live weights
    CHECK(shadow != w0);    // and moved from the start
  });
  tr.run();
  CHECK(calls == 4);
  CHECK(tr.ema().updates() == 40);
  const double nulls = static_cast<double>(std::count(m.seen.begin(), m.seen.end(), 3)) / static_cast<double>(m.seen.size());
  CHECK(m.seen.size() == 40 * 8);
  CHECK(nulls > 0.35);
  CHECK(nulls < 0.65);
  // Without dropout the model sees only real labels.
  m.seen.clear();
  o.label_dropout = 0;
  Trainer<float, CondMLP> t2(m, kSched, data, o);
  t2.run();
  CHECK(std::count(m.seen.begin(), m.seen.end(), 3) == 0);
  // Label dropout needs labelled data.
  auto fill = [](Generator& g, int64_t B, Batch<float>& out) { g.normal(out.x0.data(), static_cast<size_t>(2 * B)); };
  GeneratedSource<float> unlabelled({2}, fill);
  o.label_dropout = 0.1;
  CHECK_THROWS_WITH((Trainer<float, CondMLP>(m, kSched, unlabelled, o)), Catch::Contains("labelled data"));
}

TEST_CASE("TensorDataset: epochs visit every example once, in a seeded order that resumes mid-epoch", "[trainer]") {
  const int64_t N = 10, B = 3;
  Tensor<float> x({N, 1});
  for (int64_t i = 0; i < N; ++i) x[static_cast<size_t>(i)] = static_cast<float>(i);
  TensorDataset<float> ds(x, {}, DataOrder::epochs, 42);
  Generator g(0);
  Batch<float> b;
  std::vector<int> order;
  for (int k = 0; k < 40; ++k) {
    ds.next(B, g, b);
    for (int64_t i = 0; i < B; ++i) order.push_back(static_cast<int>(b.x0[static_cast<size_t>(i)]));
  }
  CHECK(g.offset == 0);  // the epoch order does not touch the training stream
  std::vector<std::vector<int>> epochs;
  for (size_t e = 0; e + N <= order.size(); e += N) {
    std::vector<int> ep(order.begin() + static_cast<long>(e), order.begin() + static_cast<long>(e + N));
    epochs.push_back(ep);
    std::sort(ep.begin(), ep.end());
    for (int i = 0; i < N; ++i) CHECK(ep[static_cast<size_t>(i)] == i);
  }
  REQUIRE(epochs.size() == 12);
  CHECK(epochs[0] != epochs[1]);  // reshuffled each epoch
  TensorDataset<float> other(x, {}, DataOrder::epochs, 43);
  CHECK(other.permutation(0) != ds.permutation(0));
  // State after 7 batches (epoch 2, position 1), restored into a fresh dataset, continues the same.
  TensorDataset<float> a(x, {}, DataOrder::epochs, 42), c(x, {}, DataOrder::epochs, 42);
  for (int k = 0; k < 7; ++k) a.next(B, g, b);
  CHECK(a.epoch() == 2);
  CHECK(a.position() == 1);
  c.set_state(a.state());
  Batch<float> ba, bc;
  for (int k = 0; k < 5; ++k) {
    a.next(B, g, ba);
    c.next(B, g, bc);
    CHECK(std::vector<float>(ba.x0.begin(), ba.x0.end()) == std::vector<float>(bc.x0.begin(), bc.x0.end()));
  }
  TensorDataset<float> wrong(x, {}, DataOrder::epochs, 7);
  CHECK_THROWS_WITH(wrong.set_state(a.state()), Catch::Contains("seeded with 42"));
  // With replacement: uniform indices from the training stream.
  TensorDataset<float> r(x, {}, DataOrder::with_replacement);
  Generator g1(9), g2(9);
  r.next(B, g1, b);
  std::vector<uint32_t> idx(B);
  g2.randint(idx.data(), idx.size(), static_cast<uint32_t>(N));
  for (int64_t i = 0; i < B; ++i) CHECK(b.x0[static_cast<size_t>(i)] == static_cast<float>(idx[static_cast<size_t>(i)]));
  CHECK_THROWS_WITH((TensorDataset<float>(x, std::vector<int32_t>{1, 2}, DataOrder::epochs)),
                    Catch::Contains("2 labels for 10 examples"));
}

TEST_CASE("trainer: resume refuses a checkpoint of another model configuration", "[trainer]") {
  const fs::path d = fresh_dir("identity");
  Generator init(2);
  CondMLP m(3, init);
  auto data = labelled_points(20, DataOrder::epochs);
  TrainOptions o = small_options(d.string(), 3);
  o.identity = {{"model", "{\"width\":32}"}};
  {
    Trainer<float, CondMLP> tr(m, kSched, data, o);
    tr.run();
  }
  o.identity = {{"model", "{\"width\":64}"}};
  o.resume = (d / "checkpoint.safetensors").string();
  CHECK_THROWS_WITH((Trainer<float, CondMLP>(m, kSched, data, o)),
                    Catch::Contains("was trained with model {\"width\":32}, this run asks for {\"width\":64}"));
  fs::remove_all(d);
}

TEST_CASE("trainer: the objective (x0, v, min-SNR) trains, is recorded in the checkpoint and checked on resume",
          "[trainer]") {
  auto data = labelled_points(60, DataOrder::epochs);
  for (const Prediction p : {Prediction::X0, Prediction::V}) {
    INFO(prediction_name(p));
    const fs::path d = fresh_dir(std::string("objective_") + prediction_name(p));
    Generator init(4);
    CondMLP m(3, init);
    TrainOptions o = small_options(d.string(), 150);
    o.objective.prediction = p;
    o.objective.min_snr_gamma = 5.0;
    std::vector<double> losses;
    {
      Trainer<float, CondMLP> tr(m, kSched, data, o);
      tr.on_step([&](const StepInfo& s) { losses.push_back(s.loss); });
      tr.run();
    }
    REQUIRE(losses.size() == 150);
    double first = 0, last = 0;
    for (int i = 0; i < 20; ++i) first += losses[static_cast<size_t>(i)], last += losses[losses.size() - 1 - static_cast<size_t>(i)];
    CHECK(last < 0.7 * first);  // it learns
    const auto meta = safetensors::File::read((d / "checkpoint.safetensors").string()).metadata();
    CHECK(meta.at("prediction") == prediction_name(p));
    CHECK(meta.at("min_snr_gamma") == std::to_string(5.0));
    // Resuming with another prediction, or without the weighting, is refused in one line.
    TrainOptions r = o;
    r.resume = (d / "checkpoint.safetensors").string();
    r.steps = 160;
    r.objective.prediction = Prediction::Epsilon;
    CHECK_THROWS_WITH((Trainer<float, CondMLP>(m, kSched, data, r)),
                      Catch::Contains(std::string("was trained with prediction ") + prediction_name(p) +
                                      ", this run asks for eps"));
    r.objective.prediction = p;
    r.objective.min_snr_gamma = 0;
    CHECK_THROWS_WITH((Trainer<float, CondMLP>(m, kSched, data, r)), Catch::Contains("min_snr_gamma"));
    r.objective.min_snr_gamma = 5.0;
    Trainer<float, CondMLP> same(m, kSched, data, r);  // the same objective resumes
    CHECK(same.step() == 150);
    fs::remove_all(d);
  }
  TrainOptions bad = small_options("", 1);
  bad.objective.min_snr_gamma = -1;
  Generator init(4);
  CondMLP m(3, init);
  CHECK_THROWS_WITH((Trainer<float, CondMLP>(m, kSched, data, bad)), Catch::Contains("min-SNR gamma"));
}

TEST_CASE("trainer: with a communicator of one, the data-parallel path trains bit for bit as the plain loop",
          "[trainer]") {
  // SingleProcess runs everything data parallelism adds (the shared generators, the gradient
  // buckets filled from the tape's hook and averaged, the broadcast at the start, the agreed stop,
  // the replica check at checkpoints) over a group of one, where each is exact.
  for (DataOrder order : {DataOrder::epochs, DataOrder::with_replacement}) {
    std::vector<std::vector<float>> w[2], ema[2];
    std::vector<double> losses[2];
    for (int dp = 0; dp < 2; ++dp) {
      const fs::path dir = fresh_dir("single" + std::to_string(dp));
      Generator init(1);
      CondMLP m(3, init, 0.2);
      auto data = labelled_points(13, order);
      SingleProcess one;
      TrainOptions o = small_options(dir.string(), 12);
      o.save_every = 5;
      if (dp) o.comm = &one;
      Trainer<float, CondMLP> tr(m, kSched, data, o);
      CHECK(tr.ranks() == 1);
      tr.on_step([&](const StepInfo& s) { losses[dp].push_back(s.loss); });
      tr.run();
      w[dp] = weights(m);
      for (auto& t : tr.ema().shadow()) ema[dp].emplace_back(t.begin(), t.end());
      fs::remove_all(dir);
    }
    CHECK(losses[1] == losses[0]);
    CHECK(w[1] == w[0]);
    CHECK(ema[1] == ema[0]);
  }
}
