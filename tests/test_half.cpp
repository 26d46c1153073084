// Tests of core/half.hpp: exhaustive float16/bfloat16 -> float -> back round trips, and float (and double) -> 16-bit rounding against an independent nearest-value search in double: ties to even, subnormals, overflow, -0, NaN.
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "gcomp/core/half.hpp"
#include "gcomp/core/wire.hpp"

using gcomp::bfloat16;
using gcomp::float16;

static_assert(gcomp::wire::element_of<float16> == gcomp::wire::element::f16);
static_assert(gcomp::wire::element_of<bfloat16> == gcomp::wire::element::bf16);

namespace {

// ---------------------------------------------------------------------------
// Independent references: values from the bit fields by ldexp, rounding by
// searching the sorted table of all finite values.

bool half_is_nan(std::uint16_t b) { return (b & 0x7c00u) == 0x7c00u && (b & 0x3ffu) != 0; }
bool bf16_is_nan(std::uint16_t b) { return (b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0; }

double half_value(std::uint16_t b) {
  const int e = (b >> 10) & 0x1f;
  const int m = b & 0x3ff;
  const double s = (b & 0x8000u) ? -1.0 : 1.0;
  if (e == 0x1f) return m == 0 ? s * std::numeric_limits<double>::infinity()
                               : std::numeric_limits<double>::quiet_NaN();
  if (e == 0) return s * std::ldexp(double(m), -24);
  return s * std::ldexp(double(1024 + m), e - 25);
}

double bf16_value(std::uint16_t b) {
  const int e = (b >> 7) & 0xff;
  const int m = b & 0x7f;
  const double s = (b & 0x8000u) ? -1.0 : 1.0;
  if (e == 0xff) return m == 0 ? s * std::numeric_limits<double>::infinity()
                               : std::numeric_limits<double>::quiet_NaN();
  if (e == 0) return s * std::ldexp(double(m), -133);
  return s * std::ldexp(double(128 + m), e - 134);
}

// The bits of the nearest value to x among the non-negative finite codes
// [0, last] whose values are `table` (increasing), ties to the even code;
// values at or beyond last + half an ulp go to `inf_bits`.
std::uint16_t nearest(double x, const std::vector<double>& table, std::uint16_t inf_bits) {
  const double a = std::fabs(x);
  const std::uint16_t sign = std::signbit(x) ? 0x8000u : 0u;
  const std::size_t last = table.size() - 1;
  // The overflow threshold: last + (last - previous) / 2, the tie going to inf (even).
  const double threshold = table[last] + (table[last] - table[last - 1]) / 2;
  if (a >= threshold) return sign | inf_bits;
  const auto hi = std::lower_bound(table.begin(), table.end(), a);
  std::size_t k = static_cast<std::size_t>(hi - table.begin());
  if (k <= last && table[k] == a) return static_cast<std::uint16_t>(sign | k);
  if (k > last) return static_cast<std::uint16_t>(sign | last);
  // table[k - 1] < a < table[k]
  const double below = a - table[k - 1], above = table[k] - a;
  std::size_t pick = below < above ? k - 1 : (above < below ? k : (k % 2 == 0 ? k : k - 1));
  return static_cast<std::uint16_t>(sign | pick);
}

const std::vector<double>& half_table() {
  static const std::vector<double> t = [] {
    std::vector<double> v;
    for (std::uint32_t b = 0; b <= 0x7bffu; ++b) v.push_back(half_value(std::uint16_t(b)));
    return v;
  }();
  return t;
}

const std::vector<double>& bf16_table() {
  static const std::vector<double> t = [] {
    std::vector<double> v;
    for (std::uint32_t b = 0; b <= 0x7f7fu; ++b) v.push_back(bf16_value(std::uint16_t(b)));
    return v;
  }();
  return t;
}

std::uint16_t ref_half(double x) { return nearest(x, half_table(), 0x7c00u); }
std::uint16_t ref_bf16(double x) { return nearest(x, bf16_table(), 0x7f80u); }

float from_bits(std::uint32_t u) { return std::bit_cast<float>(u); }

void check_float(float x) {
  if (std::isnan(x)) return;
  const std::uint16_t h = gcomp::to_float16(x).bits, b = gcomp::to_bfloat16(x).bits;
  const std::uint16_t rh = ref_half(x), rb = ref_bf16(x);
  if (h != rh) {
    INFO("float16 of " << x << " (bits " << std::bit_cast<std::uint32_t>(x) << "): got " << h
                       << ", expected " << rh);
    CHECK(h == rh);
  }
  if (b != rb) {
    INFO("bfloat16 of " << x << " (bits " << std::bit_cast<std::uint32_t>(x) << "): got " << b
                        << ", expected " << rb);
    CHECK(b == rb);
  }
}

}  // namespace

TEST_CASE("every float16 bit pattern widens exactly and narrows back to itself (signalling NaNs get quieted)") {
  std::size_t mismatches = 0, quieted = 0;
  for (std::uint32_t u = 0; u < 65536; ++u) {
    const std::uint16_t b = static_cast<std::uint16_t>(u);
    const float f = gcomp::to_float(float16{b});
    if (half_is_nan(b)) {
      REQUIRE(std::isnan(f));
      const std::uint32_t fb = std::bit_cast<std::uint32_t>(f);
      CHECK((fb >> 31) == (b >> 15));                      // sign kept
      CHECK(((fb >> 13) & 0x3ffu) == (b & 0x3ffu));       // payload kept
      const std::uint16_t back = gcomp::to_float16(f).bits;
      // The only change: the quiet bit (0x200) is set.
      CHECK(back == (b | 0x200u));
      quieted += back != b;
      continue;
    }
    const double ref = half_value(b);
    if (!(double(f) == ref) || std::signbit(f) != std::signbit(ref)) ++mismatches;
    if (gcomp::to_float16(f).bits != b) ++mismatches;
  }
  CHECK(mismatches == 0);
  CHECK(quieted == 2 * 511);  // the signalling NaNs: 0x7c01..0x7dff and their negatives
}

TEST_CASE("every bfloat16 bit pattern widens exactly and narrows back to itself (signalling NaNs get quieted)") {
  std::size_t mismatches = 0, quieted = 0;
  for (std::uint32_t u = 0; u < 65536; ++u) {
    const std::uint16_t b = static_cast<std::uint16_t>(u);
    const float f = gcomp::to_float(bfloat16{b});
    CHECK(std::bit_cast<std::uint32_t>(f) == (u << 16));
    if (bf16_is_nan(b)) {
      REQUIRE(std::isnan(f));
      const std::uint16_t back = gcomp::to_bfloat16(f).bits;
      CHECK(back == (b | 0x40u));
      quieted += back != b;
      continue;
    }
    const double ref = bf16_value(b);
    if (!(double(f) == ref) || std::signbit(f) != std::signbit(ref)) ++mismatches;
    if (gcomp::to_bfloat16(f).bits != b) ++mismatches;
  }
  CHECK(mismatches == 0);
  CHECK(quieted == 2 * 63);
}

TEST_CASE("float -> float16 / bfloat16 edge cases") {
  using gcomp::to_bfloat16;
  using gcomp::to_float16;
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(to_float16(0.0f).bits == 0x0000);
  CHECK(to_float16(-0.0f).bits == 0x8000);
  CHECK(to_bfloat16(-0.0f).bits == 0x8000);
  CHECK(to_float16(1.0f).bits == 0x3c00);
  CHECK(to_float16(-2.0f).bits == 0xc000);
  CHECK(to_float16(65504.0f).bits == 0x7bff);
  CHECK(to_float16(65519.99609375f).bits == 0x7bff);  // just below the threshold
  CHECK(to_float16(65520.0f).bits == 0x7c00);         // the tie goes to even: inf
  CHECK(to_float16(-65520.0f).bits == 0xfc00);
  CHECK(to_float16(1e10f).bits == 0x7c00);
  CHECK(to_float16(inf).bits == 0x7c00);
  CHECK(to_float16(-inf).bits == 0xfc00);
  CHECK(to_bfloat16(inf).bits == 0x7f80);
  CHECK(to_bfloat16(std::numeric_limits<float>::max()).bits == 0x7f80);  // rounds up to inf
  CHECK(to_bfloat16(0x1.fep127f).bits == 0x7f7f);
  // Smallest float16 subnormal 2^-24; 2^-25 is the tie between 0 and it (even: 0).
  CHECK(to_float16(0x1p-24f).bits == 0x0001);
  CHECK(to_float16(0x1p-25f).bits == 0x0000);
  CHECK(to_float16(-0x1p-25f).bits == 0x8000);
  CHECK(to_float16(std::nextafter(0x1p-25f, 1.0f)).bits == 0x0001);
  CHECK(to_float16(0x1.8p-24f).bits == 0x0002);  // 1.5 units: tie to even (2)
  CHECK(to_float16(0x1.8p-23f).bits == 0x0003);  // 3 units exactly
  CHECK(to_float16(0x1p-14f).bits == 0x0400);    // smallest normal
  CHECK(to_float16(std::nextafter(0x1p-14f, 0.0f)).bits == 0x0400);  // rounds up into the normals
  CHECK(to_float16(std::numeric_limits<float>::denorm_min()).bits == 0x0000);
  CHECK(to_bfloat16(std::numeric_limits<float>::denorm_min()).bits == 0x0000);  // tie -> 0
  CHECK(to_bfloat16(from_bits(0x00008001u)).bits == 0x0001);                   // bf16 subnormal
  // Ties to even in the normal range: 1 + 2^-11 is half-way between 1 and 1 + 2^-10.
  CHECK(to_float16(1.0f + 0x1p-11f).bits == 0x3c00);
  CHECK(to_float16(1.0f + 3 * 0x1p-11f).bits == 0x3c02);
  CHECK(to_bfloat16(1.0f + 0x1p-8f).bits == 0x3f80);
  CHECK(to_bfloat16(1.0f + 3 * 0x1p-8f).bits == 0x3f82);
  // NaN: stays NaN, quiet, sign kept.
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  CHECK(to_float16(qnan).bits == 0x7e00);
  CHECK(to_float16(-qnan).bits == 0xfe00);
  CHECK(to_bfloat16(qnan).bits == 0x7fc0);
  CHECK(half_is_nan(to_float16(from_bits(0x7f800001u)).bits));  // payload below float16's bits
  CHECK(bf16_is_nan(to_bfloat16(from_bits(0x7f800001u)).bits));
  CHECK(std::isnan(gcomp::to_float(float16{0x7e00})));
  CHECK(gcomp::to_float(float16{0x7c00}) == inf);
  CHECK(gcomp::to_float(float16{0x0001}) == 0x1p-24f);
  CHECK(std::signbit(gcomp::to_float(float16{0x8000})));
}

TEST_CASE("float -> 16-bit rounding matches the nearest-value search on every midpoint and its neighbours") {
  // Every pair of consecutive finite non-negative codes: the exact midpoint
  // (a tie), one float ulp below and above it, and the same negated.
  for (const auto* table : {&half_table(), &bf16_table()}) {
    for (std::size_t k = 0; k + 1 < table->size(); ++k) {
      const float mid = static_cast<float>(((*table)[k] + (*table)[k + 1]) / 2);
      REQUIRE(double(mid) == ((*table)[k] + (*table)[k + 1]) / 2);  // midpoints are floats
      for (float x : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e30f)}) {
        check_float(x);
        check_float(-x);
      }
    }
  }
}

TEST_CASE("float -> 16-bit rounding matches the nearest-value search on random floats") {
  std::mt19937_64 rng(20240611);
  // Uniform bit patterns (every exponent, NaNs skipped), then floats whose
  // exponent lies around float16's range, where all the cases are.
  for (int t = 0; t < 1000000; ++t) check_float(from_bits(static_cast<std::uint32_t>(rng())));
  std::uniform_int_distribution<int> exponent(-30, 17);
  for (int t = 0; t < 1000000; ++t) {
    const std::uint32_t mant = static_cast<std::uint32_t>(rng()) & 0x7fffffu;
    const std::uint32_t e = static_cast<std::uint32_t>(127 + exponent(rng));
    const std::uint32_t s = static_cast<std::uint32_t>(rng() & 1u) << 31;
    check_float(from_bits(s | (e << 23) | mant));
  }
  // Every float subnormal exponent region for bfloat16 and a sweep of float
  // subnormals.
  for (std::uint32_t u = 0; u < 0x00800000u; u += 997) check_float(from_bits(u));
}

TEST_CASE("double -> 16-bit rounds once (no double rounding through float)") {
  std::mt19937_64 rng(99);
  // x = a midpoint between two float16 values plus or minus a tiny amount:
  // rounding to float first would land exactly on the midpoint and then tie
  // to even, which is wrong for half of these.
  const auto& ht = half_table();
  const auto& bt = bf16_table();
  for (int t = 0; t < 200000; ++t) {
    const std::size_t k = static_cast<std::size_t>(rng() % (ht.size() - 1));
    const double mid = (ht[k] + ht[k + 1]) / 2;
    const double tiny = mid * 0x1p-40 + 0x1p-60;
    for (double x : {mid, mid + tiny, mid - tiny, -(mid + tiny)}) {
      const std::uint16_t got = gcomp::to_float16(x).bits;
      const std::uint16_t want = ref_half(x);
      if (got != want) {
        INFO("float16 of double " << x);
        CHECK(got == want);
      }
    }
    const std::size_t j = static_cast<std::size_t>(rng() % (bt.size() - 1));
    const double bmid = (bt[j] + bt[j + 1]) / 2;
    const double btiny = bmid * 0x1p-40;
    for (double x : {bmid, bmid + btiny, bmid - btiny, -(bmid - btiny)}) {
      const std::uint16_t got = gcomp::to_bfloat16(x).bits;
      const std::uint16_t want = ref_bf16(x);
      if (got != want) {
        INFO("bfloat16 of double " << x);
        CHECK(got == want);
      }
    }
  }
  CHECK(gcomp::to_float16(1e300).bits == 0x7c00);
  CHECK(gcomp::to_bfloat16(1e300).bits == 0x7f80);
  CHECK(gcomp::to_bfloat16(-1e300).bits == 0xff80);
  CHECK(gcomp::to_float16(-0.0).bits == 0x8000);
  CHECK(gcomp::to_float16(1e-300).bits == 0x0000);
  CHECK(gcomp::to_float16(std::numeric_limits<double>::quiet_NaN()).bits == 0x7e00);
  CHECK(gcomp::to_float16(65520.0).bits == 0x7c00);
  CHECK(gcomp::to_float16(std::nextafter(65520.0, 0.0)).bits == 0x7bff);
}
