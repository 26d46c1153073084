// Tests of gcomp/core/random.hpp: Philox known answers, distributions, stream independence, order independence.
#include <doctest/doctest.h>

#include <gcomp/core/random.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

namespace {

using gcomp::rng_key;
using gcomp::u32x2;
using gcomp::u32x4;

constexpr bool same(const u32x4& a, const u32x4& b) {
  return a.v[0] == b.v[0] && a.v[1] == b.v[1] && a.v[2] == b.v[2] && a.v[3] == b.v[3];
}

// Critical values for a test that wrongly rejects a good generator with probability
// 1e-6, computed with mpmath: chi2 upper quantile = root of gammainc(k/2, x/2, inf,
// regularized=True) = 1e-6; KS = root of the Kolmogorov tail 2 sum (-1)^(j-1) e^(-2 j^2 x^2).
constexpr double chi2_crit_99 = 180.792;     // 99 degrees of freedom
constexpr double chi2_crit_1023 = 1252.581;  // 1023 degrees of freedom
constexpr double ks_crit_sqrt_n = 2.69339;   // sqrt(n) * D
constexpr int draws = 1'000'000;

double chi_square_uniform(const rng_key& key, int n, int bins) {
  std::vector<long> count(static_cast<std::size_t>(bins), 0);
  for (int i = 0; i < n; ++i) {
    const float u = gcomp::uniform(key, static_cast<std::uint64_t>(i));
    ++count[static_cast<std::size_t>(static_cast<double>(u) * bins)];  // double: u < 1 keeps the bin < bins
  }
  const double expected = static_cast<double>(n) / bins;
  double chi2 = 0;
  for (long c : count) chi2 += (c - expected) * (c - expected) / expected;
  return chi2;
}

// Pairs (offset + 2j, offset + 2j + 1) are disjoint, so under the null hypothesis the
// 2D counts are multinomial and chi-square applies; offset 1 makes pairs straddle
// word (1,2), (3, next block's 0) boundaries.
double chi_square_pairs(const rng_key& key, int pairs, int side, std::uint64_t offset) {
  std::vector<long> count(static_cast<std::size_t>(side * side), 0);
  for (int j = 0; j < pairs; ++j) {
    const std::uint64_t i = offset + 2 * static_cast<std::uint64_t>(j);
    const auto a = static_cast<int>(gcomp::uniform(key, i) * static_cast<float>(side));
    const auto b = static_cast<int>(gcomp::uniform(key, i + 1) * static_cast<float>(side));
    ++count[static_cast<std::size_t>(a * side + b)];
  }
  const double expected = static_cast<double>(pairs) / (side * side);
  double chi2 = 0;
  for (long c : count) chi2 += (c - expected) * (c - expected) / expected;
  return chi2;
}

std::vector<std::uint32_t> words(const rng_key& key, int n) {
  std::vector<std::uint32_t> out(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) out[static_cast<std::size_t>(i)] = gcomp::random_bits(key, static_cast<std::uint64_t>(i));
  return out;
}

// Equal words at equal indices; two good streams agree with probability 2^-32 per word.
int equal_at_same_index(const std::vector<std::uint32_t>& x, const std::vector<std::uint32_t>& y) {
  int equal = 0;
  for (std::size_t i = 0; i < x.size(); ++i) equal += x[i] == y[i];
  return equal;
}

// Words of y found anywhere in x (x sorted): catches a stream that is a shifted copy of
// another. For good streams of n words the count is Poisson with mean n^2 / 2^32.
int shared_words(const std::vector<std::uint32_t>& x_sorted, const std::vector<std::uint32_t>& y) {
  int found = 0;
  for (std::uint32_t w : y) found += std::binary_search(x_sorted.begin(), x_sorted.end(), w);
  return found;
}

// Pearson correlation of the uniforms (as uniform() makes them) at equal indices.
double correlation(const std::vector<std::uint32_t>& x, const std::vector<std::uint32_t>& y) {
  double sa = 0, sb = 0, saa = 0, sbb = 0, sab = 0;
  const double n = static_cast<double>(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double a = gcomp::detail::bits_to_unit_float(x[i]);
    const double b = gcomp::detail::bits_to_unit_float(y[i]);
    sa += a, sb += b, saa += a * a, sbb += b * b, sab += a * b;
  }
  const double cov = sab / n - sa / n * sb / n;
  return cov / std::sqrt((saa / n - sa / n * sa / n) * (sbb / n - sb / n * sb / n));
}

// The 32-bit pattern of a float, so that comparisons are bitwise (NaN-proof, -0 aware).
std::uint32_t bits_of(float f) { return std::bit_cast<std::uint32_t>(f); }

}  // namespace

// Known answers: the three "philox4x32 10" rows of Random123's tests/kat_vectors, as
// cut and pasted into DEShawResearch/Random123-Boost libs/random/test/test_philox.cpp
// (commit 916db91a, test_kat_philox4x32). Format: counter[4] key[2] -> output[4].
static_assert(same(gcomp::philox4x32_10(u32x4{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}},
                                        u32x2{{0xa4093822u, 0x299f31d0u}}),
                   u32x4{{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}}),
              "Philox4x32-10 must match Random123's known answer at compile time");
static_assert(rng_key{1, 2, 3}.shared().worker == rng_key::shared_worker);
static_assert(rng_key{1, 2, 3}.fork(7).step == 2 && rng_key{1, 2, 3}.fork(7).worker == 3);

TEST_CASE("philox4x32_10 matches Random123's known-answer vectors") {
  struct kat {
    u32x4 counter;
    u32x2 key;
    u32x4 expected;
  };
  const kat kats[] = {
      {{{0x00000000u, 0x00000000u, 0x00000000u, 0x00000000u}},
       {{0x00000000u, 0x00000000u}},
       {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}}},
      {{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}},
       {{0xffffffffu, 0xffffffffu}},
       {{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}}},
      {{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}},
       {{0xa4093822u, 0x299f31d0u}},
       {{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}}},
  };
  for (const kat& k : kats) {
    const u32x4 got = gcomp::philox4x32_10(k.counter, k.key);
    for (int j = 0; j < 4; ++j) CHECK(got.v[j] == k.expected.v[j]);
  }
}

TEST_CASE("random_block follows the documented counter/key mapping") {
  const rng_key key{0x0123456789abcdefull, 0xfedcba9876543210ull, 42u};
  const std::uint64_t block = 0x1122334455667788ull;
  const u32x4 expected = gcomp::philox4x32_10(
      u32x4{{0x55667788u, 0x11223344u, 0x76543210u, 42u}}, u32x2{{0x89abcdefu, 0x01234567u ^ 0xfedcba98u}});
  CHECK(same(gcomp::random_block(key, block), expected));

  // The documented aliasing for steps >= 2^32: it only renames seeds.
  const std::uint64_t d = 5ull << 32;
  CHECK(same(gcomp::random_block(rng_key{7, 3 + d, 1}, 9), gcomp::random_block(rng_key{7 ^ d, 3, 1}, 9)));

  // random_bits / uniform4 / normal4 read the same block words as the per-index functions.
  for (std::uint64_t b = 0; b < 64; ++b) {
    const u32x4 w = gcomp::random_block(key, b);
    float u[4], z[4];
    gcomp::uniform4(key, b, u);
    gcomp::normal4(key, b, z);
    for (std::uint64_t j = 0; j < 4; ++j) {
      CHECK(gcomp::random_bits(key, 4 * b + j) == w.v[j]);
      CHECK(bits_of(u[j]) == bits_of(gcomp::uniform(key, 4 * b + j)));
      CHECK(bits_of(z[j]) == bits_of(gcomp::normal(key, 4 * b + j)));
    }
  }
}

TEST_CASE("uniform passes a 100-bin chi-square test (reject at p = 1e-6)") {
  const rng_key base{20240601, 17, 3};
  const rng_key keys[] = {base, base.shared(), base.fork(1), rng_key{}};
  for (const rng_key& key : keys) {
    const double chi2 = chi_square_uniform(key, draws, 100);
    INFO("seed " << key.seed << " worker " << key.worker << " chi2 " << chi2);
    CHECK(chi2 < chi2_crit_99);
  }
}

TEST_CASE("consecutive uniforms pass a 32x32 serial-pair chi-square test (reject at p = 1e-6)") {
  const rng_key key{99, 4, 0};
  for (std::uint64_t offset : {0ull, 1ull}) {
    const double chi2 = chi_square_pairs(key, draws / 2, 32, offset);
    INFO("offset " << offset << " chi2 " << chi2);
    CHECK(chi2 < chi2_crit_1023);
  }
}

TEST_CASE("uniform_double lies in [0, 1) and has mean 1/2") {
  const rng_key key{5, 6, 7};
  const int n = 200'000;
  double sum = 0;
  int outside = 0;
  for (int i = 0; i < n; ++i) {
    const double u = gcomp::uniform_double(key, static_cast<std::uint64_t>(i));
    outside += !(u >= 0.0 && u < 1.0);
    sum += u;
  }
  CHECK(outside == 0);
  // sd of the mean of n U(0,1) is sqrt(1/12/n) ~ 6.5e-4; allow 5 sd.
  CHECK(std::abs(sum / n - 0.5) < 5 * std::sqrt(1.0 / 12.0 / n));
}

TEST_CASE("normal has mean 0, variance 1, normal tails, and passes Kolmogorov-Smirnov") {
  const rng_key key{314159, 2, 1};
  std::vector<double> z(draws);
  double sum = 0, sum_sq = 0;
  long beyond3 = 0, beyond4 = 0, not_finite = 0;
  for (int i = 0; i < draws; ++i) {
    const double x = gcomp::normal(key, static_cast<std::uint64_t>(i));
    not_finite += !std::isfinite(x);
    z[static_cast<std::size_t>(i)] = x;
    sum += x;
    sum_sq += x * x;
    beyond3 += std::abs(x) > 3.0;
    beyond4 += std::abs(x) > 4.0;
  }
  REQUIRE(not_finite == 0);
  const double n = draws;
  const double mean = sum / n;
  const double variance = sum_sq / n - mean * mean;
  // sd(mean) = 1/sqrt(n) = 1e-3; sd(sample variance) = sqrt(2/n) ~ 1.414e-3 for N(0,1).
  CHECK(std::abs(mean) < 5.0 / std::sqrt(n));
  CHECK(std::abs(variance - 1.0) < 5.0 * std::sqrt(2.0 / n));

  // P(|Z| > 3) = 2.69980e-3 and P(|Z| > 4) = 6.33425e-5; binomial counts within 5 sd.
  for (const auto& tail : {std::pair{beyond3, 2.69979606e-3}, std::pair{beyond4, 6.33424837e-5}}) {
    const double count = static_cast<double>(tail.first), p = tail.second;  // no structured binding: older clang cannot capture it in INFO
    INFO("count " << count << " expected " << n * p);
    CHECK(std::abs(count - n * p) < 5.0 * std::sqrt(n * p * (1 - p)));
  }

  // KS: D = sup |F_n - Phi|; reject when sqrt(n) D exceeds the 1e-6 Kolmogorov quantile.
  std::sort(z.begin(), z.end());
  double d = 0;
  for (std::size_t i = 0; i < z.size(); ++i) {
    const double phi = 0.5 * std::erfc(-z[i] / std::sqrt(2.0));
    d = std::max({d, std::abs(static_cast<double>(i + 1) / n - phi), std::abs(phi - static_cast<double>(i) / n)});
  }
  INFO("sqrt(n) D = " << std::sqrt(n) * d);
  CHECK(std::sqrt(n) * d < ks_crit_sqrt_n);
}

TEST_CASE("bernoulli frequency matches p; p = 0 never and p = 1 always fires") {
  const rng_key key{8, 9, 10};
  const int n = 200'000;
  for (float p : {0.001f, 0.1f, 0.5f, 0.9f, 0.999f}) {
    long hits = 0;
    for (int i = 0; i < n; ++i) hits += gcomp::bernoulli(key, static_cast<std::uint64_t>(i), p);
    INFO("p " << p << " hits " << hits);
    CHECK(std::abs(hits - n * static_cast<double>(p)) < 5.0 * std::sqrt(n * p * (1.0 - p)));
  }
  long zero = 0, one = 0, negative = 0, above = 0, nan = 0;
  for (int i = 0; i < n; ++i) {
    const auto idx = static_cast<std::uint64_t>(i);
    zero += gcomp::bernoulli(key, idx, 0.0f);
    one += gcomp::bernoulli(key, idx, 1.0f);
    negative += gcomp::bernoulli(key, idx, -0.5f);
    above += gcomp::bernoulli(key, idx, 2.0f);
    nan += gcomp::bernoulli(key, idx, std::nanf(""));
  }
  CHECK(zero == 0);
  CHECK(one == n);
  CHECK(negative == 0);
  CHECK(above == n);
  CHECK(nan == 0);
}

TEST_CASE("different workers, steps, seeds and fork tags give unrelated streams") {
  const rng_key base{12345, 10, 0};
  const std::uint64_t high = 1ull << 32;
  const rng_key keys[] = {
      base,
      rng_key{12345, 10, 1},
      rng_key{12345, 10, 2},
      rng_key{12345, 10, 7},
      base.shared(),
      rng_key{12345, 11, 0},
      rng_key{12345, 9, 0},
      rng_key{12345, 10 + high, 0},
      rng_key{12346, 10, 0},
      // Not 12345 + high: with step 10 + high that is the documented alias (see random_block).
      rng_key{12345 + 3 * high, 10, 0},
      rng_key{0, 0, 0},
      base.fork(0),
      base.fork(1),
      base.fork(2),
      base.fork(1).fork(1),
      rng_key{12345, 11, 0}.fork(1),
  };
  const int n = 1 << 14;
  const std::size_t count = std::size(keys);
  std::vector<std::vector<std::uint32_t>> stream(count), sorted(count);
  for (std::size_t a = 0; a < count; ++a) {
    stream[a] = words(keys[a], n);
    sorted[a] = stream[a];
    std::sort(sorted[a].begin(), sorted[a].end());
  }
  for (std::size_t a = 0; a < count; ++a) {
    for (std::size_t b = a + 1; b < count; ++b) {
      INFO("keys " << a << " and " << b);
      // Expected equal words 2^14 / 2^32 ~ 4e-6; shared words Poisson(2^28 / 2^32 = 1/16).
      CHECK(equal_at_same_index(stream[a], stream[b]) <= 1);
      CHECK(shared_words(sorted[a], stream[b]) <= 4);
      // sd of a correlation of n independent pairs is 1/sqrt(n); allow 5 sd.
      CHECK(std::abs(correlation(stream[a], stream[b])) < 5.0 / std::sqrt(static_cast<double>(n)));
    }
  }
  // Forking is deterministic: the same tag gives the same key.
  CHECK(base.fork(3).seed == base.fork(3).seed);
  CHECK(base.fork(3).seed != base.fork(4).seed);
}

TEST_CASE("shared() gives the same stream on every worker") {
  const rng_key on0{777, 5, 0}, on1{777, 5, 1}, on9{777, 5, 9};
  CHECK(on0.shared().worker == rng_key::shared_worker);
  int differ = 0;
  for (std::uint64_t i = 0; i < 4096; ++i) {
    const std::uint32_t w = gcomp::random_bits(on0.shared(), i);
    differ += gcomp::random_bits(on1.shared(), i) != w;
    differ += gcomp::random_bits(on9.shared(), i) != w;
    differ += gcomp::random_bits(on9.shared().fork(2), i) != gcomp::random_bits(on0.shared().fork(2), i);
  }
  CHECK(differ == 0);
  CHECK(equal_at_same_index(words(on0.shared(), 4096), words(on0, 4096)) <= 1);
}

TEST_CASE("values depend only on (key, index): reverse and multi-threaded shuffled order agree bitwise") {
  const rng_key key{2718281828ull, 123, 4};
  const std::size_t n = 1 << 16;
  struct sample {
    std::uint32_t bits, u, uo, z;
    double ud;
    bool b;
    bool operator==(const sample&) const = default;
  };
  auto draw = [&](std::uint64_t i) {
    return sample{gcomp::random_bits(key, i),        bits_of(gcomp::uniform(key, i)),
                  bits_of(gcomp::uniform_open(key, i)), bits_of(gcomp::normal(key, i)),
                  gcomp::uniform_double(key, i),       gcomp::bernoulli(key, i, 0.3f)};
  };
  // Large indices too, so the high counter word is exercised.
  auto index = [](std::size_t j) { return j % 2 == 0 ? j : (std::uint64_t{1} << 40) + j; };

  std::vector<sample> forward(n), reverse(n), threaded(n);
  for (std::size_t j = 0; j < n; ++j) forward[j] = draw(index(j));
  for (std::size_t j = n; j-- > 0;) reverse[j] = draw(index(j));

  std::vector<std::size_t> order(n);
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::shuffle(order.begin(), order.end(), std::mt19937_64{42});
  const std::size_t threads = 4;
  std::vector<std::thread> pool;
  for (std::size_t t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (std::size_t k = t; k < n; k += threads) threaded[order[k]] = draw(index(order[k]));
    });
  for (auto& th : pool) th.join();

  CHECK(std::equal(forward.begin(), forward.end(), reverse.begin()));
  CHECK(std::equal(forward.begin(), forward.end(), threaded.begin()));
}

TEST_CASE("uniform never returns 1 and uniform_open never returns 0") {
  using gcomp::detail::bits_to_unit_float;
  using gcomp::detail::bits_to_unit_float_open;
  // The edge words, directly.
  CHECK(bits_to_unit_float(0u) == 0.0f);
  CHECK(bits_to_unit_float(0xFFFFFFFFu) < 1.0f);
  CHECK(bits_to_unit_float(0xFFFFFFFFu) == 1.0f - 0x1p-24f);
  CHECK(bits_to_unit_float_open(0u) == 0x1p-24f);
  CHECK(bits_to_unit_float_open(0xFFFFFFFFu) == 1.0f);
  CHECK(gcomp::detail::bits_to_unit_double(~std::uint64_t{0}) < 1.0);
  CHECK(gcomp::detail::bits_to_unit_double_open32(0u) > 0.0);

  // Exactness: every value is (bits >> 8) / 2^24 with no rounding, over a sweep of words.
  int inexact = 0;
  for (std::uint64_t b = 0; b <= 0xFFFFFFFFull; b += 0x10001ull) {
    const auto w = static_cast<std::uint32_t>(b);
    inexact += static_cast<std::uint32_t>(bits_to_unit_float(w) * 0x1p24f) != (w >> 8);
    inexact += static_cast<std::uint32_t>(bits_to_unit_float_open(w) * 0x1p24f) != (w >> 8) + 1u;
  }
  CHECK(inexact == 0);

  // And through the public functions.
  const rng_key key{1, 1, 1};
  int outside = 0;
  for (std::uint64_t i = 0; i < 200'000; ++i) {
    const float u = gcomp::uniform(key, i), uo = gcomp::uniform_open(key, i);
    outside += !(u >= 0.0f && u < 1.0f);
    outside += !(uo > 0.0f && uo <= 1.0f);
  }
  CHECK(outside == 0);
}
