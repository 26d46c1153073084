// JointSpar with NaN or Inf in one worker's gradient (3 in-process workers): skip_step skips the step on
// every worker with nothing changed and the run ends bitwise equal to a run that never saw that batch;
// throw_error throws on every worker with nothing changed; a NaN in an inactive layer is never read;
// propagate keeps the aggregated gradient's check and adds no communication.
#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "gcomp/algo/jointspar.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "least_squares.hpp"

using namespace gcomp::test::least_squares;
using gcomp::on_nonfinite;

namespace {

constexpr int group_size = 3;  // M; the least-squares shards 0..2
constexpr int stream_length = 20;
constexpr int poisoned_batch = 5;
constexpr int poisoned_rank = 1;
const gcomp::layout layered{{"l0", 8}, {"l1", 6}, {"l2", 4}, {"l3", 2}};
const gcomp::host_seq seq;

const double non_finite_values[] = {std::numeric_limits<double>::quiet_NaN(),
                                    std::numeric_limits<double>::infinity(),
                                    -std::numeric_limits<double>::infinity()};

// Which entry of the poisoned batch's gradient is overwritten, on one worker.
struct poison {
  int batch = -1;  // the position in the gradient stream; -1: none
  double value = 0.0;
  bool in_active_layer = true;  // else in a layer the step does not read
};

struct run_log {
  std::vector<double> x, probabilities, momentum;
  std::vector<std::uint8_t> taken_masks;  // the masks of the steps taken, concatenated
  std::vector<int> outcome;               // per call: 1 taken, 0 skipped, -1 threw
  std::vector<std::uint64_t> collectives; // per call, what comm.stats() counted
  std::vector<std::uint8_t> poisoned_mask, next_mask;  // the sets of the poisoned call and the call after
  std::size_t poisoned_index = 0;         // the gradient entry that was overwritten
  std::string message;                    // what the poisoned call threw
  bool unchanged = true;                  // the poisoned call left every state field as it was
  std::uint64_t steps = 0, skipped = 0;
};

std::vector<double> as_vector(std::span<const double> s) { return {s.begin(), s.end()}; }

// The batches in `stream` on every worker, each one call of begin_step + finish_step.
std::vector<run_log> run(on_nonfinite action, const std::vector<int>& stream, poison ps) {
  const problem p = make_problem(404);
  std::vector<run_log> logs(group_size);
  gcomp::inproc_group group(group_size);
  group.run([&](gcomp::inproc_comm& comm) {
    run_log& log = logs[std::size_t(comm.rank())];
    gcomp::jointspar_sgd<double> js(4, gcomp::sgd<double>({.lr = 0.01, .momentum = 0.9}),
                                    {.p_min = 0.1, .seed = 6}, action);
    std::vector<double> x(dims, 0.0), g(dims);
    std::vector<std::size_t> rows(batch);
    for (std::size_t call = 0; call < stream.size(); ++call) {
      const int b = stream[call];
      const gcomp::layer_mask view = js.begin_step();
      const std::vector<std::uint8_t> mask(view.begin(), view.end());
      for (std::size_t k = 0; k < batch; ++k) rows[k] = batch_row(comm.rank(), b, k);
      add_gradient(p, rows, x.data(), g.data());
      const bool poisoned = b == ps.batch;
      if (poisoned) {
        std::size_t layer = 4;
        for (std::size_t d = 4; d-- > 0;)
          if ((mask[d] != 0) == ps.in_active_layer) layer = d;
        REQUIRE(layer < 4);  // the seed's set at this step has both kinds
        log.poisoned_mask = mask;
        log.poisoned_index = layered[layer].offset + layered[layer].size / 2;
        if (comm.rank() == poisoned_rank) g[log.poisoned_index] = ps.value;
      }
      if (call > 0 && stream[call - 1] == ps.batch) log.next_mask = mask;
      const std::vector<double> x_before = x;
      const auto state_before = gcomp::checkpoint_bytes(js);
      const auto p_before = as_vector(js.probabilities());
      const auto momentum_before = as_vector(js.optimizer.momentum_buffer());
      const std::uint64_t steps_before = js.steps();
      const std::uint64_t collectives_before = comm.stats().collectives;
      int outcome = -1;
      try {
        outcome = js.finish_step(seq, comm, layered, std::span<double>(x), std::span<const double>(g)) ? 1 : 0;
      } catch (const gcomp::error& e) {
        log.message = e.what();
      }
      log.outcome.push_back(outcome);
      log.collectives.push_back(comm.stats().collectives - collectives_before);
      if (outcome == 1) {
        log.taken_masks.insert(log.taken_masks.end(), mask.begin(), mask.end());
      } else {
        // Skipped or thrown: parameters, probabilities, momentum, the step
        // count and the drawn set are as they were; a throw changes nothing
        // saved at all (a skip only counts itself).
        log.unchanged = log.unchanged && x == x_before && as_vector(js.probabilities()) == p_before &&
                        as_vector(js.optimizer.momentum_buffer()) == momentum_before &&
                        js.steps() == steps_before &&
                        std::vector<std::uint8_t>(js.mask().begin(), js.mask().end()) == mask &&
                        (outcome == 0 || gcomp::checkpoint_bytes(js) == state_before);
      }
    }
    log.x = x;
    log.probabilities = as_vector(js.probabilities());
    log.momentum = as_vector(js.optimizer.momentum_buffer());
    log.steps = js.steps();
    log.skipped = js.skipped_steps();
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
  for (std::size_t m = 0; m < group_size; ++m) {
    CAPTURE(m);
    CHECK(logs[m].x == reference[m].x);
    CHECK(logs[m].probabilities == reference[m].probabilities);
    CHECK(logs[m].momentum == reference[m].momentum);
    CHECK(logs[m].taken_masks == reference[m].taken_masks);
    CHECK(logs[m].steps == reference[m].steps);
    CHECK(logs[m].x == logs[0].x);  // and the workers agree
  }
}

}  // namespace

TEST_CASE("skip_step: NaN, +Inf or -Inf in an active layer of one worker skips the step everywhere") {
  const auto reference = run(on_nonfinite::skip_step, stream_without_poisoned_batch(), {});
  for (double value : non_finite_values) {
    CAPTURE(value);
    const auto logs = run(on_nonfinite::skip_step, full_stream(), {poisoned_batch, value, true});
    for (std::size_t m = 0; m < group_size; ++m) {
      CAPTURE(m);
      for (int call = 0; call < stream_length; ++call)
        CHECK(logs[m].outcome[std::size_t(call)] == (call == poisoned_batch ? 0 : 1));
      CHECK(logs[m].skipped == 1);
      CHECK(logs[m].steps == std::uint64_t(stream_length - 1));
      CHECK(logs[m].unchanged);
      CHECK(logs[m].next_mask == logs[m].poisoned_mask);  // the retry reads the same set
      // The check's all-reduce and the gradient's; the skipped call stops after the check.
      std::vector<std::uint64_t> collectives(stream_length, 2);
      collectives[poisoned_batch] = 1;
      CHECK(logs[m].collectives == collectives);
    }
    check_same_end(logs, reference);
  }
}

TEST_CASE("throw_error: every worker throws, nothing changes, and training goes on with the next batch") {
  const auto reference = run(on_nonfinite::throw_error, stream_without_poisoned_batch(), {});
  for (double value : non_finite_values) {
    CAPTURE(value);
    const auto logs = run(on_nonfinite::throw_error, full_stream(), {poisoned_batch, value, true});
    for (std::size_t m = 0; m < group_size; ++m) {
      CAPTURE(m);
      CAPTURE(logs[m].message);
      CHECK(logs[m].outcome[poisoned_batch] == -1);
      CHECK(logs[m].message.find("gcomp::jointspar::finish_step: non-finite gradient on 1 of 3 workers") == 0);
      const std::string own = m == poisoned_rank
                                  ? "this worker has 1 non-finite entries, the first at index " +
                                        std::to_string(logs[m].poisoned_index)
                                  : "(this worker's gradient is finite)";
      CHECK(logs[m].message.find(own) != std::string::npos);
      CHECK(logs[m].unchanged);  // every saved field, the guard's counts included
      CHECK(logs[m].skipped == 0);
      CHECK(logs[m].next_mask == logs[m].poisoned_mask);
    }
    check_same_end(logs, reference);
  }
}

TEST_CASE("a NaN or Inf in an inactive layer is never read: no skip, no throw, the run is unchanged") {
  for (on_nonfinite action : {on_nonfinite::skip_step, on_nonfinite::throw_error, on_nonfinite::propagate}) {
    CAPTURE(gcomp::to_string(action));
    const auto reference = run(action, full_stream(), {});
    for (double value : non_finite_values) {
      CAPTURE(value);
      const auto logs = run(action, full_stream(), {poisoned_batch, value, false});
      for (std::size_t m = 0; m < group_size; ++m) {
        CHECK(logs[m].outcome == std::vector<int>(stream_length, 1));
        CHECK(logs[m].skipped == 0);
      }
      check_same_end(logs, reference);
    }
  }
}

TEST_CASE("propagate: no check and no extra all-reduce; the aggregated gradient's check still throws") {
  const auto reference = run(on_nonfinite::propagate, stream_without_poisoned_batch(), {});
  for (double value : non_finite_values) {
    CAPTURE(value);
    const auto logs = run(on_nonfinite::propagate, full_stream(), {poisoned_batch, value, true});
    for (std::size_t m = 0; m < group_size; ++m) {
      CAPTURE(m);
      CAPTURE(logs[m].message);
      CHECK(logs[m].outcome[poisoned_batch] == -1);  // on every worker: the sum they see is the same
      CHECK(logs[m].message.find("gcomp::jointspar::finish_step: the aggregated gradient of layer '") == 0);
      CHECK(logs[m].message.find("' is not finite") != std::string::npos);
      CHECK(logs[m].unchanged);
      CHECK(logs[m].skipped == 0);
      // Only the gradient's all-reduce, every step.
      CHECK(logs[m].collectives == std::vector<std::uint64_t>(stream_length, 1));
    }
    check_same_end(logs, reference);
  }
}

TEST_CASE("the non-finite action: default skip_step, settable, checked") {
  gcomp::jointspar_sgd<float> js(3, gcomp::sgd<float>());
  CHECK(js.nonfinite_action() == on_nonfinite::skip_step);
  CHECK(js.skipped_steps() == 0);
  js.set_nonfinite_action(on_nonfinite::throw_error);
  CHECK(js.nonfinite_action() == on_nonfinite::throw_error);
  CHECK_THROWS_AS(js.set_nonfinite_action(static_cast<on_nonfinite>(7)), gcomp::error);
  CHECK(js.nonfinite_action() == on_nonfinite::throw_error);
  // The action is configuration: a load keeps this object's.
  gcomp::jointspar_sgd<float> other(3, gcomp::sgd<float>(), {}, on_nonfinite::propagate);
  const auto bytes = gcomp::checkpoint_bytes(other);
  gcomp::load_checkpoint(seq, std::span<const std::byte>(bytes), js);
  CHECK(js.nonfinite_action() == on_nonfinite::throw_error);
}
