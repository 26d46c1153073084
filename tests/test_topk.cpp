// Tests of compress/topk.hpp and compress/detail/select.hpp: exact top-k against a sorting oracle on adversarial inputs, ties to the lower index, both selection paths, the contraction bound, decompress_add, wire sizes and decode safety, thread-count determinism, per-layer top-k, input checks.
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "gcomp/compress/topk.hpp"
#include "gcomp/core/concepts.hpp"
#include "wire_fuzz.hpp"

using gcomp::rng_key;
using gcomp::topk;
using gcomp::topk_options;
using path = gcomp::detail::select_path;

namespace {

const gcomp::host_par par1(1), par2(2), par3(3), par7(7);

// The inputs a selection can get wrong: ties, equal values, signed zeros,
// denormals, a single outlier, scales spread over many binades.
enum class kind { normal, ties, all_equal, zeros, one_huge, denormals, scales, signed_tiny, uniform, ramp };
constexpr kind all_kinds[] = {kind::normal,    kind::ties,   kind::all_equal,   kind::zeros,
                              kind::one_huge,  kind::denormals, kind::scales, kind::signed_tiny,
                              kind::uniform,   kind::ramp};

template <class T = float>
std::vector<T> make(kind what, std::size_t n, std::uint64_t seed = 1) {
  const rng_key key{seed, 0, 0};
  std::vector<T> x(n);
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint32_t r = gcomp::random_bits(key, i);
    const T sign = (r & 1u) ? T(-1) : T(1);
    switch (what) {
      case kind::normal: x[i] = static_cast<T>(gcomp::normal(key.fork(1), i)); break;
      case kind::ties: x[i] = sign * T(0.5) * static_cast<T>((r >> 1) % 4); break;
      case kind::all_equal: x[i] = sign * T(1.5); break;
      case kind::zeros: x[i] = sign * T(0); break;
      case kind::one_huge:
        x[i] = i == n / 3 ? T(1e30) : static_cast<T>(1e-3 * gcomp::normal(key.fork(1), i));
        break;
      case kind::denormals:
        // Random denormal mantissas (a few collide), some zeros.
        x[i] = (r >> 1) % 8 == 0 ? T(0)
                                 : sign * std::numeric_limits<T>::denorm_min() *
                                       static_cast<T>((r >> 4) % 5000);
        break;
      case kind::scales:
        x[i] = static_cast<T>(gcomp::normal(key.fork(1), i) * std::pow(10.0, double((i / 97) % 9) - 4.0));
        break;
      case kind::signed_tiny: {
        const T choices[] = {T(0), T(-0.0), std::numeric_limits<T>::denorm_min(),
                             -std::numeric_limits<T>::denorm_min(), std::numeric_limits<T>::min(),
                             -std::numeric_limits<T>::min()};
        x[i] = choices[(r >> 1) % 6];
        break;
      }
      case kind::uniform: x[i] = static_cast<T>(2.0f * gcomp::uniform(key, i) - 1.0f); break;
      case kind::ramp: x[i] = sign * static_cast<T>(i % 1000); break;
    }
  }
  return x;
}

// Indices sorted by decreasing |x|, equal magnitudes by increasing index
// (a stable sort of 0..n-1): the first k of it, sorted, are top-k's answer.
template <class T>
std::vector<std::uint32_t> by_magnitude(const std::vector<T>& x) {
  std::vector<std::uint32_t> order(x.size());
  std::iota(order.begin(), order.end(), 0u);
  std::stable_sort(order.begin(), order.end(),
                   [&](std::uint32_t a, std::uint32_t b) { return std::fabs(x[a]) > std::fabs(x[b]); });
  return order;
}

std::vector<std::uint32_t> first_k_sorted(const std::vector<std::uint32_t>& order, std::size_t k,
                                          std::uint32_t shift = 0) {
  std::vector<std::uint32_t> kept(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k));
  for (auto& i : kept) i += shift;
  std::sort(kept.begin(), kept.end());
  return kept;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::bit_cast<typename gcomp::detail::magnitude_bits<T>::key_type>(a[i]) !=
        std::bit_cast<typename gcomp::detail::magnitude_bits<T>::key_type>(b[i]))
      return false;
  return true;
}

// ||C(x) - x||^2 <= (1 - delta) ||x||^2, in long double with a relative slack
// of 1e-12 for the rounding of the two sums (equality holds for equal values).
template <class T>
void check_contraction(const std::vector<T>& x, const gcomp::sparse_payload<T>& m, double delta) {
  std::vector<T> c(x.size(), T(0));
  for (std::size_t j = 0; j < m.size(); ++j) c[m.indices[j]] = m.data[j];
  long double residual = 0, total = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const long double d = static_cast<long double>(c[i]) - x[i];
    residual += d * d;
    total += static_cast<long double>(x[i]) * x[i];
  }
  const long double bound = (1.0L - static_cast<long double>(delta)) * total;
  CHECK_MESSAGE(residual <= bound * (1.0L + 1e-12L) + 1e-300L, "residual ", double(residual),
                " exceeds (1 - delta) ||x||^2 = ", double(bound));
}

// Compresses x with every policy, with and without the sampled shortcut, and
// checks each result is exactly the oracle's (indices and value bits).
template <class T>
gcomp::sparse_payload<T> check_all_policies(const std::vector<T>& x, std::size_t k,
                                            const std::vector<std::uint32_t>& expected) {
  gcomp::sparse_payload<T> first;
  bool have_first = false;
  for (bool shortcut : {true, false}) {
    topk<T> c(topk_options{.k = k});
    c.use_sampled_shortcut(shortcut);
    auto run = [&](const auto& policy, const char* name) {
      gcomp::sparse_payload<T> m;
      c.compress(policy, std::span<const T>(x), m, rng_key{});
      REQUIRE_MESSAGE(m.indices == expected, "policy ", name, " shortcut ", shortcut, " n ",
                      x.size(), " k ", k);
      REQUIRE(m.dimension == x.size());
      REQUIRE(m.data.size() == k);
      std::vector<T> want(k);
      for (std::size_t j = 0; j < k; ++j) want[j] = x[expected[j]];
      REQUIRE(same_bits(m.data, want));
      if (!have_first) {
        first = m;
        have_first = true;
      }
    };
    run(gcomp::host_seq{}, "host_seq");
    run(par1, "host_par1");
    run(par2, "host_par2");
    run(par3, "host_par3");
    run(par7, "host_par7");
  }
  return first;
}

std::vector<std::size_t> ks_for(std::size_t n) {
  std::vector<std::size_t> ks = {1, 2, 3, n / 1000, n / 100, n / 10, n / 2, n - 1, n};
  std::vector<std::size_t> out;
  for (std::size_t k : ks)
    if (k >= 1 && k <= n && std::find(out.begin(), out.end(), k) == out.end()) out.push_back(k);
  return out;
}

}  // namespace

static_assert(gcomp::compressor<topk<float>>);
static_assert(gcomp::compressor<topk<float>, gcomp::host_par>);
static_assert(gcomp::compressor<topk<double>, gcomp::host_par, double>);
static_assert(!gcomp::compressor_traits<topk<float>>::unbiased);
static_assert(!gcomp::compressor_traits<topk<float>>::shared_support);
static_assert(!gcomp::allreducible_compressor<topk<float>>);

TEST_CASE("top-k keeps exactly the k largest magnitudes, ties to the lower index, on every policy") {
  for (std::size_t n : {1u, 2u, 3u, 5u, 16u, 17u, 100u, 257u, 1000u, 4097u, 70001u, 200003u}) {
    for (kind what : all_kinds) {
      const auto x = make(what, n, n);
      const auto order = by_magnitude(x);
      for (std::size_t k : ks_for(n)) {
        const auto expected = first_k_sorted(order, k);
        const auto m = check_all_policies(x, k, expected);
        check_contraction(x, m, double(k) / double(n));
      }
    }
  }
}

TEST_CASE("top-k on doubles matches the oracle too") {
  for (std::size_t n : {1u, 33u, 5000u, 140001u})
    for (kind what : {kind::normal, kind::ties, kind::denormals, kind::signed_tiny, kind::scales}) {
      const auto x = make<double>(what, n, 3 * n);
      const auto order = by_magnitude(x);
      for (std::size_t k : ks_for(n)) {
        const auto m = check_all_policies(x, k, first_k_sorted(order, k));
        check_contraction(x, m, double(k) / double(n));
      }
    }
}

TEST_CASE("each selection path is taken where it should be, with the same answer") {
  const std::size_t n = 200003, k = 200;
  const auto normal = make(kind::normal, n);
  const auto equal = make(kind::all_equal, n);
  gcomp::sparse_payload<float> m;
  topk<float> c(topk_options{.k = k});
  c.compress(gcomp::host_seq{}, std::span<const float>(normal), m, rng_key{});
  CHECK(c.last_path() == path::sampled);
  const auto sampled = m.indices;
  c.use_sampled_shortcut(false);
  c.compress(par3, std::span<const float>(normal), m, rng_key{});
  CHECK(c.last_path() == path::radix_gather);
  CHECK(m.indices == sampled);
  // All equal: the sample's bound gathers everything (overflow), no bin ever
  // shrinks, and the last level's tie quota picks indices 0..k-1.
  c.use_sampled_shortcut(true);
  c.compress(par2, std::span<const float>(equal), m, rng_key{});
  CHECK(c.last_path() == path::radix_full);
  std::vector<std::uint32_t> first(k);
  std::iota(first.begin(), first.end(), 0u);
  CHECK(m.indices == first);
  // k = n takes every element.
  topk<float> all(topk_options{.ratio = 1.0});
  all.compress(par7, std::span<const float>(normal), m, rng_key{});
  CHECK(all.last_path() == path::trivial);
  CHECK(m.size() == n);
  CHECK(m.indices.back() == n - 1);
}

TEST_CASE("ratio gives k = max(1, round(ratio * n)); bits_per_element and wire_bytes are exact") {
  topk<float> c(topk_options{.ratio = 0.01});
  CHECK(c.kept(1000) == 10);
  CHECK(c.kept(1049) == 10);
  CHECK(c.kept(1050) == 11);  // 10.5 rounds away from zero
  CHECK(c.kept(7) == 1);
  CHECK(c.kept(0) == 0);
  CHECK(c.delta(1000) == doctest::Approx(0.01));
  for (std::size_t n : {1u, 99u, 1000u, 65537u}) {
    const auto x = make(kind::normal, n);
    gcomp::sparse_payload<float> m;
    c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{});
    const std::size_t k = c.kept(n);
    std::vector<std::byte> bytes;
    encode(m, bytes);
    CHECK(c.wire_bytes(m) == bytes.size());
    CHECK(bytes.size() == 24 + 8 + k * (4 + 4));
    CHECK(c.bits_per_element(n) == doctest::Approx(8.0 * double(24 + 8 + 8 * k) / double(n)));
    gcomp::sparse_payload<float> back;
    decode(bytes, back, n);
    CHECK(back.indices == m.indices);
    CHECK(back.data == m.data);
  }
  topk<double, std::uint64_t> wide(topk_options{.k = 5});
  CHECK(wide.bits_per_element(100) == doctest::Approx(8.0 * (24 + 8 + 5 * 16) / 100.0));
  // An empty gradient with a ratio gives an empty message.
  gcomp::sparse_payload<float> empty;
  c.compress(gcomp::host_seq{}, std::span<const float>(), empty, rng_key{});
  CHECK(empty.size() == 0);
  CHECK(empty.dimension == 0);
}

TEST_CASE("decompress_add adds scale * C(x) exactly, on every policy") {
  const std::size_t n = 100003;
  const auto x = make(kind::scales, n);
  const auto y = make(kind::uniform, n, 9);
  topk<float> c(topk_options{.ratio = 0.01});
  gcomp::sparse_payload<float> m;
  c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{});
  std::vector<float> expected = y;
  const float scale = -0.375f;
  for (std::size_t j = 0; j < m.size(); ++j) expected[m.indices[j]] += scale * x[m.indices[j]];
  auto check = [&](const auto& policy) {
    std::vector<float> out = y;
    c.decompress_add(policy, m, std::span<float>(out), scale);
    CHECK(same_bits(out, expected));
  };
  check(gcomp::host_seq{});
  check(par2);
  check(par7);
}

TEST_CASE("top-k messages survive the decode fuzzer") {
  const auto x = make(kind::normal, 1000);
  topk<float> c(topk_options{.k = 20});
  gcomp::sparse_payload<float> m, sentinel;
  c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{});
  const auto y = make(kind::ties, 1000, 5);
  topk<float>(topk_options{.k = 3}).compress(gcomp::host_seq{}, std::span<const float>(y), sentinel,
                                            rng_key{});
  std::vector<std::byte> bytes;
  encode(m, bytes);
  const auto outcomes = gcomp::test::check_decode_is_safe(bytes, sentinel, 1000);
  CHECK(outcomes.rejected > 0);
  CHECK(outcomes.accepted > 0);
}

TEST_CASE("per-layer top-k selects k_d = max(1, round(ratio * n_d)) in every layer") {
  const std::vector<std::size_t> sizes = {1, 5, 1000, 70001, 3, 4097, 200};
  std::size_t n = 0;
  for (auto s : sizes) n += s;
  for (double ratio : {0.001, 0.01, 0.3, 1.0}) {
    for (kind what : {kind::normal, kind::ties, kind::all_equal, kind::scales}) {
      const auto x = make(what, n, 11);
      // Layers listed out of offset order: the payload must still be sorted.
      std::vector<gcomp::layer> layers;
      std::size_t offset = 0;
      for (std::size_t d = 0; d < sizes.size(); ++d) {
        std::string name = "l";
        name += std::to_string(d);
        layers.push_back({name, offset, sizes[d], {}});
        offset += sizes[d];
      }
      std::reverse(layers.begin(), layers.end());
      const auto lay = gcomp::layout::from_layers(layers);
      std::vector<std::uint32_t> expected;
      double delta = 1.0;
      std::size_t total = 0;
      offset = 0;
      for (std::size_t s : sizes) {
        std::vector<float> part(x.begin() + static_cast<std::ptrdiff_t>(offset),
                                x.begin() + static_cast<std::ptrdiff_t>(offset + s));
        const std::size_t kd = std::max<std::size_t>(1, std::size_t(std::llround(ratio * double(s))));
        const auto picked = first_k_sorted(by_magnitude(part), kd, std::uint32_t(offset));
        expected.insert(expected.end(), picked.begin(), picked.end());
        delta = std::min(delta, double(kd) / double(s));
        total += kd;
        offset += s;
      }
      topk<float> c(topk_options{.ratio = ratio}, lay);
      CHECK(c.kept(n) == total);
      CHECK(c.delta(n) == doctest::Approx(delta));
      CHECK(c.bits_per_element(n) == doctest::Approx(8.0 * double(32 + 8 * total) / double(n)));
      gcomp::sparse_payload<float> first;
      auto run = [&](const auto& policy) {
        gcomp::sparse_payload<float> m;
        c.compress(policy, std::span<const float>(x), m, rng_key{});
        REQUIRE(m.indices == expected);
        for (std::size_t j = 0; j < m.size(); ++j) REQUIRE(m.data[j] == x[m.indices[j]]);
        CHECK(m.dimension == n);
        first = m;
      };
      run(gcomp::host_seq{});
      run(par2);
      run(par3);
      check_contraction(x, first, delta);
    }
  }
  // Gaps between layers are never kept, and delta() says no bound holds.
  const auto gappy = gcomp::layout::from_layers({{"a", 0, 10, {}}, {"b", 20, 10, {}}}, gcomp::gaps::allowed);
  topk<float> c(topk_options{.ratio = 0.5}, gappy);
  std::vector<float> x(30, 1.0f);
  for (std::size_t i = 10; i < 20; ++i) x[i] = 100.0f;
  gcomp::sparse_payload<float> m;
  c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{});
  CHECK(m.indices == std::vector<std::uint32_t>{0, 1, 2, 3, 4, 20, 21, 22, 23, 24});
  CHECK(c.delta(30) == 0.0);
}

namespace {

template <class F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    FAIL("no gcomp::error; expected one mentioning '", needle, "'");
  } catch (const gcomp::error& e) {
    CHECK_MESSAGE(std::string(e.what()).find(needle) != std::string::npos, e.what());
  }
}

}  // namespace

TEST_CASE("bad options and sizes throw gcomp::error naming the argument") {
  expect_error([] { topk<float> c(topk_options{}); }, "both are 0");
  expect_error([] { topk<float> c(topk_options{.k = 3, .ratio = 0.5}); }, "not both");
  for (double r : {-0.1, 1.5, std::nan("")})
    expect_error([r] { topk<float> c(topk_options{.ratio = r}); }, "ratio must be in (0, 1]");
  expect_error([] { topk<float> c(topk_options{.k = 4}, gcomp::layout{10, 20}); }, "takes ratio, not k");
  topk<float> c(topk_options{.k = 8});
  // n < k: an error (sending k > n pairs would cost more than the dense vector).
  const auto small = make(kind::normal, 7);
  const auto x = make(kind::normal, 100);
  gcomp::sparse_payload<float> m;
  c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{});
  const auto before = m;
  expect_error([&] { c.compress(gcomp::host_seq{}, std::span<const float>(small), m, rng_key{}); },
               "k = 8 exceeds the gradient size 7");
  CHECK(m.indices == before.indices);
  CHECK(m.data == before.data);
  CHECK(m.dimension == before.dimension);
  // A per-layer top-k checks the gradient against its layout.
  topk<float> layered(topk_options{.ratio = 0.1}, gcomp::layout{10, 20});
  expect_error([&] { layered.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{}); },
               "layout covers 30");
  CHECK(m.indices == before.indices);
}

TEST_CASE("non-finite values are rejected by index before anything is written") {
  const float bad_values[] = {std::numeric_limits<float>::quiet_NaN(),
                              std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity()};
  for (std::size_t n : {50u, 70001u, 300007u}) {
    const auto base = make(kind::normal, n);
    const auto clean = make(kind::normal, n, 2);
    // Previous messages of either size (1 and n entries) must survive.
    gcomp::sparse_payload<float> previous[2];
    topk<float>(topk_options{.k = 1}).compress(gcomp::host_seq{}, std::span<const float>(clean),
                                              previous[0], rng_key{});
    topk<float>(topk_options{.k = n}).compress(gcomp::host_seq{}, std::span<const float>(clean),
                                              previous[1], rng_key{});
    for (std::size_t at : {std::size_t{0}, std::size_t{5}, n / 2 + 1, n - 1})
      for (float bad : bad_values) {
        auto x = base;
        x[at] = bad;
        if (at != n - 1) x[n - 1] = bad;  // the message names the first one
        // Appended piecewise: g++ 12 warns falsely (-Wrestrict) on "..." + string.
        std::string needle = "gradient[";
        needle += std::to_string(at);
        needle += ']';
        for (bool shortcut : {true, false})
          for (std::size_t k : {std::size_t{1}, n / 100 + 1, n}) {
            topk<float> c(topk_options{.k = k});
            c.use_sampled_shortcut(shortcut);
            for (int p = 0; p < 3; ++p) {
              auto m = previous[p % 2];
              const auto& before = previous[p % 2];
              const std::span<const float> g(x);
              if (p == 0)
                expect_error([&] { c.compress(gcomp::host_seq{}, g, m, rng_key{}); }, needle);
              else if (p == 1)
                expect_error([&] { c.compress(par2, g, m, rng_key{}); }, needle);
              else
                expect_error([&] { c.compress(par7, g, m, rng_key{}); }, needle);
              CHECK(m.indices == before.indices);
              CHECK(same_bits(m.data, before.data));
              CHECK(m.dimension == before.dimension);
            }
          }
      }
  }
  // Per layer: a NaN in the last layer leaves the message as it was even
  // though earlier layers were selected first.
  topk<float> layered(topk_options{.ratio = 0.1}, gcomp::layout{1000, 1000, 1000});
  auto x = make(kind::normal, 3000);
  gcomp::sparse_payload<float> m;
  layered.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{});
  const auto before = m;
  x[2500] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { layered.compress(par3, std::span<const float>(x), m, rng_key{}); }, "gradient[2500]");
  CHECK(m.indices == before.indices);
  CHECK(m.data == before.data);
}

TEST_CASE("decompress_add rejects malformed payloads and leaves out unchanged") {
  topk<float> c(topk_options{.k = 3});
  const std::vector<float> y = {1, 2, 3, 4, 5, 6, 7, 8};
  auto bad = [&](gcomp::sparse_payload<float> m, const std::string& needle) {
    std::vector<float> out = y;
    expect_error([&] { c.decompress_add(gcomp::host_seq{}, m, std::span<float>(out), 1.0f); }, needle);
    expect_error([&] { c.decompress_add(par2, m, std::span<float>(out), 1.0f); }, needle);
    CHECK(out == y);
  };
  gcomp::sparse_payload<float> good;
  good.dimension = 8;
  good.indices = {1, 4, 7};
  good.data = {0.5f, -1.0f, 2.0f};
  auto m = good;
  m.dimension = 9;
  bad(m, "dimension is 9");
  m = good;
  m.data.pop_back();
  bad(m, "message.data has size 2");
  m = good;
  m.indices = {1, 9, 8};
  bad(m, "strictly increasing");
  m = good;
  m.indices = {1, 4, 8};
  bad(m, "out of range");
  m = good;
  m.indices = {4, 4, 7};
  bad(m, "strictly increasing");
  m = good;
  m.indices = {4, 1, 7};
  bad(m, "strictly increasing");
  std::vector<float> out = y;
  c.decompress_add(gcomp::host_seq{}, good, std::span<float>(out), 2.0f);
  CHECK(out == std::vector<float>{1, 3, 3, 4, 3, 6, 7, 12});
}

TEST_CASE("after the first step, compress reuses the payload's buffers") {
  const auto a = make(kind::normal, 300007, 1), b = make(kind::scales, 300007, 2);
  for (bool per_layer : {false, true}) {
    topk<float> c = per_layer ? topk<float>(topk_options{.ratio = 0.01}, gcomp::layout{100000, 200007})
                              : topk<float>(topk_options{.ratio = 0.01});
    gcomp::sparse_payload<float> m;
    c.compress(par2, std::span<const float>(a), m, rng_key{});
    const auto* indices = m.indices.data();
    const auto* values = m.data.data();
    for (int step = 0; step < 4; ++step) {
      c.compress(par2, std::span<const float>(step % 2 ? a : b), m, rng_key{});
      CHECK(m.indices.data() == indices);
      CHECK(m.data.data() == values);
    }
  }
}
