// run_comm_suite: checks every collective of a communicator against independent oracles, on every rank.
//
// It uses only the communicator's member functions, so the same suite runs
// over inproc_comm, the MPI communicator and the NCCL one. Call it on every
// rank at once. Two switches adapt it to a transport: suite_options says
// whether floating-point sums must be rank-ordered bit for bit (inproc, MPI's
// rank_ordered mode) or may be summed in any order (MPI_Allreduce, NCCL:
// then within the reordering bound), and a Memory type places the buffers
// where the policy expects them (host vectors as they are by default; the
// NCCL test supplies device copies). doctest 2.4.9 assertions may be used from several threads
// (its counters are atomic and its reporters locked); the suite still checks
// counts of mismatches rather than single elements, so that a failure prints
// one line per rank instead of a million.
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
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

/// How the suite adapts to a transport.
struct suite_options {
  /// Floating-point sums must equal the rank-ordered sum bit for bit; when
  /// false they must lie within the bound of any summation order (see
  /// sum_matches) and integer sums stay exact.
  bool exact_order = true;
  /// Elements of the large all-reduce case (a transport that splits buffers
  /// into small pieces for a test may lower it to keep the test quick).
  std::size_t large = std::size_t{1} << 20;
};

// Whether x is the sum of suite_value<T>(r, i) over r < size: bit for bit in
// rank order, or within the error bound of any order of m - 1 additions,
// (m - 1) * eps * sum |x_r| (each partial sum is at most sum |x_r|).
template <class T>
bool sum_matches(T x, int size, std::size_t i, bool exact_order) {
  const T ordered = rank_ordered_sum<T>(size, i);
  if (exact_order) return same_bits(x, ordered);
  double magnitude = 0;
  for (int r = 0; r < size; ++r) magnitude += std::fabs(static_cast<double>(suite_value<T>(r, i)));
  const double bound = (size - 1) * static_cast<double>(std::numeric_limits<T>::epsilon()) * magnitude;
  return std::fabs(static_cast<double>(x) - static_cast<double>(ordered)) <= 2 * bound;
}

/// The default Memory: the policy reads host memory, so the suite's vectors
/// are handed over as they are.
struct host_buffers {
  template <class T>
  std::span<T> place(std::vector<T>& host) {
    return std::span<T>(host);
  }
  template <class T>
  void fetch(std::span<T>, std::vector<T>&) {}
};

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

// What every part of the suite gets.
template <class Policy, class Comm, class Memory>
struct suite_context {
  const Policy& policy;
  Comm& comm;
  expected_stats& expect;
  const suite_options& options;
  Memory& memory;

  int size() const { return comm.size(); }
  int rank() const { return comm.rank(); }

  // Blocking collectives on a host vector, through the Memory.
  template <class T>
  void allreduce(std::vector<T>& x) {
    auto placed = memory.place(x);
    comm.allreduce_sum(policy, placed);
    memory.fetch(placed, x);
  }
  template <class T>
  void broadcast(std::vector<T>& x, int root) {
    auto placed = memory.place(x);
    comm.broadcast(policy, placed, root);
    memory.fetch(placed, x);
  }
  void allgather(std::vector<std::byte>& in, std::vector<std::byte>& out) {
    auto placed_in = memory.place(in);
    auto placed_out = memory.place(out);
    comm.allgather(policy, std::span<const std::byte>(placed_in), placed_out);
    memory.fetch(placed_out, out);
  }
};

template <class X>
void suite_ranks(X& ctx) {
  const int m = ctx.size();
  const int rank = ctx.rank();
  REQUIRE(m >= 1);
  REQUIRE(rank >= 0);
  REQUIRE(rank < m);
  // Gathering every rank's number shows that the ranks are distinct and ordered.
  std::vector<std::int32_t> mine(1, rank);
  std::vector<std::int32_t> all(static_cast<std::size_t>(m), -1);
  auto in = ctx.memory.place(mine);
  auto out = ctx.memory.place(all);
  ctx.comm.allgather(ctx.policy, std::span<const std::byte>(std::as_bytes(in)),
                     std::as_writable_bytes(out));
  ctx.memory.fetch(out, all);
  ctx.expect.add(sizeof(std::int32_t), (m - 1) * sizeof(std::int32_t));
  int wrong = 0;
  for (int j = 0; j < m; ++j) wrong += all[static_cast<std::size_t>(j)] != j;
  CHECK(wrong == 0);
}

template <class X>
void suite_allreduce(X& ctx) {
  const int m = ctx.size();
  const int rank = ctx.rank();
  const double triangle = m * (m + 1) / 2.0;

  {  // closed form: sum_r (r + 1) * i, exact in double in any order
    std::vector<double> x(1000);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = (rank + 1) * static_cast<double>(i);
    ctx.allreduce(x);
    ctx.expect.add(x.size() * sizeof(double), x.size() * sizeof(double));
    int wrong = 0;
    for (std::size_t i = 0; i < x.size(); ++i) wrong += x[i] != triangle * static_cast<double>(i);
    CHECK(wrong == 0);
  }
  {  // int: sum_r (1000 r + i) = m i + 1000 m (m - 1) / 2
    std::vector<int> x(777);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = 1000 * rank + static_cast<int>(i);
    ctx.allreduce(x);
    ctx.expect.add(x.size() * sizeof(int), x.size() * sizeof(int));
    int wrong = 0;
    for (std::size_t i = 0; i < x.size(); ++i)
      wrong += x[i] != m * static_cast<int>(i) + 1000 * m * (m - 1) / 2;
    CHECK(wrong == 0);
  }
  {  // 64-bit integers beyond 32 bits
    std::vector<std::int64_t> x(65, std::int64_t{1} << 40);
    x[0] = rank;
    ctx.allreduce(x);
    ctx.expect.add(x.size() * 8, x.size() * 8);
    CHECK(x[0] == static_cast<std::int64_t>(m) * (m - 1) / 2);
    CHECK(x[64] == static_cast<std::int64_t>(m) << 40);
  }
  // Values at scales far apart, so the order of summation shows; 4099 is odd
  // so chunks are uneven. Rank-ordered bit for bit, or within the bound.
  auto mixed = [&]<class T>(std::type_identity<T>) {
    std::vector<T> x(4099);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = suite_value<T>(rank, i);
    ctx.allreduce(x);
    ctx.expect.add(x.size() * sizeof(T), x.size() * sizeof(T));
    int wrong = 0;
    for (std::size_t i = 0; i < x.size(); ++i)
      wrong += !sum_matches(x[i], m, i, ctx.options.exact_order);
    CHECK(wrong == 0);
  };
  mixed(std::type_identity<float>{});
  mixed(std::type_identity<double>{});
  {  // empty buffer: still a collective
    std::vector<float> none;
    ctx.allreduce(none);
    ctx.expect.add(0, 0);
  }
  {  // one element
    std::vector<float> one(1, static_cast<float>(rank + 1));
    ctx.allreduce(one);
    ctx.expect.add(sizeof(float), sizeof(float));
    CHECK(one[0] == static_cast<float>(triangle));
  }
  {  // a large buffer; integer-valued floats keep the oracle closed-form in any order
    std::vector<float> x(ctx.options.large);
    for (std::size_t i = 0; i < x.size(); ++i)
      x[i] = static_cast<float>(rank + 1) * static_cast<float>(i % 4096);
    ctx.allreduce(x);
    ctx.expect.add(x.size() * sizeof(float), x.size() * sizeof(float));
    std::size_t wrong = 0;
    for (std::size_t i = 0; i < x.size(); ++i)
      wrong += x[i] != static_cast<float>(triangle) * static_cast<float>(i % 4096);
    CHECK(wrong == 0);
  }
}

template <class X>
void suite_allgather(X& ctx) {
  const int m = ctx.size();
  const int rank = ctx.rank();
  for (std::size_t n : {std::size_t{5}, std::size_t{3001}}) {
    CAPTURE(n);
    std::vector<std::byte> in(n);
    for (std::size_t k = 0; k < n; ++k) in[k] = pattern_byte(rank, k);
    std::vector<std::byte> out(static_cast<std::size_t>(m) * n, std::byte{0xee});
    ctx.allgather(in, out);
    ctx.expect.add(n, (m - 1) * n);
    int wrong = 0;
    for (int j = 0; j < m; ++j)
      for (std::size_t k = 0; k < n; ++k)
        wrong += out[static_cast<std::size_t>(j) * n + k] != pattern_byte(j, k);
    CHECK(wrong == 0);
  }

  // Nothing to gather is still a collective.
  std::vector<std::byte> none;
  ctx.allgather(none, none);
  ctx.expect.add(0, 0);
}

template <class X>
void suite_allgatherv(X& ctx) {
  const int m = ctx.size();
  const int rank = ctx.rank();
  std::vector<std::byte> out;
  std::vector<std::size_t> counts(static_cast<std::size_t>(m), 12345);
  const std::byte* first_storage = nullptr;

  // Rank r sends bytes(r) bytes; the oracle rebuilds everything from the formula.
  auto gather = [&](auto bytes, const char* label) {
    INFO("allgatherv case: ", label, ", rank ", rank, " of ", m);
    std::vector<std::byte> in(bytes(rank));
    for (std::size_t k = 0; k < in.size(); ++k) in[k] = pattern_byte(rank, k);
    auto placed = ctx.memory.place(in);
    ctx.comm.allgatherv(ctx.policy, std::span<const std::byte>(placed), out, std::span(counts));
    std::size_t total = 0;
    for (int j = 0; j < m; ++j) total += bytes(j);
    ctx.expect.add(in.size(), total - in.size());
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
  auto large = [](int r) { return static_cast<std::size_t>(r) * 1000 + 2001; };
  auto uneven = [](int r) { return static_cast<std::size_t>(r) * 3 + 1; };
  auto rank0_empty = [](int r) { return static_cast<std::size_t>(r) * 2; };
  auto all_empty = [](int) { return std::size_t{0}; };
  gather(large, "r*1000+2001 bytes");
  first_storage = out.data();
  // Smaller or equal totals reuse the storage: no allocation once large enough.
  gather(uneven, "r*3+1 bytes");
  CHECK(out.data() == first_storage);
  gather(uneven, "r*3+1 bytes again");
  CHECK(out.data() == first_storage);
  gather(rank0_empty, "r*2 bytes, rank 0 sends none");
  CHECK(out.data() == first_storage);
  gather(all_empty, "nobody sends anything");
  CHECK(out.empty());
}

template <class X>
void suite_broadcast(X& ctx) {
  const int m = ctx.size();
  const int rank = ctx.rank();
  for (int root = 0; root < m; ++root) {
    std::vector<double> x(17, -1.0);
    if (rank == root)
      for (std::size_t i = 0; i < x.size(); ++i) x[i] = suite_value<double>(root, i);
    ctx.broadcast(x, root);
    const std::uint64_t bytes = x.size() * sizeof(double);
    ctx.expect.add(rank == root ? bytes : 0, rank == root ? 0 : bytes);
    int wrong = 0;
    for (std::size_t i = 0; i < x.size(); ++i)
      wrong += !same_bits(x[i], suite_value<double>(root, i));
    CHECK(wrong == 0);
  }
  {  // int from the last rank
    std::vector<int> x(9, rank == m - 1 ? 42 : rank);
    ctx.broadcast(x, m - 1);
    ctx.expect.add(rank == m - 1 ? 36 : 0, rank == m - 1 ? 0 : 36);
    int wrong = 0;
    for (int v : x) wrong += v != 42;
    CHECK(wrong == 0);
  }
  {  // larger floats from the middle rank
    const int root = m / 2;
    std::vector<float> x(10007, 0.0f);
    if (rank == root)
      for (std::size_t i = 0; i < x.size(); ++i) x[i] = suite_value<float>(root, i);
    ctx.broadcast(x, root);
    const std::uint64_t bytes = x.size() * sizeof(float);
    ctx.expect.add(rank == root ? bytes : 0, rank == root ? 0 : bytes);
    int wrong = 0;
    for (std::size_t i = 0; i < x.size(); ++i) wrong += !same_bits(x[i], suite_value<float>(root, i));
    CHECK(wrong == 0);
  }
  {  // empty
    std::vector<std::byte> none;
    ctx.broadcast(none, 0);
    ctx.expect.add(0, 0);
  }
}

template <class X>
void suite_nonblocking(X& ctx) {
  const int m = ctx.size();
  const int rank = ctx.rank();
  const bool exact = ctx.options.exact_order;
  auto& memory = ctx.memory;
  {  // overlap: a blocking all-reduce runs while the non-blocking one is pending
    std::vector<float> a(3001);
    std::vector<double> b(513);
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = suite_value<float>(rank, i);
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = suite_value<double>(rank, i);
    auto pa = memory.place(a);
    auto request = ctx.comm.iallreduce_sum(ctx.policy, pa);
    ctx.allreduce(b);
    ctx.expect.add(b.size() * sizeof(double), b.size() * sizeof(double));
    request.wait();
    ctx.expect.add(a.size() * sizeof(float), a.size() * sizeof(float));
    CHECK(request.test());  // a completed request stays complete
    request.wait();         // and waiting again returns at once
    memory.fetch(pa, a);
    int wrong = 0;
    for (std::size_t i = 0; i < a.size(); ++i) wrong += !sum_matches(a[i], m, i, exact);
    for (std::size_t i = 0; i < b.size(); ++i) wrong += !sum_matches(b[i], m, i, exact);
    CHECK(wrong == 0);
  }
  {  // several outstanding, completed out of order, one of them polled and moved
    std::vector<int> x(100, rank + 1);
    std::vector<double> y(50);
    for (std::size_t i = 0; i < y.size(); ++i) y[i] = suite_value<double>(rank, i);
    std::vector<float> none;
    std::vector<float> big(ctx.options.large / 4 + 3);
    for (std::size_t i = 0; i < big.size(); ++i)
      big[i] = static_cast<float>(rank + 1) * static_cast<float>(i % 1024);
    auto px = memory.place(x);
    auto py = memory.place(y);
    auto pnone = memory.place(none);
    auto pbig = memory.place(big);
    auto rx = ctx.comm.iallreduce_sum(ctx.policy, px);
    auto ry = ctx.comm.iallreduce_sum(ctx.policy, py);
    auto rz = ctx.comm.iallreduce_sum(ctx.policy, pnone);
    auto rbig = ctx.comm.iallreduce_sum(ctx.policy, pbig);
    auto moved = std::move(ry);
    rz.wait();
    ctx.expect.add(0, 0);
    while (!moved.test()) std::this_thread::yield();
    ctx.expect.add(y.size() * sizeof(double), y.size() * sizeof(double));
    rx.wait();
    ctx.expect.add(x.size() * sizeof(int), x.size() * sizeof(int));
    {  // a request destroyed while pending waits in its destructor, and counts
      auto dropped = std::move(rbig);
    }
    ctx.expect.add(big.size() * sizeof(float), big.size() * sizeof(float));
    memory.fetch(px, x);
    memory.fetch(py, y);
    memory.fetch(pbig, big);
    int wrong = 0;
    for (int v : x) wrong += v != m * (m + 1) / 2;
    for (std::size_t i = 0; i < y.size(); ++i) wrong += !sum_matches(y[i], m, i, exact);
    for (std::size_t i = 0; i < big.size(); ++i)
      wrong += big[i] != static_cast<float>(m * (m + 1) / 2) * static_cast<float>(i % 1024);
    CHECK(wrong == 0);
  }
  {  // a request moved onto a pending one waits for the pending one first
    std::vector<double> p(33, rank + 0.5), q(33, 2.0 * rank);
    auto pp = memory.place(p);
    auto pq = memory.place(q);
    auto first = ctx.comm.iallreduce_sum(ctx.policy, pp);
    auto second = ctx.comm.iallreduce_sum(ctx.policy, pq);
    first = std::move(second);
    ctx.expect.add(p.size() * sizeof(double), p.size() * sizeof(double));
    CHECK(ctx.comm.stats() == ctx.expect.value);
    first.wait();
    ctx.expect.add(q.size() * sizeof(double), q.size() * sizeof(double));
    memory.fetch(pp, p);
    memory.fetch(pq, q);
    int wrong = 0;
    for (double v : p) wrong += v != m * m / 2.0;
    for (double v : q) wrong += v != static_cast<double>(m * (m - 1));
    CHECK(wrong == 0);
  }
  {  // a default request is already complete
    decltype(ctx.comm.iallreduce_sum(ctx.policy, std::span<float>())) idle;
    CHECK(idle.test());
    idle.wait();
  }
}

template <class X>
void suite_barrier(X& ctx) {
  for (int k = 0; k < 3; ++k) {
    ctx.comm.barrier();
    ctx.expect.add(0, 0);
  }
}

/// Runs every check on this rank; every rank of the group must call it.
template <class Policy, class Comm, class Memory = host_buffers>
void run_comm_suite(const Policy& policy, Comm& comm, const suite_options& options = {},
                    Memory memory = {}) {
  INFO("rank ", comm.rank(), " of ", comm.size());
  expected_stats expect{comm.stats(), comm.size()};  // the counts may not start at 0
  suite_context<Policy, Comm, Memory> ctx{policy, comm, expect, options, memory};
  suite_ranks(ctx);
  CHECK(comm.stats() == expect.value);
  suite_allreduce(ctx);
  CHECK(comm.stats() == expect.value);
  suite_allgather(ctx);
  CHECK(comm.stats() == expect.value);
  suite_allgatherv(ctx);
  CHECK(comm.stats() == expect.value);
  suite_broadcast(ctx);
  CHECK(comm.stats() == expect.value);
  suite_barrier(ctx);
  CHECK(comm.stats() == expect.value);
  suite_nonblocking(ctx);
  CHECK(comm.stats() == expect.value);
}

}  // namespace gcomp::test
