// Tests of compress/cast.hpp: decompress_add equals scale * widen(narrow(x)), the relative error bounds, range checks, wire sizes and decode safety, thread-count determinism, and the float16 cast through allgather in three in-process workers.
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "compressor_checks.hpp"
#include "gcomp/aggregate/allgather.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/compress/cast.hpp"
#include "gcomp/core/concepts.hpp"
#include "wire_fuzz.hpp"

using gcomp::bf16_cast;
using gcomp::bfloat16;
using gcomp::float16;
using gcomp::fp16_cast;
using gcomp::rng_key;
using gcomp::test::bytes_of;
using gcomp::test::expect_error;
using gcomp::test::same_bits;

static_assert(gcomp::compressor<fp16_cast<float>>);
static_assert(gcomp::compressor<bf16_cast<float>, gcomp::host_par>);
static_assert(gcomp::compressor<fp16_cast<double>, gcomp::host_par, double>);
static_assert(!gcomp::allreducible_compressor<fp16_cast<float>>);  // shared_support is false on purpose
static_assert(!gcomp::compressor_traits<bf16_cast<float>>::unbiased);
static_assert(gcomp::wire_payload<gcomp::dense_payload<float16>>);
static_assert(gcomp::wire_payload<gcomp::dense_payload<bfloat16>>);

namespace {

const gcomp::host_par par2(2), par3(3), par7(7);

// Normal floats over many binades, exact ties and small values.
std::vector<float> make(std::size_t n, std::uint64_t seed = 1, double spread = 4.0) {
  const rng_key key{seed, 0, 0};
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i) {
    const double nrm = gcomp::normal(key, i);
    const double e = std::fmod(double(gcomp::random_bits(key.fork(2), i) % 1000) / 1000.0 * 2 * spread, 2 * spread) - spread;
    x[i] = static_cast<float>(nrm * std::pow(10.0, e));
  }
  return x;
}

template <class C>
gcomp::dense_payload<typename C::half_type> compressed(C& c, const std::vector<float>& x) {
  gcomp::dense_payload<typename C::half_type> m;
  c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{});
  return m;
}

template <class H>
void check_cast_values(double unit_roundoff, float smallest_normal, std::vector<double> spreads) {
  gcomp::cast<float, H> c;
  for (double spread : spreads) {
    const auto x = make(40000, 7, spread);
    const auto m = compressed(c, x);
    REQUIRE(m.size() == x.size());
    std::vector<float> out(x.size(), 1.0f);
    const float scale = -0.375f;
    c.decompress_add(par3, m, std::span<float>(out), scale);
    std::size_t checked = 0;
    for (std::size_t i = 0; i < x.size(); ++i) {
      const H h = gcomp::half_format<H>::from(x[i]);
      REQUIRE(m.data[i] == h);
      const float widened = gcomp::to_float(h);
      REQUIRE(out[i] == 1.0f + scale * widened);
      // Relative error in the normal range; absolute (half the subnormal
      // spacing) below it.
      const double err = std::fabs(double(widened) - double(x[i]));
      if (std::fabs(x[i]) >= smallest_normal) {
        REQUIRE(err <= unit_roundoff * std::fabs(double(x[i])));
        ++checked;
      } else {
        REQUIRE(err <= unit_roundoff * double(smallest_normal));
      }
    }
    CHECK(checked > 1000);
  }
}

}  // namespace

TEST_CASE("decompress_add adds scale * widen(narrow(x)); relative error <= 2^-11 (float16), 2^-8 (bfloat16)") {
  check_cast_values<float16>(0x1p-11, 0x1p-14f, {2.0, 3.5});  // |x| below 65504
  check_cast_values<bfloat16>(0x1p-8, std::numeric_limits<float>::min(), {2.0, 30.0});
  // Exact values and ties.
  fp16_cast<float> c;
  const std::vector<float> x = {1.0f, -0.0f, 1.0f + 0x1p-11f, 65504.0f, 0x1p-24f, 0x1p-25f, -3.0f};
  const auto m = compressed(c, x);
  const std::vector<std::uint16_t> want = {0x3c00, 0x8000, 0x3c00, 0x7bff, 0x0001, 0x0000, 0xc200};
  for (std::size_t i = 0; i < x.size(); ++i) CHECK(m.data[i].bits == want[i]);
  // Doubles are rounded once, directly.
  fp16_cast<double> cd;
  gcomp::dense_payload<float16> md;
  const std::vector<double> xd = {1.0 + 0x1p-11 + 0x1p-40, 1.0 + 0x1p-11};
  cd.compress(gcomp::host_seq{}, std::span<const double>(xd), md, rng_key{});
  CHECK(md.data[0].bits == 0x3c01);  // above the tie: up (through float it would tie to even)
  CHECK(md.data[1].bits == 0x3c00);
  std::vector<double> outd(2, 0.0);
  cd.decompress_add(gcomp::host_seq{}, md, std::span<double>(outd), 2.0);
  CHECK(outd == std::vector<double>{2.0 * (1.0 + 0x1p-10), 2.0});
}

TEST_CASE("values that are not finite or would overflow are rejected by index; the payload is unchanged") {
  for (std::size_t n : {50u, 70001u}) {
    const auto clean = make(n, 3, 1.0);
    auto check = [&](auto c, float bad, std::size_t at, const std::string& what) {
      auto x = clean;
      x[at] = bad;
      if (at + 1 < n) x[n - 1] = std::numeric_limits<float>::quiet_NaN();  // the first is named
      auto m = compressed(c, std::vector<float>(clean.begin(), clean.begin() + 5));
      const auto before = bytes_of(m);
      const std::string needle = "gradient[" + std::to_string(at) + "]";
      expect_error([&] { c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{}); },
                   needle);
      expect_error([&] { c.compress(par7, std::span<const float>(x), m, rng_key{}); }, what);
      CHECK(bytes_of(m) == before);
    };
    for (std::size_t at : {std::size_t{0}, n / 2 + 3, n - 1}) {
      check(fp16_cast<float>(), std::numeric_limits<float>::quiet_NaN(), at, "is not finite");
      check(fp16_cast<float>(), -std::numeric_limits<float>::infinity(), at, "is not finite");
      check(fp16_cast<float>(), 65520.0f, at, "overflows float16");
      check(fp16_cast<float>(), -1e20f, at, "overflows float16");
      check(bf16_cast<float>(), std::numeric_limits<float>::infinity(), at, "is not finite");
      check(bf16_cast<float>(), std::numeric_limits<float>::max(), at, "overflows bfloat16");
    }
  }
  // Just below the thresholds is fine.
  fp16_cast<float> c;
  auto m = compressed(c, {65519.99f, -65519.99f});
  CHECK(m.data[0].bits == 0x7bff);
  CHECK(m.data[1].bits == 0xfbff);
  bf16_cast<float> b;
  auto mb = compressed(b, {0x1.fefffep127f});
  CHECK(mb.data[0].bits == 0x7f7f);
}

TEST_CASE("wire sizes: 24 + 2n bytes, bits_per_element exact, decode is safe") {
  for (std::size_t n : {0u, 1u, 3u, 100u, 4097u}) {
    const auto x = make(n);
    fp16_cast<float> c;
    bf16_cast<float> b;
    const auto m = compressed(c, x);
    const auto mb = compressed(b, x);
    CHECK(c.wire_bytes(m) == 24 + 2 * n);
    CHECK(bytes_of(m).size() == 24 + 2 * n);
    CHECK(b.wire_bytes(mb) == bytes_of(mb).size());
    CHECK(bytes_of(m)[6] == std::byte{3});   // element f16
    CHECK(bytes_of(mb)[6] == std::byte{4});  // element bf16
    if (n > 0) CHECK(c.bits_per_element(n) == 8.0 * double(24 + 2 * n) / double(n));
    gcomp::dense_payload<float16> back;
    decode(std::span<const std::byte>(bytes_of(m)), back, n);
    CHECK(back.data == m.data);
    // A float16 message is not a bfloat16 one.
    gcomp::dense_payload<bfloat16> wrong;
    expect_error([&] { decode(std::span<const std::byte>(bytes_of(m)), wrong, n); }, "element type");
    if (n > 0) {
      const auto sentinel = compressed(c, make(2, 9));
      CHECK(gcomp::test::check_decode_is_safe(bytes_of(m), sentinel, n).rejected > 0);
      const auto sentinel_b = compressed(b, make(5, 9));
      CHECK(gcomp::test::check_decode_is_safe(bytes_of(mb), sentinel_b, n, 3).rejected > 0);
    }
  }
  CHECK(fp16_cast<float>().bits_per_element(0) == 0.0);
}

TEST_CASE("cast results are bitwise the same on host_seq and host_par{1, 2, 3, 7}") {
  const std::size_t n = 200003;
  const auto x = make(n, 5);
  fp16_cast<float> c;
  const auto ref = gcomp::test::check_same_payload_for_every_policy(
      c, x, rng_key{}, 0.5f, 3.0f, gcomp::test::reuse::one_compressor,
      [](const auto& m, const auto& r) { CHECK(m.data == r.data); });
  // decompress_add checks the size before writing.
  std::vector<float> out(n - 1, 2.0f);
  expect_error([&] { c.decompress_add(par2, ref, std::span<float>(out), 1.0f); },
               "gcomp::cast<float16>::decompress_add: out has size");
  CHECK(out == std::vector<float>(n - 1, 2.0f));
}

TEST_CASE("float16 and bfloat16 casts through allgather in three in-process workers") {
  const std::size_t n = 1000;
  const int workers = 3;
  auto local = [&](int r) { return make(n, 40 + std::uint64_t(r), 2.0); };
  auto run = [&](auto c) {
    using H = typename decltype(c)::half_type;
    std::vector<float> expected(n, 0.0f);
    for (int r = 0; r < workers; ++r) {
      const auto g = local(r);
      for (std::size_t i = 0; i < n; ++i)
        expected[i] += (1.0f / 3.0f) * gcomp::to_float(gcomp::half_format<H>::from(g[i]));
    }
    gcomp::inproc_group group(workers);
    group.run([&](gcomp::inproc_comm& comm) {
      gcomp::allgather agg;
      auto mine = c;
      const auto g = local(comm.rank());
      std::vector<float> global(n);
      for (int step = 0; step < 2; ++step) {
        agg.aggregate(par2, comm, mine, std::span<const float>(g), std::span<float>(global),
                      rng_key{});
        CHECK(same_bits(global, expected));
      }
      CHECK(agg.last_bytes() == 24 + 2 * n);
    });
  };
  run(fp16_cast<float>());
  run(bf16_cast<float>());
}
