// The text of the gcomp::error a call throws, for tests that compare or search error messages (host, Thrust and CUDA tests alike).
#pragma once

#include <string>

#include "gcomp/core/error.hpp"

namespace gcomp_test {

/// What message_of returns when the call throws nothing: a marker no expected
/// text contains, so a find() on it fails.
inline const std::string no_error = "(no gcomp::error was thrown)";

/// The message of the gcomp::error `call` throws, or no_error.
template <class Call>
std::string message_of(Call&& call) {
  try {
    call();
  } catch (const gcomp::error& e) {
    return e.what();
  }
  return no_error;
}

}  // namespace gcomp_test
