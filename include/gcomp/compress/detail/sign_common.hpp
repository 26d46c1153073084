// Shared pieces of the cast, sign and 1-bit compressors: finiteness checks by index, group sums, 1-bit packing and payload validation.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "gcomp/compress/detail/sign_device.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/core/quantized_payload.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/host.hpp"

#if defined(__AVX__) && !defined(GCOMP_PORTABLE_KERNELS)
#include <immintrin.h>
#define GCOMP_SIGN_AVX 1
#endif

namespace gcomp::detail::sign_impl {

/// Accumulator for sums of |g|: double for float (no overflow or visible
/// rounding for any realistic n), T itself otherwise.
template <class T>
using sign_accumulator = std::conditional_t<(sizeof(T) < sizeof(double)), double, T>;

/// Throws naming the first index i in [begin, end) with a non-finite g[i],
/// if there is one (a slow path: only called once a sum said there is).
template <class T>
void throw_first_non_finite(std::string_view where, const T* g, std::size_t begin, std::size_t end) {
  for (std::size_t i = begin; i < end; ++i)
    if (!std::isfinite(g[i])) fail(where, "gradient[", i, "] = ", g[i], " is not finite");
}

/// Throws naming the first i with !(|g[i]| < limit) (so NaN, +-inf and, with
/// a finite limit, overflowing values), calling describe(i) for the message.
/// One vectorized or-reduction of a flag; the index is searched only on failure
/// (the smallest, whatever the thread count).
template <class Policy, class T, class Describe>
void check_below(const Policy& policy, std::span<const T> g, T limit, Describe describe) {
  const T* p = g.data();
  const std::uint32_t bad = transform_reduce(
      policy, g.size(), std::uint32_t(0), [](std::uint32_t a, std::uint32_t b) { return a | b; },
      [=](std::size_t i) -> std::uint32_t {
        const T x = p[i];
        return (x < limit && x > -limit) ? 0u : 1u;
      });
  if (bad == 0) return;
  for (std::size_t i = 0; i < g.size(); ++i)
    if (!(g[i] < limit && g[i] > -limit)) describe(i);
}

/// The scale groups of a sign-like compressor: the layers of a layout, or one
/// group [0, n) when there is none. Elements in gaps between layers belong to
/// no group.
struct sign_groups {
  const layout* lay = nullptr;  // null: the whole buffer is one group
  std::size_t n = 0;

  std::size_t count() const { return lay ? lay->num_layers() : 1; }
  std::size_t offset(std::size_t d) const { return lay ? (*lay)[d].offset : 0 * d; }
  std::size_t size(std::size_t d) const { return lay ? (*lay)[d].size : n; }
  bool has_gaps() const { return lay && lay->covered_size() != lay->total_size(); }
};

/// Per-group reduction: out[d] = reduce over transform(i), i in group d.
template <class Policy, class R, class Reduce, class Transform>
void reduce_groups(const Policy& policy, const sign_groups& groups, std::span<R> out, R identity,
                   Reduce reduce, Transform transform) {
  if (groups.lay)
    reduce_per_layer(policy, *groups.lay, out, identity, reduce, transform);
  else
    out[0] = transform_reduce(policy, groups.n, identity, reduce, transform);
}

/// Writes words[w] for all w < word_count(n, 1): bit i is code(i) (0 or 1).
/// Full words are built by a fixed 64-step loop the compiler vectorizes; the
/// last partial word goes through quantized::assemble_word. Threads never
/// share a word. Elements in gaps of `groups` are then cleared to 0.
template <class Policy, class Code>
void pack_bits(const Policy& policy, std::size_t n, std::uint64_t* words, Code code) {
  const std::size_t full = n / 64;
  const std::size_t total = quantized::word_count(n, 1);
  for_each_index(policy, total, [=](std::size_t w) {
    if (w < full) {
      std::uint64_t word = 0;
      const std::size_t base = w * 64;
      for (unsigned j = 0; j < 64; ++j) word |= std::uint64_t(code(base + j)) << j;
      words[w] = word;
    } else {
      words[w] = quantized::assemble_word(w, n, 1, code);
    }
  });
}

/// The word whose bit j is (x[j] >= 0) for j < 64 (-0 counts as
/// non-negative; a NaN gives 0). AVX: a compare and a movemask per 8 floats;
/// otherwise a fixed loop of compares and shifts.
template <class T>
inline std::uint64_t ge_zero_word(const T* x) {
#if defined(GCOMP_SIGN_AVX)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 zero = _mm256_setzero_ps();
    std::uint64_t word = 0;
    for (unsigned k = 0; k < 8; ++k) {
      const __m256 v = _mm256_loadu_ps(x + 8 * k);
      const unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GE_OQ)));
      word |= std::uint64_t{m} << (8 * k);
    }
    return word;
  }
#endif
  std::uint32_t lo = 0, hi = 0;
  for (unsigned j = 0; j < 32; ++j) lo |= std::uint32_t(x[j] >= T(0)) << j;
  for (unsigned j = 0; j < 32; ++j) hi |= std::uint32_t(x[32 + j] >= T(0)) << j;
  return std::uint64_t{lo} | (std::uint64_t{hi} << 32);
}

/// Bits (x[j] >= 0) for j < count (< 64) in the low bits, the rest 0.
template <class T>
inline std::uint64_t ge_zero_partial(const T* x, std::size_t count) {
  std::uint64_t word = 0;
  for (std::size_t j = 0; j < count; ++j) word |= std::uint64_t(x[j] >= T(0)) << j;
  return word;
}

/// words[w] for w < word_count(n, 1) with bit i = (g[i] >= 0), 64 elements
/// at a time (threads never share a word).
template <class Policy, class T>
void pack_ge_zero(const Policy& policy, std::size_t n, const T* g, std::uint64_t* words) {
  const std::size_t full = n / 64;
  const std::size_t total = quantized::word_count(n, 1);
  for_each_index(policy, total, [=](std::size_t w) {
    words[w] = w < full ? ge_zero_word(g + 64 * w) : ge_zero_partial(g + 64 * w, n - 64 * w);
  });
}

/// Runs f(b) for every reduce block b < blocks (detail::reduce_block elements
/// each): in order on host_seq, spread over the pool on host_par. f must
/// write only what belongs to block b.
template <class F>
void for_each_block(const host_seq&, std::size_t blocks, F&& f) {
  for (std::size_t b = 0; b < blocks; ++b) f(b);
}

template <class F>
void for_each_block(const host_par& policy, std::size_t blocks, F&& f) {
  if (blocks < 4 || policy.threads() == 1) return for_each_block(host_seq{}, blocks, f);
  parallel_ranges(policy, blocks, std::size_t{policy.threads()} * 4,
                  [&](std::size_t b0, std::size_t b1) {
                    for (std::size_t b = b0; b < b1; ++b) f(b);
                  });
}

/// The fixed-order lane combination of reduce_one_block (a balanced tree).
template <class R>
inline R combine_lanes(const R* lane) {
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

static_assert(reduce_block % 64 == 0 && reduce_lanes == 8,
              "fused_sums_and_bits assumes whole words per reduce block and 8 lanes");

/// One read pass over g[0, n) that writes the 1-bit stream (bit i = g[i] >= 0,
/// word_count(n, 1) words) and, for s < Sums, total[s] = the sum over i of
/// term(s, g[i]), added in exactly the order of transform_reduce (blocks of
/// reduce_block, 8 lanes, the lane tree, blocks left to right from 0), so the
/// sums are bitwise those of Sums separate transform_reduce calls on any
/// policy. Each reduce block owns reduce_block / 64 whole words, so threads
/// never share a word.
template <std::size_t Sums, class Acc, class Policy, class T, class Term>
void fused_sums_and_bits(const Policy& policy, const T* g, std::size_t n, std::uint64_t* words,
                         Acc* total, Term term) {
  const std::size_t blocks = reduce_block_count(n);
  scratch<Acc> partial(blocks * Sums);
  Acc* part = partial.vector().data();
  for_each_block(policy, blocks, [=](std::size_t b) {
    const std::size_t begin = b * reduce_block;
    const std::size_t len = std::min(n, begin + reduce_block) - begin;
    const T* x = g + begin;
    std::uint64_t* w = words + begin / 64;
    Acc lane[Sums][reduce_lanes];
    for (std::size_t s = 0; s < Sums; ++s)
      for (std::size_t l = 0; l < reduce_lanes; ++l) lane[s][l] = Acc(0);
    std::size_t i = 0;
    for (; i + 64 <= len; i += 64) {
      for (std::size_t k = 0; k < 64; k += reduce_lanes)
        for (std::size_t s = 0; s < Sums; ++s)
          for (std::size_t l = 0; l < reduce_lanes; ++l)
            lane[s][l] = lane[s][l] + term(s, x[i + k + l]);
      w[i / 64] = ge_zero_word(x + i);
    }
    if (i < len) w[i / 64] = ge_zero_partial(x + i, len - i);
    for (; i + reduce_lanes <= len; i += reduce_lanes)
      for (std::size_t s = 0; s < Sums; ++s)
        for (std::size_t l = 0; l < reduce_lanes; ++l) lane[s][l] = lane[s][l] + term(s, x[i + l]);
    for (std::size_t l = 0; i < len; ++i, ++l)
      for (std::size_t s = 0; s < Sums; ++s) lane[s][l] = lane[s][l] + term(s, x[i]);
    for (std::size_t s = 0; s < Sums; ++s) part[b * Sums + s] = combine_lanes(lane[s]);
  });
  for (std::size_t s = 0; s < Sums; ++s) {
    Acc t = Acc(0);
    for (std::size_t b = 0; b < blocks; ++b) t = t + part[b * Sums + s];
    total[s] = t;
  }
}

/// Calls f(w, mask) for every word w of a 1-bit stream that bits [begin, end)
/// touch, mask selecting the bits of the range within that word.
template <class F>
inline void for_each_word_mask(std::size_t begin, std::size_t end, F&& f) {
  while (begin < end) {
    const std::size_t w = begin / 64;
    const unsigned lo = static_cast<unsigned>(begin % 64);
    const std::size_t stop = std::min(end, (w + 1) * 64);
    const unsigned len = static_cast<unsigned>(stop - begin);
    const std::uint64_t mask = len == 64 ? ~std::uint64_t(0) : ((std::uint64_t(1) << len) - 1) << lo;
    f(w, mask);
    begin = stop;
  }
}

/// Clears bits [begin, end) of a 1-bit stream.
inline void clear_bits(std::uint64_t* words, std::size_t begin, std::size_t end) {
  for_each_word_mask(begin, end, [=](std::size_t w, std::uint64_t mask) { words[w] &= ~mask; });
}

/// Number of set bits in [begin, end) of a 1-bit stream.
inline std::size_t count_bits(const std::uint64_t* words, std::size_t begin, std::size_t end) {
  std::size_t count = 0;
  for_each_word_mask(begin, end, [&](std::size_t w, std::uint64_t mask) {
    count += static_cast<std::size_t>(std::popcount(words[w] & mask));
  });
  return count;
}

/// The gaps of a layout: [begin, end) ranges of the buffer outside every layer, in order.
inline std::vector<std::pair<std::size_t, std::size_t>> layout_gaps(const layout& lay) {
  std::vector<std::pair<std::size_t, std::size_t>> covered;
  for (const layer& l : lay) covered.emplace_back(l.offset, l.offset + l.size);
  std::sort(covered.begin(), covered.end());
  std::vector<std::pair<std::size_t, std::size_t>> gaps;
  std::size_t at = 0;
  for (const auto& [b, e] : covered) {
    if (b > at) gaps.emplace_back(at, b);
    at = e;
  }
  return gaps;
}

/// Checks a 1-bit quantized payload against `out` and the compressor's groups
/// (dimension, bits, bucket, number of scales, word count, finite scales) and
/// that no bit is set in a gap. Throws before anything is written.
template <class T>
void check_one_bit_payload(std::string_view where, const quantized_payload<T>& m, std::size_t n,
                           std::size_t expected_scales,
                           std::span<const std::pair<std::size_t, std::size_t>> gaps) {
  if (m.dimension != n)
    fail(where, "message.dimension = ", m.dimension, " but out has size ", n, "; they must match");
  if (m.bits != 1) fail(where, "message.bits = ", unsigned(m.bits), ", expected 1");
  if (m.bucket != 0) fail(where, "message.bucket = ", m.bucket, ", expected 0 (one scale group per layer)");
  check_same_size(where, "message.scales", m.scales.size(), "the scale groups", expected_scales);
  check_same_size(where, "message.words", m.words.size(), "word_count(dimension, 1)",
                  quantized::word_count(n, 1));
  for (std::size_t j = 0; j < m.scales.size(); ++j)
    if (!std::isfinite(m.scales[j]))
      fail(where, "message.scales[", j, "] = ", m.scales[j], " is not finite");
  for (const auto& [b, e] : gaps)
    for (std::size_t i = b; i < e; ++i)
      if (quantized::read_code(m.words.data(), i, 1) != 0)
        fail(where, "message bit ", i, " is set but element ", i, " lies in a gap of the layout");
}

/// The class shell shared by gcomp::sign and gcomp::onebit (CRTP): one bit
/// per element (bit i = g_i >= 0) plus Derived::scales_per_group scales (T)
/// per group, a group being the whole buffer or, when constructed with a
/// layout, each layer. Holds the layout and its gaps, the staging words, the
/// payload typedefs and traits, wire_bytes / bits_per_element and the group
/// accessors; the derived class supplies compress and decompress_add (its
/// formula) from the protected helpers. Derived must provide
/// scales_per_group and bits_per_element_where (the name in error messages).
template <class Derived, class T>
class one_bit_compressor {
 public:
  using value_type = T;
  using payload = quantized_payload<T>;
  static constexpr bool unbiased = false;
  static constexpr bool shared_support = false;

  std::size_t wire_bytes(const payload& message) const { return encoded_size(message); }

  /// Exact: 8 (24 + 17 + scales_per_group sizeof(T) groups + ceil(n / 8)) / n.
  double bits_per_element(std::size_t n) const {
    if (n == 0) return 0.0;
    const std::size_t groups = per_layer_ ? groups_for(Derived::bits_per_element_where, n).count() : 1;
    const std::size_t bytes = wire::header_bytes + 17 + Derived::scales_per_group * groups * sizeof(T) +
                              wire::packed_bytes(n, 1);
    return 8.0 * static_cast<double>(bytes) / static_cast<double>(n);
  }

  /// Scale groups: 1, or the layout's layers.
  std::size_t groups() const { return per_layer_ ? layout_.num_layers() : 1; }
  bool per_layer() const { return per_layer_; }
  const layout& layers() const { return layout_; }

 protected:
  using gap_list = std::vector<std::pair<std::size_t, std::size_t>>;

  one_bit_compressor() = default;
  explicit one_bit_compressor(layout lay)
      : layout_(std::move(lay)), per_layer_(true), gaps_(layout_gaps(layout_)) {}

  /// The groups for an n-element buffer `name`; checks n against the layout.
  sign_groups groups_for(std::string_view where, std::size_t n,
                         std::string_view name = "gradient") const {
    if (per_layer_) layout_.check_buffer(where, name, n);
    return sign_groups{per_layer_ ? &layout_ : nullptr, n};
  }

  using acc = sign_accumulator<T>;

  /// The compress skeleton. For s < Sums and every group d, sum_s(d) = the
  /// sum over i in d of term(s, g_i) (type acc, the fixed reduction order):
  /// one read pass with the bits for the whole buffer (fused_sums_and_bits),
  /// else per-layer reductions and then the packing; under a device policy
  /// the sums and bits of detail/sign_device.hpp, bitwise the same (term is
  /// then called on the device: a GCOMP_HD functor). A non-finite sum throws
  /// naming the group's first non-finite element, else (prefix, d, suffix),
  /// before the message is touched. Then the message gets bits 1, bucket 0,
  /// the bits, and for each group the scales_per_group scales that
  /// scales(begin, size, sum, out) writes to out from sum[s] = sum_s(d);
  /// the bits are in staged_ during that call.
  template <std::size_t Sums, class Policy, class Term, class Scales>
  void compress_groups(const Policy& policy, std::span<const T> gradient, payload& message,
                       std::string_view where, std::string_view prefix, std::string_view suffix,
                       Term term, Scales scales) {
    const std::size_t n = gradient.size();
    const sign_groups groups = groups_for(where, n);
    const std::size_t count = groups.count();
    const T* g = gradient.data();
    sums_.resize(Sums * count);  // sums_[s * count + d]
    staged_.resize(quantized::word_count(n, 1));
    if constexpr (!host_policy<Policy>) {
      sign_device_sums<Sums, acc>(policy, groups.lay, gradient, sums_.data(), term);
    } else if (!per_layer_) {
      fused_sums_and_bits<Sums, acc>(policy, g, n, staged_.data(), sums_.data(), term);
    } else {
      [&]<std::size_t... S>(std::index_sequence<S...>) {
        (reduce_groups(policy, groups, std::span<acc>(sums_.data() + S * count, count), acc(0),
                       [](acc a, acc b) { return a + b; },
                       [=](std::size_t i) { return term(S, g[i]); }),
         ...);
      }(std::make_index_sequence<Sums>{});
    }
    for (std::size_t d = 0; d < count; ++d)
      for (std::size_t s = 0; s < Sums; ++s)
        if (!std::isfinite(sums_[s * count + d])) {
          const std::size_t begin = groups.offset(d);
          const std::size_t end = begin + groups.size(d);
          if constexpr (!host_policy<Policy>)
            sign_device_throw_first_non_finite(policy, where, gradient, begin, end);
          else
            throw_first_non_finite(where, g, begin, end);
          fail(where, prefix, d, suffix);
        }
    // Nothing can fail from here on (but a device error).
    if constexpr (!host_policy<Policy>) {
      sign_device_pack(policy, gradient, device_words_, std::span<std::uint64_t>(staged_), where);
      for (const auto& [b, e] : gaps_) clear_bits(staged_.data(), b, e);
    } else if (per_layer_) {
      pack_bits_of(policy, n, g, staged_.data());
    }
    message.dimension = n;
    message.bits = 1;
    message.bucket = 0;
    message.scales.resize(Derived::scales_per_group * count);
    for (std::size_t d = 0; d < count; ++d) {
      acc sum[Sums];
      for (std::size_t s = 0; s < Sums; ++s) sum[s] = sums_[s * count + d];
      scales(groups.offset(d), groups.size(d), static_cast<const acc*>(sum),
             message.scales.data() + Derived::scales_per_group * d);
    }
    message.words.swap(staged_);
  }

  /// words[w] for w < word_count(n, 1) with bit i = (g[i] >= 0), gaps cleared.
  template <class Policy>
  void pack_bits_of(const Policy& policy, std::size_t n, const T* g, std::uint64_t* words) const {
    pack_ge_zero(policy, n, g, words);
    for (const auto& [b, e] : gaps_) clear_bits(words, b, e);
  }

  /// The groups of an n-element out, once message has passed
  /// check_one_bit_payload with scales_per_group scales per group.
  sign_groups checked_groups(std::string_view where, const payload& message, std::size_t n) const {
    const sign_groups groups = groups_for(where, n, "out");
    check_one_bit_payload(where, message, n, Derived::scales_per_group * groups.count(), gaps_);
    return groups;
  }

  /// out[i] += bit_i ? up : down for i in group d, where {up, down} = levels(d);
  /// gap elements are left alone. Both sides add with sign_level_adder
  /// (detail/sign_device.hpp); under a device policy the words are uploaded
  /// to device scratch first (one kernel per group, as on the host).
  template <class Policy, class Levels>
  void add_levels(const Policy& policy, std::string_view where, const sign_groups& groups,
                  const payload& message, std::span<T> out, Levels levels) const {
    const std::uint64_t* words = message.words.data();
    if constexpr (!host_policy<Policy>)
      words = sign_device_upload_words(policy, message.words, device_words_, where);
    for (std::size_t d = 0; d < groups.count(); ++d) {
      const std::pair<T, T> level = levels(d);
      for_each_index(policy, groups.size(d),
                     sign_level_adder<T>{words, out.data(), groups.offset(d), level.first, level.second});
    }
  }

  layout layout_;
  bool per_layer_ = false;
  gap_list gaps_;
  std::vector<acc> sums_;              // per sum and group, reused
  std::vector<std::uint64_t> staged_;  // the bits before they reach the message
  // Device scratch under cuda_par / thrust_device (the bits, or a message's
  // words for decompress_add), sized at the first device call; mutable for
  // decompress_add: one object must not decompress on two threads at once
  // under a device policy.
  mutable policy_buffer<std::uint64_t> device_words_;
};

}  // namespace gcomp::detail::sign_impl
