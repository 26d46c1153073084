// Tests of compress/natural.hpp: unbiasedness and second moment by Monte Carlo against the exact two-power law (subnormals included), exact powers of two, wire sizes, decode safety, thread-count determinism, per-worker keys, input checks.
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "gcomp/compress/natural.hpp"
#include "compressor_checks.hpp"
#include "gcomp/core/concepts.hpp"
#include "wire_fuzz.hpp"

using gcomp::rng_key;
using gcomp::test::decompressed;
using gcomp::test::wave;

namespace {

constexpr float smallest_normal = 0x1p-126f;

}  // namespace

static_assert(gcomp::compressor<gcomp::natural<float>>);
static_assert(gcomp::compressor<gcomp::natural<float>, gcomp::host_par>);
static_assert(gcomp::compressor_traits<gcomp::natural<float>>::unbiased);

TEST_CASE("natural compression is unbiased with the exact two-power law, subnormals included (5 sigma)") {
  // For |x_i| in [2^e, 2^(e+1)), C_i = sign(x_i) 2^(e+1) with probability
  // p_i = |x_i| / 2^e - 1 (= mantissa / 2^23, exactly what the kernel uses),
  // else sign(x_i) 2^e; a subnormal rounds to 2^-126 with probability
  // |x_i| / 2^-126, else to 0. Independently over i, so with lo_i, hi_i the two
  // magnitudes: Var C_i = p_i (1 - p_i) (hi_i - lo_i)^2, E||C||^2 = sum lo^2 +
  // p (hi^2 - lo^2), Var ||C||^2 = sum p (1 - p) (hi^2 - lo^2)^2. By the
  // Monte-Carlo rule of compressor_checks.hpp (5 sigma, T = 4000 draws) over
  // the n = 240 coordinates and the second moment: below 1.4e-4.
  constexpr std::size_t trials = 4000;
  auto x = wave(200, 0.3f);
  for (int k = 0; k < 20; ++k) x.push_back(std::ldexp(1.0f + 0.05f * float(k), k - 10) * (k % 2 ? -1.0f : 1.0f));
  for (int k = 0; k < 10; ++k) x.push_back(smallest_normal * (0.1f * float(k)) * (k % 3 ? 1.0f : -1.0f));
  x.push_back(0.0f);
  x.push_back(-0.0f);
  x.push_back(std::ldexp(1.0f, 127));  // the largest power of two, exact
  x.push_back(-std::numeric_limits<float>::denorm_min());
  x.push_back(std::nextafter(smallest_normal, 1.0f));
  x.push_back(1.0f - 0x1p-24f);
  x.push_back(3.0f);
  x.push_back(-5.75f);
  x.push_back(0.75f);
  x.push_back(1e30f);
  const std::size_t n = x.size();
  std::vector<double> lo(n), hi(n), p(n);
  double exact2 = 0.0, var2 = 0.0, norm2 = 0.0, sub_l1 = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    const double a = std::fabs(double(x[i]));
    if (a < smallest_normal) {
      lo[i] = 0.0;
      hi[i] = smallest_normal;
      sub_l1 += a;
    } else {
      lo[i] = std::ldexp(1.0, std::ilogb(a));
      hi[i] = 2 * lo[i];
    }
    p[i] = (a - lo[i]) / (hi[i] - lo[i]);
    exact2 += lo[i] * lo[i] + p[i] * (hi[i] * hi[i] - lo[i] * lo[i]);
    var2 += p[i] * (1 - p[i]) * std::pow(hi[i] * hi[i] - lo[i] * lo[i], 2);
    norm2 += a * a;
  }
  gcomp::natural<float> c;
  gcomp::quantized_payload<float> m;
  gcomp::test::monte_carlo mc(n, trials);
  for (std::size_t t = 0; t < trials; ++t) {
    c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{1, t, 3});
    const auto y = decompressed(c, m, n);
    for (std::size_t i = 0; i < n; ++i) {
      const double a = std::fabs(double(y[i]));
      REQUIRE((a == lo[i] || a == hi[i]));
      if (y[i] != 0.0f) REQUIRE(std::signbit(y[i]) == std::signbit(x[i]));
    }
    mc.add_draw(y);
  }
  // Zero and powers of two are sent exactly (variance 0, tolerance 0).
  mc.check_means([&](std::size_t i) { return x[i]; },
                 [&](std::size_t i) { return (hi[i] - lo[i]) * (hi[i] - lo[i]) * p[i] * (1 - p[i]); });
  const double sigma2 = std::sqrt(var2 / trials), mean2 = mc.second_moment();
  gcomp::test::check_within_sigmas(mean2, exact2, sigma2, "E||C(x)||^2");
  // alpha = 9/8 plus the documented subnormal term 2^-126 * sum |x_i| over subnormals.
  CHECK(c.alpha(n) == 9.0 / 8.0);
  CHECK(exact2 <= c.alpha(n) * norm2 + double(smallest_normal) * sub_l1);
  CHECK(mean2 <= c.alpha(n) * norm2 + double(smallest_normal) * sub_l1 + 5.0 * sigma2);
  // The 9/8 is tight: p = 1/3 attains it (|x| = 4/3 2^e).
  const double q = 1.0 / 3.0;
  CHECK((1 + 3 * q) / ((1 + q) * (1 + q)) == doctest::Approx(9.0 / 8.0));
}

TEST_CASE("natural compression sends zero and powers of two exactly; codes are sign and exponent") {
  const std::vector<float> x = {0.0f, 1.0f, -2.0f, 0.5f, smallest_normal, -std::ldexp(1.0f, 127),
                                std::ldexp(1.0f, -100), 0.0f};
  gcomp::natural<float> c;
  gcomp::quantized_payload<float> m;
  for (std::uint64_t step = 0; step < 10; ++step) {
    c.compress(gcomp::host_par(2), std::span<const float>(x), m, rng_key{4, step, 0});
    CHECK(m.bits == 9);
    CHECK(m.bucket == 0);
    CHECK(m.scales.empty());
    CHECK(decompressed(c, m, x.size()) == x);
    CHECK(gcomp::quantized::read_code(m.words.data(), 0, 9) == 0u);
    CHECK(gcomp::quantized::read_code(m.words.data(), 1, 9) == 127u);
    CHECK(gcomp::quantized::read_code(m.words.data(), 2, 9) == (128u | 256u));
    CHECK(gcomp::quantized::read_code(m.words.data(), 4, 9) == 1u);
    CHECK(gcomp::quantized::read_code(m.words.data(), 5, 9) == (254u | 256u));
  }
  // -0 is sent as plain 0.
  const std::vector<float> negzero = {-0.0f};
  c.compress(gcomp::host_seq{}, std::span<const float>(negzero), m, rng_key{});
  CHECK(gcomp::quantized::read_code(m.words.data(), 0, 9) == 0u);
  std::vector<float> out = {2.0f};
  c.decompress_add(gcomp::host_seq{}, m, std::span<float>(out), 3.0f);
  CHECK(out[0] == 2.0f);
}

TEST_CASE("natural compression wire bytes equal the encoding and 9 bits per element; decode survives corruption") {
  gcomp::natural<float> c;
  for (std::size_t n : {1u, 7u, 64u, 65u, 1000u, 5000u}) {
    const auto x = wave(n);
    gcomp::quantized_payload<float> m;
    c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{2, 0, 0});
    std::vector<std::byte> bytes;
    encode(m, bytes);
    CHECK(c.wire_bytes(m) == bytes.size());
    CHECK(bytes.size() == 24 + 17 + (9 * n + 7) / 8);
    CHECK(c.bits_per_element(n) == 8.0 * double(bytes.size()) / double(n));
    gcomp::quantized_payload<float> back;
    decode(bytes, back, n);
    CHECK(back.words == m.words);
    CHECK(decompressed(c, back, n) == decompressed(c, m, n));
  }
  gcomp::quantized_payload<float> m, sentinel;
  c.compress(gcomp::host_seq{}, std::span<const float>(wave(500)), m, rng_key{2, 1, 0});
  c.compress(gcomp::host_seq{}, std::span<const float>(wave(3)), sentinel, rng_key{});
  std::vector<std::byte> bytes;
  encode(m, bytes);
  CHECK(gcomp::test::check_decode_is_safe(bytes, sentinel, 500).rejected > 20);
}

TEST_CASE("natural compression gives the same payload for host_seq and host_par with 1, 2, 3 and 7 threads") {
  constexpr std::size_t n = 300001;
  const auto x = wave(n, 0.7f);
  gcomp::natural<float> c;
  gcomp::test::check_same_payload_for_every_policy(
      c, x, rng_key{1, 4, 2}, 0.5f, 0.25f, gcomp::test::reuse::fresh_per_policy,
      [](const auto& m, const auto& ref) { CHECK(m.words == ref.words); });
}

TEST_CASE("natural compression rounds differently for different workers, steps and seeds") {
  const auto x = wave(4096);
  gcomp::natural<float> c;
  gcomp::test::check_rounding_follows_the_key(c, x, rng_key{5, 1, 0});
}

TEST_CASE("natural compression rejects non-finite and too large input and bad messages before writing") {
  gcomp::natural<float> c;
  gcomp::quantized_payload<float> m;
  c.compress(gcomp::host_seq{}, std::span<const float>(wave(6)), m, rng_key{});
  const auto before = m;
  auto x = wave(200000);
  x[150000] = std::numeric_limits<float>::quiet_NaN();
  x[199999] = 1.5f * std::ldexp(1.0f, 127);
  CHECK_THROWS_WITH_AS(c.compress(gcomp::host_par(3), std::span<const float>(x), m, rng_key{}),
                       "gcomp::natural::compress: gradient[150000] = nan is not finite",
                       gcomp::error);
  x[150000] = 1.0f;
  CHECK_THROWS_WITH_AS(
      c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{}),
      "gcomp::natural::compress: gradient[199999] = 2.55211775e+38 exceeds 2^127 and could round up to infinity",
      gcomp::error);
  gcomp::test::check_quantized_unchanged(m, before);

  gcomp::quantized_payload<float> good;
  c.compress(gcomp::host_seq{}, std::span<const float>(wave(10)), good, rng_key{});
  std::vector<float> out(10, 1.0f), small(9, 1.0f);
  auto bad = good;
  bad.words[0] |= std::uint64_t{0xff} << 18;  // exponent of code 2 = 255
  CHECK_THROWS_AS(c.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f), gcomp::error);
  bad = good;
  bad.words[0] &= ~(std::uint64_t{0x1ff} << 27);
  bad.words[0] |= std::uint64_t{0x100} << 27;  // code 3 = negative zero
  CHECK_THROWS_WITH_AS(
      c.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f),
      "gcomp::natural::decompress_add: code 3 = 256 is invalid (exponent 255, or a negative zero)",
      gcomp::error);
  bad = good;
  bad.scales.push_back(1.0f);
  CHECK_THROWS_AS(c.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f), gcomp::error);
  bad = good;
  bad.bucket = 4;
  CHECK_THROWS_AS(c.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f), gcomp::error);
  bad = good;
  bad.words.push_back(0);
  CHECK_THROWS_AS(c.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f), gcomp::error);
  CHECK_THROWS_AS(c.decompress_add(gcomp::host_seq{}, good, std::span<float>(small), 1.0f), gcomp::error);
  CHECK(out == std::vector<float>(10, 1.0f));
  CHECK(small == std::vector<float>(9, 1.0f));
}
