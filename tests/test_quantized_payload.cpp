// Tests of core/quantized_payload.hpp: bit packing against a bit-by-bit oracle, exact wire sizes, hostile bytes.
#include "gcomp/core/quantized_payload.hpp"

#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include "gcomp/core/random.hpp"
#include "wire_fuzz.hpp"

namespace {

using gcomp::quantized_payload;
namespace q = gcomp::quantized;

std::uint32_t code_of(std::size_t i, unsigned bits) {
  return gcomp::random_bits(gcomp::rng_key{3, bits, 0}, i) & ((std::uint64_t(1) << bits) - 1);
}

quantized_payload<float> make(std::size_t n, unsigned bits, std::uint64_t bucket) {
  quantized_payload<float> p;
  p.dimension = n;
  p.bits = static_cast<std::uint8_t>(bits);
  p.bucket = bucket;
  p.words.resize(q::word_count(n, bits));
  for (std::size_t w = 0; w < p.words.size(); ++w)
    p.words[w] = q::assemble_word(w, n, bits, [&](std::size_t i) { return code_of(i, bits); });
  for (std::size_t j = 0; j < q::bucket_count(n, bucket); ++j) p.scales.push_back(0.5f + float(j));
  return p;
}

}  // namespace

TEST_CASE("packing: assemble_word and read_code agree with a bit-by-bit stream") {
  for (unsigned bits : {1u, 2u, 3u, 4u, 5u, 7u, 8u, 9u, 13u, 16u, 17u, 31u, 32u}) {
    for (std::size_t n : {0u, 1u, 63u, 64u, 65u, 200u, 1000u}) {
      CAPTURE(bits);
      CAPTURE(n);
      // Oracle: set bit j of the stream one at a time.
      std::vector<std::uint64_t> oracle(q::word_count(n, bits), 0);
      CHECK(oracle.size() == (n * bits + 63) / 64);
      for (std::size_t i = 0; i < n; ++i)
        for (unsigned b = 0; b < bits; ++b)
          if ((code_of(i, bits) >> b) & 1u) {
            const std::size_t bit = i * bits + b;
            oracle[bit / 64] |= std::uint64_t(1) << (bit % 64);
          }
      const auto p = make(n, bits, 0);
      CHECK(p.words == oracle);
      for (std::size_t i = 0; i < n; ++i) REQUIRE(q::read_code(p.words.data(), i, bits) == code_of(i, bits));
    }
  }
}

TEST_CASE("quantized payloads round-trip with exact sizes") {
  for (unsigned bits : {1u, 2u, 5u, 8u}) {
    for (std::size_t n : {0u, 1u, 9u, 1000u}) {
      for (std::uint64_t bucket : {0u, 1u, 7u, 512u}) {
        const auto p = make(n, bits, bucket);
        std::vector<std::byte> out;
        encode(p, out);
        CHECK(out.size() == encoded_size(p));
        CHECK(out.size() == 24 + 17 + 4 * q::bucket_count(n, bucket) + (n * bits + 7) / 8);
        quantized_payload<float> back;
        decode(out, back, n);
        CHECK(back.words == p.words);
        CHECK(back.scales == p.scales);
        CHECK(back.bits == p.bits);
        CHECK(back.bucket == p.bucket);
      }
    }
  }
}

TEST_CASE("quantized decode rejects bad fields and survives hostile bytes") {
  const auto p = make(100, 3, 16);
  std::vector<std::byte> good;
  encode(p, good);
  auto expect_rejected = [&](std::vector<std::byte> bytes, const char* needle) {
    auto into = make(5, 2, 0);
    const auto before = into.words;
    try {
      decode(bytes, into, 100);
      FAIL("accepted: ", needle);
    } catch (const gcomp::error& e) {
      CHECK_MESSAGE(std::string(e.what()).find(needle) != std::string::npos, e.what());
    }
    CHECK(into.words == before);
  };
  auto bad = good;
  bad[24] = std::byte{0};
  expect_rejected(bad, "bits");
  bad = good;
  bad[24] = std::byte{33};
  expect_rejected(bad, "bits");
  bad = good;
  bad[24 + 1 + 8] = std::byte{6};  // 6 scales where 7 are needed
  expect_rejected(bad, "scales");
  bad = good;
  bad.back() |= std::byte{0x80};  // 300 bits: the last 4 bits of the last byte are unused
  expect_rejected(bad, "unused bits");
  // Encode clears garbage past the last code, so the message stays valid.
  auto dirty = p;
  dirty.words.back() |= ~std::uint64_t(0) << 50;
  std::vector<std::byte> cleaned;
  encode(dirty, cleaned);
  CHECK(cleaned == good);
  auto ragged = p;
  ragged.scales.pop_back();
  CHECK_THROWS_AS(encode(ragged, cleaned), gcomp::error);

  const auto outcomes = gcomp::test::check_decode_is_safe(good, make(7, 1, 0), 100);
  CHECK(outcomes.rejected > 100);
}
