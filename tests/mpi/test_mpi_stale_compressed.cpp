// Over MPI: 4 ranks run the asynchronous aggregated (parameter-server) form with QSGD, refresh period 2 and random delays, and reproduce the in-process run bit for bit.
#include <doctest/doctest.h>
#include <mpi.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "gcomp/algo/stale_compressed.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/comm/mpi.hpp"

namespace {

constexpr int workers = 4;
constexpr std::size_t dims = 24;
constexpr std::uint64_t steps = 300;

// f_m(x) = 1/2 sum_j h_mj (x_j - x*_j)^2: every worker's own curvatures,
// one common minimizer, so the compressed messages vanish at x*.
double curvature(int m, std::size_t j) { return 0.5 + 0.5 * std::fabs(std::sin(double(j) + 1.7 * m)); }
double optimum(std::size_t j) { return 1.0 + 0.1 * double(j); }

struct run_result {
  std::vector<std::vector<double>> x;  // x_1 .. x_steps
  gcomp::comm_stats stats;
  std::uint64_t uploads = 0;
};

template <class Comm>
run_result run_worker(Comm& comm) {
  const int me = comm.rank();
  // L of f = sum f_m is at most 4 * 1.0; QSGD s = 7 with buckets of 8.
  const gcomp::qsgd_options qo{.levels = 7, .bucket = 8};
  gcomp::stale_options options{.gamma = 1.0,
                               .delay = {.max_delay = 3, .kind = gcomp::delay_kind::uniform, .seed = 21},
                               .seed = 4,
                               .period = 2};
  options.gamma = gcomp::stale_step_size(gcomp::variance_bound(qo, dims), 4.0,
                                         options.delay.max_delay + options.period - 1);
  gcomp::stale_parameter_server ps(gcomp::qsgd<double>(qo), options);
  std::vector<double> x(dims, 0.0);
  run_result out;
  for (std::uint64_t k = 0; k < steps; ++k) {
    ps.step(gcomp::host_seq{}, comm, std::span<double>(x),
            [me](std::span<const double> model, std::uint64_t, std::span<double> g) {
              for (std::size_t j = 0; j < dims; ++j) g[j] = curvature(me, j) * (model[j] - optimum(j));
            });
    out.x.push_back(x);
  }
  out.stats = comm.stats();
  out.uploads = ps.uploads();
  return out;
}

}  // namespace

TEST_CASE("mpi: the parameter-server form on 4 ranks reproduces the in-process run bit for bit") {
  gcomp::mpi_comm comm(MPI_COMM_WORLD);
  REQUIRE(comm.size() == workers);
  std::vector<run_result> expected(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& c) { expected[std::size_t(c.rank())] = run_worker(c); });
  for (int m = 1; m < workers; ++m) REQUIRE(expected[std::size_t(m)].x == expected[0].x);

  const run_result got = run_worker(comm);
  const auto& mine = expected[std::size_t(comm.rank())];
  int differing_steps = 0;
  for (std::size_t k = 0; k < steps; ++k)
    differing_steps += std::memcmp(got.x[k].data(), mine.x[k].data(), dims * sizeof(double)) != 0;
  CHECK(differing_steps == 0);
  // The same messages on the wire as the in-process worker of this rank.
  CHECK(got.stats.bytes_sent == mine.stats.bytes_sent);
  CHECK(got.stats.bytes_received == mine.stats.bytes_received);
  CHECK(got.uploads == mine.uploads);

  // Every rank ends with rank 0's bits, and near x*.
  std::vector<double> root = got.x.back();
  comm.broadcast(gcomp::host_seq{}, std::span<double>(root), 0);
  int same = std::memcmp(root.data(), got.x.back().data(), dims * sizeof(double)) == 0;
  MPI_Allreduce(MPI_IN_PLACE, &same, 1, MPI_INT, MPI_MIN, comm.native());
  CHECK(same == 1);
  double err = 0, norm = 0;
  for (std::size_t j = 0; j < dims; ++j) {
    err += (root[j] - optimum(j)) * (root[j] - optimum(j));
    norm += optimum(j) * optimum(j);
  }
  INFO("relative error after " << steps << " steps: " << std::sqrt(err / norm));
  CHECK(std::sqrt(err / norm) < 1e-10);
}
