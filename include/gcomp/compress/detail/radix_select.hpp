// The pure logic of the multi-pass radix select behind the GPU top-k (detail/topk_cuda.cuh): keys, digits, choosing a digit from a histogram, placing a selected element; host- and device-callable so g++ tests it.
//
// The GPU select finds the k-th largest magnitude key T level by level:
// level L histograms digit L of the keys still "in range" (whose higher
// digits equal the prefix chosen so far), then the digit holding the current
// rank is appended to the prefix. After the last level the prefix is T and
// the rank left is r, the number of keys equal to T that the top-k takes
// (the first r in index order, so ties go to the lower index as on the host).
// Everything here is a plain function of its arguments: the CUDA kernels and
// the host emulation in tests/test_radix_select.cpp call the same code.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "gcomp/core/config.hpp"

namespace gcomp::detail::radix {

/// Magnitude keys: the IEEE bits with the sign cleared order exactly like
/// unsigned integers (+-0 < denormals < normals < infinity < NaN), so -0.0
/// and +0.0 share key 0 and tie.
template <class T>
struct key_traits {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "the radix select needs float or double values");
  using key_type = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  static constexpr unsigned key_bits = 8 * sizeof(T) - 1;
  static constexpr key_type mask = ~key_type(0) >> 1;
  // Exponent all ones: every key at or above it is +-inf or NaN.
  static constexpr key_type infinity = sizeof(T) == 4 ? key_type(0x7f800000u)
                                                      : key_type(0x7ff0000000000000ull);

  static GCOMP_HD key_type bits(T x) {
#if defined(__CUDA_ARCH__)
    // std::bit_cast is a host function to nvcc without --expt-relaxed-constexpr.
    if constexpr (sizeof(T) == 4)
      return static_cast<key_type>(__float_as_uint(x));
    else
      return static_cast<key_type>(__double_as_longlong(x));
#else
    return std::bit_cast<key_type>(x);
#endif
  }
  static GCOMP_HD key_type key(T x) { return bits(x) & mask; }
  static GCOMP_HD bool finite_key(key_type k) { return k < infinity; }
};

/// Digits of 11 bits from the top (float: 11, 11, 9; double: 5 x 11, 8): a
/// 2048-bin histogram of 32-bit counters is 8 KiB of shared memory, so a
/// block keeps its own and adds it to the global one once; fewer, wider
/// digits would mean fewer passes but histograms that no longer fit.
inline constexpr unsigned digit_bits = 11;
inline constexpr unsigned max_bins = 1u << digit_bits;

GCOMP_HD constexpr unsigned levels(unsigned key_bits) { return (key_bits + digit_bits - 1) / digit_bits; }
/// Bit position of level `level`'s digit (0 at the last level).
GCOMP_HD constexpr unsigned shift(unsigned key_bits, unsigned level) {
  const unsigned consumed = digit_bits * (level + 1);
  return consumed >= key_bits ? 0u : key_bits - consumed;
}
/// Width in bits of level `level`'s digit.
GCOMP_HD constexpr unsigned width(unsigned key_bits, unsigned level) {
  return key_bits - digit_bits * level - shift(key_bits, level);
}

template <class Key>
GCOMP_HD constexpr unsigned digit(Key key, unsigned key_bits, unsigned level) {
  return static_cast<unsigned>((key >> shift(key_bits, level)) & ((Key(1) << width(key_bits, level)) - 1));
}

/// Whether `key` is still a candidate at `level`: its digits above the level
/// equal `prefix` (the digits chosen at levels 0 .. level-1). Every key is at level 0.
template <class Key>
GCOMP_HD constexpr bool in_range(Key key, unsigned key_bits, unsigned level, Key prefix) {
  return level == 0 || (key >> shift(key_bits, level - 1)) == prefix;
}

/// Whether `key` may be in the top-k once level 0 chose digit `d0`: its
/// level-0 digit is d0 or above (the keys of the bins above d0, fewer than k,
/// and the whole bin d0). These are the candidates the level-1 pass lists.
template <class Key>
GCOMP_HD constexpr bool at_or_above_digit0(Key key, unsigned key_bits, unsigned d0) {
  return (key >> shift(key_bits, 0)) >= Key(d0);
}

/// Entries of the candidate list (index and value) for an n-element gradient:
/// n/8 + 1024, at most n. The list is used when the level-0 histogram shows
/// that the candidates (keys whose level-0 digit is the chosen one or above:
/// the k - rank_in keys above the bin plus the bin) fit; otherwise every
/// later pass reads the gradient (the fallback). Why n/8: a bin of 11 top
/// bits is an eighth to a sixteenth of an octave wide, so on bell-shaped
/// (Gaussian, Laplace) magnitudes the candidates stay under ~2.5 k and every
/// k <= n/20 fits; a listed element costs 3 x its size in traffic (written
/// once, read twice) against 2 full reads saved, so any list under ~n/3 is
/// still a win, and n/8 bounds the memory (n bytes for float) while keeping
/// uniform-like magnitudes (the top bin holds 1/8) at the edge. The 1024
/// lets small gradients and k = 1 use the list despite a crowded top bin.
GCOMP_HD constexpr std::size_t candidate_room(std::size_t n) {
  const std::size_t room = n / 8 + 1024;
  return room < n ? room : n;
}

/// The prefix after choosing `d` at `level`.
template <class Key>
GCOMP_HD constexpr Key extend(Key prefix, unsigned key_bits, unsigned level, unsigned d) {
  return static_cast<Key>((prefix << width(key_bits, level)) | Key(d));
}

/// Scans bins hi-1 down to lo of `hist` for the rank-th largest key (rank >= 1,
/// counting from the top of this range). Returns true and sets `d` to the bin
/// holding it and `rank_in` to its rank inside that bin; returns false if the
/// range holds fewer than `rank` keys (then the caller's rank lies below).
/// The GPU splits the bins among threads and gives each the rank left after
/// the bins above its share; with lo = 0, hi = bins it is the whole choice.
template <class Count, class Rank>
GCOMP_HD bool choose_digit(const Count* hist, unsigned lo, unsigned hi, Rank rank, unsigned& d,
                           Rank& rank_in) {
  for (unsigned b = hi; b-- > lo;) {
    const Rank c = static_cast<Rank>(hist[b]);
    if (c >= rank) {
      d = b;
      rank_in = rank;
      return true;
    }
    rank -= c;
  }
  return false;
}

/// The collection rule for one element, given the threshold key T, the ties
/// taken r, and how many keys above T (`above_before`) and equal to T
/// (`equal_before`) precede it in index order: returns whether it is taken
/// and sets `slot`, its position in the increasing-index output of k entries
/// (the k - r keys above T and the first r keys equal to T).
/// emit_slot for an element known to be above T (`above`) or equal to T
/// (!above): the form the bitmap collection uses, which keeps the class of
/// each candidate in two bitmaps instead of re-reading its key.
template <class Count>
GCOMP_HD bool emit_flagged(bool above, Count ties, Count above_before, Count equal_before,
                           Count& slot) {
  if (above) {
    slot = above_before + (equal_before < ties ? equal_before : ties);
    return true;
  }
  if (equal_before < ties) {
    slot = above_before + equal_before;
    return true;
  }
  return false;
}

template <class Key, class Count>
GCOMP_HD bool emit_slot(Key key, Key threshold, Count ties, Count above_before, Count equal_before,
                        Count& slot) {
  if (key < threshold) return false;
  return emit_flagged(key > threshold, ties, above_before, equal_before, slot);
}

/// Tile counts (keys above T, keys equal to T) packed in one 64-bit word,
/// above in the high half: both are below 2^32 (n < 2^32), so one exclusive
/// sum over packed words scans the two counts at once without carries.
GCOMP_HD constexpr std::uint64_t pack_counts(std::uint32_t above, std::uint32_t equal) {
  return (std::uint64_t{above} << 32) | equal;
}
GCOMP_HD constexpr std::uint32_t packed_above(std::uint64_t packed) {
  return static_cast<std::uint32_t>(packed >> 32);
}
GCOMP_HD constexpr std::uint32_t packed_equal(std::uint64_t packed) {
  return static_cast<std::uint32_t>(packed & 0xffffffffu);
}

}  // namespace gcomp::detail::radix
