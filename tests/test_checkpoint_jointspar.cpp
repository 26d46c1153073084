// Checkpoints of JointSpar and its layer sampler: 2N steps equal N steps, a save, a load into fresh
// objects and N more steps, bitwise, on 3 in-process workers; a checkpoint taken between begin_step and
// finish_step keeps the drawn set; mismatched and corrupt checkpoints are rejected with nothing changed.
#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "compressor_checks.hpp"
#include "gcomp/algo/divcomm.hpp"
#include "gcomp/algo/jointspar.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "least_squares.hpp"
#include "checkpoint_checks.hpp"

using namespace gcomp::test::least_squares;
using gcomp::test::expect_error;

using gcomp::test::check_rejected;

namespace {

constexpr int group_size = 3;  // M; the least-squares shards 0..2
const gcomp::layout layered{{"l0", 8}, {"l1", 6}, {"l2", 4}, {"l3", 2}};
const gcomp::host_seq seq;

using bytes_t = std::vector<std::byte>;

gcomp::jointspar_sgd<double> make_sgd() {
  return gcomp::jointspar_sgd<double>(4, gcomp::sgd<double>({.lr = 0.01, .momentum = 0.9}),
                                      {.p_min = 0.1, .seed = 6});
}

gcomp::jointspar_lars<double> make_lars() {
  return gcomp::jointspar_lars<double>(
      4,
      gcomp::lars<double>({.lr = 0.5, .momentum = 0.9, .weight_decay = 1e-4, .trust_coefficient = 0.01},
                          gcomp::lr_schedule::cosine(0.5, 200)),
      {.p_min = 0.1, .rule = gcomp::probability_rule::variance_optimal, .seed = 6});
}

// What a worker's run leaves behind, compared bitwise between runs.
struct outcome {
  std::vector<double> x;
  std::vector<std::uint8_t> masks;   // every step's active set, concatenated
  std::vector<double> probabilities; // p after every step, concatenated
  std::vector<double> momentum;      // the optimizer's momentum buffer at the end
  std::uint64_t steps = 0, total_bytes = 0;
  bytes_t state;                     // the final checkpoint: every saved field
  bool operator==(const outcome&) const = default;
};

// Steps [from, to) of this worker's gradient stream (the least-squares batch of step t).
template <class O>
void train(const problem& p, int rank, gcomp::inproc_comm& comm, gcomp::jointspar<O>& js,
           std::vector<double>& x, int from, int to, outcome& out) {
  std::vector<double> g(dims);
  std::vector<std::size_t> rows(batch);
  for (int t = from; t < to; ++t) {
    const gcomp::layer_mask active = js.begin_step();
    out.masks.insert(out.masks.end(), active.begin(), active.end());
    for (std::size_t k = 0; k < batch; ++k) rows[k] = batch_row(rank, t, k);
    add_gradient(p, rows, x.data(), g.data());
    REQUIRE(js.finish_step(seq, comm, layered, std::span<double>(x), std::span<const double>(g)));
    out.probabilities.insert(out.probabilities.end(), js.probabilities().begin(),
                             js.probabilities().end());
  }
}

template <class O>
void finish(const gcomp::jointspar<O>& js, const std::vector<double>& x, outcome& out) {
  out.x = x;
  out.momentum.assign(js.optimizer.momentum_buffer().begin(), js.optimizer.momentum_buffer().end());
  out.steps = js.steps();
  out.total_bytes = js.total_bytes();
  out.state = gcomp::checkpoint_bytes(js);
}

// 2N uninterrupted steps, and N steps + save + load into a fresh object + N steps.
template <class Make>
void check_resume_is_bitwise(Make make, int n) {
  const problem p = make_problem(77);
  std::vector<outcome> straight(group_size), resumed(group_size);
  std::vector<bytes_t> saved(group_size);
  gcomp::inproc_group group(group_size);
  group.run([&](gcomp::inproc_comm& comm) {
    const int rank = comm.rank();
    const auto r = static_cast<std::size_t>(rank);
    {
      auto js = make();
      std::vector<double> x(dims, 0.0);
      train(p, rank, comm, js, x, 0, 2 * n, straight[r]);
      finish(js, x, straight[r]);
    }
    std::vector<double> x(dims, 0.0);
    {
      auto js = make();
      train(p, rank, comm, js, x, 0, n, resumed[r]);
      saved[r] = gcomp::checkpoint_bytes(js);  // each worker saves its own object
    }                                          // and the object is gone
    auto fresh = make();
    gcomp::load_checkpoint(seq, std::span<const std::byte>(saved[r]), fresh);
    CHECK(fresh.steps() == std::uint64_t(n));
    CHECK(gcomp::checkpoint_bytes(fresh) == saved[r]);  // a load restores every saved field
    train(p, rank, comm, fresh, x, n, 2 * n, resumed[r]);
    finish(fresh, x, resumed[r]);
  });
  for (std::size_t m = 0; m < group_size; ++m) {
    CAPTURE(m);
    CHECK(resumed[m].x == straight[m].x);
    CHECK(resumed[m].masks == straight[m].masks);
    CHECK(resumed[m].probabilities == straight[m].probabilities);
    CHECK(resumed[m].momentum == straight[m].momentum);
    CHECK(resumed[m].steps == std::uint64_t(2 * n));
    CHECK(resumed[m].total_bytes == straight[m].total_bytes);
    CHECK(resumed[m].state == straight[m].state);
    CHECK(straight[m].x == straight[0].x);  // and the workers agree
  }
  // The run learned something: p moved away from uniform, momentum is non-zero.
  CHECK(straight[0].probabilities.back() != 0.5);
  CHECK_FALSE(straight[0].momentum.empty());
}

// A worker's jointspar after a few steps on its own (one-rank group).
template <class JS>
JS trained(JS js, const gcomp::layout& lay, int steps) {
  gcomp::inproc_group group(1);
  std::vector<double> x(lay.total_size(), 1.0), g(lay.total_size());
  for (int t = 0; t < steps; ++t) {
    for (std::size_t i = 0; i < g.size(); ++i) g[i] = 0.1 * double((i * 7 + std::size_t(t)) % 5) - 0.2;
    js.finish_step(seq, group.comm(0), lay, std::span<double>(x), std::span<const double>(g));
  }
  return js;
}


}  // namespace

TEST_CASE("JointSpar (momentum SGD, bandit): 2N steps equal N, save, load into a fresh object, N more, bitwise") {
  check_resume_is_bitwise(make_sgd, 60);
}

TEST_CASE("JointSpar-LARS (variance-optimal, cosine rate): resuming from a checkpoint is bitwise") {
  check_resume_is_bitwise(make_lars, 50);
}

TEST_CASE("a checkpoint between begin_step and finish_step keeps the drawn set, not a redraw") {
  // After begin_step, p is changed so that a redraw would surely differ: a
  // layer that is inactive in the drawn set gets p = 1 (always drawn). The
  // loaded object must finish the step with the set that was drawn.
  gcomp::inproc_group group(1);
  auto& comm = group.comm(0);
  auto js = trained(make_sgd(), layered, 7);
  std::vector<double> x(dims, 1.0), y(dims, 1.0), g(dims, 0.25);
  std::vector<std::uint8_t> drawn;
  std::size_t off = 4;  // a layer the drawn set leaves out
  for (int attempt = 0; attempt < 100 && off == 4; ++attempt) {
    const gcomp::layer_mask view = js.begin_step();
    drawn.assign(view.begin(), view.end());
    for (std::size_t d = 0; d < 4; ++d)
      if (drawn[d] == 0) off = d;
    if (off == 4) js.finish_step(seq, comm, layered, std::span<double>(x), std::span<const double>(g));
  }
  REQUIRE(off < 4);
  y = x;
  std::vector<double> q(4, 1.0 / 3.0);
  q[off] = 1.0;  // sum 2 = s
  js.set_probabilities(q);
  const bytes_t saved = gcomp::checkpoint_bytes(js);

  auto fresh = make_sgd();
  gcomp::load_checkpoint(seq, std::span<const std::byte>(saved), fresh);
  CHECK(std::vector<std::uint8_t>(fresh.mask().begin(), fresh.mask().end()) == drawn);
  const gcomp::layer_mask again = fresh.begin_step();
  CHECK(std::vector<std::uint8_t>(again.begin(), again.end()) == drawn);  // not redrawn from q

  js.finish_step(seq, comm, layered, std::span<double>(x), std::span<const double>(g));
  fresh.finish_step(seq, comm, layered, std::span<double>(y), std::span<const double>(g));
  CHECK(y == x);
  CHECK(gcomp::checkpoint_bytes(fresh) == gcomp::checkpoint_bytes(js));
}

TEST_CASE("the layer sampler alone: a loaded sampler draws the same sets and learns the same p") {
  gcomp::layer_sampler a(5, {.budget = 2.0, .p_min = 0.05, .rule = gcomp::probability_rule::bandit,
                             .bandit_rate = 0.3, .seed = 9});
  std::vector<std::uint8_t> mask(5);
  std::vector<double> norms(5);
  auto update = [&](gcomp::layer_sampler& s, std::uint64_t t) {
    s.draw(t, mask);
    for (std::size_t d = 0; d < 5; ++d) norms[d] = 0.5 + double((t * 3 + d) % 7);
    s.update(mask, norms);
  };
  for (std::uint64_t t = 0; t < 20; ++t) update(a, t);
  gcomp::checkpoint_writer out;
  a.save(out);
  const bytes_t saved = out.bytes();
  gcomp::layer_sampler b(5, {.budget = 2.0, .p_min = 0.05, .rule = gcomp::probability_rule::bandit,
                             .bandit_rate = 0.3, .seed = 9});
  gcomp::checkpoint_reader in(saved);
  b.load(seq, in);
  in.finish();
  const auto same = [](std::span<const double> u, std::span<const double> v) {
    return std::vector<double>(u.begin(), u.end()) == std::vector<double>(v.begin(), v.end());
  };
  CHECK(same(b.probabilities(), a.probabilities()));
  CHECK(same(b.inclusion_probabilities(), a.inclusion_probabilities()));  // recomputed bitwise
  CHECK(b.empty_probability() == a.empty_probability());
  CHECK(b.max_layer_norm() == a.max_layer_norm());
  for (std::uint64_t t = 20; t < 40; ++t) {
    std::vector<std::uint8_t> ma(5), mb(5);
    a.draw(t, ma);
    b.draw(t, mb);
    CHECK(ma == mb);
    update(a, t);
    update(b, t);
  }
  CHECK(same(b.probabilities(), a.probabilities()));

  // Options that give the state its meaning must match; the sampler is left as it was.
  for (const auto& [other, needle] :
       {std::pair{gcomp::layer_sampler_options{.budget = 2.0, .p_min = 0.05, .seed = 10}, "seed 9 but this sampler has seed 10"},
        std::pair{gcomp::layer_sampler_options{.budget = 2.5, .p_min = 0.05, .seed = 9}, "budget 2 but this sampler has budget 2.5"},
        std::pair{gcomp::layer_sampler_options{.budget = 2.0, .p_min = 0.1, .seed = 9}, "p_min 0.05 but this sampler has p_min 0.1"},
        std::pair{gcomp::layer_sampler_options{.budget = 2.0, .p_min = 0.05,
                                               .rule = gcomp::probability_rule::fixed, .seed = 9},
                  "rule bandit but this sampler has rule fixed"}}) {
    gcomp::layer_sampler c(5, other);
    const std::vector<double> p_before(c.probabilities().begin(), c.probabilities().end());
    gcomp::checkpoint_reader r(saved);
    expect_error([&] { c.load(seq, r); }, std::string("gcomp::layer_sampler::load: the checkpoint was written with ") + needle);
    CHECK(same(c.probabilities(), p_before));
  }
  gcomp::layer_sampler four(4, {.budget = 2.0, .p_min = 0.05, .seed = 9});
  gcomp::checkpoint_reader r(saved);
  expect_error([&] { four.load(seq, r); }, "the checkpoint has 5 layers but this sampler has 4");
}

TEST_CASE("JointSpar rejects mismatched checkpoints and leaves the object unchanged") {
  auto js = trained(make_sgd(), layered, 5);
  js.begin_step();

  SUBCASE("another layer count") {
    const gcomp::layout three{{"a", 8}, {"b", 6}, {"c", 6}};
    const auto other = trained(gcomp::jointspar_sgd<double>(3, gcomp::sgd<double>({.lr = 0.01, .momentum = 0.9}),
                                                            {.p_min = 0.1, .seed = 6}),
                               three, 5);
    check_rejected(js, gcomp::checkpoint_bytes(other),
                   "gcomp::jointspar::load: the checkpoint has 3 layers but this jointspar has 4");
  }
  SUBCASE("another method: JointSpar-LARS, and divisible Adam") {
    // The same sampler options, so the optimizer's section is the first to differ.
    const gcomp::jointspar_lars<double> lars(4, gcomp::lars<double>({.lr = 0.01}), {.p_min = 0.1, .seed = 6});
    check_rejected(js, gcomp::checkpoint_bytes(trained(lars, layered, 5)),
                   "expected the state of gcomp::sgd but the checkpoint holds gcomp::lars");
    const gcomp::divcomm<double> d(gcomp::random_contiguous_block<double, gcomp::rescale::none>({.ratio = 0.25}),
                                   {.payload = gcomp::background_payload::none});
    check_rejected(js, gcomp::checkpoint_bytes(d),
                   "expected the state of gcomp::jointspar but the checkpoint holds gcomp::divcomm");
  }
  SUBCASE("another seed") {
    const auto other = trained(gcomp::jointspar_sgd<double>(4, gcomp::sgd<double>({.lr = 0.01, .momentum = 0.9}),
                                                            {.p_min = 0.1, .seed = 7}),
                               layered, 5);
    check_rejected(js, gcomp::checkpoint_bytes(other), "seed 7 but this sampler has seed 6");
  }
  SUBCASE("another element type") {
    gcomp::jointspar_sgd<float> f(4, gcomp::sgd<float>({.lr = 0.01f, .momentum = 0.9f}), {.p_min = 0.1, .seed = 6});
    gcomp::inproc_group group(1);
    std::vector<float> x(dims, 1.0f), g(dims, 0.5f);
    f.finish_step(seq, group.comm(0), layered, std::span<float>(x), std::span<const float>(g));
    check_rejected(js, gcomp::checkpoint_bytes(f), "another element type?");
  }
  SUBCASE("every single corrupted byte, a truncation and an extension") {
    const bytes_t good = gcomp::checkpoint_bytes(trained(make_sgd(), layered, 9));
    int rejected = 0;
    for (std::size_t i = 0; i < good.size(); ++i) {
      bytes_t bad = good;
      bad[i] ^= std::byte{0x20};
      const bytes_t before = gcomp::checkpoint_bytes(js);
      try {
        gcomp::load_checkpoint(seq, std::span<const std::byte>(bad), js);
      } catch (const gcomp::error&) {
        ++rejected;
      }
      CHECK(gcomp::checkpoint_bytes(js) == before);
    }
    CHECK(rejected == int(good.size()));
    check_rejected(js, bytes_t(good.begin(), good.end() - 1), "truncated or padded");
    bytes_t longer = good;
    longer.push_back(std::byte{0});
    check_rejected(js, longer, "truncated or padded");
  }
  // And the object still trains: the rejected loads changed nothing.
  gcomp::inproc_group group(1);
  std::vector<double> x(dims, 1.0), g(dims, 0.5);
  CHECK(js.finish_step(seq, group.comm(0), layered, std::span<double>(x), std::span<const double>(g)));
  CHECK(js.steps() == 6);
}
