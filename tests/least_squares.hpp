// The least-squares problem the end-to-end tests train (in-process and over MPI): data, gradients, loss, optimum.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "gcomp/aggregate/allreduce.hpp"
#include "gcomp/compress/identity.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/exec/host.hpp"
#include "gcomp/optim/sgd.hpp"
#include "gcomp/pipeline.hpp"

namespace gcomp::test::least_squares {

constexpr int workers = 4;
constexpr std::size_t rows_per_worker = 256, batch = 32, dims = 20;

struct problem {
  std::vector<double> a;  // (workers * rows_per_worker) x dims, row-major; worker m owns block m
  std::vector<double> b;
  std::size_t rows() const { return b.size(); }
};

inline problem make_problem(unsigned seed) {
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
inline std::size_t batch_row(int m, int t, std::size_t k) {
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

inline double loss(const problem& p, const double* x) {
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
inline std::vector<double> least_squares_optimum(const problem& p) {
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

inline double relative_distance(const std::vector<double>& x, const std::vector<double>& y) {
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    diff += (x[i] - y[i]) * (x[i] - y[i]);
    norm += y[i] * y[i];
  }
  return std::sqrt(diff / norm);
}


// x after each step, x_0 = 0 first.
using trajectory = std::vector<std::vector<double>>;

// Plain momentum SGD in one process on the workers' batches concatenated:
// what identity + allreduce + SGD must reproduce.
inline trajectory reference_trajectory(const problem& p, const gcomp::sgd_options& options, int steps) {
  trajectory reference(static_cast<std::size_t>(steps) + 1, std::vector<double>(dims, 0.0));
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
    reference[static_cast<std::size_t>(t) + 1] = x;
  }
  return reference;
}

struct worker_run {
  trajectory x;
  std::uint64_t steps = 0;  // what the pipeline counted
};

// One worker of the distributed run over any communicator: it sees only its
// own shard (rank comm.rank()) and steps identity + allreduce + SGD.
template <class Comm>
worker_run worker_trajectory(const problem& p, Comm& comm, const gcomp::sgd_options& options,
                             int steps) {
  const gcomp::layout lay{{"w", 16}, {"b", 4}};
  const int m = comm.rank();
  gcomp::pipeline pipe{gcomp::identity<double>{}, gcomp::allreduce{}, gcomp::sgd<double>{options}};
  worker_run run;
  run.x.assign(static_cast<std::size_t>(steps) + 1, std::vector<double>(dims, 0.0));
  std::vector<double> x(dims, 0.0), g(dims);
  for (int t = 0; t < steps; ++t) {
    std::vector<std::size_t> rows;
    for (std::size_t k = 0; k < batch; ++k) rows.push_back(batch_row(m, t, k));
    add_gradient(p, rows, x.data(), g.data());
    pipe.step(gcomp::host_seq{}, comm, lay, std::span<double>(x), std::span<const double>(g));
    run.x[static_cast<std::size_t>(t) + 1] = x;
  }
  run.steps = pipe.steps();
  return run;
}

}  // namespace gcomp::test::least_squares
