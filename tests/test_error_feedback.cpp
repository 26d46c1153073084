// Tests of compress/error_feedback.hpp and compress/ef21.hpp: nothing sent is lost (telescoping sums to a stated rounding bound), the EF21 server estimate, determinism, input checks, traits, all-reduce in a pipeline.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "compressor_checks.hpp"
#include "gcomp/aggregate/allreduce.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/compress/ef21.hpp"
#include "gcomp/compress/error_feedback.hpp"
#include "gcomp/compress/identity.hpp"
#include "gcomp/compress/random_block.hpp"
#include "gcomp/compress/randomk.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/message.hpp"
#include "gcomp/optim/sgd.hpp"
#include "gcomp/pipeline.hpp"

using gcomp::rng_key;

namespace {

// A deterministic biased compressor of the tests' own: rounds to the nearest
// point of a grid of step delta (an epsilon-compressor), dense payload.
using grid_round = gcomp::test::grid_compressor<gcomp::test::grid_rounding::nearest>;

std::vector<float> gradient(std::size_t n, std::uint64_t t) {
  std::vector<float> g(n);
  for (std::size_t i = 0; i < n; ++i)
    g[i] = std::sin(0.13f * float(i * (t + 1)) + float(t)) * (1.0f + float(i % 3)) / float(1 + t % 7);
  return g;
}

// Runs T steps of error_feedback<C> and checks
//   sum_t decompress(message_t) + e_T == sum_t g_t
// coordinate by coordinate. Each step does two float operations per element
// whose results enter the identity: p = fl(e + g) and e' = fl(p - v) (v the
// sent value, exact in the message). Each adds at most u |result| with
// u = 2^-24, so the identity holds up to bound_i = u * sum_t (|p_t,i| + |e_t,i|),
// accumulated alongside (in double, whose own rounding is negligible).
template <class C>
void check_telescoping(C inner, std::size_t n, std::size_t steps) {
  gcomp::error_feedback<C> ef(std::move(inner));
  typename C::payload m;
  std::vector<double> sent(n, 0.0), inputs(n, 0.0), bound(n, 0.0);
  std::vector<float> previous(n, 0.0f);
  constexpr double u = 0x1p-24;
  for (std::uint64_t t = 0; t < steps; ++t) {
    const auto g = gradient(n, t);
    ef.compress(gcomp::host_seq{}, std::span<const float>(g), m, rng_key{12, t, 1});
    std::vector<float> dense(n, 0.0f);
    ef.decompress_add(gcomp::host_seq{}, m, std::span<float>(dense), 1.0f);
    const auto e = ef.residual();
    REQUIRE(e.size() == n);
    for (std::size_t i = 0; i < n; ++i) {
      sent[i] += dense[i];
      inputs[i] += g[i];
      bound[i] += u * (std::fabs(double(previous[i]) + g[i]) + std::fabs(double(e[i])));
      previous[i] = e[i];
    }
  }
  double worst = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    const double gap = std::fabs(sent[i] + previous[i] - inputs[i]);
    worst = std::max(worst, gap / std::max(bound[i], 1e-300));
    CHECK(gap <= bound[i] * (1 + 1e-9) + 1e-30);
  }
  INFO("largest gap as a fraction of its bound: " << worst);
}

}  // namespace

using ef_randomk = gcomp::error_feedback<gcomp::randomk<float, gcomp::key_use::per_worker, gcomp::rescale::none>>;
using ef_shared_randomk = gcomp::error_feedback<gcomp::shared_randomk<float, gcomp::rescale::none>>;
static_assert(gcomp::compressor<ef_randomk>);
static_assert(!gcomp::compressor_traits<ef_randomk>::unbiased);
static_assert(!gcomp::allreducible_compressor<ef_randomk>);
static_assert(gcomp::allreducible_compressor<ef_shared_randomk>);
static_assert(gcomp::allreducible_compressor<gcomp::error_feedback<gcomp::random_contiguous_block<float>>>);
static_assert(gcomp::compressor<gcomp::ef21<gcomp::randomk<float>>, gcomp::host_par>);
static_assert(!gcomp::compressor_traits<gcomp::ef21<gcomp::identity<float>>>::unbiased);
static_assert(gcomp::compressor_traits<gcomp::ef21<gcomp::identity<float>>>::shared_support);

TEST_CASE("error feedback: what was sent plus the final residual equals the sum of the inputs") {
  check_telescoping(gcomp::randomk<float, gcomp::key_use::per_worker, gcomp::rescale::none>({.k = 7}),
                    64, 300);
  check_telescoping(gcomp::randomk<float>({.ratio = 0.1}), 50, 200);  // rescaled too
  check_telescoping(gcomp::random_contiguous_block<float, gcomp::rescale::none>({.k = 9}), 40, 300);
  check_telescoping(grid_round{0.3f}, 33, 300);
}

TEST_CASE("error feedback around an unscaled sparsifier zeroes what it sends and keeps the rest") {
  constexpr std::size_t n = 30;
  ef_randomk ef(gcomp::randomk<float, gcomp::key_use::per_worker, gcomp::rescale::none>({.k = 4}));
  gcomp::sparse_payload<float> m;
  CHECK(ef.residual().empty());
  const auto g0 = gradient(n, 0), g1 = gradient(n, 1);
  ef.compress(gcomp::host_seq{}, std::span<const float>(g0), m, rng_key{1, 0, 0});
  std::vector<float> expected = g0;
  for (std::size_t j = 0; j < m.size(); ++j) {
    CHECK(m.data[j] == g0[m.indices[j]]);
    expected[m.indices[j]] = 0.0f;
  }
  CHECK(std::vector<float>(ef.residual().begin(), ef.residual().end()) == expected);
  ef.compress(gcomp::host_seq{}, std::span<const float>(g1), m, rng_key{1, 1, 0});
  for (std::size_t j = 0; j < m.size(); ++j)
    CHECK(m.data[j] == expected[m.indices[j]] + g1[m.indices[j]]);
  ef.reset();
  CHECK(std::vector<float>(ef.residual().begin(), ef.residual().end()) == std::vector<float>(n, 0.0f));

  // Identity loses nothing: the residual stays exactly zero.
  gcomp::error_feedback<gcomp::identity<float>> exact;
  gcomp::dense_payload<float> d;
  for (std::uint64_t t = 0; t < 3; ++t) {
    const auto g = gradient(n, t);
    exact.compress(gcomp::host_seq{}, std::span<const float>(g), d, rng_key{});
    CHECK(d.data == g);
    for (float e : exact.residual()) CHECK(e == 0.0f);
  }
  CHECK(exact.wire_bytes(d) == exact.inner().wire_bytes(d));
}

TEST_CASE("error feedback: same payloads and residuals for host_seq and host_par 1, 2, 3, 7") {
  constexpr std::size_t n = 100000;
  auto run = [&](const auto& policy) {
    ef_shared_randomk ef(gcomp::shared_randomk<float, gcomp::rescale::none>({.ratio = 0.2}));
    gcomp::sparse_payload<float> m;
    for (std::uint64_t t = 0; t < 3; ++t) {
      const auto g = gradient(n, t);
      ef.compress(policy, std::span<const float>(g), m, rng_key{4, t, 2});
    }
    return std::pair{m.data, std::vector<float>(ef.residual().begin(), ef.residual().end())};
  };
  gcomp::test::check_same_pair_for_every_policy(run);
}

TEST_CASE("error feedback and ef21 reject a gradient of another size, leaving their state alone") {
  ef_randomk ef(gcomp::randomk<float, gcomp::key_use::per_worker, gcomp::rescale::none>({.k = 3}));
  gcomp::sparse_payload<float> m;
  const auto g = gradient(10, 0);
  ef.compress(gcomp::host_seq{}, std::span<const float>(g), m, rng_key{});
  const std::vector<float> residual(ef.residual().begin(), ef.residual().end());
  const auto sent = m.data;
  const auto g9 = gradient(9, 0);
  CHECK_THROWS_WITH_AS(
      ef.compress(gcomp::host_seq{}, std::span<const float>(g9), m, rng_key{}),
      "gcomp::error_feedback::compress: gradient has size 9 but residual has size 10; they must match",
      gcomp::error);
  CHECK(std::vector<float>(ef.residual().begin(), ef.residual().end()) == residual);
  CHECK(m.data == sent);
  // The inner compressor's own refusal (k > n) also leaves the residual as it was.
  ef_randomk big(gcomp::randomk<float, gcomp::key_use::per_worker, gcomp::rescale::none>({.k = 20}));
  CHECK_THROWS_AS(big.compress(gcomp::host_seq{}, std::span<const float>(g), m, rng_key{}),
                  gcomp::error);
  CHECK(m.data == sent);

  gcomp::ef21<gcomp::randomk<float, gcomp::key_use::per_worker, gcomp::rescale::none>> e21(
      gcomp::randomk<float, gcomp::key_use::per_worker, gcomp::rescale::none>({.k = 3}));
  e21.compress(gcomp::host_seq{}, std::span<const float>(g), m, rng_key{});
  const std::vector<float> h(e21.state().begin(), e21.state().end());
  CHECK_THROWS_WITH_AS(e21.compress(gcomp::host_seq{}, std::span<const float>(g9), m, rng_key{}),
                       "gcomp::ef21::compress: gradient has size 9 but state has size 10; they must match",
                       gcomp::error);
  CHECK(std::vector<float>(e21.state().begin(), e21.state().end()) == h);
}

TEST_CASE("ef21: the worker's h is the sum of its increments and a persistent receiver tracks the mean h") {
  // Three workers with fixed gradients; the server adds every message with
  // scale 1/M into G and never zeroes it, so G = (1/M) sum_m h_m after every
  // step (to float rounding: each step adds one rounded term per worker,
  // bound 2^-24 * sum |terms| per step). With an unscaled random-k, g - h
  // shrinks coordinate by coordinate, reaching 0 once every coordinate has
  // been drawn: after 100 steps of k = 5 of n = 20 a coordinate is missed
  // with probability (3/4)^100 = 3e-13.
  constexpr std::size_t n = 20;
  constexpr int workers = 3;
  using inner = gcomp::randomk<float, gcomp::key_use::per_worker, gcomp::rescale::none>;
  std::vector<gcomp::ef21<inner>> w;
  for (int m = 0; m < workers; ++m) w.emplace_back(inner({.k = 5}));
  std::vector<std::vector<float>> g;
  for (int m = 0; m < workers; ++m) g.push_back(gradient(n, std::uint64_t(m)));
  std::vector<float> server(n, 0.0f);
  std::vector<double> bound(n, 0.0);
  std::vector<double> distance(workers, 1e300);
  gcomp::sparse_payload<float> msg;
  for (std::uint64_t t = 0; t < 100; ++t) {
    for (int m = 0; m < workers; ++m) {
      w[m].compress(gcomp::host_seq{}, std::span<const float>(g[m]), msg,
                    rng_key{3, t, std::uint32_t(m)});
      for (std::size_t j = 0; j < msg.size(); ++j)
        bound[msg.indices[j]] += 0x1p-24 * (std::fabs(server[msg.indices[j]]) + std::fabs(msg.data[j]));
      w[m].decompress_add(gcomp::host_seq{}, msg, std::span<float>(server), 1.0f / workers);
      double d = 0.0;
      for (std::size_t i = 0; i < n; ++i) d += (g[m][i] - w[m].state()[i]) * (g[m][i] - w[m].state()[i]);
      CHECK(d <= distance[m]);  // the estimate never moves away from a fixed gradient
      distance[m] = d;
    }
    for (std::size_t i = 0; i < n; ++i) {
      double mean = 0.0;
      for (int m = 0; m < workers; ++m) mean += double(w[m].state()[i]) / workers;
      REQUIRE(std::fabs(server[i] - mean) <= bound[i] + 4 * 0x1p-24 * std::fabs(mean) + 1e-30);
    }
  }
  for (int m = 0; m < workers; ++m) {
    CHECK(distance[m] == 0.0);
    CHECK(std::vector<float>(w[m].state().begin(), w[m].state().end()) == g[m]);
  }
  w[0].reset();
  for (float h : w[0].state()) CHECK(h == 0.0f);
  w[0].assign_state(std::span<const float>(g[0]));
  w[0].compress(gcomp::host_seq{}, std::span<const float>(g[0]), msg, rng_key{});
  for (float v : msg.data) CHECK(v == 0.0f);  // nothing left to send
}

TEST_CASE("error feedback around a shared-key compressor runs in an all-reduce pipeline") {
  // Each worker's residual is its own p - C(p), and the global gradient is the
  // mean of the workers' C(p_m) (the same C on every worker up to the values).
  constexpr int workers = 4;
  constexpr std::size_t n = 64;
  const gcomp::layout lay{n};
  std::vector<std::vector<float>> globals(workers), residuals(workers);
  std::vector<std::vector<float>> expected_residual(workers);
  std::vector<double> expected_global(n, 0.0);
  for (int m = 0; m < workers; ++m) {
    gcomp::error_feedback<gcomp::random_contiguous_block<float, gcomp::rescale::none>> ef(
        gcomp::random_contiguous_block<float, gcomp::rescale::none>({.k = 16}));
    gcomp::block_payload<float> msg;
    const auto g = gradient(n, std::uint64_t(m));
    ef.compress(gcomp::host_seq{}, std::span<const float>(g), msg, rng_key{8, 0, std::uint32_t(m)});
    expected_residual[m].assign(ef.residual().begin(), ef.residual().end());
    std::vector<float> dense(n, 0.0f);
    ef.decompress_add(gcomp::host_seq{}, msg, std::span<float>(dense), 1.0f);
    for (std::size_t i = 0; i < n; ++i) expected_global[i] += dense[i] / workers;
  }
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    gcomp::pipeline pipe{gcomp::error_feedback<gcomp::random_contiguous_block<float, gcomp::rescale::none>>(
                             gcomp::random_contiguous_block<float, gcomp::rescale::none>({.k = 16})),
                         gcomp::allreduce{}, gcomp::sgd<float>{{.lr = 1.0}}, 8};
    std::vector<float> params(n, 0.0f);
    const auto g = gradient(n, std::uint64_t(comm.rank()));
    pipe.step(gcomp::host_seq{}, comm, lay, std::span<float>(params), std::span<const float>(g));
    globals[comm.rank()].assign(pipe.global_gradient().begin(), pipe.global_gradient().end());
    residuals[comm.rank()].assign(pipe.compressor.residual().begin(), pipe.compressor.residual().end());
  });
  for (int m = 0; m < workers; ++m) {
    CHECK(residuals[m] == expected_residual[m]);
    for (std::size_t i = 0; i < n; ++i)
      CHECK(globals[m][i] == doctest::Approx(expected_global[i]).epsilon(1e-6));
  }
}
