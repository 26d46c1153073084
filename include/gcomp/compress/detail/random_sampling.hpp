// Exact uniform draws below n and sorted samples of k distinct indices, from a counter-based key (shared by random-k, random block, Bernoulli).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/compress/detail/count.hpp"
#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp {

/// Whether a random sparsifier multiplies what it keeps by 1 / P(kept), which
/// makes it unbiased (E[C(g)] = g), or sends the kept values as they are
/// (biased, but a contraction: E||C(g) - g||^2 = (1 - k/n) ||g||^2).
enum class rescale : bool { none = false, unbiased = true };

/// Which key a random compressor draws its selection from: the worker's own
/// (independent selections, private supports) or key.shared(), which every
/// worker derives alike, so all workers keep the same positions and the
/// payloads can be summed by an all-reduce.
enum class key_use : bool { per_worker = false, shared = true };

namespace detail {

// Sub-stream tags, so that two compressors handed the same key (chain<A, B>,
// error feedback around a quantizer) never reuse each other's random numbers.
inline constexpr std::uint64_t randomk_tag = 0x6b2d6d6f646e6172ull;        // "random-k"
inline constexpr std::uint64_t random_block_tag = 0x6b636f6c622d6e72ull;   // "rn-block"
inline constexpr std::uint64_t bernoulli_tag = 0x696c6c756f6e7265ull;      // "ernoulli"

/// High and low 64 bits of a * b, written out in 32-bit halves (no __int128,
/// which -Wpedantic rejects and some device compilers lack).
GCOMP_HD constexpr void mul64(std::uint64_t a, std::uint64_t b, std::uint64_t& hi, std::uint64_t& lo) {
  const std::uint64_t a0 = a & 0xFFFFFFFFu, a1 = a >> 32, b0 = b & 0xFFFFFFFFu, b1 = b >> 32;
  const std::uint64_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
  const std::uint64_t middle = (p00 >> 32) + (p01 & 0xFFFFFFFFu) + (p10 & 0xFFFFFFFFu);
  hi = p11 + (p01 >> 32) + (p10 >> 32) + (middle >> 32);
  lo = (middle << 32) | (p00 & 0xFFFFFFFFu);
}

/// 64 random bits number `attempt` of draw j: attempts 0 and 1 use the two
/// halves of Philox block j, later ones (probability below 2^-60 in total)
/// come from forked keys. A pure function of (key, j, attempt).
GCOMP_HD constexpr std::uint64_t random_u64(const rng_key& key, std::uint64_t j, unsigned attempt) {
  const u32x4 w = random_block(attempt < 2 ? key : key.fork(attempt), j);
  const unsigned h = (attempt % 2) * 2;
  return (static_cast<std::uint64_t>(w.v[h]) << 32) | w.v[h + 1];
}

/// Draw j of an exactly uniform integer in [0, n), n >= 1: Lemire's
/// multiply-shift with rejection ("Fast random integer generation in an
/// interval", 2019). The rejection removes the n / 2^64 bias a bare
/// multiply-shift or modulo would leave.
GCOMP_HD constexpr std::uint64_t uniform_below(const rng_key& key, std::uint64_t j, std::uint64_t n) {
  std::uint64_t hi = 0, lo = 0;
  mul64(random_u64(key, j, 0), n, hi, lo);
  if (lo < n) {
    const std::uint64_t threshold = (0 - n) % n;  // 2^64 mod n
    for (unsigned attempt = 1; lo < threshold; ++attempt) mul64(random_u64(key, j, attempt), n, hi, lo);
  }
  return hi;
}

/// Sorts a[0, count), all values below `bound`, by least-significant-digit
/// radix sort on 8-bit digits, only over the bits bound - 1 needs; tmp
/// (size >= count) is scratch. Linear time: several times faster than
/// std::sort on the millions of random indices a large k draws.
template <class Index>
void radix_sort(Index* a, Index* tmp, std::size_t count, std::uint64_t bound) {
  if (count < 512) {
    std::sort(a, a + count);
    return;
  }
  const int bits = bound <= 1 ? 0 : static_cast<int>(std::bit_width(bound - 1));
  Index* src = a;
  Index* dst = tmp;
  for (int shift = 0; shift < bits; shift += 8) {
    std::size_t start[257] = {};
    for (std::size_t i = 0; i < count; ++i) ++start[((src[i] >> shift) & 0xFF) + 1];
    for (int d = 0; d < 256; ++d) start[d + 1] += start[d];
    for (std::size_t i = 0; i < count; ++i) dst[start[(src[i] >> shift) & 0xFF]++] = src[i];
    std::swap(src, dst);
  }
  if (src != a) std::copy(src, src + count, a);
}

/// Fills buf[0, m) with m distinct indices in [0, n), sorted, m <= n / 2.
/// They are the first m distinct values of the sequence uniform_below(key, 0, n),
/// uniform_below(key, 1, n), ...: drawn in batches of exactly the number still
/// missing, so no batch can overshoot, and by exchangeability the set of the
/// first m distinct values of an i.i.d. uniform sequence is a uniform m-subset.
/// tmp (size >= m) is merge space. Draws run in parallel; sorting and merging
/// are sequential, so the result does not depend on the thread count.
template <class Policy, class Index>
void draw_distinct_sorted(const Policy& policy, const rng_key& key, std::uint64_t n,
                          std::size_t m, Index* buf, Index* tmp) {
  Index* a = buf;
  Index* b = tmp;
  std::size_t filled = 0;
  std::uint64_t next = 0;  // draws used so far
  while (filled < m) {
    const std::size_t need = m - filled;
    Index* fresh = a + filled;
    const std::uint64_t first = next;
    for_each_index(policy, need, [=](std::size_t t) {
      fresh[t] = static_cast<Index>(uniform_below(key, first + t, n));
    });
    next += need;
    radix_sort(fresh, b, need, n);  // b is free until the merge below
    Index* end = std::merge(a, fresh, fresh, fresh + need, b);
    filled = static_cast<std::size_t>(std::unique(b, end) - b);
    std::swap(a, b);
  }
  if (a != buf) std::copy(a, a + m, buf);
}

/// Buffers a sampler reuses between steps.
template <class Index>
struct sampling_scratch {
  std::vector<Index> indices;        // draws, or merge space
  std::vector<std::uint64_t> bitmap;  // one bit per candidate index (dense samples)
};

/// The same set as draw_distinct_sorted (the first m distinct values of the
/// same draw sequence, in batches of exactly the number missing) recorded in
/// a bitmap of n bits instead of sorted arrays: linear in n / 64 + draws,
/// which beats sorting once m is a sizeable fraction of n. draws: room for m.
template <class Policy, class Index>
void draw_distinct_bitmap(const Policy& policy, const rng_key& key, std::uint64_t n,
                          std::size_t m, Index* draws, std::vector<std::uint64_t>& bitmap) {
  bitmap.assign(static_cast<std::size_t>((n + 63) / 64), 0);  // capacity reused after the first step
  std::uint64_t* bits = bitmap.data();
  std::size_t filled = 0;
  std::uint64_t next = 0;
  while (filled < m) {
    const std::size_t need = m - filled;
    const std::uint64_t first = next;
    for_each_index(policy, need, [=](std::size_t t) {
      draws[t] = static_cast<Index>(uniform_below(key, first + t, n));
    });
    next += need;
    for (std::size_t t = 0; t < need; ++t) {
      const std::uint64_t v = draws[t];
      const std::uint64_t bit = std::uint64_t{1} << (v & 63);
      if (!(bits[v >> 6] & bit)) {
        bits[v >> 6] |= bit;
        ++filled;
      }
    }
  }
}

/// Writes the positions of the set bits (or, with `complement`, of the clear
/// bits below n) of a bitmap in increasing order.
template <class Index>
void bitmap_positions(const std::vector<std::uint64_t>& bitmap, std::uint64_t n, bool complement,
                      Index* out) {
  std::size_t j = 0;
  for (std::size_t w = 0; w < bitmap.size(); ++w) {
    std::uint64_t x = complement ? ~bitmap[w] : bitmap[w];
    if (complement && w == bitmap.size() - 1 && n % 64 != 0) x &= (std::uint64_t{1} << (n % 64)) - 1;
    while (x != 0) {
      out[j++] = static_cast<Index>(w * 64 + static_cast<std::uint64_t>(std::countr_zero(x)));
      x &= x - 1;
    }
  }
}

/// out (size k, k <= n) receives k distinct indices drawn uniformly from
/// [0, n), strictly increasing. For k > n / 2 the n - k left-out indices are
/// drawn instead (a uniform subset's complement is uniform too), which keeps
/// the expected number of draws below n ln 2 for every k. Samples of at least
/// n / 32 indices are recorded in a bitmap, smaller ones sorted; both give the
/// same set for the same key. The scratch grows on first use and is reused.
template <class Policy, class Index>
void sample_sorted_distinct(const Policy& policy, const rng_key& key, std::uint64_t n,
                            std::span<Index> out, sampling_scratch<Index>& scratch) {
  const std::size_t k = out.size();
  if (k == 0) return;
  const bool complement = k > n / 2;
  const std::size_t m = complement ? static_cast<std::size_t>(n - k) : k;
  if (m == 0) {  // k == n: everything
    for (std::size_t i = 0; i < k; ++i) out[i] = static_cast<Index>(i);
    return;
  }
  if (scratch.indices.size() < m) scratch.indices.resize(m);
  if (static_cast<std::uint64_t>(m) * 32 >= n) {
    draw_distinct_bitmap(policy, key, n, m, scratch.indices.data(), scratch.bitmap);
    bitmap_positions(scratch.bitmap, n, complement, out.data());
    return;
  }
  if (!complement) {
    draw_distinct_sorted(policy, key, n, k, out.data(), scratch.indices.data());
    return;
  }
  // out has room for k >= m entries, so it serves as merge space.
  draw_distinct_sorted(policy, key, n, m, scratch.indices.data(), out.data());
  std::size_t j = 0, e = 0;
  for (std::uint64_t i = 0; i < n; ++i) {
    if (e < m && scratch.indices[e] == static_cast<Index>(i)) {
      ++e;
      continue;
    }
    out[j++] = static_cast<Index>(i);
  }
}

// sample_sorted_distinct under a device policy (cuda_par, thrust_device).
// The host's set is the distinct values among the first D draws of the
// sequence, where D is fixed by the batch sizes (each batch draws exactly the
// number still missing), and a batch's count of new values does not depend
// on the order its draws are recorded. So every batch draws in parallel and
// claims its values in a bitmap with an atomic OR, a sum of the claims gives
// the new count (the one host wait per batch), and a select_if over the
// bitmap writes the set, or its complement, in increasing order: the host's
// indices exactly, for sparse and dense samples alike (the bitmap costs
// n / 8 bytes of scratch and one pass over n predicates).

/// Sets bit v of words atomically (threads of one batch may draw the same
/// value); true when this call set it.
GCOMP_HD inline bool claim_bit(std::uint64_t* words, std::uint64_t v) {
  const std::uint64_t bit = std::uint64_t{1} << (v & 63);
#if defined(__CUDA_ARCH__)
  static_assert(sizeof(unsigned long long) == sizeof(std::uint64_t));
  const std::uint64_t old = atomicOr(reinterpret_cast<unsigned long long*>(words + (v >> 6)),
                                     static_cast<unsigned long long>(bit));
#else
  const std::uint64_t old = __atomic_fetch_or(words + (v >> 6), bit, __ATOMIC_RELAXED);
#endif
  return (old & bit) == 0;
}

/// Draw first + t of uniform_below(key, ., n), claimed in the bitmap:
/// claimed[t] = 1 when it was new.
struct distinct_draw_entry {
  rng_key key;
  std::uint64_t first;
  std::uint64_t n;
  std::uint64_t* words;
  std::uint8_t* claimed;
  GCOMP_HD void operator()(std::size_t t) const {
    claimed[t] = claim_bit(words, uniform_below(key, first + t, n)) ? 1 : 0;
  }
};

struct claimed_at {
  const std::uint8_t* claimed;
  GCOMP_HD std::size_t operator()(std::size_t t) const { return claimed[t]; }
};
struct add_counts {
  GCOMP_HD std::size_t operator()(std::size_t a, std::size_t b) const { return a + b; }
};

/// Whether bit i of the bitmap equals `set`.
struct bit_equals {
  const std::uint64_t* words;
  bool set;
  GCOMP_HD bool operator()(std::size_t i) const { return (((words[i >> 6] >> (i & 63)) & 1u) != 0) == set; }
};

template <class Index>
struct iota_entry {
  Index* out;
  GCOMP_HD void operator()(std::size_t i) const { out[i] = static_cast<Index>(i); }
};

/// Device scratch of the sampler: the bitmap and one claim flag per draw of
/// a batch, sized on first use and reused.
struct device_sampling_scratch {
  policy_buffer<std::uint64_t> bitmap;
  policy_buffer<std::uint8_t> claimed;
};

/// sample_sorted_distinct with out (k <= n entries) in the memory of a device
/// policy: the same k indices, strictly increasing.
template <class Policy, class Index>
void sample_sorted_distinct_on_device(const Policy& policy, const rng_key& key, std::uint64_t n,
                                      std::span<Index> out, device_sampling_scratch& scratch,
                                      std::string_view where) {
  const std::size_t k = out.size();
  if (k == 0) return;
  const bool complement = k > n / 2;
  const std::size_t m = complement ? static_cast<std::size_t>(n - k) : k;
  if (m == 0) {  // k == n: everything
    for_each_index(policy, k, iota_entry<Index>{out.data()});
    return;
  }
  scratch.bitmap.assign(policy, static_cast<std::size_t>((n + 63) / 64), 0, where);
  scratch.claimed.resize(policy, m, where);
  std::uint64_t* words = scratch.bitmap.data();
  std::uint8_t* claimed = scratch.claimed.data();
  std::size_t filled = 0;
  std::uint64_t next = 0;
  while (filled < m) {
    const std::size_t need = m - filled;
    for_each_index(policy, need, distinct_draw_entry{key, next, n, words, claimed});
    filled += transform_reduce(policy, need, std::size_t{0}, add_counts{}, claimed_at{claimed});
    next += need;
  }
  const std::size_t count = select_if(policy, static_cast<std::size_t>(n), bit_equals{words, !complement}, out);
  require(count == k, where, "the device sample holds ", count, " indices, not k = ", k, " (internal error)");
}
}  // namespace detail
}  // namespace gcomp
