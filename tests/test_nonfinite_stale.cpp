// Compressed descent with staleness (stale_compressed_gd, the parameter-server form, parameter_server in a pipeline) with a NaN, +Inf or -Inf gradient on one of 3 workers: skip_step, throw_error and propagate, against a run whose gradient stream lacks that step.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "gcomp/aggregate/stale.hpp"
#include "gcomp/algo/stale_compressed.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/compress/error_feedback.hpp"
#include "gcomp/compress/identity.hpp"
#include "gcomp/compress/qsgd.hpp"
#include "gcomp/compress/topk.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/nonfinite.hpp"
#include "gcomp/exec/host.hpp"
#include "gcomp/optim/sgd.hpp"
#include "gcomp/pipeline.hpp"
#include "checkpoint_checks.hpp"

using bytes_t = std::vector<std::byte>;

using gcomp::test::same_bits;
using gcomp::test::without_guard_counts;

namespace {

constexpr int group_size = 3;
constexpr int positions = 30;
constexpr std::size_t dims = 24, bad_index = 5;

// Worker m's stochastic gradient at stream position p (its own quadratic
// plus a batch noise fixed by (m, p)).
void gradient(int m, int p, std::span<const double> model, std::span<double> out) {
  for (std::size_t j = 0; j < model.size(); ++j) {
    const double h = 0.5 + 0.5 * std::fabs(std::sin(double(j) + 1.7 * m));
    out[j] = h * (model[j] - (1.0 + 0.1 * double(j))) +
             0.05 * std::sin(1.1 * double(j) + 0.7 * double(p) + 2.3 * double(m));
  }
}

const gcomp::stale_options gd_options{
    .gamma = 0.2, .delay = {.max_delay = 3, .kind = gcomp::delay_kind::uniform, .seed = 21}, .seed = 4};
const gcomp::stale_options ps_options{.gamma = 0.05,
                                      .delay = {.max_delay = 3, .kind = gcomp::delay_kind::uniform, .seed = 21},
                                      .seed = 4,
                                      .period = 2};

const double poisons[] = {std::numeric_limits<double>::quiet_NaN(),
                          std::numeric_limits<double>::infinity(),
                          -std::numeric_limits<double>::infinity()};

constexpr int lacking = -1;  // `bad_rank` of a run whose stream lacks the position

struct run_result {
  std::vector<std::vector<double>> x;
  std::vector<bytes_t> state, full_state;  // guard counts zeroed / whole
  std::vector<std::vector<int>> outcomes;  // 1 stepped, -1 skipped, -2 threw
  std::vector<std::string> errors;
  std::vector<std::uint64_t> skipped, steps;
  std::vector<gcomp::comm_stats> stats;
};

run_result sized(int workers) {
  run_result r;
  r.x.resize(std::size_t(workers));
  r.state.resize(std::size_t(workers));
  r.full_state.resize(std::size_t(workers));
  r.outcomes.resize(std::size_t(workers));
  r.errors.resize(std::size_t(workers));
  r.skipped.resize(std::size_t(workers));
  r.steps.resize(std::size_t(workers));
  r.stats.resize(std::size_t(workers));
  return r;
}

// One worker's stream of `positions` steps. At position `at`, rank `bad_rank`
// puts `bad` into its gradient at bad_index (bad_rank == lacking: the
// position is left out). `step(p, poisoned)` runs one step and returns its
// bool. The poisoned step is checked to change nothing (but the guard's
// counts, when skipped).
template <class Method, class Step>
void drive(run_result& r, std::size_t me, Method& method, std::vector<double>& x, int at, int bad_rank,
           bool discard_on_throw, Step step) {
  for (int p = 0; p < positions; ++p) {
    if (p == at && bad_rank == lacking) continue;
    if (p != at) {
      r.outcomes[me].push_back(step(p) ? 1 : -1);
      continue;
    }
    const auto x_before = x;
    const bytes_t before = gcomp::checkpoint_bytes(method);
    const auto steps_before = method.steps();
    try {
      const bool stepped = step(p);
      r.outcomes[me].push_back(stepped ? 1 : -1);
      if (!stepped) {
        CHECK(same_bits(x, x_before));
        CHECK(without_guard_counts(gcomp::checkpoint_bytes(method)) == without_guard_counts(before));
        CHECK(method.steps() == steps_before);
      }
    } catch (const gcomp::error& e) {
      r.outcomes[me].push_back(-2);
      r.errors[me] = e.what();
      CHECK(same_bits(x, x_before));
      CHECK(method.steps() == steps_before);
      if (discard_on_throw) return;
      CHECK(gcomp::checkpoint_bytes(method) == before);
    }
  }
}

template <class Method>
void record(run_result& r, std::size_t me, const Method& method, const std::vector<double>& x) {
  r.x[me] = x;
  r.full_state[me] = gcomp::checkpoint_bytes(method);
  r.state[me] = without_guard_counts(r.full_state[me]);
  r.skipped[me] = method.skipped_steps();
  r.steps[me] = method.steps();
}

template <class Make>
run_result run_gd(Make make, gcomp::on_nonfinite action, int at, int bad_rank, double bad) {
  run_result r = sized(1);
  auto method = make();
  method.set_nonfinite_action(action);
  std::vector<double> x(dims, 0.0);
  drive(r, 0, method, x, at, bad_rank, action == gcomp::on_nonfinite::propagate, [&](int p) {
    return method.step(gcomp::host_seq{}, std::span<double>(x),
                       [&](std::span<const double> model, std::uint64_t, std::span<double> out) {
                         gradient(0, p, model, out);
                         if (p == at && bad_rank == 0) out[bad_index] = bad;
                       });
  });
  record(r, 0, method, x);
  return r;
}

template <class Make, class Policy = gcomp::host_seq>
run_result run_ps(Make make, gcomp::on_nonfinite action, int at, int bad_rank, double bad,
                  const Policy& policy = {}) {
  run_result r = sized(group_size);
  gcomp::inproc_group group(group_size);
  group.run([&](gcomp::inproc_comm& comm) {
    const auto me = std::size_t(comm.rank());
    auto method = make();
    method.set_nonfinite_action(action);
    std::vector<double> x(dims, 0.0);
    drive(r, me, method, x, at, bad_rank, false, [&](int p) {
      return method.step(policy, comm, std::span<double>(x),
                         [&](std::span<const double> model, std::uint64_t, std::span<double> out) {
                           gradient(comm.rank(), p, model, out);
                           if (p == at && bad_rank == comm.rank()) out[bad_index] = bad;
                         });
    });
    record(r, me, method, x);
    r.stats[me] = comm.stats();
  });
  return r;
}

auto gd_qsgd() {
  return gcomp::stale_compressed_gd(gcomp::qsgd<double>({.levels = 7, .bucket = 8}), gd_options);
}
auto gd_ef_topk() {
  return gcomp::stale_compressed_gd(
      gcomp::error_feedback<gcomp::topk<double>>(gcomp::topk<double>({.k = 5})), gd_options);
}
auto gd_identity() { return gcomp::stale_compressed_gd(gcomp::identity<double>{}, gd_options); }
auto ps_qsgd() {
  return gcomp::stale_parameter_server(gcomp::qsgd<double>({.levels = 7, .bucket = 8}), ps_options);
}
auto ps_ef_topk() {
  return gcomp::stale_parameter_server(
      gcomp::error_feedback<gcomp::topk<double>>(gcomp::topk<double>({.k = 5})), ps_options);
}
auto ps_identity() { return gcomp::stale_parameter_server(gcomp::identity<double>{}, ps_options); }

void check_skip(const run_result& hit, const run_result& lacks, int at) {
  for (std::size_t m = 0; m < hit.x.size(); ++m) {
    CAPTURE(m);
    REQUIRE(hit.outcomes[m].size() == std::size_t(positions));
    CHECK(hit.outcomes[m][std::size_t(at)] == -1);
    CHECK(std::count(hit.outcomes[m].begin(), hit.outcomes[m].end(), -1) == 1);
    CHECK(hit.skipped[m] == 1);
    CHECK(lacks.skipped[m] == 0);
    CHECK(hit.steps[m] == std::uint64_t(positions - 1));
    CHECK(same_bits(hit.x[m], lacks.x[m]));
    CHECK(hit.state[m] == lacks.state[m]);
    CHECK(same_bits(hit.x[m], hit.x[0]));
  }
}

}  // namespace

TEST_CASE("stale_compressed_gd, skip_step: a non-finite gradient is skipped as if the step never was") {
  // The retried step asks for the gradient of the same k at the same delayed
  // model, with the same random key: a skip that moved the history, the step
  // or the keys would show in the bits.
  for (double bad : poisons) {
    CAPTURE(bad);
    SUBCASE("QSGD") { check_skip(run_gd(gd_qsgd, gcomp::on_nonfinite::skip_step, 11, 0, bad),
                                 run_gd(gd_qsgd, gcomp::on_nonfinite::skip_step, 11, lacking, 0.0), 11); }
    SUBCASE("error_feedback<topk>") {
      check_skip(run_gd(gd_ef_topk, gcomp::on_nonfinite::skip_step, 2, 0, bad),
                 run_gd(gd_ef_topk, gcomp::on_nonfinite::skip_step, 2, lacking, 0.0), 2);
    }
  }
}

TEST_CASE("stale_compressed_gd, throw_error and propagate") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const run_result lacks = run_gd(gd_qsgd, gcomp::on_nonfinite::throw_error, 7, lacking, 0.0);
  const run_result hit = run_gd(gd_qsgd, gcomp::on_nonfinite::throw_error, 7, 0, nan);
  CHECK(hit.outcomes[0][7] == -2);
  CHECK(hit.errors[0] == "gcomp::stale_compressed_gd::step: the gradient has 1 non-finite entries "
                         "(first at index 5)");
  CHECK(same_bits(hit.x[0], lacks.x[0]));
  CHECK(hit.full_state[0] == lacks.full_state[0]);  // the throw counted nothing either

  // propagate: today's behaviour, the compressor refuses (QSGD), or the
  // value reaches the parameters (identity), with no skip counted.
  const run_result refused = run_gd(gd_qsgd, gcomp::on_nonfinite::propagate, 7, 0, nan);
  CHECK(refused.errors[0].find("gcomp::qsgd::compress") != std::string::npos);
  for (double bad : poisons) {
    const run_result through = run_gd(gd_identity, gcomp::on_nonfinite::propagate, 7, 0, bad);
    CHECK(through.steps[0] == std::uint64_t(positions));
    CHECK(through.skipped[0] == 0);
    CHECK_FALSE(std::isfinite(through.x[0][bad_index]));
  }
}

TEST_CASE("parameter-server form, skip_step: every worker skips a step poisoned on one, as if it never was") {
  // Period 2: worker 1 is due at odd steps and at step 0.
  for (double bad : poisons) {
    CAPTURE(bad);
    SUBCASE("QSGD, an odd step") {
      check_skip(run_ps(ps_qsgd, gcomp::on_nonfinite::skip_step, 11, 1, bad),
                 run_ps(ps_qsgd, gcomp::on_nonfinite::skip_step, 11, lacking, 0.0), 11);
    }
    SUBCASE("error_feedback<topk>, step 0 (every worker due), host_par") {
      check_skip(run_ps(ps_ef_topk, gcomp::on_nonfinite::skip_step, 0, 1, bad, gcomp::host_par(2)),
                 run_ps(ps_ef_topk, gcomp::on_nonfinite::skip_step, 0, lacking, 0.0, gcomp::host_par(2)),
                 0);
    }
  }
  // The skipped step cost the flag only: one all-reduce of a double.
  const run_result hit = run_ps(ps_qsgd, gcomp::on_nonfinite::skip_step, 11, 1, std::nan(""));
  const run_result lacks = run_ps(ps_qsgd, gcomp::on_nonfinite::skip_step, 11, lacking, 0.0);
  for (std::size_t m = 0; m < group_size; ++m) {
    CHECK(hit.stats[m].collectives == lacks.stats[m].collectives + 1);
    CHECK(hit.stats[m].bytes_sent == lacks.stats[m].bytes_sent + sizeof(double));
  }
}

TEST_CASE("parameter-server form, throw_error: every worker throws, names the culprit, changes nothing") {
  const double inf = std::numeric_limits<double>::infinity();
  const run_result lacks = run_ps(ps_qsgd, gcomp::on_nonfinite::throw_error, 13, lacking, 0.0);
  const run_result hit = run_ps(ps_qsgd, gcomp::on_nonfinite::throw_error, 13, 1, -inf);
  for (std::size_t m = 0; m < group_size; ++m) {
    CAPTURE(m);
    CHECK(hit.outcomes[m][13] == -2);
    CHECK(hit.errors[m].find("gcomp::stale_parameter_server::step: non-finite gradient on 1 of 3 workers") !=
          std::string::npos);
    if (m == 1)
      CHECK(hit.errors[m].find("this worker has 1 non-finite entries, the first at index 5") !=
            std::string::npos);
    else
      CHECK(hit.errors[m].find("this worker's gradient is finite") != std::string::npos);
    CHECK(same_bits(hit.x[m], lacks.x[m]));
    CHECK(hit.full_state[m] == lacks.full_state[m]);
  }
}

TEST_CASE("parameter-server form, propagate: no flag, and the value reaches every worker") {
  const run_result guarded = run_ps(ps_qsgd, gcomp::on_nonfinite::skip_step, lacking, lacking, 0.0);
  const run_result free = run_ps(ps_qsgd, gcomp::on_nonfinite::propagate, lacking, lacking, 0.0);
  for (std::size_t m = 0; m < group_size; ++m) {
    CHECK(same_bits(guarded.x[m], free.x[m]));
    // Some worker is due at every step (period 2, 3 workers): one flag per step.
    CHECK(guarded.stats[m].collectives == free.stats[m].collectives + positions);
    CHECK(guarded.stats[m].bytes_sent == free.stats[m].bytes_sent + positions * sizeof(double));
  }
  for (double bad : poisons) {
    CAPTURE(bad);
    const run_result hit = run_ps(ps_identity, gcomp::on_nonfinite::propagate, 11, 1, bad);
    for (std::size_t m = 0; m < group_size; ++m) {
      CHECK(hit.skipped[m] == 0);
      CHECK(hit.steps[m] == std::uint64_t(positions));
      CHECK_FALSE(std::isfinite(hit.x[m][bad_index]));
    }
  }
}

TEST_CASE("a pipeline with a stale aggregator skips a poisoned step on every worker, as if it never was") {
  const gcomp::layout lay{dims};
  const auto train = [&](int at, int bad_rank, double bad) {
    std::vector<std::vector<double>> xs(group_size);
    std::vector<bytes_t> states(group_size);
    std::vector<std::uint64_t> skipped(group_size);
    gcomp::inproc_group group(group_size);
    group.run([&](gcomp::inproc_comm& comm) {
      auto pipe = gcomp::pipeline{
          gcomp::error_feedback<gcomp::topk<double>>(gcomp::topk<double>({.k = 5})),
          gcomp::parameter_server(gcomp::refresh_schedule(2)),
          gcomp::sgd<double>({.lr = 0.02, .momentum = 0.9}), 3};
      std::vector<double> x(dims, 0.0), g(dims);
      for (int p = 0; p < positions; ++p) {
        if (p == at && bad_rank == lacking) continue;
        gradient(comm.rank(), p, x, g);
        if (p == at && bad_rank == comm.rank()) g[bad_index] = bad;
        CHECK(pipe.step(gcomp::host_seq{}, comm, lay, std::span<double>(x), std::span<const double>(g)) ==
              (p != at));
      }
      const auto m = std::size_t(comm.rank());
      xs[m] = x;
      states[m] = gcomp::checkpoint_bytes(pipe.compressor, pipe.aggregator, pipe.optimizer);
      skipped[m] = pipe.skipped_steps();
    });
    return std::make_tuple(xs, states, skipped);
  };
  for (double bad : poisons) {
    CAPTURE(bad);
    const auto [hit_x, hit_state, hit_skipped] = train(9, 2, bad);
    const auto [x, state, skipped] = train(9, lacking, 0.0);
    for (std::size_t m = 0; m < group_size; ++m) {
      CHECK(same_bits(hit_x[m], x[m]));
      CHECK(hit_state[m] == state[m]);
      CHECK(hit_skipped[m] == 1);
      CHECK(skipped[m] == 0);
    }
  }
}
