// Checkpoints of divisible Adam (divcomm and its divisible aggregator): 2N steps equal N steps, a save,
// a load into fresh objects and N more steps, bitwise, on 3 in-process workers and every background
// payload; a checkpoint needs the background idle; mismatched and corrupt checkpoints are rejected with
// nothing changed.
#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "compressor_checks.hpp"
#include "delayed_comm.hpp"
#include "gcomp/algo/divcomm.hpp"
#include "gcomp/algo/jointspar.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "least_squares.hpp"
#include "checkpoint_checks.hpp"

using namespace gcomp::test::least_squares;
using gcomp::background_payload;
using gcomp::test::expect_error;

using gcomp::test::check_rejected;

namespace {

constexpr int group_size = 3;  // M; the least-squares shards 0..2
const gcomp::layout lay{{"w", 16}, {"b", 4}};
const gcomp::host_seq seq;

using bytes_t = std::vector<std::byte>;
using block = gcomp::random_contiguous_block<double, gcomp::rescale::none>;
using method = gcomp::divcomm<double, block>;

method make(background_payload payload, std::uint64_t seed = 11) {
  method d(block({.ratio = 0.25}), {.payload = payload, .delay = 1},
           {.lr = 0.02, .weight_decay = 1e-3, .amsgrad = true}, seed);
  d.optimizer.set_schedule(gcomp::lr_schedule::cosine(0.02, 200));
  return d;
}

// What a worker's run leaves behind, compared bitwise between runs.
struct outcome {
  std::vector<double> x, m, v, vmax, residual;
  std::vector<std::vector<double>> history;  // x after every step
  gcomp::background_counters counters;
  gcomp::comm_stats foreground, background;
  std::uint64_t steps = 0;
  bytes_t state;  // the final checkpoint: every saved field
};

bool same_counters(const gcomp::background_counters& a, const gcomp::background_counters& b) {
  return a.started == b.started && a.applied == b.applied && a.skipped == b.skipped &&
         a.pending_checks == b.pending_checks;
}

// Steps [from, to) of this worker's gradient stream (the least-squares batch of step t).
template <class Comm>
void train(const problem& p, Comm& comm, method& d, std::vector<double>& x, int from, int to,
           outcome& out) {
  std::vector<double> g(dims);
  std::vector<std::size_t> rows(batch);
  for (int t = from; t < to; ++t) {
    for (std::size_t k = 0; k < batch; ++k) rows[k] = batch_row(comm.rank(), t, k);
    add_gradient(p, rows, x.data(), g.data());
    REQUIRE(d.step(seq, comm, lay, std::span<double>(x), std::span<const double>(g)));
    out.history.push_back(x);
  }
}

template <class Comm>
void finish(Comm& comm, method& d, std::vector<double>& x, outcome& out) {
  d.finish(seq, comm, std::span<double>(x));  // idle background: the object can be saved
  out.x = x;
  out.m.assign(d.optimizer.exp_avg().begin(), d.optimizer.exp_avg().end());
  out.v.assign(d.optimizer.exp_avg_sq().begin(), d.optimizer.exp_avg_sq().end());
  out.vmax.assign(d.optimizer.max_exp_avg_sq().begin(), d.optimizer.max_exp_avg_sq().end());
  out.residual.assign(d.aggregator.residual().begin(), d.aggregator.residual().end());
  out.counters = d.aggregator.counters();
  out.foreground = d.foreground_stats();
  out.background = d.background_stats();
  out.steps = d.steps();
  out.state = gcomp::checkpoint_bytes(d);
}

// A method after a few steps of its own (one-rank group), background finished.
method trained(method d, const gcomp::layout& l, int steps) {
  gcomp::inproc_group group(1);
  std::vector<double> x(l.total_size(), 1.0), g(l.total_size());
  for (int t = 0; t < steps; ++t) {
    for (std::size_t i = 0; i < g.size(); ++i) g[i] = 0.1 * double((i * 7 + std::size_t(t)) % 5) - 0.2;
    d.step(seq, group.comm(0), l, std::span<double>(x), std::span<const double>(g));
  }
  d.finish(seq, group.comm(0), std::span<double>(x));
  return d;
}


}  // namespace

TEST_CASE("divisible Adam: 2N steps equal N, finish, save, load into a fresh object, N more, bitwise") {
  // The background needs nothing in flight at a checkpoint, so the
  // uninterrupted run calls finish() at step N as well; with no background
  // there is nothing to finish and the run is literally the same. The
  // background's completion is made deterministic by delayed_comm (each
  // operation is seen finished at its first test(), one step after it
  // started), so that two runs can be compared bit for bit.
  constexpr int n = 40;
  const problem p = make_problem(31);
  for (background_payload payload :
       {background_payload::none, background_payload::parameters, background_payload::residual}) {
    CAPTURE(static_cast<int>(payload));
    std::vector<outcome> straight(group_size), resumed(group_size);
    std::vector<bytes_t> saved(group_size);
    gcomp::inproc_group group(group_size);
    group.run([&](gcomp::inproc_comm& inner) {
      const auto r = static_cast<std::size_t>(inner.rank());
      {
        gcomp::test::delayed_comm comm(inner, 1);
        method d = make(payload);
        std::vector<double> x(dims, 0.0);
        train(p, comm, d, x, 0, n, straight[r]);
        if (payload != background_payload::none) d.finish(seq, comm, std::span<double>(x));
        train(p, comm, d, x, n, 2 * n, straight[r]);
        finish(comm, d, x, straight[r]);
      }
      std::vector<double> x(dims, 0.0);
      {
        gcomp::test::delayed_comm comm(inner, 1);
        method d = make(payload);
        train(p, comm, d, x, 0, n, resumed[r]);
        if (payload != background_payload::none) d.finish(seq, comm, std::span<double>(x));
        saved[r] = gcomp::checkpoint_bytes(d);  // each worker saves its own object
      }                                         // and the object and its transport are gone
      gcomp::test::delayed_comm comm(inner, 1);
      method fresh = make(payload);
      gcomp::load_checkpoint(seq, std::span<const std::byte>(saved[r]), fresh);
      CHECK(fresh.steps() == std::uint64_t(n));
      CHECK(gcomp::checkpoint_bytes(fresh) == saved[r]);  // a load restores every saved field
      train(p, comm, fresh, x, n, 2 * n, resumed[r]);
      finish(comm, fresh, x, resumed[r]);
    });
    for (std::size_t m = 0; m < group_size; ++m) {
      CAPTURE(m);
      CHECK(resumed[m].history == straight[m].history);
      CHECK(resumed[m].x == straight[m].x);
      CHECK(resumed[m].m == straight[m].m);
      CHECK(resumed[m].v == straight[m].v);
      CHECK(resumed[m].vmax == straight[m].vmax);
      CHECK(resumed[m].residual == straight[m].residual);
      CHECK(same_counters(resumed[m].counters, straight[m].counters));
      CHECK(resumed[m].foreground == straight[m].foreground);
      CHECK(resumed[m].background == straight[m].background);
      CHECK(resumed[m].steps == std::uint64_t(2 * n));
      CHECK(resumed[m].state == straight[m].state);
    }
    // Each worker's residual is its own (error feedback keeps what it did not send).
    CHECK(straight[1].residual != straight[0].residual);
    if (payload != background_payload::none) CHECK(straight[0].counters.applied > 0);
  }
}

TEST_CASE("a checkpoint needs the background idle: save and load refuse while an operation is in flight") {
  gcomp::inproc_group group(2);
  group.run([&](gcomp::inproc_comm& inner) {
    gcomp::test::delayed_comm comm(inner);  // holds the background until release()
    method d = make(background_payload::parameters);
    std::vector<double> x(dims, 1.0), g(dims, 0.5);
    d.step(seq, comm, lay, std::span<double>(x), std::span<const double>(g));
    REQUIRE(d.aggregator.background_pending());
    const std::vector<double> x1 = x;
    const std::vector<double> e1(d.aggregator.residual().begin(), d.aggregator.residual().end());
    expect_error([&] { (void)gcomp::checkpoint_bytes(d); },
                 "gcomp::divcomm::save: a background operation is in flight; call finish() on every rank first");
    const bytes_t idle = gcomp::checkpoint_bytes(make(background_payload::parameters));
    gcomp::checkpoint_reader in(idle);
    expect_error([&] { d.load(seq, in); },
                 "gcomp::divcomm::load: a background operation is in flight; call finish() on every rank first");
    expect_error([&] { (void)gcomp::checkpoint_bytes(d.aggregator); },
                 "gcomp::divisible::save: a background operation is in flight");
    CHECK(x == x1);
    CHECK(std::vector<double>(d.aggregator.residual().begin(), d.aggregator.residual().end()) == e1);
    CHECK(d.steps() == 1);
    CHECK(d.aggregator.background_pending());
    comm.release();
    d.finish(seq, comm, std::span<double>(x));
    CHECK_FALSE(gcomp::checkpoint_bytes(d).empty());  // idle now
  });
}

TEST_CASE("divisible alone: copies need it idle, and its checkpoint round-trips") {
  gcomp::inproc_group group(1);
  auto& comm = group.comm(0);
  gcomp::divisible<double> a({.payload = background_payload::residual, .delay = 2});
  block c({.ratio = 0.25});
  std::vector<double> x(dims, 1.0), g(dims), out(dims);
  for (std::uint64_t t = 0; t < 5; ++t) {
    for (std::size_t i = 0; i < dims; ++i) g[i] = double((i + t) % 3) - 1.0;
    a.aggregate(seq, comm, c, std::span<const double>(g), std::span<double>(out), {1, t, 0});
    a.background(seq, comm, std::span<double>(x));
  }
  REQUIRE(a.background_pending());
  expect_error([&] { gcomp::divisible<double> copy(a); }, "gcomp::divisible (copy): a background operation is in flight");
  gcomp::divisible<double> target({.payload = background_payload::residual, .delay = 2});
  target.aggregate(seq, comm, c, std::span<const double>(g), std::span<double>(out), {1, 0, 0});
  target.background(seq, comm, std::span<double>(x));
  REQUIRE(target.background_pending());
  gcomp::divisible<double> idle({.payload = background_payload::residual, .delay = 2});
  expect_error([&] { target = idle; }, "gcomp::divisible (assignment): a background operation is in flight");
  target.finish(seq, comm, std::span<double>(x));
  a.finish(seq, comm, std::span<double>(x));

  const bytes_t saved = gcomp::checkpoint_bytes(a);
  gcomp::divisible<double> b({.payload = background_payload::residual, .delay = 2});
  gcomp::load_checkpoint(seq, std::span<const std::byte>(saved), b);
  CHECK(gcomp::checkpoint_bytes(b) == saved);
  CHECK(std::vector<double>(b.residual().begin(), b.residual().end()) ==
        std::vector<double>(a.residual().begin(), a.residual().end()));
  CHECK(b.foreground_stats() == a.foreground_stats());
  CHECK(b.background_stats() == a.background_stats());
  // Another option, and another model size once the object has one: rejected, unchanged.
  gcomp::divisible<double> other_delay({.payload = background_payload::residual, .delay = 1});
  const bytes_t before = gcomp::checkpoint_bytes(other_delay);
  expect_error([&] { gcomp::load_checkpoint(seq, std::span<const std::byte>(saved), other_delay); },
               "gcomp::divisible::load: the checkpoint was written with payload 2, delay 2, realign_every 16 "
               "but this object has payload 2, delay 1, realign_every 16");
  CHECK(gcomp::checkpoint_bytes(other_delay) == before);
  gcomp::divisible<double> bigger({.payload = background_payload::residual, .delay = 2});
  std::vector<double> g21(dims + 1, 0.5), out21(dims + 1);
  bigger.aggregate(seq, comm, c, std::span<const double>(g21), std::span<double>(out21), {1, 0, 0});
  const bytes_t bigger_before = gcomp::checkpoint_bytes(bigger);
  expect_error([&] { gcomp::load_checkpoint(seq, std::span<const std::byte>(saved), bigger); },
               "the checkpoint's residual has size 20 but this object's residual has size 21");
  CHECK(gcomp::checkpoint_bytes(bigger) == bigger_before);
}

TEST_CASE("divcomm rejects mismatched checkpoints and leaves the object unchanged") {
  method d = trained(make(background_payload::parameters), lay, 5);

  SUBCASE("another layer count: rejected by a used object, and by a fresh one's next step") {
    const gcomp::layout three{{"a", 8}, {"b", 8}, {"c", 4}};  // the same 20 elements
    const bytes_t other = gcomp::checkpoint_bytes(trained(make(background_payload::parameters), three, 5));
    check_rejected(d, other, "gcomp::divcomm::load: the checkpoint's model has 3 layers but this divcomm's has 2");
    // A fresh object does not know its model yet: it takes the checkpoint's,
    // and its first step under another layout is refused before anything moves.
    method fresh = make(background_payload::parameters);
    gcomp::load_checkpoint(seq, std::span<const std::byte>(other), fresh);
    const bytes_t loaded = gcomp::checkpoint_bytes(fresh);
    gcomp::inproc_group group(1);
    std::vector<double> x(dims, 1.0), g(dims, 0.5);
    expect_error([&] { fresh.step(seq, group.comm(0), lay, std::span<double>(x), std::span<const double>(g)); },
                 "gcomp::divcomm::step: layout layers has size 2 but the layers of the first step has size 3");
    CHECK(x == std::vector<double>(dims, 1.0));
    CHECK(gcomp::checkpoint_bytes(fresh) == loaded);
  }
  SUBCASE("another model size") {
    const gcomp::layout bigger{{"w", 16}, {"b", 5}};
    check_rejected(d, gcomp::checkpoint_bytes(trained(make(background_payload::parameters), bigger, 5)),
                   "the checkpoint's model has 21 elements but this divcomm's has 20");
  }
  SUBCASE("another method: JointSpar") {
    const gcomp::jointspar_sgd<double> js(2, gcomp::sgd<double>({.lr = 0.01}));
    check_rejected(d, gcomp::checkpoint_bytes(js),
                   "expected the state of gcomp::divcomm but the checkpoint holds gcomp::jointspar");
  }
  SUBCASE("another seed, another background payload, another element type") {
    check_rejected(d, gcomp::checkpoint_bytes(trained(make(background_payload::parameters, 12), lay, 5)),
                   "gcomp::divcomm::load: the checkpoint was written with seed 12 but this divcomm has seed 11");
    check_rejected(d, gcomp::checkpoint_bytes(trained(make(background_payload::residual), lay, 5)),
                   "the checkpoint was written with payload 2, delay 1, realign_every 16 but this object "
                   "has payload 1, delay 1, realign_every 16");
    gcomp::divcomm<float> f(gcomp::random_contiguous_block<float, gcomp::rescale::none>({.ratio = 0.25}),
                            {.payload = background_payload::parameters}, {}, 11);
    gcomp::inproc_group group(1);
    std::vector<float> x(dims, 1.0f), g(dims, 0.5f);
    f.step(seq, group.comm(0), lay, std::span<float>(x), std::span<const float>(g));
    f.finish(seq, group.comm(0), std::span<float>(x));
    check_rejected(d, gcomp::checkpoint_bytes(f), "another element type?");
  }
  SUBCASE("every single corrupted byte, a truncation and an extension") {
    const bytes_t good = gcomp::checkpoint_bytes(trained(make(background_payload::parameters), lay, 9));
    int rejected = 0;
    for (std::size_t i = 0; i < good.size(); ++i) {
      bytes_t bad = good;
      bad[i] ^= std::byte{0x01};
      const bytes_t before = gcomp::checkpoint_bytes(d);
      try {
        gcomp::load_checkpoint(seq, std::span<const std::byte>(bad), d);
      } catch (const gcomp::error&) {
        ++rejected;
      }
      CHECK(gcomp::checkpoint_bytes(d) == before);
    }
    CHECK(rejected == int(good.size()));
    check_rejected(d, bytes_t(good.begin(), good.end() - 1), "truncated or padded");
    bytes_t longer = good;
    longer.push_back(std::byte{0});
    check_rejected(d, longer, "truncated or padded");
  }
  // And the object still trains: the rejected loads changed nothing.
  gcomp::inproc_group group(1);
  std::vector<double> x(dims, 1.0), g(dims, 0.5);
  CHECK(d.step(seq, group.comm(0), lay, std::span<double>(x), std::span<const double>(g)));
  CHECK(d.steps() == 6);
  d.finish(seq, group.comm(0), std::span<double>(x));
}
