// layout: construction, lookup, slicing and validation of named layers over one flat buffer.
#include <doctest/doctest.h>

#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "gcomp/core/layout.hpp"

using gcomp::layout;

TEST_CASE("layout from sizes lays layers end to end") {
  const layout lay{3, 5, 2};
  REQUIRE(lay.num_layers() == 3);
  CHECK(lay.total_size() == 10);
  CHECK(lay.covered_size() == 10);
  CHECK(lay[0].name == "layer0");
  CHECK(lay[1].offset == 3);
  CHECK(lay[2].offset == 8);
  CHECK(lay[2].size == 2);
}

TEST_CASE("layout from (name, size) pairs supports lookup by name") {
  const layout lay{{"fc1.weight", 12}, {"fc1.bias", 4}, {"fc2.weight", 8}};
  CHECK(lay.index_of("fc1.bias") == 1);
  CHECK(lay.at("fc2.weight").offset == 16);
  CHECK(lay.find("missing") == std::nullopt);
  CHECK_THROWS_WITH_AS(lay.index_of("missing"), "gcomp::layout::index_of: no layer named 'missing'",
                       gcomp::error);
  CHECK_THROWS_AS(lay.at(std::size_t{3}), gcomp::error);

  std::vector<float> buffer(24);
  std::iota(buffer.begin(), buffer.end(), 0.0f);
  const auto bias = lay.slice(std::span<float>(buffer), 1);
  REQUIRE(bias.size() == 4);
  CHECK(bias[0] == 12.0f);
  CHECK(bias[3] == 15.0f);
  std::vector<float> short_buffer(23);
  CHECK_THROWS_AS(lay.slice(std::span<float>(short_buffer), 0), gcomp::error);
}

TEST_CASE("explicit layers: shapes, overlap and gaps are validated") {
  using gcomp::layer;
  const auto ok = layout::from_layers({{"w", 0, 6, {2, 3}}, {"b", 6, 3, {3}}});
  CHECK(ok.total_size() == 9);
  CHECK(ok[0].shape == std::vector<std::size_t>{2, 3});

  // Layers may be given out of offset order.
  const auto reordered = layout::from_layers({{"b", 6, 3, {}}, {"w", 0, 6, {}}});
  CHECK(reordered.total_size() == 9);
  CHECK(reordered[0].name == "b");

  CHECK_THROWS_WITH_AS(layout::from_layers({{"w", 0, 6, {2, 2}}}),
                       "gcomp::layout: layer 'w' has shape with 4 elements but size 6",
                       gcomp::error);
  CHECK_THROWS_WITH_AS(
      layout::from_layers({{"a", 0, 5, {}}, {"b", 4, 2, {}}}),
      "gcomp::layout: layer 'b' at offset 4 overlaps layer 'a' which ends at 5", gcomp::error);
  CHECK_THROWS_AS(layout::from_layers({{"a", 0, 4, {}}, {"b", 6, 2, {}}}), gcomp::error);
  const auto gappy = layout::from_layers({{"a", 0, 4, {}}, {"b", 6, 2, {}}}, gcomp::gaps::allowed);
  CHECK(gappy.total_size() == 8);
  CHECK(gappy.covered_size() == 6);
  CHECK_THROWS_AS(layout::from_layers({{"a", 2, 4, {}}}), gcomp::error);  // gap at the start
}

TEST_CASE("bad layouts raise gcomp::error with a clear message") {
  CHECK_THROWS_WITH_AS(layout(std::span<const std::size_t>{}),
                       "gcomp::layout: a layout needs at least one layer, got none", gcomp::error);
  CHECK_THROWS_WITH_AS((layout{4, 0, 2}), "gcomp::layout: layer 'layer1' has size 0", gcomp::error);
  CHECK_THROWS_WITH_AS((layout{{"x", 2}, {"x", 3}}), "gcomp::layout: two layers are named 'x'",
                       gcomp::error);
  CHECK_THROWS_AS(layout::from_layers({{"", 0, 1, {}}}), gcomp::error);
  CHECK_THROWS_AS(layout::from_layers({{"a", SIZE_MAX - 1, 4, {}}}, gcomp::gaps::allowed),
                  gcomp::error);
}

TEST_CASE("check_buffer names the buffer and both sizes") {
  const layout lay{4, 4};
  CHECK_NOTHROW(lay.check_buffer("f", "params", 8));
  CHECK_THROWS_WITH_AS(lay.check_buffer("f", "params", 7),
                       "f: params has size 7 but the layout covers 8 elements; they must match",
                       gcomp::error);
}
