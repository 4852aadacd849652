// 2-D convolution on the device, the same function as the CPU backend's diffuse::conv2d
// (ops/conv2d.hpp) without the bias (bias add and its gradient are row-bias kernels):
//
//   x  [N, H, W, C]   activations, NHWC
//   w  [O, kh, kw, C] the weight in cuDNN's NHWC filter format ("OHWI" / KRSC): the device layout.
//                     Checkpoints and the CPU backend keep PyTorch's [O, C, kh, kw] ("OIHW");
//                     convert with conv_weight_*_host below or kernels/conv_weight.cuh.
//   y  [N, Ho, Wo, O] Ho = (H + 2 pad_h - kh) / stride_h + 1, likewise Wo
//
//   diffuse::cuda::Dnn dnn;                       // cuDNN handle (+ its stream, + a workspace)
//   diffuse::cuda::Conv2dPlans plans;             // one plan per shape, made on first use
//   const auto& p = plans.get(dnn, {.N = 8, .H = 32, .W = 32, .C = 64, .O = 64, .kh = 3, .kw = 3,
//                                   .pad_h = 1, .pad_w = 1});
//   p.forward(dnn, x, w, y);                      // y  = conv(x, w)
//   p.backward_data(dnn, dy, w, dx, accumulate);  // dx = (or +=) dL/dx
//   p.backward_filter(dnn, x, dy, dw);            // dw += dL/dw (a parameter gradient)
//
// A plan made with MathMode::BF16 takes bf16 tensors instead (the same layouts) and always writes
// its result (no accumulate: the caller adds a bf16 result into its float gradient in float,
// kernels/convert.cuh); the float methods refuse it, and a float plan refuses bf16 tensors.
//
// Two implementations behind the same API:
//   - with cuDNN (DIFFUSE_WITH_CUDNN, i.e. linked through diffuse::cuda, under nvcc or in host
//     code compiled with the CUDA headers): the legacy cuDNN convolution API on float NHWC tensors.
//     A plan chooses each direction's algorithm once (heuristics, or timing them); the workspace
//     is the caller's or the Dnn's (a DeviceBuffer from the caching allocator that grows to the
//     largest request). Queued on the Dnn's stream, asynchronous.
//   - without the CUDA runtime (the CPU emulation world, where "device" pointers are host
//     pointers): direct loops on the host in the same layouts, accumulating in double, so code
//     that drives convolutions runs (and is tested) on the CPU. TF32 and the algorithm options
//     have no effect there (BF16 does: bf16 tensors); no workspace is needed.
// DIFFUSE_CUDA_CONV says which: 1 cuDNN, 2 host loops, 0 neither (CUDA without cuDNN: only the
// shape and the weight layout helpers are declared).
//
// Numerics (cuDNN): MathMode::FP32 sets CUDNN_FMA_MATH (cuDNN's default math would allow TF32 on
// Ampere and newer); TF32 lets tensor cores round the inputs to 10 mantissa bits. By default only
// algorithms that form every output as a plain sum of products are used (implicit / explicit
// GEMM, direct; not FFT or Winograd, whose transforms round the inputs), so in FP32 the results
// differ from the CPU's only by the order of summation; allow_fft_winograd trades that for speed.
// BF16: bf16 tensors (CUDNN_DATA_BFLOAT16), float accumulation (the convolution's compute type),
// tensor cores; the output is rounded to bf16. The host loops do exactly that: bf16 operands,
// double sums, the result rounded to float and then to bf16.
#pragma once

#include <diffuse/backend/capture_state.hpp>

#include <diffuse/backend/cuda/bf16.hpp>
#include <diffuse/backend/cuda/check.hpp>
#include <diffuse/backend/cuda/math_mode.hpp>
#include <diffuse/core/parallel.hpp>

#include <algorithm>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if DIFFUSE_HAVE_CUDNN && defined(DIFFUSE_WITH_CUDNN)
#define DIFFUSE_CUDA_CONV 1
#include <diffuse/backend/cuda/memory.hpp>
#elif !DIFFUSE_HAVE_CUDA_RUNTIME
#define DIFFUSE_CUDA_CONV 2
#include <diffuse/backend/cuda/launch.hpp>  // cuda::stream_t of the emulation
#else
#define DIFFUSE_CUDA_CONV 0
#endif

namespace diffuse::cuda {

// ---------------------------------------------------------------- shapes and weight layouts

// One convolution's sizes (all elements counts). Zero padding on both sides of each axis.
struct Conv2dShape {
  std::int64_t N = 0, H = 0, W = 0, C = 0, O = 0, kh = 0, kw = 0;
  std::int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0;

  std::int64_t Ho() const { return (H + 2 * pad_h - kh) / stride_h + 1; }
  std::int64_t Wo() const { return (W + 2 * pad_w - kw) / stride_w + 1; }
  std::int64_t x_elements() const { return N * H * W * C; }
  std::int64_t w_elements() const { return O * kh * kw * C; }
  std::int64_t y_elements() const { return N * Ho() * Wo() * O; }

  std::string str() const {
    auto s = [](std::int64_t v) { return std::to_string(v); };
    return "x [" + s(N) + ", " + s(H) + ", " + s(W) + ", " + s(C) + "], weight " + s(O) + "x" + s(C) + "x" + s(kh) +
           "x" + s(kw) + ", stride " + s(stride_h) + "x" + s(stride_w) + ", padding " + s(pad_h) + "x" + s(pad_w);
  }
  // Throws std::invalid_argument for what the CPU conv2d rejects. N may be 0 (nothing to do).
  void validate() const {
    if (N < 0 || H < 1 || W < 1 || C < 1 || O < 1 || kh < 1 || kw < 1)
      throw std::invalid_argument("diffuse::cuda conv2d: sizes must be positive (N may be 0): " + str());
    if (stride_h < 1 || stride_w < 1 || pad_h < 0 || pad_w < 0)
      throw std::invalid_argument("diffuse::cuda conv2d: stride must be >= 1 and padding >= 0: " + str());
    if (H + 2 * pad_h < kh || W + 2 * pad_w < kw)
      throw std::invalid_argument("diffuse::cuda conv2d: kernel larger than the padded input: " + str());
  }

  auto operator<=>(const Conv2dShape&) const = default;
};

// ohwi [O, kh, kw, C] = oihw [O, C, kh, kw] (host memory, not overlapping).
template <class T>
inline void conv_weight_oihw_to_ohwi_host(const T* oihw, T* ohwi, std::int64_t O, std::int64_t C, std::int64_t kh,
                                          std::int64_t kw) {
  const std::int64_t taps = kh * kw;
  for (std::int64_t o = 0; o < O; ++o)
    for (std::int64_t t = 0; t < taps; ++t)
      for (std::int64_t c = 0; c < C; ++c) ohwi[(o * taps + t) * C + c] = oihw[(o * C + c) * taps + t];
}

// oihw [O, C, kh, kw] = ohwi [O, kh, kw, C] (host memory, not overlapping).
template <class T>
inline void conv_weight_ohwi_to_oihw_host(const T* ohwi, T* oihw, std::int64_t O, std::int64_t C, std::int64_t kh,
                                          std::int64_t kw) {
  const std::int64_t taps = kh * kw;
  for (std::int64_t o = 0; o < O; ++o)
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t t = 0; t < taps; ++t) oihw[(o * C + c) * taps + t] = ohwi[(o * taps + t) * C + c];
}

template <class T>
inline std::vector<T> conv_weight_oihw_to_ohwi_host(const std::vector<T>& oihw, std::int64_t O, std::int64_t C,
                                                    std::int64_t kh, std::int64_t kw) {
  if (static_cast<std::int64_t>(oihw.size()) != O * C * kh * kw)
    throw std::invalid_argument("conv_weight_oihw_to_ohwi_host: " + std::to_string(oihw.size()) +
                                " elements for a weight of " + std::to_string(O * C * kh * kw));
  std::vector<T> out(oihw.size());
  conv_weight_oihw_to_ohwi_host(oihw.data(), out.data(), O, C, kh, kw);
  return out;
}

template <class T>
inline std::vector<T> conv_weight_ohwi_to_oihw_host(const std::vector<T>& ohwi, std::int64_t O, std::int64_t C,
                                                    std::int64_t kh, std::int64_t kw) {
  if (static_cast<std::int64_t>(ohwi.size()) != O * C * kh * kw)
    throw std::invalid_argument("conv_weight_ohwi_to_oihw_host: " + std::to_string(ohwi.size()) +
                                " elements for a weight of " + std::to_string(O * C * kh * kw));
  std::vector<T> out(ohwi.size());
  conv_weight_ohwi_to_oihw_host(ohwi.data(), out.data(), O, C, kh, kw);
  return out;
}

namespace detail {
// A plan's tensors are float or, under MathMode::BF16, bf16; the methods of the other type refuse it.
inline void check_conv_dtype(bool plan_bf16, bool call_bf16, const char* what) {
  if (plan_bf16 != call_bf16)
    throw std::logic_error(std::string("diffuse::cuda::Conv2dPlan::") + what + ": " +
                           (call_bf16 ? "bf16 tensors for a float plan (make the plan with MathMode::BF16)"
                                      : "float tensors for a MathMode::BF16 plan (its tensors are bf16)"));
}
}  // namespace detail

// How a plan picks its algorithms (cuDNN only).
enum class ConvSearch {
  Heuristic,  // cudnnGet*Algorithm_v7: cuDNN's ranking, no device work
  Benchmark,  // cudnnFind*Algorithm: times the candidates once (synchronous, allocates its own scratch)
};

struct Conv2dPlanOptions {
  MathMode math = MathMode::FP32;
  ConvSearch search = ConvSearch::Heuristic;
  std::size_t max_workspace_bytes = std::size_t(512) << 20;  // algorithms needing more are skipped
  bool allow_fft_winograd = false;  // see the header comment; if no other algorithm fits, they are used anyway

  auto operator<=>(const Conv2dPlanOptions&) const = default;
};

#if DIFFUSE_CUDA_CONV == 1
// ---------------------------------------------------------------- cuDNN
namespace detail {

inline int dnn_int(std::int64_t v, const char* what) {
  if (v < 0 || v > std::numeric_limits<int>::max())
    throw std::invalid_argument(std::string("diffuse::cuda conv2d: ") + what + " " + std::to_string(v) +
                                " does not fit cuDNN's int");
  return static_cast<int>(v);
}

// Move-only owners of the three cuDNN descriptor kinds.
template <class H, cudnnStatus_t (*Create)(H*), cudnnStatus_t (*Destroy)(H)>
class DnnDescriptor {
 public:
  DnnDescriptor() { check_cudnn(Create(&d_), "cudnnCreate*Descriptor", __FILE__, __LINE__); }
  DnnDescriptor(const DnnDescriptor&) = delete;
  DnnDescriptor& operator=(const DnnDescriptor&) = delete;
  DnnDescriptor(DnnDescriptor&& o) noexcept : d_(std::exchange(o.d_, nullptr)) {}
  DnnDescriptor& operator=(DnnDescriptor&& o) noexcept {
    if (this != &o) {
      if (d_) (void)Destroy(d_);
      d_ = std::exchange(o.d_, nullptr);
    }
    return *this;
  }
  ~DnnDescriptor() {
    if (d_) (void)Destroy(d_);
  }
  H get() const noexcept { return d_; }
  operator H() const noexcept { return d_; }

 private:
  H d_ = nullptr;
};

}  // namespace detail

// The classes differ between the two worlds; inline namespaces keep a program that links a
// translation unit of each from silently merging two classes of one name (as blas.hpp does).
inline namespace cudnn_world {

// A cuDNN handle with the stream its work is queued on, and a workspace for plans called without
// one. Move-only; one per device (and per host thread using it at the same time).
class Dnn {
 public:
  Dnn() { DIFFUSE_CUDNN_CHECK(cudnnCreate(&h_)); }
  explicit Dnn(cudaStream_t stream) : Dnn() { set_stream(stream); }
  Dnn(const Dnn&) = delete;
  Dnn& operator=(const Dnn&) = delete;
  Dnn(Dnn&& o) noexcept
      : h_(std::exchange(o.h_, nullptr)), stream_(std::exchange(o.stream_, nullptr)), ws_(std::move(o.ws_)) {}
  Dnn& operator=(Dnn&& o) noexcept {
    if (this != &o) {
      if (h_) (void)cudnnDestroy(h_);
      h_ = std::exchange(o.h_, nullptr);
      stream_ = std::exchange(o.stream_, nullptr);
      ws_ = std::move(o.ws_);
    }
    return *this;
  }
  ~Dnn() {
    if (h_) (void)cudnnDestroy(h_);
  }

  void set_stream(cudaStream_t stream) {
    DIFFUSE_CUDNN_CHECK(cudnnSetStream(h_, stream));
    stream_ = stream;
  }
  cudaStream_t stream() const noexcept { return stream_; }
  cudnnHandle_t get() const noexcept { return h_; }
  operator cudnnHandle_t() const noexcept { return h_; }

  // At least `bytes` of device scratch, valid until the next call that asks for more. The old
  // block goes back to the caching allocator, which is safe under its single-stream-order rule
  // (allocator.hpp): work already queued that uses it runs before any later user.
  void* workspace(std::size_t bytes) {
    if (bytes > ws_.size()) {
      ws_.reset();
      ws_ = DeviceBuffer<unsigned char>(bytes);
    }
    return ws_.data();
  }
  std::size_t workspace_size() const noexcept { return ws_.size(); }
  // Gives the workspace back now (the next workspace() call makes a new one).
  void release_workspace() { ws_.reset(); }

 private:
  cudnnHandle_t h_ = nullptr;
  cudaStream_t stream_ = nullptr;
  DeviceBuffer<unsigned char> ws_;
};

// A float (or bf16) NHWC activation tensor [N, H, W, C].
class TensorDescriptor
    : public detail::DnnDescriptor<cudnnTensorDescriptor_t, cudnnCreateTensorDescriptor, cudnnDestroyTensorDescriptor> {
 public:
  TensorDescriptor() = default;
  TensorDescriptor(std::int64_t N, std::int64_t H, std::int64_t W, std::int64_t C,
                   cudnnDataType_t type = CUDNN_DATA_FLOAT) {
    DIFFUSE_CUDNN_CHECK(cudnnSetTensor4dDescriptor(get(), CUDNN_TENSOR_NHWC, type, detail::dnn_int(N, "N"),
                                                   detail::dnn_int(C, "C"), detail::dnn_int(H, "H"),
                                                   detail::dnn_int(W, "W")));
  }
};

// A float (or bf16) filter in the NHWC filter format: memory [O, kh, kw, C].
class FilterDescriptor
    : public detail::DnnDescriptor<cudnnFilterDescriptor_t, cudnnCreateFilterDescriptor, cudnnDestroyFilterDescriptor> {
 public:
  FilterDescriptor() = default;
  FilterDescriptor(std::int64_t O, std::int64_t C, std::int64_t kh, std::int64_t kw,
                   cudnnDataType_t type = CUDNN_DATA_FLOAT) {
    DIFFUSE_CUDNN_CHECK(cudnnSetFilter4dDescriptor(get(), type, CUDNN_TENSOR_NHWC, detail::dnn_int(O, "O"),
                                                   detail::dnn_int(C, "C"), detail::dnn_int(kh, "kh"),
                                                   detail::dnn_int(kw, "kw")));
  }
};

// Cross-correlation (PyTorch's conv2d), float accumulation, no dilation, one group.
class ConvolutionDescriptor
    : public detail::DnnDescriptor<cudnnConvolutionDescriptor_t, cudnnCreateConvolutionDescriptor,
                                   cudnnDestroyConvolutionDescriptor> {
 public:
  ConvolutionDescriptor() = default;
  ConvolutionDescriptor(const Conv2dShape& s, cudnnMathType_t math) {
    DIFFUSE_CUDNN_CHECK(cudnnSetConvolution2dDescriptor(get(), detail::dnn_int(s.pad_h, "pad_h"),
                                                        detail::dnn_int(s.pad_w, "pad_w"),
                                                        detail::dnn_int(s.stride_h, "stride_h"),
                                                        detail::dnn_int(s.stride_w, "stride_w"), 1, 1,
                                                        CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT));
    set_math(math);
  }
  void set_math(cudnnMathType_t math) { DIFFUSE_CUDNN_CHECK(cudnnSetConvolutionMathType(get(), math)); }
};

// One convolution shape with its descriptors and the algorithm (and workspace size) chosen for
// each direction. The methods take device pointers (float, the layouts of the header comment) and
// queue the work on dnn's stream; `workspace` (or, when null, dnn.workspace()) must hold at least
// the direction's bytes. A plan may be used with any Dnn of the device it was made on; const
// methods, but one Dnn must not be used by two host threads at once.
class Conv2dPlan {
 public:
  Conv2dPlan(Dnn& dnn, const Conv2dShape& shape, const Conv2dPlanOptions& options = {})
      : s_(shape), opt_(options), bf16_(options.math == MathMode::BF16) {
    s_.validate();
    if (s_.N == 0) return;  // nothing to run; cuDNN descriptors need positive sizes
    const cudnnMathType_t math = opt_.math == MathMode::FP32 ? CUDNN_FMA_MATH : CUDNN_TENSOR_OP_MATH;
    const cudnnDataType_t type = bf16_ ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_FLOAT;
    x_ = TensorDescriptor(s_.N, s_.H, s_.W, s_.C, type);
    y_ = TensorDescriptor(s_.N, s_.Ho(), s_.Wo(), s_.O, type);
    w_ = FilterDescriptor(s_.O, s_.C, s_.kh, s_.kw, type);
    fwd_ = ConvolutionDescriptor(s_, math);
    bwd_data_ = ConvolutionDescriptor(s_, math);
    bwd_filter_ = ConvolutionDescriptor(s_, math);
    int n = 0, c = 0, h = 0, w = 0;
    DIFFUSE_CUDNN_CHECK(cudnnGetConvolution2dForwardOutputDim(fwd_, x_, w_, &n, &c, &h, &w));
    if (n != s_.N || c != s_.O || h != s_.Ho() || w != s_.Wo())
      throw std::logic_error("diffuse::cuda::Conv2dPlan: cuDNN's output shape differs from the CPU's for " + s_.str());
    choose_forward(dnn);
    choose_backward_data(dnn);
    choose_backward_filter(dnn);
  }

  const Conv2dShape& shape() const noexcept { return s_; }
  const Conv2dPlanOptions& options() const noexcept { return opt_; }
  // Workspace bytes each direction needs, and the most of them.
  std::size_t forward_workspace_bytes() const noexcept { return fwd_bytes_; }
  std::size_t backward_data_workspace_bytes() const noexcept { return bwd_data_bytes_; }
  std::size_t backward_filter_workspace_bytes() const noexcept { return bwd_filter_bytes_; }
  std::size_t workspace_bytes() const noexcept {
    return std::max(fwd_bytes_, std::max(bwd_data_bytes_, bwd_filter_bytes_));
  }
  // The chosen algorithms, for logs: e.g. "fwd IMPLICIT_PRECOMP_GEMM/FMA, bwd_data ALGO_1/FMA, ...".
  std::string algorithms() const {
    if (s_.N == 0) return "none (N = 0)";
    static const char* const fwd[] = {"IMPLICIT_GEMM", "IMPLICIT_PRECOMP_GEMM", "GEMM", "DIRECT",
                                      "FFT", "FFT_TILING", "WINOGRAD", "WINOGRAD_NONFUSED"};
    static const char* const data[] = {"ALGO_0", "ALGO_1", "FFT", "FFT_TILING", "WINOGRAD", "WINOGRAD_NONFUSED"};
    static const char* const filter[] = {"ALGO_0", "ALGO_1", "FFT", "ALGO_3", "WINOGRAD", "WINOGRAD_NONFUSED",
                                         "FFT_TILING"};
    auto name = [](const char* const* names, int count, int a) {
      return a >= 0 && a < count ? std::string(names[a]) : std::to_string(a);
    };
    return "fwd " + name(fwd, 8, fwd_algo_) + "/" + math_name(fwd_math_) + ", bwd_data " +
           name(data, 6, bwd_data_algo_) + "/" + math_name(bwd_data_math_) + ", bwd_filter " +
           name(filter, 7, bwd_filter_algo_) + "/" + math_name(bwd_filter_math_);
  }

  // y [N, Ho, Wo, O] = conv(x, w).
  void forward(Dnn& dnn, const float* x, const float* w, float* y, void* workspace = nullptr,
               std::size_t workspace_bytes = 0) const {
    detail::check_conv_dtype(bf16_, false, "forward");
    run_forward(dnn, x, w, y, workspace, workspace_bytes);
  }
  // dx [N, H, W, C] = (accumulate: +=) the gradient of the input for the output gradient dy.
  void backward_data(Dnn& dnn, const float* dy, const float* w, float* dx, bool accumulate = false,
                     void* workspace = nullptr, std::size_t workspace_bytes = 0) const {
    detail::check_conv_dtype(bf16_, false, "backward_data");
    run_backward_data(dnn, dy, w, dx, accumulate, workspace, workspace_bytes);
  }
  // dw [O, kh, kw, C] += the gradient of the weight (accumulate = false: dw =).
  void backward_filter(Dnn& dnn, const float* x, const float* dy, float* dw, void* workspace = nullptr,
                       std::size_t workspace_bytes = 0, bool accumulate = true) const {
    detail::check_conv_dtype(bf16_, false, "backward_filter");
    run_backward_filter(dnn, x, dy, dw, accumulate, workspace, workspace_bytes);
  }
  // The same three on bf16 tensors (a MathMode::BF16 plan); each writes its result.
  void forward(Dnn& dnn, const bf16* x, const bf16* w, bf16* y, void* workspace = nullptr,
               std::size_t workspace_bytes = 0) const {
    detail::check_conv_dtype(bf16_, true, "forward");
    run_forward(dnn, x, w, y, workspace, workspace_bytes);
  }
  void backward_data(Dnn& dnn, const bf16* dy, const bf16* w, bf16* dx, void* workspace = nullptr,
                     std::size_t workspace_bytes = 0) const {
    detail::check_conv_dtype(bf16_, true, "backward_data");
    run_backward_data(dnn, dy, w, dx, false, workspace, workspace_bytes);
  }
  void backward_filter(Dnn& dnn, const bf16* x, const bf16* dy, bf16* dw, void* workspace = nullptr,
                       std::size_t workspace_bytes = 0) const {
    detail::check_conv_dtype(bf16_, true, "backward_filter");
    run_backward_filter(dnn, x, dy, dw, false, workspace, workspace_bytes);
  }
  bool bf16_tensors() const noexcept { return bf16_; }

 private:
  static const char* math_name(cudnnMathType_t m) {
    switch (m) {
      case CUDNN_DEFAULT_MATH: return "DEFAULT";
      case CUDNN_TENSOR_OP_MATH: return "TENSOR_OP";
      case CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION: return "TENSOR_OP_ALLOW_CONVERSION";
      case CUDNN_FMA_MATH: return "FMA";
    }
    return "?";
  }

  // The cuDNN calls, on float or bf16 tensors as the descriptors say; alpha and beta are float
  // for both (cuDNN's rule for float compute).
  void run_forward(Dnn& dnn, const void* x, const void* w, void* y, void* workspace, std::size_t workspace_bytes) const {
    if (s_.N == 0) return;
    void* ws = resolve(dnn, fwd_bytes_, workspace, workspace_bytes, "forward");
    const float one = 1.0f, zero = 0.0f;
    DIFFUSE_CUDNN_CHECK(cudnnConvolutionForward(dnn, &one, x_, x, w_, w, fwd_, fwd_algo_, ws, fwd_bytes_, &zero, y_, y));
  }
  void run_backward_data(Dnn& dnn, const void* dy, const void* w, void* dx, bool accumulate, void* workspace,
                         std::size_t workspace_bytes) const {
    if (s_.N == 0) return;
    void* ws = resolve(dnn, bwd_data_bytes_, workspace, workspace_bytes, "backward_data");
    const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    DIFFUSE_CUDNN_CHECK(cudnnConvolutionBackwardData(dnn, &one, w_, w, y_, dy, bwd_data_, bwd_data_algo_, ws,
                                                     bwd_data_bytes_, &beta, x_, dx));
  }
  void run_backward_filter(Dnn& dnn, const void* x, const void* dy, void* dw, bool accumulate, void* workspace,
                           std::size_t workspace_bytes) const {
    if (s_.N == 0) return;
    void* ws = resolve(dnn, bwd_filter_bytes_, workspace, workspace_bytes, "backward_filter");
    const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    DIFFUSE_CUDNN_CHECK(cudnnConvolutionBackwardFilter(dnn, &one, x_, x, y_, dy, bwd_filter_, bwd_filter_algo_, ws,
                                                       bwd_filter_bytes_, &beta, w_, dw));
  }

  void* resolve(Dnn& dnn, std::size_t need, void* workspace, std::size_t bytes, const char* what) const {
    if (need == 0) return workspace;
    if (!workspace) return dnn.workspace(need);
    if (bytes < need)
      throw std::invalid_argument(std::string("diffuse::cuda::Conv2dPlan::") + what + ": workspace of " +
                                  std::to_string(bytes) + " bytes, the algorithm needs " + std::to_string(need));
    return workspace;
  }

  // Plain sums of products (no FFT / Winograd transform of the inputs).
  static bool plain_sum(cudnnConvolutionFwdAlgo_t a) {
    return a == CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM || a == CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM ||
           a == CUDNN_CONVOLUTION_FWD_ALGO_GEMM || a == CUDNN_CONVOLUTION_FWD_ALGO_DIRECT;
  }
  static bool plain_sum(cudnnConvolutionBwdDataAlgo_t a) {
    return a == CUDNN_CONVOLUTION_BWD_DATA_ALGO_0 || a == CUDNN_CONVOLUTION_BWD_DATA_ALGO_1;
  }
  static bool plain_sum(cudnnConvolutionBwdFilterAlgo_t a) {
    return a == CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0 || a == CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1 ||
           a == CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3;
  }

  // The first usable candidate of cuDNN's ranking: succeeded, within the workspace limit, of the
  // requested math (FP32: never tensor-op math; never ALLOW_CONVERSION, which may round float
  // inputs to half), a plain sum unless allowed otherwise (falling back to any if none is).
  // Sets desc's math type to the candidate's; ws_bytes(algo, &bytes) asks cuDNN for the workspace.
  template <class Perf, class Algo, class WsBytes>
  void choose(const Perf* perf, int count, ConvolutionDescriptor& desc, WsBytes ws_bytes, Algo& algo,
              std::size_t& bytes, cudnnMathType_t& math, const char* what) {
    for (int pass = 0; pass < 2; ++pass) {
      const bool any = pass == 1 || opt_.allow_fft_winograd;
      for (int i = 0; i < count; ++i) {
        const Perf& p = perf[i];
        if (p.status != CUDNN_STATUS_SUCCESS || p.memory > opt_.max_workspace_bytes) continue;
        if (!any && !plain_sum(p.algo)) continue;
        if (p.mathType == CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION) continue;
        if (opt_.math == MathMode::FP32 && p.mathType == CUDNN_TENSOR_OP_MATH) continue;
        const cudnnMathType_t m = opt_.math == MathMode::FP32 ? CUDNN_FMA_MATH : p.mathType;
        desc.set_math(m);
        std::size_t b = 0;
        if (ws_bytes(p.algo, &b) != CUDNN_STATUS_SUCCESS || b > opt_.max_workspace_bytes) continue;
        algo = p.algo;
        bytes = b;
        math = m;
        return;
      }
      if (any) break;
    }
    throw std::runtime_error(std::string("diffuse::cuda::Conv2dPlan: cuDNN offers no ") + what +
                             " algorithm within " + std::to_string(opt_.max_workspace_bytes) +
                             " bytes of workspace for " + s_.str());
  }

  void choose_forward(Dnn& dnn) {
    constexpr int kMax = CUDNN_CONVOLUTION_FWD_ALGO_COUNT;
    cudnnConvolutionFwdAlgoPerf_t perf[kMax];
    int count = 0;
    if (opt_.search == ConvSearch::Benchmark)
      DIFFUSE_CUDNN_CHECK(cudnnFindConvolutionForwardAlgorithm(dnn, x_, w_, fwd_, y_, kMax, &count, perf));
    else
      DIFFUSE_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithm_v7(dnn, x_, w_, fwd_, y_, kMax, &count, perf));
    choose(
        perf, count, fwd_,
        [&](cudnnConvolutionFwdAlgo_t a, std::size_t* b) {
          return cudnnGetConvolutionForwardWorkspaceSize(dnn, x_, w_, fwd_, y_, a, b);
        },
        fwd_algo_, fwd_bytes_, fwd_math_, "forward");
  }
  void choose_backward_data(Dnn& dnn) {
    constexpr int kMax = CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT;
    cudnnConvolutionBwdDataAlgoPerf_t perf[kMax];
    int count = 0;
    if (opt_.search == ConvSearch::Benchmark)
      DIFFUSE_CUDNN_CHECK(
          cudnnFindConvolutionBackwardDataAlgorithm(dnn, w_, y_, bwd_data_, x_, kMax, &count, perf));
    else
      DIFFUSE_CUDNN_CHECK(
          cudnnGetConvolutionBackwardDataAlgorithm_v7(dnn, w_, y_, bwd_data_, x_, kMax, &count, perf));
    choose(
        perf, count, bwd_data_,
        [&](cudnnConvolutionBwdDataAlgo_t a, std::size_t* b) {
          return cudnnGetConvolutionBackwardDataWorkspaceSize(dnn, w_, y_, bwd_data_, x_, a, b);
        },
        bwd_data_algo_, bwd_data_bytes_, bwd_data_math_, "backward-data");
  }
  void choose_backward_filter(Dnn& dnn) {
    constexpr int kMax = CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT;
    cudnnConvolutionBwdFilterAlgoPerf_t perf[kMax];
    int count = 0;
    if (opt_.search == ConvSearch::Benchmark)
      DIFFUSE_CUDNN_CHECK(
          cudnnFindConvolutionBackwardFilterAlgorithm(dnn, x_, y_, bwd_filter_, w_, kMax, &count, perf));
    else
      DIFFUSE_CUDNN_CHECK(
          cudnnGetConvolutionBackwardFilterAlgorithm_v7(dnn, x_, y_, bwd_filter_, w_, kMax, &count, perf));
    choose(
        perf, count, bwd_filter_,
        [&](cudnnConvolutionBwdFilterAlgo_t a, std::size_t* b) {
          return cudnnGetConvolutionBackwardFilterWorkspaceSize(dnn, x_, y_, bwd_filter_, w_, a, b);
        },
        bwd_filter_algo_, bwd_filter_bytes_, bwd_filter_math_, "backward-filter");
  }

  Conv2dShape s_;
  Conv2dPlanOptions opt_;
  bool bf16_ = false;  // MathMode::BF16: the tensors are bf16
  TensorDescriptor x_, y_;
  FilterDescriptor w_;
  ConvolutionDescriptor fwd_, bwd_data_, bwd_filter_;  // one each: their math types may differ (TF32)
  cudnnConvolutionFwdAlgo_t fwd_algo_ = CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM;
  cudnnConvolutionBwdDataAlgo_t bwd_data_algo_ = CUDNN_CONVOLUTION_BWD_DATA_ALGO_0;
  cudnnConvolutionBwdFilterAlgo_t bwd_filter_algo_ = CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0;
  cudnnMathType_t fwd_math_ = CUDNN_FMA_MATH, bwd_data_math_ = CUDNN_FMA_MATH, bwd_filter_math_ = CUDNN_FMA_MATH;
  std::size_t fwd_bytes_ = 0, bwd_data_bytes_ = 0, bwd_filter_bytes_ = 0;
};

#elif DIFFUSE_CUDA_CONV == 2
// ---------------------------------------------------------------- host loops (CPU emulation)
namespace detail {

// The direct definitions. Sums in double: the fallback is then at least as accurate as the CPU
// backend (float GEMM), so a comparison with it measures the CPU's rounding only. Loads and
// stores go through float (static_cast<float>, static_cast<T>), as the kernels' do.
template <class T>
inline void conv2d_forward_host(const Conv2dShape& s, const T* x, const T* w, T* y) {
  const std::int64_t Ho = s.Ho(), Wo = s.Wo(), P = s.N * Ho * Wo, C = s.C;
  // Eight output channels at a time: eight independent sums (one sum is bound by the latency of
  // its additions), each still in the order of the direct definition, so the same numbers.
  constexpr std::int64_t kBlock = 8;
  parallel_for(P, P * s.O * s.kh * s.kw * C >= (std::int64_t(1) << 20), [&](std::int64_t p) {
    const std::int64_t n = p / (Ho * Wo), oy = p / Wo % Ho, ox = p % Wo;
    for (std::int64_t o0 = 0; o0 < s.O; o0 += kBlock) {
      const std::int64_t nb = std::min(kBlock, s.O - o0);
      double acc[kBlock] = {};
      for (std::int64_t ky = 0; ky < s.kh; ++ky) {
        const std::int64_t iy = oy * s.stride_h - s.pad_h + ky;
        if (iy < 0 || iy >= s.H) continue;
        for (std::int64_t kx = 0; kx < s.kw; ++kx) {
          const std::int64_t ix = ox * s.stride_w - s.pad_w + kx;
          if (ix < 0 || ix >= s.W) continue;
          const T* xr = x + ((n * s.H + iy) * s.W + ix) * C;
          const T* wr = w + ((o0 * s.kh + ky) * s.kw + kx) * C;
          const std::int64_t wstep = s.kh * s.kw * C;  // from one output channel's weights to the next
          if (nb == kBlock) {
            for (std::int64_t c = 0; c < C; ++c) {
              const double xv = static_cast<float>(xr[c]);
              for (std::int64_t b = 0; b < kBlock; ++b) acc[b] += xv * static_cast<double>(static_cast<float>(wr[b * wstep + c]));
            }
          } else {
            for (std::int64_t c = 0; c < C; ++c) {
              const double xv = static_cast<float>(xr[c]);
              for (std::int64_t b = 0; b < nb; ++b) acc[b] += xv * static_cast<double>(static_cast<float>(wr[b * wstep + c]));
            }
          }
        }
      }
      for (std::int64_t b = 0; b < nb; ++b) y[p * s.O + o0 + b] = static_cast<T>(static_cast<float>(acc[b]));
    }
  });
}

// Gathers over the output pixels each input pixel feeds, so threads never write the same dx.
template <class T>
inline void conv2d_backward_data_host(const Conv2dShape& s, const T* dy, const T* w, T* dx, bool accumulate) {
  const std::int64_t Ho = s.Ho(), Wo = s.Wo(), Q = s.N * s.H * s.W, C = s.C;
  parallel_region(loop_threads(Q, Q * s.O * s.kh * s.kw * C >= (std::int64_t(1) << 20)), [&](int th, int team) {
    std::vector<double> acc(static_cast<std::size_t>(C));
    const auto [q0, q1] = static_range(Q, th, team);
    for (std::int64_t q = q0; q < q1; ++q) {
      const std::int64_t n = q / (s.H * s.W), iy = q / s.W % s.H, ix = q % s.W;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (std::int64_t ky = 0; ky < s.kh; ++ky) {
        const std::int64_t ty = iy + s.pad_h - ky;  // = oy * stride_h
        if (ty < 0 || ty % s.stride_h != 0 || ty / s.stride_h >= Ho) continue;
        for (std::int64_t kx = 0; kx < s.kw; ++kx) {
          const std::int64_t tx = ix + s.pad_w - kx;
          if (tx < 0 || tx % s.stride_w != 0 || tx / s.stride_w >= Wo) continue;
          const T* dyr = dy + ((n * Ho + ty / s.stride_h) * Wo + tx / s.stride_w) * s.O;
          for (std::int64_t o = 0; o < s.O; ++o) {
            const double g = static_cast<float>(dyr[o]);
            const T* wr = w + ((o * s.kh + ky) * s.kw + kx) * C;
            for (std::int64_t c = 0; c < C; ++c) acc[c] += g * static_cast<double>(static_cast<float>(wr[c]));
          }
        }
      }
      T* d = dx + q * C;
      for (std::int64_t c = 0; c < C; ++c)
        d[c] = static_cast<T>(static_cast<float>(accumulate ? static_cast<double>(static_cast<float>(d[c])) + acc[c]
                                                            : acc[c]));
    }
  });
}

// One output channel per iteration: each owns its dw rows.
template <class T>
inline void conv2d_backward_filter_host(const Conv2dShape& s, const T* x, const T* dy, T* dw, bool accumulate) {
  const std::int64_t Ho = s.Ho(), Wo = s.Wo(), C = s.C, K = s.kh * s.kw * C;
  parallel_region(loop_threads(s.O, s.N * Ho * Wo * s.O * K >= (std::int64_t(1) << 20)), [&](int th, int team) {
    std::vector<double> acc(static_cast<std::size_t>(K));
    const auto [o0, o1] = static_range(s.O, th, team);
    for (std::int64_t o = o0; o < o1; ++o) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (std::int64_t n = 0; n < s.N; ++n)
        for (std::int64_t oy = 0; oy < Ho; ++oy)
          for (std::int64_t ox = 0; ox < Wo; ++ox) {
            const double g = static_cast<float>(dy[((n * Ho + oy) * Wo + ox) * s.O + o]);
            for (std::int64_t ky = 0; ky < s.kh; ++ky) {
              const std::int64_t iy = oy * s.stride_h - s.pad_h + ky;
              if (iy < 0 || iy >= s.H) continue;
              for (std::int64_t kx = 0; kx < s.kw; ++kx) {
                const std::int64_t ix = ox * s.stride_w - s.pad_w + kx;
                if (ix < 0 || ix >= s.W) continue;
                const T* xr = x + ((n * s.H + iy) * s.W + ix) * C;
                double* a = acc.data() + (ky * s.kw + kx) * C;
                for (std::int64_t c = 0; c < C; ++c) a[c] += g * static_cast<double>(static_cast<float>(xr[c]));
              }
            }
          }
      T* d = dw + o * K;
      for (std::int64_t i = 0; i < K; ++i)
        d[i] = static_cast<T>(static_cast<float>(accumulate ? static_cast<double>(static_cast<float>(d[i])) + acc[i] : acc[i]));
    }
  });
}

}  // namespace detail

inline namespace host_world {  // see cudnn_world

// Stands in for the cuDNN handle: holds the stream (ignored, as the emulation ignores streams).
class Dnn {
 public:
  Dnn() = default;
  explicit Dnn(stream_t stream) : stream_(stream) {}
  Dnn(const Dnn&) = delete;
  Dnn& operator=(const Dnn&) = delete;
  Dnn(Dnn&&) noexcept = default;
  Dnn& operator=(Dnn&&) noexcept = default;

  void set_stream(stream_t stream) noexcept { stream_ = stream; }
  stream_t stream() const noexcept { return stream_; }
  void* workspace(std::size_t) noexcept { return nullptr; }
  std::size_t workspace_size() const noexcept { return 0; }
  void release_workspace() noexcept {}

 private:
  stream_t stream_ = nullptr;
};

// The same interface as the cuDNN plan (see there); the work runs on the host before the call
// returns. Needs no workspace: workspace arguments are accepted and ignored.
class Conv2dPlan {
 public:
  Conv2dPlan(Dnn&, const Conv2dShape& shape, const Conv2dPlanOptions& options = {})
      : s_(shape), opt_(options), bf16_(options.math == MathMode::BF16) {
    s_.validate();
  }

  const Conv2dShape& shape() const noexcept { return s_; }
  const Conv2dPlanOptions& options() const noexcept { return opt_; }
  std::size_t forward_workspace_bytes() const noexcept { return 0; }
  std::size_t backward_data_workspace_bytes() const noexcept { return 0; }
  std::size_t backward_filter_workspace_bytes() const noexcept { return 0; }
  std::size_t workspace_bytes() const noexcept { return 0; }
  std::string algorithms() const { return "host loops (double accumulation)"; }

  void forward(Dnn&, const float* x, const float* w, float* y, void* = nullptr, std::size_t = 0) const {
    detail::check_conv_dtype(bf16_, false, "forward");
    if (s_.N > 0) backend::device_work([s = s_, x, w, y] { detail::conv2d_forward_host(s, x, w, y); });
  }
  void backward_data(Dnn&, const float* dy, const float* w, float* dx, bool accumulate = false, void* = nullptr,
                     std::size_t = 0) const {
    detail::check_conv_dtype(bf16_, false, "backward_data");
    if (s_.N > 0) backend::device_work([s = s_, dy, w, dx, accumulate] { detail::conv2d_backward_data_host(s, dy, w, dx, accumulate); });
  }
  void backward_filter(Dnn&, const float* x, const float* dy, float* dw, void* = nullptr, std::size_t = 0,
                       bool accumulate = true) const {
    detail::check_conv_dtype(bf16_, false, "backward_filter");
    if (s_.N > 0) backend::device_work([s = s_, x, dy, dw, accumulate] { detail::conv2d_backward_filter_host(s, x, dy, dw, accumulate); });
  }
  void forward(Dnn&, const bf16* x, const bf16* w, bf16* y, void* = nullptr, std::size_t = 0) const {
    detail::check_conv_dtype(bf16_, true, "forward");
    if (s_.N > 0) backend::device_work([s = s_, x, w, y] { detail::conv2d_forward_host(s, x, w, y); });
  }
  void backward_data(Dnn&, const bf16* dy, const bf16* w, bf16* dx, void* = nullptr, std::size_t = 0) const {
    detail::check_conv_dtype(bf16_, true, "backward_data");
    if (s_.N > 0) backend::device_work([s = s_, dy, w, dx] { detail::conv2d_backward_data_host(s, dy, w, dx, false); });
  }
  void backward_filter(Dnn&, const bf16* x, const bf16* dy, bf16* dw, void* = nullptr, std::size_t = 0) const {
    detail::check_conv_dtype(bf16_, true, "backward_filter");
    if (s_.N > 0) backend::device_work([s = s_, x, dy, dw] { detail::conv2d_backward_filter_host(s, x, dy, dw, false); });
  }
  bool bf16_tensors() const noexcept { return bf16_; }

 private:
  Conv2dShape s_;
  Conv2dPlanOptions opt_;
  bool bf16_ = false;
};
#endif

#if DIFFUSE_CUDA_CONV != 0  // (still inside the world's inline namespace)
// Plans by shape and options, each made (and its algorithms chosen) on first use. References
// stay valid until clear(). Not thread-safe: one cache per host thread (or lock around get()).
class Conv2dPlans {
 public:
  const Conv2dPlan& get(Dnn& dnn, const Conv2dShape& shape, const Conv2dPlanOptions& options = {}) {
    const Key key{shape, options};
    auto it = plans_.find(key);
    if (it == plans_.end()) it = plans_.emplace(key, Conv2dPlan(dnn, shape, options)).first;
    return it->second;
  }
  std::size_t size() const noexcept { return plans_.size(); }
  void clear() noexcept { plans_.clear(); }

 private:
  using Key = std::pair<Conv2dShape, Conv2dPlanOptions>;
  std::map<Key, Conv2dPlan> plans_;
};
}  // inline namespace cudnn_world / host_world
#endif

}  // namespace diffuse::cuda
