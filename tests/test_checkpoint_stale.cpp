// Checkpoints of compressed descent with staleness (stale_compressed_gd, the parameter-server form, parameter_server in a pipeline), the model history and periodic averaging: 2N steps equal N, save, load into fresh objects, N more, bitwise, on 3 in-process workers; rejected checkpoints leave the object unchanged.
#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "gcomp/aggregate/periodic_average.hpp"
#include "gcomp/aggregate/stale.hpp"
#include "gcomp/algo/stale_compressed.hpp"
#include "gcomp/comm/inproc.hpp"
#include "gcomp/compress/error_feedback.hpp"
#include "gcomp/compress/identity.hpp"
#include "gcomp/compress/qsgd.hpp"
#include "gcomp/compress/randomk.hpp"
#include "gcomp/compress/topk.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "gcomp/exec/host.hpp"
#include "gcomp/optim/sgd.hpp"
#include "gcomp/pipeline.hpp"
#include "checkpoint_checks.hpp"

using bytes_t = std::vector<std::byte>;

using gcomp::test::check_rejected;
using gcomp::test::message_of;
using gcomp::test::same_bits;

namespace {

constexpr int group_size = 3;
constexpr std::size_t dims = 24;



// Worker m's stochastic gradient at stream position p: its own quadratic
// f_m(x) = 1/2 sum_j h_mj (x_j - x*_j)^2 plus a batch noise fixed by (m, p).
void gradient(int m, int p, std::span<const double> model, std::span<double> out) {
  for (std::size_t j = 0; j < model.size(); ++j) {
    const double h = 0.5 + 0.5 * std::fabs(std::sin(double(j) + 1.7 * m));
    out[j] = h * (model[j] - (1.0 + 0.1 * double(j))) +
             0.05 * std::sin(1.1 * double(j) + 0.7 * double(p) + 2.3 * double(m));
  }
}

const gcomp::stale_options gd_options{
    .gamma = 0.2, .delay = {.max_delay = 3, .kind = gcomp::delay_kind::uniform, .seed = 21}, .seed = 4};
const gcomp::stale_options ps_options{.gamma = 0.05,
                                      .delay = {.max_delay = 3, .kind = gcomp::delay_kind::uniform, .seed = 21},
                                      .seed = 4,
                                      .period = 2};

// Stream positions [from, to) of stale_compressed_gd (one process); a NaN at
// position `poison` makes that step a skipped one.
template <class Method>
void train_gd(Method& method, std::vector<double>& x, int from, int to, int poison = -1) {
  for (int p = from; p < to; ++p)
    method.step(gcomp::host_seq{}, std::span<double>(x),
                [&](std::span<const double> model, std::uint64_t, std::span<double> out) {
                  gradient(0, p, model, out);
                  if (p == poison) out[2] = std::numeric_limits<double>::quiet_NaN();
                });
}

// The same for the parameter-server form on this worker; the NaN is worker 1's.
template <class Method, class Policy>
void train_ps(Method& method, const Policy& policy, gcomp::inproc_comm& comm, std::vector<double>& x,
              int from, int to, int poison = -1) {
  for (int p = from; p < to; ++p)
    method.step(policy, comm, std::span<double>(x),
                [&](std::span<const double> model, std::uint64_t, std::span<double> out) {
                  gradient(comm.rank(), p, model, out);
                  if (p == poison && comm.rank() == 1) out[5] = std::numeric_limits<double>::infinity();
                });
}

template <class Make>
void check_resume_gd(Make make, int half, int poison = -1) {
  auto straight = make();
  std::vector<double> xs(dims, 0.0);
  train_gd(straight, xs, 0, 2 * half, poison);

  std::vector<double> x(dims, 0.0);
  bytes_t saved;
  {
    auto first = make();
    train_gd(first, x, 0, half, poison);
    saved = gcomp::checkpoint_bytes(first);
  }
  auto fresh = make();
  gcomp::load_checkpoint(gcomp::host_seq{}, saved, fresh);
  CHECK(gcomp::checkpoint_bytes(fresh) == saved);
  train_gd(fresh, x, half, 2 * half, poison);
  CHECK(same_bits(x, xs));
  CHECK(gcomp::checkpoint_bytes(fresh) == gcomp::checkpoint_bytes(straight));
  CHECK(fresh.steps() == straight.steps());
  CHECK(fresh.skipped_steps() == (poison >= 0 ? 1u : 0u));
}

// Per worker: 2 * half positions straight, or half, save, load into a fresh
// object, half more; parameters and final states must agree bitwise.
template <class Make, class Policy = gcomp::host_seq>
void check_resume_ps(Make make, int half, int poison = -1, const Policy& policy = {}) {
  std::vector<std::vector<double>> straight_x(group_size), resumed_x(group_size);
  std::vector<bytes_t> straight_state(group_size), resumed_state(group_size);
  gcomp::inproc_group group(group_size);
  group.run([&](gcomp::inproc_comm& comm) {
    const auto m = std::size_t(comm.rank());
    {
      auto method = make();
      std::vector<double> x(dims, 0.0);
      train_ps(method, policy, comm, x, 0, 2 * half, poison);
      straight_x[m] = x;
      straight_state[m] = gcomp::checkpoint_bytes(method);
    }
    std::vector<double> x(dims, 0.0);
    bytes_t saved;
    {
      auto method = make();
      train_ps(method, policy, comm, x, 0, half, poison);
      saved = gcomp::checkpoint_bytes(method);
    }
    auto fresh = make();
    gcomp::load_checkpoint(policy, saved, fresh);
    CHECK(gcomp::checkpoint_bytes(fresh) == saved);
    train_ps(fresh, policy, comm, x, half, 2 * half, poison);
    resumed_x[m] = x;
    resumed_state[m] = gcomp::checkpoint_bytes(fresh);
    CHECK(fresh.skipped_steps() == (poison >= 0 ? 1u : 0u));
  });
  for (std::size_t m = 0; m < group_size; ++m) {
    CAPTURE(m);
    CHECK(same_bits(resumed_x[m], straight_x[m]));
    CHECK(resumed_state[m] == straight_state[m]);
    CHECK(same_bits(resumed_x[m], resumed_x[0]));
  }
}

auto gd_qsgd() {
  return gcomp::stale_compressed_gd(gcomp::qsgd<double>({.levels = 7, .bucket = 8}), gd_options);
}
auto gd_ef_topk() {
  return gcomp::stale_compressed_gd(
      gcomp::error_feedback<gcomp::topk<double>>(gcomp::topk<double>({.k = 5})), gd_options);
}
auto ps_qsgd() {
  return gcomp::stale_parameter_server(gcomp::qsgd<double>({.levels = 7, .bucket = 8}), ps_options);
}
auto ps_ef_topk() {
  return gcomp::stale_parameter_server(
      gcomp::error_feedback<gcomp::topk<double>>(gcomp::topk<double>({.k = 5})), ps_options);
}


// Rank 0's parameter-server state after `steps` positions on 3 workers.
template <class Make>
bytes_t ps_checkpoint(Make make, int steps) {
  bytes_t out;
  gcomp::inproc_group group(group_size);
  group.run([&](gcomp::inproc_comm& comm) {
    auto method = make();
    std::vector<double> x(dims, 0.0);
    train_ps(method, gcomp::host_seq{}, comm, x, 0, steps);
    if (comm.rank() == 0) out = gcomp::checkpoint_bytes(method);
  });
  return out;
}

}  // namespace

TEST_CASE("compressed descent with delays: 2N steps equal N, save, load, N more, bitwise") {
  // Uniform delays up to 3: the history of models and the step (the delays'
  // and QSGD's random keys) must come back; error feedback's residual too.
  SUBCASE("QSGD") { check_resume_gd(gd_qsgd, 30); }
  SUBCASE("error_feedback<topk>") { check_resume_gd(gd_ef_topk, 30); }
  SUBCASE("QSGD with a skipped non-finite gradient before the save") { check_resume_gd(gd_qsgd, 30, 12); }
  SUBCASE("error_feedback<topk> with a skipped non-finite gradient after the load") {
    check_resume_gd(gd_ef_topk, 30, 41);
  }
}

TEST_CASE("parameter-server form on 3 workers: 2N steps equal N, save, load, N more, bitwise") {
  // Period 2: at every step some workers' messages are reused from the store,
  // so the loaded store's messages are used right after the load.
  SUBCASE("QSGD") { check_resume_ps(ps_qsgd, 25); }
  SUBCASE("error_feedback<topk>, host_par") { check_resume_ps(ps_ef_topk, 25, -1, gcomp::host_par(2)); }
  SUBCASE("QSGD, a skipped step before the save") { check_resume_ps(ps_qsgd, 25, 9); }
  SUBCASE("error_feedback<topk>, a skipped step after the load") { check_resume_ps(ps_ef_topk, 25, 27); }
}

TEST_CASE("a pipeline with a stale aggregator (parameter_server, period 2): 2N equals N + N, bitwise") {
  const auto make = [] {
    return gcomp::pipeline{
        gcomp::error_feedback<gcomp::topk<double>>(gcomp::topk<double>({.ratio = 0.25})),
        gcomp::parameter_server(gcomp::refresh_schedule(2)),
        gcomp::sgd<double>({.lr = 0.02, .momentum = 0.9}), 3};
  };
  const gcomp::layout lay{dims};
  const int half = 20;
  std::vector<std::vector<double>> straight_x(group_size), resumed_x(group_size);
  std::vector<bytes_t> straight_state(group_size), resumed_state(group_size);
  gcomp::inproc_group group(group_size);
  group.run([&](gcomp::inproc_comm& comm) {
    const auto m = std::size_t(comm.rank());
    const auto run = [&](auto& pipe, std::vector<double>& x, int from, int to) {
      std::vector<double> g(dims);
      for (int p = from; p < to; ++p) {
        gradient(comm.rank(), p, x, g);
        if (p == 26 && comm.rank() == 0) g[1] = std::numeric_limits<double>::quiet_NaN();
        pipe.step(gcomp::host_seq{}, comm, lay, std::span<double>(x), std::span<const double>(g));
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
    CHECK(fresh.aggregator.ranks() == std::size_t(group_size));
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

TEST_CASE("parameter_server as an aggregator with period 1 is the sum of fresh messages") {
  // The oracle: every rank's message decoded and added in rank order.
  gcomp::inproc_group group(group_size);
  std::vector<std::vector<double>> globals(group_size);
  group.run([&](gcomp::inproc_comm& comm) {
    gcomp::parameter_server server;
    gcomp::qsgd<double> c({.levels = 7, .bucket = 8});
    std::vector<double> g(dims), global(dims), zero(dims, 0.0);
    gradient(comm.rank(), 3, zero, g);
    server.aggregate(gcomp::host_seq{}, comm, c, std::span<const double>(g), std::span<double>(global),
                     gcomp::rng_key{9, 3, std::uint32_t(comm.rank())});
    globals[std::size_t(comm.rank())] = global;
  });
  std::vector<double> expected(dims, 0.0);
  for (int r = 0; r < group_size; ++r) {
    gcomp::qsgd<double> c({.levels = 7, .bucket = 8});
    std::vector<double> g(dims), zero(dims, 0.0);
    gradient(r, 3, zero, g);
    gcomp::quantized_payload<double> message;
    c.compress(gcomp::host_seq{}, std::span<const double>(g), message, gcomp::rng_key{9, 3, std::uint32_t(r)});
    c.decompress_add(gcomp::host_seq{}, message, std::span<double>(expected), 1.0);
  }
  for (const auto& global : globals) CHECK(same_bits(global, expected));
}

TEST_CASE("model_history: a loaded history returns the same models across wrap-around") {
  gcomp::model_history<float> a(3), b(3);
  for (int k = 0; k < 7; ++k) {
    std::vector<float> x(5);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(k) + 0.1f * float(i);
    a.push(gcomp::host_seq{}, std::span<const float>(x));
  }
  gcomp::load_checkpoint(gcomp::host_seq{}, gcomp::checkpoint_bytes(a), b);
  CHECK(b.pushes() == 7);
  CHECK(b.dimension() == 5);
  for (std::size_t d = 1; d <= 3; ++d) {
    const auto x = a.ago(d), y = b.ago(d);
    CHECK(std::vector<float>(x.begin(), x.end()) == std::vector<float>(y.begin(), y.end()));
  }
  const std::vector<float> next(5, 9.0f);
  a.push(gcomp::host_seq{}, std::span<const float>(next));
  b.push(gcomp::host_seq{}, std::span<const float>(next));
  CHECK(gcomp::checkpoint_bytes(a) == gcomp::checkpoint_bytes(b));
  gcomp::model_history<float> deeper(4);
  check_rejected(deeper, gcomp::checkpoint_bytes(a),
                 "gcomp::model_history::load: the checkpoint's history holds 3 models but this one holds 4");
}

TEST_CASE("periodic_average: 2N local steps equal N, save, load, N more, bitwise") {
  const int half = 11;
  const gcomp::layout lay{dims};
  std::vector<std::vector<double>> straight_x(group_size), resumed_x(group_size);
  std::vector<bytes_t> straight_state(group_size), resumed_state(group_size);
  gcomp::inproc_group group(group_size);
  group.run([&](gcomp::inproc_comm& comm) {
    const auto m = std::size_t(comm.rank());
    const auto run = [&](gcomp::periodic_average<double>& average, gcomp::sgd<double>& local,
                         std::vector<double>& x, int from, int to) {
      std::vector<double> g(dims);
      for (int p = from; p < to; ++p) {
        gradient(comm.rank(), p, x, g);
        local.step(gcomp::host_seq{}, lay, std::span<double>(x), std::span<const double>(g));
        average.step(gcomp::host_seq{}, comm, std::span<double>(x));
      }
    };
    const auto make = [] { return gcomp::periodic_average<double>({.period = 4}); };
    const auto make_sgd = [] { return gcomp::sgd<double>({.lr = 0.1, .momentum = 0.5}); };
    {
      auto average = make();
      auto local = make_sgd();
      std::vector<double> x(dims, 0.0);
      run(average, local, x, 0, 2 * half);
      straight_x[m] = x;
      straight_state[m] = gcomp::checkpoint_bytes(average, local);
    }
    std::vector<double> x(dims, 0.0);
    bytes_t saved;
    {
      auto average = make();
      auto local = make_sgd();
      run(average, local, x, 0, half);
      saved = gcomp::checkpoint_bytes(average, local);
    }
    auto average = make();
    auto local = make_sgd();
    gcomp::load_checkpoint(gcomp::host_seq{}, saved, average, local);
    CHECK(gcomp::checkpoint_bytes(average, local) == saved);
    run(average, local, x, half, 2 * half);
    resumed_x[m] = x;
    resumed_state[m] = gcomp::checkpoint_bytes(average, local);
    CHECK(average.rounds() == std::uint64_t(2 * half / 4));
  });
  for (std::size_t m = 0; m < group_size; ++m) {
    CAPTURE(m);
    CHECK(same_bits(resumed_x[m], straight_x[m]));
    CHECK(resumed_state[m] == straight_state[m]);
  }
  gcomp::periodic_average<double> four({.period = 4}), five({.period = 5});
  check_rejected(five, gcomp::checkpoint_bytes(four),
                 "gcomp::periodic_average::load: the checkpoint averages every 4 steps but this "
                 "object every 5");
}

TEST_CASE("stale methods reject a checkpoint of another size, method, option, compressor, group or a corrupted one") {
  const bytes_t saved = ps_checkpoint(ps_qsgd, 12);
  gcomp::inproc_group one(1);
  // Stepped objects (M = 1), so "unchanged" is a real state.
  const auto stepped_ps = [&](auto method, std::size_t size) {
    std::vector<double> x(size, 0.0);
    train_ps(method, gcomp::host_seq{}, one.comm(0), x, 0, 3);
    return method;
  };
  SUBCASE("another model size, once stepped") {
    auto method = stepped_ps(ps_qsgd(), dims + 1);
    check_rejected(method, saved,
                   "gcomp::stale_parameter_server::load: the checkpoint is of a model of size 24 "
                   "but this method's model has size 25");
  }
  SUBCASE("another method") {
    auto gd = gd_qsgd();
    std::vector<double> x(dims, 0.0);
    train_gd(gd, x, 0, 3);
    check_rejected(gd, saved,
                   "expected the state of gcomp::stale_compressed_gd but the checkpoint holds "
                   "gcomp::stale_parameter_server");
  }
  SUBCASE("another option") {
    gcomp::stale_options o = ps_options;
    o.gamma = 0.06;
    auto method = stepped_ps(gcomp::stale_parameter_server(gcomp::qsgd<double>({.levels = 7, .bucket = 8}), o), dims);
    check_rejected(method, saved,
                   "gcomp::stale_parameter_server::load: the checkpoint was written with gamma 0.05");
  }
  SUBCASE("another compressor (messages of another kind)") {
    auto method = gcomp::stale_parameter_server(gcomp::identity<double>{}, ps_options);
    check_rejected(method, saved,
                   "gcomp::parameter_server::load: the message of rank 0 loaded from the checkpoint "
                   "does not fit this compressor");
  }
  SUBCASE("another group, once stepped") {
    auto method = stepped_ps(ps_qsgd(), dims);
    check_rejected(method, saved,
                   "gcomp::parameter_server::load: the checkpoint is of a group of 3 ranks but this "
                   "server has served 1");
  }
  SUBCASE("a corrupted byte anywhere") {
    auto method = stepped_ps(ps_qsgd(), dims);
    const bytes_t before = gcomp::checkpoint_bytes(method);
    std::size_t rejected = 0;
    for (std::size_t i = 0; i < saved.size(); ++i) {
      bytes_t bad = saved;
      bad[i] ^= std::byte{0x01};
      try {
        gcomp::load_checkpoint(gcomp::host_seq{}, bad, method);
      } catch (const gcomp::error&) {
        ++rejected;
      }
    }
    CHECK(rejected == saved.size());
    CHECK(gcomp::checkpoint_bytes(method) == before);
    auto fresh = ps_qsgd();
    gcomp::load_checkpoint(gcomp::host_seq{}, saved, fresh);
    CHECK(gcomp::checkpoint_bytes(fresh) == saved);
  }
  SUBCASE("stale_compressed_gd: another size once stepped, a corrupted byte") {
    bytes_t gd_saved;
    {
      auto gd = gd_qsgd();
      std::vector<double> x(dims, 0.0);
      train_gd(gd, x, 0, 8);
      gd_saved = gcomp::checkpoint_bytes(gd);
    }
    auto small = gd_qsgd();
    std::vector<double> x(dims - 4, 0.0);
    train_gd(small, x, 0, 2);
    check_rejected(small, gd_saved,
                   "gcomp::stale_compressed_gd::load: the checkpoint is of a model of size 24 but "
                   "this method's model has size 20");
    bytes_t bad = gd_saved;
    bad[bad.size() / 2] ^= std::byte{0x80};
    check_rejected(small, bad, "checksum mismatch");
  }
}

TEST_CASE("a pipeline's parameter_server meets another compressor's messages at its first step, unchanged") {
  // Without the compressor at load time, the mismatch shows at the next
  // step, on every worker alike and before any collective but the guard's.
  bytes_t saved;
  const gcomp::layout lay{dims};
  const auto qsgd_pipe = [] {
    return gcomp::pipeline{gcomp::qsgd<double>({.levels = 7, .bucket = 8}),
                           gcomp::parameter_server(gcomp::refresh_schedule(2)),
                           gcomp::sgd<double>({.lr = 0.02}), 3};
  };
  const auto identity_pipe = [] {
    return gcomp::pipeline{gcomp::identity<double>{}, gcomp::parameter_server(gcomp::refresh_schedule(2)),
                           gcomp::sgd<double>({.lr = 0.02}), 3};
  };
  gcomp::inproc_group group(group_size);
  group.run([&](gcomp::inproc_comm& comm) {
    auto pipe = qsgd_pipe();
    std::vector<double> x(dims, 0.0), g(dims);
    for (int p = 0; p < 4; ++p) {
      gradient(comm.rank(), p, x, g);
      pipe.step(gcomp::host_seq{}, comm, lay, std::span<double>(x), std::span<const double>(g));
    }
    const bytes_t mine = gcomp::checkpoint_bytes(pipe);
    auto other = identity_pipe();
    gcomp::load_checkpoint(gcomp::host_seq{}, mine, other);  // same sections: accepted
    gradient(comm.rank(), 4, x, g);
    const auto x_before = x;
    const std::string what = message_of([&] {
      other.step(gcomp::host_seq{}, comm, lay, std::span<double>(x), std::span<const double>(g));
    });
    CHECK(what.find("gcomp::parameter_server::aggregate: the message of rank 0 loaded from the "
                    "checkpoint does not fit this compressor") != std::string::npos);
    CHECK(same_bits(x, x_before));
    CHECK(gcomp::checkpoint_bytes(other) == mine);
  });
}
