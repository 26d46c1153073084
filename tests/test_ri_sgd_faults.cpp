// RI-SGD with a worker failing silently mid-average: the others time out, shrink, redo the round, converge.
#include <doctest/doctest.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "gcomp/algo/ri_sgd.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/exec/host.hpp"
#include "least_squares.hpp"

using namespace gcomp::test::least_squares;
using namespace std::chrono_literals;

namespace {

using clock_type = std::chrono::steady_clock;

const gcomp::layout lay{{"w", 16}, {"b", 4}};

constexpr std::size_t period = 10, rounds = 40, steps = period * rounds;
constexpr std::uint64_t failing_round = 7;  // worker 2's 8th all-reduce is its 8th round
constexpr std::size_t failing_step = (failing_round + 1) * period - 1;
constexpr int lost = 2;
constexpr std::chrono::milliseconds timeout = 300ms;
constexpr std::chrono::seconds slack = 5s;  // scheduling delay past the deadline, not the design

gcomp::ri_sgd_options options() {
  gcomp::ri_sgd_options o;
  o.redundancy = 0.25;  // mu * M = 1: worker 1 holds all of shard 2
  o.period = period;
  o.own_batch = 32;
  o.seed = 11;
  o.optimizer = {.lr = 0.005, .momentum = 0.9, .weight_decay = 0.0};
  return o;
}

// One local step of worker `ri` on comm: the gradient on its batch, then ri.step().
void local_step(const problem& p, gcomp::ri_sgd<double>& ri, gcomp::inproc_comm& comm,
                std::vector<double>& x, std::vector<std::size_t>& rows, std::vector<double>& g) {
  const auto batch = ri.batch();
  rows.assign(batch.begin(), batch.end());
  add_gradient(p, rows, x.data(), g.data());
  ri.step(gcomp::host_seq{}, comm, lay, std::span<double>(x), std::span<const double>(g));
}

struct worker_result {
  std::vector<double> x;
  std::string message;          // the error the failure raised on this worker
  std::size_t failed_at = 0;    // the step it raised it in
  std::chrono::nanoseconds blocked{0};
  std::vector<int> failed;      // failed_ranks() then
  bool covered = false;         // remove_worker's answer
  std::string refused;          // step() while the round was pending
  std::uint64_t rounds = 0;
  gcomp::comm_stats traffic;
  int errors = 0;
};

// The oracle: the four workers train cleanly up to the failing step, worker
// 2 leaves, and the other three train the rest as a group of three. The
// failing step's local step followed by an average over the survivors is
// exactly what recovery must reproduce.
std::vector<std::vector<double>> clean_departure(const problem& p) {
  std::vector<gcomp::ri_sgd<double>> ri;
  for (int m = 0; m < workers; ++m) ri.emplace_back(p.rows(), workers, m, options());
  std::vector<std::vector<double>> xs(workers, std::vector<double>(dims, 0.0));
  gcomp::inproc_group all(workers);
  all.run([&](gcomp::inproc_comm& c) {
    const auto m = std::size_t(c.rank());
    std::vector<std::size_t> rows;
    std::vector<double> g(dims);
    for (std::size_t t = 0; t < failing_step; ++t) local_step(p, ri[m], c, xs[m], rows, g);
  });
  for (auto& r : ri) r.remove_worker(lost);
  const int survivors[] = {0, 1, 3};
  gcomp::inproc_group rest(3);
  rest.run([&](gcomp::inproc_comm& c) {
    const auto m = std::size_t(survivors[c.rank()]);
    std::vector<std::size_t> rows;
    std::vector<double> g(dims);
    for (std::size_t t = failing_step; t < steps; ++t) local_step(p, ri[m], c, xs[m], rows, g);
  });
  return xs;
}

}  // namespace

TEST_CASE("ri_sgd: a worker failing mid-average; the others time out, shrink, redo the round and "
          "converge") {
  const problem p = make_problem(7);
  const std::vector<double> optimum = least_squares_optimum(p);
  const std::vector<double> zero(dims, 0.0);
  const double start_loss = loss(p, zero.data()), best = loss(p, optimum.data());
  const std::vector<std::vector<double>> oracle = clean_departure(p);

  using gcomp::inproc_fault_point;
  for (auto point : {inproc_fault_point::after_post, inproc_fault_point::before_post}) {
    const bool after = point == inproc_fault_point::after_post;
    CAPTURE(after);
    gcomp::inproc_options group_options;
    group_options.timeout = timeout;
    gcomp::inproc_group group(workers, group_options);
    group.inject_failure(lost, failing_round, point);
    std::vector<worker_result> out(workers);
    std::string run_message;
    try {
      group.run([&](gcomp::inproc_comm& c) {
        worker_result& me = out[std::size_t(c.rank())];
        gcomp::ri_sgd<double> ri(p.rows(), workers, c.rank(), options());
        std::vector<double> x(dims, 0.0), g(dims);
        std::vector<std::size_t> rows;
        gcomp::inproc_comm* comm = &c;
        for (std::size_t t = 0; t < steps; ++t) {
          const auto start = clock_type::now();
          try {
            local_step(p, ri, *comm, x, rows, g);
          } catch (const gcomp::error& e) {
            ++me.errors;
            me.blocked = clock_type::now() - start;
            me.message = e.what();
            me.failed_at = t;
            me.failed = comm->failed_ranks();
            // Ranks of the current communicator name workers through the plan.
            const std::vector<int> members = ri.plan().survivors();
            for (int r : me.failed) me.covered = ri.remove_worker(members[std::size_t(r)]);
            gcomp::inproc_comm& survivors = comm->shrink();
            try {
              local_step(p, ri, survivors, x, rows, g);
            } catch (const gcomp::error& refusal) {
              me.refused = refusal.what();
            }
            ri.redo_average(gcomp::host_seq{}, survivors, std::span<double>(x));
            comm = &survivors;
          }
        }
        me.x = x;
        me.rounds = ri.rounds();
        me.traffic = ri.traffic();
      });
    } catch (const gcomp::error& e) {
      run_message = e.what();
    }

    const std::string saw =
        after ? "timed out after 300 ms: rank 2 entered allreduce_sum but did not finish it (ranks "
                "0, 1, 3 did); it counts as failed"
              : "timed out after 300 ms: rank 2 did not enter allreduce_sum (ranks 0, 1, 3 did); "
                "it counts as failed";
    CHECK(run_message ==
          "gcomp::inproc_group::run: worker 2 was stopped silently by an injected failure in "
          "allreduce_sum, its collective call #7, " +
              std::string(after ? "after" : "before") + " posting it; the others saw: " + saw);
    std::chrono::nanoseconds longest{0};
    for (int w : {0, 1, 3}) {
      const worker_result& r = out[std::size_t(w)];
      INFO("worker ", w, ": ", r.message);
      CHECK(r.errors == 1);
      CHECK(r.failed_at == failing_step);
      CHECK(r.message == "gcomp::inproc_comm::allreduce_sum: " + saw);
      CHECK(r.blocked < timeout + slack);
      CHECK(r.failed == std::vector<int>{lost});
      CHECK(r.covered);  // mu * M = 1: no sample was lost with worker 2
      CHECK(r.refused ==
            "gcomp::ri_sgd::step: the averaging round of the last step failed and is pending; "
            "call redo_average with the communicator of the remaining workers first");
      // Every round counted once, the failed one in its redone form only.
      CHECK(r.rounds == rounds);
      CHECK(r.traffic.collectives == rounds);
      CHECK(r.traffic.bytes_sent == rounds * dims * sizeof(double));
      // The survivors end on one model, bitwise, and it is the model of a
      // clean departure before the failing round: the failed round's partial
      // sums were undone and the round redone over the three.
      CHECK(r.x == out[0].x);
      CHECK(r.x == oracle[std::size_t(w)]);
      if (r.blocked > longest) longest = r.blocked;
    }
    CHECK(longest >= timeout);  // detected by the timeout, not earlier
    CHECK(out[lost].x.empty());  // the failed worker never came back

    // Converged without worker 2: the loss at x = 0 is 6.55 and at the
    // least-squares optimum 4.93e-5 (the noise floor); the survivors must get
    // below twice that. Over problem seeds 1..10 the final loss exceeded the
    // optimum by at most 1.1e-7 of the loss at 0. The shards of this problem
    // share one optimum, so losing one costs little: the comparison with the
    // clean departure above is what catches a corrupted round.
    const double final_loss = loss(p, out[0].x.data());
    INFO("loss at 0: ", start_loss, ", final: ", final_loss, ", optimum: ", best);
    CHECK(start_loss > 6.0);
    CHECK(final_loss < 1e-4);
    CHECK(final_loss >= best);
  }
}

TEST_CASE("ri_sgd: redo_average checks that a round is pending and the communicator") {
  gcomp::ri_sgd<double> ri(400, 2, 0);
  std::vector<double> x(20, 1.0);
  gcomp::inproc_group one(1);
  CHECK_THROWS_WITH_AS(ri.redo_average(gcomp::host_seq{}, one.comm(0), std::span<double>(x)),
                       "gcomp::ri_sgd::redo_average: no averaging round is pending; step() did "
                       "not fail in one",
                       gcomp::error);
  CHECK_FALSE(ri.average_pending());
}
