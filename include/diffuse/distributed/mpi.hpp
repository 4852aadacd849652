// MpiCommunicator: the processes that mpirun (or Slurm's srun) started, as a Communicator over
// MPI_COMM_WORLD. Needs <mpi.h>: link the diffuse::mpi target (CMake defines it when it finds MPI;
// Debian: libopenmpi-dev). The program's own code rarely names it: init_distributed()
// (distributed/launch.hpp) makes one when the process was started by an MPI launcher.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <stdexcept>
#include <string>

#include <diffuse/distributed/communicator.hpp>

namespace diffuse {

namespace detail {
inline void mpi_check(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw std::runtime_error(std::string("diffuse: ") + call + " failed: " + std::string(text, static_cast<size_t>(len)));
}
inline MPI_Op mpi_op(ReduceOp op) { return op == ReduceOp::sum ? MPI_SUM : op == ReduceOp::max ? MPI_MAX : MPI_MIN; }
}  // namespace detail

class MpiCommunicator final : public Communicator {
 public:
  // Initialises MPI (unless the program already did) and finalises it when destroyed, if it
  // initialised it. Errors come back as exceptions, not as MPI's default abort.
  MpiCommunicator(int* argc, char*** argv) {
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
      int provided = 0;
      detail::mpi_check(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
      owns_ = true;
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    MPI_Comm local;  // the processes that share this machine's memory: which GPU is ours
    detail::mpi_check(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &local),
                      "MPI_Comm_split_type");
    MPI_Comm_rank(local, &local_rank_);
    MPI_Comm_free(&local);
    char lib[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    MPI_Get_library_version(lib, &len);
    library_ = std::string(lib, static_cast<size_t>(len));
    if (const size_t cut = library_.find_first_of(",\n"); cut != std::string::npos) library_.resize(cut);
  }
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;
  ~MpiCommunicator() override {
    release_cuda_collectives();
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owns_ && !finalized) MPI_Finalize();
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_rank() const override { return local_rank_; }
  std::string describe() const override {
    return "MPI (" + library_ + "), " + std::to_string(size_) + (size_ == 1 ? " process" : " processes");
  }

  void all_reduce(float* x, size_t n, ReduceOp op) override { reduce(x, n, MPI_FLOAT, op); }
  void all_reduce(double* x, size_t n, ReduceOp op) override { reduce(x, n, MPI_DOUBLE, op); }
  void broadcast(void* bytes, size_t n, int root) override {
    auto* p = static_cast<unsigned char*>(bytes);
    for (size_t done = 0; done < n;) {  // MPI counts are int: 1 GiB at a time
      const int c = static_cast<int>(std::min<size_t>(n - done, size_t(1) << 30));
      detail::mpi_check(MPI_Bcast(p + done, c, MPI_BYTE, root, MPI_COMM_WORLD), "MPI_Bcast");
      done += static_cast<size_t>(c);
    }
  }
  void barrier() override { detail::mpi_check(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier"); }
  [[noreturn]] void abort(int code) override {
    std::fflush(stdout);
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);  // MPI_Abort does not return; should it, the process still ends
  }

 private:
  template <class T>
  void reduce(T* x, size_t n, MPI_Datatype type, ReduceOp op) {
    for (size_t done = 0; done < n;) {
      const int c = static_cast<int>(std::min<size_t>(n - done, size_t(1) << 28));
      detail::mpi_check(MPI_Allreduce(MPI_IN_PLACE, x + done, c, type, detail::mpi_op(op), MPI_COMM_WORLD),
                        "MPI_Allreduce");
      done += static_cast<size_t>(c);
    }
  }

  int rank_ = 0, size_ = 1, local_rank_ = 0;
  bool owns_ = false;
  std::string library_;
};

}  // namespace diffuse
