// gcomp::error and the checking helpers: the right type, and messages that name argument and value.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <string>

#include "gcomp/core/error.hpp"

namespace {

std::string message_of(auto&& call) {
  try {
    call();
  } catch (const gcomp::error& e) {
    return e.what();
  }
  return "<no exception>";
}

}  // namespace

TEST_CASE("gcomp::error is a std::runtime_error") {
  CHECK_THROWS_AS(gcomp::fail("f", "x"), std::runtime_error);
  CHECK(message_of([] { gcomp::fail("gcomp::f", "k must be > 0, got ", -3); }) ==
        "gcomp::f: k must be > 0, got -3");
}

TEST_CASE("require builds its message only when the condition fails") {
  CHECK_NOTHROW(gcomp::require(true, "f", "unused"));
  CHECK(message_of([] { gcomp::require(false, "g", "bad ", 1, '/', 2.5); }) == "g: bad 1/2.5");
}

TEST_CASE("size, sign and range checks name the argument and the value") {
  CHECK_NOTHROW(gcomp::check_same_size("f", "a", 3, "b", 3));
  CHECK(message_of([] { gcomp::check_same_size("f", "grads", 3, "params", 4); }) ==
        "f: grads has size 3 but params has size 4; they must match");

  CHECK_NOTHROW(gcomp::check_positive("f", "lr", 0.5));
  CHECK(message_of([] { gcomp::check_positive("f", "lr", 0.0); }) ==
        "f: lr must be finite and > 0, got 0");
  CHECK(message_of([] { gcomp::check_positive("f", "k", 0); }) == "f: k must be > 0, got 0");
  CHECK_THROWS_AS(gcomp::check_positive("f", "lr", std::numeric_limits<double>::infinity()),
                  gcomp::error);
  CHECK_THROWS_AS(gcomp::check_positive("f", "lr", std::nan("")), gcomp::error);

  CHECK_NOTHROW(gcomp::check_non_negative("f", "wd", 0.0));
  CHECK(message_of([] { gcomp::check_non_negative("f", "wd", -1.5); }) ==
        "f: wd must be finite and >= 0, got -1.5");

  CHECK_NOTHROW(gcomp::check_in_range("f", "p", 1.0, 0.0, 1.0));
  CHECK(message_of([] { gcomp::check_in_range("f", "p", 1.5, 0.0, 1.0); }) ==
        "f: p must be in [0, 1], got 1.5");
  CHECK_THROWS_AS(gcomp::check_in_range("f", "p", std::nan(""), 0.0, 1.0), gcomp::error);
  CHECK_NOTHROW(gcomp::check_in_half_open("f", "mu", 0.0, 0.0, 1.0));
  CHECK(message_of([] { gcomp::check_in_half_open("f", "mu", 1.0, 0.0, 1.0); }) ==
        "f: mu must be in [0, 1), got 1");
}
