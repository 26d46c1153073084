// Tests of compress/sign.hpp and compress/onebit.hpp: closed forms, contraction bounds on adversarial inputs, per-layer scales against a naive oracle, layout gaps, wire sizes and decode safety, thread-count determinism, input checks, and the error-feedback sum identity.
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "compressor_checks.hpp"
#include "gcomp/compress/error_feedback.hpp"
#include "gcomp/compress/onebit.hpp"
#include "gcomp/compress/sign.hpp"
#include "gcomp/core/concepts.hpp"
#include "wire_fuzz.hpp"

using gcomp::onebit;
using gcomp::rng_key;
using gcomp::sign;
using gcomp::test::bytes_of;
using gcomp::test::decompressed;
using gcomp::test::expect_error;
using gcomp::test::same_bits;
using payload = gcomp::quantized_payload<float>;

static_assert(gcomp::compressor<sign<float>>);
static_assert(gcomp::compressor<sign<float>, gcomp::host_par>);
static_assert(gcomp::compressor<sign<double>, gcomp::host_par, double>);
static_assert(gcomp::compressor<onebit<float>>);
static_assert(gcomp::compressor<onebit<double>, gcomp::host_par, double>);
static_assert(gcomp::compressor<gcomp::error_feedback<sign<float>>, gcomp::host_par>);
static_assert(!gcomp::allreducible_compressor<sign<float>>);
static_assert(!gcomp::compressor_traits<sign<float>>::unbiased);
static_assert(!gcomp::compressor_traits<onebit<float>>::unbiased);
static_assert(gcomp::wire_payload<payload>);

namespace {

const gcomp::host_par par2(2), par3(3), par7(7);

enum class kind { normal, ties, all_equal, zeros, one_huge, denormals, mixed_signs, all_negative, scales };
constexpr kind all_kinds[] = {kind::normal,   kind::ties,        kind::all_equal,
                              kind::zeros,    kind::one_huge,    kind::denormals,
                              kind::mixed_signs, kind::all_negative, kind::scales};

std::vector<float> make(kind what, std::size_t n, std::uint64_t seed = 1) {
  const rng_key key{seed, 0, 0};
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint32_t r = gcomp::random_bits(key, i);
    const float s = (r & 1u) ? -1.0f : 1.0f;
    const float nrm = static_cast<float>(gcomp::normal(key.fork(1), i));
    switch (what) {
      case kind::normal: x[i] = nrm; break;
      case kind::ties: x[i] = s * 0.5f * static_cast<float>((r >> 1) % 3); break;
      case kind::all_equal: x[i] = 1.5f; break;
      case kind::zeros: x[i] = s * 0.0f; break;  // +0 and -0
      case kind::one_huge: x[i] = i == n / 3 ? 1e30f : 1e-3f * nrm; break;
      case kind::denormals:
        x[i] = s * std::numeric_limits<float>::denorm_min() * static_cast<float>((r >> 4) % 7);
        break;
      case kind::mixed_signs: x[i] = (i % 2 ? -1.0f : 1.0f) * (1.0f + float(i % 5)); break;
      case kind::all_negative: x[i] = -std::fabs(nrm) - 1e-3f; break;
      case kind::scales:
        x[i] = nrm * static_cast<float>(std::pow(10.0, double((i / 7) % 9) - 4.0));
        break;
    }
  }
  return x;
}

template <class C, class Policy = gcomp::host_seq>
payload compressed(C&& c, const std::vector<float>& x, const Policy& policy = {}) {
  payload m;
  c.compress(policy, std::span<const float>(x), m, rng_key{});
  return m;
}

double sq_err(const std::vector<float>& c, const std::vector<float>& x) {
  double s = 0;
  for (std::size_t i = 0; i < x.size(); ++i) s += (double(c[i]) - x[i]) * (double(c[i]) - x[i]);
  return s;
}

}  // namespace

TEST_CASE("sign and onebit closed forms on small vectors") {
  sign<float> s;
  onebit<float> o;
  {
    const std::vector<float> x = {3, -1, 0, -2};  // l1 = 6, d = 4
    auto m = compressed(s, x);
    CHECK(m.dimension == 4);
    CHECK(m.bits == 1);
    CHECK(m.bucket == 0);
    CHECK(m.scales == std::vector<float>{1.5f});
    CHECK(m.words == std::vector<std::uint64_t>{0b0101});
    CHECK(decompressed(s, m, 4) == std::vector<float>{1.5f, -1.5f, 1.5f, -1.5f});
    auto mo = compressed(o, x);
    CHECK(mo.scales == std::vector<float>{1.5f, -1.5f});  // mean(3, 0), mean(-1, -2)
    CHECK(decompressed(o, mo, 4) == std::vector<float>{1.5f, -1.5f, 1.5f, -1.5f});
  }
  {
    const std::vector<float> x = {5, 1, -3, -0.0f};  // -0 counts as +
    auto m = compressed(s, x);
    CHECK(m.scales == std::vector<float>{2.25f});
    CHECK(m.words == std::vector<std::uint64_t>{0b1011});
    CHECK(decompressed(s, m, 4) == std::vector<float>{2.25f, 2.25f, -2.25f, 2.25f});
    auto mo = compressed(o, x);
    CHECK(mo.scales == std::vector<float>{2.0f, -3.0f});
    CHECK(decompressed(o, mo, 4) == std::vector<float>{2, 2, -3, 2});
  }
  {
    // All negative: onebit's positive side is empty (scale 0).
    const std::vector<float> x = {-1, -2, -6};
    auto mo = compressed(o, x);
    CHECK(mo.scales == std::vector<float>{0.0f, -3.0f});
    CHECK(mo.words == std::vector<std::uint64_t>{0});
    auto m = compressed(s, x);
    CHECK(decompressed(s, m, 3) == std::vector<float>{-3, -3, -3});
  }
  {
    // Empty input: one zero scale and no words.
    const std::vector<float> x;
    auto m = compressed(s, x);
    CHECK(m.dimension == 0);
    CHECK(m.scales == std::vector<float>{0.0f});
    CHECK(m.words.empty());
    CHECK(decompressed(s, m, 0).empty());
  }
  {
    // The scale argument of decompress_add, and adding (not overwriting).
    const std::vector<float> x = {2, -2, 2, -2, 2};
    auto m = compressed(s, x);
    std::vector<float> out = {1, 1, 1, 1, 1};
    s.decompress_add(par2, m, std::span<float>(out), -0.5f);
    CHECK(out == std::vector<float>{0, 2, 0, 2, 0});
  }
}

TEST_CASE("contraction: ||C(x)-x||^2 = ||x||^2 - ||x||_1^2/d <= (1 - delta)||x||^2, onebit <= sign") {
  for (kind what : all_kinds)
    for (std::size_t n : {1u, 2u, 3u, 63u, 64u, 65u, 1000u, 40000u}) {
      const auto x = make(what, n, 3 + n);
      sign<float> s;
      onebit<float> o;
      const auto ms = compressed(s, x, par3);
      const auto cs = decompressed(s, ms, n);
      const auto co = decompressed(o, compressed(o, x, par3), n);
      double l1 = 0, l2 = 0;
      for (float v : x) {
        l1 += std::fabs(double(v));
        l2 += double(v) * v;
      }
      const double d = double(n);
      const double exact_scale = l1 / d;
      const double scale = ms.scales[0];
      // The scale is l1 / d rounded to float once.
      const double ulp = std::max(exact_scale * 0x1p-24, 0x1p-150);
      CHECK(std::fabs(scale - exact_scale) <= ulp);
      // err(s) = ||x||^2 - 2 s l1 + d s^2 = (||x||^2 - l1^2/d) + d (s - s*)^2.
      const double err = sq_err(cs, x);
      const double closed = (l2 - l1 * l1 / d) + d * (scale - exact_scale) * (scale - exact_scale);
      const double tol = 1e-12 * l2 + 1e-300;
      INFO("kind " << int(what) << ", n = " << n << ", err " << err << ", closed form " << closed
                   << ", ||x||^2 " << l2);
      CHECK(std::fabs(err - closed) <= 1e-9 * l2 + d * ulp * ulp + 1e-300);
      const double delta = l2 > 0 ? l1 * l1 / (d * l2) : 1.0;
      CHECK(delta >= 1.0 / d - 1e-12);
      CHECK(err <= (1 - delta) * l2 + d * ulp * ulp + tol + 1e-9 * l2);
      CHECK(err <= (1 - 1.0 / d) * l2 + d * ulp * ulp + tol + 1e-9 * l2);
      CHECK(s.delta(n) == doctest::Approx(1.0 / d));
      // onebit: the least-squares 1-bit quantizer on the same partition.
      const double erro = sq_err(co, x);
      CHECK(erro <= l2 * (1 + 1e-6) + 1e-300);
      CHECK(erro <= err * (1 + 1e-6) + d * ulp * ulp + 1e-300);
    }
}

TEST_CASE("per-layer scales match a naive oracle; gaps are neither sent nor added") {
  const gcomp::layout lay{5, 1, 70, 3, 4096};
  const std::size_t n = lay.total_size();
  for (kind what : all_kinds) {
    const auto x = make(what, n, 11);
    sign<float> s(lay);
    onebit<float> o(lay);
    const auto ms = compressed(s, x, par2);
    const auto mo = compressed(o, x, par2);
    REQUIRE(ms.scales.size() == lay.num_layers());
    REQUIRE(mo.scales.size() == 2 * lay.num_layers());
    const auto cs = decompressed(s, ms, n);
    const auto co = decompressed(o, mo, n);
    for (std::size_t d = 0; d < lay.num_layers(); ++d) {
      double l1 = 0, pos = 0, neg = 0;
      std::size_t np = 0;
      for (std::size_t i = lay[d].offset; i < lay[d].offset + lay[d].size; ++i) {
        l1 += std::fabs(double(x[i]));
        if (x[i] >= 0) {
          pos += x[i];
          ++np;
        } else {
          neg += x[i];
        }
      }
      const double size = double(lay[d].size);
      const double want_s = l1 / size;
      const double want_p = np ? pos / double(np) : 0.0;
      const double want_m = np < lay[d].size ? neg / (size - double(np)) : 0.0;
      auto close = [](double got, double want) {
        return std::fabs(got - want) <= std::max(std::fabs(want) * 0x1p-23, 0x1p-149);
      };
      INFO("kind " << int(what) << " layer " << d);
      CHECK(close(ms.scales[d], want_s));
      CHECK(close(mo.scales[2 * d], want_p));
      CHECK(close(mo.scales[2 * d + 1], want_m));
      for (std::size_t i = lay[d].offset; i < lay[d].offset + lay[d].size; ++i) {
        REQUIRE(cs[i] == (x[i] >= 0 ? ms.scales[d] : -ms.scales[d]));
        REQUIRE(co[i] == (x[i] >= 0 ? mo.scales[2 * d] : mo.scales[2 * d + 1]));
      }
    }
    // bits_per_element and the wire size agree for per-layer messages too.
    CHECK(s.wire_bytes(ms) == 24 + 17 + 4 * lay.num_layers() + gcomp::wire::packed_bytes(n, 1));
    CHECK(o.wire_bytes(mo) == 24 + 17 + 8 * lay.num_layers() + gcomp::wire::packed_bytes(n, 1));
  }

  // Gaps: layers [2, 5) and [8, 12) of a 12-element buffer.
  const auto gapped = gcomp::layout::from_layers({{"a", 2, 3, {}}, {"b", 8, 4, {}}}, gcomp::gaps::allowed);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> x = {nan, -7, 1, -2, 4, nan, 9, -9, -1, -1, -1, 3};
  sign<float> s(gapped);
  onebit<float> o(gapped);
  CHECK(s.delta(12) == 0.0);
  for (bool use_onebit : {false, true}) {
    payload m = use_onebit ? compressed(o, x, par3) : compressed(s, x, par3);
    // Bits of elements 0, 1, 5, 6, 7 are 0; layer a: 1, -2, 4 -> bits 2, 4; layer b: bit 11.
    CHECK(m.words == std::vector<std::uint64_t>{(1u << 2) | (1u << 4) | (1u << 11)});
    std::vector<float> out(12, 100.0f);
    if (use_onebit) {
      CHECK(m.scales == std::vector<float>{2.5f, -2.0f, 3.0f, -1.0f});
      o.decompress_add(gcomp::host_seq{}, m, std::span<float>(out), 1.0f);
      CHECK(out == std::vector<float>{100, 100, 102.5f, 98, 102.5f, 100, 100, 100, 99, 99, 99, 103});
    } else {
      CHECK(m.scales == std::vector<float>{7.0f / 3.0f, 1.5f});
      s.decompress_add(gcomp::host_seq{}, m, std::span<float>(out), 1.0f);
      const float a = 7.0f / 3.0f;
      CHECK(out == std::vector<float>{100, 100, 100 + a, 100 - a, 100 + a, 100, 100, 100, 98.5f,
                                      98.5f, 98.5f, 101.5f});
    }
    // A message with a bit set in a gap is refused.
    m.words[0] |= 1u << 6;
    std::vector<float> keep(12, 1.0f);
    if (use_onebit)
      expect_error([&] { o.decompress_add(par2, m, std::span<float>(keep), 1.0f); }, "bit 6 is set");
    else
      expect_error([&] { s.decompress_add(par2, m, std::span<float>(keep), 1.0f); }, "bit 6 is set");
    CHECK(keep == std::vector<float>(12, 1.0f));
  }
}

TEST_CASE("wire_bytes == encode().size() == 24 + 17 + 4 scales + ceil(n / 8); bits_per_element is exact") {
  for (std::size_t n : {0u, 1u, 7u, 8u, 9u, 63u, 64u, 65u, 1000u, 100003u}) {
    const auto x = make(kind::normal, n);
    sign<float> s;
    onebit<float> o;
    const auto ms = compressed(s, x);
    const auto mo = compressed(o, x);
    const std::size_t packed = gcomp::wire::packed_bytes(n, 1);
    CHECK(packed == (n + 7) / 8);
    CHECK(s.wire_bytes(ms) == bytes_of(ms).size());
    CHECK(s.wire_bytes(ms) == 24 + 17 + 4 * 1 + packed);
    CHECK(o.wire_bytes(mo) == bytes_of(mo).size());
    CHECK(o.wire_bytes(mo) == 24 + 17 + 4 * 2 + packed);
    if (n > 0) {
      CHECK(s.bits_per_element(n) * double(n) == doctest::Approx(8.0 * double(s.wire_bytes(ms))));
      CHECK(o.bits_per_element(n) * double(n) == doctest::Approx(8.0 * double(o.wire_bytes(mo))));
    }
    // Round trip through the wire.
    payload back;
    decode(std::span<const std::byte>(bytes_of(ms)), back, n);
    CHECK(bytes_of(back) == bytes_of(ms));
    CHECK(same_bits(decompressed(s, back, n), decompressed(s, ms, n)));
  }
  const gcomp::layout lay{10, 20, 30};
  CHECK(sign<float>(lay).bits_per_element(60) == 8.0 * (24 + 17 + 12 + 8) / 60.0);
  CHECK(onebit<float>(lay).bits_per_element(60) == 8.0 * (24 + 17 + 24 + 8) / 60.0);
  CHECK(sign<double>().bits_per_element(64) == 8.0 * (24 + 17 + 8 + 8) / 64.0);
}

TEST_CASE("sign and onebit messages survive the decode fuzzer") {
  for (std::size_t n : {1u, 13u, 64u, 200u, 5000u}) {
    sign<float> s;
    onebit<float> o(gcomp::layout{n / 2 + 1, n - n / 2 - 1 + 1});
    const auto x = make(kind::normal, n);
    auto x1 = make(kind::mixed_signs, n + 1);
    const auto ms = compressed(s, x);
    const auto sentinel = compressed(s, make(kind::ties, 3));
    const auto out = gcomp::test::check_decode_is_safe(bytes_of(ms), sentinel, n);
    CHECK(out.rejected > 0);
    const auto mo = compressed(o, x1);
    const auto out2 = gcomp::test::check_decode_is_safe(bytes_of(mo), ms, n + 1, 11);
    CHECK(out2.rejected > 0);
  }
}

TEST_CASE("the result is bitwise the same on host_seq and host_par{1, 2, 3, 7}") {
  const std::size_t n = 300007;
  const gcomp::layout lay{1, 100000, 3, 150000, 50003};
  for (kind what : {kind::normal, kind::ties, kind::scales}) {
    const auto x = make(what, n, 5);
    auto run = [&](auto& c) {
      gcomp::test::check_same_payload_for_every_policy(c, x, rng_key{}, make(kind::normal, n, 9), 0.75f,
                                                       gcomp::test::reuse::one_compressor,
                                                       [](const auto&, const auto&) {});
    };
    sign<float> s;
    sign<float> sl(lay);
    onebit<float> o;
    onebit<float> ol(lay);
    run(s);
    run(sl);
    run(o);
    run(ol);
  }
}

TEST_CASE("non-finite input throws naming the index and leaves the payload unchanged") {
  const float bad_values[] = {std::numeric_limits<float>::quiet_NaN(),
                              std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity()};
  for (std::size_t n : {50u, 70001u}) {
    const auto clean = make(kind::normal, n, 2);
    const gcomp::layout lay{n / 2, n - n / 2};
    for (std::size_t at : {std::size_t{0}, n / 2 + 1, n - 1})
      for (float bad : bad_values) {
        auto x = make(kind::normal, n);
        x[at] = bad;
        if (at != n - 1) x[n - 1] = bad;  // the first one is named
        const std::string needle = "gradient[" + std::to_string(at) + "]";
        auto check = [&](auto c, const char* name) {
          INFO(std::string(name));
          const auto before = compressed(c, std::vector<float>(clean.begin(), clean.begin() + 10));
          auto m = before;
          expect_error([&] { c.compress(gcomp::host_seq{}, std::span<const float>(x), m, rng_key{}); },
                       needle);
          CHECK(bytes_of(m) == bytes_of(before));
          expect_error([&] { c.compress(par7, std::span<const float>(x), m, rng_key{}); }, needle);
          CHECK(bytes_of(m) == bytes_of(before));
        };
        check(sign<float>(), "sign");
        check(onebit<float>(), "onebit");
        // Per layer (the "before" message has another size: compressed with
        // a whole-buffer compressor).
        auto check_layer = [&](auto c, const char* name) {
          INFO(std::string(name));
          auto m = compressed(sign<float>(), clean);
          const auto before = bytes_of(m);
          expect_error([&] { c.compress(par3, std::span<const float>(x), m, rng_key{}); }, needle);
          CHECK(bytes_of(m) == before);
        };
        check_layer(sign<float>(lay), "sign per layer");
        check_layer(onebit<float>(lay), "onebit per layer");
      }
    // A gradient that does not fit the layout.
    sign<float> sl(lay);
    payload m;
    const std::vector<float> wrong(n + 1, 1.0f);
    expect_error([&] { sl.compress(gcomp::host_seq{}, std::span<const float>(wrong), m, rng_key{}); },
                 "the layout covers");
    CHECK(m.words.empty());
  }
}

TEST_CASE("decompress_add rejects malformed payloads and leaves out unchanged") {
  sign<float> s;
  onebit<float> o;
  const std::vector<float> x = {1, -2, 3, -4, 5, 6, 7};
  const std::vector<float> y = {1, 1, 1, 1, 1, 1, 1};
  const auto good = compressed(s, x);
  const auto good_o = compressed(o, x);
  auto bad = [&](const auto& c, const payload& m, const std::string& needle) {
    std::vector<float> out = y;
    expect_error([&] { c.decompress_add(gcomp::host_seq{}, m, std::span<float>(out), 1.0f); }, needle);
    expect_error([&] { c.decompress_add(par2, m, std::span<float>(out), 1.0f); }, needle);
    CHECK(out == y);
  };
  auto m = good;
  m.dimension = 8;
  bad(s, m, "message.dimension = 8");
  m = good;
  m.bits = 2;
  bad(s, m, "message.bits = 2");
  m = good;
  m.bucket = 4;
  bad(s, m, "message.bucket = 4");
  m = good;
  m.scales.push_back(1.0f);
  bad(s, m, "message.scales has size 2");
  bad(o, good, "message.scales has size 1");
  m = good;
  m.words.push_back(0);
  bad(s, m, "message.words has size 2");
  m = good;
  m.scales[0] = std::numeric_limits<float>::quiet_NaN();
  bad(s, m, "is not finite");
  m = good;
  m.scales[0] = -1.0f;
  bad(s, m, "is negative");
  m = good_o;
  m.scales[0] = -1.0f;
  bad(o, m, "is negative");
  m = good_o;
  m.scales[1] = 1.0f;
  bad(o, m, "is positive");
  m = good_o;
  m.scales[1] = std::numeric_limits<float>::infinity();
  bad(o, m, "is not finite");
  // Layout size mismatch.
  sign<float> sl(gcomp::layout{3, 3});
  bad(sl, good, "the layout covers 6");
}

TEST_CASE("error feedback around sign keeps the sum identity: sum sent + residual == sum of inputs") {
  // Per coordinate, every step computes p = e + g and e' = p - C(p) in float;
  // each is one rounding of at most 2^-24 |result|, and C(p) itself is sent
  // exactly (decompressing one message into zeros is exact). So
  //   |sum_t C(p_t) + e_T - sum_t g_t| <= sum_t 2^-24 (|p_t| + |e_t|)
  // per coordinate, which the test accumulates and checks (with a factor 2).
  const std::size_t n = 1000, steps = 60;
  const gcomp::layout lay{100, 400, 500};
  auto run = [&](auto ef, const char* name) {
    INFO(std::string(name));
    std::vector<double> sent(n, 0.0), inputs(n, 0.0), bound(n, 0.0);
    payload m;
    for (std::size_t t = 0; t < steps; ++t) {
      const auto g = make(t % 3 == 0 ? kind::scales : kind::normal, n, 100 + t);
      std::vector<float> e_before(ef.residual().begin(), ef.residual().end());
      if (e_before.empty()) e_before.assign(n, 0.0f);
      ef.compress(par2, std::span<const float>(g), m, rng_key{});
      const auto c = decompressed(ef, m, n);
      for (std::size_t i = 0; i < n; ++i) {
        sent[i] += c[i];
        inputs[i] += g[i];
        const double p = double(e_before[i]) + g[i];
        bound[i] += 0x1p-24 * (std::fabs(p) + std::fabs(double(ef.residual()[i])));
      }
    }
    double worst = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const double gap = std::fabs(sent[i] + ef.residual()[i] - inputs[i]);
      worst = std::max(worst, gap / (2 * bound[i] + 1e-300));
      REQUIRE(gap <= 2 * bound[i]);
    }
    MESSAGE(std::string(name) << ": largest |sent + residual - inputs| / (2 * bound) = " << worst);
  };
  run(gcomp::error_feedback<sign<float>>(), "sign");
  run(gcomp::error_feedback<sign<float>>(sign<float>(lay)), "sign per layer");
  run(gcomp::error_feedback<onebit<float>>(onebit<float>(lay)), "onebit per layer");
}
