// Tests of core/wire.hpp (the message header, readers, writers) and the dense payload's wire form.
#include <doctest/doctest.h>

#include <cstring>
#include <limits>
#include <vector>

#include "gcomp/core/message.hpp"
#include "gcomp/core/wire.hpp"
#include "wire_fuzz.hpp"

using gcomp::dense_payload;
namespace wire = gcomp::wire;

namespace {

dense_payload<float> ramp(std::size_t n, float scale) {
  dense_payload<float> p;
  for (std::size_t i = 0; i < n; ++i) p.data.push_back(scale * float(i) - 3.25f);
  return p;
}

template <class V>
void poke(std::vector<std::byte>& bytes, std::size_t at, V value) {
  std::memcpy(bytes.data() + at, &value, sizeof(V));
}

}  // namespace

TEST_CASE("the header is 24 bytes at the documented offsets, little-endian") {
  std::vector<std::byte> out;
  encode(ramp(3, 1.0f), out);
  REQUIRE(out.size() == 24 + 3 * 4);
  const unsigned char expected[] = {'G', 'C', 'M', 'P', 1, 1 /*dense*/, 1 /*f32*/, 0,
                                    3,   0,   0,   0,   0, 0,           0,          0,
                                    12,  0,   0,   0,   0, 0,           0,          0};
  for (std::size_t i = 0; i < 24; ++i) CHECK(static_cast<unsigned char>(out[i]) == expected[i]);
  float first;
  std::memcpy(&first, out.data() + 24, 4);
  CHECK(first == -3.25f);
}

TEST_CASE("dense payloads round-trip and encoded_size is exact") {
  for (std::size_t n : {0u, 1u, 7u, 1000u}) {
    const auto p = ramp(n, 0.5f);
    std::vector<std::byte> out;
    encode(p, out);
    CHECK(out.size() == encoded_size(p));
    CHECK(out.size() == wire::header_bytes + n * sizeof(float));
    dense_payload<float> q;
    decode(out, q, n);
    CHECK(q.data == p.data);
  }
  dense_payload<double> d;
  d.data = {1.0, -2.5, 1e300};
  std::vector<std::byte> out;
  encode(d, out);
  dense_payload<double> e;
  decode(out, e);
  CHECK(e.data == d.data);
}

TEST_CASE("decode rejects each malformed header field by name and leaves the destination alone") {
  std::vector<std::byte> good;
  encode(ramp(5, 1.0f), good);
  const auto sentinel = ramp(2, 9.0f);
  auto expect_error = [&](std::vector<std::byte> bytes, std::uint64_t dim, const char* needle) {
    auto into = sentinel;
    try {
      decode(bytes, into, dim);
      FAIL("decode accepted a malformed message: expected ", needle);
    } catch (const gcomp::error& e) {
      CHECK_MESSAGE(std::string(e.what()).find(needle) != std::string::npos, e.what());
    }
    CHECK(into.data == sentinel.data);
  };
  auto bad = good;
  poke<std::uint32_t>(bad, 0, 0x12345678u);
  expect_error(bad, 5, "magic");
  bad = good;
  poke<std::uint8_t>(bad, 4, 2);
  expect_error(bad, 5, "version");
  bad = good;
  poke<std::uint8_t>(bad, 5, 2);
  expect_error(bad, 5, "kind");
  bad = good;
  poke<std::uint8_t>(bad, 6, 2);
  expect_error(bad, 5, "element");
  bad = good;
  poke<std::uint8_t>(bad, 7, 1);
  expect_error(bad, 5, "flags");
  expect_error(good, 6, "dimension");
  bad = good;
  poke<std::uint64_t>(bad, 16, 21);
  expect_error(bad, 5, "body_bytes");
  // A dimension whose byte count overflows size_t must be caught, not wrapped.
  bad = good;
  poke<std::uint64_t>(bad, 8, std::numeric_limits<std::uint64_t>::max() / 2);
  expect_error(bad, wire::any_dimension, "values");
  expect_error({}, 5, "truncated");
}

TEST_CASE("dense decode survives truncated, oversized, corrupted and random bytes") {
  std::vector<std::byte> good;
  encode(ramp(40, 0.25f), good);
  const auto outcomes = gcomp::test::check_decode_is_safe(good, ramp(3, 2.0f), 40);
  CHECK(outcomes.rejected > 100);
  // Body corruptions change values only, so some corrupted messages are valid.
  CHECK(outcomes.accepted > 0);
}

TEST_CASE("writer and reader agree field by field and the reader stops at the end") {
  std::vector<std::byte> bytes;
  wire::writer w(bytes);
  w.put<std::uint16_t>(0xBEEF);
  w.put<double>(-0.125);
  const std::uint32_t arr[3] = {1, 2, 3};
  w.put_array(std::span<const std::uint32_t>(arr));
  wire::reader r(bytes, "test");
  CHECK(r.get<std::uint16_t>("a") == 0xBEEF);
  CHECK(r.get<double>("b") == -0.125);
  std::uint32_t back[3];
  wire::copy_to(r.take<std::uint32_t>(3, "c"), back);
  CHECK(back[2] == 3);
  CHECK(r.remaining() == 0);
  r.finish();
  CHECK_THROWS_AS(r.get<std::uint8_t>("d"), gcomp::error);
  CHECK_THROWS_AS(r.take<std::uint64_t>(std::numeric_limits<std::uint64_t>::max(), "e"),
                  gcomp::error);
  CHECK(wire::packed_bytes(0, 3) == 0);
  CHECK(wire::packed_bytes(1, 1) == 1);
  CHECK(wire::packed_bytes(8, 1) == 1);
  CHECK(wire::packed_bytes(9, 1) == 2);
  CHECK(wire::packed_bytes(10, 3) == 4);
  CHECK(wire::packed_bytes(1000001, 9) == (1000001 * 9 + 7) / 8);
}

// ---------------------------------------------------------------------------
// sparse_payload

#include "gcomp/core/sparse_payload.hpp"

namespace {

gcomp::sparse_payload<float> spikes(std::uint64_t n, std::initializer_list<std::uint32_t> at) {
  gcomp::sparse_payload<float> p;
  p.dimension = n;
  for (auto i : at) {
    p.indices.push_back(i);
    p.data.push_back(0.5f * float(i) + 1.0f);
  }
  return p;
}

}  // namespace

TEST_CASE("sparse payloads round-trip with exact sizes for 32- and 64-bit indices") {
  const auto p = spikes(100, {0, 3, 50, 99});
  std::vector<std::byte> out;
  encode(p, out);
  CHECK(out.size() == encoded_size(p));
  CHECK(out.size() == 24 + 8 + 4 * (4 + 4));
  gcomp::sparse_payload<float> q;
  decode(out, q, 100);
  CHECK(q.dimension == 100);
  CHECK(q.indices == p.indices);
  CHECK(q.data == p.data);

  gcomp::sparse_payload<double, std::uint64_t> wide;
  wide.dimension = 1ull << 40;
  wide.indices = {1, 1ull << 35};
  wide.data = {2.0, -3.0};
  encode(wide, out);
  CHECK(out.size() == 24 + 8 + 2 * 16);
  gcomp::sparse_payload<double, std::uint64_t> back;
  decode(out, back);
  CHECK(back.indices == wide.indices);
  // A 32-bit payload refuses a 64-bit message rather than truncating indices.
  gcomp::sparse_payload<double> narrow;
  CHECK_THROWS_AS(decode(out, narrow), gcomp::error);

  std::vector<std::byte> support;
  encode_support(p, support);
  CHECK(support.size() == encoded_support_size(p));
  CHECK(support.size() == 24 + 8 + 4 * 4);
  gcomp::sparse_payload<float> s = spikes(7, {1});
  decode_support(support, s, 100);
  CHECK(s.indices == p.indices);
  CHECK(s.data == std::vector<float>(4, 0.0f));
  CHECK_THROWS_AS(decode(support, q, 100), gcomp::error);  // not a full message
  CHECK_THROWS_AS(decode_support(out, s), gcomp::error);
}

TEST_CASE("sparse decode rejects out-of-range, repeated and unsorted indices") {
  auto expect_rejected = [](gcomp::sparse_payload<float> bad, const char* needle) {
    std::vector<std::byte> out;
    encode(bad, out);  // encode does not sort or check: the decoder must
    auto into = spikes(5, {2});
    try {
      decode(out, into, bad.dimension);
      FAIL("accepted: ", needle);
    } catch (const gcomp::error& e) {
      CHECK_MESSAGE(std::string(e.what()).find(needle) != std::string::npos, e.what());
    }
    CHECK(into.indices == std::vector<std::uint32_t>{2});
  };
  expect_rejected(spikes(10, {3, 10}), "out of range");
  expect_rejected(spikes(10, {3, 3}), "strictly increasing");
  expect_rejected(spikes(10, {4, 3}), "strictly increasing");
  expect_rejected(spikes(2, {0, 1, 1}), "exceeds the dimension");
  gcomp::sparse_payload<float> ragged = spikes(10, {1, 2});
  ragged.data.pop_back();
  std::vector<std::byte> out;
  CHECK_THROWS_AS(encode(ragged, out), gcomp::error);
}

TEST_CASE("sparse decode survives truncated, oversized, corrupted and random bytes") {
  gcomp::sparse_payload<float> p;
  p.dimension = 5000;
  for (std::uint32_t i = 0; i < 5000; i += 37) {
    p.indices.push_back(i);
    p.data.push_back(float(i) * 0.001f);
  }
  std::vector<std::byte> good;
  encode(p, good);
  const auto outcomes = gcomp::test::check_decode_is_safe(good, spikes(20, {4, 5}), 5000);
  CHECK(outcomes.rejected > 100);
}
