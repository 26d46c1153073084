// End to end over MPI: 4 ranks train least squares with identity + allreduce + SGD and follow the in-process trajectory.
#include <doctest/doctest.h>
#include <mpi.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <utility>
#include <vector>

#include "gcomp/comm/mpi.hpp"
#include "gcomp/gcomp.hpp"
#include "least_squares.hpp"

using namespace gcomp::test::least_squares;

namespace {

constexpr int steps = 300;
const gcomp::sgd_options options{.lr = 0.02, .momentum = 0.9, .weight_decay = 0.0};

// The in-process run of the same problem (4 threads in this process): what
// every MPI rank compares its own trajectory with.
trajectory inproc_trajectory(const problem& p) {
  std::vector<trajectory> runs(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    runs[static_cast<std::size_t>(comm.rank())] = worker_trajectory(p, comm, options, steps).x;
  });
  for (int m = 1; m < workers; ++m) REQUIRE(runs[static_cast<std::size_t>(m)] == runs[0]);
  return runs[0];
}

// Whether every rank's final parameters have the same bits as rank 0's.
bool ranks_agree(gcomp::mpi_comm& comm, std::vector<double> x) {
  std::vector<double> root = x;
  comm.broadcast(gcomp::host_seq{}, std::span(root), 0);
  int same = std::memcmp(root.data(), x.data(), x.size() * sizeof(double)) == 0;
  MPI_Allreduce(MPI_IN_PLACE, &same, 1, MPI_INT, MPI_MIN, comm.native());
  return same == 1;
}

}  // namespace

TEST_CASE("mpi: rank-ordered all-reduce reproduces the in-process trajectory bit for bit") {
  gcomp::mpi_comm comm(MPI_COMM_WORLD, {.summation = gcomp::mpi_summation::rank_ordered});
  REQUIRE(comm.size() == workers);  // the problem has one shard per worker
  const problem p = make_problem(2024);
  const trajectory expected = inproc_trajectory(p);
  const auto run = worker_trajectory(p, comm, options, steps);
  CHECK(run.steps == std::uint64_t(steps));
  int differing_steps = 0;
  for (int t = 1; t <= steps; ++t)
    differing_steps += run.x[static_cast<std::size_t>(t)] != expected[static_cast<std::size_t>(t)];
  CHECK(differing_steps == 0);  // bitwise: the same sums in the same order
  // Per step, under the accounting rule: the non-finite check's all-reduce of
  // one double (core/nonfinite.hpp), then the all-reduce of 20 doubles.
  CHECK(comm.stats() ==
        gcomp::comm_stats{steps * (dims + 1) * 8, steps * (dims + 1) * 8, 2 * steps});
  CHECK(ranks_agree(comm, run.x.back()));
}

TEST_CASE("mpi: native all-reduce stays within 1e-6 of the in-process trajectory and converges") {
  // MPI_Allreduce may add the ranks' gradients in another order than
  // inproc's ((g0 + g1) + g2) + g3, so the check is relative, per step.
  gcomp::mpi_comm comm(MPI_COMM_WORLD);
  REQUIRE(comm.size() == workers);
  const problem p = make_problem(2024);
  const trajectory expected = inproc_trajectory(p);
  const trajectory reference = reference_trajectory(p, options, steps);
  const auto run = worker_trajectory(p, comm, options, steps);
  double worst = 0, worst_reference = 0;
  for (std::size_t t = 1; t <= static_cast<std::size_t>(steps); ++t) {
    worst = std::max(worst, relative_distance(run.x[t], expected[t]));
    worst_reference = std::max(worst_reference, relative_distance(run.x[t], reference[t]));
  }
  INFO("worst relative distance to inproc: " << worst << ", to single-process SGD: "
                                             << worst_reference);
  CHECK(worst < 1e-6);
  CHECK(worst_reference < 1e-6);
  CHECK(ranks_agree(comm, run.x.back()));

  // The same convergence bounds as the in-process test.
  const auto optimum = least_squares_optimum(p);
  const double best = loss(p, optimum.data());
  const double start = loss(p, reference[0].data());
  const double end = loss(p, run.x.back().data());
  INFO("start " << start << ", end " << end << ", optimum " << best);
  CHECK(end < 1.05 * best);
  CHECK(end < 1e-4 * start);
}
