// The divisible aggregator: foreground bytes, the foreground against a naive EF + block + mean
// oracle, a background that never blocks and is applied when it finishes, rank agreement, errors.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "delayed_comm.hpp"
#include "gcomp/aggregate/allreduce.hpp"
#include "gcomp/aggregate/divisible.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/compress/identity.hpp"
#include "gcomp/compress/random_block.hpp"
#include "gcomp/compress/randomk.hpp"
#include "gcomp/compress/topk.hpp"

namespace {

using gcomp::background_payload;
using gcomp::rescale;
using vec = std::vector<float>;
using gcomp::test::delayed_comm;

// Worker m's gradient at step t: N(0, 1) values from its own generator.
vec gradient(int m, int t, std::size_t n) {
  std::mt19937 gen(static_cast<unsigned>(1000 * t + m + 1));
  std::normal_distribution<float> normal;
  vec g(n);
  for (float& x : g) x = normal(gen);
  return g;
}

gcomp::rng_key key_of(int t, int m) {
  return gcomp::rng_key{42, static_cast<std::uint64_t>(t), static_cast<std::uint32_t>(m)};
}

// The coordinates a compressor keeps at a key, and the factor it scales them by.
struct support {
  std::vector<std::size_t> index;
  float scale = 1.0f;
};

template <rescale S>
support support_of(const gcomp::random_contiguous_block<float, S>& c, gcomp::rng_key key,
                   std::size_t n) {
  support s;
  const std::size_t k = c.kept(n), offset = c.offset_for(key, n);
  for (std::size_t j = 0; j < k; ++j) s.index.push_back((offset + j) % n);
  if (S == rescale::unbiased) s.scale = static_cast<float>(double(n) / double(k));
  return s;
}

template <rescale S>
support support_of(const gcomp::shared_randomk<float, S>& c, gcomp::rng_key key, std::size_t n) {
  auto copy = c;  // the indices of a compressed dummy vector are the support
  typename gcomp::shared_randomk<float, S>::payload message;
  const vec dummy(n, 1.0f);
  copy.compress(gcomp::host_seq{}, std::span<const float>(dummy), message, key);
  support s;
  s.index.assign(message.indices.begin(), message.indices.end());
  if (S == rescale::unbiased) s.scale = static_cast<float>(double(n) / double(s.index.size()));
  return s;
}

// The naive foreground over all workers in one thread: p = e + g, the kept
// values (scaled) summed in rank order, times 1/M; e = p with the support zeroed.
struct foreground_oracle {
  std::vector<vec> e;
  vec step(const std::vector<vec>& g, const support& s) {
    const std::size_t workers = g.size(), n = g[0].size();
    if (e.empty()) e.assign(workers, vec(n, 0.0f));
    for (std::size_t m = 0; m < workers; ++m)
      for (std::size_t i = 0; i < n; ++i) e[m][i] = e[m][i] + g[m][i];
    vec global(n, 0.0f);
    for (std::size_t i : s.index) {
      float acc = e[0][i] * s.scale;
      for (std::size_t m = 1; m < workers; ++m) acc = acc + e[m][i] * s.scale;
      global[i] = (1.0f / static_cast<float>(workers)) * acc;
      for (auto& em : e) em[i] = 0.0f;
    }
    return global;
  }
};

// Drift correction, naively: target_m += (1/M) * (rank-ordered sum of the snapshots) - snapshot_m.
void apply_average(std::vector<vec>& target, const std::vector<vec>& then) {
  const std::size_t workers = then.size();
  for (std::size_t i = 0; i < then[0].size(); ++i) {
    float sum = then[0][i];
    for (std::size_t m = 1; m < workers; ++m) sum = sum + then[m][i];
    for (std::size_t m = 0; m < workers; ++m)
      target[m][i] = target[m][i] + ((1.0f / static_cast<float>(workers)) * sum - then[m][i]);
  }
}

// Runs the foreground only (payload none) on M in-process workers and checks
// every step's global gradient and every residual against the oracle, bitwise.
template <class C, class Policy>
void check_foreground_against_oracle(const C& prototype, const Policy& policy, int workers,
                                     std::size_t n, int steps) {
  std::vector<std::vector<vec>> global(static_cast<std::size_t>(steps), std::vector<vec>(workers));
  std::vector<std::vector<vec>> residual = global;
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    const auto m = static_cast<std::size_t>(comm.rank());
    C c = prototype;
    gcomp::divisible<float> agg({.payload = background_payload::none});
    vec out(n), x(n, 0.0f);
    for (int t = 0; t < steps; ++t) {
      const vec g = gradient(comm.rank(), t, n);
      agg.aggregate(policy, comm, c, std::span<const float>(g), std::span<float>(out),
                    key_of(t, comm.rank()));
      CHECK_FALSE(agg.background(policy, comm, std::span<float>(x)));
      global[static_cast<std::size_t>(t)][m] = out;
      residual[static_cast<std::size_t>(t)][m].assign(agg.residual().begin(), agg.residual().end());
    }
    CHECK(agg.counters().started == 0);
  });
  foreground_oracle oracle;
  for (int t = 0; t < steps; ++t) {
    std::vector<vec> g;
    for (int m = 0; m < workers; ++m) g.push_back(gradient(m, t, n));
    const vec expected = oracle.step(g, support_of(prototype, key_of(t, 0), n));
    for (int m = 0; m < workers; ++m) {
      CHECK(global[static_cast<std::size_t>(t)][static_cast<std::size_t>(m)] == expected);
      CHECK(residual[static_cast<std::size_t>(t)][static_cast<std::size_t>(m)] ==
            oracle.e[static_cast<std::size_t>(m)]);
    }
  }
}

// The foreground has the aggregator shape (so it also serves a plain
// pipeline); a compressor whose supports differ by worker cannot be all-reduced.
static_assert(gcomp::aggregator<gcomp::divisible<float>,
                                gcomp::random_contiguous_block<float, rescale::none>,
                                gcomp::inproc_comm>);
static_assert(gcomp::aggregator<gcomp::divisible<float>, gcomp::shared_randomk<float>,
                                gcomp::inproc_comm>);
static_assert(!gcomp::aggregator<gcomp::divisible<float>, gcomp::topk<float>, gcomp::inproc_comm>);
static_assert(!gcomp::aggregator<gcomp::divisible<float>, gcomp::randomk<float>, gcomp::inproc_comm>);

}  // namespace

TEST_CASE("foreground bytes are exactly 1/r of the dense all-reduce's, for r up to 1024") {
  constexpr int workers = 4, steps = 3;
  constexpr std::size_t n = 8192;
  for (std::size_t r : {std::size_t{1}, std::size_t{8}, std::size_t{64}, std::size_t{1024}}) {
    CAPTURE(r);
    std::vector<gcomp::comm_stats> dense(workers), block(workers), randomk(workers),
        block_counted(workers), randomk_counted(workers);
    gcomp::inproc_group group(workers);
    group.run([&](gcomp::inproc_comm& comm) {
      const auto m = static_cast<std::size_t>(comm.rank());
      vec out(n);
      // The dense reference: identity through the plain all-reduce aggregator.
      gcomp::allreduce plain;
      gcomp::identity<float> id;
      for (int t = 0; t < steps; ++t) {
        const vec g = gradient(comm.rank(), t, n);
        plain.aggregate(gcomp::host_seq{}, comm, id, std::span<const float>(g), std::span<float>(out),
                        key_of(t, comm.rank()));
      }
      dense[m] = comm.stats();
      const double ratio = 1.0 / static_cast<double>(r);
      auto run = [&](auto c, gcomp::comm_stats& seen, gcomp::comm_stats& counted) {
        comm.reset_stats();
        gcomp::divisible<float> agg({.payload = background_payload::none});
        for (int t = 0; t < steps; ++t) {
          const vec g = gradient(comm.rank(), t, n);
          agg.aggregate(gcomp::host_seq{}, comm, c, std::span<const float>(g), std::span<float>(out),
                        key_of(t, comm.rank()));
        }
        seen = comm.stats();
        counted = agg.foreground_stats();
      };
      run(gcomp::random_contiguous_block<float, rescale::none>({.ratio = ratio}), block[m],
          block_counted[m]);
      run(gcomp::shared_randomk<float, rescale::unbiased>({.ratio = ratio}), randomk[m],
          randomk_counted[m]);
    });
    for (std::size_t m = 0; m < workers; ++m) {
      CHECK(dense[m].bytes_sent == steps * n * sizeof(float));
      CHECK(block[m].bytes_sent * r == dense[m].bytes_sent);
      CHECK(block[m].bytes_received * r == dense[m].bytes_received);
      CHECK(block[m].collectives == steps);
      CHECK(block_counted[m] == block[m]);
      CHECK(randomk[m].bytes_sent * r == dense[m].bytes_sent);
      CHECK(randomk_counted[m] == randomk[m]);
    }
  }
}

TEST_CASE("with the background off the foreground is EF + block compression + mean, bitwise") {
  // M = 3 so that 1/M is inexact; n = 1000 with k = 50 makes blocks wrap around.
  SUBCASE("random contiguous block, unscaled") {
    check_foreground_against_oracle(
        gcomp::random_contiguous_block<float, rescale::none>({.ratio = 0.05}), gcomp::host_seq{}, 3,
        1000, 12);
  }
  SUBCASE("random contiguous block, rescaled to unbiased: e still loses only what was taken") {
    check_foreground_against_oracle(
        gcomp::random_contiguous_block<float, rescale::unbiased>({.k = 37}), gcomp::host_seq{}, 3,
        1000, 12);
  }
  SUBCASE("shared random-k, rescaled") {
    check_foreground_against_oracle(gcomp::shared_randomk<float, rescale::unbiased>({.ratio = 0.1}),
                                    gcomp::host_seq{}, 3, 1000, 12);
  }
  SUBCASE("a host_par pool of 3 threads on a vector long enough to be split") {
    check_foreground_against_oracle(
        gcomp::random_contiguous_block<float, rescale::none>({.ratio = 0.5}), gcomp::host_par(3), 2,
        70000, 3);
  }
}

namespace {

// The scenario of the delayed-completion tests: M workers start from different
// parameters (x_m[i] = m + i / 100), take the foreground, update x -= lr * global,
// and call background(); the delayed transport lets the held calls go at the
// steps in `release_at`. Returns every worker's x (and residual) after each step,
// plus what each step's background() returned.
struct delayed_run {
  std::vector<std::vector<vec>> x, e;      // [t][m]
  std::vector<std::vector<int>> applied;   // [t][m]
  std::vector<gcomp::background_counters> counters;
  std::vector<std::uint64_t> waits, held_tests;
  std::vector<int> pending_at_end;  // not vector<bool>: ranks write their elements concurrently
};

constexpr float lr = 0.1f;

delayed_run run_delayed(background_payload payload, std::uint64_t delay, int workers,
                        std::size_t n, int steps, const std::vector<int>& release_at) {
  delayed_run out;
  out.x.assign(static_cast<std::size_t>(steps), std::vector<vec>(workers));
  out.e = out.x;
  out.applied.assign(static_cast<std::size_t>(steps), std::vector<int>(workers));
  out.counters.resize(workers);
  out.waits.resize(workers);
  out.held_tests.resize(workers);
  out.pending_at_end.resize(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& inner) {
    delayed_comm comm(inner);
    const auto m = static_cast<std::size_t>(comm.rank());
    gcomp::random_contiguous_block<float, rescale::none> c({.ratio = 0.125});
    gcomp::divisible<float> agg({.payload = payload, .delay = delay});
    vec x(n), global(n);
    for (std::size_t i = 0; i < n; ++i) x[i] = static_cast<float>(m) + static_cast<float>(i) / 100.0f;
    for (int t = 0; t < steps; ++t) {
      const vec g = gradient(comm.rank(), t, n);
      agg.aggregate(gcomp::host_seq{}, comm, c, std::span<const float>(g), std::span<float>(global),
                    key_of(t, comm.rank()));
      for (std::size_t i = 0; i < n; ++i) x[i] = x[i] - lr * global[i];
      if (std::find(release_at.begin(), release_at.end(), t) != release_at.end()) comm.release();
      out.applied[static_cast<std::size_t>(t)][m] = agg.background(gcomp::host_seq{}, comm, std::span<float>(x));
      out.x[static_cast<std::size_t>(t)][m] = x;
      out.e[static_cast<std::size_t>(t)][m].assign(agg.residual().begin(), agg.residual().end());
    }
    out.counters[m] = agg.counters();
    out.waits[m] = comm.waits();
    out.held_tests[m] = comm.held_tests();
    out.pending_at_end[m] = agg.background_pending();
  });
  return out;
}

// The same scenario computed naively in one thread: foreground oracle, the SGD
// update, and the correction of the snapshot taken at `start` applied at `apply`.
struct naive_run {
  std::vector<std::vector<vec>> x, e;
};

naive_run run_naive(background_payload payload, int workers, std::size_t n, int steps,
                    const std::vector<std::pair<int, int>>& start_apply) {
  naive_run out;
  std::vector<vec> x(workers, vec(n)), then;
  for (int m = 0; m < workers; ++m)
    for (std::size_t i = 0; i < n; ++i) x[m][i] = static_cast<float>(m) + static_cast<float>(i) / 100.0f;
  const gcomp::random_contiguous_block<float, rescale::none> c({.ratio = 0.125});
  foreground_oracle oracle;
  for (int t = 0; t < steps; ++t) {
    std::vector<vec> g;
    for (int m = 0; m < workers; ++m) g.push_back(gradient(m, t, n));
    const vec global = oracle.step(g, support_of(c, key_of(t, 0), n));
    for (auto& xm : x)
      for (std::size_t i = 0; i < n; ++i) xm[i] = xm[i] - lr * global[i];
    auto& target = payload == background_payload::parameters ? x : oracle.e;
    for (const auto& [start, apply] : start_apply)
      if (apply == t) apply_average(target, then);
    for (const auto& [start, apply] : start_apply)
      if (start == t) then = target;
    out.x.push_back(x);
    out.e.push_back(oracle.e);
  }
  return out;
}

}  // namespace

TEST_CASE("the step returns while the background is pending; the result is applied when it completes") {
  // Delay 2: the operation started at step 0 is first tested at step 2; the
  // transport holds it until step 6. The second one starts at step 6, is
  // tested at steps 8 and 9 and is still held when the run ends.
  constexpr int workers = 4, steps = 10;
  constexpr std::size_t n = 64;
  for (background_payload payload : {background_payload::parameters, background_payload::residual}) {
    CAPTURE(static_cast<int>(payload));
    const delayed_run run = run_delayed(payload, 2, workers, n, steps, {6});
    const naive_run expected = run_naive(payload, workers, n, steps, {{0, 6}, {6, -1}});
    for (int t = 0; t < steps; ++t)
      for (int m = 0; m < workers; ++m) {
        CAPTURE(t);
        CAPTURE(m);
        CHECK(run.applied[t][m] == (t == 6));
        CHECK(run.x[t][m] == expected.x[t][m]);  // bitwise, before and after the correction
        CHECK(run.e[t][m] == expected.e[t][m]);
      }
    for (int m = 0; m < workers; ++m) {
      CHECK(run.waits[m] == 0);             // never a blocking wait inside a step
      CHECK(run.held_tests[m] == 12);       // steps 2-5 and 8-9 found both calls unfinished
      CHECK(run.counters[m].pending_checks == 6);
      CHECK(run.counters[m].started == 2);
      CHECK(run.counters[m].applied == 1);
      CHECK(run.pending_at_end[m]);
    }
    if (payload == background_payload::parameters) {
      // Different starting points: after the correction every worker holds
      // avg(x_0) plus the same foreground updates, so they agree up to rounding.
      double before = 0, after = 0;
      for (std::size_t i = 0; i < n; ++i)
        for (int m = 1; m < workers; ++m) {
          before = std::max(before, double(std::fabs(run.x[5][m][i] - run.x[5][0][i])));
          after = std::max(after, double(std::fabs(run.x[6][m][i] - run.x[6][0][i])));
        }
      CHECK(before > 2.9);
      CHECK(after < 1e-5);
    } else {
      // Averaging residuals moves no gradient mass: sum_m e_m is what it would
      // have been without the background, up to rounding (|e| ~ 1, float).
      const naive_run alone = run_naive(background_payload::none, workers, n, steps, {});
      double moved = 0;
      for (std::size_t i = 0; i < n; ++i) {
        double with = 0, without = 0;
        for (int m = 0; m < workers; ++m) {
          with += run.e[6][m][i];
          without += alone.e[6][m][i];
          moved = std::max(moved, double(std::fabs(run.e[6][m][i] - alone.e[6][m][i])));
        }
        CHECK(std::fabs(with - without) < 1e-5);
      }
      CHECK(moved > 0.1);  // while the individual residuals did change
    }
  }
}

TEST_CASE("ranks that see completion at different steps skip the operation alike and realign") {
  // Rank 0's transport lets the first operation go at step 2, the others' at
  // step 3: rank 0 snapshots the second one at step 2, the others at step 3.
  // Every rank sees the same step sums, so all skip it (and x is left alone),
  // then wait for a step that is a multiple of realign_every (8) and agree again.
  // M = 4: the average of equal floats is then exact, so identical workers get
  // corrections of exactly 0 and stay bitwise equal whenever they apply them.
  constexpr int workers = 4, steps = 12;
  constexpr std::size_t n = 32;
  std::vector<gcomp::background_counters> counters(workers);
  std::vector<std::vector<int>> applied(steps, std::vector<int>(workers));
  std::vector<int> unchanged_at_skip(workers);
  std::vector<vec> final_x(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& inner) {
    delayed_comm comm(inner);
    const int m = comm.rank();
    gcomp::shared_randomk<float, rescale::none> c({.ratio = 0.25});
    gcomp::divisible<float> agg({.payload = background_payload::parameters, .delay = 1,
                                 .realign_every = 8});
    vec x(n, 1.0f), global(n);
    for (int t = 0; t < steps; ++t) {
      const vec g = gradient(m, t, n);
      agg.aggregate(gcomp::host_seq{}, comm, c, std::span<const float>(g), std::span<float>(global),
                    key_of(t, m));
      for (std::size_t i = 0; i < n; ++i) x[i] = x[i] - lr * global[i];
      if (t == (m == 0 ? 2 : 3) || t == 5 || t == 9) comm.release();
      const vec before = x;
      applied[t][m] = agg.background(gcomp::host_seq{}, comm, std::span<float>(x));
      if (t == 5) unchanged_at_skip[m] = x == before;
    }
    counters[m] = agg.counters();
    final_x[m] = x;
  });
  for (int m = 0; m < workers; ++m) {
    CAPTURE(m);
    CHECK(applied[m == 0 ? 2 : 3][m] == 1);  // the first operation, snapshots of step 0 everywhere
    CHECK(applied[5][m] == 0);               // the mismatched one, skipped
    CHECK(unchanged_at_skip[m] == 1);
    CHECK(applied[9][m] == 1);               // started at step 8 on every rank
    CHECK(counters[m].started == 4);         // the fourth starts at step 9
    CHECK(counters[m].skipped == 1);
    CHECK(counters[m].applied == 2);
    CHECK(final_x[m] == final_x[0]);  // identical starts: every correction was exactly 0 here
  }
}

TEST_CASE("finish() brings ranks that are one operation apart to the same end") {
  // Only rank 0's transport lets the first operation go at the last step, so
  // rank 0 applies it and starts a second one that the others never post.
  // finish() has them agree on the count; the others post the missing one
  // (their snapshot is of another step), and every rank skips it.
  constexpr int workers = 4, steps = 4;
  constexpr std::size_t n = 16;
  std::vector<gcomp::background_counters> counters(workers);
  std::vector<int> applied_by_finish(workers), same_stats(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& inner) {
    delayed_comm comm(inner);
    const int m = comm.rank();
    gcomp::random_contiguous_block<float, rescale::none> c({.k = 4});
    gcomp::divisible<float> agg({.payload = background_payload::residual});
    vec x(n, 0.0f), global(n);
    for (int t = 0; t < steps; ++t) {
      const vec g = gradient(m, t, n);
      agg.aggregate(gcomp::host_seq{}, comm, c, std::span<const float>(g), std::span<float>(global),
                    key_of(t, m));
      if (m == 0 && t == steps - 1) comm.release();
      agg.background(gcomp::host_seq{}, comm, std::span<float>(x));
    }
    CHECK(agg.counters().started == (m == 0 ? 2u : 1u));
    applied_by_finish[m] = agg.finish(gcomp::host_seq{}, comm, std::span<float>(x));
    CHECK_FALSE(agg.background_pending());
    counters[m] = agg.counters();
    same_stats[m] = agg.foreground_stats() + agg.background_stats() == comm.stats();
  });
  for (int m = 0; m < workers; ++m) {
    CAPTURE(m);
    CHECK(applied_by_finish[m] == (m != 0));  // the others apply the first one in finish()
    CHECK(counters[m].started == 2);
    CHECK(counters[m].applied == 1);
    CHECK(counters[m].skipped == 1);
    CHECK(same_stats[m] == 1);
  }
}

TEST_CASE("foreground and background bytes are reported apart and add up to comm.stats()") {
  constexpr std::size_t n = 256;
  constexpr int steps = 40;
  for (int workers : {1, 4}) {
    CAPTURE(workers);
    std::vector<gcomp::comm_stats> seen(workers), fg(workers), bg(workers);
    std::vector<gcomp::background_counters> counters(workers);
    gcomp::inproc_group group(workers);
    group.run([&](gcomp::inproc_comm& comm) {
      const auto m = static_cast<std::size_t>(comm.rank());
      gcomp::random_contiguous_block<float, rescale::none> c({.ratio = 1.0 / 16});
      gcomp::divisible<float> agg({.payload = background_payload::residual, .delay = 2});
      vec x(n, 0.0f), global(n);
      for (int t = 0; t < steps; ++t) {
        const vec g = gradient(comm.rank(), t, n);
        agg.aggregate(gcomp::host_seq{}, comm, c, std::span<const float>(g), std::span<float>(global),
                      key_of(t, comm.rank()));
        agg.background(gcomp::host_seq{}, comm, std::span<float>(x));
      }
      agg.finish(gcomp::host_seq{}, comm, std::span<float>(x));
      CHECK_FALSE(agg.background_pending());
      seen[m] = comm.stats();
      fg[m] = agg.foreground_stats();
      bg[m] = agg.background_stats();
      counters[m] = agg.counters();
    });
    const std::uint64_t crossing = workers > 1 ? 1 : 0;  // one rank: nothing crosses
    for (std::size_t m = 0; m < std::size_t(workers); ++m) {
      const std::uint64_t ops = counters[m].applied + counters[m].skipped;
      CHECK(ops == counters[m].started);
      CHECK(ops >= 1);
      CHECK(fg[m] == gcomp::comm_stats{crossing * steps * (n / 16) * 4, crossing * steps * (n / 16) * 4,
                                       steps});
      // Each operation: n floats and the 16-byte step tag; finish(): one 8-byte count.
      const std::uint64_t bytes = crossing * (ops * (n * 4 + 16) + 8);
      CHECK(bg[m] == gcomp::comm_stats{bytes, bytes, 2 * ops + 1});
      CHECK(fg[m] + bg[m] == seen[m]);
    }
  }
}

TEST_CASE("divisible rejects bad options and arguments, leaving buffers unchanged") {
  CHECK_THROWS_WITH_AS(gcomp::divisible<float>({.delay = 0}),
                       "gcomp::divisible: delay must be > 0, got 0", gcomp::error);
  CHECK_THROWS_WITH_AS(gcomp::divisible<float>({.realign_every = 0}),
                       "gcomp::divisible: realign_every must be > 0, got 0", gcomp::error);
  CHECK_THROWS_WITH_AS(gcomp::divisible<float>({.payload = static_cast<background_payload>(7)}),
                       "gcomp::divisible: payload must be none, parameters or residual, got 7",
                       gcomp::error);

  gcomp::inproc_group group(2);
  group.run([&](gcomp::inproc_comm& comm) {
    const gcomp::host_seq seq;
    gcomp::random_contiguous_block<float, rescale::none> c({.k = 3});
    gcomp::divisible<float> agg({.payload = background_payload::residual});
    vec g(8, 1.0f), out(8, 7.0f), out7(7, 7.0f), x(8, 2.0f), x9(9, 2.0f);
    // Residual payload before any foreground.
    CHECK_THROWS_WITH_AS(agg.background(seq, comm, std::span<float>(x)),
                         "gcomp::divisible::background: the residual payload needs aggregate() to "
                         "have run first",
                         gcomp::error);
    CHECK_THROWS_WITH_AS(agg.aggregate(seq, comm, c, std::span<const float>(g), std::span<float>(out7),
                                       key_of(0, comm.rank())),
                         "gcomp::divisible::aggregate: global has size 7 but local has size 8; they "
                         "must match",
                         gcomp::error);
    CHECK(out7 == vec(7, 7.0f));
    CHECK(agg.residual().empty());
    // k larger than the gradient: the compressor throws before e changes.
    gcomp::random_contiguous_block<float, rescale::none> too_big({.k = 9});
    CHECK_THROWS_AS(agg.aggregate(seq, comm, too_big, std::span<const float>(g), std::span<float>(out),
                                  key_of(0, comm.rank())),
                    gcomp::error);
    CHECK(out == vec(8, 7.0f));
    agg.aggregate(seq, comm, c, std::span<const float>(g), std::span<float>(out), key_of(0, comm.rank()));
    const vec e(agg.residual().begin(), agg.residual().end());
    const vec g7(7, 1.0f);
    CHECK_THROWS_WITH_AS(agg.aggregate(seq, comm, c, std::span<const float>(g7), std::span<float>(out7),
                                       key_of(1, comm.rank())),
                         "gcomp::divisible::aggregate: local has size 7 but the residual built at "
                         "the first step has size 8; they must match",
                         gcomp::error);
    CHECK(vec(agg.residual().begin(), agg.residual().end()) == e);
    CHECK_THROWS_WITH_AS(agg.background(seq, comm, std::span<float>(x9)),
                         "gcomp::divisible::background: params has size 9 but the residual has size "
                         "8; they must match",
                         gcomp::error);
    CHECK(x9 == vec(9, 2.0f));
    CHECK_FALSE(agg.background_pending());
    agg.background(seq, comm, std::span<float>(x));
    CHECK(agg.background_pending());
    // Another communicator while an operation is in flight on this one.
    gcomp::test::delayed_comm other(comm);
    CHECK_THROWS_WITH_AS(agg.background(seq, other, std::span<float>(x)),
                         "gcomp::divisible::background: an operation is in flight on another "
                         "communicator; pass the one it started on",
                         gcomp::error);
    CHECK(agg.finish(seq, comm, std::span<float>(x)));
    CHECK(x == vec(8, 2.0f));  // the residual payload never touches x
  });
}
