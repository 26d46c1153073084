// Tests of compress/terngrad.hpp: unbiasedness and second moment by Monte Carlo against the exact ternary law, exact decodes, wire sizes, decode safety, thread-count determinism, per-worker keys, input checks.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "gcomp/compress/terngrad.hpp"
#include "compressor_checks.hpp"
#include "gcomp/core/concepts.hpp"
#include "wire_fuzz.hpp"

using gcomp::rng_key;
using gcomp::test::decompressed;
using gcomp::test::wave;

static_assert(gcomp::compressor<gcomp::terngrad<float>>);
static_assert(gcomp::compressor<gcomp::terngrad<double>, gcomp::host_par, double>);
static_assert(gcomp::compressor_traits<gcomp::terngrad<float>>::unbiased);
static_assert(!gcomp::compressor_traits<gcomp::terngrad<float>>::shared_support);

TEST_CASE("TernGrad is unbiased and its second moment matches the ternary law (5 sigma)") {
  // C(x)_i = sign(x_i) s_t with probability p_i = |x_i| / s_t, else 0,
  // independently over i (s_t = max |x| of i's bucket). So E C_i = x_i,
  // Var C_i = s_t^2 p_i (1 - p_i) = s_t |x_i| - x_i^2, E||C||^2 = sum s_t |x_i|
  // and Var ||C||^2 = sum s_t^4 p_i (1 - p_i). By the Monte-Carlo rule of
  // compressor_checks.hpp (5 sigma, T = 4000 draws) over n = 200 coordinates
  // and the second moment: a false-failure probability below 1.2e-4.
  constexpr std::size_t n = 200, trials = 4000;
  for (std::size_t bucket : {std::size_t{64}, std::size_t{0}}) {
    CAPTURE(bucket);
    gcomp::terngrad<float> c({.bucket = bucket});
    const auto x = wave(n, 0.3f);
    gcomp::quantized_payload<float> m;
    c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{1, 0, 0});
    const std::vector<float> scales = m.scales;
    REQUIRE(scales.size() == (bucket == 0 ? 1u : 4u));
    std::vector<double> st(n), p(n);
    double exact2 = 0.0, var2 = 0.0, norm2 = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
      st[i] = scales[bucket == 0 ? 0 : i / bucket];
      const float pf = std::fabs(x[i]) / float(st[i]);  // the kernel's probability
      p[i] = std::ceil(double(pf) * 0x1p24) * 0x1p-24;  // P(u < pf), u = k 2^-24
      exact2 += p[i] * st[i] * st[i];
      var2 += p[i] * (1 - p[i]) * std::pow(st[i], 4);
      norm2 += double(x[i]) * x[i];
    }
    gcomp::test::monte_carlo mc(n, trials);
    for (std::size_t t = 0; t < trials; ++t) {
      c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{1, t, 3});
      REQUIRE(m.scales == scales);
      const auto y = decompressed(c, m, n);
      for (std::size_t i = 0; i < n; ++i)
        REQUIRE((y[i] == 0.0f || y[i] == (x[i] < 0 ? -float(st[i]) : float(st[i]))));
      mc.add_draw(y);
    }
    mc.check_means([&](std::size_t i) { return x[i]; },
                   [&](std::size_t i) { return st[i] * st[i] * p[i] * (1 - p[i]); },
                   // The bucket's maximum is always sent.
                   [&](std::size_t i) { return 1e-6 * std::fabs(x[i]); });
    const double sigma2 = std::sqrt(var2 / trials), mean2 = mc.second_moment();
    gcomp::test::check_within_sigmas(mean2, exact2, sigma2, "E||C(x)||^2");
    // alpha = sqrt(d): E||C||^2 = s_t ||x||_1 <= sqrt(d) ||x||^2 per bucket.
    const double d = double(bucket == 0 ? n : bucket);
    CHECK(c.alpha(n) == doctest::Approx(std::sqrt(d)));
    CHECK(exact2 <= c.alpha(n) * norm2);
    CHECK(mean2 <= c.alpha(n) * norm2 + 5.0 * sigma2);
  }
}

TEST_CASE("TernGrad sends each bucket's maximum exactly and keeps a zero bucket zero") {
  gcomp::terngrad<float> c({.bucket = 3});
  const std::vector<float> x = {4, -4, 0, 0, 0, 0, -0.5f};
  gcomp::quantized_payload<float> m;
  for (std::uint64_t step = 0; step < 20; ++step) {
    c.compress(gcomp::host_par(2), std::span<const float>(x), m, rng_key{4, step, 1});
    CHECK(m.bits == 2);
    CHECK(m.bucket == 3);
    CHECK(m.scales == std::vector<float>{4.0f, 0.0f, 0.5f});
    CHECK(decompressed(c, m, x.size()) == x);
    CHECK(gcomp::quantized::read_code(m.words.data(), 0, 2) == 1u);
    CHECK(gcomp::quantized::read_code(m.words.data(), 1, 2) == 2u);
    CHECK(gcomp::quantized::read_code(m.words.data(), 6, 2) == 2u);
  }
  std::vector<float> out(x.size(), 1.0f);
  c.decompress_add(gcomp::host_seq{}, m, std::span<float>(out), -0.25f);
  for (std::size_t i = 0; i < x.size(); ++i) CHECK(out[i] == 1.0f - 0.25f * x[i]);
  gcomp::terngrad<float> whole({.bucket = 0});
  whole.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{});
  CHECK(m.scales == std::vector<float>{4.0f});
  CHECK(m.bucket == 0);
}

TEST_CASE("TernGrad wire bytes equal the encoding and the formula; decode survives corruption") {
  for (std::size_t n : {1u, 31u, 32u, 33u, 1000u, 5000u}) {
    for (std::size_t bucket : {std::size_t{0}, std::size_t{512}, std::size_t{100}}) {
      gcomp::terngrad<float> c({.bucket = bucket});
      const auto x = wave(n);
      gcomp::quantized_payload<float> m;
      c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{2, 0, 0});
      std::vector<std::byte> bytes;
      encode(m, bytes);
      const std::size_t scales = bucket == 0 ? 1 : (n + bucket - 1) / bucket;
      CHECK(c.wire_bytes(m) == bytes.size());
      CHECK(bytes.size() == 24 + 17 + 4 * scales + (n * 2 + 7) / 8);
      CHECK(c.bits_per_element(n) == 8.0 * double(bytes.size()) / double(n));
      gcomp::quantized_payload<float> back;
      decode(bytes, back, n);
      CHECK(back.words == m.words);
      CHECK(decompressed(c, back, n) == decompressed(c, m, n));
    }
  }
  gcomp::terngrad<float> c;
  gcomp::quantized_payload<float> m, sentinel;
  c.compress(gcomp::host_seq{}, std::span<const float>(wave(700)), m, rng_key{2, 1, 0});
  c.compress(gcomp::host_seq{}, std::span<const float>(wave(3)), sentinel, rng_key{});
  std::vector<std::byte> bytes;
  encode(m, bytes);
  CHECK(gcomp::test::check_decode_is_safe(bytes, sentinel, 700).rejected > 20);
}

TEST_CASE("TernGrad gives the same payload for host_seq and host_par with 1, 2, 3 and 7 threads") {
  constexpr std::size_t n = 300001;
  const auto x = wave(n, 0.7f);
  for (std::size_t bucket : {std::size_t{500}, std::size_t{512}, std::size_t{0}}) {
    gcomp::terngrad<float> c({.bucket = bucket});
    gcomp::test::check_same_payload_for_every_policy(
        c, x, rng_key{1, 4, 2}, 0.5f, 0.25f, gcomp::test::reuse::one_compressor,
        [](const auto& m, const auto& ref) {
          CHECK(m.scales == ref.scales);
          CHECK(m.words == ref.words);
        });
  }
}

TEST_CASE("TernGrad rounds differently for different workers, steps and seeds") {
  const auto x = wave(4096);
  gcomp::terngrad<float> c;
  gcomp::test::check_rounding_follows_the_key(c, x, rng_key{5, 1, 0});
}

TEST_CASE("TernGrad rejects bad input and bad messages before writing anything") {
  gcomp::terngrad<float> c({.bucket = 4});
  auto x = wave(10);
  gcomp::quantized_payload<float> m;
  c.compress(gcomp::host_seq{}, std::span<const float>(wave(6)), m, rng_key{});
  const auto before = m;
  x[3] = -std::numeric_limits<float>::infinity();
  x[8] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(c.compress(gcomp::host_par(3), std::span<const float>(x), m, rng_key{}),
                       "gcomp::terngrad::compress: gradient[3] = -inf is not finite", gcomp::error);
  gcomp::test::check_quantized_unchanged(m, before);

  gcomp::quantized_payload<float> good;
  c.compress(gcomp::host_seq{}, std::span<const float>(wave(10)), good, rng_key{});
  std::vector<float> out(10, 1.0f);
  auto bad = good;
  bad.words[0] |= std::uint64_t{3} << 10;  // code 5 = 3
  CHECK_THROWS_WITH_AS(c.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f),
                       "gcomp::terngrad::decompress_add: code 5 is 3, which is no ternary value",
                       gcomp::error);
  bad = good;
  bad.scales.push_back(1.0f);
  CHECK_THROWS_AS(c.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f), gcomp::error);
  bad = good;
  bad.bits = 3;
  CHECK_THROWS_AS(c.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f), gcomp::error);
  bad = good;
  bad.scales[2] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_AS(c.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f), gcomp::error);
  CHECK_THROWS_AS(gcomp::terngrad<float>({.bucket = 5})
                      .decompress_add(gcomp::host_seq{}, good, std::span<float>(out), 1.0f),
                  gcomp::error);
  std::vector<float> small(9, 1.0f);
  CHECK_THROWS_AS(c.decompress_add(gcomp::host_seq{}, good, std::span<float>(small), 1.0f),
                  gcomp::error);
  CHECK(out == std::vector<float>(10, 1.0f));
  CHECK(small == std::vector<float>(9, 1.0f));
}
