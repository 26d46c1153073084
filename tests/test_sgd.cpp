// sgd: every option against a naive per-element reference of torch.optim.SGD's formulas, masks, bad arguments.
#include <doctest/doctest.h>

#include <random>
#include <vector>

#include "gcomp/optim/sgd.hpp"

namespace {

// torch.optim.SGD, written out plainly for one flat vector.
struct reference_sgd {
  gcomp::sgd_options o;
  std::vector<double> buf;
  bool started = false;
  void step(std::vector<double>& x, const std::vector<double>& g) {
    if (buf.empty()) buf.assign(x.size(), 0.0);
    for (std::size_t i = 0; i < x.size(); ++i) {
      double d = g[i] + o.weight_decay * x[i];
      if (o.momentum != 0.0) {
        buf[i] = started ? o.momentum * buf[i] + (1.0 - o.dampening) * d : d;
        d = o.nesterov ? d + o.momentum * buf[i] : buf[i];
      }
      x[i] -= o.lr * d;
    }
    started = true;
  }
};

std::vector<double> random_vector(std::size_t n, std::mt19937& gen) {
  std::normal_distribution<double> dist;
  std::vector<double> v(n);
  for (double& x : v) x = dist(gen);
  return v;
}

}  // namespace

TEST_CASE("sgd matches the reference for every option combination over 50 steps") {
  const gcomp::layout lay{7, 1, 30000};
  const gcomp::sgd_options cases[] = {
      {.lr = 0.1},
      {.lr = 0.05, .weight_decay = 0.01},
      {.lr = 0.05, .momentum = 0.9},
      {.lr = 0.05, .momentum = 0.9, .dampening = 0.1, .weight_decay = 1e-3},
      {.lr = 0.02, .momentum = 0.8, .nesterov = true, .weight_decay = 2e-4},
  };
  for (const auto& options : cases) {
    for (int policy = 0; policy < 2; ++policy) {
      std::mt19937 gen(42);
      std::vector<double> x = random_vector(lay.total_size(), gen), x_ref = x;
      gcomp::sgd<double> opt(options);
      reference_sgd ref{options, {}, false};
      for (int step = 0; step < 50; ++step) {
        const auto g = random_vector(lay.total_size(), gen);
        if (policy == 0)
          opt.step(gcomp::host_seq{}, lay, std::span<double>(x), std::span<const double>(g));
        else
          opt.step(gcomp::host_par(2), lay, std::span<double>(x), std::span<const double>(g));
        ref.step(x_ref, g);
      }
      for (std::size_t i = 0; i < x.size(); ++i)
        REQUIRE(x[i] == doctest::Approx(x_ref[i]).epsilon(1e-12));
    }
  }
}

TEST_CASE("sgd leaves masked-off layers and their momentum untouched") {
  const gcomp::layout lay{4, 4};
  gcomp::sgd<float> opt({.lr = 0.5, .momentum = 0.9});
  std::vector<float> x(8, 1.0f);
  const std::vector<float> g(8, 1.0f);
  const std::uint8_t only_first[] = {1, 0};
  opt.step(gcomp::host_seq{}, lay, std::span<float>(x), std::span<const float>(g), only_first);
  CHECK(x[0] == 0.5f);
  CHECK(x[4] == 1.0f);
  CHECK(opt.momentum_buffer()[4] == 0.0f);
  // Layer 1's first active step initialises its momentum from its gradient
  // (no decay of a buffer that never existed); layer 0 continues its own.
  opt.step(gcomp::host_seq{}, lay, std::span<float>(x), std::span<const float>(g));
  CHECK(x[4] == 0.5f);
  CHECK(opt.momentum_buffer()[0] == doctest::Approx(1.9f));
  CHECK(x[0] == doctest::Approx(0.5f - 0.5f * 1.9f));
}

TEST_CASE("sgd rejects bad hyper-parameters and mismatched buffers") {
  CHECK_THROWS_WITH_AS(gcomp::sgd<float>({.lr = -0.1}),
                       "gcomp::sgd: lr must be finite and >= 0, got -0.1", gcomp::error);
  CHECK_THROWS_AS(gcomp::sgd<float>({.lr = 0.1, .momentum = 1.0}), gcomp::error);
  CHECK_THROWS_AS(gcomp::sgd<float>({.lr = 0.1, .momentum = -0.5}), gcomp::error);
  CHECK_THROWS_AS(gcomp::sgd<float>({.lr = 0.1, .dampening = 2.0}), gcomp::error);
  CHECK_THROWS_AS(gcomp::sgd<float>({.lr = 0.1, .weight_decay = -1.0}), gcomp::error);
  CHECK_THROWS_WITH_AS(gcomp::sgd<float>({.lr = 0.1, .nesterov = true}),
                       "gcomp::sgd: nesterov needs momentum > 0 and dampening == 0, got momentum 0 "
                       "and dampening 0",
                       gcomp::error);

  const gcomp::layout lay{3, 3};
  gcomp::sgd<float> opt({.lr = 0.1, .momentum = 0.5});
  std::vector<float> x(6, 1.0f), g(5, 1.0f), g6(6, 1.0f), x5(5, 1.0f);
  CHECK_THROWS_WITH_AS(
      opt.step(gcomp::host_seq{}, lay, std::span<float>(x), std::span<const float>(g)),
      "gcomp::sgd::step: grads has size 5 but params has size 6; they must match", gcomp::error);
  CHECK_THROWS_AS(opt.step(gcomp::host_seq{}, lay, std::span<float>(x5), std::span<const float>(x5)),
                  gcomp::error);
  const std::uint8_t bad_mask[] = {1, 1, 1};
  CHECK_THROWS_AS(
      opt.step(gcomp::host_seq{}, lay, std::span<float>(x), std::span<const float>(g6), bad_mask),
      gcomp::error);
  CHECK(x == std::vector<float>(6, 1.0f));  // nothing was touched by the failed calls
  CHECK_THROWS_AS(opt.set_lr(-1.0), gcomp::error);
}

TEST_CASE("sgd refuses a different model after its first step until reset") {
  gcomp::sgd<float> opt({.lr = 0.1, .momentum = 0.9});
  std::vector<float> x(8, 1.0f);
  const std::vector<float> g(8, 1.0f);
  opt.step(gcomp::host_seq{}, gcomp::layout{8}, std::span<float>(x), std::span<const float>(g));
  const auto after = x;
  CHECK_THROWS_AS(opt.step(gcomp::host_seq{}, gcomp::layout{4, 4}, std::span<float>(x),
                           std::span<const float>(g)),
                  gcomp::error);
  CHECK(x == after);
  opt.reset();
  opt.step(gcomp::host_seq{}, gcomp::layout{4, 4}, std::span<float>(x), std::span<const float>(g));
  CHECK(opt.steps() == 1);
  CHECK(x[0] == doctest::Approx(after[0] - 0.1f));  // a first step again: no momentum carried over
}
