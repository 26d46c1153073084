// jointspar: unbiasedness over many keys, bytes per step against comm.stats(), identical
// masks and probabilities on every worker, untouched inactive layers, convergence of
// JointSpar (SGD) and JointSpar-LARS on a layered least-squares problem, errors.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "compressor_checks.hpp"
#include "gcomp/algo/jointspar.hpp"
#include "gcomp/comm/inproc.hpp"
#include "least_squares.hpp"

using namespace gcomp::test::least_squares;
using gcomp::test::expect_error;

namespace {

// The least-squares model of least_squares.hpp cut into four layers of unequal size.
const gcomp::layout layered{{"l0", 8}, {"l1", 6}, {"l2", 4}, {"l3", 2}};

struct worker_log {
  std::vector<double> x;                      // final parameters
  std::vector<std::uint8_t> masks;            // every step's mask, concatenated
  std::vector<double> probabilities;          // p after every step, concatenated
  std::uint64_t mask_bytes = 0;               // sum over steps of the active layers' bytes
  bool stats_match = true;                    // comm.stats() grew as stats_growth_matches says each step
};

// Each step, comm.stats() grows by the gradient's all-reduce (last_step().bytes,
// one collective) and by the non-finite check's one-element all-reduce
// (core/nonfinite.hpp: sizeof(T) bytes, one collective; on by default):
// bytes = last_step().bytes + sizeof(T), collectives = 2 (the groups here have M > 1).
template <class T>
bool stats_growth_matches(const gcomp::comm_stats& before, const gcomp::comm_stats& after,
                          const gcomp::jointspar_step_stats& last) {
  const std::uint64_t bytes = last.bytes + sizeof(T);
  return after.bytes_sent - before.bytes_sent == bytes &&
         after.bytes_received - before.bytes_received == bytes &&
         after.collectives - before.collectives == 2;
}

// One worker's training loop: the gradient of the active layers only (the
// inactive ones are NaN, as a trainer that skipped them could leave them).
template <class O, class Comm, class Policy>
worker_log train(const problem& p, Comm& comm, gcomp::jointspar<O>& js, int steps, const Policy& policy) {
  worker_log log;
  std::vector<double> x(dims, 0.0), g(dims);
  for (int t = 0; t < steps; ++t) {
    const gcomp::layer_mask active = js.begin_step();
    std::vector<std::size_t> rows;
    for (std::size_t k = 0; k < batch; ++k) rows.push_back(batch_row(comm.rank(), t, k));
    add_gradient(p, rows, x.data(), g.data());
    for (std::size_t d = 0; d < layered.num_layers(); ++d) {
      if (!active[d]) std::fill_n(g.begin() + std::ptrdiff_t(layered[d].offset), layered[d].size, NAN);
      log.mask_bytes += active[d] ? layered[d].size * sizeof(double) : 0;
    }
    log.masks.insert(log.masks.end(), active.begin(), active.end());
    const gcomp::comm_stats before = comm.stats();
    js.finish_step(policy, comm, layered, std::span<double>(x), std::span<const double>(g));
    const gcomp::comm_stats after = comm.stats();
    log.stats_match = log.stats_match && stats_growth_matches<double>(before, after, js.last_step());
    log.probabilities.insert(log.probabilities.end(), js.probabilities().begin(), js.probabilities().end());
  }
  log.x = x;
  return log;
}

// Runs 4 in-process workers, each with its own copy of `prototype`.
template <class O, class Policy = gcomp::host_seq>
std::vector<worker_log> run_group(const problem& p, const gcomp::jointspar<O>& prototype, int steps,
                                  const Policy& policy = {}) {
  std::vector<worker_log> logs(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    gcomp::jointspar<O> js = prototype;
    logs[std::size_t(comm.rank())] = train(p, comm, js, steps, policy);
  });
  return logs;
}

}  // namespace

TEST_CASE("the aggregated gradient is unbiased over many keys, with the exact per-coordinate variance") {
  // Fixed local gradients (lr = 0 keeps x, hence g, fixed). Each coordinate i
  // of layer d has E[ghat_i] = gbar_i and Var = (1 - pi_d) / pi_d gbar_i^2
  // exactly (ghat_i = gbar_i / pi_d with probability pi_d, else 0). Over N
  // keys the mean is within 5 sigma = 5 sqrt(Var / N) of gbar_i (plus 1e-12
  // relative for rounding); 12 coordinates x 2 settings = 24 statistics,
  // false failure below 24 * 5.7e-7 (normal approximation).
  const gcomp::layout lay{{"a", 3}, {"b", 3}, {"c", 3}, {"d", 3}};
  struct setting {
    double budget, p_min;
    std::vector<double> p;
  };
  // The second setting's unconditioned draw is empty with probability 0.66:
  // forcing a layer there would bias it; the conditioned draw does not.
  const setting settings[] = {{2.0, 0.0125, {0.9, 0.6, 0.4, 0.1}}, {0.4, 0.1, {0.1, 0.1, 0.1, 0.1}}};
  constexpr int draws = 6000, group_size = 2;
  for (const setting& c : settings) {
    std::vector<std::vector<double>> sums(group_size, std::vector<double>(12, 0.0));
    std::vector<double> pi;
    gcomp::inproc_group group(group_size);
    group.run([&](gcomp::inproc_comm& comm) {
      gcomp::jointspar_sgd<double> js(4, gcomp::sgd<double>({.lr = 0.0}),
                                      {.budget = c.budget, .p_min = c.p_min,
                                       .rule = gcomp::probability_rule::fixed, .seed = 1234});
      js.set_probabilities(c.p);
      std::vector<double> x(12, 1.0), g(12);
      for (std::size_t i = 0; i < 12; ++i) g[i] = (comm.rank() + 1) * std::cos(0.9 * double(i)) + 0.1;
      for (int t = 0; t < draws; ++t) {
        js.finish_step(gcomp::host_seq{}, comm, lay, std::span<double>(x), std::span<const double>(g));
        for (std::size_t i = 0; i < 12; ++i) sums[std::size_t(comm.rank())][i] += js.global_gradient()[i];
      }
      if (comm.rank() == 0) pi.assign(js.sampler().inclusion_probabilities().begin(), js.sampler().inclusion_probabilities().end());
    });
    CHECK(sums[1] == sums[0]);  // the workers agree, so checking one suffices
    for (std::size_t i = 0; i < 12; ++i) {
      const double mean_g = (1.5 * std::cos(0.9 * double(i)) + 0.1);  // (g_0 + g_1) / 2
      const double q = pi[i / 3];
      const double sigma = std::sqrt((1 - q) / q * mean_g * mean_g / draws);
      gcomp::test::check_within_sigmas(sums[0][i] / draws, mean_g, sigma + 1e-12 * std::fabs(mean_g) / 5, "coordinate");
    }
  }
}

TEST_CASE("bytes per step equal the active layers' bytes, as comm.stats() counts them") {
  const problem p = make_problem(3);
  const gcomp::jointspar_sgd<double> js(4, gcomp::sgd<double>({.lr = 0.005, .momentum = 0.9}), {.seed = 8});
  const auto logs = run_group(p, js, 200);
  std::uint64_t dense = 200 * dims * sizeof(double);
  for (const auto& log : logs) {
    CHECK(log.stats_match);  // every step: += last_step().bytes + sizeof(double), two collectives
    CHECK(log.mask_bytes == logs[0].mask_bytes);
  }
  // s = D / 2 of 4 equal-probability layers: about half the dense traffic.
  INFO("bytes " << logs[0].mask_bytes << " of dense " << dense);
  CHECK(logs[0].mask_bytes < dense);
  CHECK(logs[0].mask_bytes > dense / 5);
}

TEST_CASE("every worker draws the same masks and keeps the same probabilities, for any thread count") {
  const problem p = make_problem(5);
  for (const auto rule : {gcomp::probability_rule::bandit, gcomp::probability_rule::variance_optimal}) {
    const gcomp::jointspar_sgd<double> js(4, gcomp::sgd<double>({.lr = 0.005, .momentum = 0.9}),
                                          {.p_min = 0.05, .rule = rule, .seed = 17});
    const auto logs = run_group(p, js, 150);
    const auto threaded = run_group(p, js, 150, gcomp::host_par(3));
    for (int m = 0; m < workers; ++m) {
      const auto& log = logs[std::size_t(m)];
      CHECK(log.masks == logs[0].masks);
      CHECK(log.probabilities == logs[0].probabilities);  // bitwise
      CHECK(log.x == logs[0].x);
      CHECK(threaded[std::size_t(m)].masks == logs[0].masks);
      CHECK(threaded[std::size_t(m)].x == logs[0].x);
    }
    // The probabilities really moved, within [p_min, 1] and summing to s = 2.
    int out_of_bounds = 0;
    for (std::size_t t = 0; t < 150; ++t) {
      double sum = 0;
      for (std::size_t d = 0; d < 4; ++d) {
        const double v = logs[0].probabilities[t * 4 + d];
        out_of_bounds += v < 0.05 || v > 1.0;
        sum += v;
      }
      out_of_bounds += std::fabs(sum - 2.0) > 1e-12;
    }
    CHECK(out_of_bounds == 0);
    CHECK(logs[0].probabilities.back() != 0.5);
  }
}

TEST_CASE("JointSpar (SGD) and JointSpar-LARS converge on a layered least-squares problem") {
  // 4 workers, non-iid shards, 20 parameters in 4 layers, half of the layers
  // per step. Bound: the loss ends within 1.5x the least-squares optimum's
  // (5.2e-5, noise 0.01) and 1e5 times below the start (12.8).
  const problem p = make_problem(2024);
  const auto optimum = least_squares_optimum(p);
  const double best = loss(p, optimum.data());
  const std::vector<double> zero(dims, 0.0);
  const double start = loss(p, zero.data());
  const int steps = 1000;
  for (const auto rule : {gcomp::probability_rule::bandit, gcomp::probability_rule::variance_optimal}) {
    // alpha_p defaults to the learning rate, as in the paper.
    const gcomp::jointspar_sgd<double> sgd_js(4, gcomp::sgd<double>({.lr = 0.005, .momentum = 0.9}),
                                              {.p_min = 0.1, .rule = rule});
    const double end_sgd = loss(p, run_group(p, sgd_js, steps)[0].x.data());
    // LARS normalizes each layer's step, so it needs a decaying rate to settle.
    const gcomp::jointspar_lars<double> lars_js(
        4,
        gcomp::lars<double>({.lr = 0.5, .momentum = 0.9, .weight_decay = 0.0, .trust_coefficient = 0.01},
                            gcomp::lr_schedule::cosine(0.5, steps)),
        {.p_min = 0.1, .rule = rule, .bandit_rate = 1e-4});
    const double end_lars = loss(p, run_group(p, lars_js, steps)[0].x.data());
    INFO("rule " << int(rule) << ": start " << start << ", optimum " << best << ", JointSpar "
                 << end_sgd << ", JointSpar-LARS " << end_lars);
    CHECK(best < 1e-4);
    CHECK(end_sgd < 1.5 * best);
    CHECK(end_lars < 1.5 * best);
    CHECK(end_sgd < 1e-5 * start);
    CHECK(end_lars < 1e-5 * start);
  }
}

TEST_CASE("inactive layers keep their parameters and optimizer state; their gradients are not read") {
  gcomp::inproc_group group(1);
  auto& comm = group.comm(0);
  const gcomp::layout lay{3, 2, 4};
  gcomp::jointspar_sgd<float> js(3, gcomp::sgd<float>({.lr = 0.1, .momentum = 0.9}), {.budget = 1.5, .seed = 2});
  gcomp::jointspar_lars<float> jl(3, gcomp::lars<float>({.lr = 0.1}), {.budget = 1.5, .seed = 2});
  std::vector<float> x(9, 1.0f), y(9, 1.0f), g(9);
  int inactive_seen = 0;
  for (int t = 0; t < 40; ++t) {
    const gcomp::layer_mask active = js.begin_step();
    CHECK(js.begin_step().data() == active.data());  // the same set until finish_step
    const std::vector<std::uint8_t> mask(active.begin(), active.end());
    CHECK(std::equal(mask.begin(), mask.end(), jl.begin_step().begin()));  // same seed, same sets
    for (std::size_t i = 0; i < 9; ++i) g[i] = 0.5f + float(i);
    for (std::size_t d = 0; d < 3; ++d)
      if (!mask[d]) std::fill_n(g.begin() + std::ptrdiff_t(lay[d].offset), lay[d].size, NAN);
    const std::vector<float> x_before = x, y_before = y;
    const auto m = js.optimizer.momentum_buffer();
    const std::vector<float> momentum_before(m.begin(), m.end());
    const auto r = jl.optimizer.trust_ratios();
    const std::vector<double> ratios_before(r.begin(), r.end());
    js.finish_step(gcomp::host_seq{}, comm, lay, std::span<float>(x), std::span<const float>(g));
    jl.finish_step(gcomp::host_seq{}, comm, lay, std::span<float>(y), std::span<const float>(g));
    for (std::size_t d = 0; d < 3; ++d) {
      const std::size_t b = lay[d].offset, e = b + lay[d].size;
      for (std::size_t i = b; i < e; ++i) {
        CHECK(std::isfinite(x[i]));
        CHECK(std::isfinite(y[i]));
        if (mask[d]) continue;
        CHECK(x[i] == x_before[i]);
        CHECK(y[i] == y_before[i]);
        if (!momentum_before.empty()) CHECK(js.optimizer.momentum_buffer()[i] == momentum_before[i]);
        CHECK(js.global_gradient()[i] == 0.0f);
      }
      if (!mask[d] && !ratios_before.empty()) CHECK(jl.optimizer.trust_ratios()[d] == ratios_before[d]);
      inactive_seen += !mask[d];
    }
    CHECK(js.last_step().step == std::uint64_t(t));
    CHECK(js.steps() == std::uint64_t(t + 1));
  }
  CHECK(inactive_seen > 10);
}

TEST_CASE("finish_step without begin_step draws the same set; stats and defaults") {
  gcomp::inproc_group group(1);
  const gcomp::layout lay{2, 2, 2, 2};
  gcomp::jointspar_sgd<float> js(4, gcomp::sgd<float>({.lr = 0.03}), {.seed = 4});
  CHECK(*js.sampler().options().bandit_rate == doctest::Approx(0.03));  // alpha_p = eta
  gcomp::jointspar_sgd<float> explicit_rate(4, gcomp::sgd<float>({.lr = 0.03}), {.bandit_rate = 0.5});
  CHECK(*explicit_rate.sampler().options().bandit_rate == 0.5);
  const gcomp::layer_sampler twin(4, {.bandit_rate = 0.03, .seed = 4});
  std::vector<std::uint8_t> expected(4);
  twin.draw(0, expected);
  std::vector<float> x(8, 1.0f), g(8, 1.0f);
  js.finish_step(gcomp::host_seq{}, group.comm(0), lay, std::span<float>(x), std::span<const float>(g));
  CHECK(std::equal(expected.begin(), expected.end(), js.mask().begin()));
  std::size_t active = 0;
  for (auto a : expected) active += a;
  CHECK(js.last_step().active_layers == active);
  CHECK(js.last_step().active_elements == 2 * active);
  CHECK(js.last_step().bytes == 2 * active * sizeof(float));
  CHECK(js.total_bytes() == js.last_step().bytes);
}

TEST_CASE("bad arguments throw gcomp::error with parameters, steps and probabilities unchanged") {
  gcomp::inproc_group group(1);
  auto& comm = group.comm(0);
  const gcomp::layout lay{2, 3}, three{1, 2, 2};
  gcomp::jointspar_sgd<float> js(2, gcomp::sgd<float>({.lr = 0.1}), {.budget = 2.0});  // every layer active
  std::vector<float> x(5, 1.0f), g(5, 1.0f), short_g(4, 1.0f), long_x(6, 1.0f);
  const gcomp::host_seq seq;
  expect_error([&] { js.finish_step(seq, comm, three, std::span<float>(x), std::span<const float>(g)); },
               "gcomp::jointspar::finish_step: layout layers has size 3 but the sampler's layers has size 2");
  expect_error([&] { js.finish_step(seq, comm, lay, std::span<float>(long_x), std::span<const float>(g)); },
               "params has size 6 but the layout covers 5 elements");
  expect_error([&] { js.finish_step(seq, comm, lay, std::span<float>(x), std::span<const float>(short_g)); },
               "grads has size 4 but params has size 5");
  g[3] = std::numeric_limits<float>::infinity();
  // By default the step is skipped before the gradient reaches any state ...
  CHECK_FALSE(js.finish_step(seq, comm, lay, std::span<float>(x), std::span<const float>(g)));
  CHECK(js.skipped_steps() == 1);
  // ... and with propagate the aggregated gradient's check is the last line of defence.
  js.set_nonfinite_action(gcomp::on_nonfinite::propagate);
  expect_error([&] { js.finish_step(seq, comm, lay, std::span<float>(x), std::span<const float>(g)); },
               "the aggregated gradient of layer 'layer1' is not finite");
  CHECK(x == std::vector<float>(5, 1.0f));
  CHECK(js.steps() == 0);
  CHECK(js.optimizer.steps() == 0);
  CHECK(js.probabilities()[0] == 1.0);
  expect_error([&] { js.set_probabilities(std::vector<double>{0.5, 0.5}); }, "p must sum to the budget 2");
  // Options are checked when the pipeline is built.
  expect_error([] { gcomp::jointspar_sgd<float>(3, gcomp::sgd<float>(), {.p_min = 2.0}); }, "p_min must be in (0, 1]");
  expect_error([] { gcomp::jointspar_sgd<float>(0, gcomp::sgd<float>()); }, "layers must be > 0");
}
