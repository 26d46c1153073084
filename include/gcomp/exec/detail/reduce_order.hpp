// The fixed reduction order every policy follows, so sums agree bitwise across
// thread counts and between host and device.
#pragma once

#include <cstddef>

#include "gcomp/core/config.hpp"

namespace gcomp::detail {

/// Elements are reduced in blocks of reduce_block consecutive indices counted
/// from the start of the range (or layer). Inside a block, element j goes to
/// lane j % reduce_lanes; the lanes are combined as a balanced tree; block
/// values are then combined left to right, starting from the identity.
inline constexpr std::size_t reduce_block = 4096;
inline constexpr std::size_t reduce_lanes = 8;

/// Number of reduce blocks covering n elements.
GCOMP_HD constexpr std::size_t reduce_block_count(std::size_t n) {
  return (n + reduce_block - 1) / reduce_block;
}

/// The value of one block: indices [begin, end) with end - begin <= reduce_block.
// Host code passes host-only lambdas here; tell nvcc not to check the callees.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class R, class Reduce, class Transform>
GCOMP_HD R reduce_one_block(std::size_t begin, std::size_t end, R identity, Reduce& reduce,
                            Transform& transform) {
  R lane[reduce_lanes];
  for (std::size_t l = 0; l < reduce_lanes; ++l) lane[l] = identity;
  std::size_t i = begin;
  // Eight independent accumulators let the compiler vectorize without
  // reassociating, which keeps the order fixed.
  for (; i + reduce_lanes <= end; i += reduce_lanes)
    for (std::size_t l = 0; l < reduce_lanes; ++l) lane[l] = reduce(lane[l], transform(i + l));
  // The tail has fewer than reduce_lanes elements; l < reduce_lanes says so
  // to GCC, which otherwise warns of an overrun (-Waggressive-loop-optimizations).
  for (std::size_t l = 0; i < end && l < reduce_lanes; ++i, ++l) lane[l] = reduce(lane[l], transform(i));
  return reduce(reduce(reduce(lane[0], lane[1]), reduce(lane[2], lane[3])),
                reduce(reduce(lane[4], lane[5]), reduce(lane[6], lane[7])));
}

}  // namespace gcomp::detail
