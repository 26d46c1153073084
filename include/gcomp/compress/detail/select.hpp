// Exact selection of the k largest magnitudes on the host: radix select on IEEE bit patterns, with a sampled one-pass shortcut (used by top-k and the threshold compressors).
//
// |x| of an IEEE float with the sign bit cleared orders exactly like an
// unsigned integer (zeros < denormals < normals < infinity < NaN), so the
// k-th largest magnitude is found by a radix select on those 31 (or 63) bit
// "keys": histogram 11 bits at a time, keep the bin that holds the k-th
// largest, and refine only inside it. Ties are broken by the lower index: the
// selection is every element whose key is above the k-th key T, plus the
// first (k - count_above) elements whose key equals T, in index order.
//
// Two ways to the same answer (the result never depends on the path or on
// the thread count; only the time does):
//  - sampled shortcut: a fixed, evenly spread sample of the keys gives a lower
//    bound B on the k-th key with a wide margin; one pass gathers every
//    element with key >= B (usually 1.2 to 3 k of them) and checks finiteness;
//    if at least k were gathered the exact top-k lies among them and is
//    selected there. If fewer than k were gathered, or far more than expected
//    (ties, odd distributions), the work is dropped and the radix path runs.
//  - radix path: full passes of 11-bit histograms (per-chunk, so parallel and
//    deterministic: counts are integers) until the bin holding the k-th key
//    is small enough to gather; the rest is refined on the gathered list. If
//    the bin never gets small (all elements equal), the last level yields the
//    exact key T and one emission pass writes the result.
// The gathering pass is the hot loop: with AVX-512 it compresses the hits of
// 16 keys into place, with AVX2 it left-packs 8 through a permutation table,
// otherwise a portable loop tests 16 keys branch-free before writing; all
// write unconditionally and advance by the comparison, so it runs at about
// the speed of a read pass whatever the kept fraction. Refining a gathered
// list works on keys relative to its smallest, so one 11-bit histogram
// splits it and the few candidates left are refined on their own.
// Non-finite values (NaN, +-inf) are rejected with gcomp::error naming the
// first such index, found in the first pass over the data and before
// anything is written: a gradient with a NaN is a bug upstream, and letting
// top-k pick NaNs as "largest" would spread it to every worker.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include "gcomp/core/error.hpp"
#include "gcomp/exec/host.hpp"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace gcomp::detail {

/// The magnitude key of a float or double: its bits with the sign cleared.
/// The error of a top-k or threshold selection that met gradient[i] = value,
/// not finite (the host selection, the GPU top-k and the device threshold).
template <class T>
[[noreturn]] void fail_selection_nonfinite(std::string_view where, std::size_t i, T value) {
  fail(where, "gradient[", i, "] = ", value, " is not finite; top-k and threshold selection need finite values");
}

template <class T>
struct magnitude_bits {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "magnitude selection needs float or double values");
  using key_type = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  // Signed twin: keys are below 2^31 (2^63), so signed compares order them
  // alike and vectorize on every x86 level (AVX2 has no unsigned compare).
  using signed_key = std::make_signed_t<key_type>;
  static constexpr unsigned key_bits = 8 * sizeof(T) - 1;
  static constexpr key_type mask = ~key_type(0) >> 1;
  static constexpr key_type infinity = std::bit_cast<key_type>(std::numeric_limits<T>::infinity());

  static key_type key(T x) { return std::bit_cast<key_type>(x) & mask; }
  static signed_key signed_key_of(T x) { return static_cast<signed_key>(key(x)); }
};

inline constexpr unsigned radix_bits = 11;
inline constexpr std::size_t radix_bins = std::size_t{1} << radix_bits;

/// Levels of 11-bit digits covering a key: 3 for float (11, 11, 9 bits), 6 for double.
constexpr unsigned radix_levels(unsigned key_bits) { return (key_bits + radix_bits - 1) / radix_bits; }
/// Bit position of level `level`'s digit (0 at the last level).
constexpr unsigned radix_shift(unsigned key_bits, unsigned level) {
  const unsigned consumed = radix_bits * (level + 1);
  return consumed >= key_bits ? 0u : key_bits - consumed;
}
/// Width of level `level`'s digit.
constexpr unsigned radix_width(unsigned key_bits, unsigned level) {
  return key_bits - radix_bits * level - radix_shift(key_bits, level);
}

// Elements per chunk below which splitting a pass across threads does not pay.
inline constexpr std::size_t select_grain = std::size_t{1} << 16;

inline std::size_t select_chunk_count(const host_seq&, std::size_t) { return 1; }
inline std::size_t select_chunk_count(const host_par& policy, std::size_t n) {
  if (policy.threads() == 1 || n < 2 * select_grain) return 1;
  // A few chunks per thread balance the load on a shared machine.
  return std::min<std::size_t>(std::size_t{policy.threads()} * 4, n / select_grain);
}

template <class F>
void run_chunks(const host_seq&, std::size_t chunks, F& f) {
  for (std::size_t c = 0; c < chunks; ++c) f(c);
}
template <class F>
void run_chunks(const host_par& policy, std::size_t chunks, F& f) {
  policy.pool().run(chunks, f);
}

inline constexpr std::size_t no_position = std::numeric_limits<std::size_t>::max();

// Room a scan_segment call needs past `count`: one slot per element plus a
// full vector of slack (the SIMD kernels store whole vectors).
inline constexpr std::size_t scan_slack = 16;

/// Appends, in index order, i to ci and p[i] to cv (from position count) for
/// every i in [begin, end) with key(p[i]) >= bound, where bound <=
/// key(infinity). Stops at the first non-finite element and returns its
/// index; returns no_position otherwise. Needs room for (end - begin) +
/// scan_slack entries from count. Writes are unconditional and the count
/// advances by the comparison, so the kept fraction costs no mispredictions.
template <class T>
std::size_t scan_segment_scalar(const T* p, std::size_t begin, std::size_t end,
                                typename magnitude_bits<T>::key_type bound, std::uint32_t* ci,
                                T* cv, std::size_t& count) {
  using bits = magnitude_bits<T>;
  using sk = typename bits::signed_key;
  const sk b = static_cast<sk>(bound), inf = static_cast<sk>(bits::infinity);
  std::size_t i = begin;
  std::size_t at = count;
  // Blocks of 16: a branch-free test the compiler vectorizes decides whether
  // the block has anything to write at all (most blocks do not).
  for (; i + 16 <= end; i += 16) {
    int hit = 0, bad = 0;
    for (std::size_t j = 0; j < 16; ++j) {
      const sk key = bits::signed_key_of(p[i + j]);
      hit |= key >= b ? 1 : 0;
      bad |= key >= inf ? 1 : 0;
    }
    if (bad != 0) {
      for (std::size_t j = 0;; ++j)
        if (bits::signed_key_of(p[i + j]) >= inf) {
          count = at;
          return i + j;
        }
    }
    if (hit == 0) continue;
    for (std::size_t j = 0; j < 16; ++j) {
      ci[at] = static_cast<std::uint32_t>(i + j);
      cv[at] = p[i + j];
      at += bits::signed_key_of(p[i + j]) >= b ? 1 : 0;
    }
  }
  for (; i < end; ++i) {
    const sk key = bits::signed_key_of(p[i]);
    if (key >= inf) {
      count = at;
      return i;
    }
    ci[at] = static_cast<std::uint32_t>(i);
    cv[at] = p[i];
    at += key >= b ? 1 : 0;
  }
  count = at;
  return no_position;
}

template <class T>
std::size_t scan_segment(const T* p, std::size_t begin, std::size_t end,
                         typename magnitude_bits<T>::key_type bound, std::uint32_t* ci, T* cv,
                         std::size_t& count) {
  return scan_segment_scalar(p, begin, end, bound, ci, cv, count);
}

#if defined(__AVX512F__)
// AVX-512: compare 16 keys, compress the hits' indices and values into the
// low lanes and store whole vectors (the register form of compress: the
// memory form is microcoded and slow on AMD Zen 4).
template <>
inline std::size_t scan_segment<float>(const float* p, std::size_t begin, std::size_t end,
                                       std::uint32_t bound, std::uint32_t* ci, float* cv,
                                       std::size_t& count) {
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  const __m512i b = _mm512_set1_epi32(static_cast<int>(bound));
  const __m512i inf = _mm512_set1_epi32(0x7f800000);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  std::size_t i = begin;
  std::size_t at = count;
  for (; i + 16 <= end; i += 16) {
    const __m512i v = _mm512_loadu_si512(p + i);
    const __m512i key = _mm512_and_si512(v, magnitude);
    const __mmask16 bad = _mm512_cmpge_epi32_mask(key, inf);
    if (bad != 0) {
      count = at;
      return i + static_cast<std::size_t>(std::countr_zero(static_cast<unsigned>(bad)));
    }
    const __mmask16 hit = _mm512_cmpge_epi32_mask(key, b);
    const __m512i index =
        _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(i))), lanes);
    _mm512_storeu_si512(ci + at, _mm512_maskz_compress_epi32(hit, index));
    _mm512_storeu_si512(cv + at, _mm512_maskz_compress_epi32(hit, v));
    at += static_cast<std::size_t>(std::popcount(static_cast<unsigned>(hit)));
  }
  count = at;
  if (i < end) return scan_segment_scalar(p, i, end, bound, ci, cv, count);
  return no_position;
}
#elif defined(__AVX2__)
// AVX2 has no compress: a 256-entry table of lane permutations left-packs
// the hits of 8 keys (the classic movemask + permutevar8x32 idiom).
struct left_pack_table {
  alignas(32) std::uint32_t lanes[256][8];
  constexpr left_pack_table() : lanes{} {
    for (unsigned mask = 0; mask < 256; ++mask) {
      unsigned out = 0;
      for (unsigned lane = 0; lane < 8; ++lane)
        if (mask & (1u << lane)) lanes[mask][out++] = lane;
      for (; out < 8; ++out) lanes[mask][out] = 0;
    }
  }
};
inline constexpr left_pack_table left_pack{};

template <>
inline std::size_t scan_segment<float>(const float* p, std::size_t begin, std::size_t end,
                                       std::uint32_t bound, std::uint32_t* ci, float* cv,
                                       std::size_t& count) {
  const __m256i magnitude = _mm256_set1_epi32(0x7fffffff);
  // key >= bound as key > bound - 1 (bound - 1 = -1 when bound is 0: every key passes).
  const __m256i below = _mm256_set1_epi32(static_cast<int>(bound) - 1);
  const __m256i below_inf = _mm256_set1_epi32(0x7f800000 - 1);
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  std::size_t i = begin;
  std::size_t at = count;
  for (; i + 8 <= end; i += 8) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
    const __m256i key = _mm256_and_si256(v, magnitude);
    const int bad = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, below_inf)));
    if (bad != 0) {
      count = at;
      return i + static_cast<std::size_t>(std::countr_zero(static_cast<unsigned>(bad)));
    }
    const int hit = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, below)));
    const __m256i order =
        _mm256_load_si256(reinterpret_cast<const __m256i*>(left_pack.lanes[hit]));
    const __m256i index =
        _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<std::uint32_t>(i))), lanes);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ci + at), _mm256_permutevar8x32_epi32(index, order));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cv + at), _mm256_permutevar8x32_epi32(v, order));
    at += static_cast<std::size_t>(std::popcount(static_cast<unsigned>(hit)));
  }
  count = at;
  if (i < end) return scan_segment_scalar(p, i, end, bound, ci, cv, count);
  return no_position;
}
#endif

/// Which route the last select_topk took (tests check both are exercised).
enum class select_path { trivial, sampled, radix_gather, radix_full };

/// Exact k-largest-magnitude selection with its reusable workspace: after the
/// first call of a given size nothing is allocated.
template <class T>
class magnitude_selector {
 public:
  using bits = magnitude_bits<T>;
  using key_type = typename bits::key_type;
  using signed_key = typename bits::signed_key;
  static constexpr unsigned levels = radix_levels(bits::key_bits);

  /// The sampled shortcut is on by default; tests turn it off to run the
  /// radix path alone on the same inputs.
  bool speculate = true;
  select_path last_path = select_path::trivial;

  /// Writes the k elements of x with the largest |x| (ties: lower index
  /// first) to indices[0, k) as offset + i, increasing, and their values to
  /// values[0, k). Requires k <= x.size() <= 2^32. Throws gcomp::error naming
  /// the first non-finite element (as offset + i) before writing anything.
  template <class Policy, class Index>
  void select_topk(const Policy& policy, std::span<const T> x, std::size_t k, std::size_t offset,
                   Index* indices, T* values, std::string_view where) {
    const std::size_t n = x.size();
    require(k <= n, where, "k = ", k, " exceeds the number of elements ", n);
    require(static_cast<std::uint64_t>(n) <= (std::uint64_t{1} << 32), where, "size ", n,
            " exceeds the 2^32 elements one selection handles");
    last_path = select_path::trivial;
    if (k == 0) return;
    if (k == n) {
      check_finite(policy, x, offset, where);
      const T* p = x.data();
      for_each_index(policy, n, [=](std::size_t i) {
        indices[i] = static_cast<Index>(offset + i);
        values[i] = p[i];
      });
      return;
    }
    if (speculate && try_sampled(policy, x, k, offset, indices, values, where)) return;
    radix_select(policy, x, k, offset, indices, values, where);
  }

  /// Gathers every element with key(x_i) >= bound (bound <= bits::infinity)
  /// into the per-chunk lists, in index order; returns how many. With cap > 0
  /// it gives up once more than about cap were found and sets `overflow`
  /// (the lists are then incomplete and non-finite values may be unseen).
  /// Without overflow, a non-finite element throws, naming offset + i.
  template <class Policy>
  std::size_t gather_at_least(const Policy& policy, std::span<const T> x, key_type bound,
                              std::size_t cap, std::size_t offset, std::string_view where,
                              bool& overflow) {
    const std::size_t n = x.size();
    plan_chunks(policy, n);
    const key_type b = std::min(bound, bits::infinity);
    auto task = [&](std::size_t c) {
      const std::size_t begin = c * chunk_size_, end = std::min(n, begin + chunk_size_);
      // A chunk may keep its share of cap plus some slack; uncapped, it grows.
      std::size_t limit = no_position;
      if (cap != 0)
        limit = static_cast<std::size_t>(static_cast<double>(cap) * static_cast<double>(end - begin) /
                                         static_cast<double>(n)) + 256;
      scan_chunk(x.data(), begin, end, b, limit, c);
    };
    run_chunks(policy, chunks_, task);
    overflow = false;
    std::size_t count = 0, first_bad = no_position;
    for (std::size_t c = 0; c < chunks_; ++c) {
      overflow = overflow || chunk_overflow_[c] != 0;
      count += chunk_count_[c];
      first_bad = std::min(first_bad, chunk_nonfinite_[c]);
    }
    // After an overflow some chunks stopped early, so the first non-finite
    // index is unknown; the caller falls back to a path that finds it.
    if (!overflow && first_bad != no_position) fail_nonfinite(x, first_bad, offset, where);
    gathered_ = count;
    return count;
  }

  /// Writes everything gather_at_least collected, in index order.
  template <class Policy, class Index>
  void emit_gathered(const Policy& policy, std::size_t offset, Index* indices, T* values) const {
    std::size_t at = 0;
    for (std::size_t c = 0; c < chunks_; ++c) {
      const std::uint32_t* ci = chunk_index_[c].data();
      const T* cv = chunk_value_[c].data();
      Index* oi = indices + at;
      T* ov = values + at;
      for_each_index(policy, chunk_count_[c], [=](std::size_t j) {
        oi[j] = static_cast<Index>(offset + ci[j]);
        ov[j] = cv[j];
      });
      at += chunk_count_[c];
    }
  }

  /// The exact top-k (1 <= k <= gathered()) of what was gathered: the top-k
  /// of x itself when every element left out is smaller than the k-th kept.
  template <class Index>
  void select_from_gathered(std::size_t k, std::size_t offset, Index* indices, T* values) {
    std::size_t ties = 0;
    const key_type threshold = kth_gathered_key(k, ties);
    emit_from_gathered(threshold, ties, k, offset, indices, values);
  }

  std::size_t gathered() const { return gathered_; }

 private:
  // Elements a chunk scans between checks of its list's room.
  static constexpr std::size_t segment = 4096;

  template <class Policy>
  void plan_chunks(const Policy& policy, std::size_t n) {
    chunks_ = select_chunk_count(policy, n);
    chunk_size_ = std::max<std::size_t>(1, (n + chunks_ - 1) / chunks_);
    chunks_ = std::max<std::size_t>(1, (n + chunk_size_ - 1) / chunk_size_);
    if (chunk_index_.size() < chunks_) {
      chunk_index_.resize(chunks_);
      chunk_value_.resize(chunks_);
    }
    chunk_count_.assign(chunks_, 0);
    chunk_overflow_.assign(chunks_, 0);
    chunk_nonfinite_.assign(chunks_, no_position);
  }

  // One chunk of a gather, a segment at a time: before each segment the
  // list gets room for the whole segment, so the kernel never checks.
  void scan_chunk(const T* p, std::size_t begin, std::size_t end, key_type bound, std::size_t limit,
                  std::size_t c) {
    std::vector<std::uint32_t>& ci = chunk_index_[c];
    std::vector<T>& cv = chunk_value_[c];
    std::size_t count = 0;
    for (std::size_t at = begin; at < end; at += segment) {
      if (count > limit) {
        chunk_overflow_[c] = 1;
        break;
      }
      const std::size_t stop = std::min(end, at + segment);
      const std::size_t room = count + (stop - at) + scan_slack;
      if (ci.size() < room) {
        // Doubling, but a capped list never beyond its cap plus one segment.
        const std::size_t ceiling = limit == no_position ? no_position : limit + segment + scan_slack;
        const std::size_t grown = std::max(room, std::min(2 * ci.size(), ceiling));
        ci.resize(grown);
        cv.resize(grown);
      }
      const std::size_t bad = scan_segment<T>(p, at, stop, bound, ci.data(), cv.data(), count);
      if (bad != no_position) {
        chunk_nonfinite_[c] = bad;
        break;
      }
    }
    chunk_count_[c] = count;
  }

  template <class Policy>
  void check_finite(const Policy& policy, std::span<const T> x, std::size_t offset,
                    std::string_view where) {
    bool overflow = false;
    gather_at_least(policy, x, bits::infinity, 0, offset, where, overflow);
  }

  [[noreturn]] static void fail_nonfinite(std::span<const T> x, std::size_t i, std::size_t offset,
                                          std::string_view where) {
    fail_selection_nonfinite(where, offset + i, x[i]);
  }

  // The sampled shortcut; false when it does not apply or did not succeed.
  template <class Policy, class Index>
  bool try_sampled(const Policy& policy, std::span<const T> x, std::size_t k, std::size_t offset,
                   Index* indices, T* values, std::string_view where) {
    // 1024 groups of 16 neighbours: one cache line per group keeps the
    // sample cheap (a strided single-element sample touches a page each).
    constexpr std::size_t groups = 1024, group = 16, s = groups * group;
    const std::size_t n = x.size();
    if (n < 4 * s) return false;
    const double expected = static_cast<double>(k) * static_cast<double>(s) / static_cast<double>(n);
    // The sample rank of the bound: the expected rank of the k-th key plus
    // four standard deviations and a constant, so the bound falls below the
    // k-th key except with tiny probability (then the radix path runs).
    const auto rank = static_cast<std::size_t>(std::ceil(expected + 4.0 * std::sqrt(expected) + 8.0));
    if (rank >= s / 4) return false;
    sample_.resize(s);
    const std::size_t stride = n / groups;
    for (std::size_t g = 0; g < groups; ++g)
      for (std::size_t j = 0; j < group; ++j) sample_[g * group + j] = bits::key(x[g * stride + j]);
    std::nth_element(sample_.begin(), sample_.begin() + static_cast<std::ptrdiff_t>(rank),
                     sample_.end(), std::greater<key_type>());
    const key_type bound = std::min(sample_[rank], bits::infinity);
    if (bound == 0) return false;  // the bound would gather every zero
    const std::size_t cap = std::min(
        n, std::max(k, static_cast<std::size_t>(2.0 * static_cast<double>(n) *
                                                 static_cast<double>(rank + 1) / static_cast<double>(s))) +
               1024);
    bool overflow = false;
    const std::size_t count = gather_at_least(policy, x, bound, cap, offset, where, overflow);
    if (overflow || count < k) return false;
    select_from_gathered(k, offset, indices, values);
    last_path = select_path::sampled;
    return true;
  }

  // Picks, from a histogram of the digits of the keys inside the current
  // range, the digit holding the k-th largest key; `above` grows by the
  // count of keys in higher digits.
  static unsigned choose_digit(const std::size_t* total, unsigned width, std::size_t k,
                               std::size_t& above) {
    for (std::size_t d = (std::size_t{1} << width); d-- > 0;) {
      if (above + total[d] >= k) return static_cast<unsigned>(d);
      above += total[d];
    }
    return 0;  // unreachable while k <= the number of keys in range
  }

  template <class Policy, class Index>
  void radix_select(const Policy& policy, std::span<const T> x, std::size_t k, std::size_t offset,
                    Index* indices, T* values, std::string_view where) {
    const std::size_t n = x.size();
    plan_chunks(policy, n);
    const T* p = x.data();
    sub_.resize(chunks_ * 4 * radix_bins);
    hist_.resize(chunks_ * radix_bins);
    above_.assign(chunks_, 0);
    inbin_.assign(chunks_, 0);
    total_.resize(radix_bins);
    // Gathering writes 8 (or 12) bytes per listed element; more than this
    // and one more histogram pass is the cheaper way to shrink the bin.
    const std::size_t gather_limit = std::max(k, n / 16);
    key_type prefix = 0;
    std::size_t above = 0;
    for (unsigned level = 0; level < levels; ++level) {
      const unsigned shift = radix_shift(bits::key_bits, level);
      const unsigned width = radix_width(bits::key_bits, level);
      const unsigned range_shift = level == 0 ? 0 : radix_shift(bits::key_bits, level - 1);
      auto task = [&](std::size_t c) {
        const std::size_t begin = c * chunk_size_, end = std::min(n, begin + chunk_size_);
        histogram_chunk(p, begin, end, level == 0, range_shift, prefix, shift, width, c);
      };
      run_chunks(policy, chunks_, task);
      const std::size_t bins = std::size_t{1} << width;
      std::fill(total_.begin(), total_.begin() + static_cast<std::ptrdiff_t>(bins), 0);
      for (std::size_t c = 0; c < chunks_; ++c)
        for (std::size_t d = 0; d < bins; ++d) total_[d] += hist_[c * radix_bins + d];
      if (level == 0) {
        // Infinity and NaN keys fill the top digits of the first level.
        std::size_t nonfinite = 0;
        for (std::size_t d = bits::infinity >> shift; d < bins; ++d) nonfinite += total_[d];
        if (nonfinite != 0)
          for (std::size_t i = 0; i < n; ++i)
            if (bits::key(p[i]) >= bits::infinity) fail_nonfinite(x, i, offset, where);
      }
      const unsigned digit = choose_digit(total_.data(), width, k, above);
      for (std::size_t c = 0; c < chunks_; ++c) {
        const std::size_t* h = hist_.data() + c * radix_bins;
        for (std::size_t d = digit + 1; d < bins; ++d) above_[c] += h[d];
        inbin_[c] = h[digit];
      }
      prefix = static_cast<key_type>((prefix << width) | digit);
      if (shift == 0) {  // prefix is now the k-th key itself
        emit_full(policy, x, prefix, k - above, offset, indices, values);
        last_path = select_path::radix_full;
        return;
      }
      if (above + total_[digit] <= gather_limit) {
        // Everything from the bin's lower end up: the top-k lies within.
        bool overflow = false;
        gather_at_least(policy, x, static_cast<key_type>(prefix << shift), 0, offset, where, overflow);
        select_from_gathered(k, offset, indices, values);
        last_path = select_path::radix_gather;
        return;
      }
    }
  }

  // Histogram of one chunk's digits at one level into hist_ (4 interleaved
  // sub-histograms, so runs of equal digits do not serialize on one counter).
  void histogram_chunk(const T* p, std::size_t begin, std::size_t end, bool all, unsigned range_shift,
                       key_type prefix, unsigned shift, unsigned width, std::size_t c) {
    std::uint32_t* h = sub_.data() + c * 4 * radix_bins;
    std::fill(h, h + 4 * radix_bins, 0u);
    std::uint32_t* h0 = h;
    std::uint32_t* h1 = h + radix_bins;
    std::uint32_t* h2 = h + 2 * radix_bins;
    std::uint32_t* h3 = h + 3 * radix_bins;
    const key_type digit_mask = static_cast<key_type>((key_type{1} << width) - 1);
    std::size_t i = begin;
    if (all) {
      for (; i + 4 <= end; i += 4) {
        ++h0[bits::key(p[i]) >> shift];
        ++h1[bits::key(p[i + 1]) >> shift];
        ++h2[bits::key(p[i + 2]) >> shift];
        ++h3[bits::key(p[i + 3]) >> shift];
      }
      for (; i < end; ++i) ++h0[bits::key(p[i]) >> shift];
    } else {
      auto add = [&](std::uint32_t* hh, T v) {
        const key_type k = bits::key(v);
        if ((k >> range_shift) == prefix) ++hh[(k >> shift) & digit_mask];
      };
      for (; i + 4 <= end; i += 4) {
        add(h0, p[i]);
        add(h1, p[i + 1]);
        add(h2, p[i + 2]);
        add(h3, p[i + 3]);
      }
      for (; i < end; ++i) add(h0, p[i]);
    }
    std::size_t* out = hist_.data() + c * radix_bins;
    const std::size_t bins = std::size_t{1} << width;
    for (std::size_t d = 0; d < bins; ++d)
      out[d] = std::size_t{h0[d]} + h1[d] + std::size_t{h2[d]} + h3[d];
  }

  // The k-th largest key among the gathered elements, and how many keys
  // equal to it the top-k takes (`ties`). The keys are taken relative to the
  // smallest gathered key, so the first 11-bit digit already splits the
  // narrow range they span; the candidates left in the chosen bin (a few
  // hundred, typically) are copied out and refined on their own.
  key_type kth_gathered_key(std::size_t k, std::size_t& ties) {
    key_type lo = bits::infinity, hi = 0;
    for (std::size_t c = 0; c < chunks_; ++c) {
      const T* cv = chunk_value_[c].data();
      for (std::size_t j = 0; j < chunk_count_[c]; ++j) {
        const key_type key = bits::key(cv[j]);
        lo = std::min(lo, key);
        hi = std::max(hi, key);
      }
    }
    if (lo == hi) {
      ties = k;
      return lo;
    }
    unsigned shift = static_cast<unsigned>(std::bit_width(static_cast<key_type>(hi - lo)));
    shift = shift > radix_bits ? shift - radix_bits : 0;
    sub_.resize(std::max(sub_.size(), 4 * radix_bins));
    std::uint32_t* h = sub_.data();
    std::fill(h, h + 4 * radix_bins, 0u);
    std::size_t slot = 0;
    for (std::size_t c = 0; c < chunks_; ++c) {
      const T* cv = chunk_value_[c].data();
      for (std::size_t j = 0; j < chunk_count_[c]; ++j, ++slot)
        ++h[(slot & 3) * radix_bins + ((bits::key(cv[j]) - lo) >> shift)];
    }
    total_.resize(radix_bins);
    for (std::size_t d = 0; d < radix_bins; ++d)
      total_[d] = std::size_t{h[d]} + h[radix_bins + d] + std::size_t{h[2 * radix_bins + d]} +
                  h[3 * radix_bins + d];
    std::size_t above = 0;
    key_type prefix = choose_digit(total_.data(), radix_bits, k, above);
    candidates_.resize(total_[prefix]);
    std::size_t m = 0;
    for (std::size_t c = 0; c < chunks_; ++c) {
      const T* cv = chunk_value_[c].data();
      for (std::size_t j = 0; j < chunk_count_[c]; ++j) {
        const key_type rel = static_cast<key_type>(bits::key(cv[j]) - lo);
        if ((rel >> shift) == prefix) candidates_[m++] = rel;
      }
    }
    while (shift > 0) {
      const unsigned next = shift > radix_bits ? shift - radix_bits : 0;
      const unsigned width = shift - next;
      const key_type digit_mask = static_cast<key_type>((key_type{1} << width) - 1);
      std::fill(total_.begin(), total_.begin() + (std::ptrdiff_t{1} << width), 0);
      for (std::size_t j = 0; j < m; ++j) ++total_[(candidates_[j] >> next) & digit_mask];
      const unsigned digit = choose_digit(total_.data(), width, k, above);
      prefix = static_cast<key_type>((prefix << width) | digit);
      std::size_t kept = 0;
      for (std::size_t j = 0; j < m; ++j)
        if ((candidates_[j] >> next) == prefix) candidates_[kept++] = candidates_[j];
      m = kept;
      shift = next;
    }
    ties = k - above;
    return static_cast<key_type>(lo + prefix);
  }

  // Writes the gathered keys above `threshold` and the first `ties` equal
  // to it, in index order: k entries. Branch-free: every entry is written
  // at the current slot and the slot advances when it is taken; the loop
  // ends when k are taken, so no slot past k - 1 is ever written.
  template <class Index>
  void emit_from_gathered(key_type threshold, std::size_t ties, std::size_t k, std::size_t offset,
                          Index* indices, T* values) const {
    std::size_t at = 0;
    for (std::size_t c = 0; c < chunks_ && at < k; ++c) {
      const std::uint32_t* ci = chunk_index_[c].data();
      const T* cv = chunk_value_[c].data();
      for (std::size_t j = 0; j < chunk_count_[c] && at < k; ++j) {
        const key_type key = bits::key(cv[j]);
        const bool tie = key == threshold && ties > 0;
        const bool take = key > threshold || tie;
        ties -= tie ? 1 : 0;
        indices[at] = static_cast<Index>(offset + ci[j]);
        values[at] = cv[j];
        at += take ? 1 : 0;
      }
    }
  }

  // The emission pass when the k-th key was found without gathering: chunk c
  // writes its keys above the threshold and its share of the ties (the first
  // `ties` equal keys overall), at an offset known from the per-chunk counts.
  template <class Policy, class Index>
  void emit_full(const Policy& policy, std::span<const T> x, key_type threshold, std::size_t ties,
                 std::size_t offset, Index* indices, T* values) {
    const std::size_t n = x.size();
    const T* p = x.data();
    out_at_.resize(chunks_);
    quota_.resize(chunks_);
    std::size_t at = 0;
    for (std::size_t c = 0; c < chunks_; ++c) {
      quota_[c] = std::min(ties, inbin_[c]);
      ties -= quota_[c];
      out_at_[c] = at;
      at += above_[c] + quota_[c];
    }
    const signed_key b = static_cast<signed_key>(threshold);
    auto task = [&](std::size_t c) {
      const std::size_t begin = c * chunk_size_, end = std::min(n, begin + chunk_size_);
      std::size_t out = out_at_[c];
      std::size_t quota = quota_[c];
      for (std::size_t i = begin; i < end; ++i) {
        const signed_key key = bits::signed_key_of(p[i]);
        if (key > b || (key == b && quota > 0)) {
          if (key == b) --quota;
          indices[out] = static_cast<Index>(offset + i);
          values[out] = p[i];
          ++out;
        }
      }
    };
    run_chunks(policy, chunks_, task);
  }

  std::size_t chunks_ = 1;
  std::size_t chunk_size_ = 1;
  std::size_t gathered_ = 0;
  std::vector<std::vector<std::uint32_t>> chunk_index_;  // gathered element indices, per chunk
  std::vector<std::vector<T>> chunk_value_;              // and their values
  std::vector<std::size_t> chunk_count_;
  std::vector<std::uint8_t> chunk_overflow_;
  std::vector<std::size_t> chunk_nonfinite_;  // first non-finite index seen, per chunk
  std::vector<std::uint32_t> sub_;            // 4 sub-histograms per chunk
  std::vector<std::size_t> hist_;             // merged histogram per chunk
  std::vector<std::size_t> total_;            // histogram over all chunks
  std::vector<std::size_t> above_, inbin_;    // per chunk: keys above the range, keys in the bin
  std::vector<std::size_t> out_at_, quota_;   // emission offsets and tie shares per chunk
  std::vector<key_type> sample_;
  std::vector<key_type> candidates_;  // relative keys still in the chosen bin
};

}  // namespace gcomp::detail
