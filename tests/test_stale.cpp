// Tests of aggregate/stale.hpp: the delay schedule (range, uniformity, reproducibility), the ring buffer of models against a full record, the refresh rule, and the parameter server against a naive server over in-process workers (sums, bytes, skipped collectives, refused inputs).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "compressor_checks.hpp"
#include "gcomp/aggregate/stale.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/compress/qsgd.hpp"
#include "gcomp/compress/randomk.hpp"

using gcomp::rng_key;

TEST_CASE("a fixed delay is tau, cut at the step") {
  const gcomp::delay_schedule s({.max_delay = 6, .kind = gcomp::delay_kind::fixed, .seed = 3});
  for (std::uint64_t k = 0; k < 20; ++k) {
    CHECK(s.drawn(k, 2) == 6);
    CHECK(s.delay(k, 2) == std::min<std::uint64_t>(6, k));
  }
  const gcomp::delay_schedule none(gcomp::delay_options{});
  CHECK(none.delay(100) == 0);
}

TEST_CASE("uniform delays cover [0, tau] evenly, follow the seed, and differ between workers") {
  // Each of the tau + 1 values is hit Binomial(N, 1 / (tau + 1)) times; the
  // check is 5 sigma per value, 11 values: false failure below 11 * 5.7e-7.
  constexpr std::size_t tau = 10, draws = 22000;
  const gcomp::delay_schedule s({.max_delay = tau, .kind = gcomp::delay_kind::uniform, .seed = 42});
  std::vector<double> hits(tau + 1, 0.0);
  for (std::uint64_t k = 0; k < draws; ++k) {
    const std::size_t d = s.drawn(k, 1);
    REQUIRE(d <= tau);
    hits[d] += 1;
    CHECK(s.delay(k, 1) == std::min<std::uint64_t>(d, k));
  }
  const double p = 1.0 / double(tau + 1);
  for (std::size_t d = 0; d <= tau; ++d)
    gcomp::test::check_within_sigmas(hits[d], draws * p, std::sqrt(draws * p * (1 - p)),
                                     ("hits of delay " + std::to_string(d)).c_str());
  // The same options give the same delays; another seed or worker others.
  const gcomp::delay_schedule same({.max_delay = tau, .kind = gcomp::delay_kind::uniform, .seed = 42});
  const gcomp::delay_schedule other({.max_delay = tau, .kind = gcomp::delay_kind::uniform, .seed = 43});
  int equal_same = 0, equal_seed = 0, equal_worker = 0;
  for (std::uint64_t k = 0; k < 1000; ++k) {
    equal_same += same.drawn(k, 1) == s.drawn(k, 1);
    equal_seed += other.drawn(k, 1) == s.drawn(k, 1);
    equal_worker += s.drawn(k, 2) == s.drawn(k, 1);
  }
  CHECK(equal_same == 1000);
  // Independent draws agree with probability 1/11: about 91 of 1000, sd 9.
  CHECK(equal_seed < 200);
  CHECK(equal_worker < 200);
}

TEST_CASE("delay options are checked") {
  gcomp::test::expect_error(
      [] { gcomp::delay_schedule({.max_delay = gcomp::delay_schedule::max_supported + 1}); },
      "gcomp::delay_schedule: options.max_delay must be in [0, 1048576], got 1048577");
  gcomp::test::expect_error(
      [] { gcomp::delay_schedule({.max_delay = 1, .kind = static_cast<gcomp::delay_kind>(7)}); },
      "options.kind = 7 is neither fixed nor uniform");
  gcomp::test::expect_error([] { gcomp::refresh_schedule(0); },
                            "gcomp::refresh_schedule: period must be > 0, got 0");
}

TEST_CASE("the model history returns the model pushed d pushes ago, across wrap-around") {
  for (std::size_t depth : {1u, 3u, 7u}) {
    CAPTURE(depth);
    gcomp::model_history<float> h(depth);
    std::vector<std::vector<float>> pushed;  // the oracle: every model ever pushed
    for (int k = 0; k < 20; ++k) {
      std::vector<float> x = gcomp::test::wave(37, 0.1f * float(k));
      h.push(gcomp::host_par(2), std::span<const float>(x));
      pushed.push_back(x);
      REQUIRE(h.size() == std::min<std::size_t>(depth, pushed.size()));
      for (std::size_t d = 1; d <= h.size(); ++d) {
        const auto got = h.ago(d);
        CHECK(std::vector<float>(got.begin(), got.end()) == pushed[pushed.size() - d]);
      }
    }
    CHECK(h.pushes() == 20);
    CHECK(h.dimension() == 37);
    // Out-of-range requests and a model of another size are refused, the history unchanged.
    gcomp::test::expect_error([&] { (void)h.ago(0); }, "gcomp::model_history::ago: d must be in [1, ");
    gcomp::test::expect_error([&] { (void)h.ago(depth + 1); }, "gcomp::model_history::ago: d must be in [1, ");
    const std::vector<float> wrong(36, 1.0f);
    gcomp::test::expect_error([&] { h.push(gcomp::host_seq{}, std::span<const float>(wrong)); },
                              "gcomp::model_history::push: x has size 36 but the models held has size 37");
    CHECK(h.pushes() == 20);
    const auto last = h.ago(1);
    CHECK(std::vector<float>(last.begin(), last.end()) == pushed.back());
  }
  gcomp::model_history<double> empty(0);
  const std::vector<double> x(4, 1.0);
  empty.push(gcomp::host_seq{}, std::span<const double>(x));
  CHECK(empty.size() == 0);
  gcomp::test::expect_error([&] { (void)empty.ago(1); }, "gcomp::model_history::ago");
}

TEST_CASE("refresh schedule: everyone at step 0, then worker m at the steps k = m (mod period)") {
  const gcomp::refresh_schedule r(3);
  for (int m = 0; m < 5; ++m) CHECK(r.due(0, m));
  for (std::uint64_t k = 1; k < 30; ++k)
    for (int m = 0; m < 5; ++m) CHECK(r.due(k, m) == (k % 3 == std::uint64_t(m % 3)));
  const gcomp::refresh_schedule every(1);
  for (std::uint64_t k = 0; k < 10; ++k) CHECK(every.due(k, 4));
}

namespace {

constexpr int ranks = 3;
constexpr std::size_t n = 300;

std::vector<double> local_gradient(int rank, std::uint64_t step) {
  const auto w = gcomp::test::wave(n, 0.3f * float(rank) + 0.05f * float(step));
  return std::vector<double>(w.begin(), w.end());
}

// Which ranks send at step k in the test's schedule: all at 0, then a pattern
// with a step where nobody sends (k = 4) and one where everybody does (k = 6).
std::vector<std::uint8_t> due_at(std::uint64_t k) {
  static const std::vector<std::vector<std::uint8_t>> pattern = {
      {1, 1, 1}, {1, 0, 0}, {0, 1, 0}, {0, 0, 1}, {0, 0, 0}, {1, 0, 1}, {1, 1, 1}, {0, 1, 0}};
  return pattern[k % pattern.size()];
}

}  // namespace

TEST_CASE("parameter server: every worker holds the sum of each rank's last message, bit for bit") {
  constexpr std::uint64_t steps = 16;
  using C = gcomp::qsgd<double>;
  const gcomp::qsgd_options options{.levels = 7, .bucket = 64};
  // The naive server: for every rank its last q_r, decoded; the sum in rank order.
  std::vector<std::vector<double>> expected(steps, std::vector<double>(n, 0.0));
  std::vector<std::size_t> expected_sent(ranks, 0), message_bytes(steps * ranks, 0);
  {
    std::vector<std::vector<double>> last(ranks);
    for (std::uint64_t k = 0; k < steps; ++k) {
      const auto due = due_at(k);
      for (int r = 0; r < ranks; ++r) {
        if (!due[std::size_t(r)]) continue;
        C c(options);
        gcomp::quantized_payload<double> m;
        const auto g = local_gradient(r, k);
        c.compress(gcomp::host_seq{}, std::span<const double>(g), m, rng_key{9, k, std::uint32_t(r)});
        last[std::size_t(r)] = gcomp::test::decompressed<C, double>(c, m, n);
        message_bytes[k * ranks + std::size_t(r)] = encoded_size(m);
        expected_sent[std::size_t(r)] += encoded_size(m);
      }
      for (int r = 0; r < ranks; ++r)
        for (std::size_t i = 0; i < n; ++i) expected[k][i] += last[std::size_t(r)][i];
    }
  }
  gcomp::inproc_group group(ranks);
  std::vector<std::uint64_t> collectives(ranks);
  group.run([&](gcomp::inproc_comm& comm) {
    C c(options);
    gcomp::parameter_server server;
    std::vector<double> global(n);
    const int me = comm.rank();
    std::size_t received = 0;
    for (std::uint64_t k = 0; k < steps; ++k) {
      const auto due = due_at(k);
      const auto g = local_gradient(me, k);
      server.aggregate(gcomp::host_par(2), comm, c, std::span<const std::uint8_t>(due),
                       std::span<const double>(g), std::span<double>(global),
                       rng_key{9, k, std::uint32_t(me)});
      CHECK(gcomp::test::same_bits(global, expected[k]));
      CHECK(server.last_bytes() == message_bytes[k * ranks + std::size_t(me)]);
      for (int r = 0; r < ranks; ++r)
        if (r != me) received += message_bytes[k * ranks + std::size_t(r)];
    }
    // The bytes on the wire are the due ranks' messages, under the accounting rule.
    CHECK(comm.stats().bytes_sent == expected_sent[std::size_t(me)]);
    CHECK(comm.stats().bytes_received == received);
    collectives[std::size_t(me)] = comm.stats().collectives;
  });
  // One allgatherv per step with a due rank: steps 4 and 12 need none.
  for (int r = 0; r < ranks; ++r) CHECK(collectives[std::size_t(r)] == steps - 2);
}

TEST_CASE("parameter server refuses bad input and foreign messages before writing global") {
  gcomp::inproc_group one(1);
  gcomp::parameter_server server;
  gcomp::randomk<float> c({.k = 3});
  const std::vector<float> g(10, 1.0f);
  std::vector<float> global(10, 5.0f), short_global(9, 5.0f);
  const std::vector<std::uint8_t> due1 = {1}, due2 = {1, 1};
  gcomp::test::expect_error(
      [&] {
        server.aggregate(gcomp::host_seq{}, one.comm(0), c, std::span<const std::uint8_t>(due2),
                         std::span<const float>(g), std::span<float>(global), rng_key{});
      },
      "gcomp::parameter_server::aggregate: due has size 2 but comm.size() has size 1");
  gcomp::test::expect_error(
      [&] {
        server.aggregate(gcomp::host_seq{}, one.comm(0), c, std::span<const std::uint8_t>(due1),
                         std::span<const float>(g), std::span<float>(short_global), rng_key{});
      },
      "local has size 10 but global has size 9");
  CHECK(global == std::vector<float>(10, 5.0f));
  server.aggregate(gcomp::host_seq{}, one.comm(0), c, std::span<const std::uint8_t>(due1),
                   std::span<const float>(g), std::span<float>(global), rng_key{});
  const std::vector<std::uint8_t> idle = {0};
  gcomp::test::expect_error(
      [&] {
        server.aggregate(gcomp::host_seq{}, one.comm(0), c, std::span<const std::uint8_t>(idle),
                         std::span<const float>(g), std::span<float>(short_global), rng_key{});
      },
      "global has size 9 but the dimension of the held messages has size 10");

  // Workers that disagree about who is due: the rank whose mask says rank 1
  // sends, while rank 1 stays silent, throws; global is not written.
  gcomp::inproc_group two(2);
  std::vector<std::vector<float>> globals(2, std::vector<float>(10, 5.0f));
  CHECK_THROWS_WITH_AS(two.run([&](gcomp::inproc_comm& comm) {
    gcomp::parameter_server s;
    gcomp::randomk<float> rk({.k = 3});
    const std::vector<std::uint8_t> due = comm.rank() == 0 ? std::vector<std::uint8_t>{1, 1}
                                                            : std::vector<std::uint8_t>{1, 0};
    s.aggregate(gcomp::host_seq{}, comm, rk, std::span<const std::uint8_t>(due),
                std::span<const float>(g), std::span<float>(globals[std::size_t(comm.rank())]),
                rng_key{});
  }),
                       "gcomp::parameter_server::aggregate: rank 1 sent 0 bytes but is marked due at "
                       "this step; every worker must pass the same due mask",
                       gcomp::error);
  CHECK(globals[0] == std::vector<float>(10, 5.0f));

  // A message of another compressor's shape (QSGD with other levels) decodes
  // as a payload but is refused by decompress_add, before global is written.
  std::vector<std::vector<float>> outs(2, std::vector<float>(10, 5.0f));
  CHECK_THROWS_AS(two.run([&](gcomp::inproc_comm& comm) {
    gcomp::parameter_server s;
    gcomp::qsgd<float> q({.levels = comm.rank() == 0 ? 7u : 3u, .bucket = 0});
    const std::vector<std::uint8_t> due = {1, 1};
    s.aggregate(gcomp::host_seq{}, comm, q, std::span<const std::uint8_t>(due),
                std::span<const float>(g), std::span<float>(outs[std::size_t(comm.rank())]), rng_key{});
  }),
                  gcomp::error);
  CHECK(outs[0] == std::vector<float>(10, 5.0f));
  CHECK(outs[1] == std::vector<float>(10, 5.0f));
}
