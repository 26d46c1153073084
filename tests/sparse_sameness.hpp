// Sparse, dense and low-rank sameness: top-k, random-k, Bernoulli, random blocks, chains, identity, PowerSGD and the threshold top-k variants under a device policy give host_seq's payload and decompress_add output bit for bit, and the same errors with nothing written; shared by tests/thrust and tests/cuda.
//
// The including test calls check_sparse_cases(policy), check_sampled_topk_cases(policy),
// check_chain_cases(policy), check_powersgd_cases(policy),
// check_sparse_wrappers(policy) and check_sparse_errors(policy). Under cuda_par, topk::compress is
// the GPU radix select (compress/detail/topk_cuda.cuh) and every other step the
// generic device path (compress/detail/sparse_device.hpp); under thrust_device
// on OpenMP, top-k selects on the host and the rest is the device path. The
// host oracle is host_seq, whose selection is checked against a sort in
// tests/test_topk.cpp. The step helpers are those of the quantizers
// (tests/quant_sameness.hpp).
#pragma once

#include <doctest/doctest.h>

#include <gcomp/compress/bernoulli.hpp>
#include <gcomp/compress/chain.hpp>
#include <gcomp/compress/error_feedback.hpp>
#include <gcomp/compress/identity.hpp>
#include <gcomp/compress/natural.hpp>
#include <gcomp/compress/powersgd.hpp>
#include <gcomp/compress/qsgd.hpp>
#include <gcomp/compress/random_block.hpp>
#include <gcomp/compress/randomk.hpp>
#include <gcomp/compress/terngrad.hpp>
#include <gcomp/compress/threshold_topk.hpp>
#include <gcomp/compress/topk.hpp>
#include <gcomp/core/layout.hpp>
#include <gcomp/exec/policy.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "quant_sameness.hpp"

namespace gcomp_test::sparse_sameness {

using namespace gcomp_test::quant_sameness;

// Layers out of offset order with a gap (elements 900..999 belong to none),
// so per-layer indices must come out increasing and skip the gap.
inline gcomp::layout sample_layout() {
  return gcomp::layout::from_layers({{"b", 600, 300, {}}, {"a", 0, 600, {}}, {"c", 1000, 1500, {}}},
                                    gcomp::gaps::allowed);
}

/// sampled_topk on g under host_seq and under `policy`, from fresh objects:
/// the same message, the same threshold bit for bit, and accepted on both
/// sides or on neither (trimmed and exact may trade places near the gather
/// cap; both are the exact top-k). Returns the host's outcome.
template <class T, class Index, class Policy>
auto sampled_topk_step(const Policy& policy, const gcomp::sampled_topk_options& options, const std::vector<T>& g,
                       const gcomp::rng_key& key) {
  using C = gcomp::sampled_topk<T, Index>;
  C host(options);
  C device(options);
  typename C::payload on_host, on_device;
  compress_both(policy, host, device, g, key, on_host, on_device);
  CHECK(same_bytes(std::vector<T>{host.last_threshold()}, std::vector<T>{device.last_threshold()}));
  CHECK((host.last_outcome() == C::outcome::accepted) == (device.last_outcome() == C::outcome::accepted));
  return host.last_outcome();
}

/// sampled_topk's three outcomes under a device policy. With n = 20000,
/// k = 200, a 400-element sample and the default tolerance, the threshold is
/// the sample's 5th largest magnitude, so the count at or above it is about
/// 250 +- 110: accepted ([200, 250]), trimmed (above) and exact (below) each
/// come up in about a quarter to a half of the 40 keys, and the test
/// requires each at least once so that every device path is compared.
template <class Policy>
void check_sampled_topk_cases(const Policy& policy) {
  using C = gcomp::sampled_topk<float>;
  const gcomp::sampled_topk_options options{.k = 200, .sample_ratio = 0.02, .min_sample = 256};
  const std::vector<float> g = sample_gradient<float>(20000, 41);
  int accepted = 0, trimmed = 0, exact = 0;
  for (std::uint64_t step = 0; step < 40; ++step) {
    CAPTURE(step);
    const auto outcome = sampled_topk_step<float, std::uint32_t>(policy, options, g, gcomp::rng_key{9, step, 1});
    accepted += outcome == C::outcome::accepted;
    trimmed += outcome == C::outcome::trimmed;
    exact += outcome == C::outcome::exact;
  }
  CHECK(accepted > 0);
  CHECK(trimmed > 0);
  CHECK(exact > 0);
  // Double values, 64-bit indices, over per-step keys.
  const std::vector<double> gd = sample_gradient<double>(30001, 42);
  for (std::uint64_t step = 0; step < 8; ++step)
    sampled_topk_step<double, std::uint64_t>(policy, {.ratio = 0.005, .min_sample = 128}, gd,
                                             gcomp::rng_key{3, step, 0});
  // No tolerance: accepted only at exactly k.
  for (std::uint64_t step = 0; step < 8; ++step)
    sampled_topk_step<float, std::uint32_t>(policy, {.k = 100, .tolerance = 0.0}, g, gcomp::rng_key{4, step, 0});
  // Every magnitude equal: everything reaches the threshold, past the cap,
  // so the exact top-k keeps the lowest indices.
  std::vector<float> ties(50000, 2.0f);
  for (std::size_t i = 0; i < ties.size(); i += 3) ties[i] = -2.0f;
  CHECK(sampled_topk_step<float, std::uint32_t>(policy, {.ratio = 0.01}, ties, gcomp::rng_key{1, 1, 1}) ==
        C::outcome::exact);
  // Mostly zeros, fewer nonzeros than k: the threshold is 0.
  std::vector<float> sparse(40000, 0.0f);
  for (std::size_t i = 7; i < sparse.size(); i += 500) sparse[i] = static_cast<float>(i % 7) - 3.0f;
  sampled_topk_step<float, std::uint32_t>(policy, {.ratio = 0.01}, sparse, gcomp::rng_key{2, 2, 2});
  // The sample is all of g (n below min_sample): exact; k = 1 and k = n.
  const std::vector<float> small = sample_gradient<float>(700, 43);
  for (std::size_t k : {std::size_t{1}, std::size_t{70}, std::size_t{700}})
    CHECK(sampled_topk_step<float, std::uint32_t>(policy, {.k = k}, small, gcomp::rng_key{5, k, 0}) ==
          C::outcome::exact);
  sampled_topk_step<float, std::uint32_t>(policy, {.k = 1, .min_sample = 16}, g, gcomp::rng_key{6, 0, 0});
}

template <class T, class Index, class Policy>
void check_cases_of(const Policy& policy) {
  const gcomp::rng_key key{31, 4, 2};
  for (std::size_t n : {1, 2, 63, 64, 65, 1000, 4097, 70001}) {
    CAPTURE(n);
    const std::vector<T> g = sample_gradient<T>(n, static_cast<unsigned>(n) + 1);
    // k: sparse and dense samples, their complements (k > n / 2), everything.
    for (std::size_t k : {std::size_t{1}, n / 100 + 1, n / 3 + 1, 2 * n / 3 + 1, n - n / 40 - 1, n}) {
      if (k == 0 || k > n) continue;
      CAPTURE(k);
      check_one(policy, gcomp::topk<T, Index>({.k = k}), g, key);
      check_one(policy, gcomp::randomk<T, gcomp::key_use::per_worker, gcomp::rescale::unbiased, Index>({.k = k}),
                g, key);
      check_one(policy, gcomp::shared_randomk<T, gcomp::rescale::none, Index>({.k = k}), g, key);
    }
    check_one(policy, gcomp::identity<T>{}, g, key);
    check_one(policy, gcomp::bernoulli_sparsifier<T, gcomp::key_use::per_worker, Index>(0.05), g, key);
    check_one(policy, gcomp::bernoulli_sparsifier<T, gcomp::key_use::shared, Index>(0.7), g, key);
    // A block that wraps around the end for most keys, scaled and not.
    check_one(policy, gcomp::random_contiguous_block<T>({.ratio = 0.3}), g, key);
    check_one(policy, gcomp::random_contiguous_block<T, gcomp::rescale::none>({.k = n}), g, key);
    check_one(policy, gcomp::hard_threshold<T, Index>(T(1.2)), g, key);
    check_one(policy, gcomp::hard_threshold<T, Index>(T(1.5)), g, key);  // ties at tau (exactly 1.5)
    check_one(policy, gcomp::hard_threshold<T, Index>(T(100)), g, key);  // nothing kept
    check_one(policy, gcomp::sampled_topk<T, Index>({.ratio = 0.01}), g, key);
  }
  // Heavy ties: every magnitude equal, so the lowest indices must win.
  std::vector<T> ties(5000, T(2));
  for (std::size_t i = 0; i < ties.size(); i += 2) ties[i] = T(-2);
  check_one(policy, gcomp::topk<T, Index>({.k = 777}), ties, key);
  // All zeros, negative zeros among them.
  std::vector<T> zeros(3000, T(0));
  for (std::size_t i = 0; i < zeros.size(); i += 3) zeros[i] = -T(0);
  check_one(policy, gcomp::topk<T, Index>({.k = 10}), zeros, key);
  // Per layer, layers out of order and a gap.
  const std::vector<T> g = sample_gradient<T>(2500, 77);
  for (double ratio : {0.001, 0.05, 0.5, 1.0}) {
    CAPTURE(ratio);
    check_one(policy, gcomp::topk<T, Index>({.ratio = ratio}, sample_layout()), g, key);
    check_one(policy, gcomp::randomk<T, gcomp::key_use::per_worker, gcomp::rescale::unbiased, Index>(
                          {.ratio = ratio}, sample_layout()),
              g, key);
    const std::vector<double> keep{ratio, 1.0, ratio / 2};
    check_one(policy,
              gcomp::bernoulli_sparsifier<T, gcomp::key_use::per_worker, Index>(sample_layout(), keep), g, key);
  }
  // Empty gradient: an empty message, nothing to add.
  check_one(policy, gcomp::topk<T, Index>({.ratio = 0.1}), std::vector<T>{}, key);
}

/// Payloads and decompress_add bitwise equal to host_seq: float and double,
/// 32- and 64-bit indices, sizes around warps and the GPU top-k's 32-bit
/// bitmap words and 131072-element tiles, k from 1 to n, ties, zeros, layers.
template <class Policy>
void check_sparse_cases(const Policy& policy) {
  SUBCASE("float, 32-bit indices") { check_cases_of<float, std::uint32_t>(policy); }
  SUBCASE("double, 64-bit indices") { check_cases_of<double, std::uint64_t>(policy); }
  SUBCASE("a gradient over several GPU top-k tiles") {
    const std::vector<float> big = sample_gradient<float>(300001, 5);
    check_one(policy, gcomp::topk<float>({.k = 300}), big, gcomp::rng_key{1, 2, 3});
    check_one(policy, gcomp::topk<float>({.k = 30000}), big, gcomp::rng_key{1, 2, 3});
  }
}

/// chain<A, B> with A's kept values going up to B on the device and B's
/// decoded values coming down for A's scatter: top-k then QSGD, random-k then
/// TernGrad, a random block then natural compression.
template <class Policy>
void check_chain_cases(const Policy& policy) {
  const gcomp::rng_key key{8, 1, 5};
  for (std::size_t n : {1, 100, 5000, 70001}) {
    CAPTURE(n);
    const std::vector<float> g = sample_gradient<float>(n, static_cast<unsigned>(n) + 3);
    check_one(policy,
              gcomp::chain<gcomp::topk<float>, gcomp::qsgd<float>>(gcomp::topk<float>({.ratio = 0.02}),
                                                                   gcomp::qsgd<float>({.levels = 7, .bucket = 128})),
              g, key);
    check_one(policy,
              gcomp::chain<gcomp::randomk<float>, gcomp::terngrad<float>>(gcomp::randomk<float>({.ratio = 0.1}),
                                                                         gcomp::terngrad<float>({.bucket = 64})),
              g, key);
    check_one(policy,
              gcomp::chain<gcomp::random_contiguous_block<float>, gcomp::natural<float>>(
                  gcomp::random_contiguous_block<float>({.ratio = 0.25}), gcomp::natural<float>{}),
              g, key);
  }
}

// Layers PowerSGD factors and layers it sends as they are: a 40 x 30 matrix,
// a conv kernel 8 x (3 x 3 x 3), a bias, and a 3 x 2 matrix too small for rank 2.
inline gcomp::layout powersgd_layout() {
  return gcomp::layout::from_layers({{"w", 0, 1200, {40, 30}},
                                     {"conv", 1200, 216, {8, 3, 3, 3}},
                                     {"bias", 1416, 40, {}},
                                     {"tiny", 1456, 6, {3, 2}}});
}

/// PowerSGD: M Q and M^T P on the device (one thread per entry, summed in
/// the host loops' order), Gram-Schmidt and the warm start on the host; the
/// same factors, and the same P Q^T added, bitwise. Ranks 1 and 2, a rank-1
/// matrix at rank 2 (a degenerate column, redrawn), float and double, and
/// error feedback around it.
template <class Policy>
void check_powersgd_cases(const Policy& policy) {
  const gcomp::rng_key key{4, 4, 4};
  const std::vector<float> g = sample_gradient<float>(1462, 21);
  for (std::size_t rank : {1, 2}) {
    CAPTURE(rank);
    check_one(policy, gcomp::powersgd<float>({.rank = rank}, powersgd_layout()), g, key);
  }
  const std::vector<double> gd = sample_gradient<double>(1462, 22);
  check_one(policy, gcomp::powersgd<double>({.rank = 2}, powersgd_layout()), gd, key);
  // Rank one: row i is (i + 1) * (1, 2, ..., 30); its second column of P is dependent.
  std::vector<float> outer(1200);
  for (std::size_t i = 0; i < 40; ++i)
    for (std::size_t c = 0; c < 30; ++c) outer[i * 30 + c] = float(i + 1) * float(c + 1) / 64.0f;
  check_one(policy,
            gcomp::powersgd<float>({.rank = 2}, gcomp::layout::from_layers({{"w", 0, 1200, {40, 30}}})),
            outer, key);
  check_wrapper(policy,
                gcomp::error_feedback<gcomp::powersgd<float>>(gcomp::powersgd<float>({.rank = 2}, powersgd_layout())),
                1462, 5, sampled<float>());
}

/// error_feedback around top-k and an unscaled random-k with its residual in
/// the policy's memory: payloads and residuals bitwise host_seq's, step by step.
template <class Policy>
void check_sparse_wrappers(const Policy& policy) {
  check_wrapper(policy, gcomp::error_feedback<gcomp::topk<float>>(gcomp::topk<float>({.ratio = 0.01})), 6000, 6,
                sampled<float>());
  check_wrapper(policy,
                gcomp::error_feedback<gcomp::randomk<double, gcomp::key_use::per_worker, gcomp::rescale::none>>(
                    gcomp::randomk<double, gcomp::key_use::per_worker, gcomp::rescale::none>({.k = 50})),
                3000, 5, sampled<double>());
}

/// Non-finite gradients (the first index named, also in a later layer, the
/// message untouched) and malformed messages (another dimension, repeated or
/// decreasing indices, an index out of range, a random-k message of the
/// wrong size), the output untouched.
template <class Policy>
void check_sparse_errors(const Policy& policy) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> g = sample_gradient<float>(5000, 8);
  g[4000] = nan;
  g[1234] = -inf;
  check_compress_error(policy, gcomp::topk<float>({.k = 50}), g, "gradient[1234]");
  check_compress_error(policy, gcomp::topk<float>({.k = 5000}), g, "gradient[1234]");
  g[1234] = 0.5f;
  check_compress_error(policy, gcomp::topk<float>({.k = 50}), g, "gradient[4000]");
  check_compress_error(policy, gcomp::hard_threshold<float>(0.5f), g, "gradient[4000]");
  check_compress_error(policy, gcomp::sampled_topk<float>({.ratio = 0.01, .min_sample = 256}), g, "gradient[4000]");
  check_compress_error(policy, gcomp::sampled_topk<float>({.k = 10}), g, "gradient[4000]");  // s = n: exact
  g[4999] = inf;
  g[3] = -nan;
  check_compress_error(policy, gcomp::sampled_topk<float>({.ratio = 0.01, .min_sample = 256}), g, "gradient[3]");
  g[3] = 0.25f;
  g[4999] = 0.25f;
  // Per layer: the NaN sits in the last layer visited (offset 1000), after
  // the other layers were selected.
  std::vector<float> lg = sample_gradient<float>(2500, 9);
  lg[2222] = inf;
  check_compress_error(policy, gcomp::topk<float>({.ratio = 0.1}, sample_layout()), lg, "gradient[2222]");

  const std::vector<float> base = sample_gradient<float>(400, 10);
  gcomp::topk<float> top({.k = 20});
  gcomp::sparse_payload<float> m;
  top.compress(gcomp::host_seq{}, std::span<const float>(base), m, gcomp::rng_key{});
  check_decompress_error(policy, top, m, 399, "dimension");
  gcomp::sparse_payload<float> repeated = m;
  repeated.indices[7] = repeated.indices[6];
  check_decompress_error(policy, top, repeated, 400, "strictly increasing");
  gcomp::sparse_payload<float> outside = m;
  outside.indices.back() = 400;
  outside.dimension = 400;
  check_decompress_error(policy, top, outside, 400, "out of range");
  gcomp::sparse_payload<float> uneven = m;
  uneven.data.pop_back();
  check_decompress_error(policy, top, uneven, 400, "message.data");
  check_decompress_error(policy, gcomp::hard_threshold<float>(0.5f), repeated, 400, "strictly increasing");
  check_decompress_error(policy, gcomp::sampled_topk<float>({.ratio = 0.05}), outside, 400, "out of range");

  // A block message with its offset out of range, one with too few values.
  gcomp::random_contiguous_block<float> block({.k = 40});
  gcomp::block_payload<float> bm;
  block.compress(gcomp::host_seq{}, std::span<const float>(base), bm, gcomp::rng_key{3, 3, 3});
  gcomp::block_payload<float> far = bm;
  far.offset = 400;
  check_decompress_error(policy, block, far, 400, "out of range");
  gcomp::block_payload<float> short_block = bm;
  short_block.data.pop_back();
  check_decompress_error(policy, block, short_block, 400, "keeps 40");

  gcomp::randomk<float> rk({.k = 21});
  check_decompress_error(policy, rk, m, 400, "this random-k keeps 21");
  check_decompress_error(policy, rk, outside, 400, "out of range");
}

}  // namespace gcomp_test::sparse_sameness
