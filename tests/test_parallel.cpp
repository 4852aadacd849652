// Tests for include/diffuse/core/parallel.hpp: the CPU backend's thread pool. Every iteration runs
// exactly once for any thread count, exceptions reach the caller, nested and concurrent regions
// run inline, the thread count comes from the environment or set_num_threads and bad values are
// refused by name, and idle workers sleep (the property that lets two trainings share a machine).
#include <diffuse/core/parallel.hpp>

#include <catch2/catch.hpp>

#include "kernel_seed.hpp"

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <ctime>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

namespace {

// Restores the thread count a test changed.
struct ThreadsGuard {
  int saved = diffuse::num_threads();
  ~ThreadsGuard() { diffuse::set_num_threads(saved); }
};

// Sets an environment variable for one scope.
struct EnvGuard {
  std::string name;
  std::string old;
  bool had;
  EnvGuard(const char* n, const char* v) : name(n), had(std::getenv(n) != nullptr) {
    if (had) old = std::getenv(n);
    if (v)
      setenv(n, v, 1);
    else
      unsetenv(n);
  }
  ~EnvGuard() {
    if (had)
      setenv(name.c_str(), old.c_str(), 1);
    else
      unsetenv(name.c_str());
  }
};

double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

}  // namespace

TEST_CASE("static_range splits [0, n) into contiguous parts differing by at most one", "[parallel]") {
  for (int64_t n : {0, 1, 2, 7, 64, 1001})
    for (int team : {1, 2, 3, 8}) {
      INFO("n " << n << " team " << team);
      int64_t next = 0, lo = n, hi = 0;
      for (int t = 0; t < team; ++t) {
        const auto [b, e] = diffuse::static_range(n, t, team);
        CHECK(b == next);
        CHECK(e >= b);
        lo = std::min(lo, e - b);
        hi = std::max(hi, e - b);
        next = e;
      }
      CHECK(next == n);
      CHECK(hi - lo <= 1);
    }
}

TEST_CASE("parallel_for, parallel_region and DynamicCounter visit every iteration exactly once", "[parallel]") {
  ThreadsGuard guard;
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed << " (DIFFUSE_TEST_SEED replays it)");
  std::mt19937_64 rng(seed);
  for (int threads : {1, 2, 3, 5}) {
    diffuse::set_num_threads(threads);
    for (int rep = 0; rep < 20; ++rep) {
      const int64_t n = static_cast<int64_t>(rng() % 5000);
      INFO("threads " << threads << " n " << n);
      std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
      diffuse::parallel_for(n, true, [&](int64_t i) { hits[static_cast<size_t>(i)].fetch_add(1); });
      std::atomic<int> bad{0};
      for (auto& h : hits) bad += h.exchange(0) != 1;
      CHECK(bad == 0);

      diffuse::DynamicCounter next(n);
      std::atomic<int> teams_seen{0};
      diffuse::parallel_region(threads, [&](int t, int team) {
        if (t == 0) teams_seen = team;
        for (int64_t i; (i = next.next()) >= 0;) hits[static_cast<size_t>(i)].fetch_add(1);
      });
      CHECK(teams_seen == threads);
      for (auto& h : hits) bad += h.load() != 1;
      CHECK(bad == 0);
    }
  }
}

// Workers claim slots: one still asleep when the region's slots are all taken joins later, maybe
// in a later region. Regions after gaps of 0 to 300 us (a worker awake, spinning, or asleep) with
// changing teams: each slot of each region runs once, with its own region's team.
TEST_CASE("regions after gaps with changing teams run each slot exactly once", "[parallel]") {
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed << " (DIFFUSE_TEST_SEED replays it)");
  std::mt19937_64 rng(seed);
  int bad = 0;
  for (int region = 0; region < 3000; ++region) {
    const int team = 1 + static_cast<int>(rng() % 4);
    const int gap_us = static_cast<int>(rng() % 4) * 100;
    if (gap_us) std::this_thread::sleep_for(std::chrono::microseconds(gap_us));
    std::vector<std::atomic<int>> hits(static_cast<size_t>(team));
    std::atomic<int> wrong_team{0};
    diffuse::parallel_region(team, [&](int t, int tm) {
      wrong_team += tm != team;
      hits[static_cast<size_t>(t)].fetch_add(1);
    });
    for (auto& h : hits) bad += h.load() != 1;
    bad += wrong_team.load();
  }
  CHECK(bad == 0);
}

// slot_local: the GEMM and conv scratch. Slot t of every region must get the same object whichever
// thread claims it (else a buffer grown on demand keeps growing after warm-up), no two slots of a
// region may share one, and outside a pooled region each thread has its own.
TEST_CASE("slot_local gives slot t of every region the same object, and threads outside regions their own",
          "[parallel]") {
  struct Tag;
  constexpr int team = 3;
  std::vector<int*> first(team, nullptr);
  std::vector<int> counts(team, 0);
  int moved = 0, shared = 0;
  for (int region = 0; region < 500; ++region) {
    if (region % 50 == 0) std::this_thread::sleep_for(std::chrono::microseconds(300));  // let workers sleep
    std::vector<int*> seen(team, nullptr);
    diffuse::parallel_region(team, [&](int t, int) {
      int& v = diffuse::detail::slot_local<int, Tag>();
      ++v;
      seen[static_cast<size_t>(t)] = &v;
    });
    for (int t = 0; t < team; ++t) {
      if (!first[t]) first[t] = seen[t];
      moved += seen[t] != first[t];
      for (int u = 0; u < t; ++u) shared += seen[t] == seen[u];
    }
  }
  CHECK(moved == 0);
  CHECK(shared == 0);
  for (int t = 0; t < team; ++t) CHECK(*first[t] == 500);  // one increment per region, never lost
  int* mine = &diffuse::detail::slot_local<int, Tag>();
  int* other = nullptr;
  std::thread([&] { other = &diffuse::detail::slot_local<int, Tag>(); }).join();
  CHECK(mine != other);
  for (int t = 0; t < team; ++t) CHECK(mine != first[t]);
}

TEST_CASE("parallel_for uses the threads set and no more than the iterations", "[parallel]") {
  ThreadsGuard guard;
  diffuse::set_num_threads(3);
  CHECK(diffuse::num_threads() == 3);
  CHECK(diffuse::loop_threads(1000, true) == 3);
  CHECK(diffuse::loop_threads(2, true) == 2);
  CHECK(diffuse::loop_threads(1000, false) == 1);
  std::vector<std::thread::id> ids(3);
  std::atomic<int> team_seen{0};
  // Each slot waits for the other two to start: only three threads at once can finish this.
  std::atomic<int> arrived{0};
  std::atomic<bool> timed_out{false};
  diffuse::parallel_region(3, [&](int t, int team) {
    ids[static_cast<size_t>(t)] = std::this_thread::get_id();
    team_seen = team;
    arrived.fetch_add(1);
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (arrived.load() < 3)
      if (std::chrono::steady_clock::now() > until) {
        timed_out = true;
        break;
      }
  });
  CHECK_FALSE(timed_out);
  CHECK(team_seen == 3);
  CHECK(ids[0] == std::this_thread::get_id());
  CHECK(ids[0] != ids[1]);
  CHECK(ids[1] != ids[2]);
  CHECK(ids[0] != ids[2]);
  CHECK_THROWS_WITH(diffuse::set_num_threads(0), Catch::Contains("set_num_threads(0)"));
  CHECK(diffuse::num_threads() == 3);
}

TEST_CASE("parallel_sum adds in a fixed order: the same bits for the same thread count", "[parallel]") {
  ThreadsGuard guard;
  const uint64_t seed = diffuse::testing::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  std::vector<double> v(100003);
  for (double& x : v) x = std::ldexp(static_cast<double>(rng() % 2000001) - 1e6, -static_cast<int>(rng() % 40));
  for (int threads : {1, 2, 4}) {
    diffuse::set_num_threads(threads);
    const auto f = [&](int64_t i) { return v[static_cast<size_t>(i)]; };
    const double s1 = diffuse::parallel_sum(static_cast<int64_t>(v.size()), true, f);
    for (int rep = 0; rep < 5; ++rep) CHECK(diffuse::parallel_sum(static_cast<int64_t>(v.size()), true, f) == s1);
    // The same partition summed here, part by part.
    double expect = 0;
    for (int t = 0; t < threads; ++t) {
      const auto [b, e] = diffuse::static_range(static_cast<int64_t>(v.size()), t, threads);
      double part = 0;
      for (int64_t i = b; i < e; ++i) part += v[static_cast<size_t>(i)];
      expect += part;
    }
    CHECK(s1 == expect);
  }
}

TEST_CASE("an exception in any thread reaches the caller, after every thread has finished", "[parallel]") {
  ThreadsGuard guard;
  diffuse::set_num_threads(3);
  for (int thrower : {0, 1, 2}) {
    INFO("thrower " << thrower);
    std::atomic<int> finished{0};
    CHECK_THROWS_WITH(diffuse::parallel_region(3,
                                               [&](int t, int) {
                                                 if (t == thrower) throw std::runtime_error("boom " + std::to_string(t));
                                                 std::this_thread::sleep_for(std::chrono::milliseconds(10));
                                                 ++finished;
                                               }),
                      "boom " + std::to_string(thrower));
    CHECK(finished == 2);  // the others ran to the end before the caller saw the error
    CHECK_FALSE(diffuse::in_parallel());
    // The pool still works.
    std::atomic<int> n{0};
    diffuse::parallel_for(100, true, [&](int64_t) { ++n; });
    CHECK(n == 100);
  }
}

TEST_CASE("nested and concurrent regions run inline on the calling thread", "[parallel]") {
  ThreadsGuard guard;
  diffuse::set_num_threads(2);
  CHECK_FALSE(diffuse::in_parallel());
  // (No Catch2 assertion runs on a worker: they are not thread-safe. The workers count instead.)
  std::atomic<int> inner_team_max{0}, inner_calls{0}, outside{0}, nonzero_ids{0};
  diffuse::parallel_region(2, [&](int, int) {
    if (!diffuse::in_parallel()) ++outside;
    diffuse::parallel_region(2, [&](int t, int team) {
      if (t != 0) ++nonzero_ids;
      inner_team_max = std::max(inner_team_max.load(), team);
      ++inner_calls;
    });
  });
  CHECK(outside == 0);
  CHECK(nonzero_ids == 0);
  CHECK(inner_team_max == 1);
  CHECK(inner_calls == 2);

  // Two program threads at once: both finish, each iteration once (one may run inline).
  std::vector<std::atomic<int>> a(20000), b(20000);
  auto work = [](std::vector<std::atomic<int>>& v) {
    for (int rep = 0; rep < 50; ++rep)
      diffuse::parallel_for(static_cast<int64_t>(v.size()), true, [&](int64_t i) { ++v[static_cast<size_t>(i)]; });
  };
  std::thread other([&] { work(b); });
  work(a);
  other.join();
  int bad = 0;
  for (size_t i = 0; i < a.size(); ++i) bad += (a[i] != 50) + (b[i] != 50);
  CHECK(bad == 0);
}

TEST_CASE("idle workers sleep: no CPU time is used between regions", "[parallel]") {
  ThreadsGuard guard;
  diffuse::set_num_threads(2);
  std::atomic<int64_t> sink{0};
  for (int rep = 0; rep < 100; ++rep) diffuse::parallel_for(1000, true, [&](int64_t i) { sink += i; });
  std::this_thread::sleep_for(std::chrono::milliseconds(5));  // past the spin (50 us)
  const double c0 = process_cpu_seconds();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const double used = process_cpu_seconds() - c0;
  INFO("CPU seconds used while idle for 0.2 s: " << used);
  // A spinning worker would use ~0.2 s here (libgomp's default spin is milliseconds per gap, and
  // OMP_WAIT_POLICY=active spins forever); a sleeping one uses none.
  CHECK(used < 0.02);
}

TEST_CASE("the thread count from DIFFUSE_NUM_THREADS, then OMP_NUM_THREADS; bad values refused by name",
          "[parallel]") {
  using diffuse::detail::default_num_threads;
  {
    EnvGuard d("DIFFUSE_NUM_THREADS", "3"), o("OMP_NUM_THREADS", "5");
    CHECK(default_num_threads() == 3);
  }
  {
    EnvGuard d("DIFFUSE_NUM_THREADS", nullptr), o("OMP_NUM_THREADS", "5,2");
    CHECK(default_num_threads() == 5);
  }
  {
    EnvGuard d("DIFFUSE_NUM_THREADS", nullptr), o("OMP_NUM_THREADS", nullptr);
    CHECK(default_num_threads() == diffuse::detail::available_cpus());
    CHECK(default_num_threads() >= 1);
  }
  for (const char* bad : {"0", "-2", "two", "3x", "99999"}) {
    INFO(bad);
    EnvGuard d("DIFFUSE_NUM_THREADS", bad);
    CHECK_THROWS_WITH(default_num_threads(),
                      Catch::Contains("DIFFUSE_NUM_THREADS='" + std::string(bad) + "'") &&
                          Catch::Contains("expected a thread count"));
  }
  {
    EnvGuard d("DIFFUSE_NUM_THREADS", nullptr), o("OMP_NUM_THREADS", "lots");
    CHECK_THROWS_WITH(default_num_threads(), Catch::Contains("OMP_NUM_THREADS='lots'"));
  }
}

TEST_CASE("a child of fork() gets a pool of its own", "[parallel]") {
  ThreadsGuard guard;
  diffuse::set_num_threads(2);
  std::atomic<int> n{0};
  diffuse::parallel_for(1000, true, [&](int64_t) { ++n; });  // the parent's workers exist now
  REQUIRE(n == 1000);
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    alarm(10);  // a child waiting for workers it does not have would hang: SIGALRM ends it
    std::atomic<int> m{0};
    std::atomic<int> team_seen{0};
    diffuse::parallel_region(2, [&](int t, int team) {
      if (t == 0) team_seen = team;
      for (int i = 0; i < 500; ++i) ++m;
    });
    _exit(m == 1000 && team_seen == 2 ? 0 : 1);
  }
  int status = 0;
  REQUIRE(waitpid(pid, &status, 0) == pid);
  INFO("child status " << status);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}
