// Divisible Adam over MPI: 4 ranks reproduce the in-process foreground bit for bit, and with the
// background (MPI non-blocking all-reduce) they converge, agree, and account every byte.
#include <doctest/doctest.h>
#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "gcomp/algo/divcomm.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/comm/mpi.hpp"
#include "least_squares.hpp"

using namespace gcomp::test::least_squares;
using gcomp::background_payload;

namespace {

constexpr int steps = 1500;

struct outcome {
  trajectory x;  // x after each step (x_0 = 0 first), the last one after finish()
  gcomp::comm_stats seen, foreground, background;
  gcomp::background_counters counters;
};

// The non-finite check (core/nonfinite.hpp, on by default) all-reduces one
// double per step, which comm.stats() counts and neither of divcomm's tallies does.
const gcomp::comm_stats check{steps * sizeof(double), steps * sizeof(double), steps};

// One rank: its own shard, divisible Adam with a block of a quarter of the
// model and a cosine learning rate, then finish().
template <class Comm>
outcome run(const problem& p, Comm& comm, background_payload payload) {
  const gcomp::layout lay{{"w", 16}, {"b", 4}};
  gcomp::divcomm<double> d(gcomp::random_contiguous_block<double, gcomp::rescale::none>({.ratio = 0.25}),
                           {.payload = payload, .delay = 1}, {}, /*seed=*/11);
  d.optimizer.set_schedule(gcomp::lr_schedule::cosine(0.05, steps));
  outcome out;
  std::vector<double> x(dims, 0.0), g(dims);
  out.x.push_back(x);
  for (int t = 0; t < steps; ++t) {
    std::vector<std::size_t> rows;
    for (std::size_t k = 0; k < batch; ++k) rows.push_back(batch_row(comm.rank(), t, k));
    add_gradient(p, rows, x.data(), g.data());
    d.step(gcomp::host_seq{}, comm, lay, std::span<double>(x), std::span<const double>(g));
    out.x.push_back(x);
  }
  d.finish(gcomp::host_seq{}, comm, std::span<double>(x));
  out.x.back() = x;
  out.seen = comm.stats();
  out.foreground = d.foreground_stats();
  out.background = d.background_stats();
  out.counters = d.aggregator.counters();
  return out;
}

}  // namespace

TEST_CASE("mpi: divisible Adam without background reproduces the in-process run bit for bit") {
  gcomp::mpi_comm comm(MPI_COMM_WORLD, {.summation = gcomp::mpi_summation::rank_ordered});
  REQUIRE(comm.size() == workers);
  const problem p = make_problem(2024);
  trajectory expected;
  {
    gcomp::inproc_group group(workers);
    std::vector<trajectory> runs(workers);
    group.run([&](gcomp::inproc_comm& c) {
      runs[static_cast<std::size_t>(c.rank())] = run(p, c, background_payload::none).x;
    });
    expected = runs[0];
  }
  const outcome mine = run(p, comm, background_payload::none);
  int differing_steps = 0;
  for (std::size_t t = 0; t < mine.x.size(); ++t) differing_steps += mine.x[t] != expected[t];
  CHECK(differing_steps == 0);
  // One all-reduce of a 5-double block per step, nothing in the background.
  CHECK(mine.foreground == gcomp::comm_stats{steps * 5 * 8, steps * 5 * 8, steps});
  CHECK(mine.background == gcomp::comm_stats{});
  CHECK(mine.seen == mine.foreground + check);
}

TEST_CASE("mpi: with a background payload, divisible Adam converges and the ranks agree") {
  const problem p = make_problem(2024);
  const auto optimum = least_squares_optimum(p);
  const double best = loss(p, optimum.data());
  for (background_payload payload : {background_payload::parameters, background_payload::residual}) {
    for (auto summation : {gcomp::mpi_summation::rank_ordered, gcomp::mpi_summation::native}) {
      CAPTURE(static_cast<int>(payload));
      CAPTURE(static_cast<int>(summation));
      gcomp::mpi_comm comm(MPI_COMM_WORLD, {.summation = summation});
      const outcome mine = run(p, comm, payload);
      const double end = loss(p, mine.x.back().data());
      INFO("end " << end << ", optimum " << best << ", applied " << mine.counters.applied
                  << ", skipped " << mine.counters.skipped << ", pending checks "
                  << mine.counters.pending_checks);
      CHECK(end < 1.01 * best);
      CHECK(mine.counters.applied > 0);
      CHECK(mine.counters.started == mine.counters.applied + mine.counters.skipped);
      CHECK(mine.foreground + mine.background + check == mine.seen);
      // Rank-ordered sums are the same bits on every rank, and with 4 ranks
      // the average of equal values is exact: the ranks agree bit for bit.
      // MPI's own reduction may round differently per rank, so only closeness.
      // (A failed check on any rank fails the program: tests/mpi/main.cpp.)
      std::vector<double> root = mine.x.back();
      comm.broadcast(gcomp::host_seq{}, std::span(root), 0);
      if (summation == gcomp::mpi_summation::rank_ordered) CHECK(mine.x.back() == root);
      CHECK(relative_distance(mine.x.back(), root) < 1e-9);
    }
  }
}
