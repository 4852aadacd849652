// The processes of one data-parallel training run, as the library's loop sees them: a rank and a
// size, and the few collectives data parallelism needs (average the gradients, broadcast the
// initial weights, agree on a handful of scalars). Two implementations: SingleProcess (here, a
// group of one) and MpiCommunicator (distributed/mpi.hpp: Open MPI, started by mpirun or Slurm).
// On CUDA tensors the gradients go through NCCL (cuda_collectives(), set up on first use); where
// a program has no NCCL they go through host memory and these host collectives.
//
//   std::unique_ptr<Communicator> comm = init_distributed(argc, argv);  // distributed/launch.hpp
//   TrainOptions o;  o.comm = comm.get();  o.batch = 128;   // the global batch: 64 per rank on 2
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <diffuse/backend/cuda.hpp>

namespace diffuse {

enum class ReduceOp { sum, max, min };

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // The rank among the processes on this machine (which GPU to take).
  virtual int local_rank() const = 0;
  // "MPI (Open MPI v4.1.4), 2 processes", "one process".
  virtual std::string describe() const = 0;

  // In place on host arrays: element i becomes op over every rank's element i. Every rank calls
  // each collective, in the same order.
  virtual void all_reduce(float* x, size_t n, ReduceOp op) = 0;
  virtual void all_reduce(double* x, size_t n, ReduceOp op) = 0;
  // n bytes from rank `root` to every rank.
  virtual void broadcast(void* bytes, size_t n, int root) = 0;
  virtual void barrier() = 0;
  // Ends every process of the run now with `code`: a rank that failed calls this so that the
  // others stop instead of waiting for it in a collective.
  [[noreturn]] virtual void abort(int code) = 0;

  // NCCL among the same processes for CUDA arrays, set up on the first call (every rank must make
  // it at the same point); null when this program cannot use NCCL, with the reason in *why.
  backend::CudaCollectives* cuda_collectives(std::string* why) {
    if (cuda_tried_) {
      if (!cuda_ && why) *why = cuda_why_;
      return cuda_.get();
    }
    cuda_tried_ = true;
    backend::CudaBackend* be = backend::cuda_backend();
    cuda_why_ = be ? be->nccl_unavailable_reason() : "this program has no CUDA backend";
    // Every rank must take the same road: the first one that cannot use NCCL decides for all.
    double ok = cuda_why_.empty() ? 1.0 : 0.0;
    all_reduce(&ok, 1, ReduceOp::min);
    if (ok == 0.0 && cuda_why_.empty()) cuda_why_ = "another rank cannot use NCCL";
    if (!cuda_why_.empty()) {
      if (why) *why = cuda_why_;
      return nullptr;
    }
    std::vector<unsigned char> id = rank() == 0 ? be->nccl_unique_id() : std::vector<unsigned char>();
    uint64_t len = id.size();
    broadcast(&len, sizeof len, 0);
    id.resize(static_cast<size_t>(len));
    broadcast(id.data(), id.size(), 0);
    cuda_ = be->nccl_init(id, rank(), size());
    return cuda_.get();
  }

 protected:
  // Subclasses whose destructor ends the process group release NCCL first.
  void release_cuda_collectives() { cuda_.reset(); }

 private:
  std::unique_ptr<backend::CudaCollectives> cuda_;
  bool cuda_tried_ = false;
  std::string cuda_why_;
};

// A group of one: every collective leaves its data as it is. Given to a trainer, it runs the
// data-parallel code path with one rank (NCCL included on CUDA), which tests use; a plain single
// process passes no communicator at all.
class SingleProcess final : public Communicator {
 public:
  ~SingleProcess() override { release_cuda_collectives(); }
  int rank() const override { return 0; }
  int size() const override { return 1; }
  int local_rank() const override { return 0; }
  std::string describe() const override { return "one process"; }
  void all_reduce(float*, size_t, ReduceOp) override {}
  void all_reduce(double*, size_t, ReduceOp) override {}
  void broadcast(void*, size_t, int root) override {
    if (root != 0) throw std::invalid_argument("diffuse: broadcast from rank " + std::to_string(root) + " in a group of one");
  }
  void barrier() override {}
  [[noreturn]] void abort(int code) override { std::exit(code); }
};

}  // namespace diffuse
