// Divisible Adam with NaN or Inf in one worker's gradient (3 in-process workers, every background
// payload): skip_step skips the step on every worker with nothing changed, the background included, and
// the run ends bitwise equal to a run that never saw that batch; throw_error throws on every worker with
// nothing changed; propagate lets the value through with no extra communication.
#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "delayed_comm.hpp"
#include "gcomp/algo/divcomm.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "least_squares.hpp"

using namespace gcomp::test::least_squares;
using gcomp::background_payload;
using gcomp::on_nonfinite;

namespace {

constexpr int group_size = 3;  // M; the least-squares shards 0..2
constexpr int stream_length = 20;
constexpr int poisoned_batch = 6;
constexpr int poisoned_rank = 1;
constexpr std::size_t poisoned_index = 7;
const gcomp::layout lay{{"w", 16}, {"b", 4}};
const gcomp::host_seq seq;

const double non_finite_values[] = {std::numeric_limits<double>::quiet_NaN(),
                                    std::numeric_limits<double>::infinity(),
                                    -std::numeric_limits<double>::infinity()};

using block = gcomp::random_contiguous_block<double, gcomp::rescale::none>;
using method = gcomp::divcomm<double, block>;

struct run_log {
  std::vector<double> x, m, v, residual;
  std::vector<std::vector<double>> taken_history;  // x after every step taken
  std::vector<int> outcome;                        // per call: 1 taken, 0 skipped, -1 threw
  std::vector<std::uint64_t> collectives;          // per call, what comm.stats() counted
  gcomp::background_counters counters;
  std::string message;     // what the poisoned call threw
  bool unchanged = true;   // the poisoned call left every state field as it was
  bool propagated = false; // propagate: the poisoned value reached the residual or the parameters
  std::uint64_t steps = 0, skipped = 0;
};

std::vector<double> as_vector(std::span<const double> s) { return {s.begin(), s.end()}; }

bool same_counters(const gcomp::background_counters& a, const gcomp::background_counters& b) {
  return a.started == b.started && a.applied == b.applied && a.skipped == b.skipped &&
         a.pending_checks == b.pending_checks;
}

// The batches in `stream` on every worker, one step() each; batch `poisoned`
// (-1: none) has `value` at poisoned_index on poisoned_rank. delayed_comm sees
// each background operation finished at its first test() (one step after it
// started), so that runs can be compared bit for bit.
std::vector<run_log> run(on_nonfinite action, background_payload payload, const std::vector<int>& stream,
                         int poisoned = -1, double value = 0.0) {
  const problem p = make_problem(505);
  std::vector<run_log> logs(group_size);
  gcomp::inproc_group group(group_size);
  group.run([&](gcomp::inproc_comm& inner) {
    gcomp::test::delayed_comm comm(inner, 1);
    run_log& log = logs[std::size_t(comm.rank())];
    method d(block({.ratio = 0.25}), {.payload = payload, .delay = 1}, {.lr = 0.02}, /*seed=*/3, action);
    std::vector<double> x(dims, 0.0), g(dims);
    std::vector<std::size_t> rows(batch);
    for (int b : stream) {
      for (std::size_t k = 0; k < batch; ++k) rows[k] = batch_row(comm.rank(), b, k);
      add_gradient(p, rows, x.data(), g.data());
      if (b == poisoned && comm.rank() == poisoned_rank) g[poisoned_index] = value;
      const std::vector<double> x_before = x;
      const auto m_before = as_vector(d.optimizer.exp_avg());
      const auto v_before = as_vector(d.optimizer.exp_avg_sq());
      const auto e_before = as_vector(d.aggregator.residual());
      const auto counters_before = d.aggregator.counters();
      const bool pending_before = d.aggregator.background_pending();
      const std::uint64_t steps_before = d.steps();
      const std::uint64_t collectives_before = comm.stats().collectives;
      int outcome = -1;
      try {
        outcome = d.step(seq, comm, lay, std::span<double>(x), std::span<const double>(g)) ? 1 : 0;
      } catch (const gcomp::error& e) {
        log.message = e.what();
      }
      log.outcome.push_back(outcome);
      log.collectives.push_back(comm.stats().collectives - collectives_before);
      if (outcome == 1) {
        log.taken_history.push_back(x);
      } else {
        log.unchanged = log.unchanged && x == x_before && as_vector(d.optimizer.exp_avg()) == m_before &&
                        as_vector(d.optimizer.exp_avg_sq()) == v_before &&
                        as_vector(d.aggregator.residual()) == e_before &&
                        same_counters(d.aggregator.counters(), counters_before) &&
                        d.aggregator.background_pending() == pending_before && d.steps() == steps_before;
      }
      if (b == poisoned && action == on_nonfinite::propagate && comm.rank() == poisoned_rank)
        log.propagated = !std::isfinite(d.aggregator.residual()[poisoned_index]) ||
                         !std::isfinite(x[poisoned_index]);
    }
    d.finish(seq, comm, std::span<double>(x));
    log.x = x;
    log.m = as_vector(d.optimizer.exp_avg());
    log.v = as_vector(d.optimizer.exp_avg_sq());
    log.residual = as_vector(d.aggregator.residual());
    log.counters = d.aggregator.counters();
    log.steps = d.steps();
    log.skipped = d.skipped_steps();
  });
  return logs;
}

std::vector<int> full_stream() {
  std::vector<int> s;
  for (int b = 0; b < stream_length; ++b) s.push_back(b);
  return s;
}

std::vector<int> stream_without_poisoned_batch() {
  std::vector<int> s;
  for (int b = 0; b < stream_length; ++b)
    if (b != poisoned_batch) s.push_back(b);
  return s;
}

// The run ended where `reference` (a run without the poisoned batch) ended, bitwise.
void check_same_end(const std::vector<run_log>& logs, const std::vector<run_log>& reference) {
  for (std::size_t w = 0; w < group_size; ++w) {
    CAPTURE(w);
    CHECK(logs[w].taken_history == reference[w].taken_history);
    CHECK(logs[w].x == reference[w].x);
    CHECK(logs[w].m == reference[w].m);
    CHECK(logs[w].v == reference[w].v);
    CHECK(logs[w].residual == reference[w].residual);
    CHECK(same_counters(logs[w].counters, reference[w].counters));
    CHECK(logs[w].steps == reference[w].steps);
  }
}

const background_payload payloads[] = {background_payload::none, background_payload::parameters,
                                       background_payload::residual};

}  // namespace

TEST_CASE("skip_step: NaN, +Inf or -Inf in one worker's gradient skips the step everywhere, background included") {
  for (background_payload payload : payloads) {
    CAPTURE(static_cast<int>(payload));
    const auto reference = run(on_nonfinite::skip_step, payload, stream_without_poisoned_batch());
    for (double value : non_finite_values) {
      CAPTURE(value);
      const auto logs = run(on_nonfinite::skip_step, payload, full_stream(), poisoned_batch, value);
      for (std::size_t w = 0; w < group_size; ++w) {
        CAPTURE(w);
        for (int call = 0; call < stream_length; ++call)
          CHECK(logs[w].outcome[std::size_t(call)] == (call == poisoned_batch ? 0 : 1));
        CHECK(logs[w].skipped == 1);
        CHECK(logs[w].steps == std::uint64_t(stream_length - 1));
        CHECK(logs[w].unchanged);
        // The check and the foreground; the skipped call stops after the check.
        // (The background's operations are counted when seen complete, so only
        // the run without one has a fixed count per call.)
        std::vector<std::uint64_t> collectives(stream_length, 2);
        collectives[poisoned_batch] = 1;
        if (payload == background_payload::none) CHECK(logs[w].collectives == collectives);
      }
      check_same_end(logs, reference);
      if (payload != background_payload::none) CHECK(logs[0].counters.applied > 0);
    }
  }
}

TEST_CASE("throw_error: every worker throws, nothing changes, and training goes on with the next batch") {
  for (background_payload payload : payloads) {
    CAPTURE(static_cast<int>(payload));
    const auto reference = run(on_nonfinite::throw_error, payload, stream_without_poisoned_batch());
    for (double value : non_finite_values) {
      CAPTURE(value);
      const auto logs = run(on_nonfinite::throw_error, payload, full_stream(), poisoned_batch, value);
      for (std::size_t w = 0; w < group_size; ++w) {
        CAPTURE(w);
        CAPTURE(logs[w].message);
        CHECK(logs[w].outcome[poisoned_batch] == -1);
        CHECK(logs[w].message.find("gcomp::divcomm::step: non-finite gradient on 1 of 3 workers") == 0);
        const std::string own = w == poisoned_rank
                                    ? "this worker has 1 non-finite entries, the first at index " +
                                          std::to_string(poisoned_index)
                                    : "(this worker's gradient is finite)";
        CHECK(logs[w].message.find(own) != std::string::npos);
        CHECK(logs[w].unchanged);
        CHECK(logs[w].skipped == 0);
      }
      check_same_end(logs, reference);
    }
  }
}

TEST_CASE("propagate: no check, no extra all-reduce, and the value flows through as before") {
  for (double value : non_finite_values) {
    CAPTURE(value);
    const auto logs = run(on_nonfinite::propagate, background_payload::none, full_stream(), poisoned_batch, value);
    for (std::size_t w = 0; w < group_size; ++w) {
      CHECK(logs[w].outcome == std::vector<int>(stream_length, 1));  // no step is refused
      CHECK(logs[w].collectives == std::vector<std::uint64_t>(stream_length, 1));  // the foreground only
      CHECK(logs[w].skipped == 0);
    }
    // It stays in worker 1's residual until its block is sent, then reaches everyone's parameters.
    CHECK(logs[poisoned_rank].propagated);
  }
}

TEST_CASE("the non-finite action: default skip_step, settable, checked, and not part of a checkpoint") {
  method d(block({.ratio = 0.25}), {.payload = background_payload::none});
  CHECK(d.nonfinite_action() == on_nonfinite::skip_step);
  CHECK(d.skipped_steps() == 0);
  d.set_nonfinite_action(on_nonfinite::propagate);
  CHECK(d.nonfinite_action() == on_nonfinite::propagate);
  CHECK_THROWS_AS(d.set_nonfinite_action(static_cast<on_nonfinite>(3)), gcomp::error);
  CHECK(d.nonfinite_action() == on_nonfinite::propagate);
  method other(block({.ratio = 0.25}), {.payload = background_payload::none}, {}, 0, on_nonfinite::throw_error);
  const auto bytes = gcomp::checkpoint_bytes(other);
  gcomp::load_checkpoint(seq, std::span<const std::byte>(bytes), d);
  CHECK(d.nonfinite_action() == on_nonfinite::propagate);
}

TEST_CASE("the skip count is saved: a resumed run reports the skips before the checkpoint") {
  gcomp::inproc_group group(1);
  auto& comm = group.comm(0);
  method d(block({.ratio = 0.25}), {.payload = background_payload::none});
  std::vector<double> x(dims, 1.0), g(dims, 0.5);
  CHECK(d.step(seq, comm, lay, std::span<double>(x), std::span<const double>(g)));
  g[3] = std::numeric_limits<double>::quiet_NaN();
  CHECK_FALSE(d.step(seq, comm, lay, std::span<double>(x), std::span<const double>(g)));
  CHECK_FALSE(d.step(seq, comm, lay, std::span<double>(x), std::span<const double>(g)));
  const auto bytes = gcomp::checkpoint_bytes(d);
  method fresh(block({.ratio = 0.25}), {.payload = background_payload::none});
  gcomp::load_checkpoint(seq, std::span<const std::byte>(bytes), fresh);
  CHECK(fresh.skipped_steps() == 2);
  CHECK(fresh.steps() == 1);
}
