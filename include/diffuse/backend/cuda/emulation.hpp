// CPU emulation of the part of the CUDA execution model that diffuse's kernels use, so that the
// same kernel source, compiled by g++ instead of nvcc, runs (and is tested) on the CPU.
//
// Model: the threads of one block are fibers on one host thread, run round-robin;
// each runs until it reaches a barrier, a warp intrinsic or its end. __syncthreads() releases
// when every thread of the block waits at the same call; a warp intrinsic releases when every
// non-exited lane named in its mask waits at the same intrinsic with the same mask (the sm_70+
// rule). Blocks run one after another on each host thread, in parallel over the host threads (core/parallel.hpp).
// Shared memory is storage per block, filled with 0xFF bytes (NaN as float, -1 as int) when a
// block starts, so a kernel that reads it before writing fails its test.
//
// Stricter than hardware, on purpose (all undefined behaviour in CUDA): a thread that exits while
// others wait at __syncthreads(), or threads waiting at different __syncthreads() calls, raise
// std::logic_error instead of "working" on sm_70+. Misuse (block or shared-memory limits, a
// lane missing from its own mask, a bad width) raises std::logic_error with a message.
//
// Not modelled: concurrency inside a block (lanes run one at a time, so there are no data races
// to observe and no memory-ordering effects), timing, streams (a launch runs to completion before
// it returns), bank conflicts, coalescing, out-of-bounds detection, dynamic parallelism.
// Graphs are: while the emulated backend captures (backend/capture_state.hpp), a launch is checked
// and queued into the graph instead of run, and runs at each replay.
//
// Included by <diffuse/backend/cuda/device.hpp> when the compiler is not nvcc; never under nvcc.
#pragma once

#ifndef __CUDACC__

#if defined(__CUDA_RUNTIME_H__) || defined(__VECTOR_TYPES_H__)
#error "diffuse/backend/cuda/emulation.hpp: this translation unit also includes the CUDA runtime headers; \
the emulation defines dim3, threadIdx, ... itself. Compile kernels either with nvcc or without CUDA headers."
#endif

#include <ucontext.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <mutex>
#include <atomic>
#include <cmath>  // expf, ... in the global namespace, as device code has them
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <source_location>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <diffuse/backend/capture_state.hpp>
#include <diffuse/core/parallel.hpp>

// How a fiber's stack is switched. On x86-64 a few instructions (below): glibc's swapcontext
// also saves and restores the signal mask, a system call per switch, and every thread of every
// block switches at least twice (half the time of an emulated Inception forward went there).
// Elsewhere, under AddressSanitizer (which follows swapcontext, not hand-made switches), or with
// DIFFUSE_EMU_UCONTEXT defined: ucontext.
#if defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__) && !defined(DIFFUSE_EMU_UCONTEXT)
#define DIFFUSE_EMU_FAST_SWITCH 1
// diffuse_emu_switch_stack(save, to): pushes the callee-saved registers, MXCSR and the x87 control
// word (what the System V ABI says a call preserves), stores the stack pointer in *save, loads
// `to` (a stack saved the same way, or a new one made by Fiber::start), pops that stack's and
// returns there. Weak and in a COMDAT group, as every file that includes this header defines it.
extern "C" void diffuse_emu_switch_stack(void** save, void* to);
__asm__(R"(
  .pushsection .text.diffuse_emu_switch_stack,"axG",@progbits,diffuse_emu_switch_stack,comdat
  .weak diffuse_emu_switch_stack
  .type diffuse_emu_switch_stack,@function
diffuse_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size diffuse_emu_switch_stack, .-diffuse_emu_switch_stack
  .popsection
)");
#else
#define DIFFUSE_EMU_FAST_SWITCH 0
#endif

// ---------------------------------------------------------------- CUDA spellings
// Kernels are templates (nvcc ignores `inline` on __global__), so __global__ needs no `inline`;
// device functions in headers say `inline` or __forceinline__ themselves.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

// CUDA's 16-byte vector type (kernels use it for wide loads and stores; like CUDA's, it must be
// 16-byte aligned, which the kernels check before using it).
struct alignas(16) float4 {
  float x, y, z, w;
};

inline constexpr int warpSize = 32;

namespace diffuse::emu {

// Launch limits and fiber settings. Read once at each launch; change them only between launches.
struct Limits {
  std::size_t max_static_shared_bytes = 48 * 1024;  // nvcc refuses more __shared__ per kernel
  // static + dynamic per block: CUDA's default; a kernel that opts in with
  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize) gets up to 227 KiB on sm_90.
  std::size_t max_shared_bytes = 48 * 1024;
  std::size_t fiber_stack_bytes = 64 * 1024;  // per thread of a block; a guard page catches overflow
  int host_threads = 0;                       // host threads running blocks; 0: diffuse::num_threads()
};
inline Limits& limits() {
  static Limits l;
  return l;
}

namespace detail {

inline constexpr unsigned kWarp = 32;
inline constexpr std::uint64_t kPoison = ~std::uint64_t{0};  // what a read of an inactive lane returns
inline constexpr int kPoisonByte = 0xFF;                     // fills shared memory: NaN, or -1

[[noreturn]] inline void fail(const std::string& what) { throw std::logic_error("diffuse::emu: " + what); }

inline std::string str(const dim3& d) {
  // Appended, not "(" + ...: g++ 12 warns falsely (-Wrestrict) on a literal + std::string temporary.
  std::string s = "(";
  s += std::to_string(d.x);
  s += ',';
  s += std::to_string(d.y);
  s += ',';
  s += std::to_string(d.z);
  s += ')';
  return s;
}
inline std::string str(const std::source_location& l) {
  std::string f = l.file_name();
  const std::size_t slash = f.find_last_of('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(l.line());
}
inline std::string hex(unsigned v) {
  static const char* digits = "0123456789abcdef";
  std::string s = "0x";
  for (int i = 7; i >= 0; --i) s += digits[(v >> (4 * i)) & 15u];
  return s;
}
inline bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() && std::strcmp(a.file_name(), b.file_name()) == 0;
}

enum class State : std::uint8_t { runnable, at_barrier, at_warp, exited };
enum class WarpKind : std::uint8_t { shfl, shfl_up, shfl_down, shfl_xor, ballot, any, all, syncwarp };

inline const char* name(WarpKind k) {
  switch (k) {
    case WarpKind::shfl: return "__shfl_sync";
    case WarpKind::shfl_up: return "__shfl_up_sync";
    case WarpKind::shfl_down: return "__shfl_down_sync";
    case WarpKind::shfl_xor: return "__shfl_xor_sync";
    case WarpKind::ballot: return "__ballot_sync";
    case WarpKind::any: return "__any_sync";
    case WarpKind::all: return "__all_sync";
    case WarpKind::syncwarp: return "__syncwarp";
  }
  return "?";
}

struct WarpOp {
  WarpKind kind = WarpKind::syncwarp;
  unsigned mask = 0;
  unsigned width = kWarp;
  unsigned arg = 0;            // srcLane, delta or laneMask
  std::uint64_t value = 0;     // the lane's operand (bits), or its predicate
  std::source_location where;
};

// The lane a shuffle reads, as PTX's shfl.sync defines it for the operands CUDA's __shfl_*_sync
// pass (segment mask 32 - width; clamp 0 for up, 31 otherwise). An out-of-segment source reads
// the lane's own value, except that xor may read an earlier segment (CUDA documents both).
inline unsigned source_lane(WarpKind k, unsigned lane, unsigned b, unsigned width) {
  const unsigned seg = (kWarp - width) & 31u;
  const unsigned min_lane = lane & seg;
  const unsigned max_lane = min_lane | (31u & ~seg);
  b &= 31u;
  switch (k) {
    case WarpKind::shfl: return min_lane | (b & ~seg);
    case WarpKind::shfl_up: return lane >= min_lane + b ? lane - b : lane;
    case WarpKind::shfl_down: return lane + b <= max_lane ? lane + b : lane;
    case WarpKind::shfl_xor: return (lane ^ b) <= max_lane ? (lane ^ b) : lane;
    default: return lane;
  }
}

// 64-byte aligned bytes, grown on demand and kept (one set per host thread).
class Bytes {
 public:
  Bytes() = default;
  Bytes(const Bytes&) = delete;
  Bytes& operator=(const Bytes&) = delete;
  ~Bytes() { release(); }
  std::byte* reserve(std::size_t n) {
    n = std::max<std::size_t>(n, 64);
    if (n > cap_) {
      release();
      p_ = static_cast<std::byte*>(::operator new(n, std::align_val_t{64}));
      cap_ = n;
    }
    return p_;
  }
  std::byte* data() const { return p_; }

 private:
  void release() {
    if (p_) ::operator delete(p_, std::align_val_t{64});
    p_ = nullptr;
    cap_ = 0;
  }
  std::byte* p_ = nullptr;
  std::size_t cap_ = 0;
};

// One thread of a block: its context and stack, allocated once and reused by later blocks. Not
// movable: glibc's ucontext_t points into itself. With the fast switch a fiber loops: it runs a
// thread, marks it exited and switches back; switched to again, it runs the next thread assigned
// to it, so a stack is prepared only for a fiber's first thread (or after it was abandoned
// mid-kernel by an error).
struct Fiber {
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;
  explicit Fiber(std::size_t stack_bytes) {
    page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    stack_size = (stack_bytes + page - 1) / page * page;
    void* p = mmap(nullptr, stack_size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    mapping = static_cast<std::byte*>(p);
    mprotect(mapping, page, PROT_NONE);  // stacks grow down: an overflow faults instead of corrupting
    getcontext(&ctx);
  }
  ~Fiber() { munmap(mapping, stack_size + page); }

#if DIFFUSE_EMU_FAST_SWITCH
  // A new stack whose first switch "returns" into `run` with the stack aligned as after a call:
  // the return address at a 16-byte boundary, below it six zero registers and this thread's
  // MXCSR and x87 control word (the layout diffuse_emu_switch_stack pops).
  void start(void (*run)()) {
    auto* top = reinterpret_cast<std::uint64_t*>(mapping + page + stack_size);  // 16-byte aligned (pages)
    std::uint64_t* p = top - 2;                            // [top-16]: return address, [top-8]: unused
    p[0] = reinterpret_cast<std::uint64_t>(run);
    p[1] = 0;
    p -= 6;                                                // rbp, rbx, r12-r15: zero
    std::fill(p, p + 6, std::uint64_t{0});
    p -= 2;                                                // MXCSR and the x87 control word
    std::memset(p, 0, 16);
    std::uint32_t mxcsr = 0;
    std::uint16_t fpucw = 0;
    __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
    __asm__ volatile("fnstcw %0" : "=m"(fpucw));
    std::memcpy(p, &mxcsr, 4);
    std::memcpy(reinterpret_cast<std::byte*>(p) + 4, &fpucw, 2);
    sp = p;
    idle = false;
  }
  void* sp = nullptr;  // the saved stack pointer while the fiber is switched out
  bool idle = false;   // switched out at the top of its loop: ready for another thread as it is
#endif
  ucontext_t ctx{};
  std::byte* mapping = nullptr;
  std::size_t page = 0, stack_size = 0;
  dim3 thread_idx;
  State state = State::exited;
  std::source_location barrier_at;
  WarpOp op;
  std::uint64_t result = 0;
};

class Scheduler;
inline Scheduler*& active() {  // the scheduler running a block on this host thread, if any
  thread_local Scheduler* s = nullptr;
  return s;
}

// Runs the threads of one block at a time on this host thread.
class Scheduler {
 public:
  void run_block(const Limits& lim, const dim3& grid, const dim3& block, const dim3& block_idx,
                 std::size_t dynamic_bytes, const std::function<void()>& body) {
    n_ = block.x * block.y * block.z;
    grid_ = grid;
    block_ = block;
    block_idx_ = block_idx;
    lim_ = lim;
    body_ = &body;
    error_ = nullptr;
    at_barrier_ = exited_ = 0;
    if (stack_bytes_ != lim.fiber_stack_bytes) fibers_.clear();
    stack_bytes_ = lim.fiber_stack_bytes;
    while (fibers_.size() < n_) fibers_.push_back(std::make_unique<Fiber>(stack_bytes_));
    for (unsigned i = 0; i < n_; ++i) {
      Fiber& f = *fibers_[i];
      f.thread_idx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
      f.state = State::runnable;
#if DIFFUSE_EMU_FAST_SWITCH
      if (!f.idle) f.start(&Scheduler::fiber_loop);
#else
      f.ctx.uc_stack.ss_sp = f.mapping + f.page;
      f.ctx.uc_stack.ss_size = f.stack_size;
      f.ctx.uc_stack.ss_flags = 0;
      f.ctx.uc_link = &main_;
      makecontext(&f.ctx, &Scheduler::entry, 0);
#endif
    }
    slots_.clear();
    static_used_ = 0;
    static_arena_.reserve(lim.max_static_shared_bytes);
    dynamic_bytes_ = dynamic_bytes;
    std::memset(dynamic_.reserve(dynamic_bytes), kPoisonByte, dynamic_bytes);

    struct Active {  // restores this thread's state however the block ends
      Scheduler* prev;
      explicit Active(Scheduler* s) : prev(active()) { active() = s; }
      ~Active() { active() = prev; }
    } guard(this);
    // Round-robin: each runnable thread runs until it waits or exits; waits are released as
    // soon as the last participant arrives. A pass in which nothing runs is a deadlock.
    while (exited_ < n_) {
      bool ran = false;
      for (unsigned i = 0; i < n_; ++i) {
        Fiber& f = *fibers_[i];
        if (f.state != State::runnable) continue;
        ran = true;
        current_ = &f;
#if DIFFUSE_EMU_FAST_SWITCH
        diffuse_emu_switch_stack(&main_sp_, f.sp);
#else
        swapcontext(&main_, &f.ctx);
#endif
        current_ = nullptr;
        if (error_) std::rethrow_exception(error_);  // the other fibers are abandoned mid-kernel
        switch (f.state) {
          case State::exited: ++exited_; release_warp(i / kWarp, kWarp); break;
          case State::at_barrier: if (++at_barrier_ == n_) release_barrier(); break;
          case State::at_warp: release_warp(i / kWarp, i % kWarp); break;
          case State::runnable: break;
        }
      }
      if (!ran) report_deadlock();
    }
  }

  // ---- called from inside a kernel (a fiber); active() is set only while one runs
  const Fiber& fiber() const { return *current_; }
  const dim3& block_idx() const { return block_idx_; }
  const dim3& block_dim() const { return block_; }
  const dim3& grid_dim() const { return grid_; }

  void sync_threads(const std::source_location& where) {
    Fiber& f = *current_;
    f.state = State::at_barrier;
    f.barrier_at = where;
    yield(f);
  }

  std::uint64_t warp_op(const WarpOp& op) {
    Fiber& f = *current_;
    const unsigned lane = linear(f) % kWarp;
    if (!((op.mask >> lane) & 1u))
      fail(who(f) + " calls " + name(op.kind) + " with mask " + hex(op.mask) + ", which does not name its own lane " +
           std::to_string(lane) + " (" + str(op.where) + ")");
    if (op.width == 0 || op.width > kWarp || (op.width & (op.width - 1)) != 0)
      fail(who(f) + " calls " + name(op.kind) + " with width " + std::to_string(op.width) +
           ": it must be a power of 2 up to 32 (" + str(op.where) + ")");
    f.op = op;
    f.state = State::at_warp;
    yield(f);
    return f.result;
  }

  // The storage of the __shared__ array declared at `tag`: one per block, laid out in the order
  // the declarations first run, 0xFF-filled.
  void* static_shared(const void* tag, std::size_t bytes, std::size_t align) {
    for (const Slot& s : slots_)
      if (s.tag == tag) return static_arena_.data() + s.offset;
    const std::size_t off = (static_used_ + align - 1) / align * align, end = off + bytes;
    if (end > lim_.max_static_shared_bytes)
      fail("static shared memory of " + std::to_string(end) + " bytes per block exceeds the limit of " +
           std::to_string(lim_.max_static_shared_bytes) + " bytes");
    if (end + dynamic_bytes_ > lim_.max_shared_bytes)
      fail("static (" + std::to_string(end) + ") + dynamic (" + std::to_string(dynamic_bytes_) +
           ") shared memory exceeds the limit of " + std::to_string(lim_.max_shared_bytes) + " bytes per block");
    std::memset(static_arena_.data() + off, kPoisonByte, bytes);
    slots_.push_back(Slot{tag, off});
    static_used_ = end;
    return static_arena_.data() + off;
  }
  void* dynamic_shared() { return dynamic_.data(); }

 private:
  struct Slot {
    const void* tag;
    std::size_t offset;
  };

  // Runs the current thread's body; an exception ends the block (run_block rethrows it).
  static void run_thread() {
    Scheduler& s = *active();
    try {
      (*s.body_)();
    } catch (...) {
      if (!s.error_) s.error_ = std::current_exception();
    }
    s.current_->state = State::exited;
  }

#if DIFFUSE_EMU_FAST_SWITCH
  // A fiber's whole life: it never returns (nothing is above it on its stack).
  [[noreturn]] static void fiber_loop() {
    for (;;) {
      run_thread();
      Scheduler& s = *active();
      Fiber& f = *s.current_;
      f.idle = true;
      diffuse_emu_switch_stack(&f.sp, s.main_sp_);
      f.idle = false;  // switched to again: the next thread assigned to this fiber
    }
  }
  void yield(Fiber& f) { diffuse_emu_switch_stack(&f.sp, main_sp_); }
#else
  static void entry() { run_thread(); }  // returning resumes uc_link: the scheduler
  void yield(Fiber& f) { swapcontext(&f.ctx, &main_); }
#endif

  unsigned linear(const Fiber& f) const { return f.thread_idx.x + block_.x * (f.thread_idx.y + block_.y * f.thread_idx.z); }
  std::string who(const Fiber& f) const { return "block " + str(block_idx_) + " thread " + str(f.thread_idx); }

  void release_barrier() {
    for (unsigned i = 1; i < n_; ++i)
      if (!same_site(fibers_[i]->barrier_at, fibers_[0]->barrier_at)) return;  // reported as a deadlock
    for (unsigned i = 0; i < n_; ++i) fibers_[i]->state = State::runnable;
    at_barrier_ = 0;
  }

  // Releases every group of lanes of warp w whose non-exited members all wait at the same
  // intrinsic with the same mask and width; lanes that exited (or do not exist in a partial last
  // warp) are left out, and a shuffle that reads one gets kPoison.
  // `arrived`: the lane that just arrived (only its group can have completed), or kWarp after
  // an exit (any group may have).
  void release_warp(unsigned w, unsigned arrived) {
    const unsigned lo = w * kWarp, count = std::min(kWarp, n_ - lo);
    unsigned live = 0;
    for (unsigned l = 0; l < count; ++l)
      if (fibers_[lo + l]->state != State::exited) live |= 1u << l;
    for (unsigned l = arrived < kWarp ? arrived : 0; l < (arrived < kWarp ? arrived + 1 : count); ++l) {
      const Fiber& f = *fibers_[lo + l];
      if (f.state != State::at_warp) continue;
      const WarpOp op = f.op;
      const unsigned members = op.mask & live;
      bool complete = true;
      for (unsigned j = kWarp; j-- > 0 && complete;) {  // from the top: lanes arrive in order
        if (!((members >> j) & 1u)) continue;
        const Fiber& g = *fibers_[lo + j];
        complete = g.state == State::at_warp && g.op.kind == op.kind && g.op.mask == op.mask && g.op.width == op.width;
      }
      if (!complete) continue;
      unsigned votes = 0;
      for (unsigned j = 0; j < kWarp; ++j)
        if (((members >> j) & 1u) && fibers_[lo + j]->op.value != 0) votes |= 1u << j;
      for (unsigned j = 0; j < kWarp; ++j) {
        if (!((members >> j) & 1u)) continue;
        Fiber& g = *fibers_[lo + j];
        switch (op.kind) {
          case WarpKind::ballot: g.result = votes; break;
          case WarpKind::any: g.result = votes != 0; break;
          case WarpKind::all: g.result = votes == members; break;
          case WarpKind::syncwarp: g.result = 0; break;
          default: {
            const unsigned src = source_lane(op.kind, j, g.op.arg, op.width);
            g.result = ((members >> src) & 1u) ? fibers_[lo + src]->op.value : kPoison;
          }
        }
        g.state = State::runnable;
      }
    }
  }

  [[noreturn]] void report_deadlock() const {
    struct Group {
      unsigned count = 0;
      dim3 first;
    };
    std::map<std::string, Group> groups;
    bool exited = false, barrier = false;
    for (unsigned i = 0; i < n_; ++i) {
      const Fiber& f = *fibers_[i];
      std::string what;
      switch (f.state) {
        case State::exited: what = "exited"; exited = true; break;
        case State::at_barrier: what = "wait at __syncthreads() (" + str(f.barrier_at) + ")"; barrier = true; break;
        case State::at_warp:
          what = "wait at " + std::string(name(f.op.kind)) + " mask " + hex(f.op.mask) + " in warp " +
                 std::to_string(i / kWarp) + " (" + str(f.op.where) + ")";
          break;
        case State::runnable: what = "runnable"; break;
      }
      Group& g = groups[what];
      if (g.count++ == 0) g.first = f.thread_idx;
    }
    std::string msg = "deadlock in block " + str(block_idx_) + " (grid " + str(grid_) + ", block " + str(block_) +
                      "): no thread can continue.";
    for (const auto& [what, g] : groups)
      msg += "\n  " + std::to_string(g.count) + (g.count == 1 ? " thread " : " threads ") + what + ", first " + str(g.first);
    if (barrier && exited) msg += "\nA thread exited before a __syncthreads() that others wait at (early return?).";
    msg += "\nEvery thread of a block must reach the same __syncthreads() call; the non-exited lanes named in a warp "
           "intrinsic's mask must all reach the same intrinsic with the same mask.";
    fail(msg);
  }

  std::vector<std::unique_ptr<Fiber>> fibers_;
  std::size_t stack_bytes_ = 0;
  ucontext_t main_{};
  void* main_sp_ = nullptr;  // the scheduler's stack while a fiber runs (fast switch)
  Fiber* current_ = nullptr;
  const std::function<void()>* body_ = nullptr;
  std::exception_ptr error_;
  unsigned n_ = 0, at_barrier_ = 0, exited_ = 0;
  dim3 grid_, block_, block_idx_;
  Limits lim_;
  std::vector<Slot> slots_;
  std::size_t static_used_ = 0, dynamic_bytes_ = 0;
  Bytes static_arena_, dynamic_;
};

inline Scheduler& running() {
  Scheduler* s = active();
  if (!s) fail("threadIdx/blockIdx/... or a device intrinsic used outside a kernel");
  return *s;
}
inline Scheduler& this_thread_scheduler() {
  thread_local Scheduler s;
  return s;
}

template <class T>
inline T warp_exchange(WarpKind kind, unsigned mask, T value, unsigned arg, int width, const std::source_location& where) {
  static_assert(std::is_arithmetic_v<T> && sizeof(T) <= 8, "warp shuffles take integers and floating point up to 64 bits");
  WarpOp op;
  op.kind = kind;
  op.mask = mask;
  op.width = static_cast<unsigned>(width);
  op.arg = arg;
  std::memcpy(&op.value, &value, sizeof(T));
  op.where = where;
  const std::uint64_t r = running().warp_op(op);
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}
inline unsigned warp_vote(WarpKind kind, unsigned mask, int pred, const std::source_location& where) {
  WarpOp op;
  op.kind = kind;
  op.mask = mask;
  op.value = pred != 0;
  op.where = where;
  return static_cast<unsigned>(running().warp_op(op));
}

template <class T, std::size_t N>
inline auto static_shared(const void* tag) -> T (&)[N] {
  static_assert(alignof(T) <= 64, "shared arrays are at most 64-byte aligned");
  void* p = running().static_shared(tag, sizeof(T) * N, std::max<std::size_t>(alignof(T), 16));
  return *reinterpret_cast<T(*)[N]>(p);
}
template <class T>
inline T* dynamic_shared() {
  return reinterpret_cast<T*>(running().dynamic_shared());
}

}  // namespace detail

// Runs body() as every thread of every block of a grid; returns when all have finished.
// Exceptions (misuse, deadlock, or thrown by body) propagate; the first one wins.
inline void launch(const dim3& grid, const dim3& block, std::size_t shared_bytes, const std::function<void()>& body) {
  using detail::fail;
  using detail::str;
  if (detail::active()) fail("a kernel launched another kernel: dynamic parallelism is not emulated");
  const Limits lim = limits();
  const std::uint64_t threads = std::uint64_t{block.x} * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 || threads > 1024)
    fail("invalid block " + str(block) + ": each size at least 1, x and y at most 1024, z at most 64, at most 1024 threads in all (" +
         std::to_string(threads) + ")");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    fail("invalid grid " + str(grid) + ": each size at least 1, x < 2^31, y and z at most 65535");
  if (shared_bytes > lim.max_shared_bytes)
    fail("dynamic shared memory of " + std::to_string(shared_bytes) + " bytes exceeds the limit of " +
         std::to_string(lim.max_shared_bytes) + " bytes per block (see diffuse::emu::limits())");

  // Inside a captured graph (backend/capture_state.hpp): checked now, run at each replay.
  if (diffuse::backend::capture_state().queue) {
    diffuse::backend::capture_state().queue([grid, block, shared_bytes, body] { launch(grid, block, shared_bytes, body); });
    return;
  }
  const std::int64_t blocks = static_cast<std::int64_t>(std::uint64_t{grid.x} * grid.y * grid.z);
  std::exception_ptr first;
  std::atomic<bool> failed{false};
  // Each host thread runs whole blocks with its own scheduler (a fiber never changes thread).
  const std::int64_t host_threads = lim.host_threads > 0 ? lim.host_threads : num_threads();
  std::mutex first_mutex;
  DynamicCounter next(blocks);
  parallel_region(static_cast<int>(std::min(host_threads, blocks)), [&](int, int) {
    for (std::int64_t b; (b = next.next()) >= 0;) {
      if (failed.load(std::memory_order_relaxed)) continue;
      const auto ub = static_cast<std::uint64_t>(b);
      const dim3 idx(static_cast<unsigned>(ub % grid.x), static_cast<unsigned>(ub / grid.x % grid.y),
                     static_cast<unsigned>(ub / (std::uint64_t{grid.x} * grid.y)));
      try {
        detail::this_thread_scheduler().run_block(lim, grid, block, idx, shared_bytes, body);
      } catch (...) {
        std::lock_guard<std::mutex> lock(first_mutex);
        if (!first) first = std::current_exception();
        failed.store(true, std::memory_order_relaxed);
      }
    }
  });
  if (first) std::rethrow_exception(first);
}

}  // namespace diffuse::emu

// ---------------------------------------------------------------- device intrinsics
#define threadIdx (::diffuse::emu::detail::running().fiber().thread_idx)
#define blockIdx (::diffuse::emu::detail::running().block_idx())
#define blockDim (::diffuse::emu::detail::running().block_dim())
#define gridDim (::diffuse::emu::detail::running().grid_dim())

inline void __syncthreads(std::source_location where = std::source_location::current()) {
  ::diffuse::emu::detail::running().sync_threads(where);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location where = std::source_location::current()) {
  (void)::diffuse::emu::detail::warp_vote(::diffuse::emu::detail::WarpKind::syncwarp, mask, 0, where);
}
template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize,
                     std::source_location where = std::source_location::current()) {
  return ::diffuse::emu::detail::warp_exchange(::diffuse::emu::detail::WarpKind::shfl, mask, var,
                                               static_cast<unsigned>(srcLane), width, where);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        std::source_location where = std::source_location::current()) {
  return ::diffuse::emu::detail::warp_exchange(::diffuse::emu::detail::WarpKind::shfl_up, mask, var, delta, width, where);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          std::source_location where = std::source_location::current()) {
  return ::diffuse::emu::detail::warp_exchange(::diffuse::emu::detail::WarpKind::shfl_down, mask, var, delta, width, where);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,
                         std::source_location where = std::source_location::current()) {
  return ::diffuse::emu::detail::warp_exchange(::diffuse::emu::detail::WarpKind::shfl_xor, mask, var,
                                               static_cast<unsigned>(laneMask), width, where);
}
inline unsigned __ballot_sync(unsigned mask, int predicate, std::source_location where = std::source_location::current()) {
  return ::diffuse::emu::detail::warp_vote(::diffuse::emu::detail::WarpKind::ballot, mask, predicate, where);
}
inline int __any_sync(unsigned mask, int predicate, std::source_location where = std::source_location::current()) {
  return static_cast<int>(::diffuse::emu::detail::warp_vote(::diffuse::emu::detail::WarpKind::any, mask, predicate, where));
}
inline int __all_sync(unsigned mask, int predicate, std::source_location where = std::source_location::current()) {
  return static_cast<int>(::diffuse::emu::detail::warp_vote(::diffuse::emu::detail::WarpKind::all, mask, predicate, where));
}

// Atomics: CUDA's are relaxed; std::atomic_ref makes them safe across blocks on host threads.
namespace diffuse::emu::detail {
template <class T>
inline T atomic_fetch_add(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v, std::memory_order_relaxed);
}
template <class T, class Better>
inline T atomic_fetch_pick(T* p, T v, Better better) {
  std::atomic_ref<T> a(*p);
  T old = a.load(std::memory_order_relaxed);
  while (better(v, old) && !a.compare_exchange_weak(old, v, std::memory_order_relaxed)) {
  }
  return old;
}
template <class T>
inline T atomic_cas(T* p, T compare, T v) {
  std::atomic_ref<T>(*p).compare_exchange_strong(compare, v, std::memory_order_relaxed);
  return compare;  // the old value, whether or not it was replaced
}
}  // namespace diffuse::emu::detail

inline int atomicAdd(int* p, int v) { return ::diffuse::emu::detail::atomic_fetch_add(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return ::diffuse::emu::detail::atomic_fetch_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return ::diffuse::emu::detail::atomic_fetch_add(p, v);
}
inline float atomicAdd(float* p, float v) { return ::diffuse::emu::detail::atomic_fetch_add(p, v); }
inline double atomicAdd(double* p, double v) { return ::diffuse::emu::detail::atomic_fetch_add(p, v); }
inline int atomicSub(int* p, int v) { return ::diffuse::emu::detail::atomic_fetch_add(p, -v); }
inline unsigned atomicSub(unsigned* p, unsigned v) { return ::diffuse::emu::detail::atomic_fetch_add(p, 0u - v); }
template <class T>
inline T atomicExch(T* p, T v) {
  static_assert(std::is_arithmetic_v<T>);
  return std::atomic_ref<T>(*p).exchange(v, std::memory_order_relaxed);
}
template <class T>
inline T atomicMax(T* p, T v) {
  static_assert(std::is_integral_v<T>, "CUDA's atomicMax takes integers");
  return ::diffuse::emu::detail::atomic_fetch_pick(p, v, [](T a, T b) { return a > b; });
}
template <class T>
inline T atomicMin(T* p, T v) {
  static_assert(std::is_integral_v<T>, "CUDA's atomicMin takes integers");
  return ::diffuse::emu::detail::atomic_fetch_pick(p, v, [](T a, T b) { return a < b; });
}
inline int atomicCAS(int* p, int compare, int v) { return ::diffuse::emu::detail::atomic_cas(p, compare, v); }
inline unsigned atomicCAS(unsigned* p, unsigned compare, unsigned v) { return ::diffuse::emu::detail::atomic_cas(p, compare, v); }
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long compare, unsigned long long v) {
  return ::diffuse::emu::detail::atomic_cas(p, compare, v);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---------------------------------------------------------------- shared memory
// See <diffuse/backend/cuda/device.hpp>. The address of a function-local static names the declaration:
// one array per declaration (and template instance) per block, as __shared__ gives.
#define DIFFUSE_SHARED(T, name, n)        \
  static char diffuse_shared_tag_##name; \
  T(&name)[n] = ::diffuse::emu::detail::static_shared<T, (n)>(&diffuse_shared_tag_##name)
#define DIFFUSE_DYNAMIC_SHARED(T, name) T* const name = ::diffuse::emu::detail::dynamic_shared<T>()

#endif  // __CUDACC__
