// Divisible Adam end to end: convergence on non-iid least squares, the foreground + Adam against a
// naive oracle, identical state across workers, foreground bytes 1/r of dense, a step that never waits.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "delayed_comm.hpp"
#include "gcomp/algo/divcomm.hpp"
#include "gcomp/comm/inproc.hpp"
#include "least_squares.hpp"
#include "optim_reference.hpp"

using namespace gcomp::test::least_squares;
using gcomp::background_payload;
using gcomp::rescale;

namespace {

const gcomp::layout lay{{"w", 16}, {"b", 4}};
constexpr int steps = 3000;
// Cosine decay from 0.05 to 0: a constant Adam step would keep a noise floor.
const gcomp::lr_schedule schedule = gcomp::lr_schedule::cosine(0.02, steps);

using method = gcomp::divcomm<double, gcomp::random_contiguous_block<double, rescale::none>>;

method make_method(background_payload payload) {
  method d(gcomp::random_contiguous_block<double, rescale::none>({.ratio = 0.25}),
           {.payload = payload, .delay = 1}, {}, /*seed=*/11);
  d.optimizer.set_schedule(schedule);
  return d;
}

struct worker_state {
  std::vector<double> x, m, v;
  gcomp::comm_stats seen, foreground, background;
  gcomp::background_counters counters;
};

// n_steps of divisible Adam on this worker's shard (rank = shard), from x;
// after_step(d, x) is called after each step.
template <class Comm, class Hook>
void run_steps(const problem& p, Comm& comm, method& d, std::vector<double>& x, int n_steps,
               Hook after_step) {
  std::vector<double> g(dims);
  for (int t = 0; t < n_steps; ++t) {
    std::vector<std::size_t> rows;
    for (std::size_t k = 0; k < batch; ++k) rows.push_back(batch_row(comm.rank(), t, k));
    add_gradient(p, rows, x.data(), g.data());
    d.step(gcomp::host_seq{}, comm, lay, std::span<double>(x), std::span<const double>(g));
    after_step(d, x);
  }
}

// One worker trains from x = 0, finishes, and reports its state.
template <class Comm>
worker_state train(const problem& p, Comm& comm, background_payload payload, int n_steps) {
  method d = make_method(payload);
  std::vector<double> x(dims, 0.0);
  run_steps(p, comm, d, x, n_steps, [](const method&, const std::vector<double>&) {});
  d.finish(gcomp::host_seq{}, comm, std::span<double>(x));
  worker_state s;
  s.x = x;
  s.m.assign(d.optimizer.exp_avg().begin(), d.optimizer.exp_avg().end());
  s.v.assign(d.optimizer.exp_avg_sq().begin(), d.optimizer.exp_avg_sq().end());
  s.seen = comm.stats();
  s.foreground = d.foreground_stats();
  s.background = d.background_stats();
  s.counters = d.aggregator.counters();
  return s;
}

std::vector<worker_state> train_inproc(const problem& p, background_payload payload, int n_steps) {
  std::vector<worker_state> out(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    out[static_cast<std::size_t>(comm.rank())] = train(p, comm, payload, n_steps);
  });
  return out;
}

}  // namespace

TEST_CASE("divisible Adam converges on non-iid least squares with every background payload") {
  const problem p = make_problem(2024);
  const auto optimum = least_squares_optimum(p);
  const double best = loss(p, optimum.data());
  const double start = loss(p, std::vector<double>(dims, 0.0).data());
  for (background_payload payload :
       {background_payload::none, background_payload::parameters, background_payload::residual}) {
    CAPTURE(static_cast<int>(payload));
    const auto run = train_inproc(p, payload, steps);
    const double end = loss(p, run[0].x.data());
    INFO("start " << start << ", end " << end << ", optimum " << best);
    CHECK(end < 1.01 * best);
    CHECK(end < 1e-4 * start);
    CHECK(relative_distance(run[0].x, optimum) < 0.01);
    if (payload != background_payload::none) CHECK(run[0].counters.applied > 0);
  }
}

TEST_CASE("with the background off, divisible Adam is EF + block + mean + Adam, bitwise (naive oracle)") {
  const problem p = make_problem(99);
  constexpr int n_steps = 200;
  const auto run = [&] {
    std::vector<std::vector<std::vector<double>>> x(workers);  // [m][t]
    gcomp::inproc_group group(workers);
    group.run([&](gcomp::inproc_comm& comm) {
      method d = make_method(background_payload::none);
      std::vector<double> xm(dims, 0.0);
      run_steps(p, comm, d, xm, n_steps, [&](const method&, const std::vector<double>& now) {
        x[static_cast<std::size_t>(comm.rank())].push_back(now);
      });
      CHECK(d.steps() == std::uint64_t(n_steps));
    });
    return x;
  }();

  // The oracle: every worker's residual, the shared block, the rank-ordered
  // sum times 1/M, then Adam written out in torch's formula order.
  const gcomp::random_contiguous_block<double, rescale::none> c({.ratio = 0.25});
  std::vector<std::vector<double>> e(workers, std::vector<double>(dims, 0.0));
  std::vector<double> x(dims, 0.0), g(dims);
  gcomp::test::adam_moments moments;
  moments.start(dims, 1);
  const gcomp::adam_options o{};
  int mismatches = 0;
  for (int t = 0; t < n_steps; ++t) {
    for (int m = 0; m < workers; ++m) {
      std::vector<std::size_t> rows;
      for (std::size_t k = 0; k < batch; ++k) rows.push_back(batch_row(m, t, k));
      add_gradient(p, rows, x.data(), g.data());
      for (std::size_t i = 0; i < dims; ++i) e[m][i] += g[i];
    }
    std::vector<double> global(dims, 0.0);
    const std::size_t offset = c.offset_for({11, std::uint64_t(t), 0}, dims);
    for (std::size_t j = 0; j < c.kept(dims); ++j) {
      const std::size_t i = (offset + j) % dims;
      double sum = e[0][i];
      for (int m = 1; m < workers; ++m) sum = sum + e[m][i];
      global[i] = (1.0 / workers) * sum;
      for (auto& em : e) em[i] = 0.0;
    }
    const int step = moments.count_step(0);
    const double bc1 = 1.0 - std::pow(o.beta1, step), bc2 = 1.0 - std::pow(o.beta2, step);
    for (std::size_t i = 0; i < dims; ++i) {
      moments.update(i, global[i]);
      x[i] = x[i] + (-schedule(std::uint64_t(t)) / bc1) * moments.m[i] /
                        (std::sqrt(moments.v[i]) / std::sqrt(bc2) + o.eps);
    }
    for (int m = 0; m < workers; ++m) mismatches += run[m][t] != x;
  }
  CHECK(mismatches == 0);
}

TEST_CASE("workers keep bitwise identical parameters and Adam moments (M = 4)") {
  // m and v only see the all-reduced gradient; with 4 workers the average of
  // equal values is exact, so even the parameters payload corrects by exactly 0.
  const problem p = make_problem(5);
  for (background_payload payload :
       {background_payload::none, background_payload::parameters, background_payload::residual}) {
    CAPTURE(static_cast<int>(payload));
    const auto run = train_inproc(p, payload, 300);
    for (int m = 1; m < workers; ++m) {
      CHECK(run[m].x == run[0].x);
      CHECK(run[m].m == run[0].m);
      CHECK(run[m].v == run[0].v);
    }
  }
}

TEST_CASE("divisible Adam: foreground bytes are 1/r of dense, background bytes apart, sum = comm.stats()") {
  constexpr std::size_t n = 8192;
  constexpr int n_steps = 6;
  const gcomp::layout big{n};
  for (std::size_t r : {std::size_t{16}, std::size_t{1024}}) {
    CAPTURE(r);
    std::vector<worker_state> out(workers);
    gcomp::inproc_group group(workers);
    group.run([&](gcomp::inproc_comm& comm) {
      gcomp::divcomm<float> d(gcomp::random_contiguous_block<float, rescale::none>({.ratio = 1.0 / double(r)}),
                              {.payload = background_payload::parameters, .delay = 2});
      std::vector<float> x(n, 0.5f), g(n);
      for (int t = 0; t < n_steps; ++t) {
        for (std::size_t i = 0; i < n; ++i) g[i] = std::sin(float(i + 7 * t + comm.rank()));
        d.step(gcomp::host_seq{}, comm, big, std::span<float>(x), std::span<const float>(g));
      }
      d.finish(gcomp::host_seq{}, comm, std::span<float>(x));
      auto& s = out[static_cast<std::size_t>(comm.rank())];
      s.seen = comm.stats();
      s.foreground = d.foreground_stats();
      s.background = d.background_stats();
      s.counters = d.aggregator.counters();
    });
    const std::uint64_t dense = n_steps * n * sizeof(float);
    // The non-finite check (core/nonfinite.hpp, on by default) all-reduces one
    // float per step, counted by the communicator only: n_steps * sizeof(float)
    // bytes each way and n_steps collectives.
    const gcomp::comm_stats check{n_steps * sizeof(float), n_steps * sizeof(float), n_steps};
    for (const worker_state& s : out) {
      CHECK(s.foreground.bytes_sent * r == dense);
      CHECK(s.foreground.bytes_received * r == dense);
      CHECK(s.foreground.collectives == n_steps);
      // n floats and the 16-byte step tag per operation, 8 bytes for finish()'s count.
      CHECK(s.background.bytes_sent == s.counters.started * (n * sizeof(float) + 16) + 8);
      CHECK(s.background.collectives == 2 * s.counters.started + 1);
      CHECK(s.foreground + s.background + check == s.seen);
    }
  }
}

TEST_CASE("a divisible Adam step never waits for the background") {
  // The transport holds every background call for the whole run: each step
  // returns with the operation pending, never calls wait(), and the
  // parameters follow the foreground-only run exactly.
  const problem p = make_problem(3);
  constexpr int n_steps = 30;
  const auto alone = train_inproc(p, background_payload::none, n_steps);
  std::vector<worker_state> held(workers);
  std::vector<std::uint64_t> waits(workers), pending_steps(workers);
  std::vector<int> applied_by_finish(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& inner) {
    gcomp::test::delayed_comm comm(inner);
    const auto r = static_cast<std::size_t>(comm.rank());
    method d = make_method(background_payload::parameters);
    std::vector<double> x(dims, 0.0);
    run_steps(p, comm, d, x, n_steps, [&](const method& now, const std::vector<double>&) {
      pending_steps[r] += now.aggregator.background_pending();
    });
    waits[r] = comm.waits();
    held[r].x = x;
    held[r].counters = d.aggregator.counters();
    comm.release();
    applied_by_finish[r] = d.finish(gcomp::host_seq{}, comm, std::span<double>(x));
    CHECK(x == held[r].x);  // identical workers: the correction is exactly 0
  });
  for (int m = 0; m < workers; ++m) {
    CHECK(waits[m] == 0);
    CHECK(pending_steps[m] == n_steps);
    CHECK(held[m].counters.started == 1);
    CHECK(held[m].counters.pending_checks == n_steps - 1);  // tested from step 1 on
    CHECK(held[m].x == alone[m].x);
    CHECK(applied_by_finish[m] == 1);
  }
}

TEST_CASE("divcomm rejects bad arguments before changing anything") {
  gcomp::inproc_group group(2);
  group.run([&](gcomp::inproc_comm& comm) {
    const gcomp::host_seq seq;
    method d = make_method(background_payload::parameters);
    std::vector<double> x(dims, 1.0), g(dims, 0.5), g19(dims - 1, 0.5), x21(dims + 1, 1.0);
    CHECK_THROWS_WITH_AS(d.step(seq, comm, lay, std::span<double>(x21), std::span<const double>(g)),
                         "gcomp::divcomm::step: params has size 21 but the layout covers 20 "
                         "elements; they must match",
                         gcomp::error);
    CHECK_THROWS_WITH_AS(d.step(seq, comm, lay, std::span<double>(x), std::span<const double>(g19)),
                         "gcomp::divcomm::step: grads has size 19 but params has size 20; they must "
                         "match",
                         gcomp::error);
    CHECK(x == std::vector<double>(dims, 1.0));
    CHECK(d.steps() == 0);
    d.step(seq, comm, lay, std::span<double>(x), std::span<const double>(g));
    const std::vector<double> x1 = x;
    const std::vector<double> e1(d.aggregator.residual().begin(), d.aggregator.residual().end());
    // Another model after the first step.
    const gcomp::layout other{21};
    std::vector<double> g21(dims + 1, 0.5);
    CHECK_THROWS_WITH_AS(d.step(seq, comm, other, std::span<double>(x21), std::span<const double>(g21)),
                         "gcomp::divcomm::step: params has size 21 but the model of the first step "
                         "has size 20; they must match",
                         gcomp::error);
    // Another communicator while the background is in flight on this one:
    // caught before the foreground, so neither x nor the residual moves.
    gcomp::test::delayed_comm wrapped(comm);
    CHECK_THROWS_WITH_AS(d.step(seq, wrapped, lay, std::span<double>(x), std::span<const double>(g)),
                         "gcomp::divisible::background: an operation is in flight on another "
                         "communicator; pass the one it started on",
                         gcomp::error);
    CHECK(x == x1);
    CHECK(std::vector<double>(d.aggregator.residual().begin(), d.aggregator.residual().end()) == e1);
    CHECK(d.steps() == 1);
    d.finish(seq, comm, std::span<double>(x));
  });
}
