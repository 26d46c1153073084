// A libFuzzer custom mutator for gcomp wire messages: nudges the aligned u64 and u32 fields (counts, dimensions, offsets, indices) by a little, so off-by-one checks on them are reached in seconds.
//
// Every count in the wire format is a little-endian u64 at an 8-byte-aligned
// offset from the message start (sparse indices are u32 at 4-byte offsets),
// and a check like `offset < end` only fails for a value one away from
// another field. Byte-level mutations rarely produce that; this mutator does,
// and leaves the other half of the mutations to libFuzzer's own. Include it
// in exactly one translation unit of a decoder target whose input is a
// message (not fuzz_wire or fuzz_roundtrip, whose inputs are programs).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

extern "C" std::size_t LLVMFuzzerMutate(std::uint8_t* data, std::size_t size, std::size_t max_size);

extern "C" std::size_t LLVMFuzzerCustomMutator(std::uint8_t* data, std::size_t size,
                                               std::size_t max_size, unsigned int seed) {
  std::uint64_t state = seed * 0x9e3779b97f4a7c15ull + 1;
  auto next = [&state](std::uint64_t bound) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return bound == 0 ? 0 : state % bound;
  };
  if (size < 16 || next(2) == 0) return LLVMFuzzerMutate(data, size, max_size);
  const bool wide = next(2) == 0;
  const std::size_t width = wide ? 8 : 4;
  const std::size_t fields = size / width;
  // Field 0 is the magic and version: leave it so most mutants pass the header.
  const std::size_t at = width * (1 + next(fields - 1));
  if (at + width > size) return LLVMFuzzerMutate(data, size, max_size);
  std::uint64_t value = 0;
  std::memcpy(&value, data + at, width);
  switch (next(3)) {
    case 0: value += 1 + next(8); break;
    case 1: value -= 1 + next(8); break;
    default: {  // another field's value: makes "x == y" and "x < y" boundaries likely
      const std::size_t from = width * next(fields);
      std::memcpy(&value, data + from, width);
      value += next(3) - 1;
      break;
    }
  }
  std::memcpy(data + at, &value, width);
  return size;
}
