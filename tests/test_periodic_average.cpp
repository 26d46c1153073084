// periodic_average: every tau-th step equals a naive rank-ordered mean, bytes match the
// communicator, survivors keep averaging.
#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "gcomp/aggregate/periodic_average.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/exec/host.hpp"

namespace {

// Worker m's parameter i after local step t: a deterministic perturbation, so
// the test can replay every worker's state without communicating.
template <class T>
T local_update(T x, int worker, std::uint64_t step, std::size_t i) {
  const gcomp::rng_key key{11, step, static_cast<std::uint32_t>(worker)};
  return static_cast<T>(x + T(0.1) * static_cast<T>(gcomp::normal(key, i)));
}

// The oracle: the plain mean ((x_0 + x_1) + ...) / M, element by element.
template <class T>
std::vector<T> naive_mean(const std::vector<std::vector<T>>& xs) {
  std::vector<T> mean(xs[0].size());
  for (std::size_t i = 0; i < mean.size(); ++i) {
    T sum = xs[0][i];
    for (std::size_t m = 1; m < xs.size(); ++m) sum = static_cast<T>(sum + xs[m][i]);
    mean[i] = sum / static_cast<T>(xs.size());
  }
  return mean;
}

template <class T>
void check_against_oracle(int workers, std::size_t period, std::size_t n, int steps) {
  // Replay of every worker, averaged by the oracle on the same schedule.
  std::vector<std::vector<std::vector<T>>> expected(
      static_cast<std::size_t>(steps), std::vector<std::vector<T>>(workers, std::vector<T>(n)));
  std::vector<std::vector<T>> xs(static_cast<std::size_t>(workers), std::vector<T>(n, T(1)));
  for (int t = 0; t < steps; ++t) {
    for (int m = 0; m < workers; ++m)
      for (std::size_t i = 0; i < n; ++i) xs[m][i] = local_update(xs[m][i], m, std::uint64_t(t), i);
    if ((t + 1) % int(period) == 0) {
      const std::vector<T> mean = naive_mean(xs);
      for (auto& x : xs) x = mean;
    }
    expected[std::size_t(t)] = xs;
  }

  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    const int m = comm.rank();
    gcomp::periodic_average<T> average({.period = period});
    std::vector<T> x(n, T(1));
    int mismatches = 0;
    for (int t = 0; t < steps; ++t) {
      for (std::size_t i = 0; i < n; ++i) x[i] = local_update(x[i], m, std::uint64_t(t), i);
      const bool averaged = average.step(gcomp::host_seq{}, comm, std::span<T>(x));
      if (averaged != ((t + 1) % int(period) == 0)) ++mismatches;
      if (x != expected[std::size_t(t)][std::size_t(m)]) ++mismatches;  // bitwise
    }
    CHECK(mismatches == 0);
    const std::uint64_t rounds = std::uint64_t(steps) / period;
    CHECK(average.rounds() == rounds);
    CHECK(average.steps() == std::uint64_t(steps));
    // One all-reduce of n elements per round and nothing else.
    const std::uint64_t bytes = workers > 1 ? rounds * n * sizeof(T) : 0;
    CHECK(average.traffic() == gcomp::comm_stats{bytes, bytes, rounds});
    CHECK(average.traffic() == comm.stats());
  });
}

}  // namespace

TEST_CASE("periodic_average equals the naive mean every tau steps and leaves other steps alone") {
  check_against_oracle<double>(3, 4, 37, 20);  // M = 3: the division is not a power of two
  check_against_oracle<float>(4, 1, 10, 6);    // tau = 1: synchronous, every step
  check_against_oracle<float>(5, 3, 1, 10);
  check_against_oracle<double>(1, 2, 8, 5);  // one worker: the mean is itself, 0 bytes
}

TEST_CASE("periodic_average measures each worker's distance to the mean before a round") {
  constexpr int workers = 3;
  constexpr std::size_t n = 50;
  std::vector<double> measured(workers), oracle(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    const int m = comm.rank();
    gcomp::periodic_average<double> average({.period = 2, .measure_disagreement = true});
    CHECK(std::isnan(average.last_disagreement()));
    std::vector<double> x(n);
    for (std::size_t i = 0; i < n; ++i) x[i] = local_update(0.0, m, 0, i);
    CHECK(!average.step(gcomp::host_seq{}, comm, std::span<double>(x)));
    const std::vector<double> before = x;
    CHECK(average.step(gcomp::host_seq{}, comm, std::span<double>(x)));
    double d = 0;
    for (std::size_t i = 0; i < n; ++i) d += (before[i] - x[i]) * (before[i] - x[i]);
    oracle[std::size_t(m)] = d;
    measured[std::size_t(m)] = average.last_disagreement();
  });
  for (int m = 0; m < workers; ++m) {
    CHECK(oracle[std::size_t(m)] > 0.1);  // the workers really disagreed
    CHECK(measured[std::size_t(m)] == doctest::Approx(oracle[std::size_t(m)]).epsilon(1e-12));
  }
}

TEST_CASE("periodic_average goes on over the survivors' communicator after a worker leaves") {
  constexpr std::size_t n = 6;
  std::vector<gcomp::periodic_average<double>> averages(
      4, gcomp::periodic_average<double>({.period = 2}));
  std::vector<std::vector<double>> xs(4, std::vector<double>(n));
  auto local_steps = [&](gcomp::inproc_comm& comm, int worker, std::uint64_t first, int steps) {
    auto& x = xs[std::size_t(worker)];
    for (int t = 0; t < steps; ++t) {
      for (std::size_t i = 0; i < n; ++i)
        x[i] = local_update(x[i], worker, first + std::uint64_t(t), i);
      averages[std::size_t(worker)].step(gcomp::host_seq{}, comm, std::span<double>(x));
    }
  };
  gcomp::inproc_group all(4);
  all.run([&](gcomp::inproc_comm& comm) { local_steps(comm, comm.rank(), 0, 3); });
  // Worker 1 leaves after step 3 (mid-period); the others continue as ranks 0, 1, 2.
  const int survivors[] = {0, 2, 3};
  std::vector<std::vector<double>> replay;
  for (int w : survivors) {
    replay.push_back(xs[std::size_t(w)]);
    for (std::size_t i = 0; i < n; ++i) replay.back()[i] = local_update(replay.back()[i], w, 3, i);
  }
  const std::vector<double> mean = naive_mean(replay);
  gcomp::inproc_group rest(3);
  rest.run([&](gcomp::inproc_comm& comm) {
    const int w = survivors[comm.rank()];
    local_steps(comm, w, 3, 1);  // step 4 of the schedule: a round over 3 workers
    CHECK(xs[std::size_t(w)] == mean);
    CHECK(averages[std::size_t(w)].rounds() == 2);
    CHECK(averages[std::size_t(w)].last_traffic() == gcomp::comm_stats{n * 8, n * 8, 1});
  });
}

TEST_CASE("periodic_average gives the same bits for every thread count") {
  // More than host_grain elements, so host_par really splits the work.
  constexpr std::size_t n = 50000;
  std::vector<std::vector<float>> results;
  std::vector<double> disagreement;
  for (unsigned threads : {1u, 2u, 3u}) {
    const gcomp::host_par pool(threads);
    std::vector<std::vector<float>> xs(3);
    std::vector<double> d(3);
    gcomp::inproc_group group(3);
    group.run([&](gcomp::inproc_comm& comm) {
      gcomp::periodic_average<float> average({.period = 1, .measure_disagreement = true});
      std::vector<float> x(n);
      for (std::size_t i = 0; i < n; ++i) x[i] = local_update(0.0f, comm.rank(), 0, i);
      average.step(pool, comm, std::span<float>(x));
      xs[std::size_t(comm.rank())] = x;
      d[std::size_t(comm.rank())] = average.last_disagreement();
    });
    CHECK(xs[1] == xs[0]);
    CHECK(xs[2] == xs[0]);
    results.push_back(xs[0]);
    disagreement.push_back(d[0]);
  }
  CHECK(results[1] == results[0]);
  CHECK(results[2] == results[0]);
  CHECK(disagreement[1] == disagreement[0]);
  CHECK(disagreement[2] == disagreement[0]);
}

TEST_CASE("periodic_average rejects bad arguments and leaves parameters unchanged") {
  CHECK_THROWS_WITH_AS(gcomp::periodic_average<float>({.period = 0}),
                       "gcomp::periodic_average: period must be > 0, got 0", gcomp::error);
  gcomp::inproc_group group(2);
  group.run([&](gcomp::inproc_comm& comm) {
    gcomp::periodic_average<float> average({.period = 1});
    std::vector<float> x(4, float(comm.rank())), longer(5, 1.0f);
    average.step(gcomp::host_seq{}, comm, std::span<float>(x));
    CHECK(x == std::vector<float>(4, 0.5f));
    CHECK_THROWS_WITH_AS(average.step(gcomp::host_seq{}, comm, std::span<float>(longer)),
                         "gcomp::periodic_average::step: params has size 5 but the parameters of "
                         "earlier rounds has size 4; they must match",
                         gcomp::error);
    CHECK(longer == std::vector<float>(5, 1.0f));
    CHECK(average.steps() == 1);
    // Sizes that differ across ranks: every rank throws before any buffer is written.
    gcomp::periodic_average<float> fresh({.period = 1});
    std::vector<float> mine(comm.rank() == 0 ? 3 : 2, 7.0f);
    const std::vector<float> copy = mine;
    CHECK_THROWS_AS(fresh.step(gcomp::host_seq{}, comm, std::span<float>(mine)), gcomp::error);
    CHECK(mine == copy);
    CHECK(fresh.rounds() == 0);
    CHECK(fresh.steps() == 0);
  });
}
