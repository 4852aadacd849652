// The diffusion training loop: one step is
//   batch x0 (and labels) from the source -> labels dropped to the null class (classifier-free
//   guidance) -> t ~ U{0..T-1}, eps ~ N(0, I), x_t = q_sample(x0, t, eps) -> the objective's loss
//   -> backward -> gradient norm (clipped) and non-finite check into a StepRecord -> learning
//   rate (warmup, decay) -> Adam (+ EMA in the same pass; skipped on the device after a
//   non-finite step)
// on the model's device without waiting for it (the record is read back only for a log line, a
// hook, a callback, a checkpoint or the bar; a NaN is reported at that read, naming its step), with a progress line and bar, train_log.csv, checkpoints every N steps
// and on SIGINT/SIGTERM (temporary file + rename, last K kept), callbacks for sample grids and
// evaluations, and resume that continues bit for bit: the checkpoint holds the weights, Adam's
// moments, the EMA, the step and every random stream's position (training, label dropout, model
// dropout, the data order).
//
//   Trainer<float, UNet<float>> tr(model, schedule, data, opts);
//   tr.every(1000, [&](auto& t) { t.with_ema_weights([&] { /* sample a grid */ }); });
//   tr.evaluate_every(5000, {"fid"}, [&](auto& t) { return std::map<std::string, double>{{"fid", ...}}; });
//   TrainResult r = tr.run();
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/backend/cuda_graph.hpp>
#include <diffuse/data/dataset.hpp>
#include <diffuse/diffusion/denoiser.hpp>
#include <diffuse/diffusion/guidance.hpp>
#include <diffuse/diffusion/objectives.hpp>
#include <diffuse/diffusion/q_sample.hpp>
#include <diffuse/diffusion/schedule.hpp>
#include <diffuse/distributed/communicator.hpp>
#include <diffuse/distributed/grad_reducer.hpp>
#include <diffuse/io/checkpoint.hpp>
#include <diffuse/optim/adam.hpp>
#include <diffuse/optim/clip_grad_norm.hpp>
#include <diffuse/optim/ema.hpp>
#include <diffuse/optim/lr_schedule.hpp>
#include <diffuse/train/csv_log.hpp>
#include <diffuse/train/progress.hpp>
#include <diffuse/train/stop_signals.hpp>

namespace diffuse {

enum class LrDecay { constant, cosine };  // after the warmup: constant, or cosine to 0 at the last step

struct TrainOptions {
  int64_t steps = 1000;
  int64_t batch = 64;                 // the whole batch: with N processes (comm) each takes batch / N
  double lr = 1e-3;
  int64_t warmup = 0;                 // linear warmup steps
  LrDecay lr_decay = LrDecay::constant;
  AdamOptions adam;                   // betas, eps (its lr is replaced by `lr`)
  double clip = 1.0;                  // gradient-norm clipping; 0: off (the norm is still measured)
  double ema = 0.999;                 // EMA decay; 0: off
  Objective objective;                // what the model predicts (eps, x0, v) and min-SNR weighting; in the checkpoint
  double label_dropout = 0.0;         // probability that a label becomes null_class
  int32_t null_class = -1;            // the "no class" label (needed with label_dropout > 0)
  uint64_t seed = 0;                  // streams: training (seed, 1<<40), labels (seed, 3<<40), dropout (seed, 4<<40)
  int64_t log_every = 100;            // progress line and CSV row every N steps (and at the last)
  int64_t save_every = 0;             // checkpoint every N steps; 0: only at the end and on a signal
  int keep = 1;                       // checkpoints kept: checkpoint.safetensors and keep-1 checkpoint-<step> files
  std::string out;                    // folder for checkpoint.safetensors and train_log.csv; empty: no files
  std::string resume;                 // a checkpoint to continue from
  safetensors::Metadata identity;     // metadata that must match on resume (the model's config, ...)
  safetensors::Metadata metadata;     // more metadata for every checkpoint
  std::string name = "train";         // names the run in messages
  FILE* log = stdout;                 // progress output; null: silent
  ProgressBar bar = ProgressBar::automatic;
  bool handle_signals = true;         // SIGINT/SIGTERM stop the run with a checkpoint
  // Data parallelism: the processes that train this model together (init_distributed(),
  // distributed/launch.hpp); null: this process alone. Each rank takes its share of every batch
  // and of every random draw, the gradients are averaged over the ranks before clipping, so N
  // ranks train as one process with the whole batch (up to the order of float sums). Rank 0
  // prints, writes the log and the checkpoints and runs the callbacks; every rank resumes from
  // the same checkpoint.
  Communicator* comm = nullptr;
  // CUDA: after two eager steps, the forward and backward are captured once into a CUDA graph
  // (backend/cuda_graph.hpp) and replayed each step: no host work and one launch instead of
  // hundreds. The same numbers as without it. Needs fixed shapes (every batch the same size), one
  // process, and work the capture accepts (the library's objectives all are: their per-sample
  // numbers are made on the device before the graph runs); when the capture is refused (a model
  // that reads the device back or uploads host data, ...) the run goes on without it, with a
  // message.
  bool cuda_graph = false;
};

// One finished step: `step` is the number of steps done (1 after the first).
struct StepInfo {
  int64_t step = 0;
  double loss = 0, lr = 0, grad_norm = 0;
};

enum class TrainStatus { finished, interrupted };

struct TrainResult {
  TrainStatus status = TrainStatus::finished;
  int64_t start_step = 0, step = 0;  // where this run started and stopped
  double seconds = 0;                // training time of this run (callbacks excluded)
  std::string checkpoint;            // the last checkpoint written ("" without an out folder)
  int signal = 0;                    // the signal that interrupted the run
};

// The loop itself, for any model derived from Module<T>: everything but the loss, which
// Trainer<T, Model> computes from its model (so that this part is compiled once for float).
template <class T>
class TrainerCore {
 public:
  TrainerCore(const TrainerCore&) = delete;
  TrainerCore& operator=(const TrainerCore&) = delete;
  virtual ~TrainerCore() = default;

  // fn(info) after every step (loss curves, tests).
  void on_step(std::function<void(const StepInfo&)> fn) { step_hooks_.push_back(std::move(fn)); }

  // Ends the run after the current step, with a checkpoint, as a signal does (from a callback).
  void request_stop() { stop_requested_ = true; }

  Adam<T>& optimizer() { return opt_; }
  EMA<T>& ema() { return ema_; }
  const NoiseSchedule& schedule() const { return sched_; }
  const TrainOptions& options() const { return o_; }
  int64_t step() const { return step_; }
  Generator& rng() { return rng_; }
  // This process's place among the data-parallel ranks (0 of 1 alone).
  int rank() const { return rank_; }
  int ranks() const { return ranks_; }
  std::string checkpoint_path() const { return (std::filesystem::path(o_.out) / "checkpoint.safetensors").string(); }

  // Runs fn with the EMA weights in the model (the live weights when EMA is off) in eval()
  // mode, then puts the live weights and the mode back, also when fn throws.
  template <class F>
  void with_ema_weights(F&& fn) {
    struct Back {
      TrainerCore& t;
      bool swapped, training;
      ~Back() {
        if (swapped) t.ema_.swap_into_model();
        t.model_.train(training);
      }
    } back{*this, o_.ema > 0, model_.is_training()};
    if (back.swapped) ema_.swap_into_model();
    model_.eval();
    fn();
  }

  // Writes the checkpoint for the current step now (the loop does this on its own); with data
  // parallelism only rank 0 writes (the others return "").
  std::string save();

  TrainResult run();

 protected:
  // See Trainer's constructor.
  TrainerCore(Module<T>& model, NoiseSchedule schedule, BatchSource<T>& data, TrainOptions o)
      : model_(model), sched_(std::move(schedule)), data_(data), o_(std::move(o)),
        opt_(model.named_parameters(), adam_options()), ema_(model.named_parameters(), o_.ema > 0 ? o_.ema : 0.0),
        rng_(o_.seed, uint64_t(1) << 40), label_rng_(o_.seed, uint64_t(3) << 40), dropout_rng_(o_.seed, uint64_t(4) << 40) {
    if (o_.steps < 0 || o_.batch < 1 || o_.log_every < 1 || o_.save_every < 0 || o_.keep < 1)
      throw std::invalid_argument(o_.name + ": steps >= 0, batch >= 1, log_every >= 1, save_every >= 0 and keep >= 1");
    if (o_.label_dropout > 0 && (!data_.has_labels() || o_.null_class < 0))
      throw std::invalid_argument(o_.name + ": label dropout needs labelled data and a null class");
    // The objective is part of what a checkpoint is: recorded, and checked on resume.
    o_.identity["prediction"] = prediction_name(o_.objective.prediction);
    loss_weights(sched_, {}, o_.objective);  // validates gamma
    if (o_.objective.min_snr_gamma > 0) o_.identity["min_snr_gamma"] = std::to_string(o_.objective.min_snr_gamma);
    if (o_.comm) {
      ranks_ = o_.comm->size(), rank_ = o_.comm->rank();
      if (o_.batch % ranks_ != 0)
        throw std::invalid_argument(o_.name + ": batch " + std::to_string(o_.batch) + " does not divide among " +
                                    std::to_string(ranks_) + " processes (give a multiple of " +
                                    std::to_string(ranks_) + ")");
      if (rank_ != 0) o_.log = nullptr;  // rank 0 speaks for all
    }
    if (!o_.out.empty() && rank_ == 0) std::filesystem::create_directories(o_.out);
    if (!o_.resume.empty()) resume_from(o_.resume);
    for (Generator* g : {&rng_, &label_rng_, &dropout_rng_}) g->part = static_cast<uint32_t>(rank_), g->parts = static_cast<uint32_t>(ranks_);
  }

  // The objective's loss of one noised batch (labels, when the data has them, after dropout).
  virtual Var<T> compute_loss(const NoisedBatch<T>& nb, const Labels* y) = 0;
  // Model dropout's random stream (part of the checkpoint).
  Generator& dropout_rng() { return dropout_rng_; }
  void add_callback(int64_t n, std::function<void()> fn) {
    if (n < 1) throw std::invalid_argument(o_.name + ": a callback needs a period >= 1");
    callbacks_.push_back({n, std::move(fn)});
  }
  void add_evaluation(int64_t n, std::vector<std::string> columns, std::function<std::map<std::string, double>()> fn) {
    if (n < 1) throw std::invalid_argument(o_.name + ": an evaluation needs a period >= 1");
    if (log_) throw std::logic_error(o_.name + ": evaluations are added before run()");
    for (auto& c : columns) eval_columns_.push_back(c);
    evals_.push_back({n, std::move(fn)});
  }

 private:
  AdamOptions adam_options() const {
    AdamOptions a = o_.adam;
    a.lr = o_.lr;
    return a;
  }
  std::string numbered(int64_t s) const {
    char b[40];
    std::snprintf(b, sizeof b, "checkpoint-%08lld.safetensors", static_cast<long long>(s));
    return (std::filesystem::path(o_.out) / b).string();
  }
  // Keeps the newest keep-1 numbered checkpoints.
  void prune() const;
  std::string last_good() const {
    if (o_.out.empty()) return "no checkpoints are written";
    if (saved_step_ < 0) return "no checkpoint was written yet";
    return "last good checkpoint: " + checkpoint_path() + " at step " + std::to_string(saved_step_);
  }
  void resume_from(const std::string& path);
  // Data parallelism: every rank starts from rank 0's weights and EMA, at the same step.
  void agree_on_start();
  // Data parallelism, at each checkpoint: the ranks' weights should be bit for bit the same (the
  // same averaged gradients, the same update); if a collective ever rounded differently on some
  // rank, rank 0's weights, EMA and moments are copied to all, with a message.
  void check_replicas();
  // The tensors every rank must hold alike: weights and buffers, the EMA, and Adam's moments.
  std::vector<Tensor<T>*> replicated(bool moments);
  // The loss of one noised batch and the parameters' gradients: run eagerly, or by replaying the
  // captured graph (TrainOptions::cuda_graph; captured at the first call once `warm`).
  Tensor<T> loss_and_gradients(const NoisedBatch<T>& nb, const Labels* y, bool warm,
                               const typename Tape<T>::LeafDone& leaf_done);
  // Captures the step on the fixed inputs graph_in_ (false, with a message, when refused).
  bool capture_step(const Labels* y);
  // Zeroes the log window's sums, here and in the record on the device (read just before).
  void record_window_reset(StepRecord& rec) {
    rec.loss_sum = rec.norm_sum = rec.steps = 0;
    Tensor<double> h({kStepRecordSize});
    std::memcpy(h.data(), &rec, sizeof rec);
    record_.copy_from(h);
  }
  // The run met a non-finite loss or gradient norm (rec.bad_step, or on another rank): the
  // updates from that step on were skipped on the device, so the counters go back to the last
  // good step; the random streams do not, hence no checkpoint from this trainer afterwards.
  [[noreturn]] void fail(const StepRecord& rec);
  // OR of `flag` over the ranks (the flag itself alone).
  bool any_rank(bool flag) {
    if (!o_.comm) return flag;
    double f = flag ? 1.0 : 0.0;
    o_.comm->all_reduce(&f, 1, ReduceOp::max);
    return f > 0;
  }

  Module<T>& model_;
  NoiseSchedule sched_;
  BatchSource<T>& data_;
  TrainOptions o_;
  Adam<T> opt_;
  EMA<T> ema_;
  Generator rng_, label_rng_, dropout_rng_;
  int64_t step_ = 0, saved_step_ = -1;
  int rank_ = 0, ranks_ = 1;
  std::unique_ptr<GradReducer<T>> reducer_;
  bool resumed_ = false, stop_requested_ = false, failed_ = false;
  Tensor<double> record_;  // the StepRecord of run() on the model's device
  std::vector<std::pair<int64_t, std::function<void()>>> callbacks_;
  std::vector<std::pair<int64_t, std::function<std::map<std::string, double>()>>> evals_;
  std::vector<std::string> eval_columns_;
  std::vector<std::function<void(const StepInfo&)>> step_hooks_;
  std::unique_ptr<CsvLog> log_;
  // TrainOptions::cuda_graph: the graph, its fixed inputs (refilled in place each step) and its loss.
  bool graph_wanted_ = false;
  CudaGraph graph_;
  NoisedBatch<T> graph_in_;
  Labels graph_labels_;
  Tensor<T> graph_loss_;
};

template <class T>
[[noreturn]] void TrainerCore<T>::fail(const StepRecord& rec) {
  failed_ = true;
  if (rec.bad_step == 0)
    throw std::runtime_error(o_.name + ": another rank's loss or gradient norm is not finite (at or before step " +
                             std::to_string(step_) + "); " + last_good());
  const auto bad = static_cast<int64_t>(rec.bad_step);
  const int64_t skipped = step_ - (bad - 1);
  step_ = bad - 1;
  opt_.set_steps(opt_.steps() - skipped);
  if (o_.ema > 0) ema_.set_updates(std::max<int64_t>(ema_.updates() - skipped, 0));
  const bool loss_bad = !step_record_finite(rec.bad_loss);
  throw std::runtime_error(o_.name + ": " + (loss_bad ? "loss" : "gradient norm") + " is " +
                           std::to_string(loss_bad ? rec.bad_loss : rec.bad_norm) + " at step " + std::to_string(bad) +
                           "; no update from it on, the weights are step " + std::to_string(bad - 1) + "'s (" +
                           last_good() + "); try a lower learning rate or clipping");
}

template <class T>
Tensor<T> TrainerCore<T>::loss_and_gradients(const NoisedBatch<T>& nb, const Labels* y, bool warm,
                                             const typename Tape<T>::LeafDone& leaf_done) {
  if (graph_.defined() || (graph_wanted_ && warm)) {
    // The objective's host-computed numbers (v's target, min-SNR weights) made on the device here,
    // outside the graph, which reads them from its fixed inputs.
    NoisedBatch<T> in = nb;
    if (o_.objective.prediction == Prediction::V || o_.objective.min_snr_gamma > 0)
      precompute_objective(sched_, in, o_.objective);
    if (graph_.defined()) {  // the new step's numbers into the graph's fixed inputs, in place
      if (in.x_t.shape() != graph_in_.x_t.shape() || in.t.size() != graph_in_.t.size() ||
          (y ? y->size() : 0) != graph_labels_.size())
        throw std::runtime_error(o_.name + ": --cuda-graph needs the same batch shape every step (captured " +
                                 shape_str(graph_in_.x_t.shape()) + ", now " + shape_str(in.x_t.shape()) + ")");
      graph_in_.x_t.copy_from(in.x_t);
      graph_in_.eps.copy_from(in.eps);
      graph_in_.x0.copy_from(in.x0);
      if (in.target.defined()) graph_in_.target.copy_from(in.target);
      if (in.loss_scale.defined()) graph_in_.loss_scale.copy_from(in.loss_scale);
      std::copy(in.t.begin(), in.t.end(), graph_in_.t.begin());
      if (y) std::copy(y->begin(), y->end(), graph_labels_.begin());
    } else {
      graph_in_.x_t = in.x_t.clone();
      graph_in_.eps = in.eps.clone();
      graph_in_.x0 = in.x0.clone();
      if (in.target.defined()) graph_in_.target = in.target.clone();
      if (in.loss_scale.defined()) graph_in_.loss_scale = in.loss_scale.clone();
      graph_in_.t = in.t;
      graph_labels_ = y ? *y : Labels{};
      graph_wanted_ = capture_step(y);
    }
    if (graph_.defined()) {
      graph_.replay();
      return graph_loss_;
    }
  }
  opt_.zero_grad();
  Var<T> loss = compute_loss(nb, y);
  if (reducer_) {  // the gradients averaged over the ranks, the first buckets during the backward
    reducer_->begin();
    backward(loss, leaf_done);
    reducer_->finish();
  } else {
    backward(loss);
  }
  return loss.value();
}

template <class T>
bool TrainerCore<T>::capture_step(const Labels* y) {
  const Labels* gy = y ? &graph_labels_ : nullptr;
  try {
    CudaGraphCapture cap;
    cap.input(graph_in_.t.data(), graph_in_.t.size() * sizeof(int32_t));
    if (gy) cap.input(graph_labels_.data(), graph_labels_.size() * sizeof(int32_t));
    cap.random(dropout_rng_);
    opt_.zero_grad();
    Var<T> loss = compute_loss(graph_in_, gy);
    backward(loss);
    graph_loss_ = loss.value();
    graph_ = cap.end();
  } catch (const std::exception& e) {
    Tape<T>::current().clear();  // what the failed capture recorded
    graph_loss_ = Tensor<T>();
    if (o_.log) std::fprintf(o_.log, "%s: --cuda-graph: the step could not be captured, training without it (%s)\n",
                             o_.name.c_str(), e.what());
    return false;
  }
  if (o_.log) std::fprintf(o_.log, "%s: --cuda-graph: step captured, replayed from step %lld on\n", o_.name.c_str(),
                           static_cast<long long>(step_ + 1));
  return true;
}

template <class T>
std::string TrainerCore<T>::save() {
  if (failed_)
    throw std::logic_error(o_.name + ": the run stopped on a non-finite step; resume from its last checkpoint instead");
  if (o_.out.empty() || rank_ != 0) return {};
  namespace fs = std::filesystem;
  const std::string path = checkpoint_path();
  if (o_.keep > 1 && saved_step_ >= 0 && saved_step_ != step_ && fs::exists(path)) {
    fs::rename(path, numbered(saved_step_));
    prune();
  }
  safetensors::Metadata meta = o_.metadata;
  for (const auto& [k, v] : o_.identity) meta[k] = v;
  for (const auto& [k, v] : data_.state()) meta[k] = v;
  meta["label_dropout_rng.offset"] = std::to_string(label_rng_.offset);
  meta["model_dropout_rng.offset"] = std::to_string(dropout_rng_.offset);
  save_checkpoint<T>(path, model_, &opt_, &ema_, step_, rng_, meta);
  saved_step_ = step_;
  return path;
}

template <class T>
TrainResult TrainerCore<T>::run() {
  namespace fs = std::filesystem;
  using clock = std::chrono::steady_clock;
  // Under an MPI launcher a rank's output is a pseudo-terminal whatever mpirun's is: no bar unless asked.
  Progress progress(o_.log, o_.steps, o_.comm && o_.bar == ProgressBar::automatic ? ProgressBar::off : o_.bar);
  if (!o_.out.empty() && rank_ == 0) {
    std::vector<std::string> cols{"loss", "lr", "grad_norm", "images_per_s", "elapsed_s"};
    cols.insert(cols.end(), eval_columns_.begin(), eval_columns_.end());
    log_ = std::make_unique<CsvLog>((fs::path(o_.out) / "train_log.csv").string(), cols, resumed_ ? step_ : -1);
  }
  StopSignals signals(o_.handle_signals);
  progress.set_ranks(ranks_);
  if (o_.comm) {
    if (!reducer_) {
      reducer_ = std::make_unique<GradReducer<T>>(*o_.comm, opt_.params());
      if (o_.log)
        std::fprintf(o_.log, "%s: gradients averaged over %d %s through %s, in %zu %s of up to 25 MB\n", o_.name.c_str(),
                     ranks_, ranks_ == 1 ? "rank" : "ranks", reducer_->road().c_str(), reducer_->buckets(),
                     reducer_->buckets() == 1 ? "bucket" : "buckets");
    }
    agree_on_start();
  }
  const typename Tape<T>::LeafDone leaf_done = [this](const Node<T>* n) { reducer_->ready(n); };
  graph_wanted_ = o_.cuda_graph && !graph_.defined();
  if (o_.cuda_graph && (model_.device() != Device::CUDA || o_.comm)) {
    graph_wanted_ = false;
    if (o_.log)
      std::fprintf(o_.log, "%s: --cuda-graph ignored: %s\n", o_.name.c_str(),
                   o_.comm ? "not with data parallelism (the gradients are averaged during the backward)"
                           : "the model is not on the CUDA device");
  }
  const int64_t B = o_.batch / ranks_;  // this rank's share of the batch
  model_.train();
  TrainResult res;
  res.start_step = step_;
  const Device dev = model_.device();
  Batch<T> batch;
  const auto t_run = clock::now();
  auto t_window = t_run;
  double paused = 0, paused_window = 0;  // seconds in callbacks, not counted as training
  int64_t window = 0;  // steps since the last log line
  auto trained_s = [&] { return std::chrono::duration<double>(clock::now() - t_run).count() - paused; };
  auto eta = [&] {
    const double done = static_cast<double>(step_ - res.start_step);
    return done > 0 ? trained_s() / done * static_cast<double>(o_.steps - step_) : NAN;
  };

  // What each step leaves on the device (optim/step_record.hpp), read back only when needed: a
  // step hook, a log line, an evaluation or callback, a checkpoint, the end, the bar's redraw.
  // So the host never waits for the device (two waits per step before: the loss and the norm),
  // and a non-finite step is caught at the next read; Adam and the EMA skip it and every later
  // step on the device, so the weights stay the last good step's.
  record_ = Tensor<double>::zeros({kStepRecordSize}, dev);
  // Read every step when someone watches every step (on every rank if on any: the loss is agreed).
  const bool every_step = any_rank(!step_hooks_.empty());
  StepRecord rec{};
  auto read = [&] {
    const Tensor<double> h = record_.cpu();  // waits for the device
    std::memcpy(static_cast<void*>(&rec), h.data(), sizeof rec);
  };
  // At a point every rank reaches: stops all ranks if any saw a non-finite step.
  auto read_checked = [&] {
    read();
    if (any_rank(rec.bad_step != 0)) {
      progress.finish();
      fail(rec);
    }
  };

  // Every rank stops at the same step: a signal or request on any of them stops all.
  bool stop = any_rank(signals.requested() || stop_requested_);
  while (step_ < o_.steps && !stop) {
    data_.next(B, rng_, batch);
    std::vector<int32_t> labels =
        o_.label_dropout > 0 ? drop_labels(batch.labels, o_.label_dropout, o_.null_class, label_rng_) : batch.labels;
    const Labels* y = labels.empty() ? nullptr : &labels;
    const NoisedBatch<T> nb = make_noised_batch(sched_, batch.x0.to(dev), rng_);
    const Tensor<T> loss = loss_and_gradients(nb, y, step_ - res.start_step >= 2, leaf_done);
    clip_grad_norm_recorded(opt_.params(), o_.clip > 0 ? o_.clip : std::numeric_limits<double>::infinity(),
                            loss, step_ + 1, record_);
    const double lr = o_.lr_decay == LrDecay::cosine ? warmup_cosine_lr(o_.lr, step_, o_.warmup, o_.steps)
                                                     : warmup_lr(o_.lr, step_, o_.warmup);
    opt_.set_lr(lr);
    if (o_.ema > 0) opt_.step(ema_, record_);
    else opt_.step(record_);
    ++step_, ++window;

    const bool log_now = step_ % o_.log_every == 0 || step_ == o_.steps;
    const bool save_now = o_.save_every > 0 && step_ % o_.save_every == 0 && step_ < o_.steps;
    bool due = every_step || log_now || save_now;
    for (auto& [n, fn] : evals_) due = due || step_ % n == 0;
    for (auto& [n, fn] : callbacks_) due = due || step_ % n == 0;
    if (due) {
      read_checked();
      if (every_step) {
        double lv = rec.loss;
        if (o_.comm) {  // the loss of the whole batch: the mean of the ranks' means
          o_.comm->all_reduce(&lv, 1, ReduceOp::sum);
          lv /= ranks_;
        }
        const StepInfo info{step_, lv, lr, rec.norm};
        for (auto& h : step_hooks_) h(info);
      }
    } else if (progress.bar_due(step_)) {
      read();  // this rank's loss for the bar (no collective: only some ranks draw)
    }

    // Evaluations and callbacks, on rank 0 (their time is not training time).
    std::map<std::string, double> figures;
    const auto t_cb = clock::now();
    for (auto& [n, fn] : evals_)
      if (step_ % n == 0 && rank_ == 0) {
        const auto r = fn();
        std::string msg = "eval at step " + std::to_string(step_) + ":";
        for (const auto& [k, v] : r) {
          figures[k] = v;
          char b[64];
          std::snprintf(b, sizeof b, "  %s %.5g", k.c_str(), v);
          msg += b;
        }
        progress.message(msg);
      }
    for (auto& [n, fn] : callbacks_)
      if (step_ % n == 0 && rank_ == 0) fn();
    const double cb = std::chrono::duration<double>(clock::now() - t_cb).count();
    paused += cb, paused_window += cb;

    if (log_now) {
      // The window's means from the record's sums (the ranks' sums added: the mean of their means).
      double sums[2] = {rec.loss_sum, rec.norm_sum};
      if (o_.comm) o_.comm->all_reduce(sums, 2, ReduceOp::sum);
      const double n = std::max(rec.steps, 1.0) * ranks_;
      const double mean_loss = sums[0] / n, mean_norm = sums[1] / n;
      record_window_reset(rec);
      const double w = std::chrono::duration<double>(clock::now() - t_window).count() - paused_window;
      const double ips = static_cast<double>(window * o_.batch) / std::max(w, 1e-9);
      const double el = trained_s();
      progress.line(step_, mean_loss, lr, mean_norm, ips, el, eta());
      figures["loss"] = mean_loss, figures["lr"] = lr, figures["grad_norm"] = mean_norm;
      figures["images_per_s"] = ips, figures["elapsed_s"] = el;
      window = 0, paused_window = 0;
      t_window = clock::now();
    }
    if (log_ && !figures.empty()) log_->row(step_, figures);
    stop = any_rank(signals.requested() || stop_requested_);
    if (save_now && !stop) {
      check_replicas();
      res.checkpoint = save();
    }
    progress.bar(step_, rec.loss, eta());
  }
  read_checked();  // before the last checkpoint: nothing non-finite since the last read
  progress.finish();
  res.step = step_;
  res.seconds = trained_s();
  check_replicas();
  res.checkpoint = save();
  if (stop) {
    res.status = TrainStatus::interrupted;
    res.signal = signals.requested();
    const std::string at = " at step " + std::to_string(step_);
    progress.message(o_.name + (signals.requested() ? ": interrupted: " : ": stopped: ") +
                     (res.checkpoint.empty() ? "no checkpoint (no out folder)" + at
                                             : "checkpoint saved" + at + " in " + res.checkpoint +
                                                   " (continue with --resume " + res.checkpoint + ")"));
  }
  return res;
}

template <class T>
void TrainerCore<T>::prune() const {
  namespace fs = std::filesystem;
  std::vector<fs::path> old;
  for (const auto& e : fs::directory_iterator(o_.out)) {
    const std::string n = e.path().filename().string();
    if (n.rfind("checkpoint-", 0) == 0 && e.path().extension() == ".safetensors") old.push_back(e.path());
  }
  std::sort(old.begin(), old.end());  // zero-padded steps sort by name
  const size_t allowed = static_cast<size_t>(o_.keep - 1);
  for (size_t i = 0; i + allowed < old.size(); ++i) fs::remove(old[i]);
}

template <class T>
std::vector<Tensor<T>*> TrainerCore<T>::replicated(bool moments) {
  std::vector<Tensor<T>*> ts;
  for (auto& [n, v] : model_.named_state()) ts.push_back(&v.node()->value);  // parameters and buffers
  if (o_.ema > 0)
    for (Tensor<T>& t : ema_.shadow()) ts.push_back(&t);
  if (moments) {
    for (Tensor<T>& t : opt_.first_moments()) ts.push_back(&t);
    for (Tensor<T>& t : opt_.second_moments()) ts.push_back(&t);
  }
  return ts;
}

template <class T>
void TrainerCore<T>::agree_on_start() {
  reducer_->broadcast(replicated(false), 0);
  // Where each rank stands: the step and every stream's position must be rank 0's.
  uint64_t mine[5] = {static_cast<uint64_t>(step_), rng_.offset, label_rng_.offset, dropout_rng_.offset,
                      static_cast<uint64_t>(opt_.steps())};
  uint64_t root[5];
  std::copy(mine, mine + 5, root);
  o_.comm->broadcast(root, sizeof root, 0);
  const bool same = std::equal(mine, mine + 5, root);
  double differ = same ? 0.0 : 1.0;
  o_.comm->all_reduce(&differ, 1, ReduceOp::max);
  if (differ > 0)
    throw std::runtime_error(o_.name + ": the ranks do not start from the same state" +
                             (same ? std::string()
                                   : " (rank " + std::to_string(rank_) + " is at step " + std::to_string(step_) +
                                         ", rank 0 at step " + std::to_string(root[0]) + ")") +
                             ": give every rank the same --resume checkpoint");
}

template <class T>
void TrainerCore<T>::check_replicas() {
  if (!o_.comm) return;
  // The sum of the weights' squares in double, computed alike on every rank from its own copy.
  double sq = 0;
  const NamedParams<T>& ps = opt_.params();
  if (detail::params_device(ps, "check_replicas") == Device::CUDA) {
    if constexpr (std::is_same_v<T, float>) {
      std::vector<backend::ParamSlot> slots;
      for (const auto& [n, p] : ps) {
        backend::ParamSlot sl;
        sl.g = p.value().data();
        sl.n = p.value().numel();
        slots.push_back(sl);
      }
      sq = backend::require_cuda("check_replicas").grad_sq_norm(slots);
    }
  } else {
    for (const auto& [n, p] : ps)
      for (size_t i = 0; i < p.value().size(); ++i) sq += static_cast<double>(p.value().data()[i]) * p.value().data()[i];
  }
  double lo = sq, hi = sq;
  o_.comm->all_reduce(&lo, 1, ReduceOp::min);
  o_.comm->all_reduce(&hi, 1, ReduceOp::max);
  if (lo == hi) return;
  reducer_->broadcast(replicated(true), 0);
  if (o_.log)
    std::fprintf(o_.log, "%s: the ranks' weights differed at step %lld (sum of squares %.17g to %.17g); rank 0's "
                 "copied to all\n", o_.name.c_str(), static_cast<long long>(step_), lo, hi);
}

template <class T>
void TrainerCore<T>::resume_from(const std::string& path) {
  {  // The identity first, so that a different model is named as such rather than by one tensor.
    const safetensors::Metadata m = safetensors::File::read(path).metadata();
    for (const auto& [k, v] : o_.identity) {
      auto it = m.find(k);
      // Checkpoints from before the objectives predict eps with no weighting.
      const std::string had = it != m.end() ? it->second : k == "prediction" ? "eps" : k == "min_snr_gamma" ? "off" : v;
      if (had != v)
        throw std::runtime_error(o_.name + ": '" + path + "' was trained with " + k + " " + had +
                                 ", this run asks for " + v);
    }
    if (o_.objective.min_snr_gamma == 0 && m.count("min_snr_gamma"))
      throw std::runtime_error(o_.name + ": '" + path + "' was trained with min_snr_gamma " + m.at("min_snr_gamma") +
                               ", this run asks for off");
  }
  TrainState st = load_checkpoint<T>(path, model_, &opt_, &ema_);
  step_ = st.step;
  rng_ = st.rng;
  auto offset = [&](std::initializer_list<const char*> keys, Generator& g) {
    for (const char* k : keys)
      if (st.metadata.count(k)) {
        g = Generator(o_.seed, safetensors::metadata_number<uint64_t>(st.metadata, k, "checkpoint '" + path + "'"));
        return;
      }
  };
  offset({"label_dropout_rng.offset", "dropout_rng.offset"}, label_rng_);
  offset({"model_dropout_rng.offset"}, dropout_rng_);
  SourceState ds;
  for (const auto& [k, v] : st.metadata)
    if (k.rfind("data.", 0) == 0) ds[k] = v;
  data_.set_state(ds);
  resumed_ = true;
  saved_step_ = step_;
  if (o_.log)
    std::fprintf(o_.log, "%s: resumed from %s at step %lld\n", o_.name.c_str(), path.c_str(),
                 static_cast<long long>(step_));
}

// Compiled once for float where diffuse::diffuse is used (core/config.hpp).
DIFFUSE_FLOAT_INSTANCE(class TrainerCore<float>)

// The training loop for one model (any type derived from Module<T> that denoise() can call: with
// or without labels and a dropout generator).
template <class T, class Model>
class Trainer : public TrainerCore<T> {
 public:
  using Callback = std::function<void(Trainer&)>;
  using Evaluation = std::function<std::map<std::string, double>(Trainer&)>;

  // The model stays where it is (move it to its device first): the optimiser's state and the EMA
  // are made beside the weights. With options.resume the checkpoint is loaded here.
  Trainer(Model& model, NoiseSchedule schedule, BatchSource<T>& data, TrainOptions o)
      : TrainerCore<T>(model, std::move(schedule), data, std::move(o)), model_(model) {}

  // fn(trainer) after every n-th step, e.g. a sample grid with with_ema_weights().
  void every(int64_t n, Callback fn) {
    this->add_callback(n, [this, fn = std::move(fn)] { fn(*this); });
  }
  // An evaluation after every n-th step: its figures (named by `columns`) are printed and logged.
  void evaluate_every(int64_t n, std::vector<std::string> columns, Evaluation fn) {
    this->add_evaluation(n, std::move(columns), [this, fn = std::move(fn)] { return fn(*this); });
  }
  Model& model() { return model_; }

 private:
  Var<T> compute_loss(const NoisedBatch<T>& nb, const Labels* y) override {
    return diffusion_loss<T>(
        [&](const Var<T>& x, const std::vector<int32_t>& t) { return denoise<T>(model_, x, t, y, &this->dropout_rng()); },
        this->schedule(), nb, this->options().objective);
  }

  Model& model_;
};

}  // namespace diffuse
