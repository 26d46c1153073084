// Tests of compress/bernoulli.hpp: unbiasedness, second moment and kept count by Monte Carlo, per-layer probabilities, shared keys, wire form, decode safety, determinism, input checks.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "compressor_checks.hpp"
#include "gcomp/compress/bernoulli.hpp"
#include "gcomp/core/concepts.hpp"
#include "wire_fuzz.hpp"

using gcomp::rng_key;
using gcomp::test::decompressed;

namespace {

std::vector<float> wave(std::size_t n, float phase = 0.0f) {
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i) x[i] = std::sin(0.9f * float(i) + phase) + 0.2f;
  return x;
}

using shared_bernoulli = gcomp::bernoulli_sparsifier<float, gcomp::key_use::shared>;

}  // namespace

static_assert(gcomp::compressor<gcomp::bernoulli_sparsifier<float>>);
static_assert(gcomp::compressor_traits<gcomp::bernoulli_sparsifier<float>>::unbiased);
static_assert(!gcomp::allreducible_compressor<gcomp::bernoulli_sparsifier<float>>);
static_assert(gcomp::allreducible_compressor<shared_bernoulli, gcomp::host_par>);

TEST_CASE("Bernoulli sparsification is unbiased with alpha = max 1/p (Monte Carlo, 5 sigma)") {
  // C_i = x_i / q with probability q: Var C_i = x_i^2 (1/q - 1); the T-draw
  // mean has sigma |x_i| sqrt((1/q - 1)/T). ||C||^2 = sum_i B_i x_i^2 / q^2 with
  // independent B_i ~ Bernoulli(q): E = ||x||^2 / q, Var = sum x_i^4 (1 - q) / q^3.
  // The kept count is Binomial(n, q). The Monte-Carlo rule of
  // compressor_checks.hpp (5 sigma, T = 40000): 5.7e-7 per statistic, union
  // bound over the n + 2 = 42 statistics 2.4e-5.
  constexpr std::size_t n = 40, trials = 40000;
  const double p = 0.3;
  const auto x = wave(n);
  gcomp::bernoulli_sparsifier<float> c(p);
  const double q = c.keep_probability();
  CHECK(q == doctest::Approx(p).epsilon(1e-6));
  CHECK(c.alpha() == doctest::Approx(1.0 / q));
  gcomp::sparse_payload<float> m;
  gcomp::test::monte_carlo mc(n, trials);
  double kept = 0.0;
  for (std::size_t t = 0; t < trials; ++t) {
    c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{4, t, 1});
    for (std::size_t j = 0; j < m.size(); ++j) {
      REQUIRE(m.data[j] == x[m.indices[j]] * float(1.0 / q));
      if (j > 0) REQUIRE(m.indices[j] > m.indices[j - 1]);
    }
    mc.add_sparse_draw(m.indices, m.data);
    kept += double(m.size());
  }
  mc.check_means([&](std::size_t i) { return x[i]; },
                 [&](std::size_t i) { return double(x[i]) * x[i] * (1.0 / q - 1.0); });
  double norm2 = 0.0, fourth = 0.0;
  for (float v : x) {
    norm2 += double(v) * v;
    fourth += std::pow(double(v), 4);
  }
  const double sigma2 = std::sqrt(fourth * (1 - q) / (q * q * q) / trials);
  gcomp::test::check_within_sigmas(mc.second_moment(), norm2 / q, sigma2, "E||C(x)||^2");
  CHECK(mc.second_moment() <= c.alpha() * norm2 + 5.0 * sigma2);
  const double sigma_k = std::sqrt(n * q * (1 - q) / trials);
  gcomp::test::check_within_sigmas(kept / trials, n * q, sigma_k, "kept count");
  CHECK(c.expected_kept(n) == doctest::Approx(n * q));
}

TEST_CASE("the keep probability is the one really used: ceil(p 2^24) / 2^24") {
  gcomp::bernoulli_sparsifier<float> c(1.0 / 3.0);
  const double q = c.keep_probability();
  CHECK(q * 0x1p24 == std::ceil(double(float(1.0 / 3.0)) * 0x1p24));
  CHECK(gcomp::bernoulli_sparsifier<float>(1.0).keep_probability() == 1.0);
  // p = 1 keeps everything, scaled by exactly 1.
  const auto x = wave(100);
  gcomp::bernoulli_sparsifier<float> all(1.0);
  gcomp::sparse_payload<float> m;
  all.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{});
  CHECK(m.size() == 100);
  CHECK(decompressed(all, m, 100) == x);
}

TEST_CASE("per-layer Bernoulli uses each layer's p and never keeps gap elements") {
  const auto lay = gcomp::layout::from_layers({{"b", 2000, 1000, {}}, {"a", 0, 1000, {}}},
                                              gcomp::gaps::allowed);
  const std::vector<double> p = {0.5, 0.1};
  gcomp::bernoulli_sparsifier<float> c(lay, p);
  CHECK(c.alpha() == doctest::Approx(10.0).epsilon(1e-6));
  CHECK(c.expected_kept(3000) == doctest::Approx(600.0).epsilon(1e-6));
  const auto x = wave(3000);
  gcomp::sparse_payload<float> m;
  std::size_t in_a = 0, in_b = 0;
  constexpr int trials = 50;
  for (int t = 0; t < trials; ++t) {
    c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{2, std::uint64_t(t), 0});
    for (std::size_t j = 0; j < m.size(); ++j) {
      const auto i = m.indices[j];
      if (j > 0) REQUIRE(i > m.indices[j - 1]);
      REQUIRE((i < 1000 || i >= 2000));
      if (i < 1000) {
        ++in_a;
        REQUIRE(m.data[j] == x[i] * float(1.0 / c.keep_probability(1)));
      } else {
        ++in_b;
        REQUIRE(m.data[j] == x[i] * float(1.0 / c.keep_probability(0)));
      }
    }
  }
  // Binomial counts, 5 sigma: a ~ Bin(50000, 0.1), b ~ Bin(50000, 0.5).
  gcomp::test::check_within_sigmas(double(in_a), 5000.0, std::sqrt(50000 * 0.1 * 0.9), "kept in a");
  gcomp::test::check_within_sigmas(double(in_b), 25000.0, std::sqrt(50000 * 0.25), "kept in b");
}

TEST_CASE("shared-key Bernoulli keeps the same set on every worker; per-worker does not") {
  const auto x0 = wave(5000, 0.0f), x1 = wave(5000, 1.0f);
  shared_bernoulli s(0.05);
  gcomp::bernoulli_sparsifier<float> own(0.05);
  gcomp::sparse_payload<float> a, b;
  s.compress(gcomp::host_seq{}, std::span<const float>(x0), a, rng_key{1, 5, 0});
  s.compress(gcomp::host_seq{}, std::span<const float>(x1), b, rng_key{1, 5, 9});
  CHECK(a.indices == b.indices);
  own.compress(gcomp::host_seq{}, std::span<const float>(x0), a, rng_key{1, 5, 0});
  own.compress(gcomp::host_seq{}, std::span<const float>(x0), b, rng_key{1, 5, 9});
  CHECK(a.indices != b.indices);
}

TEST_CASE("Bernoulli: host_seq and host_par 1, 2, 3, 7 agree; wire bytes exact; decode is safe") {
  constexpr std::size_t n = 200000;
  const auto x = wave(n);
  const auto lay = gcomp::layout::from_layers({{"a", 0, 120000, {}}, {"b", 120000, 80000, {}}});
  const std::vector<double> p = {0.02, 0.3};
  gcomp::bernoulli_sparsifier<float> c(lay, p);
  const auto ref = gcomp::test::check_same_payload_for_every_policy(
      c, x, rng_key{3, 2, 1}, 0.5f, 0.25f, gcomp::test::reuse::one_compressor,
      [](const auto& m, const auto& r) {
        CHECK(m.indices == r.indices);
        CHECK(m.data == r.data);
      });
  std::vector<std::byte> bytes;
  encode(ref, bytes);
  CHECK(c.wire_bytes(ref) == bytes.size());
  CHECK(bytes.size() == 24 + 8 + ref.size() * 8);

  gcomp::bernoulli_sparsifier<float> small(0.2);
  const auto y = wave(300);
  gcomp::sparse_payload<float> m;
  small.compress(gcomp::host_seq{}, std::span<const float>(y), m, rng_key{});
  encode(m, bytes);
  gcomp::sparse_payload<float> sentinel;
  sentinel.dimension = 4;
  sentinel.indices = {0, 3};
  sentinel.data = {1.0f, -1.0f};
  CHECK(gcomp::test::check_decode_is_safe(bytes, sentinel, 300).rejected > 100);
}

TEST_CASE("Bernoulli rejects bad probabilities and bad input before writing anything") {
  CHECK_THROWS_WITH_AS(gcomp::bernoulli_sparsifier<float>(0.0),
                       "gcomp::bernoulli_sparsifier: p must be in (0, 1], got 0", gcomp::error);
  CHECK_THROWS_AS(gcomp::bernoulli_sparsifier<float>(1.5), gcomp::error);
  CHECK_THROWS_AS(gcomp::bernoulli_sparsifier<float>(std::nan("")), gcomp::error);
  CHECK_THROWS_WITH_AS(gcomp::bernoulli_sparsifier<float>(1e-300),
                       "gcomp::bernoulli_sparsifier: p = 1e-300 rounds to 0 as a float",
                       gcomp::error);
  const std::vector<double> two = {0.5, 0.5}, bad = {0.5, 2.0};
  CHECK_THROWS_WITH_AS(gcomp::bernoulli_sparsifier<float>(gcomp::layout{3}, two),
                       "gcomp::bernoulli_sparsifier: p has size 2 but layout layers has size 1; "
                       "they must match",
                       gcomp::error);
  CHECK_THROWS_WITH_AS(gcomp::bernoulli_sparsifier<float>(gcomp::layout{3, 3}, bad),
                       "gcomp::bernoulli_sparsifier: p[1] must be in (0, 1], got 2", gcomp::error);

  gcomp::bernoulli_sparsifier<float> c(gcomp::layout{3, 3}, two);
  const auto x = wave(7);
  gcomp::sparse_payload<float> m;
  m.dimension = 1;
  m.indices = {0};
  m.data = {3.0f};
  CHECK_THROWS_AS(c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{}),
                  gcomp::error);
  CHECK(m.dimension == 1);
  CHECK(m.indices == std::vector<std::uint32_t>{0});
  std::vector<float> out(6, 1.0f);
  CHECK_THROWS_AS(c.decompress_add(gcomp::host_seq{}, m, std::span<float>(out), 1.0f), gcomp::error);
  CHECK(out == std::vector<float>(6, 1.0f));
}
