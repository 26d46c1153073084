// RI-SGD and local SGD on non-iid least squares: tau = 1 is synchronous SGD, redundancy shrinks
// disagreement and loss, training survives a lost worker.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "gcomp/algo/ri_sgd.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/core/random.hpp"
#include "least_squares.hpp"

using namespace gcomp::test::least_squares;

namespace {

const gcomp::layout lay{{"w", 16}, {"b", 4}};

// Strongly non-iid least squares over `workers` shards of rows_per_worker
// rows: shard m has its own optimum (a common standard normal vector plus
// `shift` times one of its own) and its own feature scale 1 + spread * m, so
// the local objectives differ in both minimiser and curvature. Drawn from
// Philox streams, so the problem is a pure function of the seed.
problem make_noniid(unsigned seed, double shift = 1.0, double spread = 0.5) {
  const gcomp::rng_key features{seed, 0, 0}, optima = features.fork(1), noise = features.fork(2);
  problem p;
  p.a.resize(workers * rows_per_worker * dims);
  p.b.resize(workers * rows_per_worker);
  for (std::size_t r = 0; r < p.rows(); ++r) {
    const std::size_t m = r / rows_per_worker;
    double dot = 0;
    for (std::size_t j = 0; j < dims; ++j) {
      const double optimum =
          gcomp::normal(optima, j) + shift * gcomp::normal(optima, (m + 1) * dims + j);
      p.a[r * dims + j] = (1.0 + spread * double(m)) * gcomp::normal(features, r * dims + j);
      dot += p.a[r * dims + j] * optimum;
    }
    p.b[r] = dot + 0.01 * gcomp::normal(noise, r);
  }
  return p;
}

// The mean loss over the rows of one shard.
double shard_loss(const problem& p, const std::vector<double>& x, int shard) {
  problem part;
  const std::size_t first = std::size_t(shard) * rows_per_worker;
  part.a.assign(p.a.begin() + std::ptrdiff_t(first * dims),
                p.a.begin() + std::ptrdiff_t((first + rows_per_worker) * dims));
  part.b.assign(p.b.begin() + std::ptrdiff_t(first),
                p.b.begin() + std::ptrdiff_t(first + rows_per_worker));
  return loss(part, x.data());
}

// `steps` local steps of one worker: gradient on ri.batch(), then ri.step().
// Returns the sum of this worker's disagreement before each average (0 when
// not measured).
template <class Comm>
double train(const problem& p, gcomp::ri_sgd<double>& ri, Comm& comm, std::vector<double>& x,
             std::size_t steps) {
  std::vector<std::size_t> rows;
  std::vector<double> g(dims);
  double disagreement = 0;
  for (std::size_t t = 0; t < steps; ++t) {
    const auto batch = ri.batch();
    rows.assign(batch.begin(), batch.end());
    add_gradient(p, rows, x.data(), g.data());
    const bool averaged =
        ri.step(gcomp::host_seq{}, comm, lay, std::span<double>(x), std::span<const double>(g));
    if (averaged && ri.options().measure_disagreement) disagreement += ri.last_disagreement();
  }
  return disagreement;
}

gcomp::ri_sgd_options options_for(double mu, std::size_t period, double lr, std::uint64_t seed) {
  gcomp::ri_sgd_options o;
  o.redundancy = mu;
  o.period = period;
  o.own_batch = 32;
  o.seed = seed;
  o.optimizer = {.lr = lr, .momentum = 0.9, .weight_decay = 0.0};
  o.measure_disagreement = true;
  return o;
}

struct run_result {
  double disagreement = 0;  // summed over workers and rounds
  std::vector<double> x;    // the averaged model at the end (the same on all workers)
};

run_result run(const problem& p, double mu, std::size_t period, std::size_t rounds, double lr,
               std::uint64_t seed) {
  std::vector<std::vector<double>> xs(workers);
  std::vector<double> disagreement(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    const auto m = std::size_t(comm.rank());
    gcomp::ri_sgd<double> ri(p.rows(), workers, comm.rank(), options_for(mu, period, lr, seed));
    std::vector<double> x(dims, 0.0);
    disagreement[m] = train(p, ri, comm, x, period * rounds);
    CHECK(ri.rounds() == rounds);
    // One all-reduce of the 20 parameters per round, as the communicator counted.
    CHECK(ri.traffic() == gcomp::comm_stats{rounds * dims * 8, rounds * dims * 8, rounds});
    CHECK(ri.traffic() == comm.stats());
    xs[m] = x;
  });
  for (int m = 1; m < workers; ++m) CHECK(xs[std::size_t(m)] == xs[0]);  // bitwise after a round
  run_result r;
  for (double d : disagreement) r.disagreement += d;
  r.x = xs[0];
  return r;
}

}  // namespace

TEST_CASE("ri_sgd with tau = 1 equals synchronous momentum SGD on the workers' batches") {
  const problem p = make_problem(2024);
  constexpr int steps = 40;
  for (double mu : {0.0, 0.5}) {
    CAPTURE(mu);
    gcomp::ri_sgd_options o;
    o.redundancy = mu;
    o.period = 1;
    o.own_batch = 16;
    o.seed = 3;
    o.optimizer = {.lr = 0.01, .momentum = 0.9, .weight_decay = 2e-4};

    // The oracle: one model, the mean of the workers' gradients, torch-style
    // momentum SGD with weight decay. The batches come from the same plan.
    const gcomp::shard_plan plan(p.rows(), workers, mu);
    trajectory expected(steps, std::vector<double>(dims));
    std::vector<double> x(dims, 0.0), buf(dims, 0.0), g(dims), mean(dims);
    for (int t = 0; t < steps; ++t) {
      std::fill(mean.begin(), mean.end(), 0.0);
      for (int m = 0; m < workers; ++m) {
        const gcomp::shard_sampler sampler(plan, m, o.own_batch, o.seed);
        std::vector<std::size_t> rows(sampler.batch_size());
        sampler.sample(std::uint64_t(t), rows);
        add_gradient(p, rows, x.data(), g.data());
        for (std::size_t j = 0; j < dims; ++j) mean[j] += g[j] / workers;
      }
      for (std::size_t j = 0; j < dims; ++j) {
        const double d = mean[j] + o.optimizer.weight_decay * x[j];
        buf[j] = t == 0 ? d : o.optimizer.momentum * buf[j] + d;
        x[j] -= o.optimizer.lr * buf[j];
      }
      expected[std::size_t(t)] = x;
    }

    std::vector<double> worst(workers, 0.0);
    gcomp::inproc_group group(workers);
    group.run([&](gcomp::inproc_comm& comm) {
      gcomp::ri_sgd<double> ri(p.rows(), workers, comm.rank(), o);
      std::vector<double> w(dims, 0.0);
      for (int t = 0; t < steps; ++t) {
        train(p, ri, comm, w, 1);
        worst[std::size_t(comm.rank())] = std::max(worst[std::size_t(comm.rank())],
                                                   relative_distance(w, expected[std::size_t(t)]));
      }
    });
    // Local momentum plus parameter averaging every step is algebraically the
    // same recursion on the mean; only rounding differs (about 1e-16 per step).
    for (double d : worst) CHECK(d < 1e-12);
  }
}

TEST_CASE("redundancy shrinks the workers' disagreement and the loss after R rounds") {
  // Why this is robust: the shards differ in optimum and curvature, so local
  // SGD's averaged model is pulled away from the global optimum by a bias
  // that grows with lr * tau * (dissimilarity of the local objectives), and
  // each worker's models drift apart by the same mechanism. Holding mu * M of
  // the neighbours' shards makes every local objective an average over
  // 1 + mu * M shards, which shrinks the dissimilarity deterministically; the
  // sampling noise (32 draws per shard per step) is small against it. Over
  // problem seeds 1..20 (same settings) the smallest ratios measured were
  // 1.70 (disagreement, mu 0 / 0.25), 2.51 (excess loss, mu 0 / 0.25), 1.96
  // and 2.25 (the same, mu 0.25 / 0.5); the test asks for 1.25.
  constexpr std::size_t period = 20, rounds = 40;
  constexpr double lr = 0.005;
  for (unsigned seed : {1u, 2u, 3u}) {
    CAPTURE(seed);
    const problem p = make_noniid(seed);
    const std::vector<double> optimum = least_squares_optimum(p);
    const double best = loss(p, optimum.data());
    const run_result local = run(p, 0.0, period, rounds, lr, seed);
    const run_result ri25 = run(p, 0.25, period, rounds, lr, seed);
    const run_result ri50 = run(p, 0.5, period, rounds, lr, seed);
    const double excess[] = {loss(p, local.x.data()) - best, loss(p, ri25.x.data()) - best,
                             loss(p, ri50.x.data()) - best};
    INFO("disagreement " << local.disagreement << " " << ri25.disagreement << " "
                         << ri50.disagreement << "; excess loss " << excess[0] << " " << excess[1]
                         << " " << excess[2]);
    CHECK(excess[2] > 0);
    CHECK(local.disagreement > 1.25 * ri25.disagreement);
    CHECK(ri25.disagreement > 1.25 * ri50.disagreement);
    CHECK(excess[0] > 1.25 * excess[1]);
    CHECK(excess[1] > 1.25 * excess[2]);
  }
}

TEST_CASE("training goes on over the survivors after a worker is removed") {
  const problem p = make_noniid(4);
  const std::vector<double> optimum = least_squares_optimum(p);
  constexpr std::size_t period = 20, rounds_before = 20, rounds_after = 20;
  constexpr int lost = 2;
  const int survivors[] = {0, 1, 3};

  struct outcome {
    double excess_loss;  // over the whole data set, after the survivors' rounds
    double lost_shard;   // the mean loss on the lost worker's shard
  };
  // 4 workers train, worker 2 leaves, the other 3 go on as ranks 0, 1, 2 of a new group.
  auto lose_a_worker = [&](double mu, bool expect_covered) {
    std::vector<gcomp::ri_sgd<double>> ri;
    for (int m = 0; m < workers; ++m)
      ri.emplace_back(p.rows(), workers, m, options_for(mu, period, 0.005, 4));
    std::vector<std::vector<double>> xs(workers, std::vector<double>(dims, 0.0));
    gcomp::inproc_group all(workers);
    all.run([&](gcomp::inproc_comm& comm) {
      const auto m = std::size_t(comm.rank());
      train(p, ri[m], comm, xs[m], period * rounds_before);
    });
    for (auto& r : ri) CHECK(r.remove_worker(lost) == expect_covered);
    CHECK(ri[0].uncovered_shards() ==
          (expect_covered ? std::vector<int>{} : std::vector<int>{lost}));
    CHECK_THROWS_WITH_AS(train(p, ri[lost], all.comm(lost), xs[lost], 1),
                         "gcomp::ri_sgd::step: worker 2 was removed from the group and cannot step",
                         gcomp::error);

    gcomp::inproc_group rest(3);
    rest.run([&](gcomp::inproc_comm& comm) {
      const auto w = std::size_t(survivors[comm.rank()]);
      train(p, ri[w], comm, xs[w], period * rounds_after);
      // Every round all-reduced the 20 parameters over the 3 survivors.
      constexpr std::uint64_t bytes = rounds_after * dims * 8;
      CHECK(comm.stats() == gcomp::comm_stats{bytes, bytes, rounds_after});
      CHECK(ri[w].traffic().bytes_sent == (rounds_before + rounds_after) * dims * 8);
      CHECK(ri[w].rounds() == rounds_before + rounds_after);
    });
    for (int w : survivors) CHECK(xs[std::size_t(w)] == xs[0]);  // the survivors' mean, bitwise
    return outcome{loss(p, xs[0].data()) - loss(p, optimum.data()), shard_loss(p, xs[0], lost)};
  };

  // With mu * M = 1 worker 1 still trains on all of shard 2; mu * M = 0.5
  // keeps half of it and mu = 0 none. Over problem seeds 1..20 the lost
  // shard's loss was at least 1.40 times higher with mu = 0 than with
  // mu = 0.25 and the excess loss at least 1.42 times; the lost shard's loss
  // always fell with mu.
  const outcome kept = lose_a_worker(0.25, true);
  const outcome half = lose_a_worker(0.125, false);
  const outcome dropped = lose_a_worker(0.0, false);
  INFO("loss on the lost worker's shard: "
       << kept.lost_shard << " " << half.lost_shard << " " << dropped.lost_shard << "; excess loss "
       << kept.excess_loss << " " << half.excess_loss << " " << dropped.excess_loss);
  CHECK(dropped.lost_shard > 1.25 * kept.lost_shard);
  CHECK(dropped.lost_shard > half.lost_shard);
  CHECK(dropped.excess_loss > 1.25 * kept.excess_loss);
}

TEST_CASE("ri_sgd's batch is the sampler's for the current step and changes with the step") {
  const problem p = make_problem(1);
  gcomp::inproc_group group(1);
  gcomp::ri_sgd<double> ri(p.rows(), 1, 0, gcomp::local_sgd_options());
  const gcomp::shard_sampler sampler(ri.plan(), 0, ri.options().own_batch, ri.options().seed);
  std::vector<std::size_t> expected(sampler.batch_size());
  sampler.sample(0, expected);
  const auto first = ri.batch();
  CHECK(std::vector<std::size_t>(first.begin(), first.end()) == expected);
  std::vector<double> x(dims, 0.0);
  train(p, ri, group.comm(0), x, 1);
  sampler.sample(1, expected);
  const auto second = ri.batch();
  CHECK(std::vector<std::size_t>(second.begin(), second.end()) == expected);
}

TEST_CASE("local_sgd is ri_sgd with mu = 0 and the paper's other defaults") {
  const auto local = gcomp::local_sgd<float>(400, 4, 1);
  CHECK(local.plan().redundancy() == 0.0);
  CHECK(local.plan().parts(1).size() == 1);
  CHECK(local.options().period == 50);
  CHECK(local.optimizer().options().momentum == 0.9);
  CHECK(local.optimizer().options().weight_decay == 2e-4);
  const gcomp::ri_sgd<float> ri(400, 8, 1);
  CHECK(ri.plan().redundancy() == 0.25);
  CHECK(ri.plan().parts(1).size() == 3);  // own shard + 2 neighbours, as in the authors' code
  CHECK_THROWS_WITH_AS(gcomp::local_sgd<float>(400, 4, 1, gcomp::ri_sgd_options{}),
                       "gcomp::local_sgd: redundancy must be 0 for local SGD (use ri_sgd for mu > "
                       "0), got 0.25",
                       gcomp::error);
}

TEST_CASE("ri_sgd rejects bad options and bad steps, leaving parameters unchanged") {
  auto with = [](auto change) {
    gcomp::ri_sgd_options o;
    change(o);
    return o;
  };
  CHECK_THROWS_AS(gcomp::ri_sgd<float>(100, 4, 0, with([](auto& o) { o.period = 0; })),
                  gcomp::error);
  CHECK_THROWS_AS(gcomp::ri_sgd<float>(100, 4, 0, with([](auto& o) { o.own_batch = 0; })),
                  gcomp::error);
  CHECK_THROWS_AS(gcomp::ri_sgd<float>(100, 4, 0, with([](auto& o) { o.redundancy = 0.9; })),
                  gcomp::error);
  CHECK_THROWS_AS(gcomp::ri_sgd<float>(100, 4, 0, with([](auto& o) { o.optimizer.lr = -1; })),
                  gcomp::error);
  CHECK_THROWS_AS(gcomp::ri_sgd<float>(100, 4, 4), gcomp::error);  // worker out of range

  const gcomp::layout small{3, 2};
  gcomp::ri_sgd<float> ri(100, 2, 1);
  std::vector<float> x(5, 1.0f), g(5, 1.0f), g4(4, 1.0f);
  gcomp::inproc_group one(1), two(2);
  CHECK_THROWS_WITH_AS(ri.step(gcomp::host_seq{}, one.comm(0), small, std::span<float>(x),
                               std::span<const float>(g)),
                       "gcomp::ri_sgd::step: comm has size 1 but 2 workers remain; pass the "
                       "communicator of the remaining workers",
                       gcomp::error);
  CHECK_THROWS_WITH_AS(ri.step(gcomp::host_seq{}, two.comm(0), small, std::span<float>(x),
                               std::span<const float>(g)),
                       "gcomp::ri_sgd::step: comm.rank() is 0 but worker 1 must have rank 1 among "
                       "the remaining workers",
                       gcomp::error);
  CHECK(ri.remove_worker(0) == false);  // mu * M = 0.5: worker 1 holds only half of shard 0
  CHECK_THROWS_WITH_AS(
      ri.step(gcomp::host_seq{}, one.comm(0), small, std::span<float>(x),
              std::span<const float>(g4)),
      "gcomp::ri_sgd::step: grads has size 4 but params has size 5; they must match", gcomp::error);
  CHECK(x == std::vector<float>(5, 1.0f));
  CHECK(ri.steps() == 0);
  // Now worker 1 is rank 0 of a group of one: the step goes through.
  CHECK(ri.step(gcomp::host_seq{}, one.comm(0), small, std::span<float>(x),
                std::span<const float>(g)) == false);
  CHECK(x != std::vector<float>(5, 1.0f));
  // Another model size later is an error before the local step.
  const gcomp::layout bigger{3, 3};
  std::vector<float> x6(6, 1.0f), g6(6, 1.0f);
  CHECK_THROWS_WITH_AS(ri.step(gcomp::host_seq{}, one.comm(0), bigger, std::span<float>(x6),
                               std::span<const float>(g6)),
                       "gcomp::ri_sgd::step: params has size 6 but the parameters of earlier "
                       "steps has size 5; they must match",
                       gcomp::error);
  CHECK(x6 == std::vector<float>(6, 1.0f));
  CHECK(ri.steps() == 1);
}
