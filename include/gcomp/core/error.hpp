// gcomp::error and the argument-checking helpers every public function uses.
#pragma once

#include <cmath>
#include <cstddef>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

namespace gcomp {

/// The one exception type gcomp throws for bad arguments, malformed messages
/// and failed collectives. The message names the function, the argument and
/// the offending value.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  out.precision(9);  // enough digits to tell floats apart in messages
  (out << ... << parts);
  return out.str();
}

}  // namespace detail

/// Throws gcomp::error("where: " + parts...).
template <class... Parts>
[[noreturn]] void fail(std::string_view where, const Parts&... parts) {
  throw error(detail::concat(where, ": ", parts...));
}

/// Throws unless `condition` holds; the message is built only on failure.
template <class... Parts>
void require(bool condition, std::string_view where, const Parts&... parts) {
  if (!condition) fail(where, parts...);
}

/// `a_name` (a) must equal `b_name` (b): the usual span-size check.
inline void check_same_size(std::string_view where, std::string_view a_name, std::size_t a,
                            std::string_view b_name, std::size_t b) {
  if (a != b)
    fail(where, a_name, " has size ", a, " but ", b_name, " has size ", b, "; they must match");
}

/// `name` must be > 0.
template <class V>
void check_positive(std::string_view where, std::string_view name, V value) {
  if constexpr (std::is_floating_point_v<V>) {
    if (!(value > V(0)) || !std::isfinite(value))
      fail(where, name, " must be finite and > 0, got ", value);
  } else {
    if (!(value > V(0))) fail(where, name, " must be > 0, got ", value);
  }
}

/// `name` must be >= 0 (and finite for floating point).
template <class V>
void check_non_negative(std::string_view where, std::string_view name, V value) {
  if constexpr (std::is_floating_point_v<V>) {
    if (!(value >= V(0)) || !std::isfinite(value))
      fail(where, name, " must be finite and >= 0, got ", value);
  } else {
    if (!(value >= V(0))) fail(where, name, " must be >= 0, got ", value);
  }
}

/// lo <= `name` <= hi (closed interval; NaN is rejected).
template <class V>
void check_in_range(std::string_view where, std::string_view name, V value, V lo, V hi) {
  if (!(value >= lo && value <= hi))
    fail(where, name, " must be in [", lo, ", ", hi, "], got ", value);
}

/// lo <= `name` < hi (half-open interval; NaN is rejected).
template <class V>
void check_in_half_open(std::string_view where, std::string_view name, V value, V lo, V hi) {
  if (!(value >= lo && value < hi))
    fail(where, name, " must be in [", lo, ", ", hi, "), got ", value);
}

}  // namespace gcomp
