// Tests of gcomp/exec/thrust.hpp on Thrust's OpenMP device system: every primitive agrees bitwise with host_seq and host_par.
#include <doctest/doctest.h>

#include <gcomp/exec/host.hpp>
#include <gcomp/exec/thrust.hpp>

#include <omp.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "../primitive_oracles.hpp"

namespace {
using namespace gcomp_test;

static_assert(gcomp::execution_policy<gcomp::thrust_device>);
static_assert(gcomp::host_memory_policy<gcomp::thrust_device>,
              "the OpenMP device system works on host memory");

constexpr std::size_t sizes[] = {0, 1, 7, 8, 4095, 4096, 4097, 100003, std::size_t{1} << 20};

// Restores OpenMP's thread count when a test that changes it ends.
struct omp_threads_guard {
  int saved = omp_get_max_threads();
  ~omp_threads_guard() { omp_set_num_threads(saved); }
};

}  // namespace

TEST_CASE("thrust_device transform_reduce equals host_seq and host_par bitwise") {
  const gcomp::thrust_device device;
  const gcomp::host_par par2(2), par3(3);
  for (std::size_t n : sizes) {
    CAPTURE(n);
    const auto values = make_values(n, 1);
    const reductions expected = reduce_all(gcomp::host_seq{}, values);
    check_same(expected, reduce_all(par2, values));
    check_same(expected, reduce_all(par3, values));
    check_same(expected, reduce_all(device, values));
  }
}

TEST_CASE("thrust_device transform_reduce does not depend on the OpenMP thread count") {
  omp_threads_guard guard;
  const gcomp::thrust_device device;
  const auto values = make_values((std::size_t{1} << 18) + 5, 2);
  const reductions expected = reduce_all(gcomp::host_seq{}, values);
  for (int threads : {1, 2, 3, 4, 7}) {
    CAPTURE(threads);
    omp_set_num_threads(threads);
    check_same(expected, reduce_all(device, values));
  }
}

TEST_CASE("thrust_device transform_reduce of n == 0 is the identity") {
  const gcomp::thrust_device device;
  const auto r = gcomp::transform_reduce(device, 0, -2.5f, [](float a, float b) { return a + b; },
                                         [](std::size_t) { return 1.0f; });
  CHECK(r == -2.5f);
}

namespace {

}  // namespace

TEST_CASE("thrust_device reduce_per_layer equals host_seq and host_par bitwise") {
  const gcomp::thrust_device device;
  const gcomp::host_par par2(2);
  // Tiny and large layers, including sizes on and around block boundaries;
  // the second layout lists its layers out of offset order, with gaps.
  const gcomp::layout contiguous{1, 7, 4096, 4097, 100003, 3, std::size_t{1} << 18, 8, 4095};
  const auto scattered = gcomp::layout::from_layers(
      {{"b", 5000, 300, {}}, {"a", 0, 4097, {}}, {"c", 10000, 9000, {}}, {"d", 4097, 1, {}}},
      gcomp::gaps::allowed);
  for (const gcomp::layout* lay : {&contiguous, &scattered}) {
    const auto values = make_values(lay->total_size(), 3);
    const auto sums = per_layer_sums(gcomp::host_seq{}, *lay, values.data());
    check_same_bits(sums, per_layer_sums(par2, *lay, values.data()));
    check_same_bits(sums, per_layer_sums(device, *lay, values.data()));
    const auto maxima = per_layer_max(gcomp::host_seq{}, *lay, values.data());
    check_same_bits(maxima, per_layer_max(par2, *lay, values.data()));
    check_same_bits(maxima, per_layer_max(device, *lay, values.data()));
    // Each layer alone, through transform_reduce, gives the same value.
    for (std::size_t d = 0; d < lay->num_layers(); ++d) {
      const float* x = values.data() + (*lay)[d].offset;
      const float alone = gcomp::transform_reduce(
          device, (*lay)[d].size, 0.0f, [] GCOMP_HD(float a, float b) { return a + b; },
          [=] GCOMP_HD(std::size_t i) { return x[i] * x[i]; });
      CHECK(bits_of(alone) == bits_of(sums[d]));
    }
  }
}

TEST_CASE("thrust_device reduce_per_layer rejects an out of the wrong size like the host") {
  const gcomp::layout lay{3, 4};
  std::vector<float> out(3, 7.0f);
  const auto plus = [](float a, float b) { return a + b; };
  const auto one = [](std::size_t) { return 1.0f; };
  const std::string host = message_of(
      [&] { gcomp::reduce_per_layer(gcomp::host_seq{}, lay, std::span<float>(out), 0.0f, plus, one); });
  const std::string device = message_of([&] {
    gcomp::reduce_per_layer(gcomp::thrust_device{}, lay, std::span<float>(out), 0.0f, plus, one);
  });
  CHECK(device == host);
  CHECK(device.find("gcomp::reduce_per_layer") != std::string::npos);
  CHECK(out == std::vector<float>(3, 7.0f));
}

namespace {

template <class Index>
void check_select(std::size_t n, std::span<const float> values, float threshold) {
  CAPTURE(n);
  CAPTURE(threshold);
  const float* x = values.data();
  const auto pred = [=] GCOMP_HD(std::size_t i) { return x[i] > threshold || i % 1000 == 3; };
  std::vector<Index> oracle;
  for (std::size_t i = 0; i < n; ++i)
    if (pred(i)) oracle.push_back(static_cast<Index>(i));
  // Room for three more than needed: the tail must stay untouched.
  const Index sentinel = static_cast<Index>(0xabcdef);
  std::vector<Index> out(oracle.size() + 3, sentinel);
  const std::size_t count = gcomp::select_if(gcomp::thrust_device{}, n, pred, std::span<Index>(out));
  REQUIRE(count == oracle.size());
  CHECK(std::equal(oracle.begin(), oracle.end(), out.begin()));
  CHECK(out[count] == sentinel);
  CHECK(out[count + 2] == sentinel);
  std::vector<Index> host_out(oracle.size());
  CHECK(gcomp::select_if(gcomp::host_par(2), n, pred, std::span<Index>(host_out)) == count);
  CHECK(host_out == oracle);
}

}  // namespace

TEST_CASE("thrust_device select_if matches a plain loop") {
  for (std::size_t n : sizes) {
    const auto values = make_values(n, 4);
    for (float threshold : {0.5f, 2.0f, 1e9f, -1e9f}) {
      check_select<std::uint32_t>(n, values, threshold);
      check_select<std::size_t>(n, values, threshold);
    }
  }
}

TEST_CASE("thrust_device select_if throws on a too-small out and leaves it unchanged") {
  const std::size_t n = 100003;
  const auto pred = [] GCOMP_HD(std::size_t i) { return i % 7 == 0; };
  const std::size_t expected = (n + 6) / 7;
  std::vector<std::uint32_t> out(expected - 1, 42u);
  const std::string device = message_of(
      [&] { gcomp::select_if(gcomp::thrust_device{}, n, pred, std::span<std::uint32_t>(out)); });
  CHECK(out == std::vector<std::uint32_t>(expected - 1, 42u));
  const std::string host =
      message_of([&] { gcomp::select_if(gcomp::host_seq{}, n, pred, std::span<std::uint32_t>(out)); });
  CHECK(device == host);
  CHECK(device.find("gcomp::select_if") != std::string::npos);
  CHECK(device.find(std::to_string(expected)) != std::string::npos);

  std::vector<std::uint32_t> none;
  CHECK(gcomp::select_if(gcomp::thrust_device{}, 0, pred, std::span<std::uint32_t>(none)) == 0);
  CHECK_THROWS_AS(gcomp::select_if(gcomp::thrust_device{}, 1, pred, std::span<std::uint32_t>(none)),
                  gcomp::error);
}

TEST_CASE("thrust_device for_each_index writes every index once") {
  const gcomp::thrust_device device;
  for (std::size_t n : sizes) {
    CAPTURE(n);
    const auto values = make_values(n, 5);
    std::vector<float> y(n + 1, -7.0f);
    const float* x = values.data();
    float* out = y.data();
    gcomp::for_each_index(device, n, [=] GCOMP_HD(std::size_t i) {
      out[i] = 2.0f * x[i] + static_cast<float>(i % 17);
    });
    bool all = true;
    for (std::size_t i = 0; i < n; ++i) all = all && y[i] == 2.0f * values[i] + static_cast<float>(i % 17);
    CHECK(all);
    CHECK(y[n] == -7.0f);
  }
}

TEST_CASE("thrust_device reuses its workspace: no allocation once sizes have been seen") {
  const gcomp::thrust_device device;
  const gcomp::thrust_device copy = device;
  CHECK(copy.workspace == device.workspace);
  const gcomp::layout lay{5, 100003, 4096};
  const auto values = make_values(lay.total_size(), 6);
  std::vector<std::uint32_t> selected(values.size());
  std::vector<float> per_layer(lay.num_layers());
  const float* x = values.data();
  auto step = [&](const gcomp::thrust_device& policy) {
    reduce_all(policy, values);
    gcomp::reduce_per_layer(policy, lay, std::span<float>(per_layer), 0.0f,
                            [] GCOMP_HD(float a, float b) { return a + b; },
                            [=] GCOMP_HD(std::size_t i) { return x[i]; });
    gcomp::select_if(policy, values.size(), [=] GCOMP_HD(std::size_t i) { return x[i] > 0.0f; },
                     std::span<std::uint32_t>(selected));
  };
  step(device);
  step(copy);  // the second round may settle which block serves which request
  const std::size_t settled = device.workspace->allocations();
  CHECK(settled > 0);
  for (int round = 0; round < 3; ++round) step(round % 2 ? device : copy);
  CHECK(device.workspace->allocations() == settled);
}

TEST_CASE("thrust_device copies may be used from several host threads at once") {
  const gcomp::thrust_device device;
  const auto values = make_values(300007, 7);
  const reductions expected = reduce_all(gcomp::host_seq{}, values);
  const float* x = values.data();
  const auto pred = [=] GCOMP_HD(std::size_t i) { return x[i] > 0.25f; };
  std::vector<std::uint32_t> oracle(values.size());
  oracle.resize(gcomp::select_if(gcomp::host_seq{}, values.size(), pred, std::span<std::uint32_t>(oracle)));
  std::vector<reductions> got(3);
  std::vector<std::vector<std::uint32_t>> selected(3, std::vector<std::uint32_t>(values.size()));
  std::vector<std::size_t> counts(3);
  {
    std::vector<std::jthread> threads;
    for (std::size_t t = 0; t < 3; ++t)
      threads.emplace_back([&, t, policy = device] {
        for (int round = 0; round < 4; ++round) {
          got[t] = reduce_all(policy, values);
          counts[t] = gcomp::select_if(policy, values.size(), pred, std::span<std::uint32_t>(selected[t]));
        }
      });
  }
  for (std::size_t t = 0; t < 3; ++t) {
    CAPTURE(t);
    check_same(expected, got[t]);
    REQUIRE(counts[t] == oracle.size());
    CHECK(std::equal(oracle.begin(), oracle.end(), selected[t].begin()));
  }
}

TEST_CASE("thrust_workspace hands out distinct blocks and keeps them for reuse") {
  static int allocated = 0;
  static int freed = 0;
  {
    gcomp::detail::thrust_workspace workspace(
        [](std::size_t bytes, std::string_view) -> void* {
          ++allocated;
          return ::operator new(bytes);
        },
        [](void* block) noexcept {
          ++freed;
          ::operator delete(block);
        });
    void* a = workspace.acquire(1000, "test");
    void* b = workspace.acquire(1000, "test");
    CHECK(a != b);
    workspace.release(a);
    CHECK(workspace.acquire(700, "test") == a);    // fits within twice the request: reused
    void* c = workspace.acquire(100, "test");      // a 1024-byte block is too big for 100 bytes
    CHECK(c != a);
    CHECK(c != b);
    workspace.release(a);
    workspace.release(b);
    workspace.release(c);
    CHECK(workspace.allocations() == 3);
    void* d = workspace.acquire(5000, "test");  // nothing fits: the free small blocks go
    CHECK(freed == 3);
    CHECK(workspace.allocations() == 4);
    workspace.release(d);
  }
  CHECK(allocated == 4);
  CHECK(freed == 4);
}
