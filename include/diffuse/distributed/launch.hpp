// init_distributed(): the one call a program makes to train on several processes. Started by an
// MPI launcher (mpirun -np N, mpiexec, Slurm's srun), it returns an MpiCommunicator over them and,
// on a machine with several GPUs, points this process at GPU local_rank % count; started on its
// own, it returns null and touches no MPI at all.
//
//   int main(int argc, char** argv) {
//     std::unique_ptr<Communicator> comm = init_distributed(argc, argv);
//     ...
//     TrainOptions o;  o.comm = comm.get();  // null: one process
//
// A program built without MPI (no diffuse::mpi) refuses to run as one of several ranks, in one
// line, rather than train several unrelated copies.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>

#include <diffuse/backend/cuda.hpp>
#include <diffuse/distributed/communicator.hpp>
#if defined(DIFFUSE_WITH_MPI) && DIFFUSE_WITH_MPI
#include <diffuse/distributed/mpi.hpp>
#endif

namespace diffuse {

// The number of processes an MPI launcher started with this one, read from the environment it
// sets (Open MPI, MPICH/Intel MPI's Hydra, PMI-2 and PMIx as Slurm's srun sets them); 0 when the
// process was not started by one.
inline int launcher_size() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"})
    if (const char* s = std::getenv(v)) {
      char* end = nullptr;
      const long n = std::strtol(s, &end, 10);
      if (end != s && *end == '\0' && n > 0) return static_cast<int>(n);
    }
  if (std::getenv("PMIX_RANK")) {  // PMIx without the size in the environment: Slurm gives it
    if (const char* s = std::getenv("SLURM_NTASKS")) return std::max(1, std::atoi(s));
    return 1;
  }
  return 0;
}

// Was this program built with MPI (the diffuse::mpi target)?
inline constexpr bool built_with_mpi() {
#if defined(DIFFUSE_WITH_MPI) && DIFFUSE_WITH_MPI
  return true;
#else
  return false;
#endif
}

inline std::unique_ptr<Communicator> init_distributed(int& argc, char**& argv) {
  const int launched = launcher_size();
  if (launched == 0) return nullptr;
#if defined(DIFFUSE_WITH_MPI) && DIFFUSE_WITH_MPI
  auto comm = std::make_unique<MpiCommunicator>(&argc, &argv);
  // Several GPUs on this machine: one per local rank (with one visible GPU per process, as Slurm's
  // --gpus-per-task gives, that is GPU 0).
  if (comm->size() > 1 && cuda_available()) {
    backend::CudaBackend& be = *backend::cuda_backend();
    if (const int n = be.device_count(); n > 1) be.set_device(comm->local_rank() % n);
  }
  return comm;
#else
  (void)argc, (void)argv;
  if (launched > 1)
    throw std::runtime_error("started as one of " + std::to_string(launched) +
                             " processes by an MPI launcher, but this program was built without MPI (install "
                             "libopenmpi-dev and rebuild: CMake then links diffuse::mpi); it would train " +
                             std::to_string(launched) + " unrelated copies");
  return nullptr;
#endif
}

}  // namespace diffuse
