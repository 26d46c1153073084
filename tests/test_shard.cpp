// shard_plan and shard_sampler: exact index sets against a rational-arithmetic oracle, proportional
// batches, coverage after removals.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

#include "gcomp/data/shard.hpp"

namespace {

// A redundancy mu = num / den, so the oracle computes mu * M exactly in integers.
struct plan_case {
  std::size_t samples;
  int workers;
  std::size_t num, den;
  double mu() const { return double(num) / double(den); }
};

const plan_case cases[] = {
    {800, 8, 1, 4},     // the paper's mu = 0.25, M = 8: two whole neighbours
    {803, 8, 1, 4},     // uneven shards
    {100, 4, 3, 10},    // mu * M = 1.2: one neighbour and a fifth of the next
    {101, 4, 1, 8},     // mu * M = 0.5: half a neighbour, no whole one
    {10, 3, 2, 3},      // the maximum (M - 1) / M: everyone holds everything
    {17, 5, 0, 1},      // plain local SGD
    {1000, 10, 3, 10},  // mu * M = 3, where 0.3 * 10 is not exact in binary
    {37, 6, 7, 36},     // mu * M = 7/6 on shards of 6 or 7 samples
    {5, 1, 0, 1},       // one worker
    {9, 9, 4, 9},       // one sample per shard, mu * M = 4
};

// The oracle: shard sizes dealt out one by one (the first n % M shards one
// larger), then worker j's set built from the definition, sample by sample.
struct oracle {
  std::vector<std::size_t> begin, size;            // per shard
  std::vector<std::vector<bool>> held;             // [worker][sample]
  std::vector<std::vector<std::size_t>> held_len;  // [worker][shard]: samples held (a prefix)

  explicit oracle(const plan_case& c) {
    const auto m = static_cast<std::size_t>(c.workers);
    std::size_t next = 0;
    for (std::size_t s = 0; s < m; ++s) {
      begin.push_back(next);
      size.push_back(c.samples / m + (s < c.samples % m ? 1 : 0));
      next += size.back();
    }
    REQUIRE(next == c.samples);
    const std::size_t whole = c.num * m / c.den;  // floor(mu * M)
    const std::size_t rest = c.num * m % c.den;   // mu * M - whole = rest / den
    held.assign(m, std::vector<bool>(c.samples, false));
    held_len.assign(m, std::vector<std::size_t>(m, 0));
    for (std::size_t j = 0; j < m; ++j) {
      for (std::size_t k = 0; k <= whole && k < m; ++k)
        held_len[j][(j + k) % m] = size[(j + k) % m];
      if (rest != 0 && whole + 1 < m) {
        const std::size_t s = (j + whole + 1) % m;
        held_len[j][s] = rest * size[s] / c.den;  // floor(f * |shard|)
      }
      for (std::size_t s = 0; s < m; ++s)
        for (std::size_t i = 0; i < held_len[j][s]; ++i) held[j][begin[s] + i] = true;
    }
  }
};

std::vector<bool> held_by(const gcomp::shard_plan& plan, int worker) {
  std::vector<bool> out(plan.samples(), false);
  for (const gcomp::shard_part& p : plan.parts(worker))
    for (std::size_t i = p.samples.begin; i < p.samples.end; ++i) {
      REQUIRE(!out[i]);  // parts never overlap
      out[i] = true;
    }
  return out;
}

}  // namespace

TEST_CASE("shard_plan: every worker's index set equals the oracle's") {
  for (const plan_case& c : cases) {
    CAPTURE(c.samples);
    CAPTURE(c.workers);
    CAPTURE(c.mu());
    const gcomp::shard_plan plan(c.samples, c.workers, c.mu());
    const oracle o(c);
    const auto m = static_cast<std::size_t>(c.workers);
    std::vector<int> holders(c.samples, 0);
    std::size_t total = 0;
    for (int j = 0; j < c.workers; ++j) {
      const auto ju = static_cast<std::size_t>(j);
      CHECK(plan.shard(j) == gcomp::sample_range{o.begin[ju], o.begin[ju] + o.size[ju]});
      const std::vector<bool> got = held_by(plan, j);
      CHECK(got == o.held[ju]);
      for (std::size_t i = 0; i < c.samples; ++i) {
        holders[i] += got[i];
        CHECK(plan.holds(j, i) == got[i]);
      }
      // Neighbours in order: the own shard, then (j + 1) mod M, (j + 2) mod M, ...
      const auto parts = plan.parts(j);
      REQUIRE(!parts.empty());
      for (std::size_t k = 0; k < parts.size(); ++k) CHECK(parts[k].shard == int((ju + k) % m));
      // Extra data = mu * M shards' worth: the whole neighbours plus floor(f * |shard|).
      std::size_t extra = 0;
      for (std::size_t s = 0; s < m; ++s)
        if (s != ju) extra += o.held_len[ju][s];
      CHECK(plan.extra_samples(j) == extra);
      CHECK(plan.local_samples(j) == o.size[ju] + extra);
      total += plan.local_samples(j);
    }
    // Every sample is counted: each is held by its owner and by the workers
    // whose redundant parts reach it.
    for (std::size_t i = 0; i < c.samples; ++i) CHECK(holders[i] >= 1);
    CHECK(std::accumulate(holders.begin(), holders.end(), std::size_t{0}) == total);
    CHECK(plan.whole_neighbours() == std::min(c.num * m / c.den, m - 1));
  }
}

TEST_CASE("shard_plan: with even shards the extra data is exactly mu * M shards") {
  // n / M = 100 samples per shard; mu * M = 2, 1.5, 0.25 shards.
  const gcomp::shard_plan a(800, 8, 0.25), b(400, 4, 0.375), c(400, 4, 0.0625);
  for (int j = 0; j < 8; ++j) CHECK(a.extra_samples(j) == 200);
  for (int j = 0; j < 4; ++j) CHECK(b.extra_samples(j) == 150);
  for (int j = 0; j < 4; ++j) CHECK(c.extra_samples(j) == 25);
  CHECK(a.whole_neighbours() == 2);
  CHECK(a.partial_fraction() == 0.0);
  CHECK(b.whole_neighbours() == 1);
  CHECK(b.partial_fraction() == 0.5);
}

TEST_CASE("shard_plan: removing workers leaves every shard covered exactly as the oracle says") {
  // All subsets of removed workers (at least one survivor) for small M.
  const plan_case small[] = {{24, 4, 1, 4}, {24, 4, 1, 8}, {24, 4, 3, 8}, {30, 6, 1, 3},
                             {30, 6, 1, 6}, {31, 5, 0, 1}, {20, 5, 4, 5}, {13, 3, 1, 2}};
  for (const plan_case& c : small) {
    CAPTURE(c.workers);
    CAPTURE(c.mu());
    const oracle o(c);
    const auto m = static_cast<std::size_t>(c.workers);
    for (unsigned removed = 0; removed + 1 < (1u << m); ++removed) {
      CAPTURE(removed);
      gcomp::shard_plan plan(c.samples, c.workers, c.mu());
      std::vector<int> survivors;
      for (int j = 0; j < c.workers; ++j) {
        if (removed >> j & 1u)
          plan.remove(j);
        else
          survivors.push_back(j);
      }
      std::vector<int> uncovered;
      for (std::size_t s = 0; s < m; ++s) {
        std::size_t held = 0;
        for (int j : survivors) held = std::max(held, o.held_len[std::size_t(j)][s]);
        CHECK(plan.uncovered_samples(int(s)) == o.size[s] - held);
        if (held < o.size[s]) uncovered.push_back(int(s));
      }
      CHECK(plan.uncovered_shards() == uncovered);
      CHECK(plan.covered() == uncovered.empty());
      CHECK(plan.survivors() == survivors);
      CHECK(plan.active_workers() == int(survivors.size()));
      for (std::size_t r = 0; r < survivors.size(); ++r)
        CHECK(plan.survivor_rank(survivors[r]) == int(r));
    }
  }
}

TEST_CASE("shard_plan: one lost worker keeps all shards covered iff mu * M >= 1") {
  // Both sides of the threshold, for every choice of the lost worker.
  struct side {
    int workers;
    double mu;
    bool covered;
  };
  const side sides[] = {{8, 0.25, true},   {8, 0.125, true},   {8, 0.124, false},  {8, 0.0, false},
                        {4, 0.25, true},   {4, 0.2499, false}, {3, 1.0 / 3, true}, {10, 0.1, true},
                        {10, 0.09, false}, {2, 0.5, true},     {2, 0.49, false}};
  for (const side& s : sides) {
    CAPTURE(s.workers);
    CAPTURE(s.mu);
    for (int lost = 0; lost < s.workers; ++lost) {
      gcomp::shard_plan plan(std::size_t(s.workers) * 50 + 3, s.workers, s.mu);
      CHECK(plan.covered());
      plan.remove(lost);
      CHECK(plan.covered() == s.covered);
      if (!s.covered) CHECK(plan.uncovered_shards() == std::vector<int>{lost});
    }
  }
}

TEST_CASE("shard_sampler: batch composition is proportional to each part's share of its shard") {
  // mu * M = 1.5 with shards of 40: own shard, one whole neighbour, 20 of the next.
  const gcomp::shard_plan plan(160, 4, 0.375);
  const gcomp::shard_sampler sampler(plan, 3, 10, /*seed=*/9);
  REQUIRE(sampler.parts().size() == 3);
  CHECK(std::vector<std::size_t>(sampler.part_counts().begin(), sampler.part_counts().end()) ==
        std::vector<std::size_t>{10, 10, 5});
  CHECK(sampler.batch_size() == 25);
  // Uneven shards (34, 33, 33), mu * M = 0.3: worker 2 holds floor(0.3 * 34) = 10
  // samples of shard 0 and draws round(10 * 10 / 34) = round(2.94) = 3 of them;
  // worker 0 holds floor(0.3 * 33) = 9 of shard 1 and draws round(2.73) = 3.
  const gcomp::shard_plan uneven(100, 3, 0.1);
  CHECK(uneven.parts(2)[1].samples.size() == 10);
  CHECK(uneven.parts(0)[1].samples.size() == 9);
  CHECK(gcomp::shard_sampler(uneven, 2, 10).part_counts()[1] == 3);
  CHECK(gcomp::shard_sampler(uneven, 0, 10).part_counts()[1] == 3);
  CHECK(gcomp::shard_sampler(uneven, 0, 100).part_counts()[1] == 27);  // round(100 * 9 / 33)

  std::vector<std::size_t> batch(sampler.batch_size());
  for (std::uint64_t step = 0; step < 50; ++step) {
    sampler.sample(step, batch);
    std::size_t i = 0;
    for (std::size_t k = 0; k < sampler.parts().size(); ++k)
      for (std::size_t c = 0; c < sampler.part_counts()[k]; ++c, ++i)
        CHECK(sampler.parts()[k].samples.contains(batch[i]));
  }
}

TEST_CASE("shard_sampler: draws are uniform over each part (chi-square)") {
  // 40 samples per part, 10 or 5 draws per step, 4000 steps: 40000 (own,
  // whole neighbour) and 20000 (prefix of 20) draws. Pearson's statistic has
  // 39 (19) degrees of freedom, mean 39 (19), sd 8.8 (6.2); the bound 39 + 8
  // sd = 110 (19 + 8 sd = 69) is exceeded with probability below 1e-9 for a
  // uniform sampler, while a sampler that skips or doubles one sample would
  // exceed it by far.
  const gcomp::shard_plan plan(160, 4, 0.375);
  const gcomp::shard_sampler sampler(plan, 1, 10, /*seed=*/3);
  std::vector<std::size_t> counts(160, 0), batch(sampler.batch_size());
  constexpr std::uint64_t steps = 4000;
  for (std::uint64_t step = 0; step < steps; ++step) {
    sampler.sample(step, batch);
    for (std::size_t i : batch) ++counts[i];
  }
  for (std::size_t k = 0; k < sampler.parts().size(); ++k) {
    const gcomp::sample_range r = sampler.parts()[k].samples;
    const double expected = double(steps * sampler.part_counts()[k]) / double(r.size());
    double chi2 = 0;
    for (std::size_t i = r.begin; i < r.end; ++i)
      chi2 += (double(counts[i]) - expected) * (double(counts[i]) - expected) / expected;
    const double dof = double(r.size() - 1);
    CAPTURE(k);
    CHECK(chi2 < dof + 8.0 * std::sqrt(2.0 * dof));
  }
  // Samples the worker does not hold are never drawn.
  for (std::size_t i = 0; i < 160; ++i)
    if (!plan.holds(1, i)) CHECK(counts[i] == 0);
}

TEST_CASE("shard_sampler: batches are a pure function of (seed, step, worker)") {
  const gcomp::shard_plan plan(400, 4, 0.25);
  const gcomp::shard_sampler a(plan, 2, 16, 5), b(plan, 2, 16, 5), other_seed(plan, 2, 16, 6);
  std::vector<std::size_t> x(a.batch_size()), y(a.batch_size()), z(a.batch_size());
  a.sample(7, x);
  b.sample(3, y);  // another order of calls
  b.sample(7, y);
  other_seed.sample(7, z);
  CHECK(x == y);
  CHECK(x != z);
  a.sample(8, z);
  CHECK(x != z);
}

TEST_CASE("shard_plan and shard_sampler reject bad arguments") {
  using gcomp::shard_plan;
  CHECK_THROWS_WITH_AS(shard_plan(100, 4, 0.8),
                       "gcomp::shard_plan: redundancy must be in [0, (workers - 1) / workers] = "
                       "[0, 0.75], got 0.8",
                       gcomp::error);
  CHECK_THROWS_AS(shard_plan(100, 4, -0.1), gcomp::error);
  CHECK_THROWS_AS(shard_plan(100, 4, std::nan("")), gcomp::error);
  CHECK_THROWS_AS(shard_plan(5, 1, 0.1), gcomp::error);  // one worker: mu must be 0
  CHECK_THROWS_WITH_AS(shard_plan(100, 0, 0.0), "gcomp::shard_plan: workers must be > 0, got 0",
                       gcomp::error);
  CHECK_THROWS_WITH_AS(shard_plan(3, 4, 0.0),
                       "gcomp::shard_plan: samples must be >= workers (4) so that no shard is "
                       "empty, got 3",
                       gcomp::error);

  shard_plan plan(40, 4, 0.25);
  CHECK_THROWS_AS(plan.parts(4), gcomp::error);
  CHECK_THROWS_AS(plan.shard(-1), gcomp::error);
  CHECK_THROWS_AS(plan.remove(4), gcomp::error);
  plan.remove(1);
  CHECK_THROWS_WITH_AS(plan.remove(1), "gcomp::shard_plan::remove: worker 1 was already removed",
                       gcomp::error);
  CHECK_THROWS_AS(plan.survivor_rank(1), gcomp::error);
  plan.remove(0);
  plan.remove(3);
  CHECK_THROWS_WITH_AS(plan.remove(2),
                       "gcomp::shard_plan::remove: worker 2 is the last one left; at least one "
                       "worker must remain",
                       gcomp::error);
  CHECK(plan.active(2));

  CHECK_THROWS_WITH_AS(gcomp::shard_sampler(plan, 0, 0),
                       "gcomp::shard_sampler: own_batch must be > 0, got 0", gcomp::error);
  CHECK_THROWS_AS(gcomp::shard_sampler(plan, 4, 1), gcomp::error);
  const gcomp::shard_sampler sampler(plan, 0, 4);
  std::vector<std::size_t> wrong(sampler.batch_size() + 1, 77);
  CHECK_THROWS_WITH_AS(sampler.sample(0, wrong),
                       "gcomp::shard_sampler::sample: out has size 9 but batch_size() has size 8; "
                       "they must match",
                       gcomp::error);
  CHECK(wrong == std::vector<std::size_t>(sampler.batch_size() + 1, 77));
}
