// 16-bit floating-point storage types (IEEE binary16 "float16" and "bfloat16") and their exact conversions to and from float.
//
// float16 and bfloat16 are storage only: a struct holding the 16 bits, with
// == comparing bits (so +0 != -0 and a NaN equals itself: what a wire test
// wants). Arithmetic is done in float after widening.
//
// Conversions (all GCOMP_HD, branch-free so host loops vectorize):
//  - widening (to_float) is exact for every bit pattern; a NaN keeps its sign
//    and payload (shifted into the top of float's mantissa), quiet or not.
//  - narrowing (to_float16 / to_bfloat16) rounds to nearest, ties to even, in
//    every range: normals, subnormals (float16's smallest is 2^-24; bfloat16
//    shares float's exponent range so float subnormals round too), and
//    overflow: |x| >= 65520 (half-way between float16's largest finite 65504
//    and 65536) becomes +-inf for float16; for bfloat16 the threshold is the
//    half-way point above its largest finite 0x7f7f (about 3.3961e38).
//    +-inf stays +-inf, -0 stays -0.
//  - a NaN stays a NaN with its sign and the top mantissa bits that fit, and
//    its quiet bit is set (IEEE 754 convertFormat quiets signalling NaNs;
//    x86 F16C does the same). So narrow(widen(h)) == h for every h except a
//    signalling NaN, which comes back with the quiet bit set (0x7c01 ->
//    0x7e01 for float16; 0x7f81 -> 0x7fc1 for bfloat16). This is the only
//    "NaN canonicalisation": no payload bits are lost.
//  - from double: rounded once, correctly (through float with round-to-odd,
//    which has enough extra bits that the second rounding cannot err).
//
// The subnormal paths use one float addition each and so assume the default
// floating-point environment (round to nearest, subnormals not flushed); gcomp
// is never built with -ffast-math.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#if defined(__F16C__) && defined(__AVX__) && !defined(__CUDA_ARCH__) && !defined(GCOMP_PORTABLE_KERNELS)
#include <immintrin.h>
#define GCOMP_HALF_F16C 1
#endif

#include "gcomp/core/config.hpp"
#include "gcomp/core/wire.hpp"

namespace gcomp {

/// IEEE 754 binary16: 1 sign bit, 5 exponent bits (bias 15), 10 mantissa bits.
struct float16 {
  std::uint16_t bits = 0;
  friend constexpr bool operator==(float16, float16) = default;
};

/// bfloat16: the top half of a float (1 sign, 8 exponent, 7 mantissa bits).
struct bfloat16 {
  std::uint16_t bits = 0;
  friend constexpr bool operator==(bfloat16, bfloat16) = default;
};

static_assert(sizeof(float16) == 2 && std::is_trivially_copyable_v<float16>);
static_assert(sizeof(bfloat16) == 2 && std::is_trivially_copyable_v<bfloat16>);

namespace detail {

GCOMP_HD inline std::uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return std::bit_cast<std::uint32_t>(f);
#endif
}

GCOMP_HD inline float bits_float(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return std::bit_cast<float>(u);
#endif
}

GCOMP_HD inline std::uint64_t double_bits(double d) {
#if defined(__CUDA_ARCH__)
  return static_cast<std::uint64_t>(__double_as_longlong(d));
#else
  return std::bit_cast<std::uint64_t>(d);
#endif
}

/// d rounded to float with round-to-odd (truncate, then set the last bit if
/// anything was dropped). A float has 13 bits more than float16 and 16 more
/// than bfloat16, so rounding this float to nearest-even again gives the
/// correctly rounded result of d. NaN and inf map to themselves.
GCOMP_HD inline float round_to_odd_float(double d) {
  float f = static_cast<float>(d);  // round to nearest
  const double back = static_cast<double>(f);
  if (back == d || d != d) return f;  // exact, or NaN
  std::uint32_t u = float_bits(f);
  // If f lies further from zero than d, step one ulp toward zero (truncation);
  // this also turns an overflow to inf into FLT_MAX.
  const bool away = (back > d) == (d > 0.0);
  if (away) u -= 1;
  return bits_float(u | 1u);
}

}  // namespace detail

/// The float16 nearest to x (ties to even), see the file comment.
GCOMP_HD inline float16 to_float16(float x) {
  const std::uint32_t u = detail::float_bits(x);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t a = u & 0x7fffffffu;
  // Normal results: rebias the exponent (127 -> 15) and round off 13 bits.
  // A carry out of the mantissa correctly bumps the exponent.
  const std::uint32_t normal = (a - 0x38000000u + 0x0fffu + ((a >> 13) & 1u)) >> 13;
  // Subnormal results (|x| < 2^-14): 0.5 + |x| rounds |x| to a multiple of
  // 2^-24 (the ulp of 0.5), which is the float16 subnormal unit; the low bits
  // of the sum are the code (0x400 when it rounds up to the smallest normal).
  const std::uint32_t subnormal = detail::float_bits(detail::bits_float(a) + 0.5f) - 0x3f000000u;
  std::uint32_t r = a < 0x38800000u ? subnormal : normal;
  r = a >= 0x477ff000u ? 0x7c00u : r;                            // |x| >= 65520 and inf
  r = a > 0x7f800000u ? (0x7e00u | ((a >> 13) & 0x3ffu)) : r;  // NaN: quiet, top payload bits
  return float16{static_cast<std::uint16_t>(sign | r)};
}

/// The float16 value as a float (exact).
GCOMP_HD inline float to_float(float16 h) {
  const std::uint32_t b = h.bits;
  const std::uint32_t sign = (b & 0x8000u) << 16;
  const std::uint32_t e = b & 0x7c00u;
  const std::uint32_t m = b & 0x03ffu;
  const std::uint32_t normal = ((b & 0x7fffu) << 13) + 0x38000000u;
  // Subnormal: m * 2^-24 = (0.5 + m * 2^-24) - 0.5, both steps exact.
  const std::uint32_t subnormal = detail::float_bits(detail::bits_float(0x3f000000u | m) - 0.5f);
  const std::uint32_t special = 0x7f800000u | (m << 13);  // inf, NaN (payload kept)
  const std::uint32_t r = e == 0 ? subnormal : (e == 0x7c00u ? special : normal);
  return detail::bits_float(sign | r);
}

/// The bfloat16 nearest to x (ties to even), see the file comment.
GCOMP_HD inline bfloat16 to_bfloat16(float x) {
  const std::uint32_t u = detail::float_bits(x);
  const std::uint32_t a = u & 0x7fffffffu;
  // Adding 0x7fff plus the lowest kept bit rounds to nearest even; a carry
  // moves into the exponent, up to inf for the largest values.
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const std::uint32_t nan = (u >> 16) | 0x0040u;
  return bfloat16{static_cast<std::uint16_t>(a > 0x7f800000u ? nan : rounded)};
}

/// The bfloat16 value as a float (exact).
GCOMP_HD inline float to_float(bfloat16 h) {
  return detail::bits_float(static_cast<std::uint32_t>(h.bits) << 16);
}

/// Correctly rounded (once) from double.
GCOMP_HD inline float16 to_float16(double x) { return to_float16(detail::round_to_odd_float(x)); }
GCOMP_HD inline bfloat16 to_bfloat16(double x) {
  return to_bfloat16(detail::round_to_odd_float(x));
}

/// out[i] = to_float16(in[i]) for i < n, bitwise (host only). With F16C
/// (e.g. -march=native on x86) eight at a time with vcvtps2ph, round to
/// nearest even, which agrees with to_float16 on every float (NaNs quieted
/// with their top payload bits, overflow to inf, subnormals rounded);
/// otherwise the portable loop, which the compiler vectorizes.
inline void to_float16_n(const float* in, std::size_t n, float16* out) {
  std::size_t i = 0;
#if defined(GCOMP_HALF_F16C)
  static_assert(sizeof(float16) == sizeof(std::uint16_t));
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), h);
  }
#endif
  for (; i < n; ++i) out[i] = to_float16(in[i]);
}

/// Uniform access for code generic over the two formats: half_format<H>::from(x)
/// (x float or double) and half_format<H>::name.
template <class H>
struct half_format;

template <>
struct half_format<float16> {
  static constexpr const char* name = "float16";
  /// Unit roundoff for normal values: |round(x) - x| <= 2^-11 |x|.
  static constexpr double unit_roundoff = 1.0 / 2048.0;
  static constexpr float max_finite = 65504.0f;
  template <class F>
  GCOMP_HD static float16 from(F x) {
    return to_float16(x);
  }
};

template <>
struct half_format<bfloat16> {
  static constexpr const char* name = "bfloat16";
  static constexpr double unit_roundoff = 1.0 / 256.0;
  static constexpr float max_finite = 0x1.fep127f;
  template <class F>
  GCOMP_HD static bfloat16 from(F x) {
    return to_bfloat16(x);
  }
};

namespace wire {
template <>
struct wire_element<float16> : std::integral_constant<element, element::f16> {};
template <>
struct wire_element<bfloat16> : std::integral_constant<element, element::bf16> {};
}  // namespace wire

}  // namespace gcomp
