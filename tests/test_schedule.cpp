// lr_schedule: closed forms, warm-up composition, bad arguments, optimizers following it.
#include <doctest/doctest.h>

#include <cmath>
#include <numbers>
#include <vector>

#include "gcomp/optim/adam.hpp"
#include "gcomp/optim/lamb.hpp"
#include "gcomp/optim/lars.hpp"
#include "gcomp/optim/schedule.hpp"
#include "gcomp/optim/sgd.hpp"

using gcomp::lr_schedule;

TEST_CASE("constant and step decay follow their closed forms") {
  const auto c = lr_schedule::constant(0.25);
  for (std::uint64_t t : {0u, 1u, 7u, 1000000u}) CHECK(c(t) == 0.25);

  const auto s = lr_schedule::step(0.1, 30, 0.5);
  for (std::uint64_t t = 0; t < 200; ++t) {
    const double expected = 0.1 * std::pow(0.5, double(t / 30));
    REQUIRE(s(t) == doctest::Approx(expected).epsilon(1e-15));
  }
  CHECK(s(29) == doctest::Approx(0.1));
  CHECK(s(30) == doctest::Approx(0.05));
  CHECK(s(60) == doctest::Approx(0.025));
}

TEST_CASE("cosine goes from lr to min_lr over total_steps and stays there") {
  const double lr = 0.4, min_lr = 0.01;
  const std::uint64_t total = 100;
  const auto s = lr_schedule::cosine(lr, total, min_lr);
  for (std::uint64_t t = 0; t < total; ++t) {
    const double expected =
        min_lr +
        (lr - min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * double(t) / double(total)));
    REQUIRE(s(t) == doctest::Approx(expected).epsilon(1e-14));
  }
  CHECK(s(0) == doctest::Approx(lr));
  CHECK(s(50) == doctest::Approx((lr + min_lr) / 2));  // the midpoint of the half cosine
  CHECK(s(total) == min_lr);
  CHECK(s(10 * total) == min_lr);
  // Monotone non-increasing.
  for (std::uint64_t t = 1; t <= total; ++t) REQUIRE(s(t) <= s(t - 1));
}

TEST_CASE("linear warm-up ramps to the inner schedule's first rate, then runs the inner schedule") {
  const std::uint64_t warm = 5, total = 20;
  const auto inner = lr_schedule::cosine(1.0, total, 0.0);
  const auto s = lr_schedule::linear_warmup(warm, inner);
  CHECK(s.warmup_steps() == warm);
  for (std::uint64_t t = 0; t < warm; ++t)
    CHECK(s(t) == doctest::Approx(double(t + 1) / double(warm)));
  CHECK(s(warm - 1) == doctest::Approx(inner(0)));
  for (std::uint64_t t = warm; t < warm + total + 5; ++t) REQUIRE(s(t) == inner(t - warm));
  // Warm-up of a constant: (t + 1) / w * lr, then lr.
  const auto w = lr_schedule::linear_warmup(4, lr_schedule::constant(0.8));
  CHECK(w(0) == doctest::Approx(0.2));
  CHECK(w(2) == doctest::Approx(0.6));
  CHECK(w(3) == doctest::Approx(0.8));
  CHECK(w(100) == 0.8);
}

TEST_CASE("lr_schedule rejects bad arguments") {
  CHECK_THROWS_WITH_AS(lr_schedule::constant(-1.0),
                       "gcomp::lr_schedule::constant: lr must be finite and >= 0, got -1",
                       gcomp::error);
  CHECK_THROWS_AS(lr_schedule::constant(std::nan("")), gcomp::error);
  CHECK_THROWS_AS(lr_schedule::step(0.1, 0, 0.5), gcomp::error);
  CHECK_THROWS_AS(lr_schedule::step(0.1, 10, 1.5), gcomp::error);
  CHECK_THROWS_AS(lr_schedule::step(0.1, 10, -0.5), gcomp::error);
  CHECK_THROWS_AS(lr_schedule::cosine(0.1, 0), gcomp::error);
  CHECK_THROWS_WITH_AS(lr_schedule::cosine(0.1, 10, 0.2),
                       "gcomp::lr_schedule::cosine: min_lr must be in [0, 0.1], got 0.2",
                       gcomp::error);
  CHECK_THROWS_AS(lr_schedule::linear_warmup(0, lr_schedule::constant(0.1)), gcomp::error);
  CHECK_THROWS_AS(
      lr_schedule::linear_warmup(3, lr_schedule::linear_warmup(3, lr_schedule::constant(0.1))),
      gcomp::error);
}

namespace {

// With zero momentum and decay, one SGD step moves x by exactly -lr(t) * g, so
// the step's rate can be read back from the parameters.
template <class Optimizer>
std::vector<double> rates_seen(Optimizer& opt, int steps) {
  const gcomp::layout lay{4};
  std::vector<double> rates;
  for (int t = 0; t < steps; ++t) {
    std::vector<double> x(4, 1.0);
    const std::vector<double> g(4, 1.0);
    opt.step(gcomp::host_seq{}, lay, std::span<double>(x), std::span<const double>(g));
    rates.push_back(1.0 - x[0]);
  }
  return rates;
}

}  // namespace

TEST_CASE("sgd takes step t's rate from the schedule, counting masked steps too") {
  const auto s = lr_schedule::linear_warmup(3, lr_schedule::step(0.5, 2, 0.1));
  gcomp::sgd<double> opt({.lr = 123.0}, s);  // the schedule overrides options.lr
  const auto rates = rates_seen(opt, 9);
  for (std::size_t t = 0; t < rates.size(); ++t) CHECK(rates[t] == doctest::Approx(s(t)));
  CHECK(opt.steps() == 9);

  // set_schedule restarts nothing: the index is the optimizer's step count.
  opt.set_schedule(lr_schedule::constant(0.25));
  CHECK(rates_seen(opt, 1)[0] == doctest::Approx(0.25));
  opt.set_lr(0.125);
  CHECK(rates_seen(opt, 1)[0] == doctest::Approx(0.125));

  // A step with every layer masked off still advances the schedule.
  gcomp::sgd<double> masked({}, lr_schedule::step(1.0, 1, 0.5));
  const gcomp::layout lay{4};
  std::vector<double> x(4, 1.0);
  const std::vector<double> g(4, 1.0);
  const std::uint8_t off[] = {0};
  masked.step(gcomp::host_seq{}, lay, std::span<double>(x), std::span<const double>(g), off);
  CHECK(x[0] == 1.0);
  masked.step(gcomp::host_seq{}, lay, std::span<double>(x), std::span<const double>(g));
  CHECK(x[0] == doctest::Approx(0.5));
}

TEST_CASE("every optimizer accepts a schedule through its constructor and set_schedule") {
  const auto s = lr_schedule::cosine(0.1, 10, 0.0);
  gcomp::sgd<float> a({}, s);
  gcomp::lars<float> b({}, s);
  gcomp::lamb<float> c({}, s);
  gcomp::adam<float> d({}, s);
  gcomp::adamw<float> e({}, s);
  CHECK(a.schedule()(5) == s(5));
  CHECK(b.schedule()(5) == s(5));
  CHECK(c.schedule()(5) == s(5));
  CHECK(d.schedule()(5) == s(5));
  CHECK(e.schedule()(5) == s(5));
  // Adam's first step moves every element by lr (m_hat / sqrt(v_hat) = sign(g)), so the
  // rate of step t shows in the displacement.
  gcomp::adam<double> adam({.eps = 1e-12});
  adam.set_schedule(s);
  const gcomp::layout lay{3};
  std::vector<double> x(3, 0.0);
  const std::vector<double> g{2.0, -3.0, 0.5};
  adam.step(gcomp::host_seq{}, lay, std::span<double>(x), std::span<const double>(g));
  CHECK(x[0] == doctest::Approx(-s(0)).epsilon(1e-9));
  CHECK(x[1] == doctest::Approx(s(0)).epsilon(1e-9));
}
