// check_decode_is_safe: feeds a payload decoder truncated, oversized, bit-flipped and random byte strings.
//
// Every decode of a corrupted message must either throw gcomp::error and leave
// the destination payload exactly as it was (compared through its encoding),
// or succeed with a message that re-encodes to the bytes that were decoded
// (so nothing was silently dropped). Under the asan preset this also proves
// that no byte outside the buffers is touched.
#pragma once

#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "gcomp/core/error.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/core/wire.hpp"

namespace gcomp::test {

struct decode_outcomes {
  std::size_t rejected = 0;  // threw gcomp::error, destination unchanged
  std::size_t accepted = 0;  // decoded to a message that re-encodes identically
};

template <class Payload>
void expect_rejected_or_exact(std::span<const std::byte> bytes, const Payload& sentinel,
                              std::uint64_t dimension, decode_outcomes& outcomes) {
  using gcomp::decode;
  using gcomp::encode;
  Payload into = sentinel;
  std::vector<std::byte> before, after;
  encode(sentinel, before);
  try {
    decode(bytes, into, dimension);
  } catch (const gcomp::error&) {
    encode(into, after);
    CHECK_MESSAGE(after == before, "a failed decode changed its destination");
    ++outcomes.rejected;
    return;
  }
  encode(into, after);
  CHECK_MESSAGE(std::vector<std::byte>(bytes.begin(), bytes.end()) == after,
                "an accepted message does not re-encode to its bytes");
  ++outcomes.accepted;
}

/// `valid` is an encoded message of dimension `dimension`; `sentinel` a
/// different valid payload used as the destination.
template <class Payload>
decode_outcomes check_decode_is_safe(const std::vector<std::byte>& valid, const Payload& sentinel,
                                     std::uint64_t dimension, std::uint64_t seed = 7) {
  decode_outcomes outcomes;
  // Every truncation (all of them for short messages, a spread for long ones).
  const std::size_t stride = valid.size() > 4096 ? valid.size() / 1024 : 1;
  for (std::size_t len = 0; len < valid.size(); len += stride) {
    std::vector<std::byte> cut(valid.begin(), valid.begin() + static_cast<std::ptrdiff_t>(len));
    expect_rejected_or_exact(cut, sentinel, dimension, outcomes);
  }
  // Oversized: trailing garbage.
  for (std::size_t extra : {1u, 7u, 64u}) {
    auto longer = valid;
    longer.resize(valid.size() + extra, std::byte{0x5a});
    expect_rejected_or_exact(longer, sentinel, dimension, outcomes);
  }
  // Single-byte corruptions, everywhere in the header and at random in the body.
  const rng_key key{seed, 0, 0};
  std::uint64_t draw = 0;
  for (std::size_t pos = 0; pos < valid.size(); ++pos) {
    if (pos >= wire::header_bytes + 64 && uniform(key, draw++) > 0.02f) continue;
    for (unsigned value : {0x00u, 0xffu, 0x80u, 0x01u}) {
      auto bad = valid;
      bad[pos] = static_cast<std::byte>(value);
      expect_rejected_or_exact(bad, sentinel, dimension, outcomes);
    }
  }
  // Random byte strings, with and without a valid-looking header in front.
  for (int trial = 0; trial < 200; ++trial) {
    const std::size_t len = static_cast<std::size_t>(uniform(key, draw++) * 300.0f);
    std::vector<std::byte> junk(len);
    for (auto& b : junk) b = static_cast<std::byte>(random_bits(key, draw++) & 0xff);
    if (trial % 2 == 1 && junk.size() >= wire::header_bytes && valid.size() >= wire::header_bytes)
      std::copy(valid.begin(), valid.begin() + 16, junk.begin());
    expect_rejected_or_exact(junk, sentinel, dimension, outcomes);
  }
  return outcomes;
}

}  // namespace gcomp::test
