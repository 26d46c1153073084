// gcomp::pipeline with a NaN or Inf gradient on one worker: skip_step, throw_error and propagate, against a run that never saw the step.
#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "gcomp/gcomp.hpp"

namespace {

constexpr int workers = 3;
constexpr int positions = 12;      // gradients in the stream
constexpr int poisoned_at = 5;     // the stream position whose gradient is poisoned
constexpr int poisoned_rank = 1;   // ... on this worker only
constexpr std::size_t poisoned_index = 123;

const gcomp::layout lay{{"a", 300}, {"b", 50}, {"c", 7}};

// The gradient worker m computes at stream position t: it depends on the
// parameters (as a real gradient does) and on (m, t) through a fixed noise.
void gradient(int m, int t, std::span<const float> x, std::span<float> g) {
  std::mt19937 gen(static_cast<unsigned>(1000 * m + t));
  std::normal_distribution<float> noise(0.0f, 1.0f);
  for (std::size_t i = 0; i < g.size(); ++i) g[i] = 0.1f * x[i] + noise(gen);
}

struct run_result {
  std::vector<std::vector<float>> params;           // per worker
  std::vector<std::vector<std::byte>> state;        // per worker: checkpoint of the parts
  std::vector<std::vector<int>> outcomes;           // per worker, per position: 1 stepped, 0 skipped, -1 threw
  std::vector<std::string> errors;                  // per worker: the message thrown at the poisoned step
  std::vector<std::uint64_t> skipped, steps;        // per worker
  std::vector<gcomp::comm_stats> stats;
};

// Runs the stream on `workers` in-process workers: without the poisoned
// position (poison = false), or with worker 1's gradient there poisoned by `bad`.
template <class MakePipeline, class Policy>
run_result run(MakePipeline make, const Policy& policy, gcomp::on_nonfinite action, bool poison,
               float bad) {
  run_result r;
  r.params.resize(workers);
  r.state.resize(workers);
  r.outcomes.resize(workers);
  r.errors.resize(workers);
  r.skipped.resize(workers);
  r.steps.resize(workers);
  r.stats.resize(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    const int m = comm.rank();
    auto pipe = make();
    pipe.set_nonfinite_action(action);
    std::vector<float> x(lay.total_size(), 0.5f), g(lay.total_size());
    for (int t = 0; t < positions; ++t) {
      if (t == poisoned_at && !poison) continue;
      gradient(m, t, x, g);
      if (t == poisoned_at && m == poisoned_rank) g[poisoned_index] = bad;
      if (t == poisoned_at) {
        const auto before_x = x;
        const auto before_state = gcomp::checkpoint_bytes(pipe);
        const auto before_parts =
            gcomp::checkpoint_bytes(pipe.compressor, pipe.aggregator, pipe.optimizer);
        const auto before_steps = pipe.steps();
        try {
          r.outcomes[m].push_back(pipe.step(policy, comm, lay, std::span<float>(x),
                                             std::span<const float>(g))
                                      ? 1
                                      : 0);
        } catch (const gcomp::error& e) {
          r.outcomes[m].push_back(-1);
          r.errors[m] = e.what();
          // A throwing step changes nothing.
          CHECK(std::memcmp(x.data(), before_x.data(), x.size() * sizeof(float)) == 0);
          CHECK(gcomp::checkpoint_bytes(pipe) == before_state);
        }
        if (r.outcomes[m].back() == 0) {  // a skipped step changes nothing but the counters
          CHECK(std::memcmp(x.data(), before_x.data(), x.size() * sizeof(float)) == 0);
          CHECK(gcomp::checkpoint_bytes(pipe.compressor, pipe.aggregator, pipe.optimizer) ==
                before_parts);
          CHECK(pipe.steps() == before_steps);
        }
        continue;
      }
      r.outcomes[m].push_back(
          pipe.step(policy, comm, lay, std::span<float>(x), std::span<const float>(g)) ? 1 : 0);
    }
    r.params[m] = x;
    r.state[m] = gcomp::checkpoint_bytes(pipe.compressor, pipe.aggregator, pipe.optimizer);
    r.skipped[m] = pipe.skipped_steps();
    r.steps[m] = pipe.steps();
    r.stats[m] = comm.stats();
  });
  return r;
}

auto dense_sgd() {
  return gcomp::pipeline{gcomp::identity<float>{}, gcomp::allreduce{},
                         gcomp::sgd<float>{{.lr = 0.05, .momentum = 0.9}}, 11};
}
auto topk_ef_adam() {
  return gcomp::pipeline{gcomp::error_feedback<gcomp::topk<float>>(
                             gcomp::topk<float>({.ratio = 0.05}, lay)),
                         gcomp::allgather{}, gcomp::adam<float>{{.lr = 1e-2}}, 12};
}
auto qsgd_lamb() {
  return gcomp::pipeline{gcomp::qsgd<float>({.levels = 7, .bucket = 64}), gcomp::allgather{},
                         gcomp::lamb<float>{{.lr = 1e-2}}, 13};
}
auto randomk_ef_lars() {
  using rk = gcomp::randomk<float, gcomp::key_use::shared, gcomp::rescale::none>;
  return gcomp::pipeline{gcomp::error_feedback<rk>(rk({.ratio = 0.2}, lay)), gcomp::allreduce{},
                         gcomp::lars<float>{{.lr = 0.1, .momentum = 0.9}}, 14};
}

template <class Make, class Policy>
void check_skip(Make make, const Policy& policy, float bad) {
  const run_result clean = run(make, policy, gcomp::on_nonfinite::skip_step, false, 0.0f);
  const run_result hit = run(make, policy, gcomp::on_nonfinite::skip_step, true, bad);
  for (int m = 0; m < workers; ++m) {
    CAPTURE(m);
    // Every worker skipped exactly the poisoned position, though only one saw it.
    REQUIRE(hit.outcomes[m].size() == positions);
    for (int t = 0; t < positions; ++t) CHECK(hit.outcomes[m][t] == (t == poisoned_at ? 0 : 1));
    CHECK(hit.skipped[m] == 1);
    CHECK(clean.skipped[m] == 0);
    CHECK(hit.steps[m] == positions - 1);
    // ... and ended bitwise where the run without that gradient ended.
    CHECK(std::memcmp(hit.params[m].data(), clean.params[m].data(),
                      hit.params[m].size() * sizeof(float)) == 0);
    CHECK(hit.state[m] == clean.state[m]);
  }
  for (int m = 1; m < workers; ++m)
    CHECK(std::memcmp(hit.params[m].data(), hit.params[0].data(),
                      hit.params[0].size() * sizeof(float)) == 0);
}

const float poisons[] = {std::numeric_limits<float>::quiet_NaN(),
                         std::numeric_limits<float>::infinity(),
                         -std::numeric_limits<float>::infinity()};

}  // namespace

TEST_CASE("skip_step: every worker skips a step poisoned on one, and the run equals one without it") {
  for (float bad : poisons) {
    CAPTURE(bad);
    SUBCASE("identity + allreduce + sgd") { check_skip(dense_sgd, gcomp::host_seq{}, bad); }
    SUBCASE("error_feedback<topk> + allgather + adam") {
      check_skip(topk_ef_adam, gcomp::host_seq{}, bad);
    }
    SUBCASE("qsgd + allgather + lamb (random keys replay)") {
      check_skip(qsgd_lamb, gcomp::host_seq{}, bad);
    }
    SUBCASE("error_feedback<randomk> + allreduce + lars") {
      check_skip(randomk_ef_lars, gcomp::host_seq{}, bad);
    }
    SUBCASE("host_par") { check_skip(topk_ef_adam, gcomp::host_par(3), bad); }
  }
}

TEST_CASE("throw_error: every worker throws, names the culprit, and changes nothing") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const run_result clean = run(topk_ef_adam, gcomp::host_seq{}, gcomp::on_nonfinite::throw_error,
                               false, 0.0f);
  const run_result hit = run(topk_ef_adam, gcomp::host_seq{}, gcomp::on_nonfinite::throw_error,
                             true, nan);
  for (int m = 0; m < workers; ++m) {
    CAPTURE(m);
    CHECK(hit.outcomes[m][poisoned_at] == -1);
    CHECK(hit.errors[m].find("gcomp::pipeline::step: non-finite gradient on 1 of 3 workers") !=
          std::string::npos);
    if (m == poisoned_rank)
      CHECK(hit.errors[m].find("1 non-finite entries, the first at index 123") !=
            std::string::npos);
    else
      CHECK(hit.errors[m].find("this worker's gradient is finite") != std::string::npos);
    CHECK(hit.skipped[m] == 0);
    // The workers caught the error and went on: the run equals the clean one.
    CHECK(std::memcmp(hit.params[m].data(), clean.params[m].data(),
                      hit.params[m].size() * sizeof(float)) == 0);
    CHECK(hit.state[m] == clean.state[m]);
  }
}

TEST_CASE("propagate: no check, no extra collective, and the NaN reaches every worker") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const run_result guarded =
      run(dense_sgd, gcomp::host_seq{}, gcomp::on_nonfinite::skip_step, false, 0.0f);
  const run_result free =
      run(dense_sgd, gcomp::host_seq{}, gcomp::on_nonfinite::propagate, false, 0.0f);
  const run_result hit = run(dense_sgd, gcomp::host_seq{}, gcomp::on_nonfinite::propagate, true, nan);
  const std::uint64_t steps = positions - 1;
  for (int m = 0; m < workers; ++m) {
    CAPTURE(m);
    // The guard's price, exactly: one collective and one float per step.
    CHECK(free.stats[m].collectives == steps);
    CHECK(guarded.stats[m].collectives == 2 * steps);
    CHECK(guarded.stats[m].bytes_sent == free.stats[m].bytes_sent + steps * sizeof(float));
    CHECK(guarded.params[m] == free.params[m]);
    CHECK(std::isnan(hit.params[m][poisoned_index]));
    CHECK(hit.skipped[m] == 0);
    CHECK(hit.steps[m] == positions);
  }
}

TEST_CASE("the guard on its own: counts, first index, masks, local decisions") {
  std::vector<float> g(40, 1.0f);
  g[17] = std::numeric_limits<float>::infinity();
  g[31] = std::numeric_limits<float>::quiet_NaN();
  CHECK(gcomp::count_nonfinite(gcomp::host_seq{}, std::span<const float>(g)) == 2);
  CHECK(gcomp::count_nonfinite(gcomp::host_par(3), std::span<const float>(g)) == 2);
  CHECK(gcomp::first_nonfinite(gcomp::host_par(3), std::span<const float>(g)) == 17);
  g[17] = std::numeric_limits<float>::max();  // large but finite
  g[31] = std::numeric_limits<float>::denorm_min();
  CHECK(gcomp::count_nonfinite(gcomp::host_seq{}, std::span<const float>(g)) == 0);
  CHECK(gcomp::first_nonfinite(gcomp::host_seq{}, std::span<const float>(g)) == g.size());
  CHECK(gcomp::nonfinite_flag(gcomp::to_float16(1e5f)) == 1);  // overflows float16 to Inf
  CHECK(gcomp::nonfinite_flag(gcomp::to_bfloat16(1e5f)) == 0);

  // With a mask, only the active layers are read.
  const gcomp::layout two{{"x", 20}, {"y", 20}};
  g[25] = std::numeric_limits<float>::quiet_NaN();
  gcomp::inproc_group one(1);
  one.run([&](gcomp::inproc_comm& comm) {
    gcomp::nonfinite_guard<float> guard(gcomp::on_nonfinite::throw_error);
    const std::vector<std::uint8_t> only_x{1, 0}, only_y{0, 1};
    CHECK(guard.admit(gcomp::host_seq{}, comm, two, gcomp::layer_mask(only_x),
                      std::span<const float>(g), "test"));
    try {
      guard.admit(gcomp::host_seq{}, comm, two, gcomp::layer_mask(only_y),
                  std::span<const float>(g), "test");
      FAIL("no error");
    } catch (const gcomp::error& e) {
      CHECK(std::string(e.what()).find("the first at index 25") != std::string::npos);
    }
    gcomp::nonfinite_guard<float> local;
    CHECK_FALSE(local.admit_local(gcomp::host_seq{}, std::span<const float>(g), "test"));
    CHECK(local.skipped_steps() == 1);
    CHECK(local.local_nonfinite_steps() == 1);
    CHECK(comm.stats().collectives == 2);  // admit() twice; admit_local never communicates
  });
  CHECK_THROWS_AS(gcomp::nonfinite_guard<float>(static_cast<gcomp::on_nonfinite>(7)), gcomp::error);
}

TEST_CASE("pipeline checkpoints keep the skip count and reject another seed") {
  auto a = topk_ef_adam();
  gcomp::inproc_group one(1);
  std::vector<float> x(lay.total_size(), 0.5f), g(lay.total_size());
  one.run([&](gcomp::inproc_comm& comm) {
    for (int t = 0; t < 4; ++t) {
      gradient(0, t, x, g);
      if (t == 2) g[3] = std::numeric_limits<float>::quiet_NaN();
      a.step(gcomp::host_seq{}, comm, lay, std::span<float>(x), std::span<const float>(g));
    }
  });
  REQUIRE(a.skipped_steps() == 1);
  REQUIRE(a.steps() == 3);
  const auto bytes = gcomp::checkpoint_bytes(a);
  auto b = topk_ef_adam();
  gcomp::load_checkpoint(gcomp::host_seq{}, bytes, b);
  CHECK(b.skipped_steps() == 1);
  CHECK(b.steps() == 3);
  CHECK(gcomp::checkpoint_bytes(b) == bytes);

  auto other_seed = gcomp::pipeline{gcomp::error_feedback<gcomp::topk<float>>(
                                        gcomp::topk<float>({.ratio = 0.05}, lay)),
                                    gcomp::allgather{}, gcomp::adam<float>{{.lr = 1e-2}}, 99};
  const auto before = gcomp::checkpoint_bytes(other_seed);
  try {
    gcomp::load_checkpoint(gcomp::host_seq{}, bytes, other_seed);
    FAIL("no error");
  } catch (const gcomp::error& e) {
    CHECK(std::string(e.what()).find("written with seed 12 but this pipeline has seed 99") !=
          std::string::npos);
  }
  CHECK(gcomp::checkpoint_bytes(other_seed) == before);
}
