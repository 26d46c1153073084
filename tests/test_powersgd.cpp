// Tests of compress/powersgd.hpp and core/lowrank_payload.hpp: exactness on low-rank layers, convergence of the warm start, contraction, a naive reference step, dense fallbacks, wire form and decode safety, determinism, input checks.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "compressor_checks.hpp"
#include "gcomp/compress/error_feedback.hpp"
#include "gcomp/compress/powersgd.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/lowrank_payload.hpp"
#include "wire_fuzz.hpp"

using gcomp::rng_key;

namespace {

// M = sum_j s_j u_j v_j^T with orthonormal u (rows) and v (cols), from a
// Gram-Schmidt of Gaussian vectors: a matrix with known singular values.
std::vector<float> with_spectrum(std::size_t rows, std::size_t cols, std::vector<double> s,
                                 unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal;
  auto orthonormal = [&](std::size_t n, std::size_t k) {
    std::vector<std::vector<double>> v(k, std::vector<double>(n));
    for (std::size_t j = 0; j < k; ++j) {
      for (double& x : v[j]) x = normal(gen);
      for (int pass = 0; pass < 2; ++pass)
        for (std::size_t l = 0; l < j; ++l) {
          double d = 0;
          for (std::size_t i = 0; i < n; ++i) d += v[l][i] * v[j][i];
          for (std::size_t i = 0; i < n; ++i) v[j][i] -= d * v[l][i];
        }
      double norm = 0;
      for (double x : v[j]) norm += x * x;
      for (double& x : v[j]) x /= std::sqrt(norm);
    }
    return v;
  };
  const auto u = orthonormal(rows, s.size()), v = orthonormal(cols, s.size());
  std::vector<float> m(rows * cols);
  for (std::size_t i = 0; i < rows; ++i)
    for (std::size_t c = 0; c < cols; ++c) {
      double x = 0;
      for (std::size_t j = 0; j < s.size(); ++j) x += s[j] * u[j][i] * v[j][c];
      m[i * cols + c] = float(x);
    }
  return m;
}

std::vector<float> gaussian(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  std::vector<float> x(n);
  for (float& v : x) v = normal(gen);
  return x;
}

double squared_distance(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
  return s;
}

double squared_norm(const std::vector<float>& a) {
  double s = 0;
  for (float v : a) s += double(v) * v;
  return s;
}

std::vector<float> approximation(const gcomp::powersgd<float>& c, const gcomp::lowrank_payload<float>& m,
                                 std::size_t n) {
  std::vector<float> out(n, 0.0f);
  c.decompress_add(gcomp::host_seq{}, m, std::span<float>(out), 1.0f);
  return out;
}

gcomp::layout matrix_layout(std::size_t rows, std::size_t cols) {
  return gcomp::layout::from_layers({{"w", 0, rows * cols, {rows, cols}}});
}

}  // namespace

static_assert(gcomp::compressor<gcomp::powersgd<float>>);
static_assert(gcomp::compressor<gcomp::powersgd<double>, gcomp::host_par, double>);
static_assert(!gcomp::allreducible_compressor<gcomp::powersgd<float>>);
static_assert(gcomp::compressor<gcomp::error_feedback<gcomp::powersgd<float>>>);

TEST_CASE("PowerSGD is exact on a layer of rank <= r from the first step on") {
  // A rank-2 matrix: P = M Q spans its column space whenever Q's rows are in
  // general position (probability 1 for a Gaussian Q), so P P^T M = M up to
  // float rounding. With r = 3 one column of P is dependent: it must come out
  // as zero rather than noise blown up by normalisation.
  constexpr std::size_t rows = 30, cols = 20;
  const auto m = with_spectrum(rows, cols, {5.0, 2.0}, 1);
  for (std::size_t r : {2u, 3u}) {
    gcomp::powersgd<float> c({.rank = r}, matrix_layout(rows, cols));
    gcomp::lowrank_payload<float> msg;
    for (std::uint64_t step = 0; step < 5; ++step) {
      c.compress(gcomp::host_seq{}, std::span<const float>(m), msg, rng_key{1, step, 0});
      REQUIRE(msg.blocks.size() == 1);
      CHECK(msg.blocks[0].rank == r);
      const double err = squared_distance(approximation(c, msg, m.size()), m) / squared_norm(m);
      INFO("r = " << r << ", step " << step << ": relative squared error " << err);
      CHECK(err < 1e-10);  // float rounding of M, P and Q: about (1e-6)^2
    }
  }
}

TEST_CASE("PowerSGD's warm start converges to the best rank-r approximation") {
  // Singular values 10, 6, 1, 0.5, 0.1 and r = 2: the best rank-2 error is
  // 1 + 0.25 + 0.01 = 1.26 (Eckart-Young). Subspace iteration with a warm
  // start converges at rate s3 / s2 = 1/6 per step, so after 20 steps on the
  // same M the error is within 1% of 1.26 (at step 0 it may be far above).
  constexpr std::size_t rows = 40, cols = 25;
  const auto m = with_spectrum(rows, cols, {10.0, 6.0, 1.0, 0.5, 0.1}, 2);
  gcomp::powersgd<float> c({.rank = 2}, matrix_layout(rows, cols));
  gcomp::lowrank_payload<float> msg;
  double err = 0;
  for (std::uint64_t step = 0; step < 20; ++step) {
    c.compress(gcomp::host_seq{}, std::span<const float>(m), msg, rng_key{3, step, 0});
    err = squared_distance(approximation(c, msg, m.size()), m);
  }
  CHECK(err >= 1.26 * (1 - 1e-4));  // never better than the optimum
  CHECK(err <= 1.26 * 1.01);
}

TEST_CASE("PowerSGD is a contraction: ||M - C(M)||^2 <= ||M||^2, and P is orthonormal") {
  // P Q^T = P P^T M with P^T P = I: an orthogonal projection, so the error is
  // ||M||^2 - ||P^T M||^2. Slack 1e-6 relative for float rounding.
  constexpr std::size_t rows = 24, cols = 18;
  gcomp::powersgd<float> c({.rank = 3}, matrix_layout(rows, cols));
  gcomp::lowrank_payload<float> msg;
  for (std::uint64_t step = 0; step < 50; ++step) {
    const auto m = gaussian(rows * cols, unsigned(100 + step));
    c.compress(gcomp::host_seq{}, std::span<const float>(m), msg, rng_key{5, step, 2});
    const double norm = squared_norm(m);
    const double err = squared_distance(approximation(c, msg, m.size()), m);
    CHECK(err <= norm * (1 + 1e-6));
    CHECK(err < norm);  // a rank-3 projection of a full-rank M removes something
    for (std::size_t a = 0; a < 3; ++a)
      for (std::size_t b = 0; b < 3; ++b) {
        double d = 0;
        for (std::size_t i = 0; i < rows; ++i) d += double(msg.data[i * 3 + a]) * msg.data[i * 3 + b];
        CHECK(d == doctest::Approx(a == b ? 1.0 : 0.0).epsilon(1e-5).scale(1.0));
      }
  }
  // The zero matrix gives zero factors (every column degenerate) and no NaN.
  const std::vector<float> zero(rows * cols, 0.0f);
  c.compress(gcomp::host_seq{}, std::span<const float>(zero), msg, rng_key{5, 99, 2});
  for (float v : msg.data) CHECK(v == 0.0f);
  // ...and the warm start was redrawn, so a later nonzero M is approximated again.
  const auto m = with_spectrum(rows, cols, {3.0}, 9);
  c.compress(gcomp::host_seq{}, std::span<const float>(m), msg, rng_key{5, 100, 2});
  CHECK(squared_distance(approximation(c, msg, m.size()), m) < 1e-10 * squared_norm(m));
}

TEST_CASE("one PowerSGD step matches a naive reference from the same warm start") {
  constexpr std::size_t rows = 17, cols = 13, r = 3;
  gcomp::powersgd<float> c({.rank = r}, matrix_layout(rows, cols));
  gcomp::lowrank_payload<float> msg;
  const auto m1 = gaussian(rows * cols, 1), m2 = gaussian(rows * cols, 2);
  c.compress(gcomp::host_seq{}, std::span<const float>(m1), msg, rng_key{2, 0, 0});
  const std::vector<float> q0(c.warm_start(0).begin(), c.warm_start(0).end());
  REQUIRE(q0.size() == cols * r);
  // The warm start is the Q that was sent.
  for (std::size_t i = 0; i < cols * r; ++i) CHECK(q0[i] == msg.data[rows * r + i]);
  c.compress(gcomp::host_seq{}, std::span<const float>(m2), msg, rng_key{2, 1, 0});

  // Reference, all in double: P = M Q0; classical Gram-Schmidt; Q = M^T P.
  std::vector<double> p(rows * r, 0.0), q(cols * r, 0.0);
  for (std::size_t i = 0; i < rows; ++i)
    for (std::size_t j = 0; j < r; ++j)
      for (std::size_t k = 0; k < cols; ++k) p[i * r + j] += double(m2[i * cols + k]) * q0[k * r + j];
  for (std::size_t j = 0; j < r; ++j) {
    std::vector<double> col(rows);
    for (std::size_t i = 0; i < rows; ++i) col[i] = p[i * r + j];
    for (std::size_t l = 0; l < j; ++l) {
      double d = 0;
      for (std::size_t i = 0; i < rows; ++i) d += p[i * r + l] * p[i * r + j];
      for (std::size_t i = 0; i < rows; ++i) col[i] -= d * p[i * r + l];
    }
    double norm = 0;
    for (double x : col) norm += x * x;
    for (std::size_t i = 0; i < rows; ++i) p[i * r + j] = col[i] / std::sqrt(norm);
  }
  for (std::size_t k = 0; k < cols; ++k)
    for (std::size_t j = 0; j < r; ++j)
      for (std::size_t i = 0; i < rows; ++i) q[k * r + j] += double(m2[i * cols + k]) * p[i * r + j];
  for (std::size_t i = 0; i < rows * r; ++i) CHECK(msg.data[i] == doctest::Approx(p[i]).epsilon(1e-4).scale(1.0));
  for (std::size_t i = 0; i < cols * r; ++i)
    CHECK(msg.data[rows * r + i] == doctest::Approx(q[i]).epsilon(1e-4).scale(1.0));
}

TEST_CASE("PowerSGD sends 1-D layers, small matrices and rank >= min(rows, cols) dense") {
  const auto lay = gcomp::layout::from_layers(
      {{"bias", 0, 8, {}},                      // no shape
       {"small", 8, 16, {4, 4}},                // r (4 + 4) = 24 >= 16
       {"conv", 24, 2 * 3 * 3 * 3, {2, 3, 3, 3}},  // 2 x 27, r = 2 >= min
       {"w", 100, 20 * 10, {20, 10}},           // factored: 2 (20 + 10) = 60 < 200
       {"vec", 300, 5, {5}}},                   // 1-D shape
      gcomp::gaps::allowed);
  gcomp::powersgd<float> c({.rank = 2}, lay);
  const auto plan = c.plan();
  REQUIRE(plan.size() == 5);
  CHECK(plan[0].rank == 0);
  CHECK(plan[1].rank == 0);
  CHECK(plan[2].rank == 0);
  CHECK(plan[3].rank == 2);
  CHECK(plan[3].rows == 20);
  CHECK(plan[3].cols == 10);
  CHECK(plan[4].rank == 0);
  const auto g = gaussian(lay.total_size(), 4);
  gcomp::lowrank_payload<float> msg;
  c.compress(gcomp::host_seq{}, std::span<const float>(g), msg, rng_key{});
  CHECK(msg.size() == 8 + 16 + 54 + 60 + 5);
  const auto out = approximation(c, msg, g.size());
  for (std::size_t i = 0; i < g.size(); ++i) {
    const bool dense = i < 78 || (i >= 300 && i < 305);
    const bool gap = i >= 78 && i < 100;
    if (dense) CHECK(out[i] == g[i]);
    if (gap) CHECK(out[i] == 0.0f);
  }
  CHECK(c.warm_start(0).empty());
  CHECK(c.warm_start(3).size() == 10 * 2);
  CHECK(c.layer_of_block(3) == 3);
}

TEST_CASE("lowrank payload wire form: exact size, round trip, checked shapes, decode safety") {
  const auto lay = gcomp::layout::from_layers({{"b", 0, 6, {}}, {"w", 6, 12 * 9, {12, 9}}});
  gcomp::powersgd<float> c({.rank = 2}, lay);
  const auto g = gaussian(lay.total_size(), 5);
  gcomp::lowrank_payload<float> msg;
  c.compress(gcomp::host_seq{}, std::span<const float>(g), msg, rng_key{7, 0, 0});
  std::vector<std::byte> bytes;
  encode(msg, bytes);
  const std::size_t expected = 24 + 8 + 2 * 32 + (6 + 2 * (12 + 9)) * 4;
  CHECK(bytes.size() == expected);
  CHECK(c.wire_bytes(msg) == expected);
  CHECK(c.bits_per_element(g.size()) == doctest::Approx(8.0 * expected / double(g.size())));
  gcomp::lowrank_payload<float> back;
  decode(bytes, back, g.size());
  CHECK(back.blocks == msg.blocks);
  CHECK(back.data == msg.data);

  gcomp::lowrank_payload<float> sentinel;
  sentinel.dimension = 4;
  sentinel.blocks = {{0, 2, 2, 1}};
  sentinel.data = {1, 2, 3, 4};
  const auto outcomes = gcomp::test::check_decode_is_safe(bytes, sentinel, g.size());
  CHECK(outcomes.rejected > 100);

  auto expect_rejected = [&](std::size_t field_offset, std::uint64_t value, const char* needle) {
    auto bad = bytes;
    std::memcpy(bad.data() + field_offset, &value, 8);
    auto into = sentinel;
    try {
      decode(bad, into, g.size());
      FAIL("accepted: ", needle);
    } catch (const gcomp::error& e) {
      CHECK_MESSAGE(std::string(e.what()).find(needle) != std::string::npos, std::string(e.what()));
    }
    CHECK(into.data == sentinel.data);
  };
  // Block 1's fields start at 24 + 8 + 32: offset, rows, cols, rank.
  expect_rejected(64 + 24, 10, "above min(rows, cols)");
  expect_rejected(64, 3, "overlaps or precedes");
  expect_rejected(64, 7, "runs past the dimension");
  expect_rejected(64 + 8, 0, "extents must be > 0");
  expect_rejected(64 + 8, std::uint64_t(1) << 62, "overflows");
  expect_rejected(24, 3, "block 2");  // three blocks announced: values bytes read as a bad shape
}

TEST_CASE("PowerSGD: host_seq and host_par with 1, 2, 3, 7 threads agree bitwise") {
  constexpr std::size_t rows = 300, cols = 200;
  const auto lay = gcomp::layout::from_layers({{"w", 0, rows * cols, {rows, cols}}, {"b", rows * cols, 7, {}}});
  const auto g1 = gaussian(lay.total_size(), 11), g2 = gaussian(lay.total_size(), 12);
  auto run = [&](const auto& policy) {
    gcomp::powersgd<float> c({.rank = 4}, lay);
    gcomp::lowrank_payload<float> msg;
    c.compress(policy, std::span<const float>(g1), msg, rng_key{1, 0, 0});
    c.compress(policy, std::span<const float>(g2), msg, rng_key{1, 1, 0});
    std::vector<float> out(lay.total_size(), 0.5f);
    c.decompress_add(policy, msg, std::span<float>(out), 2.0f);
    return std::pair{msg.data, out};
  };
  gcomp::test::check_same_pair_for_every_policy(run);
}

TEST_CASE("PowerSGD rejects bad options and input before writing anything") {
  CHECK_THROWS_WITH_AS(gcomp::powersgd<float>({.rank = 0}, matrix_layout(4, 4)),
                       "gcomp::powersgd: rank must be > 0, got 0", gcomp::error);
  gcomp::powersgd<float> c({.rank = 1}, matrix_layout(6, 5));
  gcomp::lowrank_payload<float> msg;
  const auto g = gaussian(30, 1);
  c.compress(gcomp::host_seq{}, std::span<const float>(g), msg, rng_key{});
  const auto before = msg;
  const auto g31 = gaussian(31, 1);
  CHECK_THROWS_WITH_AS(c.compress(gcomp::host_seq{}, std::span<const float>(g31), msg, rng_key{}),
                       "gcomp::powersgd::compress: gradient has size 31 but the layout covers 30 "
                       "elements; they must match",
                       gcomp::error);
  CHECK(msg.data == before.data);
  CHECK(msg.blocks == before.blocks);
  std::vector<float> out(30, 1.0f), other(29, 1.0f);
  CHECK_THROWS_AS(c.decompress_add(gcomp::host_seq{}, msg, std::span<float>(other), 1.0f), gcomp::error);
  auto bad = msg;
  bad.data.pop_back();
  CHECK_THROWS_WITH_AS(c.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f),
                       "gcomp::powersgd::decompress_add: the blocks need 11 values but the message "
                       "holds 10",
                       gcomp::error);
  bad = msg;
  bad.blocks[0].rank = 6;
  CHECK_THROWS_AS(c.decompress_add(gcomp::host_seq{}, bad, std::span<float>(out), 1.0f), gcomp::error);
  CHECK(out == std::vector<float>(30, 1.0f));
  CHECK(other == std::vector<float>(29, 1.0f));
}

TEST_CASE("error feedback around PowerSGD keeps what the rank-r projection drops") {
  constexpr std::size_t rows = 12, cols = 10;
  gcomp::error_feedback<gcomp::powersgd<float>> ef(gcomp::powersgd<float>({.rank = 1}, matrix_layout(rows, cols)));
  gcomp::lowrank_payload<float> msg;
  const auto g = gaussian(rows * cols, 3);
  ef.compress(gcomp::host_seq{}, std::span<const float>(g), msg, rng_key{});
  const auto sent = approximation(ef.inner(), msg, g.size());
  for (std::size_t i = 0; i < g.size(); ++i)
    CHECK(ef.residual()[i] == doctest::Approx(g[i] - sent[i]).epsilon(1e-6).scale(1e-6));
}
