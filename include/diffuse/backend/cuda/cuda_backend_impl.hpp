// The CUDA backend: every entry of CudaBackend (backend/cuda.hpp) on the kernels of kernels/,
// cuBLAS (cuda/blas.hpp) and cuDNN (cuda/conv.hpp), queued on the legacy default stream.
//
// Compiled once per program, in one of two worlds (never both in one program):
//   - by nvcc in src/cuda_backend.cu (the diffuse::cuda target): the real device;
//   - by the host compiler in src/cuda_emulation.cpp (diffuse::cuda_emulation): the same source
//     through the CPU emulation of the CUDA execution model (cuda/emulation.hpp), with host-loop
//     cuBLAS/cuDNN stand-ins and host memory posing as device memory, which is how every op's
//     CUDA path runs in CI without a GPU.
// The per-device state lives here: the cuBLAS and cuDNN handles (made on first use, so a program
// without a GPU never touches the driver until it asks for the device), the convolution plans by
// shape, one scratch buffer that grows to the largest request, the optimiser's parameter tables.
#pragma once

#include <diffuse/backend/cuda.hpp>
#include <diffuse/backend/cuda/attention.hpp>
#include <diffuse/backend/cuda/blas.hpp>
#include <diffuse/backend/cuda/conv.hpp>
#include <diffuse/backend/cuda/profile.hpp>
#include <diffuse/backend/cuda/tensor.hpp>
#include <diffuse/core/rng.hpp>

#include "kernels/activation.cuh"
#include "kernels/adam.cuh"
#include "kernels/batch_norm.cuh"
#include "kernels/classification.cuh"
#include "kernels/convert.cuh"
#include "kernels/elementwise.cuh"
#include "kernels/flash_attention.cuh"
#include "kernels/grad_norm.cuh"
#include "kernels/group_norm.cuh"
#include "kernels/image.cuh"
#include "kernels/layer_norm.cuh"
#include "kernels/layout.cuh"
#include "kernels/pointwise.cuh"
#include "kernels/pool.cuh"
#include "kernels/q_sample.cuh"
#include "kernels/rng.cuh"
#include "kernels/sampler.cuh"
#include "kernels/timestep_embedding.cuh"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace diffuse::backend {

// The two worlds' classes differ: separate inline namespaces keep them apart (ODR).
#ifdef __CUDACC__
inline namespace cuda_runtime_world {
#else
inline namespace emulation_world {
#endif

#if DIFFUSE_HAVE_NCCL
// NCCL's collectives on a non-blocking stream of their own: each call first makes that stream wait
// for what the backend's stream has queued so far (an event), so the collectives overlap the work
// queued after them; wait() makes the backend's stream wait for the collectives in turn.
class NcclCollectives final : public CudaCollectives {
 public:
  NcclCollectives(const std::vector<unsigned char>& id, int rank, int size, cuda::stream_t compute)
      : compute_(compute) {
    if (id.size() != sizeof(ncclUniqueId))
      throw std::invalid_argument("diffuse: NCCL: a unique id of " + std::to_string(id.size()) + " bytes (expected " +
                                  std::to_string(sizeof(ncclUniqueId)) + ")");
    ncclUniqueId uid;
    std::memcpy(&uid, id.data(), sizeof uid);
    DIFFUSE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    DIFFUSE_CUDA_CHECK(cudaEventCreateWithFlags(&queued_, cudaEventDisableTiming));
    DIFFUSE_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
    DIFFUSE_NCCL_CHECK(ncclCommInitRank(&comm_, size, uid, rank));
  }
  NcclCollectives(const NcclCollectives&) = delete;
  NcclCollectives& operator=(const NcclCollectives&) = delete;
  ~NcclCollectives() override {
    if (comm_) ncclCommDestroy(comm_);
    if (done_) cudaEventDestroy(done_);
    if (queued_) cudaEventDestroy(queued_);
    if (stream_) cudaStreamDestroy(stream_);
  }
  void all_reduce_mean(const std::vector<DeviceArray>& arrays) override {
    group(arrays, [&](const DeviceArray& a) {
      DIFFUSE_NCCL_CHECK(ncclAllReduce(a.p, a.p, static_cast<size_t>(a.n), ncclFloat, ncclAvg, comm_, stream_));
    });
  }
  void broadcast(const std::vector<DeviceArray>& arrays, int root) override {
    group(arrays, [&](const DeviceArray& a) {
      DIFFUSE_NCCL_CHECK(ncclBroadcast(a.p, a.p, static_cast<size_t>(a.n), ncclFloat, root, comm_, stream_));
    });
  }
  void wait() override {
    if (!pending_) return;
    DIFFUSE_CUDA_CHECK(cudaEventRecord(done_, stream_));
    DIFFUSE_CUDA_CHECK(cudaStreamWaitEvent(compute_, done_, 0));
    pending_ = false;
  }

 private:
  // One NCCL group per 256 arrays (one launch each), behind the compute stream's work so far.
  template <class F>
  void group(const std::vector<DeviceArray>& arrays, F&& op) {
    DIFFUSE_CUDA_CHECK(cudaEventRecord(queued_, compute_));
    DIFFUSE_CUDA_CHECK(cudaStreamWaitEvent(stream_, queued_, 0));
    for (size_t i = 0; i < arrays.size(); i += 256) {
      DIFFUSE_NCCL_CHECK(ncclGroupStart());
      for (size_t k = i; k < std::min(arrays.size(), i + 256); ++k)
        if (arrays[k].n > 0) op(arrays[k]);
      DIFFUSE_NCCL_CHECK(ncclGroupEnd());
    }
    pending_ = true;
  }

  cuda::stream_t compute_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t queued_ = nullptr, done_ = nullptr;
  ncclComm_t comm_ = nullptr;
  bool pending_ = false;
};
#endif

#ifdef __CUDACC__
// A captured CUDA graph, instantiated; it keeps its allocator pool (allocator.hpp) until it is gone.
class RuntimeGraph final : public CapturedGraph {
 public:
  RuntimeGraph(cudaGraph_t g, std::uint64_t pool, cudaStream_t stream) : g_(g), pool_(pool), stream_(stream) {
    const cudaError_t e = cudaGraphInstantiate(&exec_, g_, 0);
    if (e != cudaSuccess) {
      release();
      cuda::detail::check_cuda(e, "cudaGraphInstantiate(&exec_, g_, 0)", __FILE__, __LINE__);
    }
  }
  RuntimeGraph(const RuntimeGraph&) = delete;
  RuntimeGraph& operator=(const RuntimeGraph&) = delete;
  ~RuntimeGraph() override { release(); }
  void launch() override { DIFFUSE_CUDA_CHECK(cudaGraphLaunch(exec_, stream_)); }

 private:
  // Launches already queued complete; later work on the stream (which may reuse the pool's
  // blocks) is ordered after them.
  void release() noexcept {
    if (exec_) (void)cudaGraphExecDestroy(std::exchange(exec_, nullptr));
    if (g_) (void)cudaGraphDestroy(std::exchange(g_, nullptr));
    try {
      cuda::device_allocator().release_graph_pool(pool_);
    } catch (...) {  // no current device: the blocks stay reserved
    }
  }
  cudaGraph_t g_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
  std::uint64_t pool_ = 0;
  cudaStream_t stream_ = nullptr;
};
#else
// The emulation's graph: the queued device work, run in order at each launch, after the blocks
// made before the capture and freed inside it are refilled with 0xFF (capture_state.hpp).
class EmulatedGraph final : public CapturedGraph {
 public:
  EmulatedGraph(std::vector<std::function<void()>> ops, std::shared_ptr<EmulatedGraphMemory> memory)
      : ops_(std::move(ops)), mem_(std::move(memory)) {}
  EmulatedGraph(const EmulatedGraph&) = delete;
  EmulatedGraph& operator=(const EmulatedGraph&) = delete;
  ~EmulatedGraph() override { free_deferred(*mem_); }
  void launch() override {
    for (const auto& [p, bytes] : mem_->stale) std::memset(p, 0xFF, bytes);
    for (const auto& op : ops_) op();
  }
  // The frees the graph held back (the emulated memory's, cuda/tensor.hpp).
  static void free_deferred(EmulatedGraphMemory& m) noexcept {
    for (const auto& [p, bytes] : m.deferred) ::operator delete(p, std::align_val_t{256});
    m.deferred.clear();
    m.stale.clear();
    m.owned.clear();
  }

 private:
  std::vector<std::function<void()>> ops_;
  std::shared_ptr<EmulatedGraphMemory> mem_;
};
#endif

class CudaBackendImpl final : public CudaBackend {
 public:
  CudaBackendImpl() = default;
  CudaBackendImpl(const CudaBackendImpl&) = delete;
  CudaBackendImpl& operator=(const CudaBackendImpl&) = delete;

  // ------------------------------------------------------------------ the device
  std::string name() const override {
#ifdef __CUDACC__
    int dev = 0;
    cudaDeviceProp p{};
    if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&p, dev) != cudaSuccess) return "CUDA device";
    return std::string(p.name) + " (sm_" + std::to_string(p.major) + std::to_string(p.minor) + ")";
#else
    return "CPU emulation of CUDA";
#endif
  }
  std::string unavailable_reason() const override {
#ifdef __CUDACC__
    if (!probed_) {
      int n = 0;
      const cudaError_t e = cudaGetDeviceCount(&n);
      reason_ = e != cudaSuccess ? std::string("no usable CUDA device (") + cudaGetErrorString(e) + ")"
                : n == 0         ? std::string("no CUDA device on this machine")
                                 : std::string();
      probed_ = true;
    }
    return reason_;
#else
    return "";
#endif
  }
  void synchronize() override {
    if (capture_state().active) capture_refuse("a wait for the device inside the captured work (nothing runs until a replay)");
#ifdef __CUDACC__
    DIFFUSE_CUDA_CHECK(cudaDeviceSynchronize());
#endif
  }
  void set_math_mode(MathMode m) override {
    math_ = m;
    if (blas_) blas_->set_math_mode(m);
  }
  MathMode math_mode() const override { return math_; }
  void set_attention_kernel(AttentionKernel k) override { attn_ = k; }
  AttentionKernel attention_kernel() const override { return attn_; }
  void set_conv_search(bool benchmark, bool allow_fft_winograd) override {
    conv_opt_.search = benchmark ? cuda::ConvSearch::Benchmark : cuda::ConvSearch::Heuristic;
    conv_opt_.allow_fft_winograd = allow_fft_winograd;
  }
  void set_profiling(bool on) override { prof_ = on ? &profiler_ : nullptr; }
  std::string profile_table(std::int64_t steps) override {
    std::string t = profiler_.table(steps);
    profiler_.reset();
    return t;
  }

  // ------------------------------------------------------------------ CUDA graphs
  // The CUDA runtime: the work goes to a blocking stream of the backend's own while it is
  // captured (the legacy default stream cannot be), cuBLAS with a fixed workspace from the first
  // capture on (its default one may be allocated inside the capture), every block allocated or
  // freed meanwhile into a pool of the allocator's that the graph keeps. The emulation: queued
  // (capture_state.hpp).
  void capture_begin() override {
    CaptureState& c = capture_state();
    if (c.active) throw std::logic_error("diffuse: CUDA graph capture: a capture is already in progress");
    if (prof_) capture_refuse("the profiler times each entry with events; turn profiling off to capture");
    // The backend's own scratch and cuDNN's workspace are made afresh inside the capture, so that
    // they are the graph's blocks: were the graph to use older ones, a later request for more
    // (a sampling callback's larger batch) would free a block the graph still writes.
    scratch_ = Tensor<std::uint8_t>();
    if (dnn_) dnn_->release_workspace();
#ifdef __CUDACC__
    blas(), dnn();  // made before: creating a handle allocates
    if (!capture_stream_) DIFFUSE_CUDA_CHECK(cudaStreamCreateWithFlags(&capture_stream_, cudaStreamDefault));
    if (!blas_workspace_.defined()) {
      blas_workspace_ = Tensor<std::uint8_t>({kBlasWorkspaceBytes}, Device::CUDA);
      blas_->set_workspace(blas_workspace_.data(), blas_workspace_.size());  // kept from now on
    }
    pool_ = cuda::device_allocator().open_graph_pool();
    use_stream(capture_stream_);
    const cudaError_t e = cudaStreamBeginCapture(capture_stream_, cudaStreamCaptureModeThreadLocal);
    if (e != cudaSuccess) {
      use_stream(nullptr);
      cuda::device_allocator().release_graph_pool(pool_);
      cuda::detail::check_cuda(e, "cudaStreamBeginCapture", __FILE__, __LINE__);
    }
    c.stream = capture_stream_;
#else
    auto ops = std::make_shared<std::vector<std::function<void()>>>();
    emu_ops_ = ops;
    c.queue = [ops](std::function<void()> f) { ops->push_back(std::move(f)); };
    c.emulated_memory = std::make_shared<EmulatedGraphMemory>();
#endif
    c.active = true;
  }
  std::unique_ptr<CapturedGraph> capture_end() override {
    CaptureState& c = capture_state();
    if (!c.active) throw std::logic_error("diffuse: CUDA graph capture: capture_end without capture_begin");
#ifdef __CUDACC__
    cudaGraph_t g = nullptr;
    const cudaError_t e = cudaStreamEndCapture(capture_stream_, &g);
    end_capture_state();
    cuda::device_allocator().close_graph_pool();
    if (e != cudaSuccess || !g) {
      if (g) (void)cudaGraphDestroy(g);
      cuda::device_allocator().release_graph_pool(pool_);
      cuda::detail::check_cuda(e != cudaSuccess ? e : cudaErrorStreamCaptureInvalidated, "cudaStreamEndCapture",
                               __FILE__, __LINE__);
    }
    return std::make_unique<RuntimeGraph>(g, pool_, stream_);
#else
    auto g = std::make_unique<EmulatedGraph>(std::move(*emu_ops_), c.emulated_memory);
    auto& live = c.emulated_graphs;
    std::erase_if(live, [](const std::weak_ptr<EmulatedGraphMemory>& w) { return w.expired(); });
    live.push_back(c.emulated_memory);
    end_capture_state();
    return g;
#endif
  }
  void capture_abort() noexcept override {
    CaptureState& c = capture_state();
    if (!c.active) return;
#ifdef __CUDACC__
    cudaGraph_t g = nullptr;
    (void)cudaStreamEndCapture(capture_stream_, &g);
    if (g) (void)cudaGraphDestroy(g);
    (void)cudaGetLastError();  // the error that failed the capture, not sticky
    end_capture_state();
    try {
      cuda::device_allocator().release_graph_pool(pool_);  // nothing ran: the blocks are free to use
    } catch (...) {
    }
#else
    if (c.emulated_memory) EmulatedGraph::free_deferred(*c.emulated_memory);
    end_capture_state();
#endif
  }

  int device_count() override {
#ifdef __CUDACC__
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
#else
    return 1;
#endif
  }
  void set_device(int device) override {
    if (device < 0 || device >= device_count())
      throw std::invalid_argument("diffuse: CUDA device " + std::to_string(device) + " does not exist (" +
                                  std::to_string(device_count()) + " visible)");
#ifdef __CUDACC__
    DIFFUSE_CUDA_CHECK(cudaSetDevice(device));
#endif
  }

  // ------------------------------------------------------------------ NCCL
  std::string nccl_unavailable_reason() const override {
#if DIFFUSE_HAVE_NCCL
    return "";
#elif defined(__CUDACC__)
    return "this program was built without NCCL (CMake did not find nccl.h and libnccl)";
#else
    return "the CPU emulation of CUDA has no NCCL";
#endif
  }
  std::vector<unsigned char> nccl_unique_id() override {
#if DIFFUSE_HAVE_NCCL
    ncclUniqueId id;
    DIFFUSE_NCCL_CHECK(ncclGetUniqueId(&id));
    const auto* b = reinterpret_cast<const unsigned char*>(&id);
    return std::vector<unsigned char>(b, b + sizeof id);
#else
    throw std::runtime_error("diffuse: NCCL: " + nccl_unavailable_reason());
#endif
  }
  std::unique_ptr<CudaCollectives> nccl_init(const std::vector<unsigned char>& id, int rank, int size) override {
#if DIFFUSE_HAVE_NCCL
    return std::make_unique<NcclCollectives>(id, rank, size, stream_);
#else
    (void)id, (void)rank, (void)size;
    throw std::runtime_error("diffuse: NCCL: " + nccl_unavailable_reason());
#endif
  }

  // ------------------------------------------------------------------ pointwise
  void fill(float* y, std::int64_t n, float v) override {
    cuda::ProfileScope ps(prof_, "fill");
    kernels::fill(y, n, v, stream_);
  }
  void copy(const float* x, float* y, std::int64_t n, bool acc) override {
    cuda::ProfileScope ps(prof_, "copy");
    copy_n(x, y, n, acc);
  }
  void scale(const float* x, float s, float* y, std::int64_t n, bool acc) override {
    cuda::ProfileScope ps(prof_, "scale");
    kernels::scale_acc(x, s, y, n, acc, stream_);
  }
  void axpby(float a, const float* x, float b, float* y, std::int64_t n) override {
    cuda::ProfileScope ps(prof_, "axpby");
    kernels::axpby(a, x, b, y, n, stream_);
  }
  void fill_scalar(const float* s, float alpha, float* y, std::int64_t n, bool acc) override {
    cuda::ProfileScope ps(prof_, "fill_scalar");
    kernels::fill_scalar(s, alpha, y, n, acc, stream_);
  }
  void binary(BinaryOp op, const float* a, const float* b, float* y, const BroadcastDesc& d) override {
    cuda::ProfileScope ps(prof_, "binary");
    kernels::binary(op, a, b, y, d, stream_);
  }
  void binary_backward(BinaryOp op, bool first, const float* g, const float* other, float* dx, const BroadcastDesc& d,
                       bool acc) override {
    cuda::ProfileScope ps(prof_, "binary bwd");
    kernels::binary_backward(op, first, g, other, dx, d, acc, stream_);
  }
  void activation(Activation f, const float* x, float* y, std::int64_t n) override {
    cuda::ProfileScope ps(prof_, "activation");
    kernels::activation_forward(f, x, y, n, stream_);
  }
  void activation_backward(Activation f, const float* x, const float* g, float* dx, std::int64_t n,
                           bool acc) override {
    cuda::ProfileScope ps(prof_, "activation bwd");
    kernels::activation_backward(f, x, g, dx, n, acc, stream_);
  }

  // ------------------------------------------------------------------ reductions and losses
  void sum(const float* x, std::int64_t n, float* out) override {
    cuda::ProfileScope ps(prof_, "sum");
    kernels::sum(x, n, out, scratch(kernels::sum_workspace_bytes(n)), stream_);
  }
  void mse(const float* a, const float* b, std::int64_t n, float* out) override {
    cuda::ProfileScope ps(prof_, "mse");
    kernels::mse_forward(a, b, n, out, scratch(kernels::mse_forward_workspace_bytes(n)), stream_);
  }
  void mse_backward(const float* a, const float* b, std::int64_t n, const float* g, float sign, float* da,
                    bool acc) override {
    cuda::ProfileScope ps(prof_, "mse bwd");
    kernels::mse_backward(a, b, n, g, sign, da, acc, stream_);
  }
  void log_softmax(const float* x, float* y, std::int64_t rows, std::int64_t K) override {
    cuda::ProfileScope ps(prof_, "log_softmax");
    kernels::log_softmax_forward(x, y, rows, K, stream_);
  }
  void log_softmax_backward(const float* y, const float* g, float* dx, std::int64_t rows, std::int64_t K,
                            bool acc) override {
    cuda::ProfileScope ps(prof_, "log_softmax bwd");
    kernels::log_softmax_backward(y, g, dx, rows, K, acc, stream_);
  }
  void cross_entropy(const float* logits, const std::int32_t* labels, std::int64_t rows, std::int64_t K, float* loss,
                     float* lse) override {
    cuda::ProfileScope ps(prof_, "cross_entropy");
    kernels::cross_entropy_forward(logits, labels, rows, K, loss, lse,
                                   scratch(kernels::cross_entropy_workspace_bytes(rows, K)), stream_);
  }
  void cross_entropy_backward(const float* logits, const std::int32_t* labels, const float* lse, const float* g,
                              float* dlogits, std::int64_t rows, std::int64_t K, bool acc) override {
    cuda::ProfileScope ps(prof_, "cross_entropy bwd");
    kernels::cross_entropy_backward(logits, labels, lse, g, dlogits, rows, K, acc, stream_);
  }

  // ------------------------------------------------------------------ matrix products
  void gemm(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* A,
            std::int64_t lda, const float* B, std::int64_t ldb, float beta, float* C, std::int64_t ldc) override {
    cuda::ProfileScope ps(prof_, "gemm");
    if (m == 0 || n == 0) return;
    if (k == 0) {  // a product over nothing: C = beta C
      if (beta == 0.0f) fill_2d(C, ldc, m, n, 0.0f);
      else if (beta != 1.0f) scale_2d(C, ldc, m, n, beta);
      return;
    }
    cuda::gemm(blas(), ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
  }
  void gemm_batched(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* A,
                    std::int64_t lda, std::int64_t sa, const float* B, std::int64_t ldb, std::int64_t sb, float beta,
                    float* C, std::int64_t ldc, std::int64_t sc, std::int64_t batch) override {
    cuda::ProfileScope ps(prof_, "gemm batched");
    if (m == 0 || n == 0 || batch == 0) return;
    cuda::gemm_strided_batched(blas(), ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, batch, sa, sb, sc);
  }
  void add_row_bias(float* y, const float* b, std::int64_t rows, std::int64_t C) override {
    cuda::ProfileScope ps(prof_, "row bias");
    kernels::add_row_bias(y, b, rows, C, stream_);
  }
  void row_bias_backward(const float* g, float* db, std::int64_t rows, std::int64_t C, bool acc) override {
    cuda::ProfileScope ps(prof_, "row bias bwd");
    bias_grad(g, db, rows, C, acc);
  }
  void bias_activation(float* z, const float* b, const float* table, const std::int32_t* idx, float* y,
                       std::int64_t rows, std::int64_t C, Activation f) override {
    cuda::ProfileScope ps(prof_, "bias+activation");
    kernels::bias_activation(z, b, table, idx, y, rows, C, f, stream_);
  }

 private:
  template <class G>
  void bias_grad(const G* g, float* db, std::int64_t rows, std::int64_t C, bool acc) {
    if (rows == 0) {
      if (!acc) kernels::fill(db, C, 0.0f, stream_);
      return;
    }
    kernels::row_bias_backward(g, db, rows, C, acc, scratch(kernels::row_bias_backward_workspace_bytes(rows, C)),
                               stream_);
  }
  // The attention backwards write dq, dk and dv in their own kernels: when q, k or v are the
  // same tensor, each gradient goes into its own buffer and is then added to its target in the
  // order the op set the flags (dv, dq, dk), so the first contribution writes.
  // run(dq, acc_q, dk, acc_k, dv, acc_v) computes the gradients of n elements each.
  template <class Run>
  void with_unaliased_grads(float* dq, bool acc_q, float* dk, bool acc_k, float* dv, bool acc_v, std::int64_t n,
                            Run&& run) {
    if (!((dq && (dq == dk || dq == dv)) || (dk && dk == dv))) return run(dq, acc_q, dk, acc_k, dv, acc_v);
    Tensor<float> tq = dq ? Tensor<float>({n}, Device::CUDA) : Tensor<float>();
    Tensor<float> tk = dk ? Tensor<float>({n}, Device::CUDA) : Tensor<float>();
    Tensor<float> tv = dv ? Tensor<float>({n}, Device::CUDA) : Tensor<float>();
    run(tq.data(), false, tk.data(), false, tv.data(), false);
    if (dv) copy_n(tv.data(), dv, n, acc_v);
    if (dq) copy_n(tq.data(), dq, n, acc_q);
    if (dk) copy_n(tk.data(), dk, n, acc_k);
  }
  void copy_n(const float* x, float* y, std::int64_t n, bool acc) {
    if (acc) kernels::accumulate(x, y, n, stream_);
    else kernels::scale(x, 1.0f, y, n, stream_);
  }

 public:

  // ------------------------------------------------------------------ layout
  void gather_rows(const float* table, const std::int32_t* idx, float* y, std::int64_t N, std::int64_t D,
                   bool acc) override {
    cuda::ProfileScope ps(prof_, "gather rows");
    kernels::gather_rows(table, idx, y, N, D, acc, stream_);
  }
  void scatter_rows(const std::int32_t* idx, const float* g, float* dtable, std::int64_t N, std::int64_t R,
                    std::int64_t D, bool acc) override {
    cuda::ProfileScope ps(prof_, "scatter rows");
    kernels::scatter_rows(idx, g, dtable, N, R, D, acc, stream_);
  }
  void convert_2d(const float* src, std::int64_t src_ld, bf16* dst, std::int64_t dst_ld, std::int64_t rows,
                  std::int64_t width) override {
    cuda::ProfileScope ps(prof_, "convert_2d");
    kernels::convert_2d(src, src_ld, dst, dst_ld, rows, width, stream_);
  }
  void copy_2d(const float* src, std::int64_t src_ld, float* dst, std::int64_t dst_ld, std::int64_t rows,
               std::int64_t width, bool acc) override {
    cuda::ProfileScope ps(prof_, "copy 2d");
    kernels::copy_2d(src, src_ld, dst, dst_ld, rows, width, acc, stream_);
  }
  void permute(const float* x, float* y, int ndim, const std::int64_t* x_shape, const int* perm, bool acc) override {
    cuda::ProfileScope ps(prof_, "permute");
    kernels::permute(x, y, ndim, x_shape, perm, acc, stream_);
  }

  // ------------------------------------------------------------------ image ops, NHWC
  // MathMode::BF16: the operands are rounded into bf16 copies (kernels/convert.cuh), kept for the
  // backward where the caller gives keep_x / keep_w; cuDNN convolves those with float
  // accumulation into a bf16 result, which is widened (or added, for gradients) into the float
  // tensor. The float activations and weights are not touched.
  void conv2d(const ConvDesc& d, const float* x, const float* w, const float* b, const float* cb, const float* res,
              float* y, bf16* keep_x, bf16* keep_w, bf16* y16) override {
    const cuda::Conv2dPlan& plan = conv_plan(d);
    cuda::ProfileScope ps(prof_, "conv2d");
    const std::int64_t HW = d.Ho() * d.Wo();
    if ((!x && !(plan.bf16_tensors() && keep_x)) || (y16 && !plan.bf16_tensors()))
      throw std::logic_error("diffuse: conv2d: x or y given in bf16 only needs MathMode::BF16");
    if (plan.bf16_tensors()) {
      const std::int64_t nx = d.N * d.H * d.W * d.C, nw = d.O * d.kh * d.kw * d.C, ny = d.N * HW * d.O;
      Bf16Scratch t(scratch(Bf16Scratch::bytes({keep_x ? 0 : nx, keep_w ? 0 : nw, y16 ? 0 : ny})));
      bf16* xb = keep_x ? keep_x : t.take(nx);
      bf16* wb = keep_w ? keep_w : t.take(nw);
      bf16* yb = y16 ? y16 : t.take(ny);
      if (x) kernels::convert(x, xb, nx, false, stream_);
      kernels::convert(w, wb, nw, false, stream_);
      plan.forward(dnn(), xb, wb, yb);
      if (!y16)
        kernels::conv_epilogue(yb, b, cb, res, y, d.N, HW, d.O, stream_);  // to float, with the additions
      else if (b || cb || res)  // the float sums rounded once, in place
        kernels::conv_epilogue(static_cast<const bf16*>(yb), b, cb, res, yb, d.N, HW, d.O, stream_);
    } else {
      plan.forward(dnn(), x, w, y);
      if (b || cb || res) kernels::conv_epilogue(y, b, cb, res, y, d.N, HW, d.O, stream_);
    }
  }
  void conv2d_backward(const ConvDesc& d, const float* x, const float* w, const float* dy, float* dx, bool acc_dx,
                       float* dw, bool acc_dw, float* db, bool acc_db, const bf16* xb, const bf16* wb,
                       bf16* dx16, const bf16* dy16) override {
    const cuda::Conv2dPlan& plan = conv_plan(d);
    const std::int64_t rows = d.N * d.Ho() * d.Wo();
    if ((!x && dw && !(plan.bf16_tensors() && xb)) || ((dx16 || dy16) && !plan.bf16_tensors()))
      throw std::logic_error("diffuse: conv2d backward: x, dx or dy in bf16 only needs MathMode::BF16");
    if (plan.bf16_tensors() && d.N > 0) {
      if (db) {
        cuda::ProfileScope ps(prof_, "conv2d bwd filter+bias");
        if (dy16)
          bias_grad(dy16, db, rows, d.O, acc_db);  // in float, from the widened bf16 dy
        else
          bias_grad(dy, db, rows, d.O, acc_db);  // in float, from the float dy
      }
      conv2d_backward_bf16(d, plan, x, w, dy, dx, acc_dx, dw, acc_dw, xb, wb, dx16, dy16);
      return;
    }
    {
      cuda::ProfileScope ps(prof_, "conv2d bwd filter+bias");
      if (db) bias_grad(dy, db, rows, d.O, acc_db);
      if (dw) {
        if (d.N == 0) {
          if (!acc_dw) kernels::fill(dw, d.O * d.kh * d.kw * d.C, 0.0f, stream_);
        } else {
          plan.backward_filter(dnn(), x, dy, dw, nullptr, 0, acc_dw);
        }
      }
    }
    if (dx && d.N > 0) {  // N = 0: dx is empty
      cuda::ProfileScope ps(prof_, "conv2d bwd data");
      plan.backward_data(dnn(), dy, w, dx, acc_dx);
    }
  }
  void group_norm(const float* x, const float* gamma, const float* beta, float* y, float* mean, float* rstd,
                  std::int64_t N, std::int64_t HW, std::int64_t C, std::int64_t G, float eps, bool silu,
                  const std::uint32_t* keep, float keep_scale, bf16* y16, const bf16* x16) override {
    cuda::ProfileScope ps(prof_, keep ? "group_norm+silu+dropout" : silu ? "group_norm+silu" : "group_norm");
    if (x16 && (x || !y16)) throw std::logic_error("diffuse: group_norm: x in bf16 (then x null) needs y in bf16");
    void* ws = scratch(kernels::group_norm_workspace_bytes(N, HW, C, G));
    if (x16)
      kernels::group_norm_forward(x16, gamma, beta, y16, mean, rstd, N, HW, C, G, eps, silu, ws, stream_, 0, 65535,
                                  keep, keep_scale);
    else if (y16)
      kernels::group_norm_forward(x, gamma, beta, y16, mean, rstd, N, HW, C, G, eps, silu, ws, stream_, 0, 65535, keep,
                                  keep_scale);
    else
      kernels::group_norm_forward(x, gamma, beta, y, mean, rstd, N, HW, C, G, eps, silu, ws, stream_, 0, 65535, keep,
                                  keep_scale);
  }
  void group_norm_backward(const float* dy, const float* x, const float* gamma, const float* beta, const float* mean,
                           const float* rstd, float* dx, bool acc_dx, float* dgamma, bool acc_gamma, float* dbeta,
                           bool acc_beta, std::int64_t N, std::int64_t HW, std::int64_t C, std::int64_t G,
                           bool silu, const std::uint32_t* keep, float keep_scale, const bf16* dy16,
                           const bf16* x16, bf16* dx16) override {
    cuda::ProfileScope ps(prof_, keep ? "group_norm+silu+dropout bwd" : silu ? "group_norm+silu bwd" : "group_norm bwd");
    if (N * HW == 0) {  // no values: the parameters' gradients are sums over nothing
      if (dgamma && !acc_gamma) kernels::fill(dgamma, C, 0.0f, stream_);
      if (dbeta && !acc_beta) kernels::fill(dbeta, C, 0.0f, stream_);
      return;
    }
    if ((x16 && (x || !dy16 || (dx16 && (dx || acc_dx)))) || (dx16 && !x16))
      throw std::logic_error("diffuse: group_norm backward: x in bf16 needs dy in bf16 (and x null); dx in bf16 "
                             "needs x in bf16 and is written");
    void* ws = scratch(kernels::group_norm_workspace_bytes(N, HW, C, G));
    if (dx16)
      kernels::group_norm_backward(dy16, x16, gamma, beta, mean, rstd, dx16, false, dgamma, acc_gamma, dbeta, acc_beta,
                                   N, HW, C, G, silu, ws, stream_, 0, 65535, keep, keep_scale);
    else if (x16)
      kernels::group_norm_backward(dy16, x16, gamma, beta, mean, rstd, dx, acc_dx, dgamma, acc_gamma, dbeta, acc_beta,
                                   N, HW, C, G, silu, ws, stream_, 0, 65535, keep, keep_scale);
    else if (dy16)
      kernels::group_norm_backward(dy16, x, gamma, beta, mean, rstd, dx, acc_dx, dgamma, acc_gamma, dbeta, acc_beta, N,
                                   HW, C, G, silu, ws, stream_, 0, 65535, keep, keep_scale);
    else
      kernels::group_norm_backward(dy, x, gamma, beta, mean, rstd, dx, acc_dx, dgamma, acc_gamma, dbeta, acc_beta, N,
                                   HW, C, G, silu, ws, stream_, 0, 65535, keep, keep_scale);
  }
  void layer_norm(const float* x, const float* gamma, const float* beta, float* y, float* mean, float* rstd,
                  std::int64_t rows, std::int64_t C, float eps) override {
    cuda::ProfileScope ps(prof_, "layer_norm");
    kernels::layer_norm_forward(x, gamma, beta, y, mean, rstd, rows, C, eps, stream_);
  }
  void layer_norm_backward(const float* dy, const float* x, const float* gamma, const float* mean, const float* rstd,
                           float* dx, bool acc_dx, float* dgamma, bool acc_gamma, float* dbeta, bool acc_beta,
                           std::int64_t rows, std::int64_t C) override {
    cuda::ProfileScope ps(prof_, "layer_norm bwd");
    kernels::layer_norm_backward(dy, x, gamma, mean, rstd, dx, acc_dx, dgamma, acc_gamma, dbeta, acc_beta, rows, C,
                                 scratch(kernels::layer_norm_backward_workspace_bytes(rows, C)), stream_);
  }
  void upsample_nearest2x(const float* x, float* y, std::int64_t N, std::int64_t H, std::int64_t W,
                          std::int64_t C) override {
    cuda::ProfileScope ps(prof_, "upsample");
    kernels::upsample_nearest2x_forward(x, y, N, H, W, C, stream_);
  }
  void upsample_nearest2x_backward(const float* g, float* dx, std::int64_t N, std::int64_t H, std::int64_t W,
                                   std::int64_t C, bool acc) override {
    cuda::ProfileScope ps(prof_, "upsample bwd");
    kernels::upsample_nearest2x_backward(g, dx, N, H, W, C, acc, stream_);
  }
  void dropout(const float* x, float* y, std::int64_t n, double p, std::uint64_t seed, DrawPos at) override {
    if (!at.base) refuse_fixed_draw("dropout");
    cuda::ProfileScope ps(prof_, "dropout");
    kernels::dropout_forward(x, y, n, p, seed, at, stream_);
  }
  void dropout_backward(const float* g, float* dx, std::int64_t n, double p, std::uint64_t seed, DrawPos at,
                        bool acc) override {
    if (!at.base) refuse_fixed_draw("dropout");
    cuda::ProfileScope ps(prof_, "dropout bwd");
    kernels::dropout_backward(g, dx, n, p, seed, at, acc, stream_);
  }
  void dropout_bits(std::uint32_t* bits, std::int64_t n, double p, std::uint64_t seed, DrawPos at) override {
    if (!at.base) refuse_fixed_draw("dropout");
    cuda::ProfileScope ps(prof_, "dropout bits");
    kernels::dropout_bits(bits, n, p, seed, at, stream_);
  }
  void add_channel_bias(const float* x, const float* b, float* y, std::int64_t N, std::int64_t HW,
                        std::int64_t C) override {
    cuda::ProfileScope ps(prof_, "channel bias");
    kernels::add_channel_bias(x, b, y, N, HW, C, stream_);
  }
  void channel_bias_backward(const float* g, float* db, std::int64_t N, std::int64_t HW, std::int64_t C, bool acc,
                             const bf16* g16) override {
    cuda::ProfileScope ps(prof_, "channel bias bwd");
    if (HW == 0) {
      if (!acc) kernels::fill(db, N * C, 0.0f, stream_);
      return;
    }
    void* ws = scratch(kernels::channel_bias_backward_workspace_bytes(N, HW, C));
    if (g16)
      kernels::channel_bias_backward(g16, db, N, HW, C, acc, ws, stream_);
    else
      kernels::channel_bias_backward(g, db, N, HW, C, acc, ws, stream_);
  }
  void attention(const float* q, const float* k, const float* v, float* out, float* P, std::int64_t N, std::int64_t L,
                 std::int64_t C, std::int64_t heads) override {
    cuda::ProfileScope ps(prof_, "attention");
    cuda::attention_forward(blas(), q, k, v, out, P, N, L, C, heads, stream_);
  }
  void attention_backward(const float* q, const float* k, const float* v, const float* P, const float* g, float* dq,
                          bool acc_q, float* dk, bool acc_k, float* dv, bool acc_v, std::int64_t N, std::int64_t L,
                          std::int64_t C, std::int64_t heads) override {
    cuda::ProfileScope ps(prof_, "attention bwd");
    void* ws = dq || dk ? scratch(cuda::attention_workspace_bytes(N, L, heads)) : nullptr;
    with_unaliased_grads(dq, acc_q, dk, acc_k, dv, acc_v, N * L * C,
                         [&](float* gq, bool aq, float* gk, bool ak, float* gv, bool av) {
                           cuda::attention_backward(blas(), q, k, v, P, g, gq, gk, gv, ws, N, L, C, heads, stream_,
                                                    cuda::AttentionAccumulate{aq, ak, av});
                         });
  }
  static_assert(kernels::kFlashMaxHeadDim == kFlashAttentionMaxHeadDim);
  void flash_attention(const float* q, const float* k, const float* v, float* out, float* lse, std::int64_t N,
                       std::int64_t L, std::int64_t C, std::int64_t heads) override {
    cuda::ProfileScope ps(prof_, "flash attention");
    kernels::flash_attention_forward(q, k, v, out, lse, N, L, C, heads, stream_);
  }
  void flash_attention_backward(const float* q, const float* k, const float* v, const float* out, const float* lse,
                                const float* g, float* dq, bool acc_q, float* dk, bool acc_k, float* dv, bool acc_v,
                                std::int64_t N, std::int64_t L, std::int64_t C, std::int64_t heads) override {
    cuda::ProfileScope ps(prof_, "flash attention bwd");
    float* delta = static_cast<float*>(scratch(sizeof(float) * kernels::flash_attention_rows(N, L, heads)));
    with_unaliased_grads(dq, acc_q, dk, acc_k, dv, acc_v, N * L * C,
                         [&](float* gq, bool aq, float* gk, bool ak, float* gv, bool av) {
                           kernels::flash_attention_backward(q, k, v, out, lse, g, gq, gk, gv, delta, N, L, C, heads,
                                                             stream_, aq, ak, av);
                         });
  }
  void flash_attention_bf16(const bf16* qkv, bf16* out, float* out32, float* lse, std::int64_t N, std::int64_t L,
                            std::int64_t C, std::int64_t heads) override {
    cuda::ProfileScope ps(prof_, "flash attention bf16");
    kernels::flash_attention_forward(qkv, qkv + C, qkv + 2 * C, out, lse, N, L, C, heads, stream_, 3 * C, out32);
  }
  void flash_attention_backward_bf16(const bf16* qkv, const float* out32, const float* lse, const bf16* g,
                                     bf16* dqkv, std::int64_t N, std::int64_t L, std::int64_t C,
                                     std::int64_t heads) override {
    cuda::ProfileScope ps(prof_, "flash attention bf16 bwd");
    float* delta = static_cast<float*>(scratch(sizeof(float) * kernels::flash_attention_rows(N, L, heads)));
    kernels::flash_attention_backward(qkv, qkv + C, qkv + 2 * C, out32, lse, g, dqkv, dqkv + C, dqkv + 2 * C, delta,
                                      N, L, C, heads, stream_, false, false, false, 3 * C);
  }
  void max_pool2d(const PoolDesc& d, const float* x, float* y, std::int32_t* argmax) override {
    cuda::ProfileScope ps(prof_, "max_pool2d");
    kernels::max_pool2d_forward(d, x, y, argmax, stream_);
  }
  void max_pool2d_backward(const PoolDesc& d, const std::int32_t* argmax, const float* g, float* dx,
                           bool acc) override {
    cuda::ProfileScope ps(prof_, "max_pool2d bwd");
    kernels::max_pool2d_backward(d, argmax, g, dx, acc, stream_);
  }
  void avg_pool2d(const PoolDesc& d, const float* x, float* y) override {
    cuda::ProfileScope ps(prof_, "avg_pool2d");
    kernels::avg_pool2d_forward(d, x, y, stream_);
  }
  void avg_pool2d_backward(const PoolDesc& d, const float* g, float* dx, bool acc) override {
    cuda::ProfileScope ps(prof_, "avg_pool2d bwd");
    kernels::avg_pool2d_backward(d, g, dx, acc, stream_);
  }
  void global_avg_pool(const float* x, float* y, std::int64_t N, std::int64_t HW, std::int64_t C) override {
    cuda::ProfileScope ps(prof_, "global_avg_pool");
    kernels::global_avg_pool_forward(x, y, N, HW, C, scratch(kernels::global_avg_pool_workspace_bytes(N, HW, C)),
                                     stream_);
  }
  void global_avg_pool_backward(const float* g, float* dx, std::int64_t N, std::int64_t HW, std::int64_t C,
                                bool acc) override {
    cuda::ProfileScope ps(prof_, "global_avg_pool bwd");
    kernels::global_avg_pool_backward(g, dx, N, HW, C, acc, stream_);
  }
  void batch_norm_inference(const float* x, const float* w, const float* b, const float* mean, const float* var,
                            float eps, float* y, std::int64_t rows, std::int64_t C) override {
    cuda::ProfileScope ps(prof_, "batch_norm");
    kernels::batch_norm_inference_forward(x, w, b, mean, var, eps, y, rows, C, stream_);
  }
  void batch_norm_inference_backward(const float* g, const float* x, const float* w, const float* mean,
                                     const float* var, float eps, float* dx, bool acc_dx, float* dw, bool acc_w,
                                     float* db, bool acc_b, std::int64_t rows, std::int64_t C) override {
    cuda::ProfileScope ps(prof_, "batch_norm bwd");
    kernels::batch_norm_inference_backward(g, x, w, mean, var, eps, dx, acc_dx, dw, acc_w, db, acc_b, rows, C,
                                           scratch(kernels::batch_norm_inference_backward_workspace_bytes(rows, C)),
                                           stream_);
  }
  void timestep_embedding(const std::int32_t* t, float* out, std::int64_t n, std::int64_t dim) override {
    cuda::ProfileScope ps(prof_, "timestep embedding");
    kernels::timestep_embedding(t, out, n, dim, stream_);
  }

  // ------------------------------------------------------------------ random numbers, diffusion
  void normal(float* out, std::int64_t n, std::uint64_t seed, std::uint64_t off, std::uint64_t first) override {
    refuse_fixed_draw("randn");
    cuda::ProfileScope ps(prof_, "randn");
    kernels::philox_normal_at(out, n, seed, DrawPos(off, first), stream_);
  }
  void uniform(float* out, std::int64_t n, std::uint64_t seed, std::uint64_t off, std::uint64_t first) override {
    refuse_fixed_draw("rand");
    cuda::ProfileScope ps(prof_, "rand");
    kernels::philox_uniform_at(out, n, seed, DrawPos(off, first), stream_);
  }
  void q_sample(const float* x0, const float* eps, const std::int32_t* t, const float* coef, std::int64_t T, float* xt,
                std::int64_t batch, std::int64_t row) override {
    cuda::ProfileScope ps(prof_, "q_sample");
    kernels::q_sample(x0, eps, t, coef, coef + T, xt, batch, row, stream_);
  }
  void sampler_step(const SamplerStep& s, float* x, const float* eps, std::int64_t n, std::uint64_t seed,
                    std::uint64_t off) override {
    cuda::ProfileScope ps(prof_, "sampler step");
    if (s.ddim) {
      const kernels::DdimStepParams p{s.clip_x0 ? 1 : 0, s.noise ? 1 : 0, s.ra, s.rb, s.cx0, s.ceps, s.lim, s.sigma};
      kernels::ddim_step(p, x, eps, static_cast<const float*>(nullptr), 0.0, n, seed, off, stream_);
    } else {
      const kernels::DdpmStepParams p{s.clip_x0 ? 1 : 0, s.noise ? 1 : 0, s.a, s.b, s.ra, s.rb, s.c1, s.c2, s.lim, s.sigma};
      kernels::ddpm_step(p, x, eps, static_cast<const float*>(nullptr), 0.0, n, seed, off, stream_);
    }
  }

  // ------------------------------------------------------------------ optimisers
  void adam_step(const std::vector<ParamSlot>& slots, const AdamArgs& a) override {
    cuda::ProfileScope ps(prof_, "adam");
    const Table& t = table(slots);
    const kernels::AdamStepArgs<float> k{a.step_size, a.bc2_sqrt, a.b1, a.b2, a.eps, a.lr, a.wd, a.ema_decay,
                                         a.decoupled ? 1 : 0, a.guard};
    kernels::adam_ema_step(t.tensors(), t.chunks(), t.num_chunks, k, stream_);
  }
  void ema_update(const std::vector<ParamSlot>& slots, float decay, const StepRecord* guard) override {
    cuda::ProfileScope ps(prof_, "ema");
    const Table& t = table(slots);
    kernels::ema_step(t.tensors(), t.chunks(), t.num_chunks, decay, stream_, 256, 4096, guard);
  }
  double grad_sq_norm(const std::vector<ParamSlot>& slots) override {
    cuda::ProfileScope ps(prof_, "grad norm");
    const Table& t = table(slots);
    if (t.num_chunks == 0) return 0.0;
    Tensor<double> part({t.num_chunks}, Device::CUDA);
    kernels::grad_sq_partials(t.tensors(), t.chunks(), t.num_chunks, part.data(), stream_);
    const Tensor<double> host = part.cpu();  // waits for the device
    double sq = 0;
    for (double v : host) sq += v;  // chunk order: the same sum every time
    return sq;
  }
  void grad_scale(const std::vector<ParamSlot>& slots, double c) override {
    cuda::ProfileScope ps(prof_, "grad scale");
    const Table& t = table(slots);
    kernels::grad_scale(t.tensors(), t.chunks(), t.num_chunks, c, stream_);
  }
  void grad_clip_recorded(const std::vector<ParamSlot>& slots, double max_norm, const float* loss, std::int64_t step,
                          StepRecord* record) override {
    cuda::ProfileScope ps(prof_, "grad clip");
    const Table& t = table(slots);
    double* part = static_cast<double*>(scratch(static_cast<std::size_t>(t.num_chunks) * sizeof(double)));
    kernels::grad_sq_partials(t.tensors(), t.chunks(), t.num_chunks, part, stream_);
    kernels::step_record_finish(part, t.num_chunks, loss, max_norm, step, record, stream_);
    kernels::grad_scale_recorded(t.tensors(), t.chunks(), t.num_chunks, record, stream_);
  }

 private:
  // The parameter table of the multi-tensor kernels (adam.cuh) on the device, remade only when the
  // slots change (a different model, a parameter without a gradient this step).
  struct Table {
    std::vector<ParamSlot> slots;
    Tensor<std::uint8_t> tensors_dev, chunks_dev;
    std::int64_t num_chunks = 0;
    const kernels::AdamTensor<float>* tensors() const {
      return reinterpret_cast<const kernels::AdamTensor<float>*>(tensors_dev.data());
    }
    const kernels::AdamChunk* chunks() const { return reinterpret_cast<const kernels::AdamChunk*>(chunks_dev.data()); }
  };
  template <class V>
  static Tensor<std::uint8_t> upload(const std::vector<V>& v) {
    Tensor<std::uint8_t> h({static_cast<std::int64_t>(std::max<std::size_t>(v.size() * sizeof(V), 1))});
    if (!v.empty()) std::memcpy(h.data(), v.data(), v.size() * sizeof(V));
    return h.to(Device::CUDA);
  }
  const Table& table(const std::vector<ParamSlot>& slots) {
    for (const Table& t : tables_)
      if (t.slots == slots) return t;
    Table t;
    t.slots = slots;
    std::vector<kernels::AdamTensor<float>> tensors;
    std::vector<std::int64_t> sizes;
    for (const ParamSlot& s : slots) {
      tensors.push_back({s.w, s.g, s.m, s.v, s.ema, s.n});
      sizes.push_back(s.n);
    }
    const std::vector<kernels::AdamChunk> chunks = kernels::plan_adam_chunks(sizes);
    t.num_chunks = static_cast<std::int64_t>(chunks.size());
    t.tensors_dev = upload(tensors);
    t.chunks_dev = upload(chunks);
    // A few tables (the optimiser's, the clipper's, ...); the oldest goes when a new one comes.
    if (tables_.size() >= 4) tables_.erase(tables_.begin());
    tables_.push_back(std::move(t));
    return tables_.back();
  }

  // Scratch device memory of at least `bytes`, valid until the next entry (entries run in stream
  // order, so one entry's scratch is free once its kernels are queued).
  void* scratch(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    if (!scratch_.defined() || scratch_.size() < bytes) {
      scratch_ = Tensor<std::uint8_t>();
      scratch_ = Tensor<std::uint8_t>({static_cast<std::int64_t>(std::max<std::size_t>(bytes, 1 << 20))}, Device::CUDA);
    }
    return scratch_.data();
  }
  void fill_2d(float* C, std::int64_t ldc, std::int64_t m, std::int64_t n, float v) {
    for (std::int64_t r = 0; r < m; ++r) kernels::fill(C + r * ldc, n, v, stream_);
  }
  void scale_2d(float* C, std::int64_t ldc, std::int64_t m, std::int64_t n, float s) {
    for (std::int64_t r = 0; r < m; ++r) kernels::scale_acc(C + r * ldc, s, C + r * ldc, n, false, stream_);
  }

  // Consecutive bf16 buffers carved out of one scratch block, each 256-byte aligned.
  class Bf16Scratch {
   public:
    static std::size_t bytes(std::initializer_list<std::int64_t> counts) {
      std::size_t b = 0;
      for (std::int64_t n : counts) b += round_up(static_cast<std::size_t>(n) * sizeof(bf16));
      return b;
    }
    explicit Bf16Scratch(void* p) : p_(static_cast<unsigned char*>(p)) {}
    bf16* take(std::int64_t n) {
      bf16* r = reinterpret_cast<bf16*>(p_);
      p_ += round_up(static_cast<std::size_t>(n) * sizeof(bf16));
      return r;
    }

   private:
    static std::size_t round_up(std::size_t b) { return (b + 255) / 256 * 256; }
    unsigned char* p_;
  };

  // The backward of a MathMode::BF16 convolution (N > 0): dy rounded once for both products; x
  // and w are the forward's bf16 copies where given (xb, wb), else rounded here; the bf16
  // gradients are added into (or written to) the float dw and dx, or dx is written as it is to
  // dx16.
  void conv2d_backward_bf16(const ConvDesc& d, const cuda::Conv2dPlan& plan, const float* x, const float* w,
                            const float* dy, float* dx, bool acc_dx, float* dw, bool acc_dw, const bf16* xb,
                            const bf16* wb, bf16* dx16, const bf16* dy16) {
    const std::int64_t nx = d.N * d.H * d.W * d.C, nw = d.O * d.kh * d.kw * d.C, ny = d.N * d.Ho() * d.Wo() * d.O;
    Bf16Scratch t(scratch(Bf16Scratch::bytes({dy16 ? 0 : ny, dx16 ? 0 : nx, nw})));
    bf16* dyw = dy16 ? nullptr : t.take(ny);
    bf16* xs = dx16 ? dx16 : t.take(nx);  // x when not kept, then dx
    bf16* ws = t.take(nw);                // dw, then w when not kept
    if (dyw) kernels::convert(dy, dyw, ny, false, stream_);
    const bf16* dyb = dy16 ? dy16 : dyw;
    if (dw) {
      cuda::ProfileScope ps(prof_, "conv2d bwd filter+bias");
      if (!xb) kernels::convert(x, xs, nx, false, stream_);
      plan.backward_filter(dnn(), xb ? xb : xs, dyb, ws);
      kernels::convert(ws, dw, nw, acc_dw, stream_);
    }
    if (dx || dx16) {
      cuda::ProfileScope ps(prof_, "conv2d bwd data");
      if (!wb) kernels::convert(w, ws, nw, false, stream_);
      plan.backward_data(dnn(), dyb, wb ? wb : ws, xs);
      if (dx) kernels::convert(xs, dx, nx, acc_dx, stream_);
    }
  }

  cuda::Blas& blas() {
    if (!blas_) {
      blas_ = std::make_unique<cuda::Blas>();
      blas_->set_stream(stream_);
      blas_->set_math_mode(math_);
    }
    return *blas_;
  }
  cuda::Dnn& dnn() {
    if (!dnn_) dnn_ = std::make_unique<cuda::Dnn>(stream_);
    return *dnn_;
  }
  const cuda::Conv2dPlan& conv_plan(const ConvDesc& d) {
    cuda::Conv2dShape s;
    s.N = d.N, s.H = d.H, s.W = d.W, s.C = d.C, s.O = d.O, s.kh = d.kh, s.kw = d.kw;
    s.stride_h = d.stride_h, s.stride_w = d.stride_w, s.pad_h = d.pad_h, s.pad_w = d.pad_w;
    cuda::Conv2dPlanOptions o = conv_opt_;
    o.math = math_;
    cuda::ProfileScope ps(prof_, "conv2d plan");
    return plans_.get(dnn(), s, o);
  }

  // Inside a capture every random draw must be placed by its generator's device word (capture_state.hpp's
  // device_draw); a fixed position would repeat the capture's numbers at every replay.
  static void refuse_fixed_draw(const char* what) {
    if (capture_state().active)
      capture_refuse(std::string(what) + " inside the captured work at a fixed place in its stream (draw through "
                     "backend::device_draw from a generator named with CudaGraphCapture::random)");
  }
  void end_capture_state() noexcept {
    CaptureState& c = capture_state();
#ifdef __CUDACC__
    try {
      use_stream(nullptr);
    } catch (...) {
    }
#else
    emu_ops_.reset();
#endif
    c.active = false;
    c.queue = nullptr;
    c.emulated_memory.reset();
    c.stream = nullptr;
  }
#ifdef __CUDACC__
  // Every later entry, cuBLAS and cuDNN on `s`.
  void use_stream(cudaStream_t s) {
    stream_ = s;
    if (blas_) blas_->set_stream(s);
    if (dnn_) dnn_->set_stream(s);
  }
  static constexpr std::int64_t kBlasWorkspaceBytes = 32 << 20;  // what cuBLAS asks for on Hopper
  cudaStream_t capture_stream_ = nullptr;  // never destroyed: the backend lives as long as the program
  Tensor<std::uint8_t> blas_workspace_;
  std::uint64_t pool_ = 0;
#else
  std::shared_ptr<std::vector<std::function<void()>>> emu_ops_;
#endif

  cuda::stream_t stream_{};  // the legacy default stream (a stream of the backend's own while capturing)
  MathMode math_ = MathMode::FP32;
  AttentionKernel attn_ = AttentionKernel::Full;
  cuda::Conv2dPlanOptions conv_opt_;
  std::unique_ptr<cuda::Blas> blas_;
  std::unique_ptr<cuda::Dnn> dnn_;
  cuda::Conv2dPlans plans_;
  Tensor<std::uint8_t> scratch_;
  std::vector<Table> tables_;
  cuda::OpProfiler profiler_;
  cuda::OpProfiler* prof_ = nullptr;  // &profiler_ while profiling
  mutable bool probed_ = false;
  mutable std::string reason_;
};

}  // inline namespace cuda_runtime_world / emulation_world

}  // namespace diffuse::backend
