// How many elements a sparsifier keeps: "k or ratio" options, their checks, and the index-width check.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string_view>

#include "gcomp/core/error.hpp"

namespace gcomp::detail {

/// k for an n-element vector from an absolute count or a ratio (exactly one
/// of them set): the ratio rounds to nearest and keeps at least one element
/// of a non-empty vector.
inline std::size_t count_for(std::string_view where, std::size_t k, double ratio, std::size_t n) {
  if (k != 0) {
    if (k > n) fail(where, "k = ", k, " exceeds the gradient size ", n);
    return k;
  }
  if (n == 0) return 0;
  const double wanted = std::round(ratio * static_cast<double>(n));
  return static_cast<std::size_t>(std::clamp(wanted, 1.0, static_cast<double>(n)));
}

/// Validates "exactly one of k > 0 or ratio in (0, 1]".
inline void check_count_options(std::string_view where, std::size_t k, double ratio) {
  if (k == 0 && ratio == 0.0) fail(where, "set k > 0 or ratio in (0, 1]; both are 0");
  if (k != 0 && ratio != 0.0)
    fail(where, "set either k (", k, ") or ratio (", ratio, "), not both");
  if (k == 0 && !(ratio > 0.0 && ratio <= 1.0))
    fail(where, "ratio must be in (0, 1], got ", ratio);
}

/// Throws unless an n-element vector can be indexed by Index.
template <class Index>
void check_index_range(std::string_view where, std::size_t n) {
  if (n != 0 && static_cast<std::uint64_t>(n) - 1 > std::numeric_limits<Index>::max())
    fail(where, "gradient size ", n, " does not fit ", sizeof(Index),
         "-byte indices; use std::uint64_t indices");
}

}  // namespace gcomp::detail
