// Tests of compress/randomk.hpp: exact k distinct sorted indices, unbiasedness and second moment by Monte Carlo, shared vs per-worker keys, wire sizes, decode safety, thread-count determinism, input checks, all-reduce in a pipeline.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "compressor_checks.hpp"
#include "gcomp/aggregate/allreduce.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/compress/randomk.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/optim/sgd.hpp"
#include "gcomp/pipeline.hpp"
#include "wire_fuzz.hpp"

using gcomp::rng_key;
using gcomp::test::decompressed;
using gcomp::test::wave;

namespace {

void check_sorted_distinct(const gcomp::sparse_payload<float>& m, std::size_t n, std::size_t k) {
  REQUIRE(m.indices.size() == k);
  REQUIRE(m.data.size() == k);
  CHECK(m.dimension == n);
  for (std::size_t j = 0; j < k; ++j) {
    REQUIRE(m.indices[j] < n);
    if (j > 0) REQUIRE(m.indices[j] > m.indices[j - 1]);
  }
}

}  // namespace

static_assert(gcomp::compressor<gcomp::randomk<float>>);
static_assert(gcomp::compressor<gcomp::randomk<double>, gcomp::host_par, double>);
static_assert(!gcomp::allreducible_compressor<gcomp::randomk<float>>);
static_assert(gcomp::allreducible_compressor<gcomp::shared_randomk<float>>);
static_assert(gcomp::allreducible_compressor<gcomp::shared_randomk<float, gcomp::rescale::none>>);
static_assert(gcomp::compressor_traits<gcomp::randomk<float>>::unbiased);
static_assert(!gcomp::compressor_traits<gcomp::randomk<float, gcomp::key_use::per_worker,
                                                         gcomp::rescale::none>>::unbiased);

TEST_CASE("random-k keeps exactly k distinct indices, strictly increasing, for every k") {
  for (std::size_t n : {1u, 2u, 3u, 7u, 64u, 1000u, 4099u}) {
    const auto x = wave(n);
    std::set<std::size_t> ks = {1, n / 2, n / 2 + 1, n - 1 > 0 ? n - 1 : 1, n, (n + 3) / 4};
    for (std::size_t k : ks) {
      if (k == 0 || k > n) continue;
      gcomp::randomk<float> c({.k = k});
      gcomp::sparse_payload<float> m;
      for (std::uint64_t step = 0; step < 5; ++step) {
        c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{11, step, 2});
        check_sorted_distinct(m, n, k);
        // Kept values are the input scaled by n / k.
        const float s = float(double(n) / double(k));
        for (std::size_t j = 0; j < k; ++j) REQUIRE(m.data[j] == x[m.indices[j]] * s);
      }
    }
  }
  // ratio rounds to nearest and keeps at least one.
  CHECK(gcomp::randomk<float>({.ratio = 0.01}).kept(1000) == 10);
  CHECK(gcomp::randomk<float>({.ratio = 0.01}).kept(10) == 1);
  CHECK(gcomp::randomk<float>({.ratio = 1.0}).kept(10) == 10);
  CHECK(gcomp::randomk<float>({.ratio = 0.5}).kept(0) == 0);
}

TEST_CASE("the sorted and the bitmap sampler draw the same set from the same key") {
  // Both keep the first m distinct values of one draw sequence, so the choice
  // between them (by m / n) never changes a result.
  for (std::uint64_t n : {100u, 5000u, 70001u}) {
    for (std::size_t m : {std::size_t(1), std::size_t(n / 40), std::size_t(n / 3), std::size_t(n / 2)}) {
      if (m == 0) continue;
      const rng_key key{9, n, 4};
      std::vector<std::uint32_t> sorted(m), tmp(m), draws(m), from_bitmap(m);
      gcomp::detail::draw_distinct_sorted(gcomp::host_seq{}, key, n, m, sorted.data(), tmp.data());
      std::vector<std::uint64_t> bitmap;
      gcomp::detail::draw_distinct_bitmap(gcomp::host_seq{}, key, n, m, draws.data(), bitmap);
      gcomp::detail::bitmap_positions(bitmap, n, false, from_bitmap.data());
      CHECK(sorted == from_bitmap);
    }
  }
}

TEST_CASE("random-k is unbiased: the Monte-Carlo mean matches x within 5 sigma per coordinate") {
  // C(x)_i = (n/k) x_i with probability k/n, else 0, so Var C(x)_i = x_i^2 (n/k - 1)
  // and the mean of T draws has sigma_i = |x_i| sqrt((n/k - 1) / T). By the
  // Monte-Carlo rule of compressor_checks.hpp (5 sigma, T = 40000) a correct
  // sampler fails the n means with probability below n * 5.7e-7 = 2.9e-5.
  constexpr std::size_t n = 50, k = 5, trials = 40000;
  const auto x = wave(n, 0.3f);
  gcomp::randomk<float> c({.k = k});
  gcomp::sparse_payload<float> m;
  gcomp::test::monte_carlo mc(n, trials);
  std::vector<std::size_t> hits(n, 0);
  for (std::size_t t = 0; t < trials; ++t) {
    c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{3, t, 1});
    mc.add_sparse_draw(m.indices, m.data);
    for (std::size_t j = 0; j < k; ++j) ++hits[m.indices[j]];
  }
  const double ratio = double(n) / double(k);
  mc.check_means([&](std::size_t i) { return x[i]; },
                 [&](std::size_t i) { return double(x[i]) * x[i] * (ratio - 1.0); });
  for (std::size_t i = 0; i < n; ++i) {
    // The inclusion frequency is Binomial(T, k/n): the same 5-sigma rule.
    const double p = double(k) / double(n);
    const double freq_sigma = std::sqrt(double(trials) * p * (1 - p));
    gcomp::test::check_within_sigmas(double(hits[i]), double(trials) * p, freq_sigma, "hits");
  }

  // ||C(x)||^2 = (n/k)^2 * (sum of k values y_i = x_i^2 drawn without
  // replacement), so E = (n/k) ||x||^2 exactly and, with the population
  // variance s2 of y, Var = (n/k)^4 k s2 (n - k) / (n - 1). Same 5-sigma rule
  // (one statistic, failure probability 5.7e-7).
  double norm2 = 0.0, ymean = 0.0, s2 = 0.0;
  for (float v : x) norm2 += double(v) * v;
  ymean = norm2 / n;
  for (float v : x) s2 += (double(v) * v - ymean) * (double(v) * v - ymean);
  s2 /= n;
  const double expected = ratio * norm2;
  const double sigma = ratio * ratio * std::sqrt(k * s2 * double(n - k) / double(n - 1) / trials);
  const double mean2 = mc.second_moment();
  gcomp::test::check_within_sigmas(mean2, expected, sigma, "E||C(x)||^2");
  // alpha = n / k: the empirical mean stays below alpha ||x||^2 up to that slack.
  CHECK(c.alpha(n) == doctest::Approx(ratio));
  CHECK(mean2 <= c.alpha(n) * norm2 + 5.0 * sigma);
}

TEST_CASE("unscaled random-k is a contraction with delta = k/n in expectation") {
  // ||C(x) - x||^2 = sum of x_i^2 over the n - k dropped coordinates: for one
  // draw it is <= ||x||^2, in expectation (1 - k/n) ||x||^2; the dropped sum
  // is again a without-replacement sample sum (n - k draws) with the variance
  // of the previous test.
  constexpr std::size_t n = 40, k = 10, trials = 20000;
  const auto x = wave(n, 1.1f);
  gcomp::randomk<float, gcomp::key_use::per_worker, gcomp::rescale::none> c({.k = k});
  gcomp::sparse_payload<float> m;
  double norm2 = 0.0;
  for (float v : x) norm2 += double(v) * v;
  double total = 0.0;
  for (std::size_t t = 0; t < trials; ++t) {
    c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{8, t, 0});
    double kept = 0.0;
    for (std::size_t j = 0; j < k; ++j) {
      REQUIRE(m.data[j] == x[m.indices[j]]);
      kept += double(m.data[j]) * m.data[j];
    }
    const double err = norm2 - kept;
    REQUIRE(err <= norm2 * (1 + 1e-12));
    total += err;
  }
  double s2 = 0.0;
  for (float v : x) s2 += (double(v) * v - norm2 / n) * (double(v) * v - norm2 / n);
  s2 /= n;
  const double sigma = std::sqrt((n - k) * s2 * double(k) / double(n - 1) / trials);
  CHECK(std::fabs(total / trials - (1.0 - double(k) / n) * norm2) <= 5.0 * sigma);
  CHECK(c.alpha(n) == 1.0);
}

TEST_CASE("shared random-k keeps the same indices on every worker; per-worker random-k does not") {
  constexpr std::size_t n = 10000, k = 100;
  gcomp::shared_randomk<float> shared({.k = k});
  gcomp::randomk<float> own({.k = k});
  gcomp::sparse_payload<float> a, b, c, d;
  for (std::uint64_t step : {0u, 1u, 99u}) {
    const auto x0 = wave(n, 0.0f), x1 = wave(n, 2.0f);
    shared.compress(gcomp::host_seq{}, std::span<const float>(x0), a, rng_key{5, step, 0});
    shared.compress(gcomp::host_seq{}, std::span<const float>(x1), b, rng_key{5, step, 3});
    CHECK(a.indices == b.indices);
    own.compress(gcomp::host_seq{}, std::span<const float>(x0), c, rng_key{5, step, 0});
    own.compress(gcomp::host_seq{}, std::span<const float>(x0), d, rng_key{5, step, 3});
    CHECK(c.indices != d.indices);
  }
  // A different step or seed gives another support.
  shared.compress(gcomp::host_seq{}, std::span<const float>(wave(n)), a, rng_key{5, 1, 0});
  shared.compress(gcomp::host_seq{}, std::span<const float>(wave(n)), b, rng_key{5, 2, 0});
  CHECK(a.indices != b.indices);
  shared.compress(gcomp::host_seq{}, std::span<const float>(wave(n)), b, rng_key{6, 1, 0});
  CHECK(a.indices != b.indices);
}

TEST_CASE("random-k gives the same payload for host_seq and host_par with 1, 2, 3 and 7 threads") {
  constexpr std::size_t n = 300000;
  const auto x = wave(n, 0.7f);
  for (std::size_t k : {std::size_t{20000}, std::size_t{200000}}) {  // sampled and complement paths
    gcomp::randomk<float> c({.k = k});
    const auto ref = gcomp::test::check_same_payload_for_every_policy(
        c, x, rng_key{1, 4, 2}, 0.5f, 0.25f, gcomp::test::reuse::fresh_per_policy,
        [](const auto& m, const auto& r) {
          CHECK(m.indices == r.indices);
          CHECK(m.data == r.data);
        });
    check_sorted_distinct(ref, n, k);
  }
}

TEST_CASE("random-k wire bytes equal the encoding and the formula; decode survives corruption") {
  for (std::size_t n : {1u, 10u, 5000u}) {
    gcomp::randomk<float> c({.ratio = 0.1});
    const auto x = wave(n);
    gcomp::sparse_payload<float> m;
    c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{2, 0, 0});
    std::vector<std::byte> bytes;
    encode(m, bytes);
    const std::size_t k = c.kept(n);
    CHECK(c.wire_bytes(m) == bytes.size());
    CHECK(bytes.size() == 24 + 8 + k * (4 + 4));
    CHECK(c.bits_per_element(n) == doctest::Approx(8.0 * double(bytes.size()) / double(n)));
    gcomp::sparse_payload<float> back;
    decode(bytes, back, n);
    CHECK(back.indices == m.indices);
    CHECK(decompressed(c, back, n) == decompressed(c, m, n));
    gcomp::sparse_payload<float> sentinel;
    sentinel.dimension = 3;
    sentinel.indices = {1};
    sentinel.data = {2.0f};
    const auto outcomes = gcomp::test::check_decode_is_safe(bytes, sentinel, n);
    CHECK(outcomes.rejected > 20);
  }
  // 64-bit indices for a vector that needs them are a template argument away.
  gcomp::randomk<double, gcomp::key_use::per_worker, gcomp::rescale::unbiased, std::uint64_t> wide(
      {.k = 3});
  gcomp::sparse_payload<double, std::uint64_t> m;
  const std::vector<double> x = {1, 2, 3, 4, 5};
  wide.compress(gcomp::host_seq{}, std::span<const double>(x), m, rng_key{});
  CHECK(wide.wire_bytes(m) == 24 + 8 + 3 * 16);
}

TEST_CASE("random-k rejects bad options and bad input before writing anything") {
  CHECK_THROWS_WITH_AS(gcomp::randomk<float>({}),
                       "gcomp::randomk: set k > 0 or ratio in (0, 1]; both are 0", gcomp::error);
  CHECK_THROWS_WITH_AS(gcomp::randomk<float>({.k = 2, .ratio = 0.5}),
                       "gcomp::randomk: set either k (2) or ratio (0.5), not both", gcomp::error);
  CHECK_THROWS_WITH_AS(gcomp::randomk<float>({.ratio = 1.5}),
                       "gcomp::randomk: ratio must be in (0, 1], got 1.5", gcomp::error);
  CHECK_THROWS_AS(gcomp::randomk<float>({.ratio = std::nan("")}), gcomp::error);
  CHECK_THROWS_WITH_AS(gcomp::randomk<float>({.k = 3}, gcomp::layout{4, 4}),
                       "gcomp::randomk: a per-layer random-k takes ratio, not k (got k = 3)",
                       gcomp::error);

  gcomp::randomk<float> c({.k = 8});
  const auto x = wave(5);
  gcomp::sparse_payload<float> m;
  m.dimension = 2;
  m.indices = {1};
  m.data = {4.0f};
  const auto before = m;
  CHECK_THROWS_WITH_AS(c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{}),
                       "gcomp::randomk::kept: k = 8 exceeds the gradient size 5", gcomp::error);
  gcomp::test::check_sparse_unchanged(m, before);

  // decompress_add: wrong size, wrong k, unsorted or out-of-range indices.
  gcomp::randomk<float> c2({.k = 2});
  gcomp::sparse_payload<float> good;
  c2.compress(gcomp::host_seq{}, std::span<const float>(x), good, rng_key{});
  std::vector<float> out(5, 1.0f), small(4, 1.0f);
  CHECK_THROWS_WITH_AS(
      c2.decompress_add(gcomp::host_seq{}, good, std::span<float>(small), 1.0f),
      "gcomp::randomk::decompress_add: message dimension is 5 but out has size 4", gcomp::error);
  auto bad = good;
  std::swap(bad.indices[0], bad.indices[1]);
  CHECK_THROWS_AS(c2.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f),
                  gcomp::error);
  bad = good;
  bad.indices[1] = 5;
  CHECK_THROWS_AS(c2.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f),
                  gcomp::error);
  bad = good;
  bad.data.pop_back();
  CHECK_THROWS_AS(c2.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f),
                  gcomp::error);
  gcomp::randomk<float> c3({.k = 1});
  CHECK_THROWS_WITH_AS(
      c3.decompress_add(gcomp::host_seq{}, good, std::span<float>(out), 1.0f),
      "gcomp::randomk::decompress_add: message has 2 values but this random-k keeps 1 of 5",
      gcomp::error);
  CHECK(out == std::vector<float>(5, 1.0f));
  CHECK(small == std::vector<float>(4, 1.0f));
}

TEST_CASE("per-layer random-k keeps round(ratio * size) of every layer, each scaled by its own size/k") {
  const gcomp::layout lay = gcomp::layout::from_layers(
      {{"b", 100, 50, {}}, {"a", 0, 20, {}}, {"c", 160, 40, {}}}, gcomp::gaps::allowed);
  gcomp::randomk<float> c({.ratio = 0.25}, lay);
  CHECK(c.kept(200) == 13 + 5 + 10);
  CHECK(c.alpha(200) == doctest::Approx(4.0));  // layers a and c: 20/5 = 40/10 = 4
  const auto x = wave(200, 0.2f);
  gcomp::sparse_payload<float> m;
  c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{4, 1, 0});
  check_sorted_distinct(m, 200, 28);
  std::size_t in_a = 0, in_b = 0, in_c = 0;
  for (std::size_t j = 0; j < m.size(); ++j) {
    const auto i = m.indices[j];
    if (i < 20) {
      ++in_a;
      CHECK(m.data[j] == x[i] * float(20.0 / 5.0));
    } else if (i >= 100 && i < 150) {
      ++in_b;
      CHECK(m.data[j] == x[i] * float(50.0 / 13.0));
    } else if (i >= 160) {
      ++in_c;
      CHECK(m.data[j] == x[i] * float(40.0 / 10.0));
    } else {
      FAIL("index ", i, " lies in a gap between layers");
    }
  }
  CHECK(in_a == 5);
  CHECK(in_b == 13);
  CHECK(in_c == 10);
  std::vector<float> wrong(150);
  CHECK_THROWS_AS(c.compress(gcomp::host_seq{}, std::span<const float>(wrong), m, rng_key{}),
                  gcomp::error);
}

TEST_CASE("shared random-k all-reduces in a pipeline: 4 workers get the mean of their C(g_m)") {
  constexpr int workers = 4;
  constexpr std::size_t n = 1000;
  const gcomp::layout lay{600, 400};
  constexpr std::uint64_t seed = 21;
  std::vector<std::vector<float>> grads(workers), globals(workers);
  for (int m = 0; m < workers; ++m) grads[m] = wave(n, 0.5f * float(m));

  // By hand: each worker's own C(g_m) with its key, averaged.
  std::vector<double> expected(n, 0.0);
  for (int m = 0; m < workers; ++m) {
    gcomp::shared_randomk<float> c({.ratio = 0.05});
    gcomp::sparse_payload<float> msg;
    c.compress(gcomp::host_seq{}, std::span<const float>(grads[m]), msg,
               rng_key{seed, 0, std::uint32_t(m)});
    const auto dense = decompressed(c, msg, n);
    for (std::size_t i = 0; i < n; ++i) expected[i] += dense[i] / workers;
  }

  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    gcomp::pipeline pipe{gcomp::shared_randomk<float>({.ratio = 0.05}), gcomp::allreduce{},
                         gcomp::sgd<float>{{.lr = 1.0}}, seed};
    std::vector<float> params(n, 0.0f);
    pipe.step(gcomp::host_par(2), comm, lay, std::span<float>(params),
              std::span<const float>(grads[comm.rank()]));
    const auto global = pipe.global_gradient();
    globals[comm.rank()].assign(global.begin(), global.end());
  });
  std::size_t nonzero = 0;
  for (std::size_t i = 0; i < n; ++i) {
    nonzero += expected[i] != 0.0;
    CHECK(globals[0][i] == doctest::Approx(expected[i]).epsilon(1e-6));
    for (int m = 1; m < workers; ++m) REQUIRE(globals[m][i] == globals[0][i]);
  }
  CHECK(nonzero == 50);
}

#include "gcomp/aggregate/allgather.hpp"

TEST_CASE("per-worker random-k runs under the allgather aggregator: the mean of every C(g_m)") {
  constexpr int workers = 4;
  constexpr std::size_t n = 300;
  std::vector<std::vector<float>> grads(workers), globals(workers);
  std::vector<double> expected(n, 0.0);
  for (int m = 0; m < workers; ++m) {
    grads[m] = wave(n, float(m));
    gcomp::randomk<float> c({.k = 20});
    gcomp::sparse_payload<float> msg;
    c.compress(gcomp::host_seq{}, std::span<const float>(grads[m]), msg, rng_key{6, 0, std::uint32_t(m)});
    const auto dense = decompressed(c, msg, n);
    for (std::size_t i = 0; i < n; ++i) expected[i] += dense[i] / workers;
  }
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    gcomp::allgather aggregate;
    gcomp::randomk<float> c({.k = 20});
    globals[comm.rank()].resize(n);
    aggregate.aggregate(gcomp::host_seq{}, comm, c, std::span<const float>(grads[comm.rank()]),
                        std::span<float>(globals[comm.rank()]), rng_key{6, 0, std::uint32_t(comm.rank())});
    CHECK(aggregate.last_bytes() == 24 + 8 + 20 * 8);
  });
  for (std::size_t i = 0; i < n; ++i)
    for (int m = 0; m < workers; ++m) CHECK(globals[m][i] == doctest::Approx(expected[i]).epsilon(1e-6));
}
