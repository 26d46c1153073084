// Tests of comm/inproc.hpp: the shared communicator suite, argument checks, failures and deadlocks.
#include "gcomp/comm/inproc.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <cstddef>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "comm_suite.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/exec/host.hpp"

namespace {

using gcomp::host_seq;
using gcomp::inproc_comm;
using gcomp::inproc_group;

static_assert(gcomp::communicator<inproc_comm, host_seq, float>);
static_assert(gcomp::communicator<inproc_comm, host_seq, double>);
static_assert(gcomp::communicator<inproc_comm, host_seq, int>);

// Runs f on every rank, catching gcomp::error; returns each rank's message
// ("" where none was thrown).
template <class F>
std::vector<std::string> errors_of(inproc_group& group, F f) {
  std::vector<std::string> messages(static_cast<std::size_t>(group.size()));
  group.run([&](inproc_comm& c) {
    try {
      f(c);
    } catch (const gcomp::error& e) {
      messages[static_cast<std::size_t>(c.rank())] = e.what();
    }
  });
  return messages;
}

// Every rank threw, and every message contains `part`.
void check_all_contain(const std::vector<std::string>& messages, const std::string& part) {
  for (std::size_t r = 0; r < messages.size(); ++r) {
    INFO("rank ", r, ": ", messages[r]);
    CHECK(messages[r].find(part) != std::string::npos);
  }
}

}  // namespace

TEST_CASE("inproc: the communicator suite passes for M = 1, 2, 3, 4, 8") {
  for (int m : {1, 2, 3, 4, 8}) {
    CAPTURE(m);
    inproc_group group(m);
    CHECK(group.size() == m);
    // Twice: the second run starts from non-zero stats and a used progress thread.
    for (int pass = 0; pass < 2; ++pass)
      group.run([&](inproc_comm& c) { gcomp::test::run_comm_suite(host_seq{}, c); });
  }
}

TEST_CASE("inproc: bad constructor and rank arguments") {
  CHECK_THROWS_WITH_AS(inproc_group(0), doctest::Contains("size must be > 0, got 0"),
                       gcomp::error);
  CHECK_THROWS_WITH_AS(inproc_group(-3), doctest::Contains("size must be > 0, got -3"),
                       gcomp::error);
  inproc_group group(3);
  CHECK_THROWS_WITH_AS(group.comm(3), doctest::Contains("rank must be in [0, 3), got 3"),
                       gcomp::error);
  CHECK_THROWS_WITH_AS(group.comm(-1), doctest::Contains("rank must be in [0, 3), got -1"),
                       gcomp::error);
  CHECK(group.comm(2).rank() == 2);
  CHECK(group.comm(2).size() == 3);
}

TEST_CASE("inproc: mismatched allreduce arguments fail on every rank and write nothing") {
  inproc_group group(3);
  std::vector<int> unchanged(3, 0);
  std::vector<int> recovered(3, 0);
  const auto messages = errors_of(group, [&](inproc_comm& c) {
    const int r = c.rank();
    std::vector<double> x(r == 1 ? 5 : 4, r + 1.0);
    const std::vector<double> before = x;
    try {
      c.allreduce_sum(host_seq{}, std::span(x));
    } catch (const gcomp::error&) {
      unchanged[static_cast<std::size_t>(r)] = x == before;
      // The group stays usable: a matching call works.
      std::vector<double> y(4, r + 1.0);
      c.allreduce_sum(host_seq{}, std::span(y));
      recovered[static_cast<std::size_t>(r)] = y == std::vector<double>(4, 6.0);
      throw;
    }
  });
  check_all_contain(messages, "gcomp::inproc_comm::allreduce_sum: data has 4 elements on rank 0 "
                              "but 5 on rank 1; every rank must pass the same size");
  CHECK(unchanged == std::vector<int>(3, 1));
  CHECK(recovered == std::vector<int>(3, 1));
}

TEST_CASE("inproc: mismatched element types fail on every rank") {
  inproc_group group(2);
  std::vector<int> unchanged(2, 0);
  const auto messages = errors_of(group, [&](inproc_comm& c) {
    const auto r = static_cast<std::size_t>(c.rank());
    if (c.rank() == 0) {
      std::vector<float> x(4, 1.0f);
      try {
        c.allreduce_sum(host_seq{}, std::span(x));
      } catch (...) {
        unchanged[r] = x == std::vector<float>(4, 1.0f);
        throw;
      }
    } else {
      std::vector<double> x(4, 1.0);
      try {
        c.allreduce_sum(host_seq{}, std::span(x));
      } catch (...) {
        unchanged[r] = x == std::vector<double>(4, 1.0);
        throw;
      }
    }
  });
  check_all_contain(messages,
                    "data holds float (4 bytes) on rank 0 but double (8 bytes) on rank 1");
  CHECK(unchanged == std::vector<int>(2, 1));
}

TEST_CASE("inproc: different collectives on different ranks fail on every rank") {
  inproc_group group(2);
  const auto messages = errors_of(group, [&](inproc_comm& c) {
    if (c.rank() == 0) {
      c.barrier();
    } else {
      std::vector<int> x(3, 1);
      c.allreduce_sum(host_seq{}, std::span(x));
    }
  });
  check_all_contain(messages, "rank 0 called barrier but rank 1 called allreduce_sum");
}

TEST_CASE("inproc: mismatched allgather arguments fail on every rank and write nothing") {
  inproc_group group(3);
  auto attempt = [&](auto in_size, auto out_size, bool overlap) {
    std::vector<int> unchanged(3, 0);
    auto messages = errors_of(group, [&](inproc_comm& c) {
      const int r = c.rank();
      std::vector<std::byte> in(in_size(r), std::byte{1});
      std::vector<std::byte> out(out_size(r), std::byte{7});
      std::span<const std::byte> in_span(in);
      if (overlap && r == 1) in_span = std::span<const std::byte>(out).subspan(0, in.size());
      try {
        c.allgather(host_seq{}, in_span, std::span(out));
      } catch (...) {
        unchanged[static_cast<std::size_t>(r)] =
            out == std::vector<std::byte>(out_size(r), std::byte{7});
        throw;
      }
    });
    CHECK(unchanged == std::vector<int>(3, 1));
    return messages;
  };
  auto two = [](int) { return std::size_t{2}; };
  auto six = [](int) { return std::size_t{6}; };
  check_all_contain(attempt([](int r) { return std::size_t(r == 2 ? 3 : 2); }, six, false),
                    "gcomp::inproc_comm::allgather: in has 2 bytes on rank 0 but 3 on rank 2");
  check_all_contain(attempt(two, [](int r) { return std::size_t(r == 2 ? 7 : 6); }, false),
                    "out has 7 bytes on rank 2 but must have size() * in.size() = 3 * 2 = 6");
  check_all_contain(attempt(two, six, true), "in overlaps out on rank 1");
}

TEST_CASE("inproc: allgatherv with a wrong counts size fails on every rank") {
  inproc_group group(3);
  std::vector<int> unchanged(3, 0);
  const auto messages = errors_of(group, [&](inproc_comm& c) {
    const int r = c.rank();
    std::vector<std::byte> in(static_cast<std::size_t>(r) + 1, std::byte{3});
    std::vector<std::byte> out(4, std::byte{9});
    std::vector<std::size_t> counts(r == 1 ? 2 : 3, 77);
    try {
      c.allgatherv(host_seq{}, std::span<const std::byte>(in), out, std::span(counts));
    } catch (...) {
      unchanged[static_cast<std::size_t>(r)] =
          out == std::vector<std::byte>(4, std::byte{9}) &&
          counts == std::vector<std::size_t>(counts.size(), 77);
      throw;
    }
  });
  check_all_contain(messages, "counts has size 2 on rank 1 but must have size() = 3");
  CHECK(unchanged == std::vector<int>(3, 1));

  // `in` pointing into out's storage would dangle once out is resized.
  const auto aliased = errors_of(group, [&](inproc_comm& c) {
    std::vector<std::byte> out(8, std::byte{1});
    std::vector<std::size_t> counts(3);
    std::vector<std::byte> own(2, std::byte{2});
    std::span<const std::byte> in(own);
    if (c.rank() == 2) in = std::span<const std::byte>(out).subspan(0, 2);
    c.allgatherv(host_seq{}, in, out, std::span(counts));
  });
  check_all_contain(aliased, "in overlaps the storage of out on rank 2");
}

TEST_CASE("inproc: broadcast checks size, root agreement and root range on every rank") {
  inproc_group group(3);
  auto attempt = [&](auto size_of, auto root_of) {
    std::vector<int> unchanged(3, 0);
    auto messages = errors_of(group, [&](inproc_comm& c) {
      const int r = c.rank();
      std::vector<int> x(size_of(r), r);
      try {
        c.broadcast(host_seq{}, std::span(x), root_of(r));
      } catch (...) {
        unchanged[static_cast<std::size_t>(r)] = x == std::vector<int>(size_of(r), r);
        throw;
      }
    });
    CHECK(unchanged == std::vector<int>(3, 1));
    return messages;
  };
  auto four = [](int) { return std::size_t{4}; };
  check_all_contain(attempt([](int r) { return std::size_t(r == 1 ? 3 : 4); }, [](int) { return 0; }),
                    "gcomp::inproc_comm::broadcast: data has 4 elements on rank 0 but 3 on rank 1");
  check_all_contain(attempt(four, [](int r) { return r == 2 ? 1 : 0; }),
                    "root is 0 on rank 0 but 1 on rank 2; every rank must pass the same root");
  check_all_contain(attempt(four, [](int) { return 3; }),
                    "root is 3 on rank 0 but must be in [0, 3)");
  check_all_contain(attempt(four, [](int r) { return r == 1 ? -1 : 0; }),
                    "root is -1 on rank 1 but must be in [0, 3)");
}

TEST_CASE("inproc: mismatched non-blocking calls fail in wait() on every rank") {
  inproc_group group(4);
  std::vector<int> unchanged(4, 0);
  std::vector<int> recovered(4, 0);
  const auto messages = errors_of(group, [&](inproc_comm& c) {
    const int r = c.rank();
    std::vector<float> x(r == 3 ? 9 : 8, 1.0f);
    const auto before = x;
    auto request = c.iallreduce_sum(host_seq{}, std::span(x));
    try {
      request.wait();
    } catch (...) {
      unchanged[static_cast<std::size_t>(r)] = x == before;
      std::vector<float> y(8, 1.0f);
      auto again = c.iallreduce_sum(host_seq{}, std::span(y));
      again.wait();
      recovered[static_cast<std::size_t>(r)] = y == std::vector<float>(8, 4.0f);
      throw;
    }
  });
  check_all_contain(messages, "data has 8 elements on rank 0 but 9 on rank 3");
  CHECK(unchanged == std::vector<int>(4, 1));
  CHECK(recovered == std::vector<int>(4, 1));
}

TEST_CASE("inproc: a failing worker breaks the group and run() rethrows its exception") {
  inproc_group group(4);
  std::vector<std::string> first(4), later(4);
  CHECK_THROWS_WITH_AS(group.run([&](inproc_comm& c) {
                         const auto r = static_cast<std::size_t>(c.rank());
                         std::vector<double> x(16, 1.0);
                         for (int step = 0; step < 5; ++step) {
                           if (c.rank() == 2 && step == 3) throw std::runtime_error("boom");
                           try {
                             c.allreduce_sum(host_seq{}, std::span(x));
                           } catch (const gcomp::error& e) {
                             first[r] = e.what();
                             break;
                           }
                         }
                         try {  // entering a collective after the failure throws too
                           c.barrier();
                         } catch (const gcomp::error& e) {
                           later[r] = e.what();
                         }
                       }),
                       "boom", std::runtime_error);
  for (std::size_t r : {0u, 1u, 3u}) {
    INFO("rank ", r);
    CHECK(first[r] == "gcomp::inproc_comm::allreduce_sum: worker 2 failed: boom");
    CHECK(later[r] == "gcomp::inproc_comm::barrier: worker 2 failed: boom");
  }
  // The next run starts healed.
  group.run([&](inproc_comm& c) { gcomp::test::run_comm_suite(host_seq{}, c); });
}

TEST_CASE("inproc: a failing worker makes pending waits throw") {
  inproc_group group(3);
  std::vector<std::string> messages(3);
  std::atomic<int> posted{0};
  CHECK_THROWS_WITH_AS(group.run([&](inproc_comm& c) {
                         if (c.rank() == 1) {
                           // Fail only once the others wait, so the failure hits wait().
                           while (posted.load() < 2) std::this_thread::yield();
                           throw std::logic_error("broken rank");
                         }
                         std::vector<int> x(5, 1);
                         auto request = c.iallreduce_sum(host_seq{}, std::span(x));
                         ++posted;
                         try {
                           request.wait();
                         } catch (const gcomp::error& e) {
                           messages[static_cast<std::size_t>(c.rank())] = e.what();
                         }
                       }),
                       "broken rank", std::logic_error);
  CHECK(messages[0] == "gcomp::inproc_request::wait: worker 1 failed: broken rank");
  CHECK(messages[2] == "gcomp::inproc_request::wait: worker 1 failed: broken rank");
}

TEST_CASE("inproc: an exception escaping with a pending request does not hang the others") {
  inproc_group group(2);
  std::string message;
  CHECK_THROWS_WITH_AS(group.run([&](inproc_comm& c) {
                         std::vector<float> x(10, 1.0f);
                         if (c.rank() == 0) {
                           auto request = c.iallreduce_sum(host_seq{}, std::span(x));
                           throw std::runtime_error("escaping");
                         }
                         try {
                           c.barrier();
                         } catch (const gcomp::error& e) {
                           message = e.what();
                         }
                       }),
                       "escaping", std::runtime_error);
  CHECK(message.find("worker 0 failed") != std::string::npos);
}

TEST_CASE("inproc: ranks that can no longer make progress throw instead of hanging") {
  SUBCASE("a worker returns early") {
    inproc_group group(3);
    const auto messages = errors_of(group, [&](inproc_comm& c) {
      if (c.rank() == 1) return;
      std::vector<int> x(3, 1);
      c.allreduce_sum(host_seq{}, std::span(x));
    });
    CHECK(messages[1].empty());
    for (std::size_t r : {0u, 2u}) {
      INFO(messages[r]);
      CHECK(messages[r].find("deadlock:") != std::string::npos);
      CHECK(messages[r].find("rank 1 returned from run()") != std::string::npos);
    }
  }
  SUBCASE("a blocking call against a non-blocking wait") {
    inproc_group group(2);
    const auto messages = errors_of(group, [&](inproc_comm& c) {
      if (c.rank() == 0) {
        c.barrier();
      } else {
        std::vector<int> x(3, 1);
        auto request = c.iallreduce_sum(host_seq{}, std::span(x));
        request.wait();
      }
    });
    check_all_contain(messages, "deadlock: rank 0 waits in barrier, rank 1 waits for its "
                                "non-blocking call #0");
  }
  SUBCASE("more non-blocking calls on one rank than on the other") {
    inproc_group group(2);
    const auto messages = errors_of(group, [&](inproc_comm& c) {
      std::vector<int> x(3, 1), y(3, 1);
      auto first = c.iallreduce_sum(host_seq{}, std::span(x));
      first.wait();
      if (c.rank() == 0) {
        auto second = c.iallreduce_sum(host_seq{}, std::span(y));
        second.wait();
      }
    });
    CHECK(messages[0].find("rank 0 waits for its non-blocking call #1, rank 1 returned") !=
          std::string::npos);
    CHECK(messages[1].empty());
  }
}

TEST_CASE("inproc: run() cannot be nested") {
  inproc_group group(2);
  const auto messages = errors_of(group, [&](inproc_comm& c) {
    if (c.rank() == 0) group.run([](inproc_comm&) {});
  });
  CHECK(messages[0].find("run() is already in progress") != std::string::npos);
}

TEST_CASE("inproc: thousands of small collectives in a row stay matched") {
  inproc_group group(4);
  std::atomic<int> wrong{0};
  group.run([&](inproc_comm& c) {
    const int r = c.rank();
    for (int step = 0; step < 2000; ++step) {
      int x[3] = {r + step, 1, r * step};
      c.allreduce_sum(host_seq{}, std::span<int>(x));
      if (x[0] != 6 + 4 * step || x[1] != 4 || x[2] != 6 * step) ++wrong;
    }
    // Non-blocking calls in a sliding window of four in flight.
    double y[8][2];
    gcomp::inproc_request window[4];
    for (int step = 0; step < 600; ++step) {
      const int slot = step % 4;
      if (step >= 4) {
        window[slot].wait();
        const int old = step - 4;
        if (y[old % 8][0] != 4.0 * old + 6.0 || y[old % 8][1] != -4.0) ++wrong;
      }
      y[step % 8][0] = step + r;
      y[step % 8][1] = -1.0;
      window[slot] = c.iallreduce_sum(host_seq{}, std::span<double>(y[step % 8]));
      if (step % 50 == 0) c.barrier();
    }
    for (auto& w : window) w.wait();
  });
  CHECK(wrong == 0);
  CHECK(group.comm(0).stats().collectives == 2000 + 600 + 12);
}

TEST_CASE("inproc: stats follow the accounting rule and reset") {
  inproc_group group(3);
  group.run([&](inproc_comm& c) {
    std::vector<float> x(10, 1.0f);
    c.allreduce_sum(host_seq{}, std::span(x));
    std::vector<std::byte> in(static_cast<std::size_t>(c.rank()) + 1), out;
    std::vector<std::size_t> counts(3);
    c.allgatherv(host_seq{}, std::span<const std::byte>(in), out, std::span(counts));
    c.broadcast(host_seq{}, std::span(x), 2);
    c.barrier();
  });
  // allreduce 40/40; allgatherv own r+1 of 6; broadcast of 40 bytes from rank 2.
  CHECK(group.comm(0).stats() == gcomp::comm_stats{40 + 1, 40 + 5 + 40, 4});
  CHECK(group.comm(1).stats() == gcomp::comm_stats{40 + 2, 40 + 4 + 40, 4});
  CHECK(group.comm(2).stats() == gcomp::comm_stats{40 + 3 + 40, 40 + 3, 4});
  group.comm(1).reset_stats();
  CHECK(group.comm(1).stats() == gcomp::comm_stats{});

  inproc_group alone(1);
  alone.run([&](inproc_comm& c) {
    std::vector<double> x(7, 2.5);
    c.allreduce_sum(host_seq{}, std::span(x));
    CHECK(x == std::vector<double>(7, 2.5));
    auto request = c.iallreduce_sum(host_seq{}, std::span(x));
    request.wait();
  });
  CHECK(alone.comm(0).stats() == gcomp::comm_stats{0, 0, 2});  // nothing crosses
}

TEST_CASE("inproc: handles work from threads the caller starts") {
  inproc_group group(3);
  group.run([](inproc_comm& c) { c.barrier(); });  // a finished run leaves no trace
  std::vector<double> result(3);
  std::vector<std::thread> threads;
  for (int r = 0; r < 3; ++r)
    threads.emplace_back([&, r] {
      double x = r + 0.5;
      group.comm(r).allreduce_sum(host_seq{}, std::span(&x, 1));
      auto request = group.comm(r).iallreduce_sum(host_seq{}, std::span(&x, 1));
      request.wait();
      result[static_cast<std::size_t>(r)] = x;
    });
  for (auto& t : threads) t.join();
  CHECK(result == std::vector<double>(3, 13.5));
}
