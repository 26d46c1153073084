// run_comm_suite: checks every collective of a communicator against independent oracles, on every rank.
//
// It uses only the communicator's member functions, so the same suite runs
// over inproc_comm, the MPI communicator and the NCCL one. Call it on every
// rank at once. doctest 2.4.9 assertions may be used from several threads
// (its counters are atomic and its reporters locked); the suite still checks
// counts of mismatches rather than single elements, so that a failure prints
// one line per rank instead of a million.
#pragma once

#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "gcomp/comm/stats.hpp"

namespace gcomp::test {

// A value any rank can recompute for (rank, index): 24 random mantissa bits at
// scales far apart, so the order of summation shows in the result.
template <class T>
T suite_value(int rank, std::size_t i) {
  std::uint64_t x = (static_cast<std::uint64_t>(rank) + 1) * 0x9E3779B97F4A7C15ull ^
                    (static_cast<std::uint64_t>(i) + 0x632BE59BD9B4E019ull) * 0xD1B54A32D192ED03ull;
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 29;
  constexpr double scales[4] = {1e-3, 1.0, 1e3, 7.5};
  const double u = static_cast<double>(x >> 40) / 16777216.0 - 0.5;  // 24 bits in [-0.5, 0.5)
  return static_cast<T>(u * scales[(i + static_cast<std::size_t>(rank)) % 4]);
}

// ((x_0 + x_1) + x_2) + ... in rank order: the sum every rank must hold, bit for bit.
template <class T>
T rank_ordered_sum(int size, std::size_t i) {
  T acc = suite_value<T>(0, i);
  for (int r = 1; r < size; ++r) acc = static_cast<T>(acc + suite_value<T>(r, i));
  return acc;
}

template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

inline std::byte pattern_byte(int rank, std::size_t k) {
  return static_cast<std::byte>((static_cast<std::size_t>(rank) * 31 + k * 7 + 1) & 0xff);
}

// The accounting rule of comm_stats, kept independently of any transport.
struct expected_stats {
  comm_stats value;
  int size;
  void add(std::uint64_t sent, std::uint64_t received) {
    if (size > 1) {
      value.bytes_sent += sent;
      value.bytes_received += received;
    }
    ++value.collectives;
  }
};

template <class Policy, class Comm>
void suite_ranks(const Policy& policy, Comm& comm, expected_stats& expect) {
  const int m = comm.size();
  const int rank = comm.rank();
  REQUIRE(m >= 1);
  REQUIRE(rank >= 0);
  REQUIRE(rank < m);
  // Gathering every rank's number shows that the ranks are distinct and ordered.
  std::int32_t mine = rank;
  std::vector<std::int32_t> all(static_cast<std::size_t>(m), -1);
  comm.allgather(policy, std::as_bytes(std::span(&mine, 1)), std::as_writable_bytes(std::span(all)));
  expect.add(sizeof(std::int32_t), (m - 1) * sizeof(std::int32_t));
  int wrong = 0;
  for (int j = 0; j < m; ++j) wrong += all[static_cast<std::size_t>(j)] != j;
  CHECK(wrong == 0);
}

template <class Policy, class Comm>
void suite_allreduce(const Policy& policy, Comm& comm, expected_stats& expect) {
  const int m = comm.size();
  const int rank = comm.rank();
  const double triangle = m * (m + 1) / 2.0;

  {  // closed form: sum_r (r + 1) * i, exact in double
    std::vector<double> x(1000);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = (rank + 1) * static_cast<double>(i);
    comm.allreduce_sum(policy, std::span(x));
    expect.add(x.size() * sizeof(double), x.size() * sizeof(double));
    int wrong = 0;
    for (std::size_t i = 0; i < x.size(); ++i) wrong += x[i] != triangle * static_cast<double>(i);
    CHECK(wrong == 0);
  }
  {  // int: sum_r (1000 r + i) = m i + 1000 m (m - 1) / 2
    std::vector<int> x(777);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = 1000 * rank + static_cast<int>(i);
    comm.allreduce_sum(policy, std::span(x));
    expect.add(x.size() * sizeof(int), x.size() * sizeof(int));
    int wrong = 0;
    for (std::size_t i = 0; i < x.size(); ++i)
      wrong += x[i] != m * static_cast<int>(i) + 1000 * m * (m - 1) / 2;
    CHECK(wrong == 0);
  }
  {  // 64-bit integers beyond 32 bits
    std::vector<std::int64_t> x(65, std::int64_t{1} << 40);
    x[0] = rank;
    comm.allreduce_sum(policy, std::span(x));
    expect.add(x.size() * 8, x.size() * 8);
    CHECK(x[0] == static_cast<std::int64_t>(m) * (m - 1) / 2);
    CHECK(x[64] == static_cast<std::int64_t>(m) << 40);
  }
  // Rank-ordered sums, bit for bit; 4099 is odd so chunks are uneven.
  auto bitwise = [&]<class T>(std::type_identity<T>) {
    std::vector<T> x(4099);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = suite_value<T>(rank, i);
    comm.allreduce_sum(policy, std::span(x));
    expect.add(x.size() * sizeof(T), x.size() * sizeof(T));
    int wrong = 0;
    for (std::size_t i = 0; i < x.size(); ++i) wrong += !same_bits(x[i], rank_ordered_sum<T>(m, i));
    CHECK(wrong == 0);
  };
  bitwise(std::type_identity<float>{});
  bitwise(std::type_identity<double>{});
  {  // empty buffer: still a collective
    std::span<float> none;
    comm.allreduce_sum(policy, none);
    expect.add(0, 0);
  }
  {  // one element
    float one = static_cast<float>(rank + 1);
    comm.allreduce_sum(policy, std::span(&one, 1));
    expect.add(sizeof(float), sizeof(float));
    CHECK(one == static_cast<float>(triangle));
  }
  {  // a large buffer; integer-valued floats keep the oracle closed-form
    std::vector<float> x(std::size_t{1} << 20);
    for (std::size_t i = 0; i < x.size(); ++i)
      x[i] = static_cast<float>(rank + 1) * static_cast<float>(i % 4096);
    comm.allreduce_sum(policy, std::span(x));
    expect.add(x.size() * sizeof(float), x.size() * sizeof(float));
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < x.size(); ++i)
      wrong += x[i] != static_cast<float>(triangle) * static_cast<float>(i % 4096);
    CHECK(wrong == 0);
  }
}

template <class Policy, class Comm>
void suite_allgather(const Policy& policy, Comm& comm, expected_stats& expect) {
  const int m = comm.size();
  const int rank = comm.rank();
  const std::size_t n = 5;
  std::vector<std::byte> in(n);
  for (std::size_t k = 0; k < n; ++k) in[k] = pattern_byte(rank, k);
  std::vector<std::byte> out(static_cast<std::size_t>(m) * n, std::byte{0xee});
  comm.allgather(policy, std::span<const std::byte>(in), std::span(out));
  expect.add(n, (m - 1) * n);
  int wrong = 0;
  for (int j = 0; j < m; ++j)
    for (std::size_t k = 0; k < n; ++k)
      wrong += out[static_cast<std::size_t>(j) * n + k] != pattern_byte(j, k);
  CHECK(wrong == 0);

  // Nothing to gather is still a collective.
  comm.allgather(policy, std::span<const std::byte>(), std::span<std::byte>());
  expect.add(0, 0);
}

template <class Policy, class Comm>
void suite_allgatherv(const Policy& policy, Comm& comm, expected_stats& expect) {
  const int m = comm.size();
  const int rank = comm.rank();
  std::vector<std::byte> out;
  std::vector<std::size_t> counts(static_cast<std::size_t>(m), 12345);
  const std::byte* first_storage = nullptr;

  // Rank r sends bytes(r) bytes; the oracle rebuilds everything from the formula.
  auto gather = [&](auto bytes, const char* label) {
    INFO("allgatherv case: ", label, ", rank ", rank, " of ", m);
    std::vector<std::byte> in(bytes(rank));
    for (std::size_t k = 0; k < in.size(); ++k) in[k] = pattern_byte(rank, k);
    comm.allgatherv(policy, std::span<const std::byte>(in), out, std::span(counts));
    std::size_t total = 0;
    for (int j = 0; j < m; ++j) total += bytes(j);
    expect.add(in.size(), total - in.size());
    REQUIRE(out.size() == total);
    int wrong = 0;
    std::size_t offset = 0;
    for (int j = 0; j < m; ++j) {
      wrong += counts[static_cast<std::size_t>(j)] != bytes(j);
      for (std::size_t k = 0; k < bytes(j); ++k) wrong += out[offset + k] != pattern_byte(j, k);
      offset += bytes(j);
    }
    CHECK(wrong == 0);
  };
  auto uneven = [](int r) { return static_cast<std::size_t>(r) * 3 + 1; };
  auto rank0_empty = [](int r) { return static_cast<std::size_t>(r) * 2; };
  auto all_empty = [](int) { return std::size_t{0}; };
  gather(uneven, "r*3+1 bytes");
  first_storage = out.data();
  // Smaller or equal totals reuse the storage: no allocation once large enough.
  gather(uneven, "r*3+1 bytes again");
  CHECK(out.data() == first_storage);
  gather(rank0_empty, "r*2 bytes, rank 0 sends none");
  CHECK(out.data() == first_storage);
  gather(all_empty, "nobody sends anything");
  CHECK(out.empty());
}

template <class Policy, class Comm>
void suite_broadcast(const Policy& policy, Comm& comm, expected_stats& expect) {
  const int m = comm.size();
  const int rank = comm.rank();
  for (int root = 0; root < m; ++root) {
    std::vector<double> x(17, -1.0);
    if (rank == root)
      for (std::size_t i = 0; i < x.size(); ++i) x[i] = suite_value<double>(root, i);
    comm.broadcast(policy, std::span(x), root);
    const std::uint64_t bytes = x.size() * sizeof(double);
    expect.add(rank == root ? bytes : 0, rank == root ? 0 : bytes);
    int wrong = 0;
    for (std::size_t i = 0; i < x.size(); ++i)
      wrong += !same_bits(x[i], suite_value<double>(root, i));
    CHECK(wrong == 0);
  }
  {  // int from the last rank
    std::vector<int> x(9, rank == m - 1 ? 42 : rank);
    comm.broadcast(policy, std::span(x), m - 1);
    expect.add(rank == m - 1 ? 36 : 0, rank == m - 1 ? 0 : 36);
    int wrong = 0;
    for (int v : x) wrong += v != 42;
    CHECK(wrong == 0);
  }
  {  // empty
    std::span<std::byte> none;
    comm.broadcast(policy, none, 0);
    expect.add(0, 0);
  }
}

template <class Policy, class Comm>
void suite_nonblocking(const Policy& policy, Comm& comm, expected_stats& expect) {
  const int m = comm.size();
  const int rank = comm.rank();
  {  // overlap: a blocking all-reduce runs while the non-blocking one is pending
    std::vector<float> a(3001);
    std::vector<double> b(513);
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = suite_value<float>(rank, i);
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = suite_value<double>(rank, i);
    auto request = comm.iallreduce_sum(policy, std::span(a));
    comm.allreduce_sum(policy, std::span(b));
    expect.add(b.size() * sizeof(double), b.size() * sizeof(double));
    request.wait();
    expect.add(a.size() * sizeof(float), a.size() * sizeof(float));
    CHECK(request.test());  // a completed request stays complete
    int wrong = 0;
    for (std::size_t i = 0; i < a.size(); ++i) wrong += !same_bits(a[i], rank_ordered_sum<float>(m, i));
    for (std::size_t i = 0; i < b.size(); ++i)
      wrong += !same_bits(b[i], rank_ordered_sum<double>(m, i));
    CHECK(wrong == 0);
  }
  {  // several outstanding, completed out of order, one of them polled and moved
    std::vector<int> x(100, rank + 1);
    std::vector<double> y(50);
    for (std::size_t i = 0; i < y.size(); ++i) y[i] = suite_value<double>(rank, i);
    std::vector<float> none;
    auto rx = comm.iallreduce_sum(policy, std::span(x));
    auto ry = comm.iallreduce_sum(policy, std::span(y));
    auto rz = comm.iallreduce_sum(policy, std::span(none));
    auto moved = std::move(ry);
    rz.wait();
    expect.add(0, 0);
    while (!moved.test()) std::this_thread::yield();
    expect.add(y.size() * sizeof(double), y.size() * sizeof(double));
    rx.wait();
    expect.add(x.size() * sizeof(int), x.size() * sizeof(int));
    int wrong = 0;
    for (int v : x) wrong += v != m * (m + 1) / 2;
    for (std::size_t i = 0; i < y.size(); ++i)
      wrong += !same_bits(y[i], rank_ordered_sum<double>(m, i));
    CHECK(wrong == 0);
  }
  {  // a default request is already complete
    decltype(comm.iallreduce_sum(policy, std::span<float>())) idle;
    CHECK(idle.test());
    idle.wait();
  }
}

template <class Comm>
void suite_barrier(Comm& comm, expected_stats& expect) {
  for (int k = 0; k < 3; ++k) {
    comm.barrier();
    expect.add(0, 0);
  }
}

/// Runs every check on this rank; every rank of the group must call it.
template <class Policy, class Comm>
void run_comm_suite(const Policy& policy, Comm& comm) {
  INFO("rank ", comm.rank(), " of ", comm.size());
  expected_stats expect{comm.stats(), comm.size()};  // the counts may not start at 0
  suite_ranks(policy, comm, expect);
  CHECK(comm.stats() == expect.value);
  suite_allreduce(policy, comm, expect);
  CHECK(comm.stats() == expect.value);
  suite_allgather(policy, comm, expect);
  CHECK(comm.stats() == expect.value);
  suite_allgatherv(policy, comm, expect);
  CHECK(comm.stats() == expect.value);
  suite_broadcast(policy, comm, expect);
  CHECK(comm.stats() == expect.value);
  suite_barrier(comm, expect);
  CHECK(comm.stats() == expect.value);
  suite_nonblocking(policy, comm, expect);
  CHECK(comm.stats() == expect.value);
}

}  // namespace gcomp::test
