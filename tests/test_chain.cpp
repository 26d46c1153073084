// Tests of compress/chain.hpp: composition semantics, unbiasedness of an unbiased chain by Monte Carlo, traits, exact nested wire form, decode safety, determinism, input checks.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "compressor_checks.hpp"
#include "gcomp/aggregate/allreduce.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/compress/chain.hpp"
#include "gcomp/compress/identity.hpp"
#include "gcomp/compress/random_block.hpp"
#include "gcomp/compress/randomk.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/message.hpp"
#include "gcomp/optim/sgd.hpp"
#include "gcomp/pipeline.hpp"
#include "wire_fuzz.hpp"

using gcomp::rng_key;
using gcomp::test::decompressed;

namespace {

// A small unbiased quantizer of the tests' own: stochastic rounding to a grid
// of step delta (default 0.5), E[q] = x and Var q = delta^2 f (1 - f).
using stochastic_grid = gcomp::test::grid_compressor<gcomp::test::grid_rounding::stochastic>;

std::vector<float> ramp(std::size_t n, float phase = 0.0f) {
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i) x[i] = std::sin(0.7f * float(i) + phase) * 2.0f + 0.3f;
  return x;
}

using rk = gcomp::randomk<float>;
using shared_rk = gcomp::shared_randomk<float>;
using block = gcomp::random_contiguous_block<float>;
using id = gcomp::identity<float>;

}  // namespace

static_assert(gcomp::compressor<gcomp::chain<rk, stochastic_grid>>);
static_assert(gcomp::compressor_traits<gcomp::chain<rk, stochastic_grid>>::unbiased);
static_assert(!gcomp::compressor_traits<
              gcomp::chain<gcomp::randomk<float, gcomp::key_use::per_worker, gcomp::rescale::none>,
                           stochastic_grid>>::unbiased);
static_assert(!gcomp::allreducible_compressor<gcomp::chain<rk, id>>);
static_assert(!gcomp::allreducible_compressor<gcomp::chain<shared_rk, stochastic_grid>>);
static_assert(gcomp::allreducible_compressor<gcomp::chain<shared_rk, id>>);
static_assert(gcomp::allreducible_compressor<gcomp::chain<block, id>, gcomp::host_par>);

TEST_CASE("chain<random-k, random-k> is random-k of the kept values, scaled by both") {
  constexpr std::size_t n = 100;
  const auto x = ramp(n);
  gcomp::chain<rk, rk> c(rk({.k = 10}), rk({.k = 3}));
  gcomp::chain_payload<gcomp::sparse_payload<float>, gcomp::sparse_payload<float>> m;
  c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{1, 2, 3});
  CHECK(m.support.size() == 10);
  CHECK(m.values_message.size() == 3);
  CHECK(m.values_message.dimension == 10);
  const auto dense = decompressed(c, m, n);
  std::size_t nonzero = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (dense[i] == 0.0f) continue;
    ++nonzero;
    CHECK(dense[i] == doctest::Approx(x[i] * 100.0f / 3.0f).epsilon(1e-6));
  }
  CHECK(nonzero == 3);
  // B draws from its own sub-stream: its 3 positions among the 10 are not
  // simply the first positions A's stream would give.
  gcomp::sparse_payload<float> plain;
  rk({.k = 3}).compress(gcomp::host_seq{}, std::span<const float>(m.support.data), plain,
                        rng_key{1, 2, 3});
  CHECK(plain.indices != m.values_message.indices);
}

TEST_CASE("chain<random-k, stochastic rounding> is unbiased: Monte-Carlo mean within 5 sigma") {
  // Coordinate i is kept with probability k/n as y = (n/k) x_i, then rounded
  // stochastically: E[C_i] = x_i and E[C_i^2] = (k/n)(y^2 + delta^2 f (1 - f)),
  // f the fractional part of y / delta. The Monte-Carlo rule of
  // compressor_checks.hpp (5 sigma, T = 40000): failure 5.7e-7 each, union
  // bound over n = 24 coordinates 1.4e-5.
  constexpr std::size_t n = 24, k = 6, trials = 40000;
  const auto x = ramp(n, 0.2f);
  stochastic_grid q{0.5};
  gcomp::chain<rk, stochastic_grid> c(rk({.k = k}), q);
  decltype(c)::payload m;
  gcomp::test::monte_carlo mc(n, trials);
  for (std::size_t t = 0; t < trials; ++t) {
    c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{5, t, 0});
    mc.add_draw(decompressed(c, m, n));
  }
  mc.check_means([&](std::size_t i) { return x[i]; },
                 [&](std::size_t i) {
                   const double y = double(x[i] * float(double(n) / k));
                   const double f = y / q.delta - std::floor(y / q.delta);
                   const double second = double(k) / n * (y * y + q.delta * q.delta * f * (1 - f));
                   return second - double(x[i]) * x[i];
                 });
}

TEST_CASE("chain wire form: nested lengths, exact size, round trip, decode safety") {
  constexpr std::size_t n = 400;
  const auto x = ramp(n);
  gcomp::chain<rk, stochastic_grid> c(rk({.k = 40}), stochastic_grid{0.25});
  decltype(c)::payload m;
  c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{2, 0, 1});
  std::vector<std::byte> bytes;
  encode(m, bytes);
  const std::size_t support = 24 + 8 + 40 * 4, values = 24 + 40 * 4;
  CHECK(bytes.size() == 24 + 8 + support + 8 + values);
  CHECK(c.wire_bytes(m) == bytes.size());
  CHECK(c.bits_per_element(n) == doctest::Approx(8.0 * double(bytes.size()) / n));
  CHECK(static_cast<unsigned>(bytes[5]) == 5);  // kind chained
  std::uint64_t a_bytes = 0;
  std::memcpy(&a_bytes, bytes.data() + 24, 8);
  CHECK(a_bytes == support);

  decltype(c)::payload back;
  decode(bytes, back, n);
  CHECK(back.support.indices == m.support.indices);
  CHECK(back.values_message.data == m.values_message.data);
  CHECK(decompressed(c, back, n) == decompressed(c, m, n));

  decltype(c)::payload sentinel;  // another valid message, built by hand
  sentinel.support.dimension = 30;
  sentinel.support.indices = {3, 9};
  sentinel.support.data = {0.0f, 0.0f};
  sentinel.values_message.data = {1.0f, 2.0f};
  const auto outcomes = gcomp::test::check_decode_is_safe(bytes, sentinel, n);
  CHECK(outcomes.rejected > 100);

  // B's message must stand for exactly k values.
  auto wrong = m;
  wrong.values_message.data.pop_back();
  encode(wrong, bytes);
  CHECK_THROWS_WITH_AS(decode(bytes, back, n),
                       "gcomp::decode(dense_payload): message dimension is 39, expected 40",
                       gcomp::error);
  CHECK(back.values_message.data == m.values_message.data);
}

TEST_CASE("chain of a random block and identity all-reduces, and support-only block form nests") {
  constexpr int workers = 4;
  constexpr std::size_t n = 120;
  const gcomp::layout lay{n};
  using chained = gcomp::chain<block, id>;
  std::vector<std::vector<float>> grads(workers), globals(workers);
  std::vector<double> expected(n, 0.0);
  for (int m = 0; m < workers; ++m) {
    grads[m] = ramp(n, float(m));
    chained c(block({.k = 30}), id{});
    chained::payload msg;
    c.compress(gcomp::host_seq{}, std::span<const float>(grads[m]), msg, rng_key{4, 0, std::uint32_t(m)});
    std::vector<std::byte> bytes;
    encode(msg, bytes);
    CHECK(bytes.size() == 24 + 8 + (24 + 16) + 8 + (24 + 30 * 4));
    chained::payload back;
    decode(bytes, back, n);
    const auto dense = decompressed(c, back, n);
    CHECK(dense == decompressed(c, msg, n));
    for (std::size_t i = 0; i < n; ++i) expected[i] += dense[i] / workers;
  }
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    gcomp::pipeline pipe{chained(block({.k = 30}), id{}), gcomp::allreduce{},
                         gcomp::sgd<float>{{.lr = 1.0}}, 4};
    std::vector<float> params(n, 0.0f);
    pipe.step(gcomp::host_seq{}, comm, lay, std::span<float>(params),
              std::span<const float>(grads[comm.rank()]));
    globals[comm.rank()].assign(pipe.global_gradient().begin(), pipe.global_gradient().end());
  });
  for (std::size_t i = 0; i < n; ++i)
    for (int m = 0; m < workers; ++m)
      CHECK(globals[m][i] == doctest::Approx(expected[i]).epsilon(1e-6));
}

TEST_CASE("chain: host_seq and host_par 1, 2, 3, 7 give the same payload and output") {
  constexpr std::size_t n = 200000;
  const auto x = ramp(n);
  gcomp::chain<shared_rk, rk> c(shared_rk({.ratio = 0.3}), rk({.ratio = 0.5}));
  gcomp::test::check_same_payload_for_every_policy(
      c, x, rng_key{6, 1, 1}, 0.0f, 1.0f, gcomp::test::reuse::one_compressor,
      [](const auto& m, const auto& ref) {
        CHECK(m.support.indices == ref.support.indices);
        CHECK(m.values_message.indices == ref.values_message.indices);
        CHECK(m.values_message.data == ref.values_message.data);
      });
}

TEST_CASE("chain rejects mismatched messages before writing the output") {
  constexpr std::size_t n = 50;
  const auto x = ramp(n);
  gcomp::chain<rk, stochastic_grid> c(rk({.k = 5}), stochastic_grid{});
  decltype(c)::payload m;
  c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{});
  std::vector<float> out(n, 1.0f), other(n + 1, 1.0f);
  CHECK_THROWS_WITH_AS(c.decompress_add(gcomp::host_seq{}, m, std::span<float>(other), 1.0f),
                       "gcomp::chain::decompress_add: message dimension is 50 but out has size 51",
                       gcomp::error);
  auto bad = m;
  bad.values_message.data.push_back(0.0f);
  CHECK_THROWS_AS(c.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f),
                  gcomp::error);
  bad = m;
  bad.support.indices[1] = bad.support.indices[0];
  CHECK_THROWS_AS(c.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f),
                  gcomp::error);
  CHECK(out == std::vector<float>(n, 1.0f));
  CHECK(other == std::vector<float>(n + 1, 1.0f));
  // A's own input check runs first: k > n throws and leaves the payload alone.
  gcomp::chain<rk, stochastic_grid> big(rk({.k = 60}), stochastic_grid{});
  const auto before = m.support.indices;
  CHECK_THROWS_AS(big.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{}),
                  gcomp::error);
  CHECK(m.support.indices == before);
}

#if __has_include("gcomp/compress/topk.hpp")
#include "gcomp/compress/topk.hpp"

TEST_CASE("chain<topk, stochastic rounding>: the top-k support with quantized values") {
  constexpr std::size_t n = 64;
  auto x = ramp(n);
  x[5] = 40.0f;
  x[17] = -30.0f;
  x[40] = 25.0f;
  using chained = gcomp::chain<gcomp::topk<float>, stochastic_grid>;
  static_assert(!gcomp::compressor_traits<chained>::unbiased);
  static_assert(!gcomp::allreducible_compressor<chained>);
  chained c(gcomp::topk<float>({.k = 3}), stochastic_grid{0.5});
  chained::payload m;
  c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{1, 0, 0});
  CHECK(m.support.indices == std::vector<std::uint32_t>{5, 17, 40});
  std::vector<std::byte> bytes;
  encode(m, bytes);
  CHECK(c.wire_bytes(m) == bytes.size());
  CHECK(bytes.size() == 24 + 8 + (24 + 8 + 3 * 4) + 8 + (24 + 3 * 4));
  const auto dense = decompressed(c, m, n);
  for (std::size_t i = 0; i < n; ++i) {
    if (i == 5 || i == 17 || i == 40)
      CHECK(std::fabs(dense[i] - x[i]) < 0.5f);  // within one grid step
    else
      CHECK(dense[i] == 0.0f);
  }
}
#endif

#include "gcomp/aggregate/allgather.hpp"

TEST_CASE("a per-worker chain travels through the allgather aggregator's wire and decodes exactly") {
  constexpr int workers = 4;
  constexpr std::size_t n = 256;
  using chained = gcomp::chain<rk, stochastic_grid>;
  std::vector<std::vector<float>> grads(workers), globals(workers);
  std::vector<double> expected(n, 0.0);
  for (int m = 0; m < workers; ++m) {
    grads[m] = ramp(n, 0.3f * float(m));
    chained c(rk({.ratio = 0.1}), stochastic_grid{0.25});
    chained::payload msg;
    c.compress(gcomp::host_seq{}, std::span<const float>(grads[m]), msg, rng_key{2, 5, std::uint32_t(m)});
    const auto dense = decompressed(c, msg, n);
    for (std::size_t i = 0; i < n; ++i) expected[i] += dense[i] / workers;
  }
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    gcomp::allgather aggregate;
    chained c(rk({.ratio = 0.1}), stochastic_grid{0.25});
    globals[comm.rank()].resize(n);
    aggregate.aggregate(gcomp::host_seq{}, comm, c, std::span<const float>(grads[comm.rank()]),
                        std::span<float>(globals[comm.rank()]), rng_key{2, 5, std::uint32_t(comm.rank())});
  });
  for (std::size_t i = 0; i < n; ++i)
    for (int m = 0; m < workers; ++m) {
      CHECK(globals[m][i] == doctest::Approx(expected[i]).epsilon(1e-6));
      REQUIRE(globals[m][i] == globals[0][i]);
    }
}
