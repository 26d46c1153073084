// RI-SGD over MPI: 4 ranks reproduce the in-process run bit for bit, and after rank 3 leaves the 3
// survivors (MPI_Comm_split) reproduce the in-process survivors.
#include <doctest/doctest.h>
#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "gcomp/algo/ri_sgd.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/comm/mpi.hpp"
#include "least_squares.hpp"

using namespace gcomp::test::least_squares;

namespace {

constexpr std::size_t period = 5, steps_before = 50, steps_after = 50;
constexpr int lost = 3;

gcomp::ri_sgd_options options() {
  gcomp::ri_sgd_options o;
  o.redundancy = 0.25;  // mu * M = 1: every shard survives the loss of one worker
  o.period = period;
  o.own_batch = 16;
  o.seed = 8;
  o.optimizer = {.lr = 0.01, .momentum = 0.9, .weight_decay = 2e-4};
  return o;
}

// One worker's local steps; x after each step is appended to `path`.
template <class Comm>
void run_steps(const problem& p, gcomp::ri_sgd<double>& ri, Comm& comm, std::vector<double>& x,
               std::size_t steps, trajectory& path) {
  const gcomp::layout lay{{"w", 16}, {"b", 4}};
  std::vector<std::size_t> rows;
  std::vector<double> g(dims);
  for (std::size_t t = 0; t < steps; ++t) {
    const auto batch = ri.batch();
    rows.assign(batch.begin(), batch.end());
    add_gradient(p, rows, x.data(), g.data());
    ri.step(gcomp::host_seq{}, comm, lay, std::span<double>(x), std::span<const double>(g));
    path.push_back(x);
  }
}

// The same training with 4 threads, then 3: every worker's path.
std::vector<trajectory> inproc_paths(const problem& p) {
  std::vector<gcomp::ri_sgd<double>> ri;
  for (int m = 0; m < workers; ++m) ri.emplace_back(p.rows(), workers, m, options());
  std::vector<std::vector<double>> xs(workers, std::vector<double>(dims, 0.0));
  std::vector<trajectory> paths(workers);
  gcomp::inproc_group all(workers);
  all.run([&](gcomp::inproc_comm& comm) {
    const auto m = std::size_t(comm.rank());
    run_steps(p, ri[m], comm, xs[m], steps_before, paths[m]);
  });
  for (auto& r : ri) REQUIRE(r.remove_worker(lost));
  gcomp::inproc_group rest(workers - 1);
  rest.run([&](gcomp::inproc_comm& comm) {
    const auto m = std::size_t(comm.rank());  // survivors 0, 1, 2 keep their ranks
    run_steps(p, ri[m], comm, xs[m], steps_after, paths[m]);
  });
  return paths;
}

}  // namespace

TEST_CASE(
    "mpi: RI-SGD on 4 ranks, then on 3 after one leaves, matches the in-process run bitwise") {
  const gcomp::mpi_options ordered{.summation = gcomp::mpi_summation::rank_ordered};
  gcomp::mpi_comm world(MPI_COMM_WORLD, ordered);
  REQUIRE(world.size() == workers);
  const int rank = world.rank();
  const problem p = make_problem(2024);
  const std::vector<trajectory> expected = inproc_paths(p);

  gcomp::ri_sgd<double> ri(p.rows(), workers, rank, options());
  std::vector<double> x(dims, 0.0);
  trajectory path;
  run_steps(p, ri, world, x, steps_before, path);
  // The rounds of the first phase: one all-reduce of 20 doubles each.
  constexpr std::uint64_t rounds_before = steps_before / period;
  CHECK(world.stats() ==
        gcomp::comm_stats{rounds_before * dims * 8, rounds_before * dims * 8, rounds_before});

  // Rank 3 leaves; the others split off a communicator ordered by their old rank.
  CHECK(ri.remove_worker(lost));
  CHECK(ri.covered());
  MPI_Comm split = MPI_COMM_NULL;
  REQUIRE(MPI_Comm_split(MPI_COMM_WORLD, rank == lost ? MPI_UNDEFINED : 0, rank, &split) ==
          MPI_SUCCESS);
  if (rank != lost) {
    {
      gcomp::mpi_comm survivors(split, ordered);
      CHECK(survivors.rank() == ri.plan().survivor_rank(rank));
      run_steps(p, ri, survivors, x, steps_after, path);
      constexpr std::uint64_t rounds_after = steps_after / period;
      CHECK(survivors.stats() ==
            gcomp::comm_stats{rounds_after * dims * 8, rounds_after * dims * 8, rounds_after});
    }
    MPI_Comm_free(&split);
  }

  const trajectory& mine = expected[std::size_t(rank)];
  const std::size_t length = rank == lost ? steps_before : steps_before + steps_after;
  REQUIRE(path.size() == length);
  int differing_steps = 0;
  for (std::size_t t = 0; t < length; ++t) differing_steps += path[t] != mine[t];
  CHECK(differing_steps == 0);  // the same sums in the same order

  // After the last round the survivors hold the same model: compare with rank 0's.
  std::vector<double> root = x;
  world.broadcast(gcomp::host_seq{}, std::span<double>(root), 0);
  if (rank != lost) CHECK(root == x);
}
