// Tests of detail/typed_slot.hpp: value semantics, so copied aggregators never share state.
#include <doctest/doctest.h>

#include <memory>
#include <vector>

#include "gcomp/detail/typed_slot.hpp"

using gcomp::detail::typed_slot;

TEST_CASE("typed_slot: a copy owns its own object") {
  typed_slot a;
  a.get<std::vector<int>>("test") = {1, 2, 3};
  typed_slot b = a;
  a.get<std::vector<int>>("test")[0] = 99;
  CHECK(b.get<std::vector<int>>("test") == std::vector<int>{1, 2, 3});
  CHECK(&a.get<std::vector<int>>("test") != &b.get<std::vector<int>>("test"));

  typed_slot c;
  c = b;
  b.get<std::vector<int>>("test").push_back(4);
  CHECK(c.get<std::vector<int>>("test") == std::vector<int>{1, 2, 3});

  typed_slot d = std::move(c);
  CHECK(d.get<std::vector<int>>("test") == std::vector<int>{1, 2, 3});
}

TEST_CASE("typed_slot: an object that cannot be copied is not carried over") {
  typed_slot a;
  a.get<std::unique_ptr<int>>("test") = std::make_unique<int>(7);
  typed_slot b = a;
  CHECK(b.get<std::unique_ptr<int>>("test") == nullptr);  // fresh, default-constructed
  CHECK(*a.get<std::unique_ptr<int>>("test") == 7);
}

TEST_CASE("typed_slot: a second type is a usage error naming both") {
  typed_slot a;
  a.get<int>("where");
  CHECK_THROWS_WITH_AS(a.get<double>("where"), doctest::Contains("cannot also serve"),
                       gcomp::error);
}
