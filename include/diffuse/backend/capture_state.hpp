// What a CUDA graph capture in progress needs on the host, the same in both worlds (the CUDA
// runtime and the CPU emulation; backend/cuda_graph.hpp is the public side):
//   - the host data the captured work may upload: each registered input has device staging bytes
//     that the graph copies from, and replay() uploads the input's current host contents there
//     first (any other upload inside a capture is refused: the graph would replay stale data);
//   - the generators it may draw from on the device: each has a device word holding where the
//     generator stands at a replay, and a draw inside the capture is placed relative to it
//     (DrawPos::base), so replay k draws what the eager code would have drawn at its step;
//   - the emulation only: where device work goes instead of running (the CUDA runtime's stream
//     capture records it there), and which blocks the graph owns.
// One capture at a time, in one process; not thread-safe (captures are made from one thread).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <diffuse/core/rng.hpp>

namespace diffuse::backend {

struct CaptureInput {
  const void* host = nullptr;
  std::size_t bytes = 0;
  void* staging = nullptr;  // device bytes the graph reads instead
};

struct CaptureRng {
  Generator* gen = nullptr;
  std::uint64_t origin = 0;      // gen.offset when the capture began
  std::uint64_t* word = nullptr;  // device word: gen.offset at each replay
};

// The emulation's device memory owned by one graph: blocks it allocated, and frees deferred until
// the graph is gone (a replay writes and reads them). Blocks made before the capture and freed
// inside it are `stale`: the graph may still read them, but nothing keeps their contents between
// replays (on the GPU another allocation may take them), so every replay first fills them with
// 0xFF (NaN) and a graph that depends on them fails its comparison.
struct EmulatedGraphMemory {
  std::set<void*> owned;
  std::vector<std::pair<void*, std::size_t>> deferred, stale;
};

struct CaptureState {
  bool active = false;
  std::vector<CaptureInput> inputs;
  std::vector<CaptureRng> rngs;
  void* stream = nullptr;  // the CUDA runtime: the capturing stream (a cudaStream_t)
  // The emulation: device work queued into the graph instead of run, and its memory.
  std::function<void(std::function<void()>)> queue;
  std::shared_ptr<EmulatedGraphMemory> emulated_memory;
  // Every live emulated graph's memory (weak: a graph's destruction frees its deferred blocks).
  std::vector<std::weak_ptr<EmulatedGraphMemory>> emulated_graphs;
};

inline CaptureState& capture_state() {
  static CaptureState s;
  return s;
}

[[noreturn]] inline void capture_refuse(const std::string& what) {
  throw std::runtime_error("diffuse: CUDA graph capture: " + what);
}

// The device draw of n numbers from g: g.take(n), placed by g's device word while a capture is
// in progress (which must follow g: CudaGraphCapture::random).
inline DrawPos device_draw(Generator& g, std::uint64_t n) {
  DrawPos at = g.take(n);
  const CaptureState& c = capture_state();
  if (!c.active) return at;
  for (const CaptureRng& r : c.rngs)
    if (r.gen == &g) {
      at.offset -= r.origin;
      at.base = r.word;
      return at;
    }
  capture_refuse("a random draw on the device from a generator the capture does not follow (name it with "
                 "CudaGraphCapture::random)");
}

// Inside a capture: the staging bytes of the registered input [host, host + bytes), else a refusal.
inline const void* capture_upload_source(const void* host, std::size_t bytes) {
  for (const CaptureInput& in : capture_state().inputs)
    if (in.host == host && in.bytes == bytes) return in.staging;
  capture_refuse("an upload of " + std::to_string(bytes) +
                 " bytes of host data inside the captured work, which a replay would repeat with stale data "
                 "(only the inputs named with CudaGraphCapture::input can be uploaded)");
}

// Device work that host code does itself (the emulation's cuBLAS and cuDNN stand-ins): run now,
// or queued into the graph while the emulation captures. f must own what it uses (capture by value).
template <class F>
inline void device_work(F&& f) {
  CaptureState& c = capture_state();
  if (c.queue) c.queue(std::function<void()>(std::forward<F>(f)));
  else f();
}

}  // namespace diffuse::backend
