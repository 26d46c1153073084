// Shared host kernels of the stochastic quantizers (QSGD, TernGrad, natural compression): per-bucket scales, batched Philox, packing codes by groups of 64 elements, payload checks.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
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
#pragma GCC unroll 10
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
inline T unit_from_bits(std::uint32_t bits) {
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

/// Packs the n codes of `bits` bits into words (word_count(n, bits) of them):
/// for every group of quant_group elements, code(first, count, random, codes)
/// fills codes[0, count) for elements [first, first + count), where random[j]
/// is random_bits(stream, first + j); a full group's `bits` words are then
/// written directly, the last partial group's with quantized::assemble_word. Groups run in parallel under host_par; the
/// words do not depend on the policy.
template <class Policy, class Code>
void quant_pack(const Policy& policy, std::size_t n, unsigned bits, const rng_key& stream,
                std::uint64_t* words, Code code) {
  const std::size_t groups = (n + quant_group - 1) / quant_group;
  const std::size_t n_words = quantized::word_count(n, bits);
  for_each_index(policy, groups, [=, &code](std::size_t q) {
    std::uint32_t random[quant_group];
    std::uint32_t codes[quant_group];
    const std::size_t first = q * quant_group;
    const std::size_t count = std::min(quant_group, n - first);
    philox_blocks<quant_group / 4>(stream, first / 4, random);
    code(first, count, static_cast<const std::uint32_t*>(random), codes);
    std::uint64_t* out = words + q * bits;
    if (count == quant_group) {
      // A full group: its `bits` words hold exactly its 64 codes, OR-ed in
      // place (the same words assemble_word would build, without its search).
      for (unsigned w = 0; w < bits; ++w) out[w] = 0;
      for (std::size_t j = 0; j < quant_group; ++j) {
        const std::size_t bit = j * bits;
        const unsigned shift = static_cast<unsigned>(bit % 64);
        const std::uint64_t c = codes[j];
        out[bit / 64] |= c << shift;
        if (shift + bits > 64) out[bit / 64 + 1] |= c >> (64 - shift);
      }
      return;
    }
    const std::size_t w_end = std::min(n_words, (q + 1) * bits);
    for (std::size_t w = q * bits; w < w_end; ++w)
      words[w] = quantized::assemble_word(w, n, bits,
                                          [&](std::size_t i) { return codes[i - first]; });
  });
}

/// Reads the codes back group by group: apply(first, count, codes) with
/// codes[j] the code of element first + j.
template <class Policy, class Apply>
void quant_unpack(const Policy& policy, std::size_t n, unsigned bits, const std::uint64_t* words,
                  Apply apply) {
  const std::size_t groups = (n + quant_group - 1) / quant_group;
  for_each_index(policy, groups, [=, &apply](std::size_t q) {
    std::uint32_t codes[quant_group];
    const std::size_t first = q * quant_group;
    const std::size_t count = std::min(quant_group, n - first);
    for (std::size_t j = 0; j < count; ++j) codes[j] = quantized::read_code(words, first + j, bits);
    apply(first, count, static_cast<const std::uint32_t*>(codes));
  });
}

/// The smallest i with invalid(code i), or n.
template <class Policy, class Invalid>
std::size_t quant_first_invalid(const Policy& policy, std::size_t n, unsigned bits,
                                const std::uint64_t* words, Invalid invalid) {
  std::atomic<std::size_t> first_bad{n};
  quant_unpack(policy, n, bits, words, [&](std::size_t first, std::size_t count, const std::uint32_t* c) {
    bool any = false;
    for (std::size_t j = 0; j < count; ++j) any |= invalid(c[j]);
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
