// Tests of comm/inproc.hpp's failures: injected silent failures, the timeout, shrinking to the survivors.
#include <doctest/doctest.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "comm_suite.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/exec/host.hpp"

namespace {

using gcomp::host_seq;
using gcomp::inproc_comm;
using gcomp::inproc_fault_point;
using gcomp::inproc_group;
using gcomp::inproc_options;
using namespace std::chrono_literals;

using clock_type = std::chrono::steady_clock;

// Short enough for tests, long enough that live ranks (even under
// ThreadSanitizer on two shared cores) arrive well within it.
constexpr std::chrono::milliseconds timeout = 300ms;
// How late after its deadline a waiter may throw: scheduling, not the design.
constexpr std::chrono::seconds slack = 5s;

inproc_options with_timeout(std::chrono::nanoseconds t) {
  inproc_options o;
  o.timeout = t;
  return o;
}

// What one rank saw: the error it caught (if any), at which of its calls, and
// how long that call blocked before throwing.
struct seen {
  std::string message;
  int call = -1;
  std::chrono::nanoseconds blocked{0};
  std::vector<int> failed;
  bool returned = false;  // the worker body ran to its end
};

// Every rank makes `calls` all-reduces of x = (rank + 1, ...); the first
// error ends its loop. Returns what each rank saw; run()'s own exception is
// checked by the caller through `run_message`.
std::vector<seen> allreduce_loop(inproc_group& group, int calls, std::size_t n,
                                 std::string& run_message,
                                 std::vector<std::vector<int>>* data = nullptr) {
  std::vector<seen> out(static_cast<std::size_t>(group.size()));
  if (data) data->assign(out.size(), {});
  try {
    group.run([&](inproc_comm& c) {
      seen& me = out[static_cast<std::size_t>(c.rank())];
      std::vector<int> x(n);
      for (int call = 0; call < calls; ++call) {
        for (int& v : x) v = c.rank() + 1;
        const auto start = clock_type::now();
        try {
          c.allreduce_sum(host_seq{}, std::span(x));
        } catch (const gcomp::error& e) {
          me.blocked = clock_type::now() - start;
          me.message = e.what();
          me.call = call;
          me.failed = c.failed_ranks();
          break;
        }
      }
      if (data) (*data)[static_cast<std::size_t>(c.rank())] = x;
      me.returned = true;
    });
  } catch (const gcomp::error& e) {
    run_message = e.what();
  }
  return out;
}

}  // namespace

TEST_CASE("inproc faults: the timeout defaults to 10 minutes; bad options and injections throw") {
  CHECK(inproc_options{}.timeout == 10min);
  CHECK(inproc_group(2).options().timeout == 10min);
  CHECK(inproc_group(2, with_timeout(250ms)).options().timeout == 250ms);
  CHECK_THROWS_WITH_AS(inproc_group(2, with_timeout(0ms)),
                       "gcomp::inproc_group::inproc_group: options.timeout must be > 0 "
                       "(inproc_options::no_timeout waits forever), got 0 s",
                       gcomp::error);
  CHECK_THROWS_WITH_AS(inproc_group(2, with_timeout(-1500us)),
                       "gcomp::inproc_group::inproc_group: options.timeout must be > 0 "
                       "(inproc_options::no_timeout waits forever), got -1500 us",
                       gcomp::error);

  inproc_group group(3);
  CHECK_THROWS_WITH_AS(group.inject_failure(3, 0),
                       "gcomp::inproc_group::inject_failure: rank must be in [0, 3), got 3",
                       gcomp::error);
  CHECK_THROWS_WITH_AS(group.inject_failure(-1, 0),
                       "gcomp::inproc_group::inject_failure: rank must be in [0, 3), got -1",
                       gcomp::error);
  CHECK_THROWS_WITH_AS(group.inject_failure(0, 0, static_cast<inproc_fault_point>(7)),
                       "gcomp::inproc_group::inject_failure: point must be before_post or "
                       "after_post, got 7",
                       gcomp::error);
  group.inject_failure(1, 5);
  CHECK_THROWS_WITH_AS(group.inject_failure(1, 2),
                       "gcomp::inproc_group::inject_failure: rank 1 already has a failure armed, "
                       "at its collective call #5",
                       gcomp::error);
  std::string during;
  group.run([&](inproc_comm& c) {
    if (c.rank() != 0) return;
    try {
      group.inject_failure(2, 0);
    } catch (const gcomp::error& e) {
      during = e.what();
    }
  });
  CHECK(during ==
        "gcomp::inproc_group::inject_failure: cannot arm a failure while run() is in progress; "
        "arm it before the run");

  // shrink() needs a failed rank, and only survivors may call it.
  std::string whole;
  group.run([&](inproc_comm& c) {
    CHECK(c.failed_ranks().empty());
    if (c.rank() != 0) return;
    try {
      (void)c.shrink();
    } catch (const gcomp::error& e) {
      whole = e.what();
    }
  });
  CHECK(whole ==
        "gcomp::inproc_comm::shrink: no rank of this group has failed (failed_ranks() is empty), "
        "so there are no survivors to shrink to");
}

TEST_CASE("inproc faults: a rank stopped before posting makes the others throw after the timeout") {
  inproc_group group(4, with_timeout(timeout));
  group.inject_failure(2, 3, inproc_fault_point::before_post);
  std::string run_message;
  std::vector<std::vector<int>> data;
  const auto t0 = clock_type::now();
  const std::vector<seen> s = allreduce_loop(group, 6, 8, run_message, &data);
  const auto total = clock_type::now() - t0;

  const std::string saw =
      "timed out after 300 ms: rank 2 did not enter allreduce_sum (ranks 0, 1, 3 did); it "
      "counts as failed";
  std::chrono::nanoseconds longest{0};
  for (std::size_t r : {0u, 1u, 3u}) {
    INFO("rank ", r, ": ", s[r].message);
    CHECK(s[r].message == "gcomp::inproc_comm::allreduce_sum: " + saw);
    CHECK(s[r].call == 3);  // calls 0, 1, 2 completed; the 4th is the one rank 2 never enters
    CHECK(s[r].failed == std::vector<int>{2});
    CHECK(s[r].blocked < timeout + slack);
    CHECK(s[r].returned);
    // The opening phase never completed, so nothing was written.
    CHECK(data[r] == std::vector<int>(8, int(r) + 1));
    if (s[r].blocked > longest) longest = s[r].blocked;
  }
  // The first rank to arrive waited the whole timeout, not less.
  CHECK(longest >= timeout);
  CHECK(total < timeout + slack);
  // The stopped worker never got past its 4th call, nor reported anything.
  CHECK(s[2].message.empty());
  CHECK_FALSE(s[2].returned);
  CHECK(run_message ==
        "gcomp::inproc_group::run: worker 2 was stopped silently by an injected failure in "
        "allreduce_sum, its collective call #3, before posting it; the others saw: " + saw);

  // The failure expired with the run: the next one is whole again.
  group.run([&](inproc_comm& c) {
    CHECK(c.failed_ranks().empty());
    gcomp::test::run_comm_suite(host_seq{}, c);
  });
}

TEST_CASE("inproc faults: a rank stopped after posting leaves the others' buffers partly reduced") {
  inproc_group group(4, with_timeout(timeout));
  group.inject_failure(1, 2, inproc_fault_point::after_post);
  std::string run_message;
  std::vector<std::vector<int>> data;
  const std::vector<seen> s = allreduce_loop(group, 5, 8, run_message, &data);
  const std::string saw =
      "timed out after 300 ms: rank 1 entered allreduce_sum but did not finish it (ranks 0, 2, "
      "3 did); it counts as failed";
  for (std::size_t r : {0u, 2u, 3u}) {
    INFO("rank ", r, ": ", s[r].message);
    CHECK(s[r].message == "gcomp::inproc_comm::allreduce_sum: " + saw);
    CHECK(s[r].call == 2);
    CHECK(s[r].failed == std::vector<int>{1});
    CHECK(s[r].blocked < timeout + slack);
    // Rank j sums the j-th quarter into every buffer; rank 1 posted its
    // buffer, so the others' quarters hold the full sum 1 + 2 + 3 + 4, but it
    // never summed its own quarter (elements 2 and 3).
    CHECK(data[r] == std::vector<int>{10, 10, int(r) + 1, int(r) + 1, 10, 10, 10, 10});
  }
  CHECK_FALSE(s[1].returned);
  CHECK(run_message ==
        "gcomp::inproc_group::run: worker 1 was stopped silently by an injected failure in "
        "allreduce_sum, its collective call #2, after posting it; the others saw: " + saw);
}

TEST_CASE("inproc faults: later calls on the broken group throw at once, with the same cause") {
  inproc_group group(3, with_timeout(timeout));
  group.inject_failure(0, 0, inproc_fault_point::before_post);
  std::vector<std::string> later(3);
  std::vector<std::chrono::nanoseconds> took(3);
  CHECK_THROWS_AS(group.run([&](inproc_comm& c) {
                    try {
                      c.barrier();
                    } catch (const gcomp::error&) {
                    }
                    const auto start = clock_type::now();
                    try {
                      std::vector<std::byte> in(4), out(12);
                      c.allgather(host_seq{}, std::span<const std::byte>(in), std::span(out));
                    } catch (const gcomp::error& e) {
                      later[static_cast<std::size_t>(c.rank())] = e.what();
                    }
                    took[static_cast<std::size_t>(c.rank())] = clock_type::now() - start;
                  }),
                  gcomp::error);
  for (std::size_t r : {1u, 2u}) {
    CHECK(later[r] ==
          "gcomp::inproc_comm::allgather: timed out after 300 ms: rank 0 did not enter barrier "
          "(ranks 1, 2 did); it counts as failed");
    CHECK(took[r] < timeout);  // no second timeout: the group is known to be broken
  }
}

TEST_CASE("inproc faults: non-blocking calls: waits time out, a posted call still completes") {
  SUBCASE("stopped before posting: the wait for that call times out") {
    inproc_group group(2, with_timeout(timeout));
    group.inject_failure(1, 1, inproc_fault_point::before_post);
    std::string message, run_message;
    std::vector<double> first;
    try {
      group.run([&](inproc_comm& c) {
        std::vector<double> x(5, c.rank() + 1.0), y(5, 1.0);
        auto a = c.iallreduce_sum(host_seq{}, std::span(x));
        a.wait();
        auto b = c.iallreduce_sum(host_seq{}, std::span(y));
        try {
          b.wait();
        } catch (const gcomp::error& e) {
          message = e.what();
        }
        first = x;
      });
    } catch (const gcomp::error& e) {
      run_message = e.what();
    }
    const std::string saw =
        "timed out after 300 ms: rank 1 did not post non-blocking call #1 (rank 0 waited for "
        "it); it counts as failed";
    CHECK(first == std::vector<double>(5, 3.0));
    CHECK(message == "gcomp::inproc_request::wait: " + saw);
    CHECK(run_message ==
          "gcomp::inproc_group::run: worker 1 was stopped silently by an injected failure in "
          "iallreduce_sum, its collective call #1, before posting it; the others saw: " + saw);
  }
  SUBCASE("stopped after posting: that call completes, the next one times out") {
    inproc_group group(3, with_timeout(timeout));
    group.inject_failure(2, 0, inproc_fault_point::after_post);
    std::vector<std::string> messages(3);
    std::vector<std::vector<float>> sums(3);
    CHECK_THROWS_AS(group.run([&](inproc_comm& c) {
                      std::vector<float> x(4, float(c.rank() + 1)), y(4, 1.0f);
                      auto a = c.iallreduce_sum(host_seq{}, std::span(x));
                      a.wait();
                      sums[static_cast<std::size_t>(c.rank())] = x;
                      try {
                        c.barrier();
                      } catch (const gcomp::error& e) {
                        messages[static_cast<std::size_t>(c.rank())] = e.what();
                      }
                    }),
                    gcomp::error);
    for (std::size_t r : {0u, 1u}) {
      CHECK(sums[r] == std::vector<float>(4, 6.0f));  // rank 2's buffer was summed in
      CHECK(messages[r] ==
            "gcomp::inproc_comm::barrier: timed out after 300 ms: rank 2 did not enter barrier "
            "(ranks 0, 1 did); it counts as failed");
    }
  }
}

TEST_CASE("inproc faults: a worker that hangs in its own code is declared failed by the timeout") {
  // No injection: rank 1 is merely late, by three timeouts. The others cannot
  // tell it from a crashed worker, and the group stays broken when it comes.
  inproc_group group(3, with_timeout(200ms));
  std::vector<std::string> messages(3), shrink_messages(3);
  std::vector<std::vector<int>> failed(3);
  group.run([&](inproc_comm& c) {
    const auto r = static_cast<std::size_t>(c.rank());
    if (c.rank() == 1) std::this_thread::sleep_for(600ms);
    try {
      c.barrier();
    } catch (const gcomp::error& e) {
      messages[r] = e.what();
    }
    failed[r] = c.failed_ranks();
    try {
      if (c.rank() == 1) (void)c.shrink();
    } catch (const gcomp::error& e) {
      shrink_messages[r] = e.what();
    }
  });
  const std::string saw =
      "timed out after 200 ms: rank 1 did not enter barrier (ranks 0, 2 did); it counts as failed";
  CHECK(messages[0] == "gcomp::inproc_comm::barrier: " + saw);
  CHECK(messages[2] == "gcomp::inproc_comm::barrier: " + saw);
  CHECK(messages[1] == "gcomp::inproc_comm::barrier: " + saw);  // too late: it was declared failed
  for (const auto& f : failed) CHECK(f == std::vector<int>{1});
  CHECK(shrink_messages[1] ==
        "gcomp::inproc_comm::shrink: rank 1 was declared failed (failed_ranks() is rank 1); only "
        "survivors can shrink");
}

TEST_CASE("inproc faults: survivors shrink to a group of their own, again after a second failure") {
  inproc_group group(4, with_timeout(200ms));
  group.inject_failure(1, 0, inproc_fault_point::after_post);
  struct after {
    int rank = -1, size = 0;
    double sum = 0;
    bool same_handle = false;
    std::string second_failure;
    std::vector<int> second_failed;
    int final_rank = -1, final_size = 0;
    double final_sum = 0;
    gcomp::comm_stats stats;
  };
  std::vector<after> a(4);
  std::string run_message;
  try {
    group.run([&](inproc_comm& c) {
      after& me = a[static_cast<std::size_t>(c.rank())];
      double x = c.rank() + 1.0;
      try {
        c.allreduce_sum(host_seq{}, std::span(&x, 1));
        return;  // not reached: rank 1 stops in this call
      } catch (const gcomp::error&) {
      }
      inproc_comm& survivors = c.shrink();
      me.same_handle = &c.shrink() == &survivors;
      me.rank = survivors.rank();
      me.size = survivors.size();
      double y = c.rank() + 1.0;  // old ranks 0, 2, 3: 1 + 3 + 4
      survivors.allreduce_sum(host_seq{}, std::span(&y, 1));
      me.sum = y;
      me.stats = survivors.stats();
      // A second, real failure among the survivors: the last of them stops
      // calling. Its group has no run(), so only the timeout can tell.
      if (survivors.rank() == 2) return;
      try {
        survivors.barrier();
      } catch (const gcomp::error& e) {
        me.second_failure = e.what();
      }
      me.second_failed = survivors.failed_ranks();
      inproc_comm& last = survivors.shrink();
      me.final_rank = last.rank();
      me.final_size = last.size();
      double z = survivors.rank() + 10.0;
      last.allreduce_sum(host_seq{}, std::span(&z, 1));
      me.final_sum = z;
    });
  } catch (const gcomp::error& e) {
    run_message = e.what();
  }
  CHECK(a[0].rank == 0);
  CHECK(a[2].rank == 1);
  CHECK(a[3].rank == 2);
  for (std::size_t r : {0u, 2u, 3u}) {
    CHECK(a[r].size == 3);
    CHECK(a[r].same_handle);
    CHECK(a[r].sum == 8.0);
    CHECK(a[r].stats == gcomp::comm_stats{8, 8, 1});  // a fresh communicator's counters
  }
  for (std::size_t r : {0u, 2u}) {
    CHECK(a[r].second_failure ==
          "gcomp::inproc_comm::barrier: timed out after 200 ms: rank 2 did not enter barrier "
          "(ranks 0, 1 did); it counts as failed");
    CHECK(a[r].second_failed == std::vector<int>{2});
    CHECK(a[r].final_size == 2);
    CHECK(a[r].final_sum == 21.0);  // survivors' ranks 0 and 1: 10 + 11
  }
  CHECK(a[0].final_rank == 0);
  CHECK(a[2].final_rank == 1);
  CHECK(run_message ==
        "gcomp::inproc_group::run: worker 1 was stopped silently by an injected failure in "
        "allreduce_sum, its collective call #0, after posting it; the others saw: timed out after "
        "200 ms: rank 1 entered allreduce_sum but did not finish it (ranks 0, 2, 3 did); it "
        "counts as failed");
}

TEST_CASE("inproc faults: two ranks stopped at once are both named") {
  inproc_group group(4, with_timeout(timeout));
  group.inject_failure(2, 1, inproc_fault_point::before_post);
  group.inject_failure(1, 1, inproc_fault_point::before_post);
  std::string run_message;
  const std::vector<seen> s = allreduce_loop(group, 3, 3, run_message);
  const std::string saw =
      "timed out after 300 ms: ranks 1, 2 did not enter allreduce_sum (ranks 0, 3 did); they "
      "count as failed";
  for (std::size_t r : {0u, 3u}) {
    CHECK(s[r].message == "gcomp::inproc_comm::allreduce_sum: " + saw);
    CHECK(s[r].failed == std::vector<int>{1, 2});
  }
  CHECK(run_message ==
        "gcomp::inproc_group::run: worker 1 was stopped silently by an injected failure in "
        "allreduce_sum, its collective call #1, before posting it; worker 2 was stopped silently "
        "by an injected failure in allreduce_sum, its collective call #1, before posting it; the "
        "others saw: " + saw);
}

TEST_CASE("inproc faults: run() adds what a survivor threw to the injected failure") {
  inproc_group group(3, with_timeout(timeout));
  group.inject_failure(0, 1, inproc_fault_point::before_post);
  CHECK_THROWS_WITH_AS(group.run([&](inproc_comm& c) {
                         c.barrier();
                         c.barrier();  // ranks 1 and 2 let the timeout escape
                       }),
                       "gcomp::inproc_group::run: worker 0 was stopped silently by an injected "
                       "failure in barrier, its collective call #1, before posting it; the others "
                       "saw: timed out after 300 ms: rank 0 did not enter barrier (ranks 1, 2 "
                       "did); it counts as failed; worker 1 threw: gcomp::inproc_comm::barrier: "
                       "timed out after 300 ms: rank 0 did not enter barrier (ranks 1, 2 did); it "
                       "counts as failed",
                       gcomp::error);
}

TEST_CASE("inproc faults: a failure that never fires expires with its run") {
  inproc_group group(2, with_timeout(timeout));
  group.inject_failure(1, 3);
  // Calls from threads the caller starts do not count and never fail.
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r)
    threads.emplace_back([&, r] {
      for (int k = 0; k < 5; ++k) group.comm(r).barrier();
    });
  for (auto& t : threads) t.join();
  // Three calls per rank in the run: call #3 never comes.
  group.run([&](inproc_comm& c) {
    for (int k = 0; k < 3; ++k) c.barrier();
  });
  group.inject_failure(1, 3);  // not "already armed": the earlier one expired
  CHECK_THROWS_AS(group.run([&](inproc_comm& c) {
                    for (int k = 0; k < 4; ++k) c.barrier();
                  }),
                  gcomp::error);
  group.run([&](inproc_comm& c) {
    for (int k = 0; k < 4; ++k) c.barrier();
  });
}

TEST_CASE("inproc faults: a stopped worker's pending request does not keep run() from returning") {
  // Rank 1 stops in its second call with its first non-blocking call never
  // waited for: when it unwinds, the request's destructor must not hang.
  inproc_group group(2, with_timeout(timeout));
  group.inject_failure(1, 1, inproc_fault_point::before_post);
  std::string message;
  CHECK_THROWS_AS(group.run([&](inproc_comm& c) {
                    std::vector<int> x(3, 1);
                    auto request = c.iallreduce_sum(host_seq{}, std::span(x));
                    try {
                      c.barrier();
                    } catch (const gcomp::error& e) {
                      message = e.what();
                    }
                  }),
                  gcomp::error);
  CHECK(message ==
        "gcomp::inproc_comm::barrier: timed out after 300 ms: rank 1 did not enter barrier (rank 0 "
        "did); it counts as failed");
}
