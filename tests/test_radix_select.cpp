// The GPU top-k's radix-select logic (gcomp/compress/detail/radix_select.hpp), run on the host by an emulation of every pass of detail/topk_cuda.cuh and compared with sort / nth_element oracles and the host gcomp::topk.
#include <doctest/doctest.h>

#include <gcomp/compress/detail/radix_select.hpp>
#include <gcomp/compress/topk.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <span>
#include <vector>

namespace {

namespace radix = gcomp::detail::radix;

struct emulation_options {
  std::size_t tile_words = 4096;    // bitmap words per block of the collection passes (256 x 16)
  std::size_t candidate_cap = 0;    // room of the candidate list (0: radix::candidate_room(n))
  unsigned choose_threads = 256;    // threads that split the bins when choosing a digit
  std::uint32_t list_order_seed = 1;  // the list's order (warp atomics: any order) is a shuffle
};

struct emulation_result {
  std::vector<std::uint32_t> indices;  // the selection, in slot order (empty on a non-finite input)
  std::size_t first_bad = std::numeric_limits<std::size_t>::max();
  bool used_list = false;       // whether level 2+ and the marking ran on the candidate list
  std::size_t candidates = 0;   // the candidates the level-0 histogram announced
  std::size_t full_reads = 0;   // passes that read all of g (the bitmaps and the list are extra)
  std::uint64_t threshold = 0;
  std::size_t ties = 0;
};

// The choice as the GPU makes it: thread t owns `per` bins counted from the
// top, learns the count above its share from an exclusive scan, and the one
// whose share holds the rank picks the digit.
template <class Count>
void split_choose(const std::vector<Count>& hist, unsigned bins, unsigned threads, std::size_t& rank,
                  unsigned& digit) {
  const unsigned per = (bins + threads - 1) / threads;
  std::size_t above = 0;
  int found = 0;
  for (unsigned t = 0; t < threads; ++t) {
    const unsigned hi = bins > t * per ? bins - t * per : 0;
    const unsigned lo = hi > per ? hi - per : 0;
    std::size_t sum = 0;
    for (unsigned b = lo; b < hi; ++b) sum += hist[b];
    if (above < rank && rank <= above + sum) {
      unsigned d = 0;
      std::size_t in = 0;
      REQUIRE(radix::choose_digit(hist.data(), lo, hi, rank - above, d, in));
      digit = d;
      rank = in;
      ++found;
    }
    above += sum;
  }
  REQUIRE(found == 1);  // exactly one thread owns the rank
}

// Every pass of the GPU select, in order, with the same functions:
//   level 0 (full read): histogram of digit 0, first non-finite index; the
//     choice also gives the candidates = keys above the chosen bin + the bin,
//     and the list is used iff they fit the room;
//   level 1 (full read): histogram of digit 1 in the bin and, on the list
//     path, every key whose digit 0 is the chosen one or above appended
//     (index, value) in an arbitrary order;
//   level 2+: the list's values, or all of g on the fallback;
//   mark: keys > T and == T set bits in two bitmaps (from the list, or from
//     all of g on the fallback); nothing when the input was not finite;
//   collection: per-tile popcounts of the bitmaps, an exclusive scan, then
//     each tile walks its set bits in index order, places them with
//     emit_flagged, and clears its words (the bitmaps stay zero between calls).
template <class T>
emulation_result emulate(std::span<const T> g, std::size_t k, emulation_options opt = {}) {
  using traits = radix::key_traits<T>;
  using key_type = typename traits::key_type;
  constexpr unsigned kb = traits::key_bits;
  const std::size_t n = g.size();
  const std::size_t cap = opt.candidate_cap != 0 ? opt.candidate_cap : radix::candidate_room(n);
  emulation_result out;
  key_type prefix = 0;
  std::size_t rank = k;
  unsigned d0 = 0;
  std::vector<std::uint32_t> list_index;
  std::vector<T> list_value;
  std::vector<std::uint32_t> hist(radix::max_bins);
  for (unsigned level = 0; level < radix::levels(kb); ++level) {
    std::fill(hist.begin(), hist.end(), 0u);
    const bool list = level >= 2 && out.used_list;
    const bool collect = level == 1 && out.used_list;
    out.full_reads += list ? 0 : 1;
    const std::size_t m = list ? list_value.size() : n;
    for (std::size_t j = 0; j < m; ++j) {
      const T value = list ? list_value[j] : g[j];
      const key_type key = traits::key(value);
      if (level == 0 && !traits::finite_key(key)) out.first_bad = std::min(out.first_bad, j);
      if (collect && radix::at_or_above_digit0(key, kb, d0)) {
        REQUIRE(list_index.size() < cap);  // announced to fit: the append never overflows
        list_index.push_back(static_cast<std::uint32_t>(j));
        list_value.push_back(value);
      }
      if (!radix::in_range(key, kb, level, prefix)) continue;
      ++hist[radix::digit(key, kb, level)];
    }
    if (collect) {
      REQUIRE(list_index.size() == out.candidates);
      // Atomic appends land in any order: permute the list (same permutation for both arrays).
      std::vector<std::size_t> perm(list_index.size());
      std::iota(perm.begin(), perm.end(), std::size_t{0});
      std::shuffle(perm.begin(), perm.end(), std::mt19937(opt.list_order_seed));
      std::vector<std::uint32_t> idx(perm.size());
      std::vector<T> val(perm.size());
      for (std::size_t j = 0; j < perm.size(); ++j) {
        idx[j] = list_index[perm[j]];
        val[j] = list_value[perm[j]];
      }
      list_index.swap(idx);
      list_value.swap(val);
    }
    const std::size_t rank_before = rank;
    unsigned d = 0;
    split_choose(hist, 1u << radix::width(kb, level), opt.choose_threads, rank, d);
    if (level == 0) {
      d0 = d;
      out.candidates = rank_before - rank + hist[d];  // keys above the bin + the bin
      out.used_list = out.candidates <= cap;
    }
    prefix = radix::extend(prefix, kb, level, d);
  }
  out.threshold = prefix;
  out.ties = rank;
  if (out.first_bad != std::numeric_limits<std::size_t>::max()) return out;  // nothing marked or written
  // Mark: the list (any order: atomicOr) or all of g (a warp ballot per word).
  const std::size_t words = (n + 31) / 32;
  std::vector<std::uint32_t> above_bits(words, 0), equal_bits(words, 0);
  auto mark = [&](std::size_t i, key_type key) {
    if (key > prefix) above_bits[i / 32] |= 1u << (i % 32);
    else if (key == prefix) equal_bits[i / 32] |= 1u << (i % 32);
  };
  if (out.used_list) {
    for (std::size_t j = 0; j < list_index.size(); ++j) mark(list_index[j], traits::key(list_value[j]));
  } else {
    ++out.full_reads;
    for (std::size_t i = 0; i < n; ++i) mark(i, traits::key(g[i]));
  }
  // Collection over the bitmaps: tile counts, an exclusive scan of the packed
  // counts, then each tile places its set bits from its offsets in index order.
  const std::size_t tiles = (words + opt.tile_words - 1) / opt.tile_words;
  std::vector<std::uint64_t> packed(tiles, 0);
  for (std::size_t t = 0; t < tiles; ++t) {
    std::uint32_t above = 0, equal = 0;
    for (std::size_t w = t * opt.tile_words; w < std::min(words, (t + 1) * opt.tile_words); ++w) {
      above += static_cast<std::uint32_t>(std::popcount(above_bits[w]));
      equal += static_cast<std::uint32_t>(std::popcount(equal_bits[w]));
    }
    packed[t] = radix::pack_counts(above, equal);
  }
  std::exclusive_scan(packed.begin(), packed.end(), packed.begin(), std::uint64_t{0});
  const std::size_t none = std::numeric_limits<std::uint32_t>::max();
  out.indices.assign(k, static_cast<std::uint32_t>(none));
  std::size_t written = 0;
  for (std::size_t t = 0; t < tiles; ++t) {
    std::size_t above = radix::packed_above(packed[t]), equal = radix::packed_equal(packed[t]);
    for (std::size_t w = t * opt.tile_words; w < std::min(words, (t + 1) * opt.tile_words); ++w) {
      for (std::uint32_t bits = above_bits[w] | equal_bits[w]; bits != 0; bits &= bits - 1) {
        const unsigned b = static_cast<unsigned>(std::countr_zero(bits));
        const std::size_t i = w * 32 + b;
        REQUIRE(i < n);
        const bool up = (above_bits[w] >> b) & 1u;
        std::size_t slot = 0;
        if (radix::emit_flagged<std::size_t>(up, rank, above, equal, slot)) {
          REQUIRE(slot < k);
          REQUIRE(out.indices[slot] == none);  // no slot written twice
          out.indices[slot] = static_cast<std::uint32_t>(i);
          ++written;
        }
        above += up ? 1 : 0;
        equal += up ? 0 : 1;
      }
      above_bits[w] = equal_bits[w] = 0;  // the write pass leaves the bitmaps zero
    }
  }
  CHECK(written == k);
  return out;
}

// Oracle: sort by (magnitude key descending, index ascending), keep k, sort by index.
template <class T>
std::vector<std::uint32_t> sort_oracle(std::span<const T> g, std::size_t k) {
  using traits = radix::key_traits<T>;
  std::vector<std::uint32_t> order(g.size());
  std::iota(order.begin(), order.end(), 0u);
  std::stable_sort(order.begin(), order.end(),
                   [&](std::uint32_t a, std::uint32_t b) { return traits::key(g[a]) > traits::key(g[b]); });
  order.resize(k);
  std::sort(order.begin(), order.end());
  return order;
}

template <class T>
void check_select(const std::vector<T>& g, std::size_t k, emulation_options opt = {}) {
  using traits = radix::key_traits<T>;
  const std::span<const T> s(g);
  const emulation_result r = emulate(s, k, opt);
  REQUIRE(r.first_bad == std::numeric_limits<std::size_t>::max());
  // The threshold is the k-th largest key (nth_element oracle) ...
  std::vector<typename traits::key_type> keys(g.size());
  for (std::size_t i = 0; i < g.size(); ++i) keys[i] = traits::key(g[i]);
  std::nth_element(keys.begin(), keys.begin() + static_cast<std::ptrdiff_t>(k - 1), keys.end(),
                   std::greater<>());
  CHECK(r.threshold == keys[k - 1]);
  // ... the ties taken are k minus the keys above it ...
  const auto above = static_cast<std::size_t>(
      std::count_if(g.begin(), g.end(), [&](T x) { return traits::key(x) > r.threshold; }));
  CHECK(r.ties == k - above);
  // ... the output is strictly increasing ...
  CHECK(std::adjacent_find(r.indices.begin(), r.indices.end(), std::greater_equal<>()) ==
        r.indices.end());
  // ... and it is the sort oracle's set and the host gcomp::topk's.
  CHECK(r.indices == sort_oracle(s, k));
  gcomp::topk<T> host(gcomp::topk_options{.k = k});
  gcomp::sparse_payload<T> m;
  host.compress(gcomp::host_seq{}, s, m, gcomp::rng_key{});
  CHECK(r.indices == m.indices);
}

std::vector<float> normal(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> g(n);
  for (float& x : g) x = dist(rng);
  return g;
}

}  // namespace

TEST_CASE("digit plan covers the key bits") {
  CHECK(radix::levels(31) == 3);
  CHECK(radix::levels(63) == 6);
  CHECK(radix::width(31, 0) == 11);
  CHECK(radix::width(31, 1) == 11);
  CHECK(radix::width(31, 2) == 9);
  CHECK(radix::shift(31, 2) == 0);
  CHECK(radix::width(63, 5) == 8);
  unsigned total = 0;
  for (unsigned l = 0; l < radix::levels(63); ++l) total += radix::width(63, l);
  CHECK(total == 63);
  // Re-assembling the digits gives the key back.
  const std::uint32_t key = radix::key_traits<float>::key(-3.25f);
  std::uint32_t prefix = 0;
  for (unsigned l = 0; l < 3; ++l) {
    CHECK(radix::in_range(key, 31, l, prefix));
    prefix = radix::extend(prefix, 31, l, radix::digit(key, 31, l));
  }
  CHECK(prefix == key);
  CHECK_FALSE(radix::in_range(key + (1u << 21), 31, 1, key >> 20));
}

TEST_CASE("keys order magnitudes and mark non-finite values") {
  using kf = radix::key_traits<float>;
  CHECK(kf::key(-0.0f) == kf::key(0.0f));
  CHECK(kf::key(std::numeric_limits<float>::denorm_min()) > kf::key(0.0f));
  CHECK(kf::key(std::numeric_limits<float>::min()) >
        kf::key(std::numeric_limits<float>::denorm_min()));
  CHECK(kf::key(-2.0f) > kf::key(1.5f));
  CHECK(kf::finite_key(kf::key(std::numeric_limits<float>::max())));
  CHECK_FALSE(kf::finite_key(kf::key(-std::numeric_limits<float>::infinity())));
  CHECK_FALSE(kf::finite_key(kf::key(std::numeric_limits<float>::quiet_NaN())));
  using kd = radix::key_traits<double>;
  CHECK(kd::finite_key(kd::key(std::numeric_limits<double>::max())));
  CHECK_FALSE(kd::finite_key(kd::key(std::numeric_limits<double>::infinity())));
}

TEST_CASE("choose_digit finds the bin of a rank and the rank inside it") {
  const std::vector<std::uint32_t> hist{5, 0, 3, 2};  // bins 0..3, counted from the top
  unsigned d = 99;
  std::size_t in = 0;
  CHECK(radix::choose_digit(hist.data(), 0, 4, std::size_t{1}, d, in));
  CHECK(d == 3);
  CHECK(in == 1);
  CHECK(radix::choose_digit(hist.data(), 0, 4, std::size_t{3}, d, in));
  CHECK(d == 2);
  CHECK(in == 1);
  CHECK(radix::choose_digit(hist.data(), 0, 4, std::size_t{10}, d, in));
  CHECK(d == 0);
  CHECK(in == 5);
  CHECK_FALSE(radix::choose_digit(hist.data(), 0, 4, std::size_t{11}, d, in));
  CHECK_FALSE(radix::choose_digit(hist.data(), 2, 4, std::size_t{6}, d, in));
}

TEST_CASE("emit_slot places keys above the threshold and the first ties") {
  std::size_t slot = 0;
  CHECK(radix::emit_slot<std::uint32_t, std::size_t>(9, 5, 2, 3, 7, slot));
  CHECK(slot == 5);  // 3 above and both ties precede it
  CHECK(radix::emit_slot<std::uint32_t, std::size_t>(5, 5, 2, 3, 1, slot));
  CHECK(slot == 4);
  CHECK_FALSE(radix::emit_slot<std::uint32_t, std::size_t>(5, 5, 2, 3, 2, slot));
  CHECK_FALSE(radix::emit_slot<std::uint32_t, std::size_t>(4, 5, 2, 0, 0, slot));
  const std::uint64_t p = radix::pack_counts(7, 0xffffffffu);
  CHECK(radix::packed_above(p) == 7);
  CHECK(radix::packed_equal(p) == 0xffffffffu);
}

TEST_CASE("emulated GPU select equals the oracles on random data") {
  for (std::size_t n : {std::size_t{1}, std::size_t{2}, std::size_t{1000}, std::size_t{65537},
                        std::size_t{300007}}) {
    const std::vector<float> g = normal(n, static_cast<std::uint32_t>(n));
    for (std::size_t k : {std::size_t{1}, std::max<std::size_t>(1, n / 1000),
                          std::max<std::size_t>(1, n / 100), n / 2 + 1, n}) {
      CAPTURE(n);
      CAPTURE(k);
      check_select(g, k);
    }
  }
}

TEST_CASE("ties, all-equal, zeros, negative zero and denormals") {
  std::mt19937 rng(7);
  SUBCASE("many ties: values from a small set with both signs") {
    std::vector<float> g(50000);
    for (float& x : g) x = static_cast<float>(static_cast<int>(rng() % 9) - 4) * 0.5f;
    for (std::size_t k : {std::size_t{1}, std::size_t{50}, std::size_t{5000}, std::size_t{31111},
                          g.size()})
      check_select(g, k);
  }
  SUBCASE("all equal: the first k indices") {
    const std::vector<float> g(20000, -1.25f);
    const emulation_result r = emulate(std::span<const float>(g), 777);
    std::vector<std::uint32_t> first(777);
    std::iota(first.begin(), first.end(), 0u);
    CHECK(r.indices == first);
    CHECK_FALSE(r.used_list);  // the candidate list overflowed: full passes
    check_select(g, 777);
  }
  SUBCASE("zeros of both signs with a few non-zeros") {
    std::vector<float> g(10000, 0.0f);
    for (std::size_t i = 0; i < g.size(); i += 3) g[i] = -0.0f;
    g[4321] = 1e-3f;
    g[17] = -2.0f;
    check_select(g, 1);
    check_select(g, 2);
    check_select(g, 3);   // one zero: the lowest index, 0 (a -0.0)
    check_select(g, 500);
    const emulation_result r = emulate(std::span<const float>(g), 3);
    CHECK(r.indices == std::vector<std::uint32_t>{0, 17, 4321});
  }
  SUBCASE("denormals") {
    std::vector<float> g(30000);
    const float tiny = std::numeric_limits<float>::denorm_min();
    for (float& x : g) x = tiny * static_cast<float>(rng() % 1000) * ((rng() & 1) ? 1.0f : -1.0f);
    g[12345] = std::numeric_limits<float>::min();  // the one normal number
    check_select(g, 1);
    check_select(g, 30);
    check_select(g, 3000);
  }
}

TEST_CASE("small candidate lists fall back to full passes with the same answer") {
  const std::vector<float> g = normal(100000, 3);
  emulation_options tight;
  tight.candidate_cap = 1;  // always overflows
  const emulation_result a = emulate(std::span<const float>(g), 100, tight);
  const emulation_result b = emulate(std::span<const float>(g), 100);
  CHECK_FALSE(a.used_list);
  CHECK(b.used_list);
  CHECK(a.indices == b.indices);
  // Odd tile sizes and thread splits change nothing either.
  emulation_options odd;
  odd.tile_words = 3;
  odd.choose_threads = 7;
  odd.list_order_seed = 12345;
  CHECK(emulate(std::span<const float>(g), 100, odd).indices == b.indices);
  check_select(g, 100, odd);
}

TEST_CASE("double keys take six levels and agree with the oracles") {
  std::mt19937_64 rng(11);
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<double> g(40000);
  for (double& x : g) x = dist(rng);
  g[5] = g[6] = -g[7];  // an exact tie across signs
  for (std::size_t k : {std::size_t{1}, std::size_t{40}, std::size_t{400}, g.size()}) check_select(g, k);
}

TEST_CASE("the first non-finite index is found at level 0") {
  std::vector<float> g = normal(5000, 5);
  g[4000] = std::numeric_limits<float>::infinity();
  g[1234] = -std::numeric_limits<float>::quiet_NaN();
  g[2000] = -std::numeric_limits<float>::infinity();
  CHECK(emulate(std::span<const float>(g), 10).first_bad == 1234);
}

TEST_CASE("Gaussian gradients take the candidate path: two full reads") {
  const std::size_t n = std::size_t{1} << 20, k = n / 1000;
  const std::vector<float> g = normal(n, 2024);
  const emulation_result r = emulate(std::span<const float>(g), k);
  CHECK(r.used_list);
  CHECK(r.full_reads == 2);  // levels 0 and 1; level 2, marking and collection use the list and bitmaps
  CAPTURE(r.candidates);
  CHECK(r.candidates >= k);
  CHECK(r.candidates <= 3 * k);  // bins above + the threshold's bin stay near k on a bell curve
  check_select(g, k);
  // Other common k stay on the list too.
  for (std::size_t kk : {std::size_t{1}, n / 100, n / 20}) {
    CAPTURE(kk);
    const emulation_result rk = emulate(std::span<const float>(g), kk);
    CHECK(rk.used_list);
    CHECK(rk.full_reads == 2);
    check_select(g, kk);
  }
  // Another order of the list's appends changes nothing.
  emulation_options other;
  other.list_order_seed = 99;
  CHECK(emulate(std::span<const float>(g), k, other).indices == r.indices);
}

TEST_CASE("heavy ties at the threshold overflow the list: the fallback reads g four times") {
  const std::size_t n = std::size_t{1} << 20, k = n / 1000;
  std::vector<float> g = normal(n, 31);
  // 30% of the entries tie at magnitude 4 (both signs): the threshold's bin
  // holds far more than n/8 keys, and ties must go to the lowest indices.
  std::mt19937 rng(32);
  for (std::size_t i = 0; i < n; ++i)
    if (rng() % 10 < 3) g[i] = (rng() & 1) ? 4.0f : -4.0f;
  const emulation_result r = emulate(std::span<const float>(g), k);
  CHECK_FALSE(r.used_list);
  CHECK(r.candidates > radix::candidate_room(n));
  CHECK(r.full_reads == 4);  // levels 0, 1, 2 and the marking
  CHECK(r.ties < k);         // some keys above 4 and the rest from the ties
  check_select(g, k);
  // Double keys: six levels, seven full reads on the fallback.
  std::vector<double> gd(g.begin(), g.end());
  const emulation_result rd = emulate(std::span<const double>(gd), k);
  CHECK_FALSE(rd.used_list);
  CHECK(rd.full_reads == 7);
  check_select(gd, k);
}

TEST_CASE("the candidate room is an exact bound: room fits, room + 1 falls back") {
  const std::size_t n = 100000, k = 10, room = radix::candidate_room(n);
  CHECK(room == n / 8 + 1024);
  for (std::size_t m : {room - 1, room, room + 1}) {
    CAPTURE(m);
    std::vector<float> g(n, 0.001f);
    for (std::size_t j = 0; j < m; ++j) g[j * 7] = (j % 2) ? 1.0f : -1.0f;  // m ties in one bin
    const emulation_result r = emulate(std::span<const float>(g), k);
    CHECK(r.candidates == m);
    CHECK(r.used_list == (m <= room));
    CHECK(r.full_reads == (m <= room ? 2u : 4u));
    check_select(g, k);
  }
  CHECK(radix::candidate_room(100) == 100);  // small gradients: the whole gradient fits
}

TEST_CASE("double keys use the list too: two full reads for six levels") {
  std::mt19937_64 rng(13);
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<double> g(200000);
  for (double& x : g) x = dist(rng);
  const emulation_result r = emulate(std::span<const double>(g), 200);
  CHECK(r.used_list);
  CHECK(r.full_reads == 2);
  check_select(g, 200);
}
