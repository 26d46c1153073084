// Host primitives: every index visited once, the documented reduction order, stable
// selection, and results that do not depend on the thread count.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "gcomp/exec/host.hpp"

namespace {

const std::size_t sizes[] = {0, 1, 7, 8, 9, 4095, 4096, 4097, 8191, 65536, 100003, 1 << 20};

std::vector<float> normal_floats(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen) * 1000.0f;  // wide magnitudes make order matter
  return v;
}

// Independent oracle of the documented order: blocks of 4096, lane j % 8,
// lanes combined ((0+1)+(2+3))+((4+5)+(6+7)), blocks left to right.
float oracle_sum(const std::vector<float>& v, std::size_t begin, std::size_t end) {
  float total = 0.0f;
  for (std::size_t b = begin; b < end; b += 4096) {
    float lane[8] = {};
    for (std::size_t i = b; i < std::min(end, b + 4096); ++i) lane[(i - b) % 8] += v[i];
    total += ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  }
  return total;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

}  // namespace

TEST_CASE("host_par reports its thread count") {
  CHECK(gcomp::host_par(1).threads() == 1);
  CHECK(gcomp::host_par(3).threads() == 3);
  CHECK(gcomp::host_par().threads() >= 1);
}

TEST_CASE("for_each_index visits every index exactly once") {
  for (unsigned threads : {1u, 2u, 3u, 8u}) {
    const gcomp::host_par par(threads);
    for (std::size_t n : sizes) {
      std::vector<std::atomic<int>> hits(n);
      gcomp::for_each_index(par, n, [&](std::size_t i) { hits[i].fetch_add(1); });
      CHECK(std::all_of(hits.begin(), hits.end(), [](auto& h) { return h.load() == 1; }));
    }
  }
  std::vector<int> seq(1000, 0);
  gcomp::for_each_index(gcomp::host_seq{}, seq.size(), [&](std::size_t i) { seq[i] += int(i); });
  CHECK(seq[999] == 999);
}

TEST_CASE("transform_reduce follows the documented order, bitwise, for any thread count") {
  const auto v = normal_floats(1 << 20, 7);
  auto plus = [](float a, float b) { return a + b; };
  for (std::size_t n : sizes) {
    auto at = [&](std::size_t i) { return v[i]; };
    const float expected = oracle_sum(v, 0, n);
    CHECK(same_bits(gcomp::transform_reduce(gcomp::host_seq{}, n, 0.0f, plus, at), expected));
    for (unsigned threads : {1u, 2u, 3u, 7u})
      CHECK(same_bits(gcomp::transform_reduce(gcomp::host_par(threads), n, 0.0f, plus, at), expected));
  }
}

TEST_CASE("transform_reduce: integer sums and maxima against closed forms") {
  const gcomp::host_par par(4);
  for (std::size_t n : sizes) {
    const auto sum = gcomp::transform_reduce(
        par, n, std::uint64_t{0}, [](std::uint64_t a, std::uint64_t b) { return a + b; },
        [](std::size_t i) { return std::uint64_t(i); });
    CHECK(sum == (n == 0 ? 0 : std::uint64_t(n) * (n - 1) / 2));
  }
  const auto v = normal_floats(100003, 3);
  const float lowest = -std::numeric_limits<float>::infinity();
  const float max = gcomp::transform_reduce(
      par, v.size(), lowest, [](float a, float b) { return std::max(a, b); },
      [&](std::size_t i) { return v[i]; });
  CHECK(max == *std::max_element(v.begin(), v.end()));
  CHECK(gcomp::transform_reduce(par, 0, lowest, [](float a, float b) { return std::max(a, b); },
                                [&](std::size_t i) { return v[i]; }) == lowest);
}

TEST_CASE("reduce_per_layer equals a reduction over each layer alone") {
  const gcomp::layout lay{5, 4096, 1, 70000, 3, 9000, 250000};
  const auto v = normal_floats(lay.total_size(), 11);
  auto plus = [](float a, float b) { return a + b; };
  auto at = [&](std::size_t i) { return v[i]; };
  std::vector<float> expected(lay.num_layers());
  for (std::size_t d = 0; d < lay.num_layers(); ++d)
    expected[d] = oracle_sum(v, lay[d].offset, lay[d].offset + lay[d].size);

  std::vector<float> seq(lay.num_layers());
  gcomp::reduce_per_layer(gcomp::host_seq{}, lay, std::span<float>(seq), 0.0f, plus, at);
  for (std::size_t d = 0; d < lay.num_layers(); ++d) CHECK(same_bits(seq[d], expected[d]));
  for (unsigned threads : {1u, 2u, 5u}) {
    std::vector<float> par(lay.num_layers());
    gcomp::reduce_per_layer(gcomp::host_par(threads), lay, std::span<float>(par), 0.0f, plus, at);
    for (std::size_t d = 0; d < lay.num_layers(); ++d) CHECK(same_bits(par[d], expected[d]));
  }

  // Element counts per layer must come out exactly as the layer sizes.
  std::vector<std::size_t> counts(lay.num_layers());
  gcomp::reduce_per_layer(gcomp::host_par(3), lay, std::span<std::size_t>(counts), std::size_t{0},
                          [](std::size_t a, std::size_t b) { return a + b; },
                          [](std::size_t) { return std::size_t{1}; });
  for (std::size_t d = 0; d < lay.num_layers(); ++d) CHECK(counts[d] == lay[d].size);

  std::vector<float> wrong(lay.num_layers() - 1);
  CHECK_THROWS_AS(gcomp::reduce_per_layer(gcomp::host_seq{}, lay, std::span<float>(wrong), 0.0f,
                                          plus, at),
                  gcomp::error);
}

TEST_CASE("select_if returns the selected indices in order, like a plain loop") {
  const auto v = normal_floats(1 << 20, 5);
  for (std::size_t n : sizes) {
    auto big = [&](std::size_t i) { return std::fabs(v[i]) > 2500.0f; };
    std::vector<std::uint32_t> oracle;
    for (std::size_t i = 0; i < n; ++i)
      if (big(i)) oracle.push_back(std::uint32_t(i));
    for (unsigned threads : {0u, 1u, 2u, 3u}) {
      std::vector<std::uint32_t> out(n + 1, 0xdeadbeef);
      const std::size_t count =
          threads == 0 ? gcomp::select_if(gcomp::host_seq{}, n, big, std::span<std::uint32_t>(out))
                       : gcomp::select_if(gcomp::host_par(threads), n, big,
                                          std::span<std::uint32_t>(out));
      REQUIRE(count == oracle.size());
      CHECK(std::equal(oracle.begin(), oracle.end(), out.begin()));
      CHECK(out[count] == 0xdeadbeef);  // nothing written past the count
    }
  }
}

TEST_CASE("select_if with too little room throws and leaves out unchanged") {
  const std::size_t n = 100000;
  for (unsigned threads : {0u, 2u}) {
    std::vector<std::uint32_t> out(10, 7);
    auto all = [](std::size_t) { return true; };
    CHECK_THROWS_WITH_AS(threads == 0 ? gcomp::select_if(gcomp::host_seq{}, n, all,
                                                         std::span<std::uint32_t>(out))
                                      : gcomp::select_if(gcomp::host_par(threads), n, all,
                                                         std::span<std::uint32_t>(out)),
                         "gcomp::select_if: out has room for 10 indices but 100000 were selected",
                         gcomp::error);
    CHECK(std::all_of(out.begin(), out.end(), [](std::uint32_t x) { return x == 7; }));
  }
}

TEST_CASE("host_par: exceptions reach the caller, nesting and concurrent callers work") {
  const gcomp::host_par par(3);
  CHECK_THROWS_WITH_AS(gcomp::for_each_index(par, 1 << 20,
                                             [](std::size_t i) {
                                               if (i == 777777) throw std::runtime_error("boom");
                                             }),
                       "boom", std::runtime_error);

  // A reduction inside a reduction's transform, on the same pool.
  const std::size_t outer = 64, inner = 40000;
  auto plus = [](std::uint64_t a, std::uint64_t b) { return a + b; };
  const auto nested = gcomp::transform_reduce(par, outer * 4096, std::uint64_t{0}, plus,
                                              [&](std::size_t i) -> std::uint64_t {
                                                if (i % 4096 != 0) return 0;
                                                return gcomp::transform_reduce(
                                                    par, inner, std::uint64_t{0}, plus,
                                                    [](std::size_t) { return std::uint64_t{1}; });
                                              });
  CHECK(nested == outer * inner);

  // Four threads share one pool, as in-process workers do.
  std::vector<std::uint64_t> results(4);
  std::vector<std::thread> callers;
  for (int t = 0; t < 4; ++t)
    callers.emplace_back([&, t] {
      for (int rep = 0; rep < 20; ++rep)
        results[t] = gcomp::transform_reduce(par, 300000, std::uint64_t{0}, plus,
                                             [t](std::size_t i) { return std::uint64_t(i % (t + 2)); });
    });
  for (auto& c : callers) c.join();
  for (int t = 0; t < 4; ++t) {
    std::uint64_t expected = 0;
    for (std::size_t i = 0; i < 300000; ++i) expected += i % (t + 2);
    CHECK(results[t] == expected);
  }
}
