// Counter-based random numbers: Philox4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC 2011) as a pure function of (seed, step, worker, index).
#pragma once

#include <cmath>
#include <cstdint>

#include "gcomp/core/config.hpp"

// Every function here is a pure function of its arguments, so the number drawn at
// index i is the same on the host and on a CUDA device, in any thread and in any
// order. Device-callable code uses plain structs and no exceptions for that reason.

namespace gcomp {

/// Four 32-bit words: a Philox counter or output block.
struct u32x4 {
  std::uint32_t v[4];
};

/// Two 32-bit words: a Philox key.
struct u32x2 {
  std::uint32_t v[2];
};

namespace detail {

inline constexpr std::uint32_t philox_m0 = 0xD2511F53u;  // round multipliers
inline constexpr std::uint32_t philox_m1 = 0xCD9E8D57u;
inline constexpr std::uint32_t philox_w0 = 0x9E3779B9u;  // key schedule: golden ratio
inline constexpr std::uint32_t philox_w1 = 0xBB67AE85u;  // key schedule: sqrt(3) - 1

// One 64-bit product gives both halves; it compiles to a single wide multiply on
// x86 and to mul.wide.u32 on the GPU, with no intrinsics needed.
GCOMP_HD constexpr void mulhilo32(std::uint32_t a, std::uint32_t b, std::uint32_t& hi,
                                  std::uint32_t& lo) {
  const std::uint64_t product = static_cast<std::uint64_t>(a) * b;
  hi = static_cast<std::uint32_t>(product >> 32);
  lo = static_cast<std::uint32_t>(product);
}

// One Philox S-box/P-box round, word for word as Random123's philox4x32round.
GCOMP_HD constexpr u32x4 philox_round(u32x4 ctr, u32x2 key) {
  std::uint32_t hi0 = 0, lo0 = 0, hi1 = 0, lo1 = 0;
  mulhilo32(philox_m0, ctr.v[0], hi0, lo0);
  mulhilo32(philox_m1, ctr.v[2], hi1, lo1);
  return u32x4{{hi1 ^ ctr.v[1] ^ key.v[0], lo1, hi0 ^ ctr.v[3] ^ key.v[1], lo0}};
}

/// SplitMix64's output function of x (Steele, Lea, Flood 2014): a bijective 64-bit
/// mixer, used only to derive seeds, never to draw numbers.
GCOMP_HD constexpr std::uint64_t splitmix64(std::uint64_t x) {
  std::uint64_t z = x + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// The top 24 bits of `bits` as a float in [0, 1): k * 2^-24 with k < 2^24 is exact,
/// so the largest value is 1 - 2^-24 and 1.0f is never returned.
GCOMP_HD constexpr float bits_to_unit_float(std::uint32_t bits) {
  return static_cast<float>(bits >> 8) * 0x1p-24f;
}

/// The top 24 bits of `bits` as a float in (0, 1]: (k + 1) * 2^-24, exact, never 0,
/// so its logarithm is always finite.
GCOMP_HD constexpr float bits_to_unit_float_open(std::uint32_t bits) {
  return static_cast<float>((bits >> 8) + 1u) * 0x1p-24f;
}

/// The top 53 bits of a 64-bit word as a double in [0, 1), exact.
GCOMP_HD constexpr double bits_to_unit_double(std::uint64_t bits) {
  return static_cast<double>(bits >> 11) * 0x1p-53;
}

/// All 32 bits as a double in (0, 1]: (k + 1) * 2^-32, exact; the finer grid than the
/// float version pushes Box-Muller's largest |z| out to sqrt(64 ln 2) ~ 6.66.
GCOMP_HD constexpr double bits_to_unit_double_open32(std::uint32_t bits) {
  return (static_cast<double>(bits) + 1.0) * 0x1p-32;
}

// Box-Muller on one pair of words, in double so that host and device float results
// agree (the libm and CUDA double functions differ by at most an ulp of double).
GCOMP_HD inline void box_muller(std::uint32_t radius_bits, std::uint32_t angle_bits, double& c,
                                double& s) {
  const double two_pi = 6.283185307179586476925286766559;
  const double r = std::sqrt(-2.0 * std::log(bits_to_unit_double_open32(radius_bits)));
  const double theta = two_pi * (static_cast<double>(angle_bits) * 0x1p-32);
  c = r * std::cos(theta);
  s = r * std::sin(theta);
}

}  // namespace detail

/// Philox4x32-10 exactly as in Random123 (and cuRAND's Philox4_32_10): ten rounds,
/// the key bumped by (W0, W1) between rounds. Checked against Random123's kat_vectors.
GCOMP_HD constexpr u32x4 philox4x32_10(u32x4 counter, u32x2 key) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key.v[0] += detail::philox_w0;
      key.v[1] += detail::philox_w1;
    }
    counter = detail::philox_round(counter, key);
  }
  return counter;
}

/// Names one random stream: the run's seed, the training step and the worker (rank).
/// Sub-streams for different purposes within a step come from fork().
struct rng_key {
  std::uint64_t seed = 0;
  std::uint64_t step = 0;
  std::uint32_t worker = 0;

  /// The worker value of the shared stream, which every worker can compute alike
  /// (e.g. a random-k mask that must line up across workers).
  static constexpr std::uint32_t shared_worker = 0xFFFFFFFFu;

  /// The same seed and step, but the stream every worker derives identically.
  GCOMP_HD constexpr rng_key shared() const { return rng_key{seed, step, shared_worker}; }

  /// An independent sub-stream for another purpose (tag), same step and worker:
  /// seed' = splitmix64(seed ^ splitmix64(tag)). Mixing the tag first keeps small
  /// tags and small seeds from cancelling (seed 1 tag 0 vs seed 0 tag 1).
  GCOMP_HD constexpr rng_key fork(std::uint64_t tag) const {
    return rng_key{detail::splitmix64(seed ^ detail::splitmix64(tag)), step, worker};
  }
};

/// Block `block` of the stream `key`: Philox4x32-10 of
///   counter {block lo32, block hi32, step lo32, worker},  key {seed lo32, seed hi32 ^ step hi32}.
/// Steps below 2^32 (every realistic run) give distinct streams for every (seed, step,
/// worker); from 2^32 on, step's high word is folded into the key, so (seed, step)
/// aliases (seed ^ (d << 32), step ^ (d << 32)) -- harmless, as it only renames seeds.
GCOMP_HD constexpr u32x4 random_block(const rng_key& key, std::uint64_t block) {
  const u32x4 counter{{static_cast<std::uint32_t>(block), static_cast<std::uint32_t>(block >> 32),
                       static_cast<std::uint32_t>(key.step), key.worker}};
  const u32x2 philox_key{{static_cast<std::uint32_t>(key.seed),
                          static_cast<std::uint32_t>(key.seed >> 32) ^
                              static_cast<std::uint32_t>(key.step >> 32)}};
  return philox4x32_10(counter, philox_key);
}

/// Word i % 4 of block i / 4: 32 random bits at index i.
GCOMP_HD constexpr std::uint32_t random_bits(const rng_key& key, std::uint64_t i) {
  return random_block(key, i / 4).v[i % 4];
}

/// A uniform float in [0, 1) at index i: (random_bits >> 8) * 2^-24, exact.
GCOMP_HD constexpr float uniform(const rng_key& key, std::uint64_t i) {
  return detail::bits_to_unit_float(random_bits(key, i));
}

/// A uniform float in (0, 1] at index i: ((random_bits >> 8) + 1) * 2^-24, exact.
GCOMP_HD constexpr float uniform_open(const rng_key& key, std::uint64_t i) {
  return detail::bits_to_unit_float_open(random_bits(key, i));
}

/// uniform(key, 4 * block + j) for j = 0..3 from one Philox call, for kernels that
/// handle four elements per thread.
GCOMP_HD constexpr void uniform4(const rng_key& key, std::uint64_t block, float out[4]) {
  const u32x4 words = random_block(key, block);
  for (int j = 0; j < 4; ++j) out[j] = detail::bits_to_unit_float(words.v[j]);
}

/// A uniform double in [0, 1) at index i, 53 bits from words (2(i%2), 2(i%2)+1) of block
/// i / 2. It shares blocks with uniform() at indices 2i, 2i+1: fork the key rather
/// than draw both kinds over overlapping indices.
GCOMP_HD constexpr double uniform_double(const rng_key& key, std::uint64_t i) {
  const u32x4 words = random_block(key, i / 2);
  const unsigned w = static_cast<unsigned>(i % 2) * 2u;
  return detail::bits_to_unit_double((static_cast<std::uint64_t>(words.v[w]) << 32) |
                                     words.v[w + 1]);
}

/// True with probability p (uniform(key, i) < p): p <= 0 or NaN is never true, p >= 1
/// always; p is quantised to multiples of 2^-24.
GCOMP_HD constexpr bool bernoulli(const rng_key& key, std::uint64_t i, float p) {
  return uniform(key, i) < p;
}

/// A standard normal float at index i by Box-Muller: block i / 4 holds two pairs of
/// words, (w0, w1) for i % 4 in {0, 1} and (w2, w3) for i % 4 in {2, 3}; the even index
/// takes r cos(theta) and the odd one r sin(theta). Like uniform_double, it shares
/// blocks with the other draws on the same key; fork the key per kind of draw.
GCOMP_HD inline float normal(const rng_key& key, std::uint64_t i) {
  const u32x4 words = random_block(key, i / 4);
  const unsigned pair = static_cast<unsigned>(i % 4) / 2u * 2u;
  double c = 0.0, s = 0.0;
  detail::box_muller(words.v[pair], words.v[pair + 1], c, s);
  return static_cast<float>(i % 2 == 0 ? c : s);
}

/// normal(key, 4 * block + j) for j = 0..3 from one Philox call and two logarithms.
GCOMP_HD inline void normal4(const rng_key& key, std::uint64_t block, float out[4]) {
  const u32x4 words = random_block(key, block);
  double c = 0.0, s = 0.0;
  detail::box_muller(words.v[0], words.v[1], c, s);
  out[0] = static_cast<float>(c);
  out[1] = static_cast<float>(s);
  detail::box_muller(words.v[2], words.v[3], c, s);
  out[2] = static_cast<float>(c);
  out[3] = static_cast<float>(s);
}

}  // namespace gcomp
