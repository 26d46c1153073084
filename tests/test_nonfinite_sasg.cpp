// SASG and LAG with a NaN, +Inf or -Inf gradient (or gradient_at output) on one of 3 workers: skip_step, throw_error and propagate, against a run whose gradient stream lacks that step.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "gcomp/algo/sasg.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/nonfinite.hpp"
#include "gcomp/exec/host.hpp"
#include "least_squares.hpp"
#include "checkpoint_checks.hpp"

using namespace gcomp::test::least_squares;
using bytes_t = std::vector<std::byte>;

using gcomp::test::same_bits;
using gcomp::test::without_guard_counts;

namespace {

constexpr int group_size = 3;
constexpr int positions = 40;    // stream positions (gradients) per worker
constexpr std::size_t bad_index = 7;
const gcomp::layout model{{"w", 16}, {"b", 4}};
const problem data = make_problem(2024);

// Where the poison goes: nowhere (the stream lacks the position instead),
// into worker 1's gradient, or into worker 2's gradient_at output.
enum class poison { lacking, gradient, gradient_at };

struct run_result {
  std::vector<std::vector<double>> x;       // per worker, at the end
  std::vector<bytes_t> state;               // per worker: checkpoint, guard counts zeroed
  std::vector<bytes_t> full_state;          // per worker: the whole checkpoint
  std::vector<std::vector<int>> outcomes;   // per worker, per step: 1 up, 0 reused, -1 skipped, -2 threw
  std::vector<std::string> errors;          // per worker: what the poisoned step threw
  std::vector<std::uint64_t> skipped, steps;
  std::vector<gcomp::comm_stats> stats;
  std::vector<std::vector<char>> callable;  // per worker, per position: gradient_at would be called
};

// M = 3 workers train `positions` stream positions (mini-batches, or full
// shards for the last-uploaded form). At position `at` the poison `where` is
// put at bad_index (or, for poison::lacking, the position is left out).
template <class Make, class Policy = gcomp::host_seq>
run_result run(Make make, gcomp::on_nonfinite action, poison where, int at, double bad,
               const Policy& policy = {}) {
  run_result r;
  r.x.resize(group_size);
  r.state.resize(group_size);
  r.full_state.resize(group_size);
  r.outcomes.resize(group_size);
  r.errors.resize(group_size);
  r.skipped.resize(group_size);
  r.steps.resize(group_size);
  r.stats.resize(group_size);
  r.callable.resize(group_size);
  gcomp::inproc_group group(group_size);
  group.run([&](gcomp::inproc_comm& comm) {
    const int m = comm.rank();
    const auto mi = std::size_t(m);
    auto method = make();
    method.set_nonfinite_action(action);
    const bool callback = method.options().form == gcomp::lazy_rule_form::same_minibatch;
    std::vector<double> x(dims, 0.0), g(dims);
    for (int t = 0; t < positions; ++t) {
      if (t == at && where == poison::lacking) continue;
      std::vector<std::size_t> rows;
      for (std::size_t k = 0; k < (callback ? batch : rows_per_worker); ++k)
        rows.push_back(callback ? batch_row(m, t, k) : std::size_t(m) * rows_per_worker + k);
      add_gradient(data, rows, x.data(), g.data());
      const bool poisoned = t == at && where != poison::lacking;
      if (poisoned && where == poison::gradient && m == 1) g[bad_index] = bad;
      r.callable[mi].push_back(!method.rule().forced());
      const auto step = [&] {
        if (!callback) return method.step(policy, comm, std::span<double>(x), std::span<const double>(g));
        return method.step(policy, comm, std::span<double>(x), std::span<const double>(g),
                           [&](std::span<const double> p, std::span<double> out) {
                             add_gradient(data, rows, p.data(), out.data());
                             if (poisoned && where == poison::gradient_at && m == 2) out[bad_index] = bad;
                           });
      };
      if (!poisoned) {
        const bool up = step();
        r.outcomes[mi].push_back(up ? 1 : 0);
        CHECK(method.last_step() == (up ? gcomp::lazy_step::uploaded : gcomp::lazy_step::reused));
        continue;
      }
      const auto x_before = x;
      const bytes_t full_before = gcomp::checkpoint_bytes(method);
      const auto steps_before = method.steps();
      try {
        const bool up = step();
        r.outcomes[mi].push_back(method.last_step() == gcomp::lazy_step::skipped ? -1 : up ? 1 : 0);
        if (method.last_step() == gcomp::lazy_step::skipped) {
          // A skipped step changes nothing but the guard's counts.
          CHECK_FALSE(up);
          CHECK(same_bits(x, x_before));
          CHECK(without_guard_counts(gcomp::checkpoint_bytes(method)) == without_guard_counts(full_before));
          CHECK(method.steps() == steps_before);
        }
      } catch (const gcomp::error& e) {
        r.outcomes[mi].push_back(-2);
        r.errors[mi] = e.what();
        CHECK(same_bits(x, x_before));
        // Under propagate the throw is the divergence check after the exchange
        // (the stored messages have moved on): that object is discarded.
        if (action == gcomp::on_nonfinite::propagate) break;
        CHECK(gcomp::checkpoint_bytes(method) == full_before);
      }
    }
    r.x[mi] = x;
    r.full_state[mi] = gcomp::checkpoint_bytes(method);
    r.state[mi] = without_guard_counts(r.full_state[mi]);
    r.skipped[mi] = method.skipped_steps();
    r.steps[mi] = method.steps();
    r.stats[mi] = comm.stats();
  });
  return r;
}

auto sasg_minibatch() {
  return gcomp::sasg<double>({.ratio = 0.25, .descent = {.alpha = 0.01, .history = 5}}, model);
}
auto sasg_full() {
  return gcomp::sasg<double>(
      {.ratio = 0.25,
       .descent = {.alpha = 0.01, .history = 5, .form = gcomp::lazy_rule_form::last_uploaded}},
      model);
}
auto lag_full() {
  return gcomp::lag<double>(
      {.alpha = 0.01, .history = 10, .form = gcomp::lazy_rule_form::last_uploaded}, model);
}

const double poisons[] = {std::numeric_limits<double>::quiet_NaN(),
                          std::numeric_limits<double>::infinity(),
                          -std::numeric_limits<double>::infinity()};

// The first position >= 15 at which worker 2 calls gradient_at in the clean
// run (the rule does not force it), so a poisoned gradient_at output is used.
template <class Make>
int first_callback_position(Make make) {
  const run_result clean = run(make, gcomp::on_nonfinite::skip_step, poison::lacking, -1, 0.0);
  for (int t = 15; t < positions; ++t)
    if (clean.callable[2][std::size_t(t)]) return t;
  FAIL("worker 2 never calls gradient_at");
  return -1;
}

template <class Make, class Policy = gcomp::host_seq>
void check_skip(Make make, poison where, int at, double bad, const Policy& policy = {}) {
  const run_result lacking = run(make, gcomp::on_nonfinite::skip_step, poison::lacking, at, 0.0, policy);
  const run_result hit = run(make, gcomp::on_nonfinite::skip_step, where, at, bad, policy);
  for (std::size_t m = 0; m < group_size; ++m) {
    CAPTURE(m);
    // Every worker skipped the poisoned position, though only one saw the poison.
    REQUIRE(hit.outcomes[m].size() == std::size_t(positions));
    CHECK(hit.outcomes[m][std::size_t(at)] == -1);
    std::vector<int> others = hit.outcomes[m];
    others.erase(others.begin() + at);
    CHECK(others == lacking.outcomes[m]);
    CHECK(hit.skipped[m] == 1);
    CHECK(lacking.skipped[m] == 0);
    CHECK(hit.steps[m] == std::uint64_t(positions - 1));
    // ... and ends bitwise where the run whose stream lacks that step ends.
    CHECK(same_bits(hit.x[m], lacking.x[m]));
    CHECK(hit.state[m] == lacking.state[m]);
    CHECK(same_bits(hit.x[m], hit.x[0]));
    // The skipped step cost one flag and nothing else: one all-reduce of a double.
    CHECK(hit.stats[m].collectives == lacking.stats[m].collectives + 1);
    CHECK(hit.stats[m].bytes_sent == lacking.stats[m].bytes_sent + sizeof(double));
  }
}

}  // namespace

TEST_CASE("skip_step: NaN, +Inf or -Inf in one worker's gradient makes every worker skip, as if the step never was") {
  for (double bad : poisons) {
    CAPTURE(bad);
    SUBCASE("SASG, same-minibatch rule, poison in the gradient (a step the rule does not force)") {
      check_skip(sasg_minibatch, poison::gradient, 20, bad);
    }
    SUBCASE("SASG, poison in the gradient at a warm-up step") {
      check_skip(sasg_minibatch, poison::gradient, 2, bad);
    }
    SUBCASE("SASG, last-uploaded rule") { check_skip(sasg_full, poison::gradient, 23, bad); }
    SUBCASE("LAG") { check_skip(lag_full, poison::gradient, 26, bad); }
    SUBCASE("SASG on host_par") { check_skip(sasg_minibatch, poison::gradient, 21, bad, gcomp::host_par(3)); }
  }
}

TEST_CASE("skip_step: a non-finite gradient_at output (the gradient at xhat) is guarded too") {
  const int at = first_callback_position(sasg_minibatch);
  for (double bad : poisons) {
    CAPTURE(bad);
    check_skip(sasg_minibatch, poison::gradient_at, at, bad);
  }
}

TEST_CASE("throw_error: every worker throws, names the culprit and its index, and changes nothing") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const int callback_at = first_callback_position(sasg_minibatch);
  struct scenario {
    poison where;
    int at;
    int culprit;
    std::size_t index;  // in the guard's message: n + i for gradient_at's element i
  };
  for (const scenario s : {scenario{poison::gradient, 20, 1, bad_index},
                           scenario{poison::gradient_at, callback_at, 2, dims + bad_index}}) {
    CAPTURE(int(s.where));
    const run_result lacking = run(sasg_minibatch, gcomp::on_nonfinite::throw_error, poison::lacking, s.at, 0.0);
    const run_result hit = run(sasg_minibatch, gcomp::on_nonfinite::throw_error, s.where, s.at, nan);
    for (std::size_t m = 0; m < group_size; ++m) {
      CAPTURE(m);
      CHECK(hit.outcomes[m][std::size_t(s.at)] == -2);
      CHECK(hit.errors[m].find("gcomp::sasg: non-finite gradient on 1 of 3 workers") != std::string::npos);
      if (int(m) == s.culprit)
        CHECK(hit.errors[m].find("this worker has 1 non-finite entries, the first at index " +
                                 std::to_string(s.index)) != std::string::npos);
      else
        CHECK(hit.errors[m].find("this worker's gradient is finite") != std::string::npos);
      CHECK(hit.skipped[m] == 0);
      // The workers caught the error and went on: the run equals the one without the step.
      CHECK(same_bits(hit.x[m], lacking.x[m]));
      CHECK(hit.full_state[m] == lacking.full_state[m]);
      CHECK(hit.steps[m] == std::uint64_t(positions - 1));
    }
  }
}

TEST_CASE("propagate: no check and no extra collective; a non-finite update is today's divergence error") {
  const run_result guarded = run(sasg_minibatch, gcomp::on_nonfinite::skip_step, poison::lacking, -1, 0.0);
  const run_result free = run(sasg_minibatch, gcomp::on_nonfinite::propagate, poison::lacking, -1, 0.0);
  for (std::size_t m = 0; m < group_size; ++m) {
    CAPTURE(m);
    CHECK(same_bits(guarded.x[m], free.x[m]));
    CHECK(guarded.outcomes[m] == free.outcomes[m]);
    // The guard's price: one collective and one double per step.
    CHECK(free.stats[m].collectives == std::uint64_t(positions));
    CHECK(guarded.stats[m].collectives == 2 * std::uint64_t(positions));
    CHECK(guarded.stats[m].bytes_sent == free.stats[m].bytes_sent + positions * sizeof(double));
  }
  // LAG's message is alpha g itself, so worker 1's poison reaches every
  // worker's update (a warm-up step: all upload) and every worker throws.
  for (double bad : poisons) {
    CAPTURE(bad);
    const run_result hit = run(lag_full, gcomp::on_nonfinite::propagate, poison::gradient, 4, bad);
    for (std::size_t m = 0; m < group_size; ++m) {
      CAPTURE(m);
      CHECK(hit.outcomes[m].back() == -2);
      CHECK(hit.errors[m].find("gcomp::lag: the update moves the parameters by ") != std::string::npos);
      CHECK(hit.errors[m].find("the run has diverged") != std::string::npos);
      CHECK(hit.skipped[m] == 0);
    }
  }
}

TEST_CASE("the non-finite action is configuration: options, set_nonfinite_action, kept over a load") {
  auto method = gcomp::sasg<float>(
      {.ratio = 0.5, .descent = {.history = 2, .nonfinite = gcomp::on_nonfinite::throw_error}}, model);
  CHECK(method.nonfinite_action() == gcomp::on_nonfinite::throw_error);
  CHECK(method.last_step() == gcomp::lazy_step::none);
  const auto other = gcomp::sasg<float>({.ratio = 0.5, .descent = {.history = 2}}, model);
  gcomp::load_checkpoint(gcomp::host_seq{}, gcomp::checkpoint_bytes(other), method);
  CHECK(method.nonfinite_action() == gcomp::on_nonfinite::throw_error);
  method.set_nonfinite_action(gcomp::on_nonfinite::propagate);
  CHECK(method.nonfinite_action() == gcomp::on_nonfinite::propagate);
  CHECK_THROWS_AS(method.set_nonfinite_action(static_cast<gcomp::on_nonfinite>(9)), gcomp::error);
  CHECK(method.nonfinite_action() == gcomp::on_nonfinite::propagate);
}
