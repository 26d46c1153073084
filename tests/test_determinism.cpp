// Determinism: the same seed gives bitwise-identical training runs on host_seq and host_par(any threads).
#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <utility>
#include <vector>

#include "gcomp/gcomp.hpp"
#include "hashed_data.hpp"

namespace {

using gcomp::key_use;
using gcomp::rescale;

constexpr int steps = 24;        // a few dozen steps: enough for momentum, residuals and laziness to matter
constexpr int workers = 4;       // in-process workers of every distributed run
constexpr std::uint64_t seed = 0x5eed;
constexpr std::uint64_t other_seed = 0x5eed + 1;
constexpr unsigned thread_counts[] = {1, 2, 3, 4, 7};

// ---------------------------------------------------------------------------
// The problem: per element a quadratic c_i (x_i - t_i)^2 / 2 plus noise that
// differs per worker and step. The data come from splitmix64, not from the
// library's generator, so they do not depend on the code under test.

using gcomp_test::mix;  // hashed_data.hpp
using gcomp_test::signed_unit;

struct model {
  gcomp::layout lay;
  std::vector<float> curvature, target, start;
  std::vector<float> noise;  // 2 n values; a step reads a window of n at an offset drawn from its key
  std::size_t size() const { return lay.total_size(); }
};

model make_model(std::vector<gcomp::layer> layers) {
  model m;
  m.lay = gcomp::layout::from_layers(std::move(layers));
  const std::size_t n = m.size();
  m.curvature.resize(n);
  m.target.resize(n);
  m.start.resize(n);
  m.noise.resize(2 * n);
  for (std::size_t i = 0; i < 2 * n; ++i) m.noise[i] = 0.1f * signed_unit(mix(~i));
  for (std::size_t i = 0; i < n; ++i) {
    m.curvature[i] = 1.0f + 0.5f * signed_unit(mix(3 * i));
    m.target[i] = signed_unit(mix(3 * i + 1));
    // Nonzero start: LARS and LAMB take trust ratios from ||x_d||.
    m.start[i] = 0.1f * signed_unit(mix(3 * i + 2));
  }
  return m;
}

// host_par splits work only above fixed sizes: for_each_index from
// detail::host_grain indices, reductions (norms, sign sums) from 4 blocks of
// detail::reduce_block, quantizer packing from 4 * host_grain elements, the
// top-k / threshold selection from 2 * detail::select_grain. Each model's
// first layer passes the thresholds of the configurations that run on it
// (larger models cost more per step): top-k, thresholds and SASG on the large
// one, quantizers on the quantizer one, the rest on the medium one. Layer
// sizes are products of primes, so no split is a multiple of a thread count.
constexpr std::size_t large_rows = 383, large_cols = 347;      // 132901 elements
constexpr std::size_t quantizer_rows = 263, quantizer_cols = 257;  // 67591 elements
constexpr std::size_t medium_rows = 191, medium_cols = 211;    // 40301 elements
static_assert(large_rows * large_cols >= 2 * gcomp::detail::select_grain);
static_assert(quantizer_rows * quantizer_cols >= 4 * gcomp::detail::host_grain);
static_assert(medium_rows * medium_cols >= gcomp::detail::host_grain);
static_assert(medium_rows * medium_cols >= 4 * gcomp::detail::reduce_block);

// Four layers: a 2-D one that splits, its bias, a small 2-D one that PowerSGD
// (rank 2) factors too, and a 3-element one (fewer elements than threads).
model make_layered(std::size_t rows, std::size_t cols) {
  const std::size_t big = rows * cols;
  return make_model({{"conv", 0, big, {rows, cols}},
                     {"bias", big, rows, {}},
                     {"fc", big + rows, 8 * 251, {8, 251}},
                     {"out", big + rows + 8 * 251, 3, {}}});
}

const model& large() {
  static const model m = make_layered(large_rows, large_cols);
  return m;
}
const model& quantizer() {
  static const model m = make_layered(quantizer_rows, quantizer_cols);
  return m;
}
const model& medium() {
  static const model m = make_layered(medium_rows, medium_cols);
  return m;
}

// g = c (x - t) + noise(key): every coordinate moves every step. The noise
// is a window of a fixed table (a hash per element would cost more than
// most compressors).
void gradient(const model& m, std::span<const float> x, std::uint64_t key, std::span<float> g) {
  const float* noise = m.noise.data() + mix(key) % m.size();
  for (std::size_t i = 0; i < x.size(); ++i)
    g[i] = m.curvature[i] * (x[i] - m.target[i]) + noise[i];
}

// The noise key of worker `rank` at step t (the run's seed is not in it: a
// deterministic compressor must give the same run under another seed).
std::uint64_t noise_key(std::uint64_t t, int rank) { return (t << 8) | static_cast<std::uint64_t>(rank); }

// ---------------------------------------------------------------------------
// What a run leaves behind, per worker, as raw bytes.

struct worker_result {
  std::vector<std::byte> params;
  std::vector<std::byte> state;  // optimizer and compressor state, the last aggregated gradient
  gcomp::comm_stats stats;
  std::uint64_t skips = 0;  // uploads the lazy rule skipped (SASG, LAG)
};
using run_result = std::vector<worker_result>;

template <class T>
void append(std::vector<std::byte>& out, std::span<const T> values) {
  // resize + memcpy: GCC 12 warns falsely (-Wnonnull) on vector::insert of a byte range.
  if (values.empty()) return;
  const std::size_t at = out.size();
  out.resize(at + values.size_bytes());
  std::memcpy(out.data() + at, values.data(), values.size_bytes());
}
template <class T>
void append(std::vector<std::byte>& out, const std::vector<T>& values) {
  append(out, std::span<const T>(values));
}

// Every state accessor the optimizer has.
template <class O>
void append_optimizer_state(std::vector<std::byte>& out, const O& o) {
  if constexpr (requires { o.momentum_buffer(); }) append(out, o.momentum_buffer());
  if constexpr (requires { o.exp_avg(); }) {
    append(out, o.exp_avg());
    append(out, o.exp_avg_sq());
  }
  if constexpr (requires { o.trust_ratios(); }) append(out, o.trust_ratios());
}

// The residual of error feedback and PowerSGD's warm starts, through wrappers.
template <class C>
void append_compressor_state(std::vector<std::byte>& out, const C& c) {
  if constexpr (requires { c.residual(); }) append(out, c.residual());
  if constexpr (requires { c.inner(); }) append_compressor_state(out, c.inner());
  if constexpr (requires { c.plan(); })
    for (std::size_t b = 0; b < c.plan().size(); ++b) append(out, c.warm_start(b));
}

bool same_bytes(const std::vector<std::byte>& a, const std::vector<std::byte>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0);
}

void check_same(const run_result& got, const run_result& want) {
  REQUIRE(got.size() == want.size());
  for (std::size_t w = 0; w < got.size(); ++w) {
    CAPTURE(w);
    CHECK(same_bytes(got[w].params, want[w].params));
    CHECK(same_bytes(got[w].state, want[w].state));
    CHECK(got[w].stats == want[w].stats);
    CHECK(got[w].skips == want[w].skips);
  }
}

// Whether the run's seed reaches the result: keyed compressors and methods
// must change under another seed, the others must not.
enum class seeded { no, yes };

// run(policy, seed) -> run_result. host_seq twice, host_par with every thread
// count, then host_seq with another seed. Returns the first run.
template <class Run>
run_result check_deterministic(const model& m, Run run, seeded keyed) {
  const run_result reference = run(gcomp::host_seq{}, seed);
  REQUIRE(!reference.empty());
  std::vector<std::byte> start;
  append(start, m.start);
  CHECK_FALSE(same_bytes(reference[0].params, start));  // it trained
  CHECK_FALSE(reference[0].state.empty());              // there is state to compare
  {
    INFO("host_seq, the same seed again");
    check_same(run(gcomp::host_seq{}, seed), reference);
  }
  for (unsigned threads : thread_counts) {
    INFO("host_par(" << threads << ")");
    check_same(run(gcomp::host_par(threads), seed), reference);
  }
  const run_result other = run(gcomp::host_seq{}, other_seed);
  if (keyed == seeded::yes) {
    INFO("another seed must change a keyed run");
    CHECK_FALSE(same_bytes(other[0].params, reference[0].params));
  } else {
    INFO("another seed must not change an unkeyed run");
    check_same(other, reference);
  }
  return reference;
}

// make(seed) -> gcomp::pipeline; `workers` ranks train `steps` steps.
template <class Make>
void check_pipeline(const model& m, Make make, seeded keyed) {
  check_deterministic(
      m,
      [&](const auto& policy, std::uint64_t s) {
        run_result out(workers);
        gcomp::inproc_group group(workers);
        group.run([&](gcomp::inproc_comm& comm) {
          auto pipe = make(s);
          std::vector<float> x = m.start, g(m.size());
          for (int t = 0; t < steps; ++t) {
            gradient(m, x, noise_key(static_cast<std::uint64_t>(t), comm.rank()), g);
            pipe.step(policy, comm, m.lay, std::span<float>(x), std::span<const float>(g));
          }
          worker_result& r = out[static_cast<std::size_t>(comm.rank())];
          append(r.params, x);
          append_optimizer_state(r.state, pipe.optimizer);
          append_compressor_state(r.state, pipe.compressor);
          append(r.state, pipe.global_gradient());
          r.stats = comm.stats();
        });
        return out;
      },
      keyed);
}

const gcomp::sgd_options momentum_sgd{.lr = 0.1, .momentum = 0.9, .weight_decay = 1e-4};
const gcomp::lars_options lars_opts{.lr = 2.0, .momentum = 0.9, .weight_decay = 1e-4};
const gcomp::lamb_options lamb_opts{.lr = 0.01};
const gcomp::adam_options adam_opts{.lr = 0.01};

}  // namespace

// ---------------------------------------------------------------------------
// gcomp::pipeline

TEST_CASE("dense pipelines (identity, casts) give the same bits for any thread count") {
  const model& m = medium();
  SUBCASE("identity + allreduce + sgd") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::identity<float>{}, gcomp::allreduce{}, gcomp::sgd<float>(momentum_sgd), s};
    }, seeded::no);
  }
  SUBCASE("identity + allreduce + lars") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::identity<float>{}, gcomp::allreduce{}, gcomp::lars<float>(lars_opts), s};
    }, seeded::no);
  }
  SUBCASE("identity + allgather + lamb") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::identity<float>{}, gcomp::allgather{}, gcomp::lamb<float>(lamb_opts), s};
    }, seeded::no);
  }
  SUBCASE("identity + lazy<allgather> + adam") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::identity<float>{}, gcomp::lazy<gcomp::allgather>{},
                             gcomp::adam<float>(adam_opts), s};
    }, seeded::no);
  }
  SUBCASE("cast<float16> + allgather + sgd") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::cast<float, gcomp::float16>{}, gcomp::allgather{},
                             gcomp::sgd<float>(momentum_sgd), s};
    }, seeded::no);
  }
  SUBCASE("cast<bfloat16> + allgather + adam") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::cast<float, gcomp::bfloat16>{}, gcomp::allgather{},
                             gcomp::adam<float>(adam_opts), s};
    }, seeded::no);
  }
}

TEST_CASE("top-k and threshold pipelines give the same bits for any thread count") {
  const model& m = large();
  SUBCASE("topk + allgather + sgd") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::topk<float>({.ratio = 0.01}), gcomp::allgather{},
                             gcomp::sgd<float>(momentum_sgd), s};
    }, seeded::no);
  }
  SUBCASE("per-layer topk + allgather + lamb") {
    check_pipeline(m, [&](std::uint64_t s) {
      return gcomp::pipeline{gcomp::topk<float>({.ratio = 0.02}, m.lay), gcomp::allgather{},
                             gcomp::lamb<float>(lamb_opts), s};
    }, seeded::no);
  }
  SUBCASE("error_feedback<topk> + allgather + sgd") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::error_feedback(gcomp::topk<float>({.ratio = 0.01})), gcomp::allgather{},
                             gcomp::sgd<float>(momentum_sgd), s};
    }, seeded::no);
  }
  SUBCASE("error_feedback<topk> + lazy<allgather> + adam") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::error_feedback(gcomp::topk<float>({.k = 1000})),
                             gcomp::lazy<gcomp::allgather>{}, gcomp::adam<float>(adam_opts), s};
    }, seeded::no);
  }
  SUBCASE("sampled_topk + allgather + sgd") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::sampled_topk<float>({.ratio = 0.01}), gcomp::allgather{},
                             gcomp::sgd<float>(momentum_sgd), s};
    }, seeded::yes);
  }
  SUBCASE("hard_threshold + allgather + lars") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::hard_threshold<float>(0.8f), gcomp::allgather{},
                             gcomp::lars<float>(lars_opts), s};
    }, seeded::no);
  }
  SUBCASE("chain<topk, qsgd> + allgather + sgd") {
    check_pipeline(m, [](std::uint64_t s) {
      using chained = gcomp::chain<gcomp::topk<float>, gcomp::qsgd<float>>;
      return gcomp::pipeline{
          chained(gcomp::topk<float>({.ratio = 0.02}), gcomp::qsgd<float>({.levels = 15, .bucket = 256})),
          gcomp::allgather{}, gcomp::sgd<float>(momentum_sgd), s};
    }, seeded::yes);
  }
}

TEST_CASE("random sparsifiers under allgather, allreduce and divisible give the same bits for any thread count") {
  const model& m = medium();
  SUBCASE("randomk + allgather + sgd") {
    // 45% of the medium model: the sampler's draws pass detail::host_grain and split.
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::randomk<float>({.ratio = 0.45}), gcomp::allgather{},
                             gcomp::sgd<float>(momentum_sgd), s};
    }, seeded::yes);
  }
  SUBCASE("error_feedback<unscaled randomk> + allgather + adam") {
    check_pipeline(m, [](std::uint64_t s) {
      using unscaled = gcomp::randomk<float, key_use::per_worker, rescale::none>;
      return gcomp::pipeline{gcomp::error_feedback(unscaled({.ratio = 0.05})), gcomp::allgather{},
                             gcomp::adam<float>(adam_opts), s};
    }, seeded::yes);
  }
  SUBCASE("bernoulli + allgather + sgd") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::bernoulli_sparsifier<float>(0.05), gcomp::allgather{},
                             gcomp::sgd<float>(momentum_sgd), s};
    }, seeded::yes);
  }
  SUBCASE("shared randomk + allreduce + sgd") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::shared_randomk<float>({.ratio = 0.45}), gcomp::allreduce{},
                             gcomp::sgd<float>(momentum_sgd), s};
    }, seeded::yes);
  }
  SUBCASE("error_feedback<unscaled shared randomk> + allreduce + lars") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::error_feedback(gcomp::shared_randomk<float, rescale::none>({.ratio = 0.05})),
                             gcomp::allreduce{}, gcomp::lars<float>(lars_opts), s};
    }, seeded::yes);
  }
  SUBCASE("random_contiguous_block + allreduce + adam") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::random_contiguous_block<float>({.ratio = 0.2}), gcomp::allreduce{},
                             gcomp::adam<float>(adam_opts), s};
    }, seeded::yes);
  }
  SUBCASE("shared bernoulli + allreduce + sgd") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::bernoulli_sparsifier<float, key_use::shared>(0.05), gcomp::allreduce{},
                             gcomp::sgd<float>(momentum_sgd), s};
    }, seeded::yes);
  }
  SUBCASE("unscaled random_contiguous_block + divisible (foreground) + adam") {
    // The background is off: it completes when the transport gets to it, so
    // its timing (and with it the bytes counted) is not a function of the seed.
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::random_contiguous_block<float, rescale::none>({.ratio = 0.2}),
                             gcomp::divisible<float>({.payload = gcomp::background_payload::none}),
                             gcomp::adam<float>(adam_opts), s};
    }, seeded::yes);
  }
  SUBCASE("shared randomk + divisible (foreground) + lamb") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::shared_randomk<float>({.ratio = 0.15}),
                             gcomp::divisible<float>({.payload = gcomp::background_payload::none}),
                             gcomp::lamb<float>(lamb_opts), s};
    }, seeded::yes);
  }
}

TEST_CASE("quantizing pipelines give the same bits for any thread count") {
  const model& m = quantizer();
  SUBCASE("qsgd (fused buckets) + allgather + adam") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::qsgd<float>({.levels = 7, .bucket = 512}), gcomp::allgather{},
                             gcomp::adam<float>(adam_opts), s};
    }, seeded::yes);
  }
  SUBCASE("qsgd (odd buckets) + allgather + sgd") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::qsgd<float>({.levels = 3, .bucket = 500}), gcomp::allgather{},
                             gcomp::sgd<float>(momentum_sgd), s};
    }, seeded::yes);
  }
  SUBCASE("qsgd (one norm) + allgather + lars") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::qsgd<float>({.levels = 255, .bucket = 0}), gcomp::allgather{},
                             gcomp::lars<float>(lars_opts), s};
    }, seeded::yes);
  }
  SUBCASE("terngrad + allgather + sgd") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::terngrad<float>({.bucket = 512}), gcomp::allgather{},
                             gcomp::sgd<float>(momentum_sgd), s};
    }, seeded::yes);
  }
  SUBCASE("natural + allgather + lamb") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::natural<float>{}, gcomp::allgather{}, gcomp::lamb<float>(lamb_opts), s};
    }, seeded::yes);
  }
  SUBCASE("grid_round + allgather + sgd") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::grid_round<float>({.spacing = 1.0 / 64, .bits = 12}), gcomp::allgather{},
                             gcomp::sgd<float>(momentum_sgd), s};
    }, seeded::no);
  }
}

TEST_CASE("sign, 1-bit and PowerSGD pipelines with error feedback give the same bits for any thread count") {
  const model& m = medium();
  SUBCASE("error_feedback<per-layer sign> + allgather + sgd") {
    check_pipeline(m, [&](std::uint64_t s) {
      return gcomp::pipeline{gcomp::error_feedback(gcomp::sign<float>(m.lay)), gcomp::allgather{},
                             gcomp::sgd<float>(momentum_sgd), s};
    }, seeded::no);
  }
  SUBCASE("error_feedback<onebit> + allgather + adam") {
    check_pipeline(m, [](std::uint64_t s) {
      return gcomp::pipeline{gcomp::error_feedback(gcomp::onebit<float>{}), gcomp::allgather{},
                             gcomp::adam<float>(adam_opts), s};
    }, seeded::no);
  }
  SUBCASE("error_feedback<powersgd> + allgather + sgd") {
    check_pipeline(m, [&](std::uint64_t s) {
      return gcomp::pipeline{gcomp::error_feedback(gcomp::powersgd<float>({.rank = 2}, m.lay)),
                             gcomp::allgather{}, gcomp::sgd<float>(momentum_sgd), s};
    }, seeded::yes);
  }
}

// ---------------------------------------------------------------------------
// The published methods (include/gcomp/algo/)

TEST_CASE("jointspar (sgd and lars) gives the same bits for any thread count") {
  const model& m = medium();
  const auto check = [&](auto make) {
    check_deterministic(
        m,
        [&](const auto& policy, std::uint64_t s) {
          run_result out(workers);
          gcomp::inproc_group group(workers);
          group.run([&](gcomp::inproc_comm& comm) {
            auto js = make(s);
            std::vector<float> x = m.start, g(m.size());
            for (int t = 0; t < steps; ++t) {
              js.begin_step();
              gradient(m, x, noise_key(static_cast<std::uint64_t>(t), comm.rank()), g);
              js.finish_step(policy, comm, m.lay, std::span<float>(x), std::span<const float>(g));
            }
            worker_result& r = out[static_cast<std::size_t>(comm.rank())];
            append(r.params, x);
            append_optimizer_state(r.state, js.optimizer);
            append(r.state, js.probabilities());
            append(r.state, js.global_gradient());
            r.stats = comm.stats();
          });
          return out;
        },
        seeded::yes);
  };
  SUBCASE("jointspar_sgd") {
    check([&](std::uint64_t s) {
      return gcomp::jointspar_sgd<float>(m.lay.num_layers(), gcomp::sgd<float>(momentum_sgd),
                                         {.budget = 2.0, .p_min = 0.1, .seed = s});
    });
  }
  SUBCASE("jointspar_lars") {
    check([&](std::uint64_t s) {
      return gcomp::jointspar_lars<float>(m.lay.num_layers(), gcomp::lars<float>(lars_opts),
                                          {.budget = 2.0, .p_min = 0.1,
                                           .rule = gcomp::probability_rule::variance_optimal, .seed = s});
    });
  }
}

TEST_CASE("sasg and lag (lazy uploads) give the same bits for any thread count") {
  const model& m = large();
  const auto check = [&](auto make) {
    const run_result reference = check_deterministic(
        m,
        [&](const auto& policy, std::uint64_t s) {
          run_result out(workers);
          gcomp::inproc_group group(workers);
          group.run([&](gcomp::inproc_comm& comm) {
            auto method = make(s);
            std::vector<float> x = m.start, g(m.size());
            std::vector<char> uploads;
            std::uint64_t skips = 0;
            for (int t = 0; t < steps; ++t) {
              const std::uint64_t key = noise_key(static_cast<std::uint64_t>(t), comm.rank());
              gradient(m, x, key, g);
              const bool up = method.step(policy, comm, std::span<float>(x), std::span<const float>(g),
                                          [&](std::span<const float> at, std::span<float> into) {
                                            gradient(m, at, key, into);
                                          });
              uploads.push_back(up ? 1 : 0);
              skips += up ? 0 : 1;
            }
            worker_result& r = out[static_cast<std::size_t>(comm.rank())];
            append(r.params, x);
            append_compressor_state(r.state, method.compressor());
            append(r.state, method.update());
            append(r.state, method.upload_point());
            append(r.state, uploads);  // the lazy rule's decisions, step by step
            r.stats = comm.stats();
            r.skips = skips;
          });
          return out;
        },
        // The seed keys only the compressor, and top-k and identity ignore keys.
        seeded::no);
    std::uint64_t skips = 0;
    for (const worker_result& r : reference) skips += r.skips;
    CHECK(skips > 0);  // the lazy path (reused messages) was taken
  };
  // History 4 and a small alpha: the rule skips uploads within 24 steps.
  const gcomp::lazy_descent_options descent{.alpha = 0.05, .history = 4};
  SUBCASE("sasg") {
    check([&](std::uint64_t s) {
      gcomp::sasg_options o{.ratio = 0.01, .descent = descent};
      o.descent.seed = s;
      return gcomp::sasg<float>(o, m.lay);
    });
  }
  SUBCASE("lag") {
    check([&](std::uint64_t s) {
      gcomp::lazy_descent_options o = descent;
      o.seed = s;
      return gcomp::lag<float>(o, m.lay);
    });
  }
}

TEST_CASE("ri_sgd (redundant shards, periodic averaging) gives the same bits for any thread count") {
  const model& m = medium();
  constexpr std::size_t samples = 4096;
  check_deterministic(
      m,
      [&](const auto& policy, std::uint64_t s) {
        run_result out(workers);
        gcomp::inproc_group group(workers);
        group.run([&](gcomp::inproc_comm& comm) {
          gcomp::ri_sgd<float> ri(samples, workers, comm.rank(),
                                  {.redundancy = 0.25, .period = 5, .own_batch = 8,
                                   .optimizer = momentum_sgd, .seed = s});
          std::vector<float> x = m.start, g(m.size());
          for (int t = 0; t < steps; ++t) {
            // The noise stands for the batch's samples: a hash of their indices.
            std::uint64_t key = 0;
            for (std::size_t sample : ri.batch()) key = mix(key ^ sample);
            gradient(m, x, key, g);
            ri.step(policy, comm, m.lay, std::span<float>(x), std::span<const float>(g));
          }
          worker_result& r = out[static_cast<std::size_t>(comm.rank())];
          append(r.params, x);
          append_optimizer_state(r.state, ri.optimizer());
          r.stats = comm.stats();
        });
        return out;
      },
      seeded::yes);  // the seed picks the batches
}

TEST_CASE("divcomm (divisible Adam) gives the same bits for any thread count") {
  const model& m = medium();
  using method = gcomp::divcomm<float, gcomp::random_contiguous_block<float, rescale::none>>;
  // stats_of(d, comm): the traffic that must not depend on the run's timing.
  const auto check = [&](gcomp::background_payload payload, auto stats_of) {
    check_deterministic(
        m,
        [&](const auto& policy, std::uint64_t s) {
          run_result out(workers);
          gcomp::inproc_group group(workers);
          group.run([&](gcomp::inproc_comm& comm) {
            method d(gcomp::random_contiguous_block<float, rescale::none>({.ratio = 0.1}),
                     {.payload = payload, .delay = 1}, adam_opts, s);
            std::vector<float> x = m.start, g(m.size());
            for (int t = 0; t < steps; ++t) {
              gradient(m, x, noise_key(static_cast<std::uint64_t>(t), comm.rank()), g);
              d.step(policy, comm, m.lay, std::span<float>(x), std::span<const float>(g));
            }
            d.finish(policy, comm, std::span<float>(x));
            worker_result& r = out[static_cast<std::size_t>(comm.rank())];
            append(r.params, x);
            append_optimizer_state(r.state, d.optimizer);
            append(r.state, d.aggregator.residual());
            r.stats = stats_of(d, comm);
          });
          return out;
        },
        seeded::yes);
  };
  SUBCASE("foreground only: everything, the communicator's counts included") {
    check(gcomp::background_payload::none,
          [](const method&, const gcomp::inproc_comm& comm) { return comm.stats(); });
  }
  SUBCASE("parameters in the background, 4 workers: parameters and foreground traffic") {
    // The background completes whenever the transport gets to it, so how many
    // operations ran (and their bytes) depends on timing. With 4 workers that
    // hold equal parameters its correction avg(x_then) - x_then is exactly 0
    // (divcomm.hpp), so parameters, Adam's moments and the foreground must
    // still agree bitwise.
    static_assert(workers == 4);
    check(gcomp::background_payload::parameters,
          [](const method& d, const gcomp::inproc_comm&) { return d.foreground_stats(); });
  }
}

TEST_CASE("stale-gradient methods give the same bits for any thread count") {
  const model& m = quantizer();
  SUBCASE("stale_parameter_server<qsgd>, uniform delays, refresh period 2") {
    check_deterministic(
        m,
        [&](const auto& policy, std::uint64_t s) {
          run_result out(workers);
          gcomp::inproc_group group(workers);
          group.run([&](gcomp::inproc_comm& comm) {
            gcomp::stale_parameter_server ps(
                gcomp::qsgd<float>({.levels = 7, .bucket = 512}),
                {.gamma = 0.05,
                 .delay = {.max_delay = 3, .kind = gcomp::delay_kind::uniform, .seed = s},
                 .seed = s,
                 .period = 2});
            std::vector<float> x = m.start;
            const int rank = comm.rank();
            for (int t = 0; t < steps; ++t)
              ps.step(policy, comm, std::span<float>(x),
                      [&](std::span<const float> at, std::uint64_t k, std::span<float> into) {
                        gradient(m, at, noise_key(k, rank), into);
                      });
            worker_result& r = out[static_cast<std::size_t>(rank)];
            append(r.params, x);
            append(r.state, ps.last_update());
            r.stats = comm.stats();
          });
          return out;
        },
        seeded::yes);
  }
  SUBCASE("stale_compressed_gd<terngrad>, one worker, fixed delay") {
    check_deterministic(
        m,
        [&](const auto& policy, std::uint64_t s) {
          run_result out(1);
          gcomp::stale_compressed_gd method(gcomp::terngrad<float>({.bucket = 512}),
                                            {.gamma = 0.2, .delay = {.max_delay = 2}, .seed = s});
          std::vector<float> x = m.start;
          for (int t = 0; t < steps; ++t)
            method.step(policy, std::span<float>(x),
                        [&](std::span<const float> at, std::uint64_t k, std::span<float> into) {
                          gradient(m, at, noise_key(k, 0), into);
                        });
          append(out[0].params, x);
          append(out[0].state, method.last_update());
          return out;
        },
        seeded::yes);
  }
}
