// CUDA graphs: record a block of device work once, replay it as one launch (no host work, no
// per-kernel launch cost). For code whose shapes and addresses are the same every time, such as
// the forward and backward of a training step (TrainOptions::cuda_graph uses this).
//
//   CudaGraphCapture cap;                        // from here this thread's device work is recorded, not run
//   cap.input(t.data(), t.size() * 4);           // host data the block uploads that changes between replays
//   cap.random(dropout_rng);                     // a generator the block draws from on the device
//   Var<float> loss = ...;  backward(loss);      // the block: kernels, copies, cuBLAS, cuDNN are recorded
//   CudaGraph g = cap.end();
//   g.replay();                                  // runs it: the first time too
//   ... write new numbers into t (same address, same size); g.replay(); ...
//
// What a replay sees: the device addresses of the capture (the graph keeps every block the
// block of code allocated or freed, backend/cuda/allocator.hpp), so tensors made before the
// capture that it reads (the weights, the inputs copied into fixed device tensors) must stay alive
// and be refilled in place; each named input's current host bytes, uploaded before the launch;
// each named generator's current position, which the replay then moves on as the recorded code
// would have (the same numbers as running it again). Refused inside a capture, with a message:
// copies to the host, waits for the device, uploads of other host data, draws from other
// generators, profiling. Under diffuse::EmulatedCuda the same API records into a queue that each
// replay runs on the CPU.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <diffuse/backend/capture_state.hpp>
#include <diffuse/backend/cuda.hpp>
#include <diffuse/core/rng.hpp>
#include <diffuse/core/tensor.hpp>

namespace diffuse {

class CudaGraph {
 public:
  CudaGraph() = default;
  CudaGraph(CudaGraph&&) noexcept = default;
  CudaGraph& operator=(CudaGraph&&) noexcept = default;

  bool defined() const { return graph_ != nullptr; }
  // Uploads the inputs, places the generators, launches the graph (does not wait for it).
  void replay() {
    if (!graph_) throw std::logic_error("diffuse: CudaGraph::replay on an empty graph");
    for (size_t i = 0; i < inputs_.size(); ++i)
      if (inputs_[i].bytes)
        require_device_memory().copy(inputs_[i].staging, inputs_[i].host, inputs_[i].bytes, DeviceMemory::Copy::HostToDevice);
    for (size_t i = 0; i < rngs_.size(); ++i) {
      const uint64_t at = rngs_[i].gen->offset;
      require_device_memory().copy(rngs_[i].word, &at, sizeof at, DeviceMemory::Copy::HostToDevice);
      rngs_[i].gen->offset += advance_[i];
    }
    graph_->launch();
  }

 private:
  friend class CudaGraphCapture;
  std::unique_ptr<backend::CapturedGraph> graph_;
  std::vector<backend::CaptureInput> inputs_;
  std::vector<Tensor<uint8_t>> staging_;
  std::vector<backend::CaptureRng> rngs_;
  std::vector<uint64_t> advance_;  // how far each generator moves per replay
  Tensor<uint8_t> words_;          // the generators' device words
};

class CudaGraphCapture {
 public:
  // Up to kMaxGenerators generators per capture (their device words are made before it begins).
  static constexpr int64_t kMaxGenerators = 8;

  CudaGraphCapture() : be_(backend::require_cuda("CUDA graph capture")) {
    words_ = Tensor<uint8_t>({kMaxGenerators * 8}, Device::CUDA);
    backend::CaptureState& c = backend::capture_state();
    if (c.active) throw std::logic_error("diffuse: CUDA graph capture: a capture is already in progress");
    be_.capture_begin();
    c.inputs.clear();
    c.rngs.clear();
    capturing_ = true;
  }
  CudaGraphCapture(const CudaGraphCapture&) = delete;
  CudaGraphCapture& operator=(const CudaGraphCapture&) = delete;
  // Not ended: the capture is abandoned (the work recorded so far never runs).
  ~CudaGraphCapture() { abort(); }

  // Host bytes [host, host + bytes) that the block uploads (by that address: ops/common.hpp's
  // device_indices does) and whose contents change between replays; replay() uploads them.
  void input(const void* host, size_t bytes) {
    require_capturing("input");
    Tensor<uint8_t> staging({static_cast<int64_t>(bytes ? bytes : 1)}, Device::CUDA);
    backend::capture_state().inputs.push_back({host, bytes, staging.data()});
    staging_.push_back(std::move(staging));
  }
  // A generator the block draws from on the device (dropout); it must outlive the graph.
  void random(Generator& g) {
    require_capturing("random");
    backend::CaptureState& c = backend::capture_state();
    if (static_cast<int64_t>(c.rngs.size()) >= kMaxGenerators)
      throw std::invalid_argument("diffuse: CUDA graph capture: more than 8 generators");
    for (const auto& r : c.rngs)
      if (r.gen == &g) return;
    auto* word = reinterpret_cast<uint64_t*>(words_.data()) + c.rngs.size();
    c.rngs.push_back({&g, g.offset, word});
  }
  // Ends the capture: the graph (nothing has run yet: replay() runs it). Throws if it failed.
  CudaGraph end() {
    require_capturing("end");
    backend::CaptureState& c = backend::capture_state();
    CudaGraph g;
    g.inputs_ = std::move(c.inputs);
    g.rngs_ = std::move(c.rngs);
    c.inputs.clear();
    c.rngs.clear();
    capturing_ = false;
    for (auto& r : g.rngs_) {
      g.advance_.push_back(r.gen->offset - r.origin);
      r.gen->offset = r.origin;  // the capture drew nothing: the first replay draws from here
    }
    g.graph_ = be_.capture_end();  // a failure ends the capture too
    g.staging_ = std::move(staging_);
    g.words_ = std::move(words_);
    return g;
  }
  // Ends a capture that failed: the generators go back where they were, nothing is kept.
  void abort() noexcept {
    if (!capturing_) return;
    capturing_ = false;
    backend::CaptureState& c = backend::capture_state();
    for (auto& r : c.rngs) r.gen->offset = r.origin;
    c.inputs.clear();
    c.rngs.clear();
    be_.capture_abort();
  }

 private:
  void require_capturing(const char* what) const {
    if (!capturing_) throw std::logic_error(std::string("diffuse: CudaGraphCapture::") + what + " after the capture ended");
  }
  backend::CudaBackend& be_;
  bool capturing_ = false;
  std::vector<Tensor<uint8_t>> staging_;
  Tensor<uint8_t> words_;
};

}  // namespace diffuse
