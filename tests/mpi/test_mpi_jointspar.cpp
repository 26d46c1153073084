// JointSpar over MPI: 4 ranks train layered least squares with JointSpar and JointSpar-LARS and reproduce the in-process run bit for bit.
#include <doctest/doctest.h>
#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "gcomp/algo/jointspar.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/comm/mpi.hpp"
#include "least_squares.hpp"

using namespace gcomp::test::least_squares;

namespace {

constexpr int steps = 1000;
const gcomp::layout layered{{"l0", 8}, {"l1", 6}, {"l2", 4}, {"l3", 2}};

// What one worker saw: x after every step, then every step's probabilities.
struct run_record {
  std::vector<double> history;
  std::uint64_t bytes = 0;  // JointSpar's own count
  bool operator==(const run_record&) const = default;
};

template <class O, class Comm>
run_record run(const problem& p, Comm& comm, gcomp::jointspar<O> js) {
  run_record record;
  std::vector<double> x(dims, 0.0), g(dims);
  std::vector<std::size_t> rows(batch);
  for (int t = 0; t < steps; ++t) {
    js.begin_step();  // a real trainer would now skip the inactive layers' backward pass
    for (std::size_t k = 0; k < batch; ++k) rows[k] = batch_row(comm.rank(), t, k);
    add_gradient(p, rows, x.data(), g.data());
    js.finish_step(gcomp::host_seq{}, comm, layered, std::span<double>(x), std::span<const double>(g));
    record.history.insert(record.history.end(), x.begin(), x.end());
    record.history.insert(record.history.end(), js.probabilities().begin(), js.probabilities().end());
  }
  record.bytes = js.total_bytes();
  return record;
}

template <class O>
void check_mpi_matches_inproc(gcomp::mpi_comm& comm, const gcomp::jointspar<O>& prototype) {
  const problem p = make_problem(2024);
  std::vector<run_record> inproc(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& c) { inproc[std::size_t(c.rank())] = run(p, c, prototype); });
  for (int m = 1; m < workers; ++m) REQUIRE(inproc[std::size_t(m)] == inproc[0]);

  const gcomp::comm_stats before = comm.stats();
  const run_record mine = run(p, comm, prototype);
  const gcomp::comm_stats after = comm.stats();
  CHECK(mine == inproc[0]);  // bitwise: same sums in the same order, hence same masks and p
  // Per step: the active layers' all-reduce (counted in mine.bytes) and the
  // non-finite check's one-double all-reduce (core/nonfinite.hpp, on by default).
  const std::uint64_t check_bytes = std::uint64_t(steps) * sizeof(double);
  CHECK(after.bytes_sent - before.bytes_sent == mine.bytes + check_bytes);
  CHECK(after.bytes_received - before.bytes_received == mine.bytes + check_bytes);
  CHECK(after.collectives - before.collectives == 2 * std::uint64_t(steps));
  CHECK(mine.bytes < std::uint64_t(steps) * dims * sizeof(double));  // fewer than dense

  // Every rank holds rank 0's record, bit for bit.
  std::vector<double> root = mine.history;
  comm.broadcast(gcomp::host_seq{}, std::span<double>(root), 0);
  int same = root == mine.history;
  MPI_Allreduce(MPI_IN_PLACE, &same, 1, MPI_INT, MPI_MIN, comm.native());
  CHECK(same == 1);

  // And the run converged: within 1.5x the least-squares optimum's loss.
  const auto optimum = least_squares_optimum(p);
  const std::vector<double> x(mine.history.end() - std::ptrdiff_t(dims + layered.num_layers()),
                              mine.history.end() - std::ptrdiff_t(layered.num_layers()));
  CHECK(loss(p, x.data()) < 1.5 * loss(p, optimum.data()));
}

}  // namespace

TEST_CASE("mpi: JointSpar (SGD, bandit) over 4 ranks reproduces the in-process run bit for bit") {
  gcomp::mpi_comm comm(MPI_COMM_WORLD, {.summation = gcomp::mpi_summation::rank_ordered});
  REQUIRE(comm.size() == workers);
  check_mpi_matches_inproc(comm, gcomp::jointspar_sgd<double>(
                                     4, gcomp::sgd<double>({.lr = 0.01, .momentum = 0.9}),
                                     {.p_min = 0.1, .seed = 6}));
}

TEST_CASE("mpi: JointSpar-LARS (variance-optimal) over 4 ranks reproduces the in-process run bit for bit") {
  gcomp::mpi_comm comm(MPI_COMM_WORLD, {.summation = gcomp::mpi_summation::rank_ordered});
  REQUIRE(comm.size() == workers);
  check_mpi_matches_inproc(
      comm, gcomp::jointspar_lars<double>(
                4,
                gcomp::lars<double>({.lr = 0.5, .momentum = 0.9, .weight_decay = 0.0, .trust_coefficient = 0.01},
                                    gcomp::lr_schedule::cosine(0.5, steps)),
                {.p_min = 0.1, .rule = gcomp::probability_rule::variance_optimal, .seed = 6}));
}
