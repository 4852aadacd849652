// The trainers' data parallelism: `mpirun -np N build/examples/train_mnist ...` starts N ranks,
// each trains on its share of every batch (the library's loop, TrainOptions::comm), and rank 0
// alone prints, writes the log, checkpoints and samples. Started on its own a tool uses no MPI.
#pragma once

#include <diffuse/distributed/launch.hpp>

#include <cstdio>
#include <exception>
#include <memory>
#include <string>

namespace diffuse::examples {

struct Ranks {
  std::unique_ptr<Communicator> comm;  // null: this process alone

  bool lead() const { return !comm || comm->rank() == 0; }
  int size() const { return comm ? comm->size() : 1; }
  // ", 2 ranks (MPI (Open MPI v4.1.4), 2 processes)" for the tools' first line; "" alone.
  std::string describe() const {
    if (!comm) return "";
    return ", " + std::to_string(comm->size()) + (comm->size() == 1 ? " rank (" : " ranks (") + comm->describe() + ")";
  }
  // The tool's error: printed (by each rank that has it, named when there are several), then,
  // with several ranks, every rank ended: the others would wait for this one forever.
  int fail(const char* tool, const std::exception& e) const {
    if (comm && comm->size() > 1) {
      std::fprintf(stderr, "%s: rank %d: error: %s\n", tool, comm->rank(), e.what());
      comm->abort(1);
    }
    std::fprintf(stderr, "%s: error: %s\n", tool, e.what());
    return 1;
  }
};

// Call first in main (MPI may take its own arguments out of argv).
inline Ranks start_ranks(int& argc, char**& argv) { return Ranks{init_distributed(argc, argv)}; }

}  // namespace diffuse::examples
