// Test data from a hash of the index (SplitMix64's output function), written out here rather than taken from gcomp/core/random.hpp so the data do not depend on the code under test.
#pragma once

#include <cstdint>

namespace gcomp_test {

constexpr std::uint64_t mix(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// A float in [-1, 1) from the top 24 bits of a hash (exact: 24 bits fit a float).
inline float signed_unit(std::uint64_t h) { return static_cast<float>(h >> 40) * 0x1p-23f - 1.0f; }

}  // namespace gcomp_test
