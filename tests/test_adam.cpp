// adam / adamw: reference of torch's algorithm, per-layer bias correction, closed forms, errors.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "gcomp/optim/adam.hpp"
#include "optim_reference.hpp"

static_assert(gcomp::optimizer<gcomp::adam<float>>);
static_assert(gcomp::optimizer<gcomp::adamw<float>, gcomp::host_par>);
static_assert(gcomp::optimizer<gcomp::adamw<double>, gcomp::host_seq, double>);

using gcomp::test::random_vector;

namespace {

// torch.optim.Adam / AdamW (torch 1.13 documentation's algorithm), per layer,
// in double; t counts each layer's own active steps.
struct reference_adam {
  double lr, eps, weight_decay;
  bool amsgrad, decoupled;
  gcomp::test::adam_moments moments;  // beta1, beta2, m, v, t
  std::vector<double> vmax{};

  void step(const gcomp::layout& lay, std::vector<double>& x, const std::vector<double>& g,
            const std::vector<std::uint8_t>& active = {}) {
    if (moments.start(x.size(), lay.num_layers())) vmax.assign(x.size(), 0.0);
    for (std::size_t d = 0; d < lay.num_layers(); ++d) {
      if (!active.empty() && !active[d]) continue;
      const int k = moments.count_step(d);
      const double bc1 = 1 - std::pow(moments.beta1, k), bc2 = 1 - std::pow(moments.beta2, k);
      for (std::size_t i = lay[d].offset; i < lay[d].offset + lay[d].size; ++i) {
        double gi = g[i];
        if (decoupled)
          x[i] *= 1 - lr * weight_decay;
        else
          gi += weight_decay * x[i];
        moments.update(i, gi);
        vmax[i] = std::max(vmax[i], moments.v[i]);
        const double second = amsgrad ? vmax[i] : moments.v[i];
        x[i] -= lr / bc1 * moments.m[i] / (std::sqrt(second) / std::sqrt(bc2) + eps);
      }
    }
  }
};

// The options every reference comparison uses, for adam_options and adamw_options alike.
template <class Options>
Options compared_options(double wd, bool amsgrad) {
  return {.lr = 2e-3, .beta1 = 0.8, .beta2 = 0.99, .eps = 1e-7, .weight_decay = wd, .amsgrad = amsgrad};
}

template <class Optimizer, class Policy>
void check_against_reference(Optimizer opt, reference_adam ref, const Policy& policy,
                             const std::vector<std::vector<std::uint8_t>>& masks) {
  using T = typename Optimizer::value_type;
  const gcomp::layout lay{{"a", 513}, {"b", 1}, {"c", 40000}};
  std::mt19937 gen(21);
  std::vector<double> x_ref = random_vector(lay.total_size(), gen);
  std::vector<T> x(x_ref.begin(), x_ref.end());
  for (int step = 0; step < 60; ++step) {
    const auto& mask = masks[std::size_t(step) % masks.size()];
    std::vector<double> g = random_vector(lay.total_size(), gen);
    // Every few steps a tiny gradient, so eps and the bias corrections matter.
    if (step % 7 == 3)
      for (double& e : g) e *= 1e-6;
    const std::vector<T> gt(g.begin(), g.end());
    opt.step(policy, lay, std::span<T>(x), std::span<const T>(gt), mask);
    ref.step(lay, x_ref, g, mask);
  }
  const double tolerance = sizeof(T) == 8 ? 1e-11 : 2e-5;
  for (std::size_t i = 0; i < x.size(); ++i)
    REQUIRE(double(x[i]) == doctest::Approx(x_ref[i]).epsilon(tolerance));
  for (std::size_t d = 0; d < lay.num_layers(); ++d)
    CHECK(opt.layer_steps(d) == std::uint64_t(ref.moments.t[d]));
  CHECK(opt.steps() == 60);
}

}  // namespace

TEST_CASE("adam and adamw match the reference for every option, with and without masks") {
  const std::vector<std::vector<std::uint8_t>> all{{}};
  const std::vector<std::vector<std::uint8_t>> some{{1, 0, 1}, {0, 1, 1}, {}, {0, 0, 0}, {1, 1, 0}};
  for (const bool amsgrad : {false, true}) {
    for (const double wd : {0.0, 0.05}) {
      for (const auto* masks : {&all, &some}) {
        CAPTURE(amsgrad);
        CAPTURE(wd);
        const auto a = compared_options<gcomp::adam_options>(wd, amsgrad);
        const auto w = compared_options<gcomp::adamw_options>(wd, amsgrad);
        const gcomp::test::adam_moments moments{.beta1 = 0.8, .beta2 = 0.99};
        const reference_adam ra{2e-3, 1e-7, wd, amsgrad, false, moments};
        const reference_adam rw{2e-3, 1e-7, wd, amsgrad, true, moments};
        check_against_reference(gcomp::adam<double>(a), ra, gcomp::host_seq{}, *masks);
        check_against_reference(gcomp::adamw<double>(w), rw, gcomp::host_par(2), *masks);
        check_against_reference(gcomp::adam<float>(a), ra, gcomp::host_par(2), *masks);
        check_against_reference(gcomp::adamw<float>(w), rw, gcomp::host_seq{}, *masks);
      }
    }
  }
}

TEST_CASE("a layer's first active step is a bias-corrected first step, however late it comes") {
  // With m = v = 0, Adam's first step moves each element by lr * g / (|g| + eps'),
  // i.e. by lr for |g| >> eps: a layer switched on at step 5 must take exactly that step.
  const gcomp::layout lay{3, 3};
  gcomp::adam<double> opt({.lr = 0.01, .eps = 1e-12});
  std::vector<double> x(6, 0.0);
  const std::vector<double> g{1, -2, 3, 0.5, -4, 8};
  const std::uint8_t first_only[] = {1, 0};
  for (int s = 0; s < 5; ++s)
    opt.step(gcomp::host_seq{}, lay, std::span<double>(x), std::span<const double>(g), first_only);
  CHECK(opt.layer_steps(0) == 5);
  CHECK(opt.layer_steps(1) == 0);
  for (std::size_t i = 3; i < 6; ++i) {
    CHECK(x[i] == 0.0);
    CHECK(opt.exp_avg()[i] == 0.0);
    CHECK(opt.exp_avg_sq()[i] == 0.0);
  }
  opt.step(gcomp::host_seq{}, lay, std::span<double>(x), std::span<const double>(g));
  CHECK(opt.layer_steps(1) == 1);
  CHECK(x[3] == doctest::Approx(-0.01).epsilon(1e-9));
  CHECK(x[4] == doctest::Approx(0.01).epsilon(1e-9));
  CHECK(x[5] == doctest::Approx(-0.01).epsilon(1e-9));
  // A constant gradient keeps m_hat / sqrt(v_hat) = sign(g) at every step: layer 0
  // has moved by 6 * lr, whatever the bias corrections were along the way.
  CHECK(x[0] == doctest::Approx(-0.06).epsilon(1e-9));
  CHECK(x[2] == doctest::Approx(-0.06).epsilon(1e-9));
}

TEST_CASE("adamw with a zero gradient only decays: x = x * (1 - lr * wd)^t") {
  const gcomp::layout lay{1000};
  std::mt19937 gen(2);
  std::vector<double> x = random_vector(1000, gen);
  const std::vector<double> x0 = x, g(1000, 0.0);
  gcomp::adamw<double> opt({.lr = 0.1, .weight_decay = 0.2});
  for (int s = 0; s < 10; ++s)
    opt.step(gcomp::host_seq{}, lay, std::span<double>(x), std::span<const double>(g));
  for (std::size_t i = 0; i < x.size(); ++i)
    REQUIRE(x[i] == doctest::Approx(x0[i] * std::pow(1 - 0.1 * 0.2, 10)).epsilon(1e-12));
  // Adam's L2 decay goes through the moments instead: the first step moves by lr * sign(x).
  std::vector<double> y = x0;
  gcomp::adam<double> l2({.lr = 0.1, .eps = 1e-14, .weight_decay = 0.2});
  l2.step(gcomp::host_seq{}, lay, std::span<double>(y), std::span<const double>(g));
  for (std::size_t i = 0; i < y.size(); ++i)
    REQUIRE(y[i] == doctest::Approx(x0[i] - 0.1 * (x0[i] > 0 ? 1 : -1)).epsilon(1e-9));
}

TEST_CASE("amsgrad divides by the running maximum of v") {
  const gcomp::layout lay{2};
  gcomp::adam<double> opt({.lr = 0.1, .beta2 = 0.5, .amsgrad = true});
  std::vector<double> x(2, 0.0);
  const std::vector<double> big{10, 10}, small{0.1, 0.1};
  opt.step(gcomp::host_seq{}, lay, std::span<double>(x), std::span<const double>(big));
  opt.step(gcomp::host_seq{}, lay, std::span<double>(x), std::span<const double>(small));
  CHECK(opt.max_exp_avg_sq()[0] == doctest::Approx(50.0));  // v1 = 0.5 * 100, v2 = 25.005
  CHECK(opt.exp_avg_sq()[0] == doctest::Approx(0.5 * 50.0 + 0.5 * 0.01));
  gcomp::adam<double> plain({.lr = 0.1, .beta2 = 0.5});
  CHECK(plain.max_exp_avg_sq().empty());
}

TEST_CASE("adam rejects bad hyper-parameters and mismatched buffers before touching anything") {
  CHECK_THROWS_WITH_AS(gcomp::adam<float>({.lr = -1e-3}),
                       "gcomp::adam: lr must be finite and >= 0, got -0.001", gcomp::error);
  CHECK_THROWS_WITH_AS(gcomp::adamw<float>({.beta1 = 1.0}),
                       "gcomp::adamw: beta1 must be in [0, 1), got 1", gcomp::error);
  CHECK_THROWS_AS(gcomp::adam<float>({.beta2 = -0.1}), gcomp::error);
  CHECK_THROWS_AS(gcomp::adam<float>({.beta2 = 1.5}), gcomp::error);
  CHECK_THROWS_WITH_AS(gcomp::adam<float>({.eps = 0.0}),
                       "gcomp::adam: eps must be finite and > 0, got 0", gcomp::error);
  CHECK_THROWS_AS(gcomp::adamw<float>({.eps = -1e-8}), gcomp::error);
  CHECK_THROWS_AS(gcomp::adamw<float>({.weight_decay = -0.01}), gcomp::error);
  gcomp::adamw<float> w;
  CHECK_THROWS_WITH_AS(w.set_lr(-2.0), "gcomp::adamw::set_lr: lr must be finite and >= 0, got -2",
                       gcomp::error);
  CHECK(w.options().weight_decay == 1e-2);  // torch's AdamW default

  const gcomp::layout lay{3, 3};
  gcomp::adam<float> opt;
  std::vector<float> x(6, 1.0f), g5(5, 1.0f), g(6, 1.0f);
  CHECK_THROWS_WITH_AS(
      opt.step(gcomp::host_seq{}, lay, std::span<float>(x), std::span<const float>(g5)),
      "gcomp::adam::step: grads has size 5 but params has size 6; they must match", gcomp::error);
  const std::uint8_t bad_mask[] = {1, 1, 0};
  CHECK_THROWS_AS(
      opt.step(gcomp::host_seq{}, lay, std::span<float>(x), std::span<const float>(g), bad_mask),
      gcomp::error);
  CHECK(x == std::vector<float>(6, 1.0f));
  CHECK(opt.steps() == 0);
  CHECK(opt.exp_avg().empty());
  opt.step(gcomp::host_seq{}, lay, std::span<float>(x), std::span<const float>(g));
  const std::vector<float> after = x;
  const gcomp::layout three{2, 2, 2};
  CHECK_THROWS_AS(
      opt.step(gcomp::host_seq{}, three, std::span<float>(x), std::span<const float>(g)),
      gcomp::error);
  CHECK(x == after);
  CHECK(opt.layer_steps(0) == 1);
}
