// Tests of compress/grid_round.hpp: exact grid points against a naive rounding, the epsilon bound and its tightness, codes at the range ends, wire sizes, decode safety, thread-count determinism, refused inputs and options.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "compressor_checks.hpp"
#include "gcomp/compress/grid_round.hpp"
#include "gcomp/core/concepts.hpp"
#include "wire_fuzz.hpp"

using gcomp::rng_key;
using gcomp::test::decompressed;
using gcomp::test::wave;

static_assert(gcomp::compressor<gcomp::grid_round<float>>);
static_assert(gcomp::compressor<gcomp::grid_round<double>, gcomp::host_par, double>);
static_assert(!gcomp::compressor_traits<gcomp::grid_round<float>>::unbiased);
static_assert(!gcomp::compressor_traits<gcomp::grid_round<float>>::shared_support);

namespace {

// The naive oracle: Delta * round(v / Delta) in double, then to T, added to
// a zero as decompress_add does (so -0 comes out as +0).
template <class T>
std::vector<T> naive_round(const std::vector<T>& v, double spacing) {
  std::vector<T> q(v.size());
  for (std::size_t i = 0; i < v.size(); ++i)
    q[i] = T(0) + T(std::round(double(v[i]) / spacing) * spacing);
  return q;
}

double distance(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
  return std::sqrt(s);
}

}  // namespace

TEST_CASE("grid_round sends the nearest grid point of every element, bit for bit as a naive rounding") {
  for (double spacing : {0.25, 0.01, 3.0}) {
    for (std::size_t n : {1u, 63u, 64u, 65u, 1000u}) {
      CAPTURE(spacing);
      CAPTURE(n);
      gcomp::grid_round<float> c({.spacing = spacing, .bits = 12});
      std::vector<float> x = wave(n, 0.2f);
      for (float& v : x) v *= 7.0f;
      gcomp::quantized_payload<float> m;
      c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{1, 2, 3});
      CHECK(m.bits == 12);
      CHECK(m.bucket == 0);
      CHECK(m.scales == std::vector<float>{float(spacing)});
      CHECK(gcomp::test::same_bits(decompressed(c, m, n), naive_round(x, double(float(spacing)))));
      // Deterministic: the key plays no part.
      gcomp::quantized_payload<float> other;
      c.compress(gcomp::host_seq{}, std::span<const float>(x), other, rng_key{9, 9, 9});
      CHECK(other.words == m.words);
    }
  }
  // Doubles, and decompress_add adds scale * Q(x) to what out holds.
  gcomp::grid_round<double> d({.spacing = 0.5, .bits = 4});
  const std::vector<double> y = {0.2, 0.25, -0.25, 0.74, -3.2, 3.5};
  gcomp::quantized_payload<double> md;
  d.compress(gcomp::host_seq{}, std::span<const double>(y), md, rng_key{});
  CHECK(decompressed<gcomp::grid_round<double>, double>(d, md, y.size()) ==
        std::vector<double>{0.0, 0.5, -0.5, 0.5, -3.0, 3.5});  // ties go away from zero
  std::vector<double> out(y.size(), 1.0);
  d.decompress_add(gcomp::host_seq{}, md, std::span<double>(out), -2.0);
  CHECK(out == std::vector<double>{1.0, 0.0, 2.0, 0.0, 7.0, -6.0});
}

TEST_CASE("grid_round is an epsilon-compressor: ||Q(v) - v|| <= Delta sqrt(d) / 2, and the bound is tight") {
  constexpr std::size_t n = 4000;
  const double spacing = 0.125;  // a power of two: v / Delta and Delta * n_i are exact
  gcomp::grid_round<float> c({.spacing = spacing, .bits = 10});
  CHECK(c.epsilon(n) == doctest::Approx(spacing * std::sqrt(double(n)) / 2.0).epsilon(1e-15));
  // Generic inputs: every element within Delta / 2, the whole within epsilon.
  const auto x = wave(n, 1.1f);
  gcomp::quantized_payload<float> m;
  c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{});
  const auto q = decompressed(c, m, n);
  for (std::size_t i = 0; i < n; ++i) REQUIRE(std::fabs(double(q[i]) - x[i]) <= spacing / 2);
  CHECK(distance(q, x) <= c.epsilon(n));
  // Inputs just off the midpoints between grid points reach the bound:
  // v_i = Delta (j + 1/2) - 2^-20 is rounded down by Delta / 2 - 2^-20.
  std::vector<float> worst(n);
  for (std::size_t i = 0; i < n; ++i)
    worst[i] = float(spacing * (double(i % 17) - 8.0 + 0.5)) - float(std::ldexp(1.0, -20));
  c.compress(gcomp::host_seq{}, std::span<const float>(worst), m, rng_key{});
  const double e = distance(decompressed(c, m, n), worst);
  CHECK(e <= c.epsilon(n));
  CHECK(e >= (1.0 - 1e-4) * c.epsilon(n));
}

TEST_CASE("grid_round codes cover exactly [-2^(b-1), 2^(b-1) - 1] and refuse what lies outside") {
  for (unsigned bits : {2u, 5u, 16u}) {
    CAPTURE(bits);
    gcomp::grid_round<float> c({.spacing = 1.0, .bits = bits});
    const float lo = float(c.lowest_level()), hi = float(c.highest_level());
    CHECK(lo == -std::ldexp(1.0f, int(bits) - 1));
    CHECK(hi == std::ldexp(1.0f, int(bits) - 1) - 1.0f);
    // Both ends (and the values that round to them) survive the round trip.
    const std::vector<float> x = {lo, hi, lo - 0.49f, hi + 0.49f, 0.0f, -1.0f};
    gcomp::quantized_payload<float> m;
    c.compress(gcomp::host_par(2), std::span<const float>(x), m, rng_key{});
    CHECK(decompressed(c, m, x.size()) == std::vector<float>{lo, hi, lo, hi, 0.0f, -1.0f});
    // One level beyond either end is refused, naming the index; m is untouched.
    const auto before = m;
    for (float bad : {lo - 0.5f, hi + 0.5f}) {
      std::vector<float> y(100, 0.0f);
      y[71] = bad;
      gcomp::test::expect_error(
          [&] { c.compress(gcomp::host_seq{}, std::span<const float>(y), m, rng_key{}); },
          "gcomp::grid_round::compress: gradient[71] = ");
      gcomp::test::check_quantized_unchanged(m, before);
    }
  }
  gcomp::grid_round<float> c({.spacing = 0.5, .bits = 8});
  gcomp::quantized_payload<float> m;
  c.compress(gcomp::host_seq{}, std::span<const float>(wave(10)), m, rng_key{});
  const auto before = m;
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    std::vector<float> y(300, 1.0f);
    y[200] = bad;
    y[250] = bad;
    gcomp::test::expect_error(
        [&] { c.compress(gcomp::host_par(3), std::span<const float>(y), m, rng_key{}); },
        "gcomp::grid_round::compress: gradient[200] = ");
    gcomp::test::check_quantized_unchanged(m, before);
  }
}

TEST_CASE("grid_round wire bytes equal the encoding and the formula; decode survives corruption") {
  for (unsigned bits : {2u, 7u, 16u}) {
    for (std::size_t n : {1u, 63u, 64u, 1000u}) {
      // |wave| < 2.1: the spacing keeps every level inside the code range.
      gcomp::grid_round<float> c({.spacing = std::ldexp(4.0, 1 - int(bits)), .bits = bits});
      const auto x = wave(n);
      gcomp::quantized_payload<float> m;
      c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{});
      const auto bytes = gcomp::test::bytes_of(m);
      CHECK(c.wire_bytes(m) == bytes.size());
      CHECK(bytes.size() == 24 + 17 + 4 + gcomp::wire::packed_bytes(n, bits));
      CHECK(c.bits_per_element(n) == 8.0 * double(bytes.size()) / double(n));
      gcomp::quantized_payload<float> back;
      decode(bytes, back, n);
      CHECK(gcomp::test::same_bits(decompressed(c, back, n), decompressed(c, m, n)));
    }
  }
  gcomp::grid_round<float> c({.spacing = 0.1, .bits = 6});
  gcomp::quantized_payload<float> m, sentinel;
  c.compress(gcomp::host_seq{}, std::span<const float>(wave(300)), m, rng_key{});
  c.compress(gcomp::host_seq{}, std::span<const float>(wave(3)), sentinel, rng_key{});
  CHECK(gcomp::test::check_decode_is_safe(gcomp::test::bytes_of(m), sentinel, 300).rejected > 20);
}

TEST_CASE("grid_round gives the same payload for host_seq and host_par with 1, 2, 3 and 7 threads") {
  constexpr std::size_t n = 200003;
  const auto x = wave(n, 0.4f);
  gcomp::grid_round<float> c({.spacing = 0.003, .bits = 11});
  gcomp::test::check_same_payload_for_every_policy(
      c, x, rng_key{1, 4, 2}, 0.5f, 0.25f, gcomp::test::reuse::one_compressor,
      [](const auto& m, const auto& ref) {
        CHECK(m.scales == ref.scales);
        CHECK(m.words == ref.words);
      });
}

TEST_CASE("grid_round rejects bad options and foreign messages before writing") {
  using opts = gcomp::grid_round_options;
  for (double spacing : {0.0, -1.0, std::numeric_limits<double>::quiet_NaN(),
                         std::numeric_limits<double>::infinity()})
    gcomp::test::expect_error([&] { gcomp::grid_round<float>(opts{.spacing = spacing}); },
                              "gcomp::grid_round: options.spacing must be finite and > 0");
  for (unsigned bits : {0u, 1u, 17u, 32u})
    gcomp::test::expect_error([&] { gcomp::grid_round<float>(opts{.spacing = 1.0, .bits = bits}); },
                              "gcomp::grid_round: options.bits must be in [2, 16], got " +
                                  std::to_string(bits));
  // 1e-50 is a fine double but 0 as a float.
  gcomp::test::expect_error([] { gcomp::grid_round<float>(opts{.spacing = 1e-50}); },
                            "is not a normal number once rounded to the element type");
  CHECK(gcomp::grid_round<double>(opts{.spacing = 1e-50}).spacing() == 1e-50);

  gcomp::grid_round<float> c({.spacing = 0.5, .bits = 8});
  const auto x = wave(50);
  gcomp::quantized_payload<float> m;
  c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{});
  auto expect_refused = [&](const gcomp::grid_round<float>& d, const gcomp::quantized_payload<float>& msg,
                            std::size_t n, const std::string& needle) {
    std::vector<float> out(n, 2.0f);
    gcomp::test::expect_error(
        [&] { d.decompress_add(gcomp::host_seq{}, msg, std::span<float>(out), 1.0f); }, needle);
    CHECK(out == std::vector<float>(n, 2.0f));
  };
  expect_refused(c, m, 49, "message dimension is 50 but out has size 49");
  expect_refused(gcomp::grid_round<float>({.spacing = 0.5, .bits = 9}), m, 50,
                 "message.bits = 8 but this compressor sends 9 bits");
  expect_refused(gcomp::grid_round<float>({.spacing = 0.25, .bits = 8}), m, 50,
                 "message.scales[0] = 0.5 but this compressor's spacing is 0.25");
  auto broken = m;
  broken.scales.push_back(0.5f);
  expect_refused(c, broken, 50, "message.scales has size 2");
}
