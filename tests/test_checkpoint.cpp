// The checkpoint stream (core/checkpoint.hpp): round trips, every corruption rejected, mismatches named, all-or-nothing loads.
#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/half.hpp"
#include "gcomp/exec/host.hpp"
#include "checkpoint_checks.hpp"

using gcomp::test::message_of;

namespace {

// A toy stateful part: a counter and a vector, loaded only after every read
// succeeded (the rule every gcomp part follows).
struct toy_part {
  std::string kind = "test::toy";
  std::uint64_t count = 0;
  std::vector<float> values;

  void save(gcomp::checkpoint_writer& out) const {
    out.begin(kind, 2);
    out.value("count", count);
    out.array("values", values);
    out.end();
  }
  template <class Policy>
  void load(const Policy&, gcomp::checkpoint_reader& in) {
    in.begin(kind, 2);
    const auto c = in.value<std::uint64_t>("count");
    auto v = in.vector<float>("values");
    in.end();
    count = c;
    values = std::move(v);
  }
};

std::vector<std::byte> sample_checkpoint() {
  gcomp::checkpoint_writer w;
  w.begin("test::outer", 1);
  w.value("flag", true);
  w.value("step", std::uint64_t{42});
  w.value("offset", std::int32_t{-7});
  w.array("weights", std::vector<double>{1.5, -2.25, 1e300});
  w.begin("test::inner", 3);
  w.array("half", std::vector<gcomp::float16>{gcomp::to_float16(1.0f), gcomp::to_float16(-0.5f)});
  w.array("empty", std::vector<std::uint8_t>{});
  w.end();
  w.end();
  return w.bytes();
}

}  // namespace

TEST_CASE("values, arrays and nested sections read back exactly") {
  const auto bytes = sample_checkpoint();
  gcomp::checkpoint_reader r(bytes);
  CHECK(r.peek_kind() == "test::outer");
  CHECK(r.begin("test::outer", 1) == 1);
  CHECK(r.value<bool>("flag") == true);
  CHECK(r.value<std::uint64_t>("step") == 42);
  CHECK(r.value<std::int32_t>("offset") == -7);
  std::vector<double> w(3);
  r.array("weights", std::span<double>(w));
  CHECK(w == std::vector<double>{1.5, -2.25, 1e300});
  CHECK(r.begin("test::inner", 5) == 3);  // an older layout is reported to the part
  const auto h = r.vector<gcomp::float16>("half");
  REQUIRE(h.size() == 2);
  CHECK(gcomp::to_float(h[0]) == 1.0f);
  CHECK(gcomp::to_float(h[1]) == -0.5f);
  CHECK(r.vector<std::uint8_t>("empty").empty());
  r.end();
  r.end();
  CHECK(r.peek_kind().empty());
  r.finish();
}

TEST_CASE("the stream form equals the byte form, and a failing stream is an error") {
  gcomp::checkpoint_writer w;
  w.begin("test::x", 1);
  w.value("v", 1.25f);
  w.end();
  std::stringstream s;
  w.write(s);
  const std::string text = s.str();
  const auto bytes = w.bytes();
  REQUIRE(text.size() == bytes.size());
  CHECK(std::memcmp(text.data(), bytes.data(), bytes.size()) == 0);
  gcomp::checkpoint_reader r(s);
  r.begin("test::x", 1);
  CHECK(r.value<float>("v") == 1.25f);
  r.end();
  r.finish();

  std::stringstream bad;
  bad.setstate(std::ios::badbit);
  CHECK(message_of([&] { w.write(bad); }).find("writing") != std::string::npos);
}

TEST_CASE("every flipped bit, truncation and extension of a checkpoint is rejected") {
  const auto good = sample_checkpoint();
  std::size_t rejected = 0;
  for (std::size_t i = 0; i < good.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      auto bad = good;
      bad[i] ^= std::byte(1u << bit);
      try {
        gcomp::checkpoint_reader r(bad);
      } catch (const gcomp::error&) {
        ++rejected;
      }
    }
  }
  // Header words are checked field by field (magic, version, flags and the
  // reserved word must be exact, the length must match), the body by its CRC.
  CHECK(rejected == good.size() * 8);

  for (std::size_t n = 0; n < good.size(); ++n) {
    const std::vector<std::byte> cut(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n));
    CHECK_THROWS_AS(gcomp::checkpoint_reader{cut}, gcomp::error);
  }
  auto longer = good;
  longer.push_back(std::byte{0});
  CHECK(message_of([&] { gcomp::checkpoint_reader r(longer); }).find("truncated or padded") !=
        std::string::npos);
  CHECK(message_of([] { gcomp::checkpoint_reader r(std::vector<std::byte>(40)); })
            .find("not a gcomp checkpoint") != std::string::npos);
}

TEST_CASE("a newer format version or unknown flags are refused by name") {
  auto bytes = sample_checkpoint();
  bytes[8] = std::byte{2};
  CHECK(message_of([&] { gcomp::checkpoint_reader r(bytes); })
            .find("format version 2 is not supported") != std::string::npos);
  bytes = sample_checkpoint();
  bytes[12] = std::byte{1};
  CHECK(message_of([&] { gcomp::checkpoint_reader r(bytes); }).find("unknown checkpoint flags 1") !=
        std::string::npos);
}

TEST_CASE("mismatches name what was expected and what was found") {
  const auto bytes = sample_checkpoint();
  auto open = [&](auto&& body) {
    return message_of([&] {
      gcomp::checkpoint_reader r(bytes);
      body(r);
    });
  };
  CHECK(open([](auto& r) { r.begin("test::other", 1); })
            .find("expected the state of test::other but the checkpoint holds test::outer") !=
        std::string::npos);
  CHECK(open([](auto& r) {
          r.begin("test::outer", 1);
          r.template value<bool>("flag");
          r.template value<std::uint64_t>("step");
          r.template value<std::int32_t>("offset");
          r.template vector<double>("weights");
          r.begin("test::inner", 2);
        }).find("layout version 3; this build reads versions 1 to 2") != std::string::npos);
  CHECK(open([](auto& r) {
          r.begin("test::outer", 1);
          r.template value<bool>("flags");
        }).find("expected field 'flags' but the checkpoint has 'flag'") != std::string::npos);
  CHECK(open([](auto& r) {
          r.begin("test::outer", 1);
          r.template value<bool>("flag");
          r.template value<std::int64_t>("step");
        }).find("holds unsigned integer elements of 8 bytes, expected signed integer") !=
        std::string::npos);
  CHECK(open([](auto& r) {
          r.begin("test::outer", 1);
          r.template value<bool>("flag");
          r.template value<std::uint64_t>("step");
          r.template value<std::int32_t>("offset");
          r.template vector<float>("weights");
        }).find("elements of 8 bytes, expected floating point of 4 bytes") != std::string::npos);
  CHECK(open([](auto& r) {
          r.begin("test::outer", 1);
          r.template value<bool>("flag");
          r.template value<std::uint64_t>("step");
          r.template value<std::int32_t>("offset");
          std::vector<double> w(4);
          r.array("weights", std::span<double>(w));
        }).find("holds 3 elements but this part expects 4") != std::string::npos);
  CHECK(open([](auto& r) {
          r.begin("test::outer", 1);
          r.template value<bool>("flag");
          r.template vector<std::uint64_t>("step");
        }).find("is a value, expected an array") != std::string::npos);
  CHECK(open([](auto& r) {
          r.begin("test::outer", 1);
          r.template value<bool>("flag");
          r.end();
        }).find("unread bytes") != std::string::npos);
  CHECK(open([](auto& r) { r.finish(); }).find("no part read") != std::string::npos);
}

TEST_CASE("counts and lengths that claim more than the bytes present fail before allocating") {
  // A well-formed header and checksum around a body whose array count is huge:
  // an attacker (or a bad disk) can forge the CRC, so the bounds must hold on their own.
  gcomp::checkpoint_writer w;
  w.begin("test::x", 1);
  w.array("a", std::vector<double>{1.0, 2.0});
  w.end();
  auto bytes = w.bytes();
  // Locate the count (8 bytes after name, kind, shape, size) and forge it.
  const std::size_t body = 32;
  const std::size_t field = body + 1 + 7 + 4 + 8;        // section name, version, length
  const std::size_t count_at = field + 1 + 1 + 1 + 1 + 4;  // field name "a", kind, shape, size
  std::uint64_t count = 0;
  std::memcpy(&count, bytes.data() + count_at, 8);
  REQUIRE(count == 2);
  count = std::numeric_limits<std::uint64_t>::max() / 4;
  std::memcpy(bytes.data() + count_at, &count, 8);
  const std::uint32_t crc =
      gcomp::detail::crc32(std::span<const std::byte>(bytes).subspan(body));
  std::memcpy(bytes.data() + 24, &crc, 4);
  gcomp::checkpoint_reader r(bytes);
  r.begin("test::x", 1);
  CHECK(message_of([&] { r.vector<double>("a"); }).find("only 16 bytes remain") !=
        std::string::npos);

  // A section length past the end of the body.
  auto bytes2 = w.bytes();
  const std::size_t length_at = body + 1 + 7 + 4;
  const std::uint64_t huge = 1u << 30;
  std::memcpy(bytes2.data() + length_at, &huge, 8);
  const std::uint32_t crc2 =
      gcomp::detail::crc32(std::span<const std::byte>(bytes2).subspan(body));
  std::memcpy(bytes2.data() + 24, &crc2, 4);
  gcomp::checkpoint_reader r2(bytes2);
  CHECK(message_of([&] { r2.begin("test::x", 1); }).find("claims 1073741824 bytes") !=
        std::string::npos);
}

TEST_CASE("the CRC is the IEEE CRC-32 (zlib's check value)") {
  const std::string text = "123456789";
  std::vector<std::byte> b(text.size());
  std::memcpy(b.data(), text.data(), text.size());
  CHECK(gcomp::detail::crc32(b) == 0xCBF43926u);
}

TEST_CASE("load_checkpoint is all or nothing across parts") {
  toy_part a{.count = 3, .values = {1.0f, 2.0f}};
  toy_part b{.count = 9, .values = {5.0f}};
  const auto bytes = gcomp::checkpoint_bytes(a, b);

  toy_part a2{.count = 0, .values = {}};
  toy_part b2{.count = 0, .values = {}};
  gcomp::load_checkpoint(gcomp::host_seq{}, bytes, a2, b2);
  CHECK(a2.count == 3);
  CHECK(a2.values == std::vector<float>{1.0f, 2.0f});
  CHECK(b2.count == 9);
  CHECK(gcomp::checkpoint_bytes(a2, b2) == bytes);

  // The second part is of another kind: the first, which would load fine, is left alone too.
  toy_part a3{.count = 100, .values = {7.0f}};
  toy_part c3{.kind = "test::other", .count = 200, .values = {}};
  const std::string m =
      message_of([&] { gcomp::load_checkpoint(gcomp::host_seq{}, bytes, a3, c3); });
  CHECK(m.find("expected the state of test::other") != std::string::npos);
  CHECK(a3.count == 100);
  CHECK(a3.values == std::vector<float>{7.0f});
  CHECK(c3.count == 200);

  // Fewer parts than were saved: the rest is reported, nothing is changed.
  toy_part a4{.count = 1, .values = {}};
  CHECK(message_of([&] { gcomp::load_checkpoint(gcomp::host_seq{}, bytes, a4); })
            .find("no part read") != std::string::npos);
  CHECK(a4.count == 1);
}

TEST_CASE("writer misuse is reported") {
  gcomp::checkpoint_writer w;
  CHECK(message_of([&] { w.value("x", 1); }).find("outside a section") != std::string::npos);
  CHECK(message_of([&] { w.end(); }).find("no section is open") != std::string::npos);
  w.begin("test::x", 1);
  CHECK(message_of([&] { (void)w.bytes(); }).find("still open") != std::string::npos);
  CHECK(message_of([&] { w.begin(std::string(300, 'k'), 1); }).find("got 300") !=
        std::string::npos);
}
