// What the checkpoint and non-finite tests share (beside compressor_checks.hpp's expect_error and same_bits): a thrown gcomp::error's text, "this checkpoint is refused and the part left as it was", and a checkpoint with the non-finite counters blanked.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cstddef>
#include <span>
#include <string>
#include <vector>

#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/exec/host.hpp"
#include "compressor_checks.hpp"  // expect_error, same_bits
#include "error_text.hpp"

namespace gcomp::test {

using gcomp_test::message_of;  // error_text.hpp

/// Loading `bytes` into `part` must throw a gcomp::error containing
/// `expected` and leave every saved field of the part as it was.
template <class Part>
void check_rejected(Part& part, std::span<const std::byte> bytes, const std::string& expected) {
  const std::vector<std::byte> before = gcomp::checkpoint_bytes(part);
  expect_error([&] { gcomp::load_checkpoint(gcomp::host_seq{}, bytes, part); }, expected);
  CHECK(gcomp::checkpoint_bytes(part) == before);
}

// The checkpoint with the non-finite guard's two counts (and the header's
// CRC, which covers them) zeroed: a skipped step may differ from no step in
// those counts only, which the tests check on their own. The guard's section
// is "gcomp::nonfinite_guard" (version u32, length u64) with two u64 values,
// each after its name, type, shape, element size and count.
inline std::vector<std::byte> without_guard_counts(std::vector<std::byte> b) {
  const std::string kind = "gcomp::nonfinite_guard";
  const auto it = std::search(b.begin(), b.end(), kind.begin(), kind.end(),
                              [](std::byte x, char c) { return x == std::byte(c); });
  REQUIRE(it != b.end());
  auto p = std::size_t(it - b.begin()) + kind.size() + 4 + 8;
  for (int field = 0; field < 2; ++field) {
    p += 1 + std::size_t(b[p]) + 1 + 1 + 4 + 8;
    std::fill_n(b.begin() + std::ptrdiff_t(p), 8, std::byte{0});
    p += 8;
  }
  std::fill_n(b.begin() + 24, 4, std::byte{0});
  return b;
}

}  // namespace gcomp::test
