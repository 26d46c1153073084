// RI-SGD checkpoints (2N steps == N + save + load into a fresh worker + N, bitwise, removals kept) and its non-finite rule (a local skip that keeps the rounds in step).
#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "gcomp/algo/ri_sgd.hpp"
#include "gcomp/comm/inproc.hpp"
#include "least_squares.hpp"
#include "checkpoint_checks.hpp"

using namespace gcomp::test::least_squares;

using gcomp::test::same_bits;

namespace {

const gcomp::layout lay{{"w", 16}, {"b", 4}};

gcomp::ri_sgd_options options(gcomp::on_nonfinite action = gcomp::on_nonfinite::skip_step) {
  gcomp::ri_sgd_options o;
  o.redundancy = 0.25;
  o.period = 4;
  o.own_batch = 8;
  o.optimizer = {.lr = 0.01, .momentum = 0.9};
  o.seed = 17;
  o.nonfinite = action;
  return o;
}

// Local steps [from, to) of one worker: the gradient on ri.batch(), then
// ri.step(). poison(t) may overwrite the gradient of step t.
template <class Poison>
void train(const problem& p, gcomp::ri_sgd<double>& ri, gcomp::inproc_comm& comm,
           std::vector<double>& x, int from, int to, Poison poison) {
  std::vector<double> g(dims);
  for (int t = from; t < to; ++t) {
    const auto batch = ri.batch();
    add_gradient(p, std::vector<std::size_t>(batch.begin(), batch.end()), x.data(), g.data());
    poison(t, g);
    ri.step(gcomp::host_seq{}, comm, lay, std::span<double>(x), std::span<const double>(g));
  }
}

const auto no_poison = [](int, std::vector<double>&) {};


}  // namespace

TEST_CASE("ri_sgd: 2N steps equal N, a checkpoint, a fresh worker and N more, bitwise") {
  const problem p = make_problem(31);
  constexpr int n = 10;  // not a multiple of the period: the checkpoint falls between rounds
  std::vector<std::vector<double>> straight(workers), resumed(workers);
  std::vector<std::vector<std::byte>> saved(workers), final_state(workers), resumed_state(workers);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    const int m = comm.rank();
    gcomp::ri_sgd<double> ri(p.rows(), workers, m, options());
    std::vector<double> x(dims, 0.0);
    train(p, ri, comm, x, 0, n, no_poison);
    saved[m] = gcomp::checkpoint_bytes(ri);
    train(p, ri, comm, x, n, 2 * n, no_poison);
    straight[m] = x;
    final_state[m] = gcomp::checkpoint_bytes(ri);
  });
  group.run([&](gcomp::inproc_comm& comm) {
    const int m = comm.rank();
    // The parameters are the trainer's: rebuild them by replaying the first half.
    gcomp::ri_sgd<double> warmup(p.rows(), workers, m, options());
    std::vector<double> x(dims, 0.0);
    train(p, warmup, comm, x, 0, n, no_poison);
    gcomp::ri_sgd<double> ri(p.rows(), workers, m, options());
    gcomp::load_checkpoint(gcomp::host_seq{}, std::span<const std::byte>(saved[m]), ri);
    CHECK(ri.steps() == n);
    CHECK(ri.rounds() == n / 4);
    train(p, ri, comm, x, n, 2 * n, no_poison);
    resumed[m] = x;
    resumed_state[m] = gcomp::checkpoint_bytes(ri);
  });
  for (int m = 0; m < workers; ++m) {
    CAPTURE(m);
    CHECK(same_bits(straight[m], resumed[m]));
    CHECK(final_state[m] == resumed_state[m]);
  }
  // A fresh worker that skips the load ends elsewhere: the momentum matters.
  std::vector<std::vector<double>> cold(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    const int m = comm.rank();
    gcomp::ri_sgd<double> warmup(p.rows(), workers, m, options());
    std::vector<double> x(dims, 0.0);
    train(p, warmup, comm, x, 0, n, no_poison);
    gcomp::ri_sgd<double> ri(p.rows(), workers, m, options());
    train(p, ri, comm, x, 0, n, no_poison);
    cold[m] = x;
  });
  CHECK_FALSE(same_bits(cold[0], straight[0]));
}

TEST_CASE("ri_sgd checkpoints keep removed workers and reject another plan or worker") {
  gcomp::ri_sgd<float> a(400, 4, 1, gcomp::local_sgd_options());
  a.remove_worker(3);
  const auto bytes = gcomp::checkpoint_bytes(a);
  gcomp::ri_sgd<float> b(400, 4, 1, gcomp::local_sgd_options());
  gcomp::load_checkpoint(gcomp::host_seq{}, std::span<const std::byte>(bytes), b);
  CHECK(b.plan().survivors() == std::vector<int>{0, 1, 2});
  CHECK(gcomp::checkpoint_bytes(b) == bytes);

  auto rejects = [&](gcomp::ri_sgd<float> other, const std::string& text) {
    const auto before = gcomp::checkpoint_bytes(other);
    try {
      gcomp::load_checkpoint(gcomp::host_seq{}, std::span<const std::byte>(bytes), other);
      FAIL("no error");
    } catch (const gcomp::error& e) {
      CHECK_MESSAGE(std::string(e.what()).find(text) != std::string::npos, e.what());
    }
    CHECK(gcomp::checkpoint_bytes(other) == before);
  };
  rejects(gcomp::ri_sgd<float>(400, 4, 2, gcomp::local_sgd_options()),
          "the checkpoint is worker 1's, this is worker 2's");
  rejects(gcomp::ri_sgd<float>(500, 4, 1, gcomp::local_sgd_options()), "400 samples");
  gcomp::ri_sgd<float> removed(400, 4, 1, gcomp::local_sgd_options());
  removed.remove_worker(0);
  rejects(removed, "worker 0 survives in the checkpoint but was removed here");

  auto corrupt = bytes;
  corrupt[40] ^= std::byte{4};
  gcomp::ri_sgd<float> c(400, 4, 1, gcomp::local_sgd_options());
  CHECK_THROWS_WITH_AS(
      gcomp::load_checkpoint(gcomp::host_seq{}, std::span<const std::byte>(corrupt), c),
      doctest::Contains("checksum mismatch"), gcomp::error);
}

TEST_CASE("ri_sgd: a non-finite local gradient is skipped on that worker only, rounds stay in step") {
  const problem p = make_problem(32);
  constexpr int steps = 16, poisoned_at = 5, poisoned_rank = 2;  // step 5 is not a round (period 4)
  for (double bad : {std::numeric_limits<double>::quiet_NaN(),
                     std::numeric_limits<double>::infinity(),
                     -std::numeric_limits<double>::infinity()}) {
    CAPTURE(bad);
    std::vector<std::vector<double>> hit(workers), clean(workers);
    std::vector<std::uint64_t> skipped(workers), rounds(workers);
    gcomp::inproc_group group(workers);
    for (bool poison : {true, false}) {
      group.run([&](gcomp::inproc_comm& comm) {
        const int m = comm.rank();
        gcomp::ri_sgd<double> ri(p.rows(), workers, m, options());
        std::vector<double> x(dims, 0.0), g(dims);
        for (int t = 0; t < steps; ++t) {
          const auto batch = ri.batch();
          add_gradient(p, std::vector<std::size_t>(batch.begin(), batch.end()), x.data(), g.data());
          const bool poisoned = poison && t == poisoned_at && m == poisoned_rank;
          if (poisoned) g[3] = bad;
          const auto x_before = x;
          const auto momentum_before = gcomp::checkpoint_bytes(ri.optimizer());
          ri.step(gcomp::host_seq{}, comm, lay, std::span<double>(x), std::span<const double>(g));
          CHECK(ri.steps() == std::uint64_t(t + 1));  // counted, skipped or not
          if (poisoned) {  // the local model and its momentum are as they were
            CHECK(same_bits(x, x_before));
            CHECK(gcomp::checkpoint_bytes(ri.optimizer()) == momentum_before);
          } else {
            CHECK_FALSE(same_bits(x, x_before));
          }
        }
        (poison ? hit : clean)[m] = x;
        if (poison) {
          skipped[m] = ri.skipped_steps();
          rounds[m] = ri.rounds();
        }
      });
    }
    for (int m = 0; m < workers; ++m) {
      CAPTURE(m);
      CHECK(skipped[m] == (m == poisoned_rank ? 1u : 0u));  // a local decision
      CHECK(rounds[m] == steps / 4);                         // nobody missed a round
      for (double v : hit[m]) CHECK(std::isfinite(v));
    }
    // After the last round every worker holds the same average, which the
    // skipped step changed (it is not the clean run's).
    for (int m = 1; m < workers; ++m) CHECK(same_bits(hit[m], hit[0]));
    CHECK_FALSE(same_bits(hit[0], clean[0]));
  }
}

TEST_CASE("ri_sgd: throw_error throws before anything changes") {
  const problem p = make_problem(33);
  gcomp::inproc_group one(1);
  one.run([&](gcomp::inproc_comm& comm) {
    gcomp::ri_sgd<double> ri(p.rows(), 1, 0, [] {
      auto o = options(gcomp::on_nonfinite::throw_error);
      o.redundancy = 0.0;
      return o;
    }());
    std::vector<double> x(dims, 0.5), g(dims, 1.0);
    g[7] = std::numeric_limits<double>::infinity();
    const auto before = gcomp::checkpoint_bytes(ri);
    CHECK_THROWS_WITH_AS(
        ri.step(gcomp::host_seq{}, comm, lay, std::span<double>(x), std::span<const double>(g)),
        doctest::Contains("1 non-finite entries (first at index 7)"), gcomp::error);
    CHECK(gcomp::checkpoint_bytes(ri) == before);
    CHECK(ri.steps() == 0);
    for (double v : x) CHECK(v == 0.5);
  });
}
