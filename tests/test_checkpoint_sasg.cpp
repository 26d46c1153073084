// Checkpoints of SASG, LAG, lazy<allgather>, lazy_rule and a pipeline with a lazy aggregator: 2N steps equal N, save, load into fresh objects, N more, bitwise, on 3 in-process workers; rejected checkpoints leave the object unchanged.
#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "gcomp/aggregate/allgather.hpp"
#include "gcomp/aggregate/lazy.hpp"
#include "gcomp/algo/sasg.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/compress/error_feedback.hpp"
#include "gcomp/compress/identity.hpp"
#include "gcomp/compress/topk.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "gcomp/exec/host.hpp"
#include "gcomp/optim/sgd.hpp"
#include "gcomp/pipeline.hpp"
#include "least_squares.hpp"
#include "checkpoint_checks.hpp"

using namespace gcomp::test::least_squares;
using bytes_t = std::vector<std::byte>;

using gcomp::test::check_rejected;
using gcomp::test::message_of;
using gcomp::test::same_bits;

namespace {

constexpr int group_size = 3;  // workers 0..2 of the least-squares problem's shards
const gcomp::layout model{{"w", 16}, {"b", 4}};
const problem data = make_problem(2024);

constexpr auto same_minibatch = gcomp::lazy_rule_form::same_minibatch;
constexpr auto last_uploaded = gcomp::lazy_rule_form::last_uploaded;



// Worker m's rows at stream position t: its mini-batch, or its whole shard.
std::vector<std::size_t> rows_of(int m, int t, bool full) {
  std::vector<std::size_t> rows;
  for (std::size_t k = 0; k < (full ? rows_per_worker : batch); ++k)
    rows.push_back(full ? std::size_t(m) * rows_per_worker + k : batch_row(m, t, k));
  return rows;
}

// Stream positions [from, to) of a lazy-descent method on this worker; a
// NaN is put into worker 1's gradient at position `poison` (never if < 0),
// so the skip count travels through the checkpoint too.
template <class Method, class T, class Policy>
void train(Method& method, const Policy& policy, gcomp::inproc_comm& comm, std::vector<T>& x,
           int from, int to, bool full, std::vector<int>& outcomes, int poison = -1) {
  std::vector<T> g(dims);
  for (int t = from; t < to; ++t) {
    const auto rows = rows_of(comm.rank(), t, full);
    add_gradient(data, rows, x.data(), g.data());
    if (t == poison && comm.rank() == 1) g[3] = std::numeric_limits<T>::quiet_NaN();
    bool up = false;
    if (method.options().form == same_minibatch)
      up = method.step(policy, comm, std::span<T>(x), std::span<const T>(g),
                       [&](std::span<const T> at, std::span<T> out) {
                         add_gradient(data, rows, at.data(), out.data());
                       });
    else
      up = method.step(policy, comm, std::span<T>(x), std::span<const T>(g));
    outcomes.push_back(method.last_step() == gcomp::lazy_step::skipped ? -1 : up ? 1 : 0);
  }
}

enum class via { bytes, stream };

// Each of the 3 workers trains 2 * half positions straight, and again half
// positions, saves, loads into a fresh object (made by `make`) and trains half more. The
// two must agree bitwise in parameters, decisions and final state; the saved
// state must have been in use (lazy skips before and after the save).
template <class Make, class Policy = gcomp::host_seq>
void check_resume(Make make, bool full, int half, int poison = -1, const Policy& policy = {},
                  via how = via::bytes) {
  using T = typename decltype(make())::value_type;
  std::vector<std::vector<T>> straight_x(group_size), resumed_x(group_size);
  std::vector<std::vector<int>> straight_out(group_size), resumed_out(group_size);
  std::vector<bytes_t> straight_state(group_size), resumed_state(group_size);
  std::vector<std::uint64_t> skips_first(group_size), skips_total(group_size), skipped(group_size);
  gcomp::inproc_group group(group_size);
  group.run([&](gcomp::inproc_comm& comm) {
    const auto m = std::size_t(comm.rank());
    {
      auto method = make();
      std::vector<T> x(dims, T(0));
      train(method, policy, comm, x, 0, 2 * half, full, straight_out[m], poison);
      straight_x[m] = x;
      straight_state[m] = gcomp::checkpoint_bytes(method);
    }
    std::vector<T> x(dims, T(0));
    bytes_t saved;
    std::stringstream stream;
    {
      auto method = make();
      train(method, policy, comm, x, 0, half, full, resumed_out[m], poison);
      saved = gcomp::checkpoint_bytes(method);
      if (how == via::stream) gcomp::save_checkpoint(stream, method);
      skips_first[m] = method.aggregator().total_skips();
    }
    auto fresh = make();
    if (how == via::stream)
      gcomp::load_checkpoint(policy, stream, fresh);
    else
      gcomp::load_checkpoint(policy, saved, fresh);
    CHECK(gcomp::checkpoint_bytes(fresh) == saved);  // what was loaded saves back the same
    CHECK(fresh.steps() == std::uint64_t(half) - (poison >= 0 && poison < half ? 1 : 0));
    train(fresh, policy, comm, x, half, 2 * half, full, resumed_out[m], poison);
    resumed_x[m] = x;
    resumed_state[m] = gcomp::checkpoint_bytes(fresh);
    skips_total[m] = fresh.aggregator().total_skips();
    skipped[m] = fresh.skipped_steps();
  });
  for (std::size_t m = 0; m < group_size; ++m) {
    CAPTURE(m);
    CHECK(same_bits(resumed_x[m], straight_x[m]));
    CHECK(resumed_out[m] == straight_out[m]);
    CHECK(resumed_state[m] == straight_state[m]);
    CHECK(same_bits(resumed_x[m], resumed_x[0]));
    // Stale messages were reused before the save and after the load.
    CHECK(skips_first[m] > 0);
    CHECK(skips_total[m] > skips_first[m]);
    CHECK(skipped[m] == (poison >= 0 ? 1u : 0u));
  }
}

auto make_sasg(double alpha, double ratio, std::size_t history, gcomp::lazy_rule_form form) {
  return [=] {
    return gcomp::sasg<double>(
        {.ratio = ratio, .descent = {.alpha = alpha, .history = history, .form = form, .seed = 5}},
        model);
  };
}

auto make_lag(std::size_t history, gcomp::lazy_rule_form form) {
  return [=] {
    return gcomp::lag<double>({.alpha = 0.01, .history = history, .form = form}, model);
  };
}

// A short SASG run of rank 0 of 3 workers, for the rejection tests.
bytes_t sasg_checkpoint(int steps) {
  bytes_t out;
  gcomp::inproc_group group(group_size);
  group.run([&](gcomp::inproc_comm& comm) {
    auto method = make_sasg(0.01, 0.25, 5, same_minibatch)();
    std::vector<double> x(dims, 0.0);
    std::vector<int> outcomes;
    train(method, gcomp::host_seq{}, comm, x, 0, steps, false, outcomes);
    if (comm.rank() == 0) out = gcomp::checkpoint_bytes(method);
  });
  return out;
}

constexpr std::size_t n = 50, k = 7;

std::vector<float> scripted_gradient(int step, int rank) {
  std::vector<float> g(n);
  for (std::size_t i = 0; i < n; ++i)
    g[i] = std::sin(0.37f * float(i) + 1.3f * float(rank) + 0.71f * float(step)) * float(1 + rank);
  return g;
}
// Everyone uploads at step 0; then worker r skips whenever (3t + r) % 4 == 1.
bool uploads_at(int step, int rank) { return step == 0 || (3 * step + rank) % 4 != 1; }

}  // namespace

TEST_CASE("SASG: 2N steps equal N, save, load into a fresh object, N more, bitwise") {
  SUBCASE("same-minibatch rule on mini-batches") {
    check_resume(make_sasg(0.01, 0.25, 5, same_minibatch), false, 40);
  }
  SUBCASE("last-uploaded rule on full local gradients") {
    check_resume(make_sasg(0.01, 0.25, 5, last_uploaded), true, 40);
  }
  SUBCASE("through a std::stream, with a non-finite skip before the save") {
    check_resume(make_sasg(0.01, 0.25, 5, same_minibatch), false, 40, 17, gcomp::host_seq{},
                 via::stream);
  }
  SUBCASE("with a non-finite skip after the load, on host_par") {
    check_resume(make_sasg(0.01, 0.25, 5, same_minibatch), false, 40, 55, gcomp::host_par(2));
  }
  SUBCASE("in float") {
    check_resume(
        [] {
          return gcomp::sasg<float>(
              {.ratio = 0.25, .descent = {.alpha = 0.01, .history = 5}}, model);
        },
        false, 40);
  }
}

TEST_CASE("LAG: 2N steps equal N, save, load into a fresh object, N more, bitwise") {
  SUBCASE("last-uploaded rule") { check_resume(make_lag(10, last_uploaded), true, 60); }
  SUBCASE("same-minibatch rule") { check_resume(make_lag(10, same_minibatch), true, 60); }
}

TEST_CASE("lazy<allgather>: a loaded aggregator reuses the saved stale messages bitwise") {
  // Scripted skips: after the load at step N, skipping workers' messages come
  // only from the checkpoint. The fresh aggregator decodes them at its first
  // step (load without the compressor) or at once (load with it).
  const int steps = 16, half = 8;
  for (bool typed : {false, true}) {
    CAPTURE(typed);
    std::vector<std::vector<std::vector<float>>> straight(group_size), resumed(group_size);
    gcomp::inproc_group group(group_size);
    group.run([&](gcomp::inproc_comm& comm) {
      const auto m = std::size_t(comm.rank());
      gcomp::topk<float> c({.k = k});
      const auto step = [&](gcomp::lazy<gcomp::allgather>& agg, int t, auto& out) {
        const auto g = scripted_gradient(t, comm.rank());
        std::vector<float> global(n);
        agg.aggregate(gcomp::host_seq{}, comm, c, std::span<const float>(g), std::span<float>(global),
                      {0, std::uint64_t(t), std::uint32_t(comm.rank())}, uploads_at(t, comm.rank()));
        out.push_back(global);
      };
      gcomp::lazy<gcomp::allgather> a({.reduction = gcomp::lazy_reduction::sum});
      for (int t = 0; t < steps; ++t) step(a, t, straight[m]);
      gcomp::lazy<gcomp::allgather> b({.reduction = gcomp::lazy_reduction::sum});
      for (int t = 0; t < half; ++t) step(b, t, resumed[m]);
      const bytes_t saved = gcomp::checkpoint_bytes(b);
      gcomp::lazy<gcomp::allgather> fresh({.reduction = gcomp::lazy_reduction::sum});
      gcomp::checkpoint_reader in(saved);
      if (typed)
        fresh.load(gcomp::host_seq{}, in, c);
      else
        fresh.load(gcomp::host_seq{}, in);
      in.finish();
      CHECK(gcomp::checkpoint_bytes(fresh) == saved);
      CHECK(fresh.uploads(1) == b.uploads(1));
      CHECK(fresh.skips(2) == b.skips(2));
      for (int t = half; t < steps; ++t) step(fresh, t, resumed[m]);
      CHECK(gcomp::checkpoint_bytes(fresh) == gcomp::checkpoint_bytes(a));
    });
    for (std::size_t m = 0; m < group_size; ++m) {
      REQUIRE(resumed[m].size() == straight[m].size());
      int differing = 0;
      for (std::size_t t = 0; t < straight[m].size(); ++t)
        differing += !same_bits(resumed[m][t], straight[m][t]);
      CHECK(differing == 0);
    }
  }
}

TEST_CASE("a pipeline with lazy<allgather>: 2N steps equal N, save, load, N more, bitwise") {
  const auto make = [] {
    return gcomp::pipeline{
        gcomp::error_feedback<gcomp::topk<double>>(gcomp::topk<double>({.ratio = 0.25}, model)),
        gcomp::lazy<gcomp::allgather>{}, gcomp::sgd<double>({.lr = 0.05, .momentum = 0.9}), 7};
  };
  const int half = 25;
  std::vector<std::vector<double>> straight_x(group_size), resumed_x(group_size);
  std::vector<bytes_t> straight_state(group_size), resumed_state(group_size);
  gcomp::inproc_group group(group_size);
  group.run([&](gcomp::inproc_comm& comm) {
    const auto m = std::size_t(comm.rank());
    const auto run = [&](auto& pipe, std::vector<double>& x, int from, int to) {
      std::vector<double> g(dims);
      for (int t = from; t < to; ++t) {
        add_gradient(data, rows_of(comm.rank(), t, false), x.data(), g.data());
        if (t == 31 && comm.rank() == 2) g[0] = -std::numeric_limits<double>::infinity();
        pipe.step(gcomp::host_seq{}, comm, model, std::span<double>(x), std::span<const double>(g));
      }
    };
    {
      auto pipe = make();
      std::vector<double> x(dims, 0.0);
      run(pipe, x, 0, 2 * half);
      straight_x[m] = x;
      straight_state[m] = gcomp::checkpoint_bytes(pipe);
    }
    std::vector<double> x(dims, 0.0);
    bytes_t saved;
    {
      auto pipe = make();
      run(pipe, x, 0, half);
      saved = gcomp::checkpoint_bytes(pipe);
    }
    auto fresh = make();
    gcomp::load_checkpoint(gcomp::host_seq{}, saved, fresh);
    CHECK(gcomp::checkpoint_bytes(fresh) == saved);  // the messages wait, undecoded, as loaded
    CHECK(fresh.aggregator.total_uploads() == std::uint64_t(half) * group_size);
    run(fresh, x, half, 2 * half);
    CHECK(fresh.skipped_steps() == 1);
    resumed_x[m] = x;
    resumed_state[m] = gcomp::checkpoint_bytes(fresh);
  });
  for (std::size_t m = 0; m < group_size; ++m) {
    CAPTURE(m);
    CHECK(same_bits(resumed_x[m], straight_x[m]));
    CHECK(resumed_state[m] == straight_state[m]);
  }
}

TEST_CASE("SASG rejects a checkpoint of another size, method, option or a corrupted one, unchanged") {
  const bytes_t saved = sasg_checkpoint(20);
  gcomp::inproc_group one(1);
  // Objects that have stepped (M = 1), so "unchanged" is a real state.
  const auto stepped = [&](auto method, std::size_t size) {
    std::vector<double> x(size, 0.0), g(size, 0.25);
    for (int t = 0; t < 3; ++t) {
      for (std::size_t i = 0; i < size; ++i) g[i] = 0.25 + 0.01 * double(t) * double(i);
      method.step(gcomp::host_seq{}, one.comm(0), std::span<double>(x), std::span<const double>(g),
                  [&](std::span<const double>, std::span<double> out) {
                    std::fill(out.begin(), out.end(), 0.5);
                  });
    }
    return method;
  };
  SUBCASE("another model size") {
    const gcomp::layout bigger{{"w", 16}, {"b", 5}};
    auto method =
        stepped(gcomp::sasg<double>({.ratio = 0.25, .descent = {.history = 5, .seed = 5}}, bigger), 21);
    check_rejected(method, saved,
                   "gcomp::sasg::load: the checkpoint is of a model with 2 layers and 20 elements "
                   "but this one has 2 layers and 21");
  }
  SUBCASE("another method") {
    auto method = stepped(gcomp::lag<double>({.history = 5}, model), dims);
    check_rejected(method, saved, "expected the state of gcomp::lag but the checkpoint holds gcomp::sasg");
  }
  SUBCASE("another option") {
    auto method = stepped(
        gcomp::sasg<double>({.ratio = 0.25, .descent = {.alpha = 0.02, .history = 5, .seed = 5}},
                            model),
        dims);
    check_rejected(method, saved, "gcomp::sasg::load: the checkpoint was written with alpha 0.01");
    auto longer = stepped(
        gcomp::sasg<double>({.ratio = 0.25, .descent = {.history = 6, .seed = 5}}, model), dims);
    check_rejected(longer, saved, "gcomp::lazy_rule::load: the checkpoint's rule has history D = 5 "
                                  "but this rule has D = 6");
  }
  SUBCASE("a corrupted byte anywhere") {
    auto method = stepped(make_sasg(0.01, 0.25, 5, same_minibatch)(), dims);
    const bytes_t before = gcomp::checkpoint_bytes(method);
    std::size_t rejected = 0;
    for (std::size_t i = 0; i < saved.size(); ++i) {
      bytes_t bad = saved;
      bad[i] ^= std::byte{0x10};
      try {
        gcomp::load_checkpoint(gcomp::host_seq{}, bad, method);
      } catch (const gcomp::error&) {
        ++rejected;
      }
    }
    CHECK(rejected == saved.size());
    CHECK(gcomp::checkpoint_bytes(method) == before);
    // The intact one is refused too, by name: this object has served a group
    // of 1, the checkpoint's a group of 3. A fresh object takes it.
    check_rejected(method, saved,
                   "gcomp::lazy<allgather>::load: the checkpoint is of a group of 3 workers but "
                   "this aggregator has served a group of 1");
    auto fresh = make_sasg(0.01, 0.25, 5, same_minibatch)();
    gcomp::load_checkpoint(gcomp::host_seq{}, saved, fresh);
    CHECK(gcomp::checkpoint_bytes(fresh) == saved);
  }
}

TEST_CASE("lazy<allgather> rejects another reduction, group, size or compressor, unchanged") {
  // The state of rank 0 after 5 scripted steps on 3 workers, with topk messages.
  bytes_t saved;
  {
    gcomp::inproc_group group(group_size);
    group.run([&](gcomp::inproc_comm& comm) {
      gcomp::lazy<gcomp::allgather> agg;
      gcomp::topk<float> c({.k = k});
      std::vector<float> global(n);
      for (int t = 0; t < 5; ++t) {
        const auto g = scripted_gradient(t, comm.rank());
        agg.aggregate(gcomp::host_seq{}, comm, c, std::span<const float>(g), std::span<float>(global),
                      {0, std::uint64_t(t), std::uint32_t(comm.rank())}, uploads_at(t, comm.rank()));
      }
      if (comm.rank() == 0) saved = gcomp::checkpoint_bytes(agg);
    });
  }
  SUBCASE("another reduction") {
    gcomp::lazy<gcomp::allgather> sum({.reduction = gcomp::lazy_reduction::sum});
    check_rejected(sum, saved,
                   "the checkpoint combines the messages by their mean but this aggregator takes "
                   "their sum");
  }
  SUBCASE("another group or gradient size, once stepped") {
    gcomp::inproc_group two(2);
    std::vector<gcomp::lazy<gcomp::allgather>> aggs(2);
    two.run([&](gcomp::inproc_comm& comm) {
      gcomp::topk<float> c({.k = k});
      const auto g = scripted_gradient(0, comm.rank());
      std::vector<float> global(n);
      aggs[std::size_t(comm.rank())].aggregate(gcomp::host_seq{}, comm, c, std::span<const float>(g),
                                               std::span<float>(global), {}, true);
    });
    check_rejected(aggs[0], saved,
                   "gcomp::lazy<allgather>::load: the checkpoint is of a group of 3 workers but "
                   "this aggregator has served a group of 2");
    gcomp::inproc_group three(group_size);
    gcomp::lazy<gcomp::allgather> longer;
    three.run([&](gcomp::inproc_comm& comm) {
      gcomp::lazy<gcomp::allgather> agg;
      gcomp::topk<float> c({.k = k});
      const std::vector<float> g(n + 1, 1.0f);
      std::vector<float> global(n + 1);
      agg.aggregate(gcomp::host_seq{}, comm, c, std::span<const float>(g), std::span<float>(global),
                    {}, true);
      if (comm.rank() == 0) longer = agg;
    });
    check_rejected(longer, saved,
                   "the checkpoint holds messages of size 50 but this aggregator's are of size 51");
  }
  SUBCASE("another compressor: at once with it, at the next step without it") {
    gcomp::lazy<gcomp::allgather> agg;
    const bytes_t empty = gcomp::checkpoint_bytes(agg);
    {
      gcomp::checkpoint_reader in(saved);
      const std::string what =
          message_of([&] { agg.load(gcomp::host_seq{}, in, gcomp::identity<float>{}); });
      CHECK(what.find("gcomp::lazy<allgather>::load: the message of rank 0 loaded from the "
                      "checkpoint does not fit this compressor") != std::string::npos);
      CHECK(gcomp::checkpoint_bytes(agg) == empty);
    }
    // Without the compressor the mismatch shows at the first step, on every
    // worker alike and before any collective, with nothing changed.
    gcomp::inproc_group group(group_size);
    std::vector<std::string> errors(group_size);
    group.run([&](gcomp::inproc_comm& comm) {
      gcomp::lazy<gcomp::allgather> fresh;
      gcomp::load_checkpoint(gcomp::host_seq{}, saved, fresh);
      gcomp::identity<float> c;
      const auto g = scripted_gradient(5, comm.rank());
      std::vector<float> global(n, 7.0f);
      errors[std::size_t(comm.rank())] = message_of([&] {
        fresh.aggregate(gcomp::host_seq{}, comm, c, std::span<const float>(g), std::span<float>(global),
                        {}, true);
      });
      CHECK(global == std::vector<float>(n, 7.0f));
      CHECK(gcomp::checkpoint_bytes(fresh) == saved);
      CHECK(comm.stats().collectives == 0);
    });
    for (const auto& e : errors)
      CHECK(e.find("gcomp::lazy<allgather>::aggregate: the message of rank 0 loaded from the "
                   "checkpoint does not fit this compressor") != std::string::npos);
  }
  SUBCASE("an inconsistent checkpoint with a valid checksum") {
    // Rank 1 has uploaded but the checkpoint holds no message for it.
    gcomp::checkpoint_writer w;
    w.begin("gcomp::lazy<allgather>", 1);
    w.value("reduction", gcomp::lazy_reduction::mean);
    w.value("started", true);
    w.value("dimension", std::uint64_t{n});
    w.array("uploads", std::vector<std::uint64_t>{1, 1});
    w.array("skips", std::vector<std::uint64_t>{0, 0});
    w.array("message_bytes", std::vector<std::uint64_t>{0, 0});
    w.array("messages", std::vector<std::byte>{});
    w.end();
    gcomp::lazy<gcomp::allgather> agg;
    check_rejected(agg, w.bytes(), "rank 0 has 1 uploads but no stored message");
  }
}

TEST_CASE("lazy_rule: save and load keep the ring of model changes and the counts") {
  gcomp::lazy_rule a({.history = 3, .alpha = 0.5, .xi = {0.2, 0.3, 0.4}});
  gcomp::lazy_rule b({.history = 3, .alpha = 0.5, .xi = {0.2, 0.3, 0.4}});
  const double changes[] = {1.0, 2.0, 4.0, 8.0, 16.0, 0.5, 0.25};
  for (std::size_t t = 0; t < 7; ++t) {
    const bool up = a.forced() || t % 2 == 0;
    a.record(up, changes[t]);
    if (t == 3) {
      gcomp::load_checkpoint(gcomp::host_seq{}, gcomp::checkpoint_bytes(a), b);
      CHECK(b.threshold(2) == a.threshold(2));
    }
    if (t > 3) b.record(up, changes[t]);
  }
  CHECK(b.threshold(2) == a.threshold(2));
  CHECK(b.staleness() == a.staleness());
  CHECK(gcomp::checkpoint_bytes(b) == gcomp::checkpoint_bytes(a));
  gcomp::lazy_rule other({.history = 3, .alpha = 0.5, .xi = {0.2, 0.3, 0.5}});
  check_rejected(other, gcomp::checkpoint_bytes(a),
                 "gcomp::lazy_rule::load: the checkpoint's rule has other weights xi");
}
