// Tests of compress/random_block.hpp: wrapped contiguous blocks, exact expectations over all offsets, uniform shared offsets, wire form, determinism, input checks, all-reduce in a pipeline.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "compressor_checks.hpp"
#include "gcomp/aggregate/allreduce.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/compress/random_block.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/sparse_payload.hpp"
#include "gcomp/optim/sgd.hpp"
#include "gcomp/pipeline.hpp"
#include "wire_fuzz.hpp"

using gcomp::rng_key;
using gcomp::test::decompressed;

namespace {

std::vector<float> wave(std::size_t n, float phase = 0.0f) {
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i) x[i] = std::cos(0.61f * float(i) + phase) + 0.1f * float(i % 5);
  return x;
}

}  // namespace

static_assert(gcomp::allreducible_compressor<gcomp::random_contiguous_block<float>>);
static_assert(gcomp::allreducible_compressor<gcomp::random_contiguous_block<double, gcomp::rescale::none>,
                                             gcomp::host_par, double>);
static_assert(gcomp::compressor_traits<gcomp::random_contiguous_block<float>>::unbiased);
static_assert(!gcomp::compressor_traits<gcomp::random_contiguous_block<float, gcomp::rescale::none>>::unbiased);

TEST_CASE("random block keeps k consecutive elements from the shared offset, wrapping around") {
  constexpr std::size_t n = 37, k = 10;
  const auto x = wave(n);
  gcomp::random_contiguous_block<float> c({.k = k});
  gcomp::block_payload<float> m;
  bool wrapped = false;
  for (std::uint64_t step = 0; step < 50; ++step) {
    const rng_key key{9, step, 1};
    c.compress(gcomp::host_seq{}, std::span<const float>(x), m, key);
    REQUIRE(m.size() == k);
    CHECK(m.dimension == n);
    CHECK(m.offset == c.offset_for(key, n));
    CHECK(m.offset == c.offset_for(rng_key{9, step, 7}, n));  // the same on every worker
    wrapped = wrapped || m.offset + k > n;
    const float s = float(double(n) / double(k));
    for (std::size_t j = 0; j < k; ++j) REQUIRE(m.data[j] == x[(m.offset + j) % n] * s);
    const auto dense = decompressed(c, m, n);
    for (std::size_t i = 0; i < n; ++i) {
      const bool inside = (i + n - m.offset) % n < k;
      REQUIRE(dense[i] == (inside ? x[i] * s : 0.0f));
    }
  }
  CHECK(wrapped);
  CHECK(gcomp::random_contiguous_block<float>({.ratio = 0.1}).kept(1000) == 100);
}

TEST_CASE("over all n offsets the block is exactly unbiased and the unscaled block contracts by k/n") {
  // The offset is uniform on [0, n), so averaging over every offset gives the
  // exact expectation: E[C(x)] = x rescaled, and without rescaling
  // E||C(x) - x||^2 = (1 - k/n) ||x||^2 (delta = k/n in expectation), while a
  // single draw only guarantees ||C(x) - x||^2 <= ||x||^2.
  constexpr std::size_t n = 23, k = 6;
  const auto x = wave(n, 0.4f);
  gcomp::random_contiguous_block<double> scaled({.k = k});
  gcomp::random_contiguous_block<double, gcomp::rescale::none> plain({.k = k});
  std::vector<double> xd(x.begin(), x.end()), mean(n, 0.0);
  double norm2 = 0.0, err_mean = 0.0;
  for (double v : xd) norm2 += v * v;
  for (std::size_t offset = 0; offset < n; ++offset) {
    gcomp::block_payload<double> m;
    m.dimension = n;
    m.offset = offset;
    for (std::size_t j = 0; j < k; ++j) m.data.push_back(xd[(offset + j) % n] * double(n) / k);
    scaled.decompress_add(gcomp::host_seq{}, m, std::span<double>(mean), 1.0 / n);
    for (std::size_t j = 0; j < k; ++j) m.data[j] = xd[(offset + j) % n];
    std::vector<double> diff(xd);
    plain.decompress_add(gcomp::host_seq{}, m, std::span<double>(diff), -1.0);
    double err = 0.0;
    for (double v : diff) err += v * v;
    CHECK(err <= norm2);
    err_mean += err / n;
  }
  for (std::size_t i = 0; i < n; ++i) CHECK(mean[i] == doctest::Approx(xd[i]).epsilon(1e-12));
  CHECK(err_mean == doctest::Approx((1.0 - double(k) / n) * norm2).epsilon(1e-12));
}

TEST_CASE("the shared offset is uniform and the compressor unbiased by Monte Carlo (5 sigma)") {
  // Offsets: each of the n values has Binomial(T, 1/n) hits; C(x)_i is
  // (n/k) x_i with probability k/n, so its T-draw mean has sigma
  // |x_i| sqrt((n/k - 1)/T). The Monte-Carlo rule of compressor_checks.hpp
  // (5 sigma, 5.7e-7 each), union bound over 2n = 40 statistics: 2.3e-5.
  constexpr std::size_t n = 20, k = 4, trials = 40000;
  const auto x = wave(n, 1.3f);
  gcomp::random_contiguous_block<float> c({.k = k});
  gcomp::block_payload<float> m;
  std::vector<std::size_t> hits(n, 0);
  gcomp::test::monte_carlo mc(n, trials);
  for (std::size_t t = 0; t < trials; ++t) {
    c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{17, t, 0});
    ++hits[m.offset];
    for (std::size_t j = 0; j < k; ++j) mc.add((m.offset + j) % n, m.data[j]);
  }
  const double p = 1.0 / n;
  for (std::size_t o = 0; o < n; ++o)
    gcomp::test::check_within_sigmas(double(hits[o]), trials * p, std::sqrt(trials * p * (1 - p)), "offset hits");
  mc.check_means([&](std::size_t i) { return x[i]; },
                 [&](std::size_t i) { return double(x[i]) * x[i] * (double(n) / k - 1.0); });
  CHECK(c.alpha(n) == doctest::Approx(5.0));
}

TEST_CASE("random block: host_seq and host_par with 1, 2, 3, 7 threads agree bitwise") {
  constexpr std::size_t n = 250000;
  const auto x = wave(n);
  gcomp::random_contiguous_block<float> c({.ratio = 0.3});
  gcomp::test::check_same_payload_for_every_policy(c, x, rng_key{3, 3, 3}, 1.0f, -0.5f,
                                                   gcomp::test::reuse::one_compressor,
                                                   [](const auto& m, const auto& ref) {
                                                     CHECK(m.offset == ref.offset);
                                                     CHECK(m.data == ref.data);
                                                   });
}

TEST_CASE("random block wire form: exact sizes, round trip, support form, decode safety") {
  constexpr std::size_t n = 300;
  gcomp::random_contiguous_block<float> c({.k = 45});
  const auto x = wave(n);
  gcomp::block_payload<float> m;
  c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{1, 2, 0});
  std::vector<std::byte> bytes;
  encode(m, bytes);
  CHECK(c.wire_bytes(m) == bytes.size());
  CHECK(bytes.size() == 24 + 16 + 45 * 4);
  CHECK(c.bits_per_element(n) == doctest::Approx(8.0 * double(bytes.size()) / n));
  gcomp::block_payload<float> back;
  decode(bytes, back, n);
  CHECK(back.offset == m.offset);
  CHECK(back.data == m.data);
  CHECK(decompressed(c, back, n) == decompressed(c, m, n));

  std::vector<std::byte> support;
  encode_support(m, support);
  CHECK(support.size() == encoded_support_size(m));
  CHECK(support.size() == 24 + 16);
  gcomp::block_payload<float> s;
  decode_support(support, s, n);
  CHECK(s.offset == m.offset);
  CHECK(s.data == std::vector<float>(45, 0.0f));
  CHECK_THROWS_AS(decode(support, s, n), gcomp::error);
  CHECK_THROWS_AS(decode_support(bytes, s, n), gcomp::error);
  // A sparse_payload decoder refuses a block message (and vice versa).
  gcomp::sparse_payload<float> sparse;
  CHECK_THROWS_AS(decode(bytes, sparse, n), gcomp::error);

  gcomp::block_payload<float> sentinel;
  sentinel.dimension = 7;
  sentinel.offset = 6;
  sentinel.data = {1.0f, 2.0f};
  auto outcomes = gcomp::test::check_decode_is_safe(bytes, sentinel, n);
  CHECK(outcomes.rejected > 100);
  // Offsets and lengths from the wire are checked against the dimension.
  auto bad = bytes;
  const std::uint64_t offset = n;
  std::memcpy(bad.data() + 24, &offset, 8);
  CHECK_THROWS_WITH_AS(decode(bad, back, n),
                       "gcomp::decode(block_payload): offset 300 is out of range for dimension 300",
                       gcomp::error);
}

TEST_CASE("random block rejects bad options and input before writing anything") {
  CHECK_THROWS_AS(gcomp::random_contiguous_block<float>({}), gcomp::error);
  CHECK_THROWS_WITH_AS(gcomp::random_contiguous_block<float>({.ratio = 0.0 - 0.5}),
                       "gcomp::random_contiguous_block: ratio must be in (0, 1], got -0.5", gcomp::error);
  gcomp::random_contiguous_block<float> c({.k = 6});
  const auto x = wave(5);
  gcomp::block_payload<float> m;
  m.dimension = 9;
  m.offset = 3;
  m.data = {1.0f};
  CHECK_THROWS_WITH_AS(c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{}),
                       "gcomp::random_contiguous_block: k = 6 exceeds the gradient size 5", gcomp::error);
  CHECK(m.dimension == 9);
  CHECK(m.offset == 3);
  CHECK(m.data == std::vector<float>{1.0f});

  gcomp::random_contiguous_block<float> c2({.k = 2});
  c2.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{});
  std::vector<float> out(5, 2.0f), longer(6, 2.0f);
  CHECK_THROWS_WITH_AS(
      c2.decompress_add(gcomp::host_seq{}, m, std::span<float>(longer), 1.0f),
      "gcomp::random_contiguous_block::decompress_add: message dimension is 5 but out has size 6",
      gcomp::error);
  auto bad = m;
  bad.offset = 5;
  CHECK_THROWS_AS(c2.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f),
                  gcomp::error);
  bad = m;
  bad.data.push_back(1.0f);
  CHECK_THROWS_AS(c2.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f),
                  gcomp::error);
  CHECK(out == std::vector<float>(5, 2.0f));
  CHECK(longer == std::vector<float>(6, 2.0f));
}

TEST_CASE("random block all-reduces in a pipeline: 4 workers get the mean of their C(g_m)") {
  constexpr int workers = 4;
  constexpr std::size_t n = 500;
  const gcomp::layout lay{n};
  std::vector<std::vector<float>> grads(workers), globals(workers);
  for (int m = 0; m < workers; ++m) grads[m] = wave(n, float(m));
  std::vector<double> expected(n, 0.0);
  for (int m = 0; m < workers; ++m) {
    gcomp::random_contiguous_block<float> c({.ratio = 0.1});
    gcomp::block_payload<float> msg;
    c.compress(gcomp::host_seq{}, std::span<const float>(grads[m]), msg,
               rng_key{77, 0, std::uint32_t(m)});
    const auto dense = decompressed(c, msg, n);
    for (std::size_t i = 0; i < n; ++i) expected[i] += dense[i] / workers;
  }
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    gcomp::pipeline pipe{gcomp::random_contiguous_block<float>({.ratio = 0.1}), gcomp::allreduce{},
                         gcomp::sgd<float>{{.lr = 1.0}}, 77};
    std::vector<float> params(n, 0.0f);
    pipe.step(gcomp::host_seq{}, comm, lay, std::span<float>(params),
              std::span<const float>(grads[comm.rank()]));
    globals[comm.rank()].assign(pipe.global_gradient().begin(), pipe.global_gradient().end());
    // The allreduce moved k values, not n (plus the pipeline's one-float
    // non-finite check, core/nonfinite.hpp).
    CHECK(comm.stats().bytes_sent == (50 + 1) * sizeof(float));
  });
  std::size_t nonzero = 0;
  for (std::size_t i = 0; i < n; ++i) {
    nonzero += expected[i] != 0.0;
    CHECK(globals[0][i] == doctest::Approx(expected[i]).epsilon(1e-6));
    for (int m = 1; m < workers; ++m) REQUIRE(globals[m][i] == globals[0][i]);
  }
  CHECK(nonzero == 50);
}
