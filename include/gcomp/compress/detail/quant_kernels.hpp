// Shared host kernels of the stochastic quantizers (QSGD, TernGrad, natural compression): per-bucket scales, batched Philox, packing codes by groups of 64 elements, payload checks.
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include "gcomp/core/error.hpp"
#include "gcomp/core/quantized_payload.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp::detail {

// Sub-stream tags (rng_key::fork), distinct from the sparsifiers' tags.
inline constexpr std::uint64_t qsgd_tag = 0x0000000064677371ull;      // "qsgd"
inline constexpr std::uint64_t terngrad_tag = 0x646172676e726574ull;  // "terngrad"
inline constexpr std::uint64_t natural_tag = 0x006c61727574616eull;   // "natural"

/// Elements per packing group. 64 codes of `bits` bits fill exactly `bits`
/// words, so group q owns words [q * bits, (q + 1) * bits) and threads that
/// handle different groups never share a word; 64 is also a multiple of the
/// 4 numbers one Philox block yields.
inline constexpr std::size_t quant_group = 64;

/// random_block(key, first_block + j) for j < Blocks, written as
/// out[4 j + r] = word r, i.e. out[t] == random_bits(key, 4 * first_block + t).
/// The lanes are kept apart (structure of arrays) so that the ten rounds
/// vectorize; the arithmetic is philox4x32_10's, word for word.
template <std::size_t Blocks>
inline void philox_blocks(const rng_key& key, std::uint64_t first_block, std::uint32_t* out) {
  // Lane j runs all ten rounds on its own block; the loop over lanes has a
  // straight-line body once the rounds are unrolled, and GCC vectorizes it
  // with 64-bit lanes holding 32-bit values (the 32 x 32 -> 64-bit products).
  const std::uint32_t seed_lo = static_cast<std::uint32_t>(key.seed);
  const std::uint32_t seed_hi =
      static_cast<std::uint32_t>(key.seed >> 32) ^ static_cast<std::uint32_t>(key.step >> 32);
  const std::uint64_t step_lo = key.step & 0xffffffffu, worker = key.worker;
  for (std::size_t j = 0; j < Blocks; ++j) {
    const std::uint64_t block = first_block + j;
    std::uint64_t c0 = block & 0xffffffffu, c1 = block >> 32, c2 = step_lo, c3 = worker;
GCOMP_UNROLL(10)
    for (std::uint32_t round = 0; round < 10; ++round) {
      const std::uint64_t key0 = static_cast<std::uint32_t>(seed_lo + round * philox_w0);
      const std::uint64_t key1 = static_cast<std::uint32_t>(seed_hi + round * philox_w1);
      const std::uint64_t p0 = std::uint64_t{philox_m0} * c0;
      const std::uint64_t p1 = std::uint64_t{philox_m1} * c2;
      c0 = (p1 >> 32) ^ c1 ^ key0;
      c1 = p1 & 0xffffffffu;
      c2 = (p0 >> 32) ^ c3 ^ key1;
      c3 = p0 & 0xffffffffu;
    }
    out[4 * j + 0] = static_cast<std::uint32_t>(c0);
    out[4 * j + 1] = static_cast<std::uint32_t>(c1);
    out[4 * j + 2] = static_cast<std::uint32_t>(c2);
    out[4 * j + 3] = static_cast<std::uint32_t>(c3);
  }
}

/// uniform(key, i) from random_bits(key, i): the top 24 bits times 2^-24.
template <class T>
GCOMP_HD inline T unit_from_bits(std::uint32_t bits) {
  return static_cast<T>(bits >> 8) * static_cast<T>(0x1p-24);
}

/// Calls f(j_begin, j_end, b) for the pieces of [first, first + count) that
/// lie in one bucket b (positions relative to first); bucket == 0 is one
/// bucket over everything.
template <class F>
inline void split_by_bucket(std::size_t first, std::size_t count, std::size_t bucket, F&& f) {
  if (bucket == 0) return f(std::size_t{0}, count, std::size_t{0});
  std::size_t j = 0;
  while (j < count) {
    const std::size_t b = (first + j) / bucket;
    const std::size_t end = std::min(count, (b + 1) * bucket - first);
    f(j, end, b);
    j = end;
  }
}

[[noreturn]] inline void fail_not_finite(std::string_view where, std::size_t i, double value) {
  fail(where, "gradient[", i, "] = ", value, " is not finite");
}

/// The first non-finite element of g[begin, end), or end.
template <class T>
std::size_t first_not_finite(std::span<const T> g, std::size_t begin, std::size_t end) {
  for (std::size_t i = begin; i < end; ++i)
    if (!std::isfinite(g[i])) return i;
  return end;
}

enum class quant_stat { l2, max_abs };

/// One statistic per bucket of g: the l2 norm (QSGD) or max |g_i| (TernGrad),
/// into out (ceil(n / bucket) values; one value over all of g when bucket is
/// 0). Each bucket is reduced with transform_reduce in the fixed order, so the
/// result does not depend on the policy. A non-finite element throws
/// gcomp::error naming the smallest such index; nothing but `out` is written.
/// Norms are rounded up to T, so |g_i| <= out[bucket of i] always holds.
template <class Policy, class T>
void quant_bucket_stats(const Policy& policy, std::span<const T> g, std::size_t bucket,
                        quant_stat stat, std::vector<T>& out, std::string_view where) {
  const std::size_t n = g.size();
  const T* x = g.data();
  constexpr double inf = std::numeric_limits<double>::infinity();
  auto stat_of = [x, stat](const auto& pol, std::size_t begin, std::size_t len) -> double {
    if (stat == quant_stat::l2)
      return transform_reduce(
          pol, len, 0.0, [](double a, double b) { return a + b; },
          [x, begin](std::size_t i) {
            const double v = static_cast<double>(x[begin + i]);
            return std::isfinite(v) ? v * v : inf;
          });
    return transform_reduce(
        pol, len, 0.0, [](double a, double b) { return a < b ? b : a; },
        [x, begin](std::size_t i) {
          const double v = static_cast<double>(x[begin + i]);
          return std::isfinite(v) ? std::fabs(v) : inf;
        });
  };
  const std::size_t buckets = bucket == 0 ? 1 : quantized::bucket_count(n, bucket);
  scratch<double> raw(buckets);
  double* r = raw.vector().data();
  if (bucket == 0) {
    r[0] = stat_of(policy, 0, n);
  } else {
    for_each_index(policy, buckets, [&](std::size_t b) {
      const std::size_t begin = b * bucket;
      r[b] = stat_of(host_seq{}, begin, std::min(n, begin + bucket) - begin);
    });
  }
  out.resize(buckets);
  for (std::size_t b = 0; b < buckets; ++b) {
    double v = r[b];
    const std::size_t begin = bucket == 0 ? 0 : b * bucket;
    const std::size_t end = bucket == 0 ? n : std::min(n, begin + bucket);
    if (!(v < inf)) {
      const std::size_t bad = first_not_finite(g, begin, end);
      if (bad != end) fail_not_finite(where, bad, static_cast<double>(g[bad]));
      // Finite values whose squares overflow a double (T = double only): rescale.
      double top = 0.0;
      for (std::size_t i = begin; i < end; ++i) top = std::max(top, std::fabs(double(g[i])));
      double sum = 0.0;
      for (std::size_t i = begin; i < end; ++i) {
        const double y = double(g[i]) / top;
        sum += y * y;
      }
      v = top * std::sqrt(sum);
      if (!(v < inf)) fail(where, "the norm of gradient[", begin, ", ", end, ") overflows");
      out[b] = static_cast<T>(v);
      continue;
    }
    if (stat == quant_stat::l2) v = std::sqrt(v);
    T t = static_cast<T>(v);
    if (static_cast<double>(t) < v) t = std::nextafter(t, std::numeric_limits<T>::infinity());
    if (!std::isfinite(t)) fail(where, "the norm of gradient[", begin, ", ", end, ") overflows");
    out[b] = t;
  }
}

/// words.resize(n), kept out of line: inlined into some callers, GCC 12
/// reports a false -Wstringop-overflow in the vector's relocation path.
[[gnu::noinline]] inline void resize_words(std::vector<std::uint64_t>& words, std::size_t n) {
  words.resize(n);
}

/// Calls f(begin, end) over disjoint ranges covering [0, count): one range on
/// host_seq (or when the work is small), a few per thread on host_par. Every
/// item must be computed independently of the split, so results never depend
/// on the thread count. `work` is the number of elements per item.
template <class F>
void quant_ranges(const host_seq&, std::size_t count, std::size_t, F&& f) {
  if (count != 0) f(std::size_t{0}, count);
}

template <class F>
void quant_ranges(const host_par& policy, std::size_t count, std::size_t work, F&& f) {
  if (count == 0) return;
  if (policy.threads() == 1 || count < 2 || count * work < 4 * host_grain)
    return f(std::size_t{0}, count);
  parallel_ranges(policy, count, std::size_t{policy.threads()} * 4, f);
}

/// Calls f(std::integral_constant<unsigned, B>) with B == bits for bits in
/// [1, 16] (every quantizer's code width), so the packing loops see a
/// compile-time width.
template <class F>
decltype(auto) with_code_bits(unsigned bits, F&& f) {
  switch (bits) {
#define GCOMP_QUANT_BITS_CASE(B) \
  case B:                        \
    return f(std::integral_constant<unsigned, B>{});
    GCOMP_QUANT_BITS_CASE(1)
    GCOMP_QUANT_BITS_CASE(2)
    GCOMP_QUANT_BITS_CASE(3)
    GCOMP_QUANT_BITS_CASE(4)
    GCOMP_QUANT_BITS_CASE(5)
    GCOMP_QUANT_BITS_CASE(6)
    GCOMP_QUANT_BITS_CASE(7)
    GCOMP_QUANT_BITS_CASE(8)
    GCOMP_QUANT_BITS_CASE(9)
    GCOMP_QUANT_BITS_CASE(10)
    GCOMP_QUANT_BITS_CASE(11)
    GCOMP_QUANT_BITS_CASE(12)
    GCOMP_QUANT_BITS_CASE(13)
    GCOMP_QUANT_BITS_CASE(14)
    GCOMP_QUANT_BITS_CASE(15)
    GCOMP_QUANT_BITS_CASE(16)
#undef GCOMP_QUANT_BITS_CASE
    default:
      fail("gcomp::detail::with_code_bits", "code width ", bits, " is outside [1, 16]");
  }
}

/// The Bits words of one full group from its 64 codes (each below 2^Bits):
/// code j occupies bits [j Bits, (j + 1) Bits) of the group's stream. With a
/// compile-time width every shift is a constant and the loops vectorize.
template <unsigned Bits>
inline void pack_group(const std::uint32_t* codes, std::uint64_t* out) {
  if constexpr (64 % Bits == 0) {
    constexpr unsigned per = 64 / Bits;
    for (unsigned w = 0; w < Bits; ++w) {
      std::uint64_t word = 0;
      for (unsigned k = 0; k < per; ++k) word |= std::uint64_t{codes[w * per + k]} << (k * Bits);
      out[w] = word;
    }
  } else {
    std::uint64_t acc[Bits] = {};
GCOMP_UNROLL(64)
    for (unsigned j = 0; j < quant_group; ++j) {
      const unsigned bit = j * Bits;
      const unsigned shift = bit % 64;
      const std::uint64_t c = codes[j];
      acc[bit / 64] |= c << shift;
      if (shift + Bits > 64) acc[bit / 64 + 1] |= c >> (64 - shift);
    }
    for (unsigned w = 0; w < Bits; ++w) out[w] = acc[w];
  }
}

/// The 64 codes of one full group from its Bits words (the inverse of pack_group).
template <unsigned Bits>
inline void unpack_group(const std::uint64_t* in, std::uint32_t* codes) {
  constexpr std::uint64_t mask = (std::uint64_t{1} << Bits) - 1;
  if constexpr (64 % Bits == 0) {
    constexpr unsigned per = 64 / Bits;
    for (unsigned w = 0; w < Bits; ++w) {
      const std::uint64_t word = in[w];
      for (unsigned k = 0; k < per; ++k)
        codes[w * per + k] = static_cast<std::uint32_t>((word >> (k * Bits)) & mask);
    }
  } else {
GCOMP_UNROLL(64)
    for (unsigned j = 0; j < quant_group; ++j) {
      const unsigned bit = j * Bits;
      const unsigned shift = bit % 64;
      std::uint64_t v = in[bit / 64] >> shift;
      if (shift + Bits > 64) v |= in[bit / 64 + 1] << (64 - shift);
      codes[j] = static_cast<std::uint32_t>(v & mask);
    }
  }
}

/// Writes group q's words (q * Bits onwards) from its count codes: a full
/// group directly, the last partial one with quantized::assemble_word.
template <unsigned Bits>
inline void store_group(std::size_t q, std::size_t count, std::size_t n, const std::uint32_t* codes,
                        std::uint64_t* words) {
  if (count == quant_group) return pack_group<Bits>(codes, words + q * Bits);
  const std::size_t first = q * quant_group;
  const std::size_t w_end = std::min(quantized::word_count(n, Bits), (q + 1) * Bits);
  for (std::size_t w = q * Bits; w < w_end; ++w)
    words[w] = quantized::assemble_word(w, n, Bits, [&](std::size_t i) { return codes[i - first]; });
}

/// Packs the n codes of `bits` bits into words (word_count(n, bits) of them):
/// for every group of quant_group elements, code(first, count, random, codes)
/// fills codes[0, count) for elements [first, first + count), where random[j]
/// is random_bits(stream, first + j); the group's `bits` words are then
/// written (threads never share a word). Groups run in parallel under
/// host_par; the words do not depend on the policy.
template <class Policy, class Code>
void quant_pack(const Policy& policy, std::size_t n, unsigned bits, const rng_key& stream,
                std::uint64_t* words, Code code) {
  const std::size_t groups = (n + quant_group - 1) / quant_group;
  with_code_bits(bits, [&](auto width) {
    constexpr unsigned Bits = decltype(width)::value;
    quant_ranges(policy, groups, quant_group, [&](std::size_t q0, std::size_t q1) {
      alignas(64) std::uint32_t random[quant_group];
      alignas(64) std::uint32_t codes[quant_group];
      for (std::size_t q = q0; q < q1; ++q) {
        const std::size_t first = q * quant_group;
        const std::size_t count = std::min(quant_group, n - first);
        philox_blocks<quant_group / 4>(stream, first / 4, random);
        code(first, count, static_cast<const std::uint32_t*>(random), codes);
        store_group<Bits>(q, count, n, codes, words);
      }
    });
  });
}

/// The raw statistic of g[begin, end) as quant_bucket_stats computes it
/// (transform_reduce in the fixed order, a non-finite element gives inf).
template <class T>
double quant_raw_stat(const T* x, std::size_t begin, std::size_t len, quant_stat stat) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    if (stat == quant_stat::max_abs) {
      // max is exact in any order: the largest |x| bit pattern (as an unsigned
      // integer, the order of non-negative floats) is max |x|; a pattern at or
      // above the infinity's means a non-finite element. Vectorizes as an
      // integer max.
      using U = std::conditional_t<std::is_same_v<T, float>, std::uint32_t, std::uint64_t>;
      constexpr U abs_mask = std::numeric_limits<U>::max() >> 1;
      const U inf_bits = std::bit_cast<U>(std::numeric_limits<T>::infinity());
      U top = 0;
      const T* at = x + begin;
      for (std::size_t i = 0; i < len; ++i) {
        const U a = std::bit_cast<U>(at[i]) & abs_mask;
        top = top < a ? a : top;
      }
      return top >= inf_bits ? inf : static_cast<double>(std::bit_cast<T>(top));
    }
  }
  if (stat == quant_stat::l2)
    return transform_reduce(
        host_seq{}, len, 0.0, [](double a, double b) { return a + b; },
        [x, begin](std::size_t i) {
          const double v = static_cast<double>(x[begin + i]);
          return std::isfinite(v) ? v * v : inf;
        });
  return transform_reduce(
      host_seq{}, len, 0.0, [](double a, double b) { return a < b ? b : a; },
      [x, begin](std::size_t i) {
        const double v = static_cast<double>(x[begin + i]);
        return std::isfinite(v) ? std::fabs(v) : inf;
      });
}

/// One pass that computes each bucket's statistic and, while the bucket is
/// still in cache, its codes: for bucket k (bucket a multiple of quant_group),
/// scales[k] is exactly what quant_bucket_stats gives, and for each of its
/// groups code(x, random, codes, count, scales[k]) fills the codes of the
/// count elements at x. Buckets run in parallel; the result does not depend
/// on the policy. Returns false (scales and words partly written, nothing
/// else) when some bucket's statistic is not finite: the caller then takes
/// the two-pass route, which throws or handles it.
template <class Policy, class T, class Code>
bool quant_fused_pack(const Policy& policy, std::span<const T> g, std::size_t bucket,
                      quant_stat stat, unsigned bits, const rng_key& stream, T* scales,
                      std::uint64_t* words, Code code) {
  const std::size_t n = g.size();
  const T* x = g.data();
  const std::size_t buckets = quantized::bucket_count(n, bucket);
  std::atomic<bool> all_finite{true};
  with_code_bits(bits, [&](auto width) {
    constexpr unsigned Bits = decltype(width)::value;
    quant_ranges(policy, buckets, bucket, [&](std::size_t k0, std::size_t k1) {
      alignas(64) std::uint32_t random[quant_group];
      alignas(64) std::uint32_t codes[quant_group];
      constexpr double inf = std::numeric_limits<double>::infinity();
      for (std::size_t k = k0; k < k1; ++k) {
        const std::size_t begin = k * bucket;
        const std::size_t end = std::min(n, begin + bucket);
        double v = quant_raw_stat(x, begin, end - begin, stat);
        if (!(v < inf)) {
          all_finite.store(false, std::memory_order_relaxed);
          return;
        }
        if (stat == quant_stat::l2) v = std::sqrt(v);
        T t = static_cast<T>(v);
        if (static_cast<double>(t) < v) t = std::nextafter(t, std::numeric_limits<T>::infinity());
        if (!std::isfinite(t)) {
          all_finite.store(false, std::memory_order_relaxed);
          return;
        }
        scales[k] = t;
        for (std::size_t first = begin; first < end; first += quant_group) {
          const std::size_t count = std::min(quant_group, n - first);
          philox_blocks<quant_group / 4>(stream, first / 4, random);
          code(x + first, static_cast<const std::uint32_t*>(random), codes, count, t);
          store_group<Bits>(first / quant_group, count, n, codes, words);
        }
      }
    });
  });
  return all_finite.load();
}

/// Reads the codes back group by group: apply(first, count, codes) with
/// codes[j] the code of element first + j.
template <class Policy, class Apply>
void quant_unpack(const Policy& policy, std::size_t n, unsigned bits, const std::uint64_t* words,
                  Apply apply) {
  const std::size_t groups = (n + quant_group - 1) / quant_group;
  with_code_bits(bits, [&](auto width) {
    constexpr unsigned Bits = decltype(width)::value;
    quant_ranges(policy, groups, quant_group, [&](std::size_t q0, std::size_t q1) {
      alignas(64) std::uint32_t codes[quant_group];
      for (std::size_t q = q0; q < q1; ++q) {
        const std::size_t first = q * quant_group;
        const std::size_t count = std::min(quant_group, n - first);
        if (count == quant_group) {
          unpack_group<Bits>(words + q * Bits, codes);
        } else {
          for (std::size_t j = 0; j < count; ++j)
            codes[j] = quantized::read_code(words, first + j, Bits);
        }
        apply(first, count, static_cast<const std::uint32_t*>(codes));
      }
    });
  });
}

/// The smallest i with invalid(code i), or n.
template <class Policy, class Invalid>
std::size_t quant_first_invalid(const Policy& policy, std::size_t n, unsigned bits,
                                const std::uint64_t* words, Invalid invalid) {
  std::atomic<std::size_t> first_bad{n};
  quant_unpack(policy, n, bits, words, [&](std::size_t first, std::size_t count, const std::uint32_t* c) {
    std::uint32_t any = 0;
    for (std::size_t j = 0; j < count; ++j) any |= invalid(c[j]) ? 1u : 0u;
    if (!any) return;
    std::size_t j = 0;
    while (!invalid(c[j])) ++j;
    std::size_t seen = first_bad.load(std::memory_order_relaxed);
    while (first + j < seen && !first_bad.compare_exchange_weak(seen, first + j)) {
    }
  });
  return first_bad.load();
}

/// The checks every quantizer's decompress_add makes before writing: the
/// message matches out (dimension) and the compressor (bits, bucket, number
/// of scales), its words are complete, and its scales are finite and >= 0.
template <class T>
void check_quant_message(std::string_view where, const quantized_payload<T>& m, std::size_t n,
                         unsigned bits, std::size_t bucket, std::size_t scales) {
  if (m.dimension != n)
    fail(where, "message dimension is ", m.dimension, " but out has size ", n);
  if (m.bits != bits)
    fail(where, "message.bits = ", unsigned(m.bits), " but this compressor sends ", bits, " bits");
  if (m.bucket != bucket)
    fail(where, "message.bucket = ", m.bucket, " but this compressor uses buckets of ", bucket);
  check_same_size(where, "message.scales", m.scales.size(), "the expected scale count", scales);
  check_same_size(where, "message.words", m.words.size(), "word_count(dimension, bits)",
                  quantized::word_count(n, bits));
  for (std::size_t j = 0; j < m.scales.size(); ++j)
    if (!(m.scales[j] >= T(0)) || !std::isfinite(m.scales[j]))
      fail(where, "message.scales[", j, "] = ", m.scales[j], " must be finite and >= 0");
}

}  // namespace gcomp::detail
