// The CPU backend's threads: one fork/join pool, its size, and the loops that use it.
//
// Why not OpenMP: libgomp's idle workers spin for about 300,000 iterations (milliseconds) before
// they sleep, and only an environment variable read at program start (GOMP_SPINCOUNT) changes
// that, which a library cannot set. Two trainings on the same two cores then slowed each other
// 4-30x. These workers spin for 50 microseconds (enough to catch the next region of a train
// step), then sleep on a futex (std::atomic::wait), so side-by-side runs share the cores.
//
// The thread count: set_num_threads(n), else DIFFUSE_NUM_THREADS, else OMP_NUM_THREADS, else the
// CPUs this process may run on. A region started inside another region, or while another thread
// of the program holds the pool, runs on the calling thread alone (as nested OpenMP regions do).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__unix__)
#include <pthread.h>
#endif

namespace diffuse {

namespace detail {

inline constexpr int kMaxThreads = 4096;

// A positive integer from the environment, or 0 when unset; anything else is refused by name.
inline int thread_count_from_env(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return 0;
  // OMP_NUM_THREADS may list one count per nesting level ("4,2"): the first is ours.
  std::string s(v);
  if (const auto comma = s.find(','); comma != std::string::npos) s.resize(comma);
  size_t used = 0;
  long n = 0;
  try {
    n = std::stol(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != s.size() || n < 1 || n > kMaxThreads)
    throw std::invalid_argument(std::string("diffuse: ") + name + "='" + v + "': expected a thread count from 1 to " +
                                std::to_string(kMaxThreads));
  return static_cast<int>(n);
}

inline int available_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

inline int default_num_threads() {
  if (const int n = thread_count_from_env("DIFFUSE_NUM_THREADS")) return n;
  if (const int n = thread_count_from_env("OMP_NUM_THREADS")) return n;
  return available_cpus();
}

inline std::atomic<int>& num_threads_setting() {
  static std::atomic<int> n{default_num_threads()};
  return n;
}

inline thread_local bool tl_in_parallel = false;
inline thread_local int tl_slot = -1;  // the slot of a pooled region this thread runs, else -1

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// How long an idle thread spins before it sleeps. A train step's regions follow each other within
// microseconds; a longer spin only burns a core that another process could use.
inline constexpr auto kSpin = std::chrono::microseconds(50);

// Spins until pred() holds or kSpin has passed; true when pred() held.
template <class Pred>
inline bool spin_until(Pred&& pred) {
  const auto until = std::chrono::steady_clock::now() + kSpin;
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (pred()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= until) return pred();
  }
}

// A region's team-1 worker slots are claimed, not assigned: each woken worker (and the master,
// once its own slot 0 is done) takes the next unclaimed slot until none is left, so a worker that
// is still asleep when the others have taken every slot costs the region nothing, and the master
// waits only for slots that are running. (Assigned slots made every region after a gap wait for
// a sleeping worker's wake: 10-60 us each, the small train steps' solo cost.)
class ThreadPool {
 public:
  using Job = void (*)(void* ctx, int thread, int team);

  // Runs job(ctx, t, team) for t in [0, team), t = 0 on the calling thread; returns when all
  // have finished and rethrows the first exception any of them threw.
  void run(int team, Job job, void* ctx) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (team <= 1 || tl_in_parallel || !busy.owns_lock()) {
      run_inline(job, ctx);
      return;
    }
    grow(team - 1);
    job_ = job;
    ctx_ = ctx;
    team_ = team;
    error_ = nullptr;
    finished_.store(0, std::memory_order_relaxed);
    region_ = (region_ + 1) & 0xffffffffu;
    // Publishes the region (job_, ctx_, team_ above) with slot 0 taken by this thread.
    slots_.store(pack(region_, team, 1), std::memory_order_seq_cst);
    for (int w = 0; w < team - 1; ++w) {
      Worker& wk = *workers_[static_cast<size_t>(w)];
      wk.gen.fetch_add(1, std::memory_order_seq_cst);
      if (wk.sleeping.load(std::memory_order_seq_cst)) wk.gen.notify_one();
    }
    tl_in_parallel = true;
    run_slot(0);
    for (int t; (t = claim(slots_.load(std::memory_order_acquire))) >= 0;) run_slot(t);
    tl_in_parallel = false;
    // Every slot is claimed; the claimers use ctx (the caller's frame): wait for them to finish.
    const auto all_done = [&] { return finished_.load(std::memory_order_acquire) == team; };
    if (!spin_until(all_done)) {
      master_sleeping_.store(true, std::memory_order_seq_cst);
      for (int f; (f = finished_.load(std::memory_order_seq_cst)) != team;) finished_.wait(f, std::memory_order_seq_cst);
      master_sleeping_.store(false, std::memory_order_relaxed);
    }
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
  struct alignas(64) Worker {
    std::atomic<uint32_t> gen{0};       // bumped by the master for each region it may join
    std::atomic<bool> sleeping{false};  // true while the worker waits on gen
  };

  // slots_ holds the region's number, its team and the next unclaimed slot in one word, so a
  // claim (a compare-and-swap) can only take a slot of the region it read.
  static uint64_t pack(uint64_t region, int team, int next) {
    return region << 32 | static_cast<uint64_t>(team) << 16 | static_cast<uint64_t>(next);
  }
  // The slot claimed from word w (as later words of the same region), or -1 when none is left.
  int claim(uint64_t w) {
    for (;;) {
      const int team = static_cast<int>(w >> 16 & 0xffff), next = static_cast<int>(w & 0xffff);
      if (next >= team) return -1;
      if (slots_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) return next;
    }
  }

  void run_slot(int t) {
    const int team = team_;  // read before finishing: then the master may start the next region
    tl_slot = t;
    try {
      job_(ctx_, t, team);
    } catch (...) {
      record_error();
    }
    tl_slot = -1;
    if (finished_.fetch_add(1, std::memory_order_seq_cst) + 1 == team && master_sleeping_.load(std::memory_order_seq_cst))
      finished_.notify_one();
  }

  static void run_inline(Job job, void* ctx) {
    const bool outer = tl_in_parallel;
    tl_in_parallel = true;
    try {
      job(ctx, 0, 1);
    } catch (...) {
      tl_in_parallel = outer;
      throw;
    }
    tl_in_parallel = outer;
  }

  void record_error() {
    std::lock_guard<std::mutex> lock(error_mutex_);
    if (!error_) error_ = std::current_exception();
  }

  void grow(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      workers_.push_back(std::make_unique<Worker>());
      Worker* wk = workers_.back().get();
      // Never joined: the pool lives until the process ends (see pool()).
      std::thread([this, wk] { work(*wk); }).detach();
    }
  }

  void work(Worker& wk) {
    tl_in_parallel = true;
    uint32_t seen = 0;
    for (;;) {
      if (!spin_until([&] { return wk.gen.load(std::memory_order_acquire) != seen; })) {
        wk.sleeping.store(true, std::memory_order_seq_cst);
        wk.gen.wait(seen, std::memory_order_seq_cst);
        wk.sleeping.store(false, std::memory_order_relaxed);
      }
      seen = wk.gen.load(std::memory_order_acquire);
      // The latest region's slots, if any is left (a late worker finds none, or a later region's).
      for (int t; (t = claim(slots_.load(std::memory_order_acquire))) >= 0;) run_slot(t);
    }
  }

  std::mutex busy_;  // held by the thread running a region
  std::vector<std::unique_ptr<Worker>> workers_;
  Job job_ = nullptr;
  void* ctx_ = nullptr;
  int team_ = 1;
  uint64_t region_ = 0;                // the master's count of regions (mod 2^32)
  std::atomic<uint64_t> slots_{0};     // see pack(): region, team, next unclaimed slot
  std::atomic<int> finished_{0};       // slots of the current region that have finished
  std::atomic<bool> master_sleeping_{false};
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

// One pool per program, never destroyed: its detached workers may outlive static destructors.
// A child of fork() has none of the parent's workers: it starts a new pool (the old one leaks).
inline ThreadPool*& pool_ptr() {
  static ThreadPool* p = [] {
#if defined(__unix__)
    pthread_atfork(nullptr, nullptr, [] { pool_ptr() = new ThreadPool; });
#endif
    return new ThreadPool;
  }();
  return p;
}
inline ThreadPool& pool() { return *pool_ptr(); }

// Scratch of type T (one per Tag) that belongs to the slot of the pooled region this thread is
// running, or to the thread outside one. Slot t of every region does the same work whichever
// thread claims it, so a buffer grown on demand settles after one step; per-thread buffers would
// keep growing whenever a thread first wins a bigger slot. At most one thread runs a slot at a
// time, and a region nested in a slot runs inline in it, so the object is never shared.
template <class T, class Tag>
inline T& slot_local() {
  static T* const per_slot = new T[kMaxThreads]();  // value-initialised; never destroyed, as the pool
  thread_local T own;
  const int s = tl_slot;
  return s >= 0 ? per_slot[s] : own;
}

}  // namespace detail

// The threads the CPU backend uses (see the top of this header for where the number comes from).
inline int num_threads() { return detail::num_threads_setting().load(std::memory_order_relaxed); }

// Sets the thread count of every later parallel region; 1 runs everything on the calling thread.
inline void set_num_threads(int n) {
  if (n < 1 || n > detail::kMaxThreads)
    throw std::invalid_argument("diffuse: set_num_threads(" + std::to_string(n) + "): expected 1 to " +
                                std::to_string(detail::kMaxThreads));
  detail::num_threads_setting().store(n, std::memory_order_relaxed);
}

// True on a thread that is running a parallel region (where a new region runs inline).
inline bool in_parallel() { return detail::tl_in_parallel; }

// Runs f(thread, team) on `threads` threads (thread 0 is the caller) and waits for all of them.
// threads <= 1, a nested call, or a pool busy with another caller's region: f(0, 1) inline.
template <class F>
inline void parallel_region(int threads, F&& f) {
  using Fn = std::remove_reference_t<F>;
  detail::pool().run(
      threads, [](void* ctx, int t, int team) { (*static_cast<Fn*>(ctx))(t, team); },
      const_cast<void*>(static_cast<const void*>(std::addressof(f))));
}

// The part [begin, end) of [0, n) that thread t of `team` takes under a static schedule
// (contiguous, sizes differing by at most one, as OpenMP's schedule(static)).
inline std::pair<int64_t, int64_t> static_range(int64_t n, int t, int team) {
  const int64_t q = n / team, r = n % team;
  const int64_t begin = t * q + std::min<int64_t>(t, r);
  return {begin, begin + q + (t < r ? 1 : 0)};
}

// The threads a loop of n independent iterations uses: 1 when !parallel, never more than n.
inline int loop_threads(int64_t n, bool parallel) {
  if (!parallel || in_parallel()) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads(), n)));
}

// for (i = 0; i < n; ++i) f(i), split into contiguous chunks over the threads when `parallel`.
template <class F>
inline void parallel_for(int64_t n, bool parallel, F&& f) {
  const int nt = loop_threads(n, parallel);
  if (nt <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  parallel_region(nt, [&](int t, int team) {
    const auto [b, e] = static_range(n, t, team);
    for (int64_t i = b; i < e; ++i) f(i);
  });
}

// sum over i of f(i) in double, as parallel_for; each thread adds its chunk in order, then the
// chunks are added in thread order (the result depends on the thread count, not on timing).
template <class F>
inline double parallel_sum(int64_t n, bool parallel, F&& f) {
  const int nt = loop_threads(n, parallel);
  std::vector<double> part(static_cast<size_t>(nt), 0.0);
  parallel_region(nt, [&](int t, int team) {
    const auto [b, e] = static_range(n, t, team);
    double acc = 0;
    for (int64_t i = b; i < e; ++i) acc += f(i);
    part[static_cast<size_t>(t)] = acc;
  });
  double s = 0;
  for (double p : part) s += p;
  return s;
}

// Hands out iterations one at a time to whichever thread asks first (OpenMP's schedule(dynamic)).
class DynamicCounter {
 public:
  explicit DynamicCounter(int64_t n) : n_(n) {}
  // The next iteration, or -1 when all are taken.
  int64_t next() {
    const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
    return i < n_ ? i : -1;
  }

 private:
  int64_t n_;
  std::atomic<int64_t> next_{0};
};

}  // namespace diffuse
