// Tests of compress/qsgd.hpp: unbiasedness and second moment by Monte Carlo against the exact two-point law, exact decodes on levels, wire sizes, decode safety, thread-count determinism, per-worker keys, input checks.
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "gcomp/compress/qsgd.hpp"
#include "compressor_checks.hpp"
#include "gcomp/core/concepts.hpp"
#include "wire_fuzz.hpp"

using gcomp::rng_key;
using gcomp::test::decompressed;
using gcomp::test::wave;

static_assert(gcomp::compressor<gcomp::qsgd<float>>);
static_assert(gcomp::compressor<gcomp::qsgd<double>, gcomp::host_par, double>);
static_assert(!gcomp::allreducible_compressor<gcomp::qsgd<float>>);
static_assert(gcomp::compressor_traits<gcomp::qsgd<float>>::unbiased);
static_assert(gcomp::wire_payload<gcomp::qsgd<float>::payload>);

TEST_CASE("the batched Philox of the quantizers equals random_bits index by index") {
  for (std::uint64_t first_block : {std::uint64_t{0}, std::uint64_t{5}, std::uint64_t{1} << 33}) {
    const rng_key key = rng_key{0x1234567890abcdefull, (std::uint64_t{3} << 32) + 9, 4}.fork(17);
    std::uint32_t out[64];
    gcomp::detail::philox_blocks<16>(key, first_block, out);
    for (std::size_t t = 0; t < 64; ++t) REQUIRE(out[t] == gcomp::random_bits(key, 4 * first_block + t));
  }
}

TEST_CASE("QSGD is unbiased and its second moment matches the two-point law (5 sigma)") {
  // With r_i = s |x_i| / norm and p_i = r_i - floor(r_i), C(x)_i is
  // sign(x_i) (norm / s) floor(r_i) or sign(x_i) (norm / s) (floor(r_i) + 1),
  // the latter with probability p_i, independently over i. So E C_i = x_i,
  // Var C_i = (norm / s)^2 p_i (1 - p_i), and ||C||^2 is a sum of independent
  // two-point variables: E||C||^2 = sum (lo_i^2 + p_i (hi_i^2 - lo_i^2)),
  // Var ||C||^2 = sum p_i (1 - p_i) (hi_i^2 - lo_i^2)^2.
  // By the Monte-Carlo rule of compressor_checks.hpp (5 sigma, T = 4000
  // draws) over the n = 200 coordinates and the second moment a correct
  // quantizer fails this test with probability below 201 * 5.7e-7 = 1.2e-4.
  constexpr std::size_t n = 200, trials = 4000;
  for (unsigned levels : {1u, 3u, 7u}) {
    CAPTURE(levels);
    gcomp::qsgd<float> c({.levels = levels, .bucket = 64});  // buckets 64, 64, 64, 8
    const auto x = wave(n, 0.3f);
    gcomp::quantized_payload<float> m;
    c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{1, 0, 0});
    const std::vector<float> norms = m.scales;
    REQUIRE(norms.size() == 4);
    std::vector<double> lo(n), hi(n), p(n);
    double exact2 = 0.0, var2 = 0.0, norm2 = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
      const double unit = double(norms[i / 64]) / levels;
      // The kernel's own float arithmetic for r, so p is the exact probability.
      const float r = std::min(std::fabs(x[i]) * (float(levels) / norms[i / 64]), float(levels));
      const float low = std::floor(r);
      lo[i] = double(low) * unit;
      hi[i] = double(low + 1.0f) * unit;
      // P(u < r - low) for u = k 2^-24: ceil((r - low) 2^24) / 2^24.
      p[i] = std::ceil(double(r - low) * 0x1p24) * 0x1p-24;
      exact2 += lo[i] * lo[i] + p[i] * (hi[i] * hi[i] - lo[i] * lo[i]);
      var2 += p[i] * (1 - p[i]) * std::pow(hi[i] * hi[i] - lo[i] * lo[i], 2);
      norm2 += double(x[i]) * x[i];
    }
    gcomp::test::monte_carlo mc(n, trials);
    for (std::size_t t = 0; t < trials; ++t) {
      c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{1, t, 3});
      REQUIRE(m.scales == norms);
      const auto y = decompressed(c, m, n);
      for (std::size_t i = 0; i < n; ++i) {
        const double a = std::fabs(double(y[i]));
        // Every draw is one of the two neighbouring levels, with x's sign.
        REQUIRE((a == doctest::Approx(lo[i]).epsilon(1e-6) || a == doctest::Approx(hi[i]).epsilon(1e-6)));
        if (y[i] != 0.0f) REQUIRE((y[i] < 0) == (x[i] < 0));
      }
      mc.add_draw(y);
    }
    mc.check_means([&](std::size_t i) { return x[i]; },
                   [&](std::size_t i) { return (hi[i] - lo[i]) * (hi[i] - lo[i]) * p[i] * (1 - p[i]); },
                   // Exact levels (p = 0) leave no randomness: the mean is the level itself.
                   [&](std::size_t i) { return 1e-6 * std::fabs(x[i]) + 1e-12; });
    const double sigma2 = std::sqrt(var2 / trials);
    const double mean2 = mc.second_moment();
    gcomp::test::check_within_sigmas(mean2, exact2, sigma2, "E||C(x)||^2");
    // The bound of Alistarh et al. holds for the exact moment and, up to the
    // same 5 sigma slack, for the estimate.
    CHECK(exact2 <= c.alpha(n) * norm2);
    CHECK(mean2 <= c.alpha(n) * norm2 + 5.0 * sigma2);
    CHECK(c.alpha(n) == doctest::Approx(1.0 + std::min(64.0 / (levels * levels), 8.0 / levels)));
  }
}

TEST_CASE("QSGD reproduces values on its levels exactly; a zero bucket stays zero") {
  gcomp::qsgd<float> c({.levels = 7, .bucket = 4});
  // Bucket 0: norm sqrt(36 + 4 + 9) = 7, so s |x| / norm = 6, 2, 3, 0 exactly.
  // Bucket 1: all zeros. Bucket 2: one element, which is its own norm (level s).
  const std::vector<float> x = {6, -2, 3, 0, 0, 0, 0, 0, -0.1f};
  gcomp::quantized_payload<float> m;
  for (std::uint64_t step = 0; step < 20; ++step) {
    c.compress(gcomp::host_par(3), std::span<const float>(x), m, rng_key{4, step, 1});
    CHECK(m.bits == 4);
    CHECK(m.bucket == 4);
    REQUIRE(m.scales.size() == 3);
    CHECK(m.scales[0] == 7.0f);
    CHECK(m.scales[1] == 0.0f);
    CHECK(m.scales[2] == 0.1f);
    CHECK(decompressed(c, m, x.size()) == x);
    // Codes: level | sign << 3; zero levels carry no sign.
    CHECK(gcomp::quantized::read_code(m.words.data(), 0, 4) == 6u);
    CHECK(gcomp::quantized::read_code(m.words.data(), 1, 4) == (2u | 8u));
    for (std::size_t i = 3; i < 8; ++i) CHECK(gcomp::quantized::read_code(m.words.data(), i, 4) == 0u);
    CHECK(gcomp::quantized::read_code(m.words.data(), 8, 4) == (7u | 8u));
  }
  // decompress_add adds scale * C(x) to what out holds.
  std::vector<float> out(x.size(), 1.0f);
  c.decompress_add(gcomp::host_seq{}, m, std::span<float>(out), 0.5f);
  for (std::size_t i = 0; i < x.size(); ++i) CHECK(out[i] == 1.0f + 0.5f * x[i]);
  // One norm over the whole buffer (bucket 0) and double elements.
  gcomp::qsgd<double> whole({.levels = 3, .bucket = 0});
  const std::vector<double> y = {0, 0, 0, 0, 0};
  gcomp::quantized_payload<double> md;
  whole.compress(gcomp::host_seq{}, std::span<const double>(y), md, rng_key{});
  CHECK(md.scales == std::vector<double>{0.0});
  CHECK(decompressed<gcomp::qsgd<double>, double>(whole, md, 5) == y);
  const std::vector<double> z = {3, 0, -4};  // norm 5, s = 3: only the levels 0 and 3 are exact
  whole.compress(gcomp::host_seq{}, std::span<const double>(z), md, rng_key{});
  CHECK(md.scales == std::vector<double>{5.0});
  CHECK(md.bits == 3);
}

TEST_CASE("QSGD wire bytes equal the encoding and the formula; decode survives corruption") {
  for (unsigned levels : {1u, 7u, 255u}) {
    const unsigned bits = unsigned(std::popcount(levels)) + 1;
    for (std::size_t n : {1u, 63u, 64u, 1000u, 5000u}) {
      for (std::size_t bucket : {std::size_t{0}, std::size_t{512}, std::size_t{100}}) {
        gcomp::qsgd<float> c({.levels = levels, .bucket = bucket});
        const auto x = wave(n);
        gcomp::quantized_payload<float> m;
        c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{2, 0, 0});
        std::vector<std::byte> bytes;
        encode(m, bytes);
        const std::size_t scales = bucket == 0 ? 1 : (n + bucket - 1) / bucket;
        CHECK(c.wire_bytes(m) == bytes.size());
        CHECK(bytes.size() == 24 + 17 + 4 * scales + gcomp::wire::packed_bytes(n, bits));
        CHECK(c.bits_per_element(n) == 8.0 * double(bytes.size()) / double(n));
        gcomp::quantized_payload<float> back;
        decode(bytes, back, n);
        CHECK(back.words == m.words);
        CHECK(decompressed(c, back, n) == decompressed(c, m, n));
      }
    }
  }
  gcomp::qsgd<float> c({.levels = 7, .bucket = 64});
  const auto x = wave(300);
  gcomp::quantized_payload<float> m;
  c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{2, 1, 0});
  std::vector<std::byte> bytes;
  encode(m, bytes);
  gcomp::quantized_payload<float> sentinel;
  c.compress(gcomp::host_seq{}, std::span<const float>(wave(3)), sentinel, rng_key{});
  const auto outcomes = gcomp::test::check_decode_is_safe(bytes, sentinel, 300);
  CHECK(outcomes.rejected > 20);
}

TEST_CASE("QSGD gives the same payload for host_seq and host_par with 1, 2, 3 and 7 threads") {
  constexpr std::size_t n = 300001;
  const auto x = wave(n, 0.7f);
  for (std::size_t bucket : {std::size_t{500}, std::size_t{512}, std::size_t{0}}) {
    gcomp::qsgd<float> c({.levels = 15, .bucket = bucket});
    gcomp::test::check_same_payload_for_every_policy(
        c, x, rng_key{1, 4, 2}, 0.5f, 0.25f, gcomp::test::reuse::one_compressor,
        [](const auto& m, const auto& ref) {
          CHECK(m.scales == ref.scales);
          CHECK(m.words == ref.words);
        });
  }
}

TEST_CASE("QSGD rounds differently for different workers, steps and seeds") {
  constexpr std::size_t n = 4096;
  const auto x = wave(n);
  gcomp::qsgd<float> c({.levels = 3, .bucket = 512});
  gcomp::test::check_rounding_follows_the_key(c, x, rng_key{5, 1, 0});
}

TEST_CASE("QSGD rejects bad options and bad input before writing anything") {
  for (unsigned levels : {0u, 2u, 6u, 65535u, 1000u})
    CHECK_THROWS_WITH_AS(gcomp::qsgd<float>({.levels = levels}),
                         ("gcomp::qsgd: options.levels = " + std::to_string(levels) +
                          " must be 2^b - 1 with b in [1, 15] (1, 3, 7, ..., 32767)")
                             .c_str(),
                         gcomp::error);
  CHECK(gcomp::qsgd<float>({.levels = 32767}).bits() == 16);
  CHECK(gcomp::qsgd<float>({.levels = 1}).bits() == 2);

  gcomp::qsgd<float> c({.levels = 7, .bucket = 4});
  auto x = wave(10);
  gcomp::quantized_payload<float> m;
  c.compress(gcomp::host_seq{}, std::span<const float>(wave(6)), m, rng_key{});
  const auto before = m;
  x[7] = std::numeric_limits<float>::quiet_NaN();
  x[9] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH_AS(c.compress(gcomp::host_par(2), std::span<const float>(x), m, rng_key{}),
                       "gcomp::qsgd::compress: gradient[7] = nan is not finite", gcomp::error);
  x[7] = 1.0f;
  CHECK_THROWS_WITH_AS(c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{}),
                       "gcomp::qsgd::compress: gradient[9] = inf is not finite", gcomp::error);
  gcomp::test::check_quantized_unchanged(m, before);

  // decompress_add checks the message against out and the compressor.
  gcomp::quantized_payload<float> good;
  c.compress(gcomp::host_seq{}, std::span<const float>(wave(10)), good, rng_key{});
  std::vector<float> out(10, 1.0f), small(9, 1.0f);
  CHECK_THROWS_WITH_AS(c.decompress_add(gcomp::host_seq{}, good, std::span<float>(small), 1.0f),
                       "gcomp::qsgd::decompress_add: message dimension is 10 but out has size 9",
                       gcomp::error);
  CHECK_THROWS_WITH_AS(
      gcomp::qsgd<float>({.levels = 3, .bucket = 4})
          .decompress_add(gcomp::host_seq{}, good, std::span<float>(out), 1.0f),
      "gcomp::qsgd::decompress_add: message.bits = 4 but this compressor sends 3 bits", gcomp::error);
  CHECK_THROWS_WITH_AS(
      gcomp::qsgd<float>({.levels = 7, .bucket = 5})
          .decompress_add(gcomp::host_seq{}, good, std::span<float>(out), 1.0f),
      "gcomp::qsgd::decompress_add: message.bucket = 4 but this compressor uses buckets of 5",
      gcomp::error);
  auto bad = good;
  bad.scales.pop_back();
  CHECK_THROWS_AS(c.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f), gcomp::error);
  bad = good;
  bad.words.pop_back();
  CHECK_THROWS_AS(c.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f), gcomp::error);
  bad = good;
  bad.scales[1] = -1.0f;
  CHECK_THROWS_WITH_AS(
      c.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f),
      "gcomp::qsgd::decompress_add: message.scales[1] = -1 must be finite and >= 0", gcomp::error);
  bad.scales[1] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(c.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f), gcomp::error);
  CHECK(out == std::vector<float>(10, 1.0f));
  CHECK(small == std::vector<float>(9, 1.0f));
}

TEST_CASE("QSGD codes buckets with a subnormal norm correctly (s / norm would overflow)") {
  // Bucket 0 holds subnormal floats and zeros: its norm is about 1.3e-40, and
  // 7 / norm is not a float. Bucket 1 is ordinary and must be unaffected.
  const std::vector<float> x = {1e-40f, 0.0f, -5e-41f, 0.0f, 3.0f, 0.0f, -4.0f, 0.0f};
  for (unsigned levels : {1u, 7u, 32767u}) {
    CAPTURE(levels);
    gcomp::qsgd<float> c({.levels = levels, .bucket = 4});
    gcomp::quantized_payload<float> m;
    const int draws = 4000;
    std::vector<double> mean(x.size(), 0.0);
    for (int t = 0; t < draws; ++t) {
      c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{9, std::uint64_t(t), 0});
      const auto y = decompressed(c, m, x.size());
      const float norm = m.scales[0];
      for (std::size_t i = 0; i < x.size(); ++i) {
        REQUIRE(std::isfinite(y[i]));
        const std::uint32_t code = gcomp::quantized::read_code(m.words.data(), i, m.bits);
        REQUIRE((code & ((1u << (m.bits - 1)) - 1)) <= levels);  // a level, never garbage
        if (x[i] == 0.0f) REQUIRE(y[i] == 0.0f);                 // zeros stay zero
        if (i < 4 && x[i] != 0.0f) REQUIRE(std::fabs(y[i]) <= 1.0001f * norm);
        mean[i] += y[i];
      }
    }
    // Unbiased on the subnormal bucket up to the decoder's rounding: |mean - x|
    // within 5 sigma, sigma <= norm / (2 sqrt(draws)) per coordinate (a
    // two-point law on one level step of norm / s <= norm; false-failure
    // chance < 6e-7 per coordinate), plus the bias of decoding l * (norm / s)
    // in float: norm / s and the product each round by at most 2^-150 in the
    // subnormal range, so at most (s + 1) 2^-150.
    const double norm = std::sqrt(1e-80 + 25e-82);
    const double rounding = (double(levels) + 1.0) * std::ldexp(1.0, -150);
    for (std::size_t i : {0u, 2u})
      CHECK(std::fabs(mean[i] / draws - double(x[i])) <=
            5.0 * norm / (2.0 * std::sqrt(double(draws))) + rounding);
    // The ordinary bucket decodes to its exact levels when they are exact.
    if (levels == 1 || levels == 7) {
      CHECK(std::fabs(mean[4] / draws - 3.0) < 0.2);
      CHECK(std::fabs(mean[6] / draws + 4.0) < 0.2);
    }
  }
}
