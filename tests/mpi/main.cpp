// The doctest runner of the MPI tests: initializes MPI, runs the tests on every rank, and fails if any rank failed.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <mpi.h>

#include <cstdio>
#include <exception>

#include "gcomp/comm/mpi.hpp"

int main(int argc, char** argv) {
  try {
    gcomp::mpi_environment environment(argc, argv);
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    doctest::Context context;
    context.applyCommandLine(argc, argv);
    // Every rank runs every test (collectives need all of them); only rank 0
    // prints the summary, the others print nothing but their failures.
    if (rank != 0) context.setOption("minimal", true);
    int failed = context.run();
    if (context.shouldExit()) return failed;
    MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    return failed;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "MPI test runner: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);  // the other ranks would wait for this one forever
    return 1;
  }
}
