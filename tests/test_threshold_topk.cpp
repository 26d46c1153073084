// Tests of compress/threshold_topk.hpp: the hard threshold keeps exactly the oracle set; the sampled (DGC) top-k keeps a count in [k, (1 + tol) k] that always contains the exact top-k, with the acceptance rate measured; determinism, wire form, input checks.
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "gcomp/compress/threshold_topk.hpp"
#include "gcomp/core/concepts.hpp"
#include "wire_fuzz.hpp"

using gcomp::hard_threshold;
using gcomp::rng_key;
using gcomp::sampled_topk;
using gcomp::sampled_topk_options;

namespace {

const gcomp::host_par par2(2), par3(3), par7(7);

std::vector<float> normal(std::size_t n, std::uint64_t seed = 1) {
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i) x[i] = gcomp::normal(rng_key{seed, 0, 0}, i);
  return x;
}

// Inputs with values exactly at the thresholds tested, signed zeros and denormals.
std::vector<float> awkward(std::size_t n) {
  const float d = std::numeric_limits<float>::denorm_min();
  const float choices[] = {0.0f, -0.0f, d, -d, 3 * d, std::numeric_limits<float>::min(),
                           0.5f, -0.5f, 1.0f, -1.0f, 1.5f, 1e30f, -1e30f, 0.4999999f};
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i)
    x[i] = choices[gcomp::random_bits(rng_key{5, 0, 0}, i) % (sizeof(choices) / sizeof(float))];
  return x;
}

std::vector<std::uint32_t> at_least(const std::vector<float>& x, float tau) {
  std::vector<std::uint32_t> kept;
  for (std::size_t i = 0; i < x.size(); ++i)
    if (std::fabs(x[i]) >= tau) kept.push_back(static_cast<std::uint32_t>(i));
  return kept;
}

// The exact top-k (ties to the lower index), sorted by index.
std::vector<std::uint32_t> topk_oracle(const std::vector<float>& x, std::size_t k) {
  std::vector<std::uint32_t> order(x.size());
  std::iota(order.begin(), order.end(), 0u);
  std::stable_sort(order.begin(), order.end(),
                   [&](std::uint32_t a, std::uint32_t b) { return std::fabs(x[a]) > std::fabs(x[b]); });
  order.resize(k);
  std::sort(order.begin(), order.end());
  return order;
}

template <class F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    FAIL("no gcomp::error; expected one mentioning '", needle, "'");
  } catch (const gcomp::error& e) {
    CHECK_MESSAGE(std::string(e.what()).find(needle) != std::string::npos, e.what());
  }
}

bool same_payload(const gcomp::sparse_payload<float>& a, const gcomp::sparse_payload<float>& b) {
  std::vector<std::byte> ea, eb;
  encode(a, ea);
  encode(b, eb);
  return ea == eb;
}

}  // namespace

static_assert(gcomp::compressor<hard_threshold<float>>);
static_assert(gcomp::compressor<hard_threshold<double>, gcomp::host_par, double>);
static_assert(gcomp::compressor<sampled_topk<float>, gcomp::host_par>);
static_assert(!gcomp::compressor_traits<sampled_topk<float>>::unbiased);
static_assert(!gcomp::compressor_traits<hard_threshold<float>>::shared_support);

TEST_CASE("the hard threshold keeps exactly the elements with |g| >= tau, on every policy") {
  const float d = std::numeric_limits<float>::denorm_min();
  for (std::size_t n : {1u, 17u, 1000u, 70001u, 300007u})
    for (const auto& x : {normal(n), awkward(n)})
      for (float tau : {d, 2 * d, std::numeric_limits<float>::min(), 0.5f, 1.0f, 1.5f, 3.0f, 1e30f,
                        std::numeric_limits<float>::max()}) {
        const auto expected = at_least(x, tau);
        hard_threshold<float> c(tau);
        auto run = [&](const auto& policy) {
          gcomp::sparse_payload<float> m;
          c.compress(policy, std::span<const float>(x), m, rng_key{});
          REQUIRE(m.indices == expected);
          REQUIRE(m.dimension == n);
          for (std::size_t j = 0; j < m.size(); ++j)
            REQUIRE(std::bit_cast<std::uint32_t>(m.data[j]) == std::bit_cast<std::uint32_t>(x[m.indices[j]]));
          // Everything dropped is below tau: ||C(g) - g||_inf < tau.
          CHECK(c.bits_per_element(n) ==
                doctest::Approx(8.0 * 32 / double(n) + 64.0 * double(expected.size()) / double(n)));
        };
        run(gcomp::host_seq{});
        run(par2);
        run(par7);
      }
}

TEST_CASE("hard threshold: bad tau, non-finite gradients and malformed payloads throw, leaving buffers alone") {
  for (float tau : {0.0f, -1.0f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()})
    expect_error([tau] { hard_threshold<float> c(tau); }, "tau must be finite and > 0");
  hard_threshold<float> c(1.0f);
  auto x = normal(200003);
  gcomp::sparse_payload<float> m;
  c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{});
  const auto before = m;
  x[123457] = -std::numeric_limits<float>::infinity();
  x[200000] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{}); }, "gradient[123457]");
  expect_error([&] { c.compress(par3, std::span<const float>(x), m, rng_key{}); }, "gradient[123457]");
  CHECK(same_payload(m, before));
  std::vector<float> out(10, 1.0f);
  gcomp::sparse_payload<float> bad;
  bad.dimension = 10;
  bad.indices = {3, 3};
  bad.data = {1.0f, 2.0f};
  expect_error([&] { c.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f); }, "strictly increasing");
  CHECK(out == std::vector<float>(10, 1.0f));
}

TEST_CASE("threshold messages: exact wire size, decode round trip, decode fuzzer") {
  const auto x = normal(2000);
  hard_threshold<float> c(2.0f);
  gcomp::sparse_payload<float> m, sentinel;
  c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{});
  std::vector<std::byte> bytes;
  encode(m, bytes);
  CHECK(c.wire_bytes(m) == bytes.size());
  CHECK(bytes.size() == 24 + 8 + m.size() * 8);
  gcomp::sparse_payload<float> back;
  decode(bytes, back, 2000);
  CHECK(same_payload(back, m));
  hard_threshold<float>(3.0f).compress(gcomp::host_seq{}, std::span<const float>(x), sentinel, rng_key{});
  const auto outcomes = gcomp::test::check_decode_is_safe(bytes, sentinel, 2000);
  CHECK(outcomes.rejected > 0);
  // decompress_add adds scale * C(g) exactly.
  std::vector<float> out(2000, 0.25f), expected(2000, 0.25f);
  for (std::size_t j = 0; j < m.size(); ++j) expected[m.indices[j]] += 1.5f * x[m.indices[j]];
  c.decompress_add(par2, m, std::span<float>(out), 1.5f);
  CHECK(out == expected);
}

TEST_CASE("sampled top-k keeps between k and (1 + tol) k elements, always a superset of the exact top-k") {
  // N(0,1), k = 1% of n, a 4% sample: the sample rank of the estimate is
  // about 1.125 * 105, so the kept count is about 1.125 k +- 9% (one sigma)
  // and the band [k, 1.25 k] holds it with probability ~0.83; below k (~9%)
  // costs an exact top-k, above 1.25 k (~8%) a trim of the gathered set.
  const std::size_t n = 1u << 18;
  const auto x = normal(n, 42);
  sampled_topk<float> c(sampled_topk_options{.ratio = 0.01, .sample_ratio = 0.04, .tolerance = 0.25});
  const std::size_t k = c.kept(n), upper = c.max_kept(n);
  CHECK(k == 2621);
  CHECK(upper == 3276);
  CHECK(c.bits_per_element(n) == doctest::Approx(8.0 * double(32 + 8 * upper) / double(n)));
  const auto exact = topk_oracle(x, k);
  std::size_t accepted = 0, trimmed = 0, exacts = 0;
  const int trials = 200;
  for (int t = 0; t < trials; ++t) {
    const rng_key key{7, std::uint64_t(t), 3};
    gcomp::sparse_payload<float> m;
    c.compress(gcomp::host_seq{}, std::span<const float>(x), m, key);
    REQUIRE(m.size() >= k);
    REQUIRE(m.size() <= upper);
    REQUIRE(std::includes(m.indices.begin(), m.indices.end(), exact.begin(), exact.end()));
    for (std::size_t j = 0; j < m.size(); ++j) REQUIRE(m.data[j] == x[m.indices[j]]);
    switch (c.last_outcome()) {
      case sampled_topk<float>::outcome::accepted: {
        ++accepted;
        // Accepted: exactly the elements at or above the sampled threshold.
        CHECK(m.indices == at_least(x, c.last_threshold()));
        break;
      }
      case sampled_topk<float>::outcome::trimmed: ++trimmed; CHECK(m.indices == exact); break;
      case sampled_topk<float>::outcome::exact: ++exacts; CHECK(m.indices == exact); break;
    }
    if (t % 25 == 0) {  // the same key gives the same message on any policy
      gcomp::sparse_payload<float> p2, p7;
      sampled_topk<float> d(c.options());
      d.compress(par2, std::span<const float>(x), p2, key);
      d.compress(par7, std::span<const float>(x), p7, key);
      CHECK(same_payload(m, p2));
      CHECK(same_payload(m, p7));
    }
  }
  MESSAGE("sampled top-k outcomes over ", trials, " keys: accepted ", accepted, ", trimmed ",
          trimmed, ", exact ", exacts);
  // 0.6 is more than 8 binomial standard deviations below the expected 0.83.
  CHECK(double(accepted) / trials >= 0.6);
  CHECK(trimmed > 0);  // each path is exercised
  CHECK(exacts > 0);
}

TEST_CASE("sampled top-k: zero tolerance gives exactly k; small and adversarial inputs fall back to exact") {
  const auto x = normal(100000, 3);
  sampled_topk<float> tight(sampled_topk_options{.k = 500, .tolerance = 0.0});
  for (std::uint64_t step = 0; step < 10; ++step) {
    gcomp::sparse_payload<float> m;
    tight.compress(par2, std::span<const float>(x), m, rng_key{1, step, 0});
    CHECK(m.indices == topk_oracle(x, 500));
  }
  // n no larger than the minimum sample: selected exactly.
  const auto small = normal(900, 4);
  sampled_topk<float> c(sampled_topk_options{.ratio = 0.1});
  gcomp::sparse_payload<float> m;
  c.compress(gcomp::host_seq{}, std::span<const float>(small), m, rng_key{});
  CHECK(c.last_outcome() == sampled_topk<float>::outcome::exact);
  CHECK(m.indices == topk_oracle(small, 90));
  // All magnitudes equal: the threshold admits everything, the gathered set
  // outgrows its cap and the exact path keeps the first k indices.
  std::vector<float> equal(100000);
  for (std::size_t i = 0; i < equal.size(); ++i) equal[i] = i % 2 ? 2.0f : -2.0f;
  sampled_topk<float> e(sampled_topk_options{.k = 100});
  e.compress(par3, std::span<const float>(equal), m, rng_key{});
  CHECK(e.last_outcome() == sampled_topk<float>::outcome::exact);
  CHECK(m.indices == topk_oracle(equal, 100));
}

TEST_CASE("sampled top-k: bad options and inputs throw gcomp::error and leave the payload alone") {
  expect_error([] { sampled_topk<float> c(sampled_topk_options{}); }, "both are 0");
  expect_error([] { sampled_topk<float> c(sampled_topk_options{.k = 1, .ratio = 0.1}); }, "not both");
  expect_error([] { sampled_topk<float> c(sampled_topk_options{.ratio = 1.5}); }, "ratio must be in (0, 1]");
  expect_error([] { sampled_topk<float> c(sampled_topk_options{.ratio = 0.1, .sample_ratio = 0.0}); },
               "sample_ratio must be in (0, 1]");
  expect_error([] { sampled_topk<float> c(sampled_topk_options{.ratio = 0.1, .min_sample = 0}); },
               "min_sample must be > 0");
  expect_error([] { sampled_topk<float> c(sampled_topk_options{.ratio = 0.1, .tolerance = -0.5}); },
               "tolerance must be finite and >= 0");
  sampled_topk<float> c(sampled_topk_options{.k = 50});
  auto x = normal(100000, 8);
  gcomp::sparse_payload<float> m;
  c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{});
  const auto before = m;
  expect_error([&] { c.compress(gcomp::host_seq{}, std::span<const float>(x.data(), 40), m, rng_key{}); },
               "k = 50 exceeds the gradient size 40");
  x[77777] = std::numeric_limits<float>::quiet_NaN();
  for (std::uint64_t step = 0; step < 5; ++step) {
    expect_error([&] { c.compress(par2, std::span<const float>(x), m, rng_key{0, step, 0}); }, "gradient[77777]");
    CHECK(same_payload(m, before));
  }
}
