// layer_sampler: water-filling against an enumeration oracle, the bandit formula, probability
// bounds over many updates, draw frequencies, shared-key agreement, option and argument errors.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "compressor_checks.hpp"
#include "gcomp/algo/layer_sampler.hpp"
#include "gcomp/comm/inproc.hpp"

using gcomp::test::check_within_sigmas;
using gcomp::test::expect_error;

namespace {

// The naive oracle of water_fill: try every split of the coordinates into
// floor / free / cap. For the split, c = (s - n_low p_min - n_high) / sum_free w,
// and it is the answer when every coordinate is where c puts it. Exponential,
// fine for n <= 7.
std::vector<double> enumerate_projection(const std::vector<double>& w, double s, double p_min) {
  const std::size_t n = w.size();
  std::size_t splits = 1;
  for (std::size_t d = 0; d < n; ++d) splits *= 3;
  for (std::size_t code = 0; code < splits; ++code) {
    std::vector<int> where(n);  // 0 floor, 1 free, 2 cap
    double fixed = 0, free_sum = 0;
    for (std::size_t d = 0, c = code; d < n; ++d, c /= 3) {
      where[d] = int(c % 3);
      if (where[d] == 0) fixed += p_min;
      if (where[d] == 2) fixed += 1.0;
      if (where[d] == 1) free_sum += w[d];
    }
    std::vector<double> q(n);
    if (free_sum == 0) {
      if (std::fabs(fixed - s) > 1e-12 * s) continue;
      // Consistent only if the floors could all sit below the caps' weights.
      double low_max = 0, high_min = 1e300;
      for (std::size_t d = 0; d < n; ++d) {
        if (where[d] == 0) low_max = std::max(low_max, w[d]);
        if (where[d] == 2) high_min = std::min(high_min, w[d]);
      }
      if (low_max > high_min) continue;
      for (std::size_t d = 0; d < n; ++d) q[d] = where[d] == 0 ? p_min : 1.0;
      return q;
    }
    const double c = (s - fixed) / free_sum;
    bool ok = c > 0;
    for (std::size_t d = 0; d < n && ok; ++d) {
      const double v = c * w[d];
      if (where[d] == 0) ok = v <= p_min * (1 + 1e-12);
      if (where[d] == 1) ok = v >= p_min * (1 - 1e-12) && v <= 1 + 1e-12;
      if (where[d] == 2) ok = v >= 1 - 1e-12;
      q[d] = where[d] == 0 ? p_min : where[d] == 2 ? 1.0 : v;
    }
    if (ok) return q;
  }
  FAIL("the oracle found no consistent split");
  return {};
}

void check_feasible(std::span<const double> p, double s, double p_min) {
  double sum = 0;
  for (double v : p) {
    CHECK(v >= p_min);
    CHECK(v <= 1.0);
    sum += v;
  }
  CHECK(std::fabs(sum - s) <= 1e-12 * s);
}

}  // namespace

TEST_CASE("water_fill equals the enumeration oracle on random and extreme instances") {
  std::mt19937 gen(11);
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  const double floors[] = {0.0125, 0.1, 0.3};
  double worst = 0;
  for (int trial = 0; trial < 400; ++trial) {
    const std::size_t n = 1 + std::size_t(trial % 7);
    const double p_min = std::min(floors[trial % 3], 1.0 / double(n));
    // Spreads from near-equal weights to weights e^(+-30) apart.
    const double spread = trial % 4 == 0 ? 0.05 : trial % 4 == 1 ? 1.0 : trial % 4 == 2 ? 3.0 : 30.0;
    std::vector<double> log_w(n), w(n), q(n);
    for (std::size_t d = 0; d < n; ++d) {
      log_w[d] = spread * normal(gen);
      w[d] = std::exp(log_w[d]);
    }
    const double s = double(n) * p_min + unit(gen) * double(n) * (1 - p_min);
    gcomp::water_fill(log_w, s, p_min, q);
    const auto oracle = enumerate_projection(w, s, p_min);
    for (std::size_t d = 0; d < n; ++d) worst = std::max(worst, std::fabs(q[d] - oracle[d]));
    check_feasible(q, s, p_min);
  }
  INFO("largest difference to the oracle: " << worst);
  CHECK(worst <= 1e-12);

  // The budget's two ends: every coordinate on the floor, every one on the cap.
  std::vector<double> log_w{0.0, 2.0, -700.0, 5.0}, q(4);
  gcomp::water_fill(log_w, 4 * 0.2, 0.2, q);
  for (double v : q) CHECK(v == doctest::Approx(0.2).epsilon(1e-15));
  gcomp::water_fill(log_w, 4.0, 0.2, q);
  CHECK(q == std::vector<double>(4, 1.0));
  // Weights e^1000 apart, beyond what exp() of the raw weights could hold.
  log_w = {1000.0, 0.0, -1000.0};
  gcomp::water_fill(log_w, 1.5, 0.1, q = std::vector<double>(3));
  CHECK(q[0] == 1.0);
  CHECK(q[1] == doctest::Approx(0.4).epsilon(1e-12));
  CHECK(q[2] == 0.1);
}

TEST_CASE("water_fill rejects bad arguments and leaves q unchanged") {
  std::vector<double> log_w{0.0, 1.0}, q{7.0, 7.0}, short_q(1);
  expect_error([&] { gcomp::water_fill(log_w, 1.0, 0.1, short_q); }, "q has size 1");
  expect_error([&] { gcomp::water_fill({}, 1.0, 0.1, std::span<double>()); }, "log_weights is empty");
  expect_error([&] { gcomp::water_fill(log_w, 2.5, 0.1, q); }, "budget must be in [0.2, 2]");
  expect_error([&] { gcomp::water_fill(log_w, 0.1, 0.1, q); }, "budget must be in [0.2, 2]");
  expect_error([&] { gcomp::water_fill(log_w, 1.0, 0.0, q); }, "p_min must be in (0, 1], got 0");
  log_w[1] = NAN;
  expect_error([&] { gcomp::water_fill(log_w, 1.0, 0.1, q); }, "log_weights[1] must be finite");
  CHECK(q == std::vector<double>{7.0, 7.0});
}

TEST_CASE("options: defaults resolved and every bad value named") {
  const gcomp::layer_sampler sampler(8);
  CHECK(sampler.budget() == 4.0);  // s = D / 2
  CHECK(sampler.options().p_min == 0.0125);
  CHECK(*sampler.options().bandit_rate == 0.01);
  for (double p : sampler.probabilities()) CHECK(p == 0.5);
  CHECK(sampler.empty_probability() == doctest::Approx(std::pow(0.5, 8)));
  for (double pi : sampler.inclusion_probabilities()) CHECK(pi == doctest::Approx(0.5 / (1 - std::pow(0.5, 8))));

  expect_error([] { gcomp::layer_sampler(0); }, "layers must be > 0");
  expect_error([] { gcomp::layer_sampler(4, {.p_min = 0.0}); }, "p_min must be in (0, 1], got 0");
  expect_error([] { gcomp::layer_sampler(4, {.p_min = 1.5}); }, "p_min must be in (0, 1], got 1.5");
  expect_error([] { gcomp::layer_sampler(4, {.p_min = NAN}); }, "p_min must be in (0, 1]");
  expect_error([] { gcomp::layer_sampler(4, {.budget = 5.0}); },
               "budget must be in [layers * p_min, layers] = [0.05, 4], got 5");
  expect_error([] { gcomp::layer_sampler(4, {.budget = 0.3, .p_min = 0.1}); },
               "budget must be in [layers * p_min, layers] = [0.4, 4], got 0.3");
  expect_error([] { gcomp::layer_sampler(4, {.budget = -1.0}); }, "got -1");
  expect_error([] { gcomp::layer_sampler(4, {.bandit_rate = -0.5}); }, "bandit_rate must be finite and >= 0");
  expect_error([] { gcomp::layer_sampler(4, {.norm_decay = 1.0}); }, "norm_decay must be in [0, 1), got 1");
  // The bounds themselves are allowed.
  CHECK_NOTHROW(gcomp::layer_sampler(4, {.budget = 4.0}));
  CHECK_NOTHROW(gcomp::layer_sampler(4, {.budget = 0.5, .p_min = 0.125}));
  CHECK_NOTHROW(gcomp::layer_sampler(1, {.p_min = 1.0}));
}

TEST_CASE("probabilities stay in [p_min, 1] and sum to s after every update, for both rules") {
  struct setting {
    std::size_t layers;
    double budget, p_min, rate;
    bool normalize;
  };
  const setting settings[] = {{10, 5.0, 0.0125, 0.01, false},  {10, 2.0, 0.05, 1e-4, false},
                              {10, 9.5, 0.0125, 0.5, true},    {7, 7 * 0.1, 0.1, 0.3, true},
                              {3, 1.0, 0.0125, 1e6, false},    {1, 0.5, 0.0125, 0.01, false},
                              {16, 8.0, 0.0125, 0.01, true}};
  for (const auto rule : {gcomp::probability_rule::bandit, gcomp::probability_rule::variance_optimal}) {
    for (const setting& c : settings) {
      gcomp::layer_sampler sampler(c.layers, {.budget = c.budget,
                                              .p_min = c.p_min,
                                              .rule = rule,
                                              .bandit_rate = c.rate,
                                              .normalize_bandit_loss = c.normalize,
                                              .seed = 3});
      std::mt19937 gen(unsigned(c.layers * 31 + unsigned(c.budget * 8)));
      std::normal_distribution<double> normal;
      std::vector<std::uint8_t> mask(c.layers);
      std::vector<double> norms(c.layers);
      int failures = 0;
      for (std::uint64_t t = 0; t < 600; ++t) {
        CHECK(sampler.draw(t, mask) >= 1);
        // Norms over 12 decades, an occasional exact zero, and a few huge ones.
        for (std::size_t d = 0; d < c.layers; ++d)
          norms[d] = (gen() % 17 == 0) ? 0.0 : std::exp(6.0 * normal(gen)) / sampler.inclusion_probabilities()[d];
        sampler.update(mask, norms);
        double sum = 0;
        bool in_bounds = true;
        for (double p : sampler.probabilities()) {
          in_bounds = in_bounds && p >= c.p_min && p <= 1.0;
          sum += p;
        }
        failures += !in_bounds || std::fabs(sum - c.budget) > 1e-12 * c.budget;
      }
      INFO("rule " << int(rule) << ", D = " << c.layers << ", s = " << c.budget);
      CHECK(failures == 0);
    }
  }
}

TEST_CASE("bandit update: the spec's EXP3 step written out naively, then projected") {
  const std::size_t layers = 5;
  const double s = 2.0, p_min = 0.05, alpha = 0.002;
  for (const bool normalize : {false, true}) {
    gcomp::layer_sampler sampler(layers, {.budget = s, .p_min = p_min, .bandit_rate = alpha,
                                          .normalize_bandit_loss = normalize});
    const std::vector<double> start{0.7, 0.5, 0.3, 0.25, 0.25};
    sampler.set_probabilities(start);
    std::vector<double> pi(sampler.inclusion_probabilities().begin(),
                           sampler.inclusion_probabilities().end());
    const std::vector<std::uint8_t> mask{1, 0, 1, 1, 0};
    const std::vector<double> scaled{3.0, 99.0, 0.5, 8.0, 99.0};  // ||ghat_d||; inactive ignored
    sampler.update(mask, scaled);

    // L = max over active of the unscaled norm pi_d ||ghat_d||.
    double big_l = 0;
    for (std::size_t d = 0; d < layers; ++d)
      if (mask[d]) big_l = std::max(big_l, pi[d] * scaled[d]);
    CHECK(sampler.max_layer_norm() == doctest::Approx(big_l).epsilon(1e-15));
    std::vector<double> w(layers);
    for (std::size_t d = 0; d < layers; ++d) {
      double h = 0;
      if (mask[d]) {
        double loss = -scaled[d] * scaled[d] + big_l * big_l / (p_min * p_min);
        if (normalize) loss /= big_l * big_l / (p_min * p_min);
        h = loss / pi[d];
      }
      w[d] = start[d] * std::exp(-alpha * h);
    }
    const auto expected = enumerate_projection(w, s, p_min);
    for (std::size_t d = 0; d < layers; ++d)
      CHECK(sampler.probabilities()[d] == doctest::Approx(expected[d]).epsilon(1e-10));
    // Inactive layers carry no loss, so they gain probability.
    CHECK(sampler.probabilities()[1] > start[1]);
  }
}

TEST_CASE("variance_optimal: p is the water-filled norm estimate, an EMA of the observed norms") {
  const std::size_t layers = 4;
  const double s = 2.0, p_min = 0.05, decay = 0.75;
  gcomp::layer_sampler sampler(layers, {.budget = s, .p_min = p_min,
                                        .rule = gcomp::probability_rule::variance_optimal,
                                        .norm_decay = decay});
  const std::vector<std::uint8_t> all{1, 1, 1, 1}, some{1, 0, 1, 0};
  std::vector<double> truth{8.0, 2.0, 1.0, 0.01}, scaled(layers);
  auto observe = [&](const std::vector<std::uint8_t>& mask, const std::vector<double>& norms) {
    for (std::size_t d = 0; d < layers; ++d) scaled[d] = norms[d] / sampler.inclusion_probabilities()[d];
    sampler.update(mask, scaled);
  };
  observe(all, truth);  // the first observation is taken as it is
  auto expected = enumerate_projection(truth, s, p_min);
  for (std::size_t d = 0; d < layers; ++d) {
    CHECK(sampler.norm_estimates()[d] == doctest::Approx(truth[d]).epsilon(1e-14));
    CHECK(sampler.probabilities()[d] == doctest::Approx(expected[d]).epsilon(1e-12));
  }
  CHECK(sampler.probabilities()[0] == 1.0);  // capped
  CHECK(sampler.probabilities()[3] == p_min);  // floored

  // The second observation of layers 0 and 2 moves their EMA; 1 and 3 keep theirs.
  const std::vector<double> second{4.0, 50.0, 3.0, 50.0};
  observe(some, second);
  const std::vector<double> ema{decay * 8 + (1 - decay) * 4, 2.0, decay * 1 + (1 - decay) * 3, 0.01};
  expected = enumerate_projection(ema, s, p_min);
  for (std::size_t d = 0; d < layers; ++d) {
    CHECK(sampler.norm_estimates()[d] == doctest::Approx(ema[d]).epsilon(1e-14));
    CHECK(sampler.probabilities()[d] == doctest::Approx(expected[d]).epsilon(1e-12));
  }

  // A layer never observed borrows the largest estimate.
  gcomp::layer_sampler fresh(3, {.budget = 1.5, .p_min = 0.1, .rule = gcomp::probability_rule::variance_optimal});
  const std::vector<std::uint8_t> first_only{1, 0, 0};
  const std::vector<double> norms{0.0 + 2.0 / fresh.inclusion_probabilities()[0], 0.0, 0.0};
  fresh.update(first_only, norms);
  for (double p : fresh.probabilities()) CHECK(p == doctest::Approx(0.5).epsilon(1e-12));
}

TEST_CASE("the bandit moves probability towards the layers with larger gradients") {
  // EXP3's expected step is mirror descent on sum ||g_d||^2 / p_d, whose
  // minimiser is the variance-optimal p (proportional to ||g_d||, capped).
  // On fixed norms the bandit's average p over the last half of the run must
  // land at less than half the L1 distance the uniform start had to it, with
  // the largest gradient's layer the most likely. The loss is normalized and
  // p_min = 0.2, so the constant L^2 / p_min^2 does not drown the signal at
  // this rate (see docs/jointspar.md); the run is reproducible (fixed seed).
  const std::vector<double> truth{6.0, 3.0, 2.0, 1.0};
  const double s = 2.0, p_min = 0.2;
  gcomp::layer_sampler sampler(4, {.budget = s, .p_min = p_min, .bandit_rate = 0.01,
                                   .normalize_bandit_loss = true, .seed = 9});
  std::vector<std::uint8_t> mask(4);
  std::vector<double> scaled(4), average(4, 0.0);
  const int steps = 20000, tail = 10000;
  for (int t = 0; t < steps; ++t) {
    sampler.draw(std::uint64_t(t), mask);
    for (std::size_t d = 0; d < 4; ++d) scaled[d] = truth[d] / sampler.inclusion_probabilities()[d];
    sampler.update(mask, scaled);
    if (t >= steps - tail)
      for (std::size_t d = 0; d < 4; ++d) average[d] += sampler.probabilities()[d] / tail;
  }
  const auto optimal = enumerate_projection(truth, s, p_min);  // {0.98, 0.49, 0.33, 0.2}
  double start_distance = 0, distance = 0;
  for (std::size_t d = 0; d < 4; ++d) {
    start_distance += std::fabs(s / 4 - optimal[d]);
    distance += std::fabs(average[d] - optimal[d]);
  }
  INFO("bandit " << average[0] << " " << average[1] << " " << average[2] << " " << average[3]
                 << "; variance-optimal " << optimal[0] << " " << optimal[1] << " " << optimal[2]
                 << " " << optimal[3]);
  CHECK(distance < 0.5 * start_distance);
  CHECK(std::max_element(average.begin(), average.end()) == average.begin());
}

TEST_CASE("each layer is drawn with its inclusion probability, and never an empty set") {
  // Monte-Carlo rule of compressor_checks.hpp: each frequency of N draws is
  // within 5 sigma of pi_d, sigma = sqrt(pi_d (1 - pi_d) / N); 6 + 1 + 2 + 1
  // = 10 statistics, false failure below 10 * 5.7e-7.
  const int draws = 20000;
  {
    gcomp::layer_sampler sampler(6, {.budget = 2.2, .p_min = 0.05, .rule = gcomp::probability_rule::fixed, .seed = 21});
    sampler.set_probabilities(std::vector<double>{0.9, 0.5, 0.3, 0.3, 0.15, 0.05});
    std::vector<std::uint8_t> mask(6);
    std::vector<int> hits(6, 0);
    std::vector<int> per_step(7, 0);
    int pair_03 = 0;
    for (int t = 0; t < draws; ++t) {
      const std::size_t count = sampler.draw(std::uint64_t(t), mask);
      std::size_t recount = 0;
      for (std::size_t d = 0; d < 6; ++d) {
        hits[d] += mask[d];
        recount += mask[d];
      }
      CHECK(count == recount);
      CHECK(count >= 1);
      pair_03 += mask[0] && mask[3];
    }
    for (std::size_t d = 0; d < 6; ++d) {
      const double pi = sampler.inclusion_probabilities()[d];
      check_within_sigmas(double(hits[d]) / draws, pi, std::sqrt(pi * (1 - pi) / draws), "frequency");
    }
    // Beyond the first active layer the draws are independent.
    const double both = sampler.probabilities()[0] * sampler.probabilities()[3] / (1 - sampler.empty_probability());
    check_within_sigmas(double(pair_03) / draws, both, std::sqrt(both * (1 - both) / draws), "pair 0, 3");
  }
  {
    // s = 0.2 over two layers: the unconditioned draw is empty 81% of the
    // time; conditioned on a non-empty set, pi = 0.1 / 0.19 each and both
    // are active with probability 0.01 / 0.19.
    gcomp::layer_sampler sampler(2, {.budget = 0.2, .p_min = 0.1, .seed = 5});
    CHECK(sampler.empty_probability() == doctest::Approx(0.81));
    std::vector<std::uint8_t> mask(2);
    int hits0 = 0, hits1 = 0, both = 0;
    for (int t = 0; t < draws; ++t) {
      CHECK(sampler.draw(std::uint64_t(t), mask) >= 1);
      hits0 += mask[0];
      hits1 += mask[1];
      both += mask[0] && mask[1];
    }
    const double pi = 0.1 / 0.19, pb = 0.01 / 0.19;
    CHECK(sampler.inclusion_probabilities()[0] == doctest::Approx(pi).epsilon(1e-14));
    check_within_sigmas(double(hits0) / draws, pi, std::sqrt(pi * (1 - pi) / draws), "layer 0");
    check_within_sigmas(double(hits1) / draws, pi, std::sqrt(pi * (1 - pi) / draws), "layer 1");
    check_within_sigmas(double(both) / draws, pb, std::sqrt(pb * (1 - pb) / draws), "both");
  }
}

TEST_CASE("the active set depends on (seed, step) only: every worker draws the same one") {
  constexpr int workers = 4;
  constexpr std::uint64_t steps = 200;
  std::vector<std::vector<std::uint8_t>> seen(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    // Each worker owns its sampler, as each trainer process would.
    gcomp::layer_sampler sampler(12, {.budget = 4.0, .seed = 77});
    std::vector<std::uint8_t> mask(12);
    auto& mine = seen[std::size_t(comm.rank())];
    for (std::uint64_t t = 0; t < steps; ++t) {
      sampler.draw(t, mask);
      mine.insert(mine.end(), mask.begin(), mask.end());
    }
  });
  for (int m = 1; m < workers; ++m) CHECK(seen[std::size_t(m)] == seen[0]);
  // And the key matters: another seed, or the next step, gives another set.
  gcomp::layer_sampler other(12, {.budget = 4.0, .seed = 78});
  std::vector<std::uint8_t> a(12), b(12);
  int differ_seed = 0, differ_step = 0;
  for (std::uint64_t t = 0; t < steps; ++t) {
    other.draw(t, a);
    differ_seed += !std::equal(a.begin(), a.end(), seen[0].begin() + std::ptrdiff_t(t * 12));
    other.draw(t + 1, b);
    differ_step += a != b;
  }
  // Two independent draws of 12 layers at p = 1/3 coincide with probability
  // sum over patterns of P^2 <= (5/9)^12 = 8.7e-4: a few of 200 at most.
  CHECK(differ_seed > 190);
  CHECK(differ_step > 190);
  CHECK(other.key(5).worker == gcomp::rng_key::shared_worker);
}

TEST_CASE("update, draw and set_probabilities refuse bad arguments and change nothing") {
  gcomp::layer_sampler sampler(3, {.budget = 1.5, .p_min = 0.1});
  const std::vector<double> before(sampler.probabilities().begin(), sampler.probabilities().end());
  const std::vector<std::uint8_t> mask{1, 0, 1}, short_mask{1, 0};
  std::vector<std::uint8_t> out(2);
  expect_error([&] { sampler.update(short_mask, std::vector<double>{1, 1, 1}); },
               "gcomp::layer_sampler::update: active has size 2 but layers has size 3");
  expect_error([&] { sampler.update(mask, std::vector<double>{1, 1}); }, "scaled_norms has size 2");
  expect_error([&] { sampler.update(mask, std::vector<double>{1, 0, NAN}); },
               "scaled_norms[2] of an active layer must be finite and >= 0");
  expect_error([&] { sampler.update(mask, std::vector<double>{-1, 0, 1}); }, "scaled_norms[0]");
  expect_error([&] { sampler.draw(0, out); }, "gcomp::layer_sampler::draw: mask has size 2");
  expect_error([&] { sampler.set_probabilities(std::vector<double>{0.05, 0.7, 0.75}); },
               "p[0] must be in [0.1, 1], got 0.05");
  expect_error([&] { sampler.set_probabilities(std::vector<double>{0.5, 0.5, 0.6}); },
               "p must sum to the budget 1.5, got 1.6");
  expect_error([&] { sampler.set_probabilities(std::vector<double>{0.5, 1.0}); }, "p has size 2");
  CHECK(std::equal(before.begin(), before.end(), sampler.probabilities().begin()));
  CHECK(sampler.max_layer_norm() == 0.0);
  // A NaN on an inactive layer is not looked at.
  CHECK_NOTHROW(sampler.update(mask, std::vector<double>{1, NAN, 1}));
}
