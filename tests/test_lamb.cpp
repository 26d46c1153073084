// lamb: You et al. 2019 reference, step-norm closed form, clipping, exclusions, masks, errors.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "gcomp/optim/lamb.hpp"
#include "optim_reference.hpp"

static_assert(gcomp::optimizer<gcomp::lamb<float>>);
static_assert(gcomp::optimizer<gcomp::lamb<double>, gcomp::host_par, double>);

using gcomp::test::random_vector;

namespace {

// You et al. 2019, Algorithm 2 (LAMB), per layer in double, t per layer:
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   m_hat = m / (1 - b1^t);  v_hat = v / (1 - b2^t)
//   r = m_hat / (sqrt(v_hat) + eps);  u = r + lambda x
//   x = x - lr * phi(||x||) / ||u|| * u   (ratio 1 if a norm is 0 or the layer is excluded)
struct reference_lamb {
  double lr, eps, weight_decay, min_trust, max_trust;
  std::vector<bool> excluded;
  gcomp::test::adam_moments moments;  // beta1, beta2, m, v, t

  void step(const gcomp::layout& lay, std::vector<double>& x, const std::vector<double>& g,
            const std::vector<std::uint8_t>& active = {}) {
    moments.start(x.size(), lay.num_layers());
    const auto& m = moments.m;
    const auto& v = moments.v;
    for (std::size_t d = 0; d < lay.num_layers(); ++d) {
      if (!active.empty() && !active[d]) continue;
      const int k = moments.count_step(d);
      const std::size_t b = lay[d].offset, e = b + lay[d].size;
      const double lambda = excluded[d] ? 0.0 : weight_decay;
      std::vector<double> u(lay[d].size);
      double xx = 0, uu = 0;
      for (std::size_t i = b; i < e; ++i) {
        moments.update(i, g[i]);
        const double m_hat = m[i] / (1 - std::pow(moments.beta1, k));
        const double v_hat = v[i] / (1 - std::pow(moments.beta2, k));
        u[i - b] = m_hat / (std::sqrt(v_hat) + eps) + lambda * x[i];
        xx += x[i] * x[i];
        uu += u[i - b] * u[i - b];
      }
      const double xn = std::sqrt(xx), un = std::sqrt(uu);
      const double phi = std::clamp(xn, min_trust, max_trust);
      const double ratio = excluded[d] || xn == 0 || un == 0 ? 1.0 : phi / un;
      for (std::size_t i = b; i < e; ++i) x[i] -= lr * ratio * u[i - b];
    }
  }
};

bool is_norm(const gcomp::layer& l) { return l.name.rfind("bn", 0) == 0; }

template <class T, class Policy>
void run_against_reference(const Policy& policy,
                           const std::vector<std::vector<std::uint8_t>>& masks, double max_trust,
                           double tolerance) {
  const gcomp::layout lay{{"conv", 5000}, {"bn.weight", 64}, {"bn.bias", 64}, {"fc", 50000}};
  const double inf = std::numeric_limits<double>::infinity();
  gcomp::lamb<T> opt({.lr = 0.01,
                      .beta1 = 0.85,
                      .beta2 = 0.995,
                      .eps = 1e-6,
                      .weight_decay = 0.02,
                      .min_trust = 0.0,
                      .max_trust = max_trust,
                      .exclude = is_norm});
  reference_lamb ref{0.01,
                     1e-6,
                     0.02,
                     0.0,
                     max_trust == inf ? inf : max_trust,
                     {false, true, true, false},
                     {.beta1 = 0.85, .beta2 = 0.995}};
  std::mt19937 gen(13);
  std::vector<double> x_ref = random_vector(lay.total_size(), gen, 0.05);
  std::vector<T> x(x_ref.begin(), x_ref.end());
  for (std::size_t i = 0; i < x.size(); ++i) x_ref[i] = double(x[i]);
  for (int step = 0; step < 40; ++step) {
    const auto& mask = masks[std::size_t(step) % masks.size()];
    std::vector<double> g = random_vector(lay.total_size(), gen);
    for (double& e : g) e = double(T(e));
    const std::vector<T> gt(g.begin(), g.end());
    opt.step(policy, lay, std::span<T>(x), std::span<const T>(gt), mask);
    ref.step(lay, x_ref, g, mask);
  }
  for (std::size_t i = 0; i < x.size(); ++i)
    REQUIRE(double(x[i]) == doctest::Approx(x_ref[i]).epsilon(tolerance));
  for (std::size_t d = 0; d < lay.num_layers(); ++d)
    CHECK(opt.layer_steps(d) == std::uint64_t(ref.moments.t[d]));
}

}  // namespace

TEST_CASE("lamb matches the reference of You et al. 2019 over 40 steps") {
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<std::vector<std::uint8_t>> all{{}};
  const std::vector<std::vector<std::uint8_t>> some{
      {1, 0, 1, 1}, {0, 1, 0, 1}, {1, 1, 1, 0}, {0, 0, 0, 0}};
  run_against_reference<double>(gcomp::host_seq{}, all, inf, 1e-10);
  run_against_reference<double>(gcomp::host_par(2), some, inf, 1e-10);
  run_against_reference<double>(gcomp::host_seq{}, some, 2.0, 1e-10);  // phi clipped at 2
  run_against_reference<float>(gcomp::host_par(2), all, inf, 1e-4);
  run_against_reference<float>(gcomp::host_seq{}, some, inf, 1e-4);
}

TEST_CASE("each lamb step moves a layer by exactly lr * phi(||x_d||)") {
  const gcomp::layout lay{300, 30000};
  std::mt19937 gen(4);
  std::vector<double> x = random_vector(lay.total_size(), gen);
  for (std::size_t i = 0; i < 300; ++i) x[i] *= 0.01;  // ||x_0|| ~ 0.17, ||x_1|| ~ 173
  const double lr = 0.05, cap = 10.0;
  gcomp::lamb<double> opt({.lr = lr, .weight_decay = 0.1, .max_trust = cap});
  for (int s = 0; s < 5; ++s) {
    const std::vector<double> x0 = x, g = random_vector(lay.total_size(), gen);
    opt.step(gcomp::host_par(2), lay, std::span<double>(x), std::span<const double>(g));
    for (std::size_t d = 0; d < 2; ++d) {
      double moved = 0, norm = 0;
      for (std::size_t i = lay[d].offset; i < lay[d].offset + lay[d].size; ++i) {
        moved += (x[i] - x0[i]) * (x[i] - x0[i]);
        norm += x0[i] * x0[i];
      }
      CHECK(std::sqrt(moved) ==
            doctest::Approx(lr * std::min(std::sqrt(norm), cap)).epsilon(1e-10));
    }
  }
}

TEST_CASE("an excluded layer takes the plain bias-corrected Adam direction") {
  const gcomp::layout lay{{"w", 4}, {"bias", 4}};
  gcomp::lamb<double> opt(
      {.lr = 0.1, .eps = 1e-12, .weight_decay = 0.5, .exclude = [](const gcomp::layer& l) {
         return l.name == "bias";
       }});
  std::vector<double> x{1, 2, 3, 4, 1, 2, 3, 4};
  const std::vector<double> g{1, -1, 2, -2, 1, -1, 2, -2};
  opt.step(gcomp::host_seq{}, lay, std::span<double>(x), std::span<const double>(g));
  CHECK(opt.trust_ratios()[1] == 1.0);
  CHECK(opt.trust_ratios()[0] != 1.0);
  // First step: r = g / |g| = sign(g), no decay, ratio 1.
  CHECK(x[4] == doctest::Approx(0.9));
  CHECK(x[5] == doctest::Approx(2.1));
  CHECK(x[6] == doctest::Approx(2.9));
  CHECK(x[7] == doctest::Approx(4.1));
}

TEST_CASE("lamb uses ratio 1 for zero weights and leaves masked-off layers untouched") {
  const gcomp::layout lay{3, 3};
  gcomp::lamb<double> opt({.lr = 0.1, .eps = 1e-12});
  std::vector<double> x{0, 0, 0, 5, 5, 5};
  const std::vector<double> g{1, -2, 4, 1, 1, 1};
  const std::uint8_t first[] = {1, 0};
  opt.step(gcomp::host_seq{}, lay, std::span<double>(x), std::span<const double>(g), first);
  CHECK(opt.trust_ratios()[0] == 1.0);
  CHECK(x[0] == doctest::Approx(-0.1));
  CHECK(x[1] == doctest::Approx(0.1));
  CHECK(x[3] == 5.0);
  CHECK(opt.exp_avg()[3] == 0.0);
  CHECK(opt.exp_avg_sq()[3] == 0.0);
  CHECK(opt.layer_steps(1) == 0);
}

TEST_CASE("lamb gives bitwise the same result for any thread count") {
  const gcomp::layout lay{90000, 5, 70001};
  std::mt19937 gen(1);
  std::normal_distribution<float> dist;
  std::vector<float> x(lay.total_size()), g(lay.total_size());
  for (auto& v : x) v = dist(gen);
  for (auto& v : g) v = dist(gen);
  std::vector<float> y = x, z = x;
  gcomp::lamb<float> a, b, c;
  for (int s = 0; s < 3; ++s) {
    a.step(gcomp::host_seq{}, lay, std::span<float>(x), std::span<const float>(g));
    b.step(gcomp::host_par(2), lay, std::span<float>(y), std::span<const float>(g));
    c.step(gcomp::host_par(4), lay, std::span<float>(z), std::span<const float>(g));
  }
  CHECK(x == y);
  CHECK(x == z);
}

TEST_CASE("lamb rejects bad hyper-parameters and mismatched buffers before touching anything") {
  CHECK_THROWS_WITH_AS(gcomp::lamb<float>({.lr = -0.5}),
                       "gcomp::lamb: lr must be finite and >= 0, got -0.5", gcomp::error);
  CHECK_THROWS_AS(gcomp::lamb<float>({.beta1 = 1.0}), gcomp::error);
  CHECK_THROWS_AS(gcomp::lamb<float>({.beta2 = -0.01}), gcomp::error);
  CHECK_THROWS_WITH_AS(gcomp::lamb<float>({.eps = 0.0}),
                       "gcomp::lamb: eps must be finite and > 0, got 0", gcomp::error);
  CHECK_THROWS_AS(gcomp::lamb<float>({.weight_decay = -1.0}), gcomp::error);
  CHECK_THROWS_AS(gcomp::lamb<float>({.min_trust = 2.0, .max_trust = 1.0}), gcomp::error);
  CHECK_THROWS_AS(gcomp::lamb<float>({.max_trust = 0.0}), gcomp::error);

  const gcomp::layout lay{3, 3};
  gcomp::lamb<float> opt;
  std::vector<float> x(6, 1.0f), g7(7, 1.0f), g(6, 1.0f);
  CHECK_THROWS_WITH_AS(
      opt.step(gcomp::host_seq{}, lay, std::span<float>(x), std::span<const float>(g7)),
      "gcomp::lamb::step: grads has size 7 but params has size 6; they must match", gcomp::error);
  const std::uint8_t bad_mask[] = {1, 1, 1, 1};
  CHECK_THROWS_AS(
      opt.step(gcomp::host_seq{}, lay, std::span<float>(x), std::span<const float>(g), bad_mask),
      gcomp::error);
  CHECK(x == std::vector<float>(6, 1.0f));
  CHECK(opt.exp_avg().empty());
  CHECK(opt.steps() == 0);
}
