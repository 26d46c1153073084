// End to end: M = 4 in-process workers train least squares with identity + allreduce + SGD;
// the trajectory equals single-process SGD on the concatenated batch, and the loss converges.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "gcomp/gcomp.hpp"

namespace {

constexpr int workers = 4;
constexpr std::size_t rows_per_worker = 256, batch = 32, dims = 20;

struct problem {
  std::vector<double> a;  // (workers * rows_per_worker) x dims, row-major; worker m owns block m
  std::vector<double> b;
  std::size_t rows() const { return b.size(); }
};

problem make_problem(unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal;
  problem p;
  const std::size_t n = workers * rows_per_worker;
  p.a.resize(n * dims);
  p.b.resize(n);
  std::vector<double> truth(dims);
  for (double& t : truth) t = normal(gen);
  for (std::size_t r = 0; r < n; ++r) {
    double dot = 0;
    for (std::size_t j = 0; j < dims; ++j) {
      // Non-iid shards: each worker's features have their own offset.
      p.a[r * dims + j] = normal(gen) + 0.5 * double(r / rows_per_worker);
      dot += p.a[r * dims + j] * truth[j];
    }
    p.b[r] = dot + 0.01 * normal(gen);
  }
  return p;
}

// Rows of worker m's mini-batch at step t.
std::size_t batch_row(int m, int t, std::size_t k) {
  return std::size_t(m) * rows_per_worker + (std::size_t(t) * batch + k) % rows_per_worker;
}

// g += (1/count) * sum over rows of a_r (a_r . x - b_r), accumulated in T.
template <class T>
void add_gradient(const problem& p, const std::vector<std::size_t>& rows, const T* x, T* g) {
  std::fill(g, g + dims, T(0));
  for (std::size_t r : rows) {
    T residual = -T(p.b[r]);
    for (std::size_t j = 0; j < dims; ++j) residual += T(p.a[r * dims + j]) * x[j];
    for (std::size_t j = 0; j < dims; ++j) g[j] += T(p.a[r * dims + j]) * residual;
  }
  for (std::size_t j = 0; j < dims; ++j) g[j] /= T(rows.size());
}

double loss(const problem& p, const double* x) {
  double total = 0;
  for (std::size_t r = 0; r < p.rows(); ++r) {
    double residual = -p.b[r];
    for (std::size_t j = 0; j < dims; ++j) residual += p.a[r * dims + j] * x[j];
    total += residual * residual;
  }
  return total / (2.0 * double(p.rows()));
}

// The least-squares optimum from the normal equations (Gaussian elimination
// with partial pivoting): the closed-form oracle for the attainable loss.
std::vector<double> least_squares_optimum(const problem& p) {
  std::vector<double> m(dims * (dims + 1), 0.0);
  for (std::size_t r = 0; r < p.rows(); ++r)
    for (std::size_t i = 0; i < dims; ++i) {
      for (std::size_t j = 0; j < dims; ++j) m[i * (dims + 1) + j] += p.a[r * dims + i] * p.a[r * dims + j];
      m[i * (dims + 1) + dims] += p.a[r * dims + i] * p.b[r];
    }
  for (std::size_t c = 0; c < dims; ++c) {
    std::size_t pivot = c;
    for (std::size_t r = c + 1; r < dims; ++r)
      if (std::fabs(m[r * (dims + 1) + c]) > std::fabs(m[pivot * (dims + 1) + c])) pivot = r;
    for (std::size_t j = 0; j <= dims; ++j) std::swap(m[c * (dims + 1) + j], m[pivot * (dims + 1) + j]);
    for (std::size_t r = 0; r < dims; ++r) {
      if (r == c) continue;
      const double f = m[r * (dims + 1) + c] / m[c * (dims + 1) + c];
      for (std::size_t j = c; j <= dims; ++j) m[r * (dims + 1) + j] -= f * m[c * (dims + 1) + j];
    }
  }
  std::vector<double> x(dims);
  for (std::size_t i = 0; i < dims; ++i) x[i] = m[i * (dims + 1) + dims] / m[i * (dims + 1) + i];
  return x;
}

double relative_distance(const std::vector<double>& x, const std::vector<double>& y) {
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    diff += (x[i] - y[i]) * (x[i] - y[i]);
    norm += y[i] * y[i];
  }
  return std::sqrt(diff / norm);
}

}  // namespace

TEST_CASE("4 workers with identity + allreduce + SGD follow single-process SGD on the joint batch") {
  const problem p = make_problem(2024);
  const gcomp::layout lay{{"w", 16}, {"b", 4}};
  const gcomp::sgd_options options{.lr = 0.02, .momentum = 0.9, .weight_decay = 0.0};
  constexpr int steps = 300;

  // Reference: plain momentum SGD, one process, the 4 batches concatenated.
  std::vector<std::vector<double>> reference(steps + 1, std::vector<double>(dims, 0.0));
  {
    std::vector<double> x(dims, 0.0), buf(dims, 0.0), g(dims);
    for (int t = 0; t < steps; ++t) {
      std::vector<std::size_t> rows;
      for (int m = 0; m < workers; ++m)
        for (std::size_t k = 0; k < batch; ++k) rows.push_back(batch_row(m, t, k));
      add_gradient(p, rows, x.data(), g.data());
      for (std::size_t j = 0; j < dims; ++j) {
        buf[j] = t == 0 ? g[j] : options.momentum * buf[j] + g[j];
        x[j] -= options.lr * buf[j];
      }
      reference[t + 1] = x;
    }
  }

  // Distributed: each worker sees only its own shard.
  std::vector<std::vector<std::vector<double>>> trajectory(
      workers, std::vector<std::vector<double>>(steps + 1, std::vector<double>(dims, 0.0)));
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    const int m = comm.rank();
    gcomp::pipeline pipe{gcomp::identity<double>{}, gcomp::allreduce{}, gcomp::sgd<double>{options}};
    std::vector<double> x(dims, 0.0), g(dims);
    for (int t = 0; t < steps; ++t) {
      std::vector<std::size_t> rows;
      for (std::size_t k = 0; k < batch; ++k) rows.push_back(batch_row(m, t, k));
      add_gradient(p, rows, x.data(), g.data());
      pipe.step(gcomp::host_seq{}, comm, lay, std::span<double>(x), std::span<const double>(g));
      trajectory[m][t + 1] = x;
    }
    CHECK(pipe.steps() == std::uint64_t(steps));
  });

  double worst = 0;
  for (int t = 1; t <= steps; ++t) {
    for (int m = 1; m < workers; ++m) REQUIRE(trajectory[m][t] == trajectory[0][t]);  // bitwise
    worst = std::max(worst, relative_distance(trajectory[0][t], reference[t]));
  }
  INFO("worst relative distance to the single-process trajectory: " << worst);
  CHECK(worst < 1e-6);

  // Convergence: the loss ends within 5% of the least-squares optimum's
  // (about 5e-5 for noise of standard deviation 0.01; constant-step SGD keeps
  // a small noise floor above it) and 1e4 times below the start.
  const auto optimum = least_squares_optimum(p);
  const double best = loss(p, optimum.data());
  const double start = loss(p, reference[0].data());
  const double end = loss(p, trajectory[0][steps].data());
  INFO("start " << start << ", end " << end << ", optimum " << best);
  CHECK(best < 1e-4);
  CHECK(end < 1.05 * best);
  CHECK(end < 1e-4 * start);
}

TEST_CASE("float gradients on a host_par pool: workers agree bitwise and the loss falls") {
  const problem p = make_problem(7);
  const gcomp::layout lay{{"w", 16}, {"b", 4}};
  const gcomp::host_par pool(2);
  std::vector<std::vector<float>> final_x(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    gcomp::pipeline pipe{gcomp::identity<float>{}, gcomp::allreduce{},
                         gcomp::sgd<float>{{.lr = 0.02, .momentum = 0.9}}, /*seed=*/5};
    std::vector<float> x(dims, 0.0f), g(dims);
    for (int t = 0; t < 300; ++t) {
      std::vector<std::size_t> rows;
      for (std::size_t k = 0; k < batch; ++k) rows.push_back(batch_row(comm.rank(), t, k));
      add_gradient(p, rows, x.data(), g.data());
      pipe.step(pool, comm, lay, std::span<float>(x), std::span<const float>(g));
    }
    final_x[comm.rank()] = x;
  });
  for (int m = 1; m < workers; ++m) CHECK(final_x[m] == final_x[0]);
  const std::vector<double> x(final_x[0].begin(), final_x[0].end());
  const auto optimum = least_squares_optimum(p);
  CHECK(loss(p, x.data()) < 1.05 * loss(p, optimum.data()));
}

TEST_CASE("pipeline rejects mismatched spans before touching anything") {
  gcomp::inproc_group group(1);
  gcomp::pipeline pipe{gcomp::identity<float>{}, gcomp::allreduce{}, gcomp::sgd<float>{{.lr = 0.1}}};
  const gcomp::layout lay{3, 2};
  std::vector<float> x(5, 1.0f), g4(4, 1.0f), x6(6, 1.0f);
  CHECK_THROWS_WITH_AS(
      pipe.step(gcomp::host_seq{}, group.comm(0), lay, std::span<float>(x), std::span<const float>(g4)),
      "gcomp::pipeline::step: grads has size 4 but params has size 5; they must match", gcomp::error);
  CHECK_THROWS_WITH_AS(
      pipe.step(gcomp::host_seq{}, group.comm(0), lay, std::span<float>(x6), std::span<const float>(x6)),
      "gcomp::pipeline::step: params has size 6 but the layout covers 5 elements; they must match",
      gcomp::error);
  CHECK(x == std::vector<float>(5, 1.0f));
  CHECK(pipe.steps() == 0);

  gcomp::allreduce aggregate;
  gcomp::identity<float> c;
  std::vector<float> global(4);
  CHECK_THROWS_AS(aggregate.aggregate(gcomp::host_seq{}, group.comm(0), c,
                                      std::span<const float>(x), std::span<float>(global), {}),
                  gcomp::error);
}

TEST_CASE("an aggregator object serves one compressor type") {
  gcomp::inproc_group group(1);
  gcomp::allreduce aggregate;
  std::vector<float> g(3, 1.0f), out(3);
  std::vector<double> gd(3, 1.0), outd(3);
  gcomp::identity<float> cf;
  gcomp::identity<double> cd;
  aggregate.aggregate(gcomp::host_seq{}, group.comm(0), cf, std::span<const float>(g),
                      std::span<float>(out), {});
  CHECK(out == g);
  CHECK_THROWS_AS(aggregate.aggregate(gcomp::host_seq{}, group.comm(0), cd,
                                      std::span<const double>(gd), std::span<double>(outd), {}),
                  gcomp::error);
}
