// The pair of sums of squares LARS and LAMB reduce per layer (||x||^2 with ||g||^2 or ||u||^2).
#pragma once

#include <type_traits>

#include "gcomp/core/config.hpp"
#include "gcomp/exec/detail/unfused.hpp"

namespace gcomp {
namespace detail {

// Sums of squares of two vectors over a layer, reduced together so each layer
// is read once (LARS: x and g; LAMB: x and u). Accumulated in double for float
// data: as exact as the layer allows, and the four independent double lanes
// per pair reduce faster than the two float ones. A namespace-scope type, not
// a private member, because nvcc rejects private types as template arguments
// of the kernels the reduction launches.
template <class T>
struct sums_of_squares {
  using acc = std::conditional_t<(sizeof(T) < sizeof(double)), double, T>;
  acc x = acc(0);
  acc y = acc(0);
};
template <class T>
struct add_sums_of_squares {
  GCOMP_HD sums_of_squares<T> operator()(sums_of_squares<T> a, sums_of_squares<T> b) const {
    return {add_unfused(a.x, b.x), add_unfused(a.y, b.y)};
  }
};

}  // namespace detail

}  // namespace gcomp
