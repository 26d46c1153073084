// Tests of algo/stale_compressed.hpp: the delay is real (recorded models against the trajectory), linear convergence with rand-k and QSGD for tau in {0, 5, 10} against the exact expected error and the theory's bounds, the epsilon-compressor's stall inside its predicted ball, the parameter-server form, the helpers and the error paths.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

#include "compressor_checks.hpp"
#include "gcomp/algo/stale_compressed.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/compress/grid_round.hpp"
#include "gcomp/compress/identity.hpp"

using gcomp::rng_key;

namespace {

// f(x) = 1/2 sum_j h_j (x_j - x*_j)^2 with h_j evenly spaced in [mu, L].
struct diagonal_quadratic {
  std::vector<double> h, optimum;
  double mu, smoothness;

  diagonal_quadratic(std::size_t d, double mu_, double l_) : h(d), optimum(d), mu(mu_), smoothness(l_) {
    for (std::size_t j = 0; j < d; ++j) {
      h[j] = d == 1 ? mu : mu + (l_ - mu) * double(j) / double(d - 1);
      optimum[j] = 1.0 + double(j % 5) * 0.5 + double(j % 3) * 0.25;  // in [1, 3.5]: no coordinate starts at x*
    }
  }
  auto gradient() const {
    return [this](std::span<const double> x, std::uint64_t, std::span<double> out) {
      for (std::size_t j = 0; j < h.size(); ++j) out[j] = h[j] * (x[j] - optimum[j]);
    };
  }
  double error2(const std::vector<double>& x) const {
    double s = 0;
    for (std::size_t j = 0; j < h.size(); ++j) s += (x[j] - optimum[j]) * (x[j] - optimum[j]);
    return s;
  }
};

// The deterministic part of x_{k+1} = x_k - gamma h x_{k - min(tau, k)} for
// one coordinate (phi(0) = 1, the past before 0 is x_0), and the response
// psi(n) at time i + 1 + n to a unit input at time i (zero past).
std::vector<double> delayed_response(double gh, std::size_t tau, std::size_t steps, bool from_start) {
  std::vector<double> r(steps + 1);
  r[0] = 1.0;
  for (std::size_t k = 0; k < steps; ++k) {
    const double past = k >= tau ? r[k - tau] : (from_start ? r[0] : 0.0);
    r[k + 1] = r[k] - gh * past;
  }
  return r;
}

// E||x_k - x*||^2 exactly, for rand-k (unbiased, alpha = d / k) with a fixed
// delay tau on the diagonal quadratic from x_0. Per coordinate the noise
// xi_i = Q(g)_i - g_i has E[xi_i | past] = 0 and E[xi_i^2 | past] =
// (alpha - 1) g_i^2, and coordinate j of the error only sees xi_j, so
//   e_k = phi(k) e_0 - gamma sum_{i<k} psi(k-1-i) xi_i,
//   v_k = phi(k)^2 e_0^2 + gamma^2 (alpha - 1) h^2 sum_{i<k} psi(k-1-i)^2 v_{max(i-tau,0)}
// (the noise terms are martingale differences: no cross terms).
std::vector<double> exact_expected_error2(const diagonal_quadratic& p, const std::vector<double>& x0,
                                          double gamma, double alpha, std::size_t tau,
                                          std::size_t steps) {
  std::vector<double> total(steps + 1, 0.0);
  for (std::size_t j = 0; j < p.h.size(); ++j) {
    const double gh = gamma * p.h[j];
    const auto phi = delayed_response(gh, tau, steps, true);
    const auto psi = delayed_response(gh, tau, steps, false);
    const double e0 = x0[j] - p.optimum[j];
    std::vector<double> v(steps + 1);
    v[0] = e0 * e0;
    const double noise = gh * gh * (alpha - 1.0);
    for (std::size_t k = 1; k <= steps; ++k) {
      double s = 0;
      for (std::size_t i = 0; i < k; ++i) s += psi[k - 1 - i] * psi[k - 1 - i] * v[i >= tau ? i - tau : 0];
      v[k] = phi[k] * phi[k] * e0 * e0 + noise * s;
    }
    for (std::size_t k = 0; k <= steps; ++k) total[k] += v[k];
  }
  return total;
}

// ||E x_k - x*||^2 = sum_j phi_j(k)^2 e0_j^2: a lower bound of E||x_k - x*||^2
// (Jensen) for any unbiased compressor under the fixed delay.
std::vector<double> mean_error2(const diagonal_quadratic& p, const std::vector<double>& x0, double gamma,
                                std::size_t tau, std::size_t steps) {
  std::vector<double> total(steps + 1, 0.0);
  for (std::size_t j = 0; j < p.h.size(); ++j) {
    const auto phi = delayed_response(gamma * p.h[j], tau, steps, true);
    const double e0 = x0[j] - p.optimum[j];
    for (std::size_t k = 0; k <= steps; ++k) total[k] += phi[k] * phi[k] * e0 * e0;
  }
  return total;
}

// Per run r: ||x_k - x*||^2 at the checkpoints, for R runs with seeds 0..R-1.
template <class Make>
std::vector<std::vector<double>> run_many(const diagonal_quadratic& p, Make make, std::size_t runs,
                                          const std::vector<std::size_t>& checkpoints) {
  std::vector<std::vector<double>> err(checkpoints.size(), std::vector<double>(runs));
  const auto grad = p.gradient();
  for (std::size_t r = 0; r < runs; ++r) {
    auto method = make(std::uint64_t(r));
    std::vector<double> x(p.h.size(), 0.0);
    std::size_t c = 0;
    for (std::size_t k = 0; k <= checkpoints.back(); ++k) {
      if (k == checkpoints[c]) err[c++][r] = p.error2(x);
      if (k == checkpoints.back()) break;
      method.step(gcomp::host_seq{}, std::span<double>(x), grad);
    }
  }
  return err;
}

double mean_of(const std::vector<double>& v) { return std::accumulate(v.begin(), v.end(), 0.0) / double(v.size()); }
double sd_of_mean(const std::vector<double>& v) {
  const double m = mean_of(v);
  double s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / double(v.size() - 1) / double(v.size()));
}

}  // namespace

TEST_CASE("the gradient is taken at x_{k - tau_k}: recorded models equal the trajectory's") {
  // Identity compression, so the naive recursion x_{k+1} = x_k - gamma g(x_{k - tau_k})
  // (float, as sgd computes it) is the oracle for the whole trajectory too.
  for (auto kind : {gcomp::delay_kind::fixed, gcomp::delay_kind::uniform}) {
    const gcomp::stale_options options{
        .gamma = 0.1, .delay = {.max_delay = 5, .kind = kind, .seed = 17}, .seed = 1};
    gcomp::stale_compressed_gd method(gcomp::identity<float>{}, options);
    const gcomp::delay_schedule delays(options.delay);
    constexpr std::size_t d = 6;
    std::vector<std::vector<float>> trajectory{std::vector<float>(d, 1.0f)};  // x_0, x_1, ...
    std::vector<float> x = trajectory[0], naive = x;
    std::vector<std::uint64_t> seen_steps;
    std::vector<std::size_t> delays_seen;
    auto grad = [&](std::span<const float> model, std::uint64_t k, std::span<float> out) {
      seen_steps.push_back(k);
      const std::size_t tau_k = delays.delay(k);
      delays_seen.push_back(tau_k);
      CHECK(std::vector<float>(model.begin(), model.end()) == trajectory[k - tau_k]);
      for (std::size_t j = 0; j < d; ++j) out[j] = model[j] * float(j + 1) - 1.0f;
    };
    for (std::uint64_t k = 0; k < 40; ++k) {
      // The naive oracle step, from the naive trajectory.
      const auto& stale = trajectory[k - delays.delay(k)];
      for (std::size_t j = 0; j < d; ++j) naive[j] = naive[j] - 0.1f * (stale[j] * float(j + 1) - 1.0f);
      method.step(gcomp::host_seq{}, std::span<float>(x), grad);
      CHECK(method.last_delay() == delays.delay(k));
      CHECK(x == naive);
      trajectory.push_back(x);
    }
    CHECK(method.steps() == 40);
    CHECK(seen_steps.size() == 40);
    for (std::uint64_t k = 0; k < 40; ++k) CHECK(seen_steps[k] == k);
    // Uniform delays really vary (fixed ones are 5 from step 5 on).
    const auto distinct = std::count_if(delays_seen.begin() + 5, delays_seen.end(),
                                        [&](std::size_t t) { return t != delays_seen[5]; });
    CHECK((kind == gcomp::delay_kind::fixed ? distinct == 0 : distinct > 10));
  }
}

TEST_CASE("rand-k with the step-size helper: error falls linearly for tau in {0, 5, 10}, as the exact expectation says") {
  // Problem: d = 16, h in [0.25, 1]; rand-k with k = 4 (alpha = 4);
  // gamma = 1 / (alpha L (1 + tau)). For rand-k on a diagonal quadratic with a
  // fixed delay the expected squared error has a closed recursion
  // (exact_expected_error2); the Monte-Carlo mean of R = 200 runs must match
  // it within 5 estimated standard errors at three checkpoints (CLT; 9
  // statistics, false failure about 9 * 5.7e-7). Linear convergence: the
  // exact expectation falls by 1e-6 or more over K steps at a steady rate:
  // the per-step log-rates of the last two thirds agree within 15% (the
  // error is a sum of per-coordinate modes, so the rate settles to the
  // slowest mode's as the fast ones die out; a sublinear 1/k decay would
  // differ by 70%); and for
  // tau = 0 the proven contraction E||e_{k+1}||^2 <= (1 - gamma mu) ||e_k||^2
  // bounds both.
  const diagonal_quadratic p(16, 0.25, 1.0);
  using C = gcomp::randomk<double>;
  const gcomp::randomk_options rk{.k = 4};
  const double alpha = gcomp::variance_bound(rk, 16);
  REQUIRE(alpha == 4.0);
  for (std::size_t tau : {0u, 5u, 10u}) {
    CAPTURE(tau);
    const double gamma = gcomp::stale_step_size(alpha, p.smoothness, tau);
    const std::size_t steps = 120 * (1 + tau);
    const std::vector<std::size_t> checkpoints = {steps / 3, 2 * steps / 3, steps};
    const std::vector<double> x0(16, 0.0);
    const auto exact = exact_expected_error2(p, x0, gamma, alpha, tau, steps);
    const auto err = run_many(
        p,
        [&](std::uint64_t seed) {
          return gcomp::stale_compressed_gd(
              C(rk), {.gamma = gamma, .delay = {.max_delay = tau}, .seed = seed});
        },
        200, checkpoints);
    for (std::size_t c = 0; c < checkpoints.size(); ++c) {
      const double m = mean_of(err[c]), se = sd_of_mean(err[c]);
      INFO("k = " << checkpoints[c] << ": mean " << m << ", exact " << exact[checkpoints[c]] << ", se " << se);
      CHECK(std::fabs(m - exact[checkpoints[c]]) <= 5 * se);
      if (tau == 0) {
        const double bound = std::pow(1 - gamma * p.mu, double(checkpoints[c])) * exact[0];
        CHECK(exact[checkpoints[c]] <= bound);
        CHECK(m <= bound);
      }
    }
    CHECK(exact[steps] <= 1e-6 * exact[0]);
    const double rate1 = std::pow(exact[2 * steps / 3] / exact[steps / 3], 3.0 / double(steps));
    const double rate2 = std::pow(exact[steps] / exact[2 * steps / 3], 3.0 / double(steps));
    INFO("per-step rates " << rate1 << " and " << rate2);
    CHECK(std::fabs(std::log(rate1) / std::log(rate2) - 1.0) <= 0.15);
  }
}

TEST_CASE("QSGD with the step-size helper: error falls linearly for tau in {0, 5, 10}, within the theory's bounds") {
  // QSGD (s = 3, one bucket of d = 16: alpha = 1 + min(16/9, 4/3) = 7/3).
  // Checks on the mean of R = 200 runs: (a) it falls by 1e-6 over K steps;
  // (b) linearly: per-step rates over [K/3, 2K/3] and [2K/3, K] agree within
  // 25%; (c) it is at least ||E x_k - x*||^2 (Jensen), the delayed gradient
  // descent's error computed exactly, to 5 estimated standard errors; (d) for
  // tau = 0, at most the proven (1 - gamma mu)^k ||e_0||^2 plus 5 standard
  // errors. CLT at 5 sigma, at most 9 statistics: false failure ~5e-6.
  const diagonal_quadratic p(16, 0.25, 1.0);
  const gcomp::qsgd_options qo{.levels = 3, .bucket = 0};
  const double alpha = gcomp::variance_bound(qo, 16);
  CHECK(alpha == doctest::Approx(7.0 / 3.0));
  for (std::size_t tau : {0u, 5u, 10u}) {
    CAPTURE(tau);
    const double gamma = gcomp::stale_step_size(alpha, p.smoothness, tau);
    const std::size_t steps = 90 * (1 + tau);
    const std::vector<std::size_t> checkpoints = {steps / 3, 2 * steps / 3, steps};
    const std::vector<double> x0(16, 0.0);
    const auto lower = mean_error2(p, x0, gamma, tau, steps);
    const auto err = run_many(
        p,
        [&](std::uint64_t seed) {
          return gcomp::stale_compressed_gd(gcomp::qsgd<double>(qo),
                                            {.gamma = gamma, .delay = {.max_delay = tau}, .seed = seed});
        },
        200, checkpoints);
    std::vector<double> m(3);
    for (std::size_t c = 0; c < 3; ++c) {
      m[c] = mean_of(err[c]);
      const double se = sd_of_mean(err[c]);
      INFO("k = " << checkpoints[c] << ": mean " << m[c] << ", Jensen bound " << lower[checkpoints[c]]);
      CHECK(m[c] + 5 * se >= lower[checkpoints[c]]);
      if (tau == 0)
        CHECK(m[c] <= std::pow(1 - gamma * p.mu, double(checkpoints[c])) * lower[0] + 5 * se);
    }
    CHECK(m[2] <= 1e-6 * lower[0]);
    const double rate1 = std::log(m[1] / m[0]), rate2 = std::log(m[2] / m[1]);
    INFO("log decrease per third: " << rate1 << ", " << rate2);
    CHECK(std::fabs(rate1 / rate2 - 1.0) <= 0.25);
  }
}

TEST_CASE("uniform random delays converge too with the same step size") {
  const diagonal_quadratic p(16, 0.25, 1.0);
  const gcomp::randomk_options rk{.k = 4};
  const double gamma = gcomp::stale_step_size(gcomp::variance_bound(rk, 16), 1.0, 10);
  const auto err = run_many(
      p,
      [&](std::uint64_t seed) {
        return gcomp::stale_compressed_gd(
            gcomp::randomk<double>(rk),
            {.gamma = gamma, .delay = {.max_delay = 10, .kind = gcomp::delay_kind::uniform, .seed = seed}, .seed = seed});
      },
      20, {0, 1320});
  CHECK(mean_of(err[1]) <= 1e-6 * mean_of(err[0]));
}

TEST_CASE("the epsilon-compressor stalls inside the predicted ball, and not far inside it") {
  // grid_round with spacing Delta: epsilon = Delta sqrt(d) / 2. On the
  // diagonal quadratic the coordinates decouple and x stops moving once every
  // |h_j e_j| < Delta / 2 (all levels 0), so the final point lies in the ball
  // of radius epsilon / mu that epsilon_neighbourhood predicts for tau = 0.
  // With tau = 0 each coordinate arrives from outside in steps of gamma Delta
  // |n| with |n| <= |h e| / Delta + 1/2, so it stops with
  // |h_j e_j| >= Delta / 2 - gamma h_j Delta: the final error is at least
  // sqrt(sum_j (Delta (1/2 - gamma h_j) / h_j)^2), here > 0.7 epsilon / mu.
  constexpr std::size_t d = 16;
  const diagonal_quadratic p(d, 1.0, 1.25);
  const double spacing = 1.0 / 1024;
  for (std::size_t tau : {0u, 4u}) {
    CAPTURE(tau);
    const double gamma = tau == 0 ? 0.05 : 0.02;
    gcomp::grid_round<double> q({.spacing = spacing, .bits = 16});
    const double radius = gcomp::epsilon_neighbourhood({.epsilon = q.epsilon(d), .mu = p.mu,
                                                        .smoothness = p.smoothness, .gamma = gamma,
                                                        .tau = tau, .quadratic = true});
    if (tau == 0) CHECK(radius == doctest::Approx(q.epsilon(d) / p.mu));
    gcomp::stale_compressed_gd method(q, {.gamma = gamma, .delay = {.max_delay = tau}});
    std::vector<double> x(d, 0.0), before;
    std::size_t unchanged = 0, k = 0;
    for (; k < 5000 && unchanged <= tau + 1; ++k) {
      before = x;
      method.step(gcomp::host_seq{}, std::span<double>(x), p.gradient());
      unchanged = x == before ? unchanged + 1 : 0;
    }
    REQUIRE(unchanged > tau + 1);  // stalled: tau + 2 steps without a move
    const double final_error = std::sqrt(p.error2(x));
    double lower2 = 0;
    for (double h : p.h) lower2 += std::pow(spacing * (0.5 - (double(tau) + 1) * gamma * h) / h, 2);
    INFO("stalled after " << k << " steps at " << final_error << "; predicted radius " << radius
                          << ", epsilon / mu " << q.epsilon(d) / p.mu);
    CHECK(final_error <= radius);
    CHECK(final_error >= 0.5 * q.epsilon(d) / p.mu);  // a stall, not convergence to x*
    if (tau == 0) {
      CHECK(std::sqrt(lower2) >= 0.7 * radius);
      CHECK(final_error >= std::sqrt(lower2));
    }
  }
}

TEST_CASE("epsilon_neighbourhood: the constants of the derivation and the conditions it needs") {
  // tau = 0: epsilon / mu (quadratic), epsilon (mu + L) / (mu L) (general).
  CHECK(gcomp::epsilon_neighbourhood({.epsilon = 0.3, .mu = 0.5, .smoothness = 2, .gamma = 0.4, .quadratic = true}) ==
        doctest::Approx(0.6));
  CHECK(gcomp::epsilon_neighbourhood({.epsilon = 0.3, .mu = 0.5, .smoothness = 2, .gamma = 0.4}) ==
        doctest::Approx(0.3 * 2.5 / 1.0));
  // tau > 0: gamma eps (1 + gamma L tau) / (gamma mu - gamma^2 L^2 tau).
  CHECK(gcomp::epsilon_neighbourhood(
            {.epsilon = 1, .mu = 1, .smoothness = 2, .gamma = 0.01, .tau = 3, .quadratic = true}) ==
        doctest::Approx(0.01 * 1.06 / (0.01 - 0.0012)));
  gcomp::test::expect_error(
      [] { gcomp::epsilon_neighbourhood({.epsilon = 1, .mu = 1, .smoothness = 2, .gamma = 0.7}); },
      "gamma = 0.7 exceeds 2 / (mu + L) = 0.666666667");
  gcomp::test::expect_error(
      [] { gcomp::epsilon_neighbourhood({.epsilon = 1, .mu = 1, .smoothness = 2, .gamma = 0.5, .tau = 3}); },
      "the delay term gamma^2 L^2 tau = 3 must stay below the contraction");
  gcomp::test::expect_error(
      [] { gcomp::epsilon_neighbourhood({.epsilon = 1, .mu = 3, .smoothness = 2, .gamma = 0.1}); },
      "mu = 3 exceeds smoothness = 2");
  gcomp::test::expect_error([] { gcomp::epsilon_neighbourhood({.epsilon = -1, .mu = 1, .smoothness = 2, .gamma = 0.1}); },
                            "epsilon must be finite and >= 0");
}

TEST_CASE("step size and variance bounds come from the compressors' own options") {
  CHECK(gcomp::stale_step_size(4.0, 2.0, 3) == doctest::Approx(1.0 / 32.0));
  CHECK(gcomp::variance_bound(gcomp::randomk_options{.k = 25}, 100) == 4.0);
  CHECK(gcomp::variance_bound(gcomp::randomk<float>({.ratio = 0.1}), 1000) == doctest::Approx(10.0));
  CHECK(gcomp::variance_bound(gcomp::qsgd_options{.levels = 7, .bucket = 64}, 1000) ==
        doctest::Approx(1 + std::min(64.0 / 49.0, 8.0 / 7.0)));
  CHECK(gcomp::variance_bound(gcomp::terngrad_options{.bucket = 0}, 400) == doctest::Approx(20.0));
  CHECK(gcomp::bernoulli_variance_bound(0.25) == doctest::Approx(4.0));
  const std::vector<double> probs = {0.5, 0.125};
  CHECK(gcomp::variance_bound(gcomp::bernoulli_sparsifier<float>(gcomp::layout{3, 4}, probs), 7) ==
        doctest::Approx(8.0));
  gcomp::test::expect_error([] { (void)gcomp::stale_step_size(0.5, 1.0, 0); },
                            "gcomp::stale_step_size: alpha must be finite and >= 1, got 0.5");
  gcomp::test::expect_error([] { (void)gcomp::stale_step_size(2.0, 0.0, 0); }, "smoothness must be finite and > 0");
  gcomp::test::expect_error([] { (void)gcomp::variance_bound(gcomp::randomk_options{.k = 200}, 100); }, "gcomp::randomk");
  gcomp::test::expect_error([] { (void)gcomp::variance_bound(gcomp::qsgd_options{.levels = 4}, 100); }, "options.levels = 4");
  gcomp::test::expect_error([] { (void)gcomp::bernoulli_variance_bound(0.0); }, "gcomp::bernoulli_sparsifier");
}

namespace {

// Realizable least squares split over workers: f_m(x) = 1/2 ||A_m x - b_m||^2
// with b_m = A_m x_true, so every f_m is minimal at x_true and an unbiased
// compressor's noise vanishes there.
struct shared_least_squares {
  static constexpr std::size_t d = 8, rows = 12;
  int workers;
  std::vector<double> a, truth;  // workers * rows x d
  explicit shared_least_squares(int m) : workers(m), a(std::size_t(m) * rows * d), truth(d) {
    const rng_key key{77, 0, 0};
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = gcomp::normal(key, i);
    for (std::size_t j = 0; j < d; ++j) truth[j] = 1.0 - 0.25 * double(j);
  }
  // grad f_m at x into out.
  void gradient(int m, std::span<const double> x, std::span<double> out) const {
    std::fill(out.begin(), out.end(), 0.0);
    for (std::size_t r = 0; r < rows; ++r) {
      const double* row = a.data() + (std::size_t(m) * rows + r) * d;
      double residual = 0;
      for (std::size_t j = 0; j < d; ++j) residual += row[j] * (x[j] - truth[j]);
      for (std::size_t j = 0; j < d; ++j) out[j] += row[j] * residual;
    }
  }
  // L of f = sum f_m: the largest eigenvalue of sum A_m' A_m (power iteration).
  double smoothness() const {
    std::vector<double> v(d, 1.0), w(d), zero(d, 0.0);
    double lambda = 0;
    for (int it = 0; it < 500; ++it) {
      std::fill(w.begin(), w.end(), 0.0);
      for (int m = 0; m < workers; ++m) {
        std::vector<double> g(d), shifted(d);
        for (std::size_t j = 0; j < d; ++j) shifted[j] = v[j] + truth[j];
        gradient(m, shifted, g);
        for (std::size_t j = 0; j < d; ++j) w[j] += g[j];
      }
      lambda = std::sqrt(std::inner_product(w.begin(), w.end(), w.begin(), 0.0));
      for (std::size_t j = 0; j < d; ++j) v[j] = w[j] / lambda;
    }
    return lambda * 1.0001;  // a hair above the estimate, which approaches from below
  }
  double relative_error(const std::vector<double>& x) const {
    double e = 0, t = 0;
    for (std::size_t j = 0; j < d; ++j) {
      e += (x[j] - truth[j]) * (x[j] - truth[j]);
      t += truth[j] * truth[j];
    }
    return std::sqrt(e / t);
  }
};

}  // namespace

TEST_CASE("parameter-server form: workers agree bit for bit, reuse stale messages, and converge") {
  // 4 workers, rand-k (k = 2 of 8, alpha = 4), refresh period 2 and uniform
  // delays up to 3 (effective delay 4), gamma from the helper. Convergence
  // check: the relative error falls below 1e-6 (from 1) in 4000 steps.
  constexpr int workers = 4;
  const shared_least_squares problem(workers);
  const double l = problem.smoothness();
  const gcomp::stale_options options{.gamma = 1.0,
                                     .delay = {.max_delay = 3, .kind = gcomp::delay_kind::uniform, .seed = 5},
                                     .seed = 8,
                                     .period = 2};
  constexpr std::uint64_t steps = 4000;
  std::vector<std::vector<double>> final_x(workers);
  std::vector<std::uint64_t> uploads(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    const int me = comm.rank();
    gcomp::randomk<double> c({.k = 2});
    gcomp::stale_options o = options;
    gcomp::stale_parameter_server ps(c, o);
    CHECK(ps.effective_delay() == 4);
    o.gamma = gcomp::stale_step_size(gcomp::variance_bound(c, problem.d), l, ps.effective_delay());
    ps = gcomp::stale_parameter_server(c, o);
    std::vector<double> x(problem.d, 0.0);
    std::vector<std::vector<double>> trajectory{x};
    std::size_t bytes = 0;
    for (std::uint64_t k = 0; k < steps; ++k) {
      bool called = false;
      ps.step(gcomp::host_seq{}, comm, std::span<double>(x),
              [&](std::span<const double> model, std::uint64_t step, std::span<double> out) {
                called = true;
                CHECK(step == k);
                // The ring buffer delays: the model is x_{k - tau_k^m}.
                const std::size_t tau = ps.delays().delay(k, std::uint32_t(me));
                CHECK(std::vector<double>(model.begin(), model.end()) == trajectory[k - tau]);
                problem.gradient(me, model, out);
              });
      CHECK(called == ps.refresh().due(k, me));
      CHECK(ps.last_sent() == called);
      bytes += ps.last_bytes();
      trajectory.push_back(x);
    }
    // The messages plus the non-finite guard's flag: one double all-reduced at
    // every step (some worker is due at every step with period 2 and 4 workers).
    CHECK(comm.stats().bytes_sent == bytes + steps * sizeof(double));
    final_x[std::size_t(me)] = x;
    uploads[std::size_t(me)] = ps.uploads();
  });
  for (int m = 1; m < workers; ++m) CHECK(gcomp::test::same_bits(final_x[std::size_t(m)], final_x[0]));
  // Worker m sends at step 0 and at the steps k = m (mod 2).
  for (int m = 0; m < workers; ++m) CHECK(uploads[std::size_t(m)] == (m % 2 == 0 ? steps / 2 : steps / 2 + 1));
  INFO("relative error " << problem.relative_error(final_x[0]));
  CHECK(problem.relative_error(final_x[0]) < 1e-6);
}

TEST_CASE("stale methods refuse bad options and inputs with x and their state unchanged") {
  gcomp::test::expect_error(
      [] { gcomp::stale_compressed_gd(gcomp::identity<float>{}, {.gamma = 0.0}); },
      "gcomp::stale_compressed_gd: options.gamma must be finite and > 0, got 0");
  gcomp::test::expect_error(
      [] { gcomp::stale_compressed_gd(gcomp::identity<float>{}, {.gamma = 0.1, .period = 2}); },
      "options.period = 2 applies to the parameter-server form only");
  gcomp::test::expect_error(
      [] { gcomp::stale_parameter_server(gcomp::identity<float>{}, {.gamma = 0.1, .period = 0}); },
      "gcomp::stale_parameter_server: options.period must be > 0, got 0");
  gcomp::test::expect_error(
      [] {
        gcomp::stale_compressed_gd(gcomp::identity<float>{},
                                   {.gamma = 0.1, .delay = {.max_delay = std::size_t{1} << 30}});
      },
      "options.max_delay must be in [0, 1048576]");

  // propagate: the non-finite gradient below must reach the compressor, whose
  // refusal is under test (skip_step would skip the step before it).
  gcomp::stale_compressed_gd method(
      gcomp::qsgd<float>({.levels = 7, .bucket = 0}),
      {.gamma = 0.1, .delay = {.max_delay = 2}, .nonfinite = gcomp::on_nonfinite::propagate});
  auto grad = [](std::span<const float> m, std::uint64_t, std::span<float> out) {
    for (std::size_t j = 0; j < m.size(); ++j) out[j] = m[j];
  };
  std::vector<float> x(5, 1.0f), x6(6, 1.0f);
  method.step(gcomp::host_seq{}, std::span<float>(x), grad);
  const auto after_one = x;
  gcomp::test::expect_error([&] { method.step(gcomp::host_seq{}, std::span<float>(x6), grad); },
                            "gcomp::stale_compressed_gd::step: x has size 6 but the model of the first step has size 5");
  CHECK(x6 == std::vector<float>(6, 1.0f));
  // A non-finite gradient is refused by the compressor: x, the step count and
  // the history stay as they were, so the next good step is the same as without it.
  auto bad = [](std::span<const float>, std::uint64_t, std::span<float> out) {
    std::fill(out.begin(), out.end(), std::nanf(""));
  };
  gcomp::test::expect_error([&] { method.step(gcomp::host_seq{}, std::span<float>(x), bad); },
                            "gcomp::qsgd::compress");
  CHECK(x == after_one);
  CHECK(method.steps() == 1);
  gcomp::stale_compressed_gd twin(gcomp::qsgd<float>({.levels = 7, .bucket = 0}),
                                  {.gamma = 0.1, .delay = {.max_delay = 2}});
  std::vector<float> y(5, 1.0f);
  twin.step(gcomp::host_seq{}, std::span<float>(y), grad);
  for (int k = 0; k < 5; ++k) {
    method.step(gcomp::host_seq{}, std::span<float>(x), grad);
    twin.step(gcomp::host_seq{}, std::span<float>(y), grad);
  }
  CHECK(x == y);

  gcomp::inproc_group one(1);
  gcomp::stale_parameter_server ps(gcomp::qsgd<float>({.levels = 7, .bucket = 0}), {.gamma = 0.1});
  std::vector<float> z(5, 1.0f);
  ps.step(gcomp::host_seq{}, one.comm(0), std::span<float>(z), grad);
  gcomp::test::expect_error([&] { ps.step(gcomp::host_seq{}, one.comm(0), std::span<float>(x6), grad); },
                            "gcomp::stale_parameter_server::step: x has size 6");
  CHECK(ps.steps() == 1);
}

TEST_CASE("stale compressed descent gives the same bits on every policy and thread count") {
  auto run = [](const auto& policy) {
    gcomp::stale_compressed_gd method(
        gcomp::qsgd<float>({.levels = 15, .bucket = 64}),
        {.gamma = 0.05, .delay = {.max_delay = 3, .kind = gcomp::delay_kind::uniform, .seed = 2}, .seed = 6});
    std::vector<float> x = gcomp::test::wave(1000);
    for (int k = 0; k < 30; ++k)
      method.step(policy, std::span<float>(x), [](std::span<const float> m, std::uint64_t, std::span<float> g) {
        for (std::size_t j = 0; j < m.size(); ++j) g[j] = m[j] - 0.5f;
      });
    return x;
  };
  const auto reference = run(gcomp::host_seq{});
  for (unsigned threads : gcomp::test::policy_threads) {
    CAPTURE(threads);
    CHECK(gcomp::test::same_bits(run(gcomp::host_par(threads)), reference));
  }
}
