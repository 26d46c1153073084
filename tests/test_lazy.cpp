// Tests of aggregate/lazy.hpp: lazy<allgather> against a stale-message oracle with exact bytes, and
// the lazy rule (threshold, warm-up, staleness bound, errors).
#include "gcomp/aggregate/lazy.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "gcomp/aggregate/allgather.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/compress/topk.hpp"
#include "gcomp/exec/host.hpp"
#include "gcomp/optim/sgd.hpp"
#include "gcomp/pipeline.hpp"

namespace {

using gcomp::host_seq;

constexpr std::size_t n = 50, k = 7;

std::vector<float> gradient(int step, int rank) {
  std::vector<float> g(n);
  for (std::size_t i = 0; i < n; ++i)
    g[i] = std::sin(0.37f * float(i) + 1.3f * float(rank) + 0.71f * float(step)) * float(1 + rank);
  return g;
}

// The scripted decision: everyone uploads at step 0, then worker r skips
// whenever (3t + r) % 4 == 1, so each worker skips some steps, never the same
// ones as all others.
bool uploads_at(int step, int rank) { return step == 0 || (3 * step + rank) % 4 != 1; }

// The k largest magnitudes of g (lower index first among equals), as (index, value) pairs.
std::vector<std::pair<std::size_t, float>> naive_topk(const std::vector<float>& g) {
  std::vector<std::size_t> order(g.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return std::fabs(g[a]) > std::fabs(g[b]); });
  std::vector<std::pair<std::size_t, float>> kept;
  for (std::size_t j = 0; j < k; ++j) kept.emplace_back(order[j], g[order[j]]);
  return kept;
}

}  // namespace

TEST_CASE("lazy<allgather> reuses every skipper's last message, bitwise as an oracle, with exact bytes") {
  const int steps = 12;
  const std::uint64_t message = 24 + 8 + k * (4 + 4);  // sparse header, count, k (index, value)
  for (int m : {1, 3, 4})
    for (auto reduction : {gcomp::lazy_reduction::mean, gcomp::lazy_reduction::sum}) {
      CAPTURE(m);
      CAPTURE(static_cast<int>(reduction));
      // Oracle: keep the latest top-k of every worker, add all M in rank order.
      const float scale = reduction == gcomp::lazy_reduction::mean ? 1.0f / float(m) : 1.0f;
      std::vector<std::vector<std::pair<std::size_t, float>>> latest(static_cast<std::size_t>(m));
      std::vector<std::vector<float>> expected;
      std::vector<std::uint64_t> ups(static_cast<std::size_t>(m), 0);
      for (int t = 0; t < steps; ++t) {
        std::vector<float> out(n, 0.0f);
        for (int r = 0; r < m; ++r) {
          if (uploads_at(t, r)) {
            latest[std::size_t(r)] = naive_topk(gradient(t, r));
            ++ups[std::size_t(r)];
          }
          for (const auto& [i, v] : latest[std::size_t(r)]) out[i] += scale * v;
        }
        expected.push_back(out);
      }

      gcomp::inproc_group group(m);
      group.run([&](gcomp::inproc_comm& comm) {
        gcomp::lazy<gcomp::allgather> agg({.reduction = reduction});
        gcomp::topk<float> c({.k = k});
        std::vector<float> global(n);
        int wrong_steps = 0;
        for (int t = 0; t < steps; ++t) {
          const auto g = gradient(t, comm.rank());
          const bool up = uploads_at(t, comm.rank());
          agg.aggregate(host_seq{}, comm, c, std::span<const float>(g), std::span<float>(global),
                        {0, std::uint64_t(t), std::uint32_t(comm.rank())}, up);
          wrong_steps += global != expected[std::size_t(t)];
          CHECK(agg.last_bytes() == (up ? message : 0));
        }
        CHECK(wrong_steps == 0);
        std::uint64_t all = 0;
        for (int r = 0; r < m; ++r) {
          CHECK(agg.uploads(r) == ups[std::size_t(r)]);
          CHECK(agg.skips(r) == steps - ups[std::size_t(r)]);
          all += ups[std::size_t(r)];
        }
        CHECK(agg.total_uploads() == all);
        CHECK(agg.total_skips() == std::uint64_t(steps * m) - all);
        const std::uint64_t mine = ups[std::size_t(comm.rank())];
        const std::uint64_t bytes = m == 1 ? 0 : message;  // one rank: nothing crosses
        CHECK(comm.stats() == gcomp::comm_stats{mine * bytes, (all - mine) * bytes, std::uint64_t(steps)});
      });
    }
}

TEST_CASE("lazy<allgather> with every worker uploading is allgather, bitwise, inside a pipeline") {
  const int m = 3;
  const gcomp::layout lay{30, 20};
  std::vector<std::vector<float>> by_lazy(m), by_allgather(m);
  std::vector<gcomp::comm_stats> lazy_stats(m), allgather_stats(m);
  gcomp::inproc_group group(m);
  const auto train = [&](auto aggregator, std::vector<std::vector<float>>& result,
                         std::vector<gcomp::comm_stats>& stats) {
    group.run([&](gcomp::inproc_comm& comm) {
      const auto before = comm.stats();
      gcomp::pipeline pipe{gcomp::topk<float>({.ratio = 0.2}, lay), aggregator,
                           gcomp::sgd<float>({.lr = 0.1, .momentum = 0.5})};
      std::vector<float> x(n, 0.0f);
      for (int t = 0; t < 20; ++t) {
        auto g = gradient(t, comm.rank());
        for (std::size_t i = 0; i < n; ++i) g[i] += x[i];
        pipe.step(host_seq{}, comm, lay, std::span<float>(x), std::span<const float>(g));
      }
      result[std::size_t(comm.rank())] = x;
      const auto after = comm.stats();
      stats[std::size_t(comm.rank())] = {after.bytes_sent - before.bytes_sent,
                                         after.bytes_received - before.bytes_received,
                                         after.collectives - before.collectives};
    });
  };
  train(gcomp::lazy<gcomp::allgather>{}, by_lazy, lazy_stats);
  train(gcomp::allgather{}, by_allgather, allgather_stats);
  CHECK(by_lazy == by_allgather);
  CHECK(lazy_stats == allgather_stats);
}

TEST_CASE("lazy<allgather>: a skip before the first upload throws on every worker, nothing changed") {
  const int m = 3;
  gcomp::inproc_group group(m);
  group.run([&](gcomp::inproc_comm& comm) {
    gcomp::lazy<gcomp::allgather> agg;
    gcomp::topk<float> c({.k = k});
    std::vector<float> global(n, 7.0f);
    const auto g = gradient(0, comm.rank());
    CHECK_THROWS_WITH_AS(
        agg.aggregate(host_seq{}, comm, c, std::span<const float>(g), std::span<float>(global), {},
                      comm.rank() != 1),
        "gcomp::lazy<allgather>::aggregate: worker 1 skipped its upload but has never uploaded, so "
        "there is no message to reuse",
        gcomp::error);
    CHECK(global == std::vector<float>(n, 7.0f));
    CHECK(agg.total_uploads() == 0);
    // The group is intact: a step where all upload works, and then worker 1 may skip.
    agg.aggregate(host_seq{}, comm, c, std::span<const float>(g), std::span<float>(global), {}, true);
    const auto first = global;
    const auto g2 = gradient(1, comm.rank());
    agg.aggregate(host_seq{}, comm, c, std::span<const float>(g2), std::span<float>(global), {},
                  comm.rank() != 1);
    CHECK(agg.uploads(1) == 1);
    CHECK(agg.skips(1) == 1);
    CHECK(agg.uploads(0) == 2);

    // Size changes are errors on every worker, before the exchange.
    std::vector<float> longer(n + 1, 0.0f), out(n + 1, 3.0f);
    CHECK_THROWS_WITH_AS(
        agg.aggregate(host_seq{}, comm, c, std::span<const float>(longer), std::span<float>(out), {}, true),
        "gcomp::lazy<allgather>::aggregate: global has size 51 but earlier steps had size 50; the "
        "stored messages are of that size",
        gcomp::error);
    CHECK(out == std::vector<float>(n + 1, 3.0f));
    CHECK_THROWS_AS(agg.aggregate(host_seq{}, comm, c, std::span<const float>(longer),
                                  std::span<float>(global), {}, true),
                    gcomp::error);
    CHECK_THROWS_WITH_AS((void)agg.uploads(3), "gcomp::lazy<allgather>: rank 3 is out of range [0, 3)",
                         gcomp::error);
  });
  CHECK_THROWS_WITH_AS(gcomp::lazy<gcomp::allgather>({.reduction = static_cast<gcomp::lazy_reduction>(5)}),
                       "gcomp::lazy: options.reduction must be mean or sum, got 5", gcomp::error);
}

TEST_CASE("lazy_rule: the threshold is (1 / (alpha M)^2) sum_d xi_d ||x_{k+1-d} - x_{k-d}||^2") {
  gcomp::lazy_rule rule({.history = 3, .alpha = 0.5, .xi = {0.2, 0.3, 0.4}});
  const double changes[] = {1.0, 2.0, 4.0, 8.0, 16.0};
  CHECK(rule.threshold(2) == 0.0);
  for (double c : changes) rule.record(true, c);
  // Newest first: d = 1 is 16, d = 2 is 8, d = 3 is 4; (alpha M)^2 = 1.
  CHECK(rule.threshold(2) == doctest::Approx(0.2 * 16 + 0.3 * 8 + 0.4 * 4).epsilon(1e-15));
  CHECK(rule.threshold(4) == doctest::Approx((0.2 * 16 + 0.3 * 8 + 0.4 * 4) / 4).epsilon(1e-15));
  // Strictly greater uploads; equal skips.
  const double at = rule.threshold(2);
  CHECK(rule.should_upload(std::nextafter(at, 1e9), 2));
  CHECK_FALSE(rule.should_upload(at, 2));

  // The SASG code's default: xi_d = alpha for d < D, 0 for d = D, i.e. the
  // last D - 1 changes over alpha M^2.
  gcomp::lazy_rule code({.history = 3, .alpha = 0.25});
  CHECK(code.options().xi == std::vector<double>{0.25, 0.25, 0.0});
  for (double c : changes) code.record(true, c);
  CHECK(code.threshold(2) == doctest::Approx((16.0 + 8.0) / (0.25 * 4)).epsilon(1e-15));
}

TEST_CASE("lazy_rule: warm-up uploads, then at most D skips in a row (tau <= D), D = 0 never skips") {
  for (std::size_t D : {0u, 1u, 3u, 10u}) {
    CAPTURE(D);
    gcomp::lazy_rule rule({.history = D, .alpha = 0.1});
    std::string pattern, expected;
    std::size_t run = 0;
    for (int t = 0; t < 60; ++t) {
      // The gradient never changes (change 0), so only the forcing clauses upload.
      const bool up = rule.should_upload(0.0, 4);
      pattern += up ? 'U' : 's';
      const bool want = std::size_t(t) < D || run == D;  // skipped D in a row: tau = D + 1 > D
      expected += want ? 'U' : 's';
      run = want ? 0 : run + 1;
      CHECK(rule.forced() == up);
      rule.record(up, 1.0);
      CHECK(rule.staleness() == run + 1);
    }
    CHECK(pattern == expected);
    CHECK(rule.uploads() + rule.skips() == 60);
    CHECK(rule.steps() == 60);
    if (D == 0) CHECK(rule.skips() == 0);
  }
}

TEST_CASE("lazy_rule rejects bad options and inputs, state unchanged") {
  using gcomp::error;
  using gcomp::lazy_rule;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH_AS(lazy_rule({.alpha = 0.0}), "gcomp::lazy_rule: alpha must be positive and finite, got 0", error);
  CHECK_THROWS_AS(lazy_rule({.alpha = -1.0}), error);
  CHECK_THROWS_AS(lazy_rule({.alpha = nan}), error);
  CHECK_THROWS_AS(lazy_rule({.alpha = inf}), error);
  CHECK_THROWS_AS(lazy_rule({.history = 2, .xi = {0.1}}), error);
  CHECK_THROWS_WITH_AS(lazy_rule({.history = 2, .xi = {0.1, -0.5}}),
                       "gcomp::lazy_rule: xi[1] must be non-negative and finite, got -0.5", error);
  CHECK_THROWS_AS(lazy_rule({.history = 1, .xi = {nan}}), error);

  lazy_rule rule({.history = 1, .alpha = 0.1});
  CHECK_THROWS_WITH_AS(rule.record(false, 1.0),
                       "gcomp::lazy_rule::record: step 0 must upload (warm-up, first upload or "
                       "staleness 0 > D = 1) but was recorded as skipped",
                       error);
  CHECK_THROWS_AS(rule.record(true, -1.0), error);
  CHECK_THROWS_AS(rule.record(true, nan), error);
  CHECK(rule.steps() == 0);
  rule.record(true, 1.0);
  CHECK_THROWS_AS(rule.should_upload(nan, 2), error);
  CHECK_THROWS_AS(rule.should_upload(-1.0, 2), error);
  CHECK_THROWS_WITH_AS(rule.threshold(0), "gcomp::lazy_rule::threshold: workers must be at least 1, got 0",
                       error);
  CHECK(rule.steps() == 1);
  CHECK(rule.uploads() == 1);
}
