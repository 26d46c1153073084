// SASG and LAG over MPI: 4 ranks reproduce the in-process run bit for bit, with the same uploads and skips and bytes.
#include <doctest/doctest.h>
#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "gcomp/algo/sasg.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/comm/mpi.hpp"
#include "least_squares.hpp"

using namespace gcomp::test::least_squares;

namespace {

const gcomp::layout model{{"w", 16}, {"b", 4}};

struct worker_record {
  trajectory x;                        // x after every step
  std::vector<char> uploaded;          // this worker's decision per step
  std::vector<std::uint64_t> uploads;  // every worker's uploads, as this worker counted them
  std::vector<std::uint64_t> skips;
  gcomp::comm_stats stats;
};

// One worker training with `method` (SASG in the same-minibatch form on
// mini-batches, or LAG in the last-uploaded form on its full shard).
template <class Method, class Comm>
worker_record train(const problem& p, Comm& comm, Method method, int steps) {
  const bool full = method.options().form == gcomp::lazy_rule_form::last_uploaded;
  worker_record record;
  std::vector<double> x(dims, 0.0), g(dims);
  for (int t = 0; t < steps; ++t) {
    std::vector<std::size_t> rows;
    for (std::size_t k = 0; k < (full ? rows_per_worker : batch); ++k)
      rows.push_back(full ? std::size_t(comm.rank()) * rows_per_worker + k : batch_row(comm.rank(), t, k));
    add_gradient(p, rows, x.data(), g.data());
    const auto at_upload_point = [&](std::span<const double> at, std::span<double> out) {
      add_gradient(p, rows, at.data(), out.data());
    };
    const bool up = full ? method.step(gcomp::host_seq{}, comm, std::span<double>(x), std::span<const double>(g))
                         : method.step(gcomp::host_seq{}, comm, std::span<double>(x),
                                       std::span<const double>(g), at_upload_point);
    record.uploaded.push_back(up);
    record.x.push_back(x);
  }
  for (int r = 0; r < comm.size(); ++r) {
    record.uploads.push_back(method.aggregator().uploads(r));
    record.skips.push_back(method.aggregator().skips(r));
  }
  record.stats = comm.stats();
  return record;
}

template <class Method>
void check_mpi_matches_inproc(const Method& method, int steps) {
  gcomp::mpi_comm comm(MPI_COMM_WORLD);
  REQUIRE(comm.size() == workers);  // one shard per worker
  const problem p = make_problem(2024);
  std::vector<worker_record> expected(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& c) { expected[std::size_t(c.rank())] = train(p, c, method, steps); });

  const worker_record got = train(p, comm, method, steps);
  const worker_record& want = expected[std::size_t(comm.rank())];
  int differing_steps = 0;
  for (int t = 0; t < steps; ++t) differing_steps += got.x[std::size_t(t)] != want.x[std::size_t(t)];
  CHECK(differing_steps == 0);  // bitwise: messages travel as bytes and are added in rank order
  CHECK(got.uploaded == want.uploaded);
  CHECK(got.uploads == want.uploads);
  CHECK(got.skips == want.skips);
  CHECK(got.stats == want.stats);  // the same bytes under the accounting rule
  std::uint64_t skipped = 0;
  for (std::uint64_t s : got.skips) skipped += s;
  CHECK(skipped > 0);

  // Every rank counted the same uploads and holds the same final parameters.
  std::vector<std::uint64_t> root = got.uploads;
  std::vector<double> x = got.x.back();
  comm.broadcast(gcomp::host_seq{}, std::span(root), 0);
  comm.broadcast(gcomp::host_seq{}, std::span(x), 0);
  int same = root == got.uploads && x == got.x.back();
  MPI_Allreduce(MPI_IN_PLACE, &same, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  CHECK(same == 1);
}

}  // namespace

TEST_CASE("mpi: SASG (same-minibatch rule) on 4 ranks equals the in-process run, skips included") {
  check_mpi_matches_inproc(
      gcomp::sasg<double>({.ratio = 0.25, .descent = {.alpha = 0.01, .history = 10}}, model), 300);
}

TEST_CASE("mpi: LAG (last-uploaded rule, full local gradients) on 4 ranks equals the in-process run") {
  check_mpi_matches_inproc(
      gcomp::lag<double>({.alpha = 0.01, .history = 10, .form = gcomp::lazy_rule_form::last_uploaded},
                         model),
      300);
}
