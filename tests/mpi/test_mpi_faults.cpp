// Tests of comm/mpi.hpp's timeouts under mpiexec: the same results with one, and a throw, not a hang, for a rank that does not join.
#include <doctest/doctest.h>
#include <mpi.h>

#include <chrono>
#include <cstddef>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "comm_suite.hpp"
#include "gcomp/comm/mpi.hpp"
#include "gcomp/exec/host.hpp"

namespace {

using gcomp::host_seq;
using gcomp::mpi_comm;
using gcomp::mpi_options;
using gcomp::mpi_summation;
using namespace std::chrono_literals;

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int m = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &m);
  return m;
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const gcomp::error& e) {
    return e.what();
  }
  return {};
}

mpi_options with_timeout(std::chrono::nanoseconds t,
                         mpi_summation summation = mpi_summation::native, bool check = true) {
  mpi_options o;
  o.summation = summation;
  o.check_across_ranks = check;
  o.timeout = t;
  return o;
}

constexpr const char* advice =
    ": another rank failed, hangs or made a different call. The operation stays pending and owns "
    "its buffers, so this communicator cannot be used again: end the job (MPI_Abort; see "
    "gcomp::mpi_abort_on_exception)";

}  // namespace

TEST_CASE("mpi faults: with a timeout the suite passes, results and byte counts as without") {
  // Non-blocking forms polled to completion: every operation, in pieces too.
  for (auto summation : {mpi_summation::native, mpi_summation::rank_ordered}) {
    CAPTURE(static_cast<int>(summation));
    const bool exact = summation == mpi_summation::rank_ordered;
    mpi_comm comm(MPI_COMM_WORLD, with_timeout(60s, summation));
    gcomp::test::run_comm_suite(host_seq{}, comm, {.exact_order = exact});
    mpi_options pieces = with_timeout(60s, summation);
    pieces.max_count = 7;
    mpi_comm split(MPI_COMM_WORLD, pieces);
    gcomp::test::run_comm_suite(host_seq{}, split, {.exact_order = exact, .large = 3001});
    CHECK_FALSE(comm.timed_out());
    CHECK_FALSE(split.timed_out());
  }
  mpi_comm unchecked(MPI_COMM_WORLD, with_timeout(60s, mpi_summation::native, false));
  gcomp::test::run_comm_suite(host_seq{}, unchecked, {.exact_order = false});
}

TEST_CASE("mpi faults: the timeout must be positive; no_timeout is the default") {
  CHECK(mpi_options{}.timeout == mpi_options::no_timeout);
  CHECK(error_of([] { mpi_comm comm(MPI_COMM_WORLD, with_timeout(0ns)); }) ==
        "gcomp::mpi_comm::mpi_comm: options.timeout must be > 0 (mpi_options::no_timeout waits "
        "forever), got 0 s");
  CHECK(error_of([] { mpi_comm comm(MPI_COMM_WORLD, with_timeout(-2s)); }) ==
        "gcomp::mpi_comm::mpi_comm: options.timeout must be > 0 (mpi_options::no_timeout waits "
        "forever), got -2 s");
}

TEST_CASE("mpi faults: a rank that does not join makes the others time out, then refuse") {
  const int rank = world_rank(), size = world_size();
  const int absent = size - 1;  // the last rank; with one rank, nobody waits for it
  const std::string of = " of " + std::to_string(size);
  {
    mpi_comm comm(MPI_COMM_WORLD, with_timeout(300ms, mpi_summation::native, false));
    if (rank != absent) {
      const auto start = std::chrono::steady_clock::now();
      const std::string message = error_of([&] { comm.barrier(); });
      const auto took = std::chrono::steady_clock::now() - start;
      CHECK(message == "gcomp::mpi_comm::barrier: MPI_Ibarrier did not complete within the "
                       "timeout of 300 ms on rank " + std::to_string(rank) + of + advice);
      CHECK(took >= 300ms);
      CHECK(took < 10s);
      CHECK(comm.timed_out());
      CHECK(error_of([&] { comm.barrier(); }) ==
            "gcomp::mpi_comm::barrier: an earlier operation timed out (gcomp::mpi_comm::barrier: "
            "MPI_Ibarrier did not complete within the timeout of 300 ms on rank " +
                std::to_string(rank) + of + "), so this communicator cannot be used again");
      std::vector<float> x(3, 1.0f);
      CHECK(error_of([&] { auto r = comm.iallreduce_sum(host_seq{}, std::span(x)); }).find(
                "gcomp::mpi_comm::iallreduce_sum: an earlier operation timed out") == 0);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    // The absent rank joins late, so the abandoned operations complete and the
    // job can end normally.
    if (rank == absent) {
      MPI_Request late = MPI_REQUEST_NULL;
      MPI_Ibarrier(comm.native(), &late);
      MPI_Wait(&late, MPI_STATUS_IGNORE);
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);

  // A request's wait() with the timeout. The abandoned operation may write
  // its buffer until it completes, so the buffer lives to the end of the process.
  static std::vector<double> kept(5);
  {
    mpi_comm comm(MPI_COMM_WORLD, with_timeout(300ms));
    if (rank != absent) {
      for (double& v : kept) v = rank + 1.0;
      auto request = comm.iallreduce_sum(host_seq{}, std::span(kept));
      CHECK(error_of([&] { request.wait(); }) ==
            "gcomp::mpi_request::wait: the iallreduce_sum of 5 elements did not complete within "
            "the timeout of 300 ms on rank " + std::to_string(rank) + of + advice);
      CHECK(comm.timed_out());
    }
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == absent) {
      for (double& v : kept) v = rank + 1.0;
      MPI_Request late = MPI_REQUEST_NULL;
      MPI_Iallreduce(MPI_IN_PLACE, kept.data(), 5, MPI_DOUBLE, MPI_SUM, comm.native(), &late);
      MPI_Wait(&late, MPI_STATUS_IGNORE);
      // The others' contributions did arrive: 1 + 2 + ... + size.
      CHECK(kept == std::vector<double>(5, size * (size + 1) / 2.0));
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

TEST_CASE("mpi faults: mpi_abort_on_exception runs the body and returns when nothing throws") {
  int ran = 0, reports = 0;
  gcomp::mpi_abort_on_exception(
      MPI_COMM_WORLD, [&] { ++ran; }, [&](std::string_view) { ++reports; });
  CHECK(ran == 1);
  CHECK(reports == 0);
}
