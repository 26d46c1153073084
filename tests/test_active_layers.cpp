// active_layers: packed all-reduce of the active layers against a rank-order oracle, exact
// bytes on the wire, untouched inactive inputs, thread-count determinism, errors.
#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <mutex>
#include <span>
#include <vector>

#include "compressor_checks.hpp"
#include "gcomp/aggregate/active_layers.hpp"
#include "gcomp/comm/inproc.hpp"

using gcomp::test::expect_error;
using gcomp::test::same_bits;

namespace {

// Worker m's local gradient; the inactive layers hold NaN, which the
// aggregator must never read.
template <class T>
std::vector<T> local_of(const gcomp::layout& lay, gcomp::layer_mask active, int m) {
  std::vector<T> g(lay.total_size(), std::numeric_limits<T>::quiet_NaN());
  for (std::size_t d = 0; d < lay.num_layers(); ++d) {
    if (!active[d]) continue;
    for (std::size_t i = 0; i < lay[d].size; ++i)
      g[lay[d].offset + i] = T(std::sin(0.7 * double(i) + double(d) + 1.3 * m) * (1 + m));
  }
  return g;
}

// The oracle: per element, ((a_0 s + a_1 s) + a_2 s) ... * (1 / M) in T, in
// rank order as inproc sums, with s = 1 / pi_d; zero outside the active layers.
template <class T>
std::vector<T> oracle(const gcomp::layout& lay, gcomp::layer_mask active,
                      const std::vector<double>& inclusion, int workers) {
  std::vector<T> out(lay.total_size(), T(0));
  std::vector<std::vector<T>> local;
  for (int m = 0; m < workers; ++m) local.push_back(local_of<T>(lay, active, m));
  for (std::size_t d = 0; d < lay.num_layers(); ++d) {
    if (!active[d]) continue;
    const T scale = T(1.0 / inclusion[d]);
    for (std::size_t i = lay[d].offset; i < lay[d].offset + lay[d].size; ++i) {
      T sum = local[0][i] * scale;
      for (int m = 1; m < workers; ++m) sum = sum + local[std::size_t(m)][i] * scale;
      out[i] = sum * (T(1) / T(workers));
    }
  }
  return out;
}

template <class T>
void check_against_oracle(const gcomp::layout& lay) {
  constexpr int workers = 3;
  const std::vector<std::uint8_t> active{1, 0, 1, 1, 0};
  const std::vector<double> inclusion{0.5, 0.0 /* inactive: not read */, 0.125, 1.0, 0.3};
  std::size_t active_elements = 0;
  for (std::size_t d = 0; d < 5; ++d) active_elements += active[d] ? lay[d].size : 0;
  const auto expected = oracle<T>(lay, active, inclusion, workers);
  std::vector<std::vector<T>> global(workers);
  std::vector<gcomp::comm_stats> stats(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    const auto local = local_of<T>(lay, active, comm.rank());
    std::vector<T> out(lay.total_size(), T(7));  // gaps must come back as 0
    gcomp::active_layers aggregate;
    aggregate.aggregate(gcomp::host_seq{}, comm, lay, active, inclusion, std::span<const T>(local),
                        std::span<T>(out));
    CHECK(aggregate.last_active_layers() == 3);
    CHECK(aggregate.last_elements() == active_elements);
    CHECK(aggregate.last_bytes() == active_elements * sizeof(T));
    global[std::size_t(comm.rank())] = out;
    stats[std::size_t(comm.rank())] = comm.stats();
  });
  for (int m = 0; m < workers; ++m) {
    CHECK(same_bits(global[std::size_t(m)], expected));
    // One all-reduce of the packed active layers: no indices, no inactive layer.
    const std::uint64_t bytes = active_elements * sizeof(T);
    CHECK(stats[std::size_t(m)] == gcomp::comm_stats{bytes, bytes, 1});
  }
}

}  // namespace

TEST_CASE("the packed all-reduce equals the rank-order oracle, bitwise, and sends only active layers") {
  const gcomp::layout contiguous{{"a", 5}, {"b", 9}, {"c", 3}, {"d", 11}, {"e", 2}};
  check_against_oracle<float>(contiguous);
  check_against_oracle<double>(contiguous);
  // Layers out of buffer order, with gaps between them.
  const auto gapped = gcomp::layout::from_layers(
      {{"a", 40, 5, {}}, {"b", 0, 9, {}}, {"c", 12, 3, {}}, {"d", 20, 11, {}}, {"e", 50, 2, {}}},
      gcomp::gaps::allowed);
  check_against_oracle<float>(gapped);
}

TEST_CASE("a one-rank group averages nothing, counts no bytes, and still reports the payload") {
  gcomp::inproc_group group(1);
  const gcomp::layout lay{3, 4};
  const std::vector<std::uint8_t> active{0, 1};
  const std::vector<double> inclusion{0.5, 0.25};
  const std::vector<float> local{1, 2, 3, 4, 5, 6, 7};
  std::vector<float> global(7, -1.0f);
  gcomp::active_layers aggregate;
  aggregate.aggregate(gcomp::host_seq{}, group.comm(0), lay, active, inclusion,
                      std::span<const float>(local), std::span<float>(global));
  CHECK(global == std::vector<float>{0, 0, 0, 16, 20, 24, 28});
  CHECK(aggregate.last_bytes() == 16);
  CHECK(group.comm(0).stats() == gcomp::comm_stats{0, 0, 1});
  // No active layer: still one collective (the workers stay in step), no bytes.
  const std::vector<std::uint8_t> none{0, 0};
  aggregate.aggregate(gcomp::host_seq{}, group.comm(0), lay, none, inclusion,
                      std::span<const float>(local), std::span<float>(global));
  CHECK(global == std::vector<float>(7, 0.0f));
  CHECK(aggregate.last_bytes() == 0);
  CHECK(group.comm(0).stats().collectives == 2);
}

TEST_CASE("results do not depend on the thread count") {
  // Layers above the host grain so that host_par really splits them.
  const gcomp::layout lay{40000, 300, 70000};
  const std::vector<std::uint8_t> active{1, 0, 1};
  const std::vector<double> inclusion{0.3, 1.0, 0.7};
  const auto local = local_of<float>(lay, active, 1);
  gcomp::inproc_group group(1);
  auto run = [&](const auto& policy) {
    std::vector<float> out(lay.total_size());
    gcomp::active_layers aggregate;
    aggregate.aggregate(policy, group.comm(0), lay, active, inclusion, std::span<const float>(local),
                        std::span<float>(out));
    return out;
  };
  const auto reference = run(gcomp::host_seq{});
  for (unsigned threads : gcomp::test::policy_threads) CHECK(same_bits(run(gcomp::host_par(threads)), reference));
}

TEST_CASE("workers whose masks differ are caught by the communicator, before anything is written") {
  const gcomp::layout lay{4, 6};
  const std::vector<double> inclusion{0.5, 0.5};
  int errors = 0;
  std::vector<std::vector<float>> global(2);
  gcomp::inproc_group group(2);
  std::mutex lock;
  group.run([&](gcomp::inproc_comm& comm) {
    const std::vector<std::uint8_t> active = comm.rank() == 0 ? std::vector<std::uint8_t>{1, 0}
                                                              : std::vector<std::uint8_t>{0, 1};
    const std::vector<float> local(10, 1.0f);
    std::vector<float> out(10, 3.0f);
    gcomp::active_layers aggregate;
    try {
      aggregate.aggregate(gcomp::host_seq{}, comm, lay, active, inclusion,
                          std::span<const float>(local), std::span<float>(out));
    } catch (const gcomp::error&) {
      std::lock_guard guard(lock);
      ++errors;
    }
    global[std::size_t(comm.rank())] = out;
  });
  CHECK(errors == 2);
  for (const auto& out : global) CHECK(out == std::vector<float>(10, 3.0f));
}

TEST_CASE("bad arguments throw gcomp::error naming them, with global unchanged") {
  gcomp::inproc_group group(1);
  auto& comm = group.comm(0);
  const gcomp::layout lay{2, 3};
  const std::vector<std::uint8_t> active{1, 1}, short_mask{1};
  const std::vector<double> inclusion{0.5, 0.5};
  const std::vector<float> local(5, 1.0f), short_local(4, 1.0f);
  std::vector<float> global(5, 9.0f), short_global(4, 9.0f);
  gcomp::active_layers a;
  const gcomp::host_seq seq;
  expect_error([&] { a.aggregate(seq, comm, lay, active, inclusion, std::span<const float>(short_local), std::span<float>(global)); },
               "gcomp::active_layers::aggregate: local has size 4 but the layout covers 5 elements");
  expect_error([&] { a.aggregate(seq, comm, lay, active, inclusion, std::span<const float>(local), std::span<float>(short_global)); },
               "global has size 4 but local has size 5");
  expect_error([&] { a.aggregate(seq, comm, lay, short_mask, inclusion, std::span<const float>(local), std::span<float>(global)); },
               "active has size 1 but layout layers has size 2");
  expect_error([&] { a.aggregate(seq, comm, lay, active, std::vector<double>{0.5}, std::span<const float>(local), std::span<float>(global)); },
               "inclusion has size 1 but layout layers has size 2");
  for (double bad : {0.0, -0.5, 1.5, std::nan("")})
    expect_error([&] { a.aggregate(seq, comm, lay, active, std::vector<double>{0.5, bad}, std::span<const float>(local), std::span<float>(global)); },
                 "inclusion[1] of an active layer must be in (0, 1]");
  CHECK(global == std::vector<float>(5, 9.0f));
  CHECK(comm.stats().collectives == 0);  // nothing reached the wire
  // One object serves one element type.
  a.aggregate(seq, comm, lay, active, inclusion, std::span<const float>(local), std::span<float>(global));
  const std::vector<double> local_d(5, 1.0);
  std::vector<double> global_d(5, 9.0);
  expect_error([&] { a.aggregate(seq, comm, lay, active, inclusion, std::span<const double>(local_d), std::span<double>(global_d)); },
               "use one object per compressor");
  CHECK(global_d == std::vector<double>(5, 9.0));
  // A copy owns a fresh buffer (copies handed to other threads share nothing),
  // so it may serve another element type.
  gcomp::active_layers copy = a;
  CHECK(copy.last_bytes() == a.last_bytes());
  copy.aggregate(seq, comm, lay, active, inclusion, std::span<const double>(local_d), std::span<double>(global_d));
  CHECK(global_d == std::vector<double>(5, 2.0));
}
