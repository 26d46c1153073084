// One rank fails before or during a collective; ctest requires the job to end fast, non-zero, with a clear message.
//
// Usage: rank_failure <scenario>, with 4 ranks; the scenarios:
//   throw_before  rank 1 throws before an allreduce_sum the others enter
//   throw_during  rank 1 rejects its own arguments inside an allgather the
//                 others have entered (no checks across ranks)
//   timeout       rank 2 hangs; the others' allreduce_sum times out
//   escape        rank 1's exception leaves mpi_environment's scope and is
//                 reported and aborted on by main, as tests/mpi/main.cpp does
// In the first three, every rank runs its part in gcomp::mpi_abort_on_exception.
#include <mpi.h>

#include <chrono>
#include <cstddef>
#include <cstdio>
#include <exception>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "gcomp/comm/mpi.hpp"
#include "gcomp/exec/host.hpp"

namespace {

// Where mpi_abort_on_exception's message goes: this program prints it.
void to_stderr(std::string_view message) {
  std::fprintf(stderr, "%.*s\n", static_cast<int>(message.size()), message.data());
  std::fflush(stderr);
}

void throw_before(gcomp::mpi_comm& comm) {
  if (comm.rank() == 1) throw gcomp::error("rank_failure: rank 1 fails before allreduce_sum");
  std::vector<double> x(8, 1.0);
  comm.allreduce_sum(gcomp::host_seq{}, std::span(x));
}

void throw_during(gcomp::mpi_comm& comm) {
  std::vector<std::byte> in(1), out(comm.rank() == 1 ? 3 : 4);
  comm.allgather(gcomp::host_seq{}, std::span<const std::byte>(in), std::span(out));
}

void timeout(gcomp::mpi_comm& comm) {
  // A hung rank: it neither fails nor joins; MPI_Abort from the others ends it.
  if (comm.rank() == 2) std::this_thread::sleep_for(std::chrono::minutes(5));
  std::vector<float> x(16, 1.0f);
  comm.allreduce_sum(gcomp::host_seq{}, std::span(x));
}

}  // namespace

int main(int argc, char** argv) {
  const std::string scenario = argc > 1 ? argv[1] : "";
  if (scenario == "escape") {
    try {
      gcomp::mpi_environment environment(argc, argv);
      gcomp::mpi_comm comm(MPI_COMM_WORLD);
      if (comm.rank() == 1) throw gcomp::error("rank_failure: rank 1 gives up");
      std::vector<int> x(4, 1);
      comm.allreduce_sum(gcomp::host_seq{}, std::span(x));
    } catch (const std::exception& e) {
      // Reached only with MPI still initialized: finalizing in the
      // environment's destructor would have waited for the other ranks.
      std::fprintf(stderr, "rank_failure: caught outside the environment: %s\n", e.what());
      std::fflush(stderr);
      MPI_Abort(MPI_COMM_WORLD, 4);
    }
    return 0;
  }

  gcomp::mpi_environment environment(argc, argv);
  gcomp::mpi_options options;
  if (scenario == "throw_during") options.check_across_ranks = false;
  if (scenario == "timeout") options.timeout = std::chrono::milliseconds(500);
  gcomp::mpi_comm comm(MPI_COMM_WORLD, options);
  gcomp::mpi_abort_on_exception(
      MPI_COMM_WORLD,
      [&] {
        if (scenario == "throw_before") throw_before(comm);
        else if (scenario == "throw_during") throw_during(comm);
        else if (scenario == "timeout") timeout(comm);
        else throw gcomp::error("rank_failure: unknown scenario '" + scenario + "'");
      },
      to_stderr, 3);
  return 0;
}
