// Tests of comm/mpi.hpp under mpiexec: the shared communicator suite in both summation modes, split pieces, checks across ranks, errors.
#include "gcomp/comm/mpi.hpp"

#include <doctest/doctest.h>
#include <mpi.h>

#include <cstddef>
#include <cstring>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "comm_suite.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/exec/host.hpp"

namespace {

using gcomp::host_seq;
using gcomp::mpi_comm;
using gcomp::mpi_options;
using gcomp::mpi_summation;

static_assert(gcomp::communicator<mpi_comm, host_seq, float>);
static_assert(gcomp::communicator<mpi_comm, host_seq, double>);
static_assert(gcomp::communicator<mpi_comm, gcomp::host_par, int>);
static_assert(gcomp::collective_request<gcomp::mpi_request>);

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int m = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &m);
  return m;
}

// Runs f(comm) and returns gcomp::error's message ("" if none was thrown).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const gcomp::error& e) {
    return e.what();
  }
  return {};
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// Whether every rank of `comm` reports true.
bool everyone(bool mine) {
  int all = mine ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return all == 1;
}

}  // namespace

TEST_CASE("mpi: the suite passes with native summation (any order, within the bound)") {
  mpi_comm comm(MPI_COMM_WORLD);
  CHECK(comm.size() == world_size());
  CHECK(comm.rank() == world_rank());
  // Twice: the second pass starts from non-zero counters.
  for (int pass = 0; pass < 2; ++pass)
    gcomp::test::run_comm_suite(host_seq{}, comm, {.exact_order = false});
}

TEST_CASE("mpi: the suite passes with rank_ordered summation, bit for bit as inproc") {
  mpi_comm comm(MPI_COMM_WORLD, {.summation = mpi_summation::rank_ordered});
  gcomp::test::run_comm_suite(host_seq{}, comm, {.exact_order = true});
  gcomp::test::run_comm_suite(gcomp::host_par(2), comm, {.exact_order = true});
}

TEST_CASE("mpi: the suite passes without the checks across ranks") {
  mpi_comm comm(MPI_COMM_WORLD, {.check_across_ranks = false});
  gcomp::test::run_comm_suite(host_seq{}, comm, {.exact_order = false});
}

TEST_CASE("mpi: every operation split into pieces of at most max_count elements") {
  // 7 is below every buffer of the suite and odd, so byte-wise pieces cut
  // elements in two and allgather(v) take the per-rank broadcast path.
  for (auto summation : {mpi_summation::native, mpi_summation::rank_ordered}) {
    CAPTURE(static_cast<int>(summation));
    mpi_comm comm(MPI_COMM_WORLD, {.summation = summation, .max_count = 7});
    gcomp::test::run_comm_suite(host_seq{}, comm,
                                {.exact_order = summation == mpi_summation::rank_ordered,
                                 .large = 3001});
  }
  // A moderate case with a larger limit: 2^20 floats in 3 uneven pieces.
  mpi_comm comm(MPI_COMM_WORLD, {.summation = mpi_summation::rank_ordered, .max_count = 400000});
  gcomp::test::run_comm_suite(host_seq{}, comm);
}

TEST_CASE("mpi: the suite passes on MPI_COMM_SELF (one rank: no bytes counted) and on a split") {
  mpi_comm self(MPI_COMM_SELF, {.summation = mpi_summation::rank_ordered});
  CHECK(self.size() == 1);
  gcomp::test::run_comm_suite(host_seq{}, self);
  CHECK(self.stats().bytes_sent == 0);
  CHECK(self.stats().bytes_received == 0);

  // Even and odd ranks of the world as two groups, reversed in rank order.
  MPI_Comm half = MPI_COMM_NULL;
  REQUIRE(MPI_Comm_split(MPI_COMM_WORLD, world_rank() % 2, -world_rank(), &half) == MPI_SUCCESS);
  {
    mpi_comm comm(half, {.summation = mpi_summation::rank_ordered});
    CHECK(comm.size() == (world_size() + 1 - world_rank() % 2) / 2);
    gcomp::test::run_comm_suite(host_seq{}, comm);
  }
  MPI_Comm_free(&half);
}

TEST_CASE("mpi: native sums are the same on every rank") {
  // Parameters that drift apart bit by bit would split the replicas of a
  // model: check that every rank holds the very same bits.
  mpi_comm comm(MPI_COMM_WORLD);
  std::vector<float> x(100003);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = gcomp::test::suite_value<float>(comm.rank(), i);
  comm.allreduce_sum(host_seq{}, std::span(x));
  std::vector<float> root_copy = x;
  comm.broadcast(host_seq{}, std::span(root_copy), 0);
  CHECK(std::memcmp(x.data(), root_copy.data(), x.size() * sizeof(float)) == 0);
}

TEST_CASE("mpi: a pending request survives moving its communicator") {
  mpi_comm first(MPI_COMM_WORLD);
  std::vector<int> x(10, 1);
  auto request = first.iallreduce_sum(host_seq{}, std::span(x));
  mpi_comm moved = std::move(first);
  request.wait();
  CHECK(x == std::vector<int>(10, moved.size()));
  CHECK(moved.stats().collectives == 1);
}

TEST_CASE("mpi: mismatched arguments make every rank throw, and the communicator goes on") {
  mpi_comm comm(MPI_COMM_WORLD);
  const int r = comm.rank();
  const int m = comm.size();
  REQUIRE(m >= 2);
  const gcomp::comm_stats before = comm.stats();
  std::vector<int> x(4, r);
  const auto unchanged = x;

  auto recovered = [&] {  // the ranks are still matched: a correct call works
    std::vector<int> y(3, 1);
    comm.allreduce_sum(host_seq{}, std::span(y));
    return y == std::vector<int>(3, m);
  };

  std::string message = error_of([&] { comm.broadcast(host_seq{}, std::span(x), r == 1 ? 1 : 0); });
  CHECK(message ==
        "gcomp::mpi_comm::broadcast: root is between 0 and 1 across ranks; every rank must pass "
        "the same root");
  CHECK(x == unchanged);

  std::vector<int> longer(r == m - 1 ? 9 : 8, 1);
  message = error_of([&] { comm.allreduce_sum(host_seq{}, std::span(longer)); });
  CHECK(message ==
        "gcomp::mpi_comm::allreduce_sum: data has between 8 and 9 elements across ranks; every "
        "rank must pass the same size");

  message = error_of([&] {
    if (r == 0) {
      std::vector<float> f(4, 1.0f);
      comm.allreduce_sum(host_seq{}, std::span(f));
    } else {
      std::vector<double> d(4, 1.0);
      comm.allreduce_sum(host_seq{}, std::span(d));
    }
  });
  CHECK(message ==
        "gcomp::mpi_comm::allreduce_sum: data holds float on some ranks but double on others; "
        "every rank must pass the same element type");

  message = error_of([&] {
    if (r == 0) {
      comm.barrier();
    } else {
      std::vector<std::byte> in(2), out(2 * static_cast<std::size_t>(m));
      comm.allgather(host_seq{}, std::span<const std::byte>(in), std::span(out));
    }
  });
  CHECK(contains(message, "ranks called different collectives (allgather and barrier)"));
  CHECK(everyone(!message.empty()));

  CHECK(recovered());
  CHECK(comm.stats() == before + gcomp::comm_stats{12, 12, 1});  // only the recovery counted
}

TEST_CASE("mpi: a bad argument on one rank makes that rank explain and the others throw") {
  mpi_comm comm(MPI_COMM_WORLD);
  const int r = comm.rank();
  const int m = comm.size();
  const int bad = m - 1;

  std::vector<double> x(5, 1.0);
  std::string message =
      error_of([&] { comm.broadcast(host_seq{}, std::span(x), r == bad ? m : 0); });
  if (r == bad)
    CHECK(message == gcomp::detail::concat("gcomp::mpi_comm::broadcast: root is ", m, " on rank ",
                                           bad, " but must be in [0, ", m, ")"));
  else
    CHECK(message == gcomp::detail::concat("gcomp::mpi_comm::broadcast: rank ", bad,
                                           " rejected its arguments (it reports why); no data "
                                           "was exchanged"));

  std::vector<std::byte> in(3, std::byte{1});
  std::vector<std::byte> out(3 * static_cast<std::size_t>(m) + (r == bad ? 1 : 0), std::byte{7});
  message = error_of([&] { comm.allgather(host_seq{}, std::span<const std::byte>(in), std::span(out)); });
  if (r == bad)
    CHECK(contains(message, gcomp::detail::concat("out has ", out.size(), " bytes on rank ", bad,
                                                  " but must have size() * in.size()")));
  else
    CHECK(contains(message, "rejected its arguments"));
  CHECK(out == std::vector<std::byte>(out.size(), std::byte{7}));

  std::vector<std::byte> gathered;
  std::vector<std::size_t> counts(r == bad ? 1 : static_cast<std::size_t>(m));
  message = error_of([&] {
    comm.allgatherv(host_seq{}, std::span<const std::byte>(in), gathered, std::span(counts));
  });
  if (r == bad)
    CHECK(contains(message, gcomp::detail::concat("counts has size 1 on rank ", bad,
                                                  " but must have size() = ", m)));
  else
    CHECK(contains(message, "rejected its arguments"));

  // `in` inside out's storage would dangle once out grows.
  std::vector<std::byte> storage(16, std::byte{2});
  std::span<const std::byte> aliased(in);
  if (r == bad) aliased = std::span<const std::byte>(storage).subspan(0, 3);
  counts.assign(static_cast<std::size_t>(m), 0);
  message = error_of([&] { comm.allgatherv(host_seq{}, aliased, storage, std::span(counts)); });
  CHECK(!message.empty());
  if (r == bad) CHECK(contains(message, "in overlaps the storage of out on rank"));

  CHECK(comm.stats() == gcomp::comm_stats{});  // nothing succeeded, nothing counted
}

TEST_CASE("mpi: without the checks across ranks, a rank's own bad argument still throws before MPI") {
  mpi_comm comm(MPI_COMM_WORLD, {.check_across_ranks = false});
  std::vector<float> x(3, 1.0f);
  // Every rank passes the bad root, so no rank enters MPI_Bcast.
  const std::string message = error_of([&] { comm.broadcast(host_seq{}, std::span(x), -1); });
  CHECK(contains(message, "root is -1 on rank"));
  CHECK(comm.stats().collectives == 0);
}

TEST_CASE("mpi: bad constructor arguments") {
  CHECK_THROWS_WITH_AS(mpi_comm(MPI_COMM_NULL), "gcomp::mpi_comm::mpi_comm: comm is MPI_COMM_NULL",
                       gcomp::error);
  CHECK_THROWS_WITH_AS(mpi_comm(MPI_COMM_WORLD, {.max_count = 0}),
                       doctest::Contains("options.max_count must be in [1, 2147483647], got 0"),
                       gcomp::error);
}

TEST_CASE("mpi: MPI error codes become gcomp::error with MPI's own error string") {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  REQUIRE(MPI_Error_string(MPI_ERR_TRUNCATE, text, &length) == MPI_SUCCESS);
  const std::string expected =
      "gcomp::mpi_comm::allgather: MPI_Allgather of 5 bytes per rank failed: " +
      std::string(text, static_cast<std::size_t>(length));
  CHECK_THROWS_WITH_AS(gcomp::detail::mpi_check(MPI_ERR_TRUNCATE, "gcomp::mpi_comm::allgather",
                                                "MPI_Allgather of ", 5, " bytes per rank"),
                       expected.c_str(), gcomp::error);
  CHECK_NOTHROW(gcomp::detail::mpi_check(MPI_SUCCESS, "unused", "nothing"));

  // The duplicate returns errors instead of aborting, whatever the user's
  // communicator does.
  mpi_comm comm(MPI_COMM_WORLD);
  MPI_Errhandler handler = MPI_ERRHANDLER_NULL;
  REQUIRE(MPI_Comm_get_errhandler(comm.native(), &handler) == MPI_SUCCESS);
  CHECK(handler == MPI_ERRORS_RETURN);
  MPI_Errhandler_free(&handler);
  int same = MPI_UNEQUAL;
  MPI_Comm_compare(comm.native(), MPI_COMM_WORLD, &same);
  CHECK(same == MPI_CONGRUENT);  // same group, a different context: its own duplicate
}
