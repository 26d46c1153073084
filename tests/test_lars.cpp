// lars: You et al. 2017 reference, step-norm and scale-invariance laws, masks, exclusions, errors.
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "gcomp/optim/lars.hpp"

static_assert(gcomp::optimizer<gcomp::lars<float>>);
static_assert(gcomp::optimizer<gcomp::lars<double>, gcomp::host_par, double>);

namespace {

// You et al. 2017, Algorithm 1, written out per layer in double:
//   lambda = eta * ||x|| / (||g|| + beta * ||x||)   (1 if a norm is 0 or the layer is excluded)
//   v = mu * v + gamma * lambda * (g + beta * x);  x = x - v
struct reference_lars {
  double lr, momentum, weight_decay, eta;
  std::vector<bool> excluded;  // per layer
  std::vector<double> v;

  void step(const gcomp::layout& lay, std::vector<double>& x, const std::vector<double>& g,
            const std::vector<std::uint8_t>& active = {}) {
    if (v.empty()) v.assign(x.size(), 0.0);
    for (std::size_t d = 0; d < lay.num_layers(); ++d) {
      if (!active.empty() && !active[d]) continue;
      const std::size_t b = lay[d].offset, e = b + lay[d].size;
      double xx = 0, gg = 0;
      for (std::size_t i = b; i < e; ++i) {
        xx += x[i] * x[i];
        gg += g[i] * g[i];
      }
      const double xn = std::sqrt(xx), gn = std::sqrt(gg);
      const double beta = excluded[d] ? 0.0 : weight_decay;
      const double ratio = excluded[d] || xn == 0 || gn == 0 ? 1.0 : eta * xn / (gn + beta * xn);
      for (std::size_t i = b; i < e; ++i) {
        v[i] = momentum * v[i] + lr * ratio * (g[i] + beta * x[i]);
        x[i] -= v[i];
      }
    }
  }
};

std::vector<double> random_vector(std::size_t n, std::mt19937& gen, double scale = 1.0) {
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<double> v(n);
  for (double& x : v) x = dist(gen);
  return v;
}

bool is_bias(const gcomp::layer& l) { return l.name.find("bias") != std::string::npos; }

template <class T, class Policy>
void run_against_reference(const Policy& policy, double tolerance) {
  const gcomp::layout lay{
      {"conv.weight", 3000}, {"conv.bias", 30}, {"fc.weight", 70000}, {"fc.bias", 10}};
  const gcomp::lars_options options{.lr = 0.5,
                                    .momentum = 0.9,
                                    .weight_decay = 5e-4,
                                    .trust_coefficient = 0.02,
                                    .exclude = is_bias};
  std::mt19937 gen(7);
  std::vector<double> x_ref = random_vector(lay.total_size(), gen, 0.1);
  std::vector<T> x(x_ref.begin(), x_ref.end());
  gcomp::lars<T> opt(options);
  reference_lars ref{0.5, 0.9, 5e-4, 0.02, {false, true, false, true}, {}};
  for (int step = 0; step < 30; ++step) {
    // Gradients of very different scales per layer: what LARS is for.
    std::vector<double> g = random_vector(lay.total_size(), gen);
    for (std::size_t i = lay[2].offset; i < lay[2].offset + lay[2].size; ++i) g[i] *= 100.0;
    for (std::size_t i = 0; i < g.size(); ++i)
      g[i] = double(T(g[i]));  // both see the same T values
    const std::vector<T> gt(g.begin(), g.end());
    opt.step(policy, lay, std::span<T>(x), std::span<const T>(gt));
    ref.step(lay, x_ref, g);
  }
  for (std::size_t i = 0; i < x.size(); ++i)
    REQUIRE(double(x[i]) == doctest::Approx(x_ref[i]).epsilon(tolerance));
  for (std::size_t i = 0; i < x.size(); ++i)
    REQUIRE(double(opt.momentum_buffer()[i]) == doctest::Approx(ref.v[i]).epsilon(tolerance));
  CHECK(opt.trust_ratios()[1] == 1.0);  // excluded
  CHECK(opt.trust_ratios()[3] == 1.0);
  CHECK(opt.trust_ratios()[0] != 1.0);
}

}  // namespace

TEST_CASE(
    "lars matches the reference of You et al. 2017 over 30 steps (double and float, seq and par)") {
  run_against_reference<double>(gcomp::host_seq{}, 1e-10);
  run_against_reference<double>(gcomp::host_par(2), 1e-10);
  run_against_reference<float>(gcomp::host_seq{}, 1e-4);
  run_against_reference<float>(gcomp::host_par(2), 1e-4);
}

TEST_CASE("with beta = 0 and no momentum a layer moves by exactly gamma * eta * ||x_d||") {
  const gcomp::layout lay{500, 20000};
  std::mt19937 gen(3);
  std::vector<double> x = random_vector(lay.total_size(), gen);
  const std::vector<double> x0 = x;
  std::vector<double> g = random_vector(lay.total_size(), gen);
  for (std::size_t i = 0; i < 500; ++i) g[i] *= 1e-3;  // tiny gradient: same step size anyway
  const double lr = 0.3, eta = 0.01;
  gcomp::lars<double> opt(
      {.lr = lr, .momentum = 0.0, .weight_decay = 0.0, .trust_coefficient = eta});
  opt.step(gcomp::host_seq{}, lay, std::span<double>(x), std::span<const double>(g));
  CHECK(opt.momentum_buffer().empty());
  for (std::size_t d = 0; d < 2; ++d) {
    double moved = 0, norm = 0;
    for (std::size_t i = lay[d].offset; i < lay[d].offset + lay[d].size; ++i) {
      moved += (x[i] - x0[i]) * (x[i] - x0[i]);
      norm += x0[i] * x0[i];
    }
    CHECK(std::sqrt(moved) == doctest::Approx(lr * eta * std::sqrt(norm)).epsilon(1e-12));
  }
}

TEST_CASE("scaling one layer's gradient by c > 0 leaves the LARS step unchanged when beta = 0") {
  const gcomp::layout lay{1000, 40000, 7};
  for (const double c : {0.125, 4.0, 3.7, 1e-3, 250.0}) {
    std::mt19937 gen(11);
    std::vector<double> x = random_vector(lay.total_size(), gen), y = x;
    gcomp::lars<double> a(
        {.lr = 0.2, .momentum = 0.9, .weight_decay = 0.0, .trust_coefficient = 0.01});
    gcomp::lars<double> b = a;
    for (int step = 0; step < 5; ++step) {
      const std::vector<double> g = random_vector(lay.total_size(), gen);
      std::vector<double> scaled = g;
      for (std::size_t i = lay[1].offset; i < lay[1].offset + lay[1].size; ++i) scaled[i] *= c;
      a.step(gcomp::host_seq{}, lay, std::span<double>(x), std::span<const double>(g));
      b.step(gcomp::host_par(2), lay, std::span<double>(y), std::span<const double>(scaled));
    }
    const bool power_of_two = std::exp2(std::round(std::log2(c))) == c;
    for (std::size_t i = 0; i < x.size(); ++i) {
      if (power_of_two)
        REQUIRE(x[i] == y[i]);  // every rounding scales exactly: bitwise
      else
        REQUIRE(x[i] == doctest::Approx(y[i]).epsilon(1e-12));
    }
  }
}

TEST_CASE("lars leaves masked-off layers and their momentum untouched and does not read them") {
  const gcomp::layout lay{{"a", 300}, {"b", 200}, {"c", 50000}};
  std::mt19937 gen(5);
  std::vector<double> x = random_vector(lay.total_size(), gen), x_ref = x;
  gcomp::lars<double> opt(
      {.lr = 0.1, .momentum = 0.9, .weight_decay = 1e-4, .trust_coefficient = 0.05});
  reference_lars ref{0.1, 0.9, 1e-4, 0.05, {false, false, false}, {}};
  const std::vector<std::vector<std::uint8_t>> masks{
      {1, 0, 1}, {0, 1, 0}, {1, 1, 1}, {0, 0, 1}, {1, 0, 0}};
  for (const auto& mask : masks) {
    std::vector<double> g = random_vector(lay.total_size(), gen);
    const std::vector<double> x_before = x,
                              v_before(opt.momentum_buffer().begin(), opt.momentum_buffer().end());
    // An inactive layer's gradient was never computed: NaN there must not leak anywhere.
    std::vector<double> g_nan = g;
    for (std::size_t d = 0; d < 3; ++d)
      if (!mask[d])
        for (std::size_t i = lay[d].offset; i < lay[d].offset + lay[d].size; ++i)
          g_nan[i] = std::nan("");
    opt.step(gcomp::host_par(2), lay, std::span<double>(x), std::span<const double>(g_nan), mask);
    ref.step(lay, x_ref, g, mask);
    for (std::size_t d = 0; d < 3; ++d) {
      if (mask[d]) continue;
      for (std::size_t i = lay[d].offset; i < lay[d].offset + lay[d].size; ++i) {
        REQUIRE(x[i] == x_before[i]);
        if (!v_before.empty()) REQUIRE(opt.momentum_buffer()[i] == v_before[i]);
      }
    }
  }
  for (std::size_t i = 0; i < x.size(); ++i)
    REQUIRE(x[i] == doctest::Approx(x_ref[i]).epsilon(1e-10));
}

TEST_CASE("lars uses ratio 1 for a layer whose weights or gradient are zero") {
  const gcomp::layout lay{4, 4, 4};
  std::vector<double> x{0, 0, 0, 0, 1, 2, 3, 4, 1, 1, 1, 1};
  const std::vector<double> g{1, 1, 1, 1, 0, 0, 0, 0, 3, 4, 0, 0};
  gcomp::lars<double> opt(
      {.lr = 0.1, .momentum = 0.0, .weight_decay = 0.5, .trust_coefficient = 0.1});
  opt.step(gcomp::host_seq{}, lay, std::span<double>(x), std::span<const double>(g));
  CHECK(opt.trust_ratios()[0] == 1.0);
  CHECK(opt.trust_ratios()[1] == 1.0);
  // Layer 2: ||x|| = 2, ||g|| = 5: lambda = 0.1 * 2 / (5 + 0.5 * 2).
  CHECK(opt.trust_ratios()[2] == doctest::Approx(0.2 / 6.0));
  CHECK(x[0] == doctest::Approx(-0.1));                   // plain step of rate gamma
  CHECK(x[4] == doctest::Approx(1.0 - 0.1 * 0.5 * 1.0));  // decay only, ratio 1
  CHECK(x[8] == doctest::Approx(1.0 - 0.1 * (0.2 / 6.0) * (3.0 + 0.5)));
}

TEST_CASE("lars gives bitwise the same result for any thread count") {
  const gcomp::layout lay{100000, 3, 70001};
  std::mt19937 gen(9);
  std::vector<float> x(lay.total_size()), g(lay.total_size());
  std::normal_distribution<float> dist;
  for (auto& v : x) v = dist(gen);
  for (auto& v : g) v = dist(gen);
  std::vector<float> y = x, z = x;
  gcomp::lars<float> a, b, c;
  for (int s = 0; s < 3; ++s) {
    a.step(gcomp::host_seq{}, lay, std::span<float>(x), std::span<const float>(g));
    b.step(gcomp::host_par(2), lay, std::span<float>(y), std::span<const float>(g));
    c.step(gcomp::host_par(3), lay, std::span<float>(z), std::span<const float>(g));
  }
  CHECK(x == y);
  CHECK(x == z);
}

TEST_CASE("lars rejects bad hyper-parameters and mismatched buffers before touching anything") {
  CHECK_THROWS_WITH_AS(gcomp::lars<float>({.lr = -0.1}),
                       "gcomp::lars: lr must be finite and >= 0, got -0.1", gcomp::error);
  CHECK_THROWS_AS(gcomp::lars<float>({.momentum = 1.0}), gcomp::error);
  CHECK_THROWS_AS(gcomp::lars<float>({.momentum = -0.1}), gcomp::error);
  CHECK_THROWS_AS(gcomp::lars<float>({.weight_decay = -1e-4}), gcomp::error);
  CHECK_THROWS_WITH_AS(gcomp::lars<float>({.trust_coefficient = 0.0}),
                       "gcomp::lars: trust_coefficient must be finite and > 0, got 0",
                       gcomp::error);
  gcomp::lars<float> ok;
  CHECK_THROWS_AS(ok.set_lr(-1.0), gcomp::error);

  const gcomp::layout lay{3, 3};
  gcomp::lars<float> opt;
  std::vector<float> x(6, 1.0f), g5(5, 1.0f), g(6, 1.0f), x7(7, 1.0f);
  CHECK_THROWS_WITH_AS(
      opt.step(gcomp::host_seq{}, lay, std::span<float>(x), std::span<const float>(g5)),
      "gcomp::lars::step: grads has size 5 but params has size 6; they must match", gcomp::error);
  CHECK_THROWS_AS(
      opt.step(gcomp::host_seq{}, lay, std::span<float>(x7), std::span<const float>(x7)),
      gcomp::error);
  const std::uint8_t bad_mask[] = {1};
  CHECK_THROWS_AS(
      opt.step(gcomp::host_seq{}, lay, std::span<float>(x), std::span<const float>(g), bad_mask),
      gcomp::error);
  CHECK(x == std::vector<float>(6, 1.0f));
  CHECK(opt.steps() == 0);
  CHECK(opt.momentum_buffer().empty());

  opt.step(gcomp::host_seq{}, lay, std::span<float>(x), std::span<const float>(g));
  const std::vector<float> v(opt.momentum_buffer().begin(), opt.momentum_buffer().end());
  const std::vector<float> x_after = x;
  // A different model after the first step is an error, not a silent restart.
  const gcomp::layout other{6};
  CHECK_THROWS_AS(
      opt.step(gcomp::host_seq{}, other, std::span<float>(x), std::span<const float>(g)),
      gcomp::error);
  CHECK(x == x_after);
  CHECK(std::vector<float>(opt.momentum_buffer().begin(), opt.momentum_buffer().end()) == v);
  opt.reset();
  opt.step(gcomp::host_seq{}, other, std::span<float>(x), std::span<const float>(g));
  CHECK(opt.steps() == 1);
}
