// End to end: M = 4 in-process workers train least squares with identity + allreduce + SGD;
// the trajectory equals single-process SGD on the concatenated batch, and the loss converges.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <utility>
#include <vector>

#include "gcomp/gcomp.hpp"
#include "least_squares.hpp"

using namespace gcomp::test::least_squares;

TEST_CASE("4 workers with identity + allreduce + SGD follow single-process SGD on the joint batch") {
  const problem p = make_problem(2024);
  const gcomp::sgd_options options{.lr = 0.02, .momentum = 0.9, .weight_decay = 0.0};
  constexpr int steps = 300;

  // Reference: plain momentum SGD, one process, the 4 batches concatenated.
  const trajectory reference = reference_trajectory(p, options, steps);

  // Distributed: each worker sees only its own shard.
  std::vector<trajectory> worker_x(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    auto run = worker_trajectory(p, comm, options, steps);
    CHECK(run.steps == std::uint64_t(steps));
    worker_x[comm.rank()] = std::move(run.x);
  });

  double worst = 0;
  for (int t = 1; t <= steps; ++t) {
    for (int m = 1; m < workers; ++m) REQUIRE(worker_x[m][t] == worker_x[0][t]);  // bitwise
    worst = std::max(worst, relative_distance(worker_x[0][t], reference[t]));
  }
  INFO("worst relative distance to the single-process trajectory: " << worst);
  CHECK(worst < 1e-6);

  // Convergence: the loss ends within 5% of the least-squares optimum's
  // (about 5e-5 for noise of standard deviation 0.01; constant-step SGD keeps
  // a small noise floor above it) and 1e4 times below the start.
  const auto optimum = least_squares_optimum(p);
  const double best = loss(p, optimum.data());
  const double start = loss(p, reference[0].data());
  const double end = loss(p, worker_x[0][steps].data());
  INFO("start " << start << ", end " << end << ", optimum " << best);
  CHECK(best < 1e-4);
  CHECK(end < 1.05 * best);
  CHECK(end < 1e-4 * start);
}

TEST_CASE("float gradients on a host_par pool: workers agree bitwise and the loss falls") {
  const problem p = make_problem(7);
  const gcomp::layout lay{{"w", 16}, {"b", 4}};
  const gcomp::host_par pool(2);
  std::vector<std::vector<float>> final_x(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    gcomp::pipeline pipe{gcomp::identity<float>{}, gcomp::allreduce{},
                         gcomp::sgd<float>{{.lr = 0.02, .momentum = 0.9}}, /*seed=*/5};
    std::vector<float> x(dims, 0.0f), g(dims);
    for (int t = 0; t < 300; ++t) {
      std::vector<std::size_t> rows;
      for (std::size_t k = 0; k < batch; ++k) rows.push_back(batch_row(comm.rank(), t, k));
      add_gradient(p, rows, x.data(), g.data());
      pipe.step(pool, comm, lay, std::span<float>(x), std::span<const float>(g));
    }
    final_x[comm.rank()] = x;
  });
  for (int m = 1; m < workers; ++m) CHECK(final_x[m] == final_x[0]);
  const std::vector<double> x(final_x[0].begin(), final_x[0].end());
  const auto optimum = least_squares_optimum(p);
  CHECK(loss(p, x.data()) < 1.05 * loss(p, optimum.data()));
}

TEST_CASE("pipeline rejects mismatched spans before touching anything") {
  gcomp::inproc_group group(1);
  gcomp::pipeline pipe{gcomp::identity<float>{}, gcomp::allreduce{}, gcomp::sgd<float>{{.lr = 0.1}}};
  const gcomp::layout lay{3, 2};
  std::vector<float> x(5, 1.0f), g4(4, 1.0f), x6(6, 1.0f);
  CHECK_THROWS_WITH_AS(
      pipe.step(gcomp::host_seq{}, group.comm(0), lay, std::span<float>(x), std::span<const float>(g4)),
      "gcomp::pipeline::step: grads has size 4 but params has size 5; they must match", gcomp::error);
  CHECK_THROWS_WITH_AS(
      pipe.step(gcomp::host_seq{}, group.comm(0), lay, std::span<float>(x6), std::span<const float>(x6)),
      "gcomp::pipeline::step: params has size 6 but the layout covers 5 elements; they must match",
      gcomp::error);
  CHECK(x == std::vector<float>(5, 1.0f));
  CHECK(pipe.steps() == 0);

  gcomp::allreduce aggregate;
  gcomp::identity<float> c;
  std::vector<float> global(4);
  CHECK_THROWS_AS(aggregate.aggregate(gcomp::host_seq{}, group.comm(0), c,
                                      std::span<const float>(x), std::span<float>(global), {}),
                  gcomp::error);
}

TEST_CASE("an aggregator object serves one compressor type") {
  gcomp::inproc_group group(1);
  gcomp::allreduce aggregate;
  std::vector<float> g(3, 1.0f), out(3);
  std::vector<double> gd(3, 1.0), outd(3);
  gcomp::identity<float> cf;
  gcomp::identity<double> cd;
  aggregate.aggregate(gcomp::host_seq{}, group.comm(0), cf, std::span<const float>(g),
                      std::span<float>(out), {});
  CHECK(out == g);
  CHECK_THROWS_AS(aggregate.aggregate(gcomp::host_seq{}, group.comm(0), cd,
                                      std::span<const double>(gd), std::span<double>(outd), {}),
                  gcomp::error);
}
