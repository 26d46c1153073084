// Checks shared by the compressor tests: inputs, decoding to a dense vector,
// bitwise comparisons, thread-count determinism, key dependence, untouched
// payloads after a refused input, a dense test compressor of the tests' own,
// and the Monte-Carlo rule for unbiasedness.
//
// The Monte-Carlo rule. A statistic S (a coordinate's mean over T independent
// draws, an estimated second moment, a hit count) is checked against its exact
// expectation E with |S - E| <= z sigma, sigma the exact standard deviation of
// S (for a mean of T draws, sqrt(Var / T), Var the exact per-draw variance).
// Under the normal approximation a correct compressor leaves z = 5 sigma with
// probability 5.7e-7 per statistic, so by the union bound a test checking N
// statistics fails falsely with probability below N * 5.7e-7. The keys are
// fixed, so every outcome is reproducible. Each test states its own N.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "gcomp/core/error.hpp"
#include "gcomp/core/message.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/core/wire.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp::test {

// The thread counts every determinism check compares with host_seq.
inline constexpr unsigned policy_threads[] = {1u, 2u, 3u, 7u};

// A smooth input with both signs, irregular magnitudes and a small offset.
inline std::vector<float> wave(std::size_t n, float phase = 0.0f) {
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i)
    x[i] = std::sin(0.37f * float(i) + phase) * (1.0f + 0.01f * float(i % 97)) + 0.05f;
  return x;
}

// C(x) as a dense vector: m decompressed with scale 1 into zeros.
template <class C, class T = float>
std::vector<T> decompressed(const C& c, const typename C::payload& m, std::size_t n) {
  std::vector<T> out(n, T(0));
  c.decompress_add(gcomp::host_seq{}, m, std::span<T>(out), T(1));
  return out;
}

template <class P>
std::vector<std::byte> bytes_of(const P& m) {
  std::vector<std::byte> b;
  encode(m, b);
  return b;
}

// Equal element by element down to the bit (-0 differs from +0, NaN equals itself).
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// f() must throw gcomp::error with needle in its message.
template <class F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    FAIL("expected gcomp::error containing: " << needle);
  } catch (const gcomp::error& e) {
    INFO("message: " << e.what());
    CHECK(std::string(e.what()).find(needle) != std::string::npos);
  }
}

// |estimate - expected| <= z sigma: one statistic of the Monte-Carlo rule.
inline void check_within_sigmas(double estimate, double expected, double sigma, const char* what,
                                double z = 5.0) {
  INFO(what << ": estimate " << estimate << ", exact " << expected << ", sigma " << sigma);
  CHECK(std::fabs(estimate - expected) <= z * sigma);
}

// Sums of T independent draws of a compressed vector C(x): per coordinate and,
// for whole draws, of ||C(x)||^2.
class monte_carlo {
 public:
  monte_carlo(std::size_t n, std::size_t draws) : sum_(n, 0.0), draws_(draws) {}

  // One whole draw given densely.
  template <class T>
  void add_draw(const std::vector<T>& y) {
    double sq = 0.0;
    for (std::size_t i = 0; i < y.size(); ++i) {
      sum_[i] += y[i];
      sq += double(y[i]) * y[i];
    }
    second_ += sq;
  }
  // One whole draw given by its nonzero coordinates.
  template <class I, class T>
  void add_sparse_draw(const std::vector<I>& indices, const std::vector<T>& values) {
    double sq = 0.0;
    for (std::size_t j = 0; j < indices.size(); ++j) {
      sum_[indices[j]] += values[j];
      sq += double(values[j]) * values[j];
    }
    second_ += sq;
  }
  // One coordinate of a draw (no second moment).
  void add(std::size_t i, double y) { sum_[i] += y; }

  std::size_t draws() const { return draws_; }
  double mean(std::size_t i) const { return sum_[i] / double(draws_); }
  double second_moment() const { return second_ / double(draws_); }

  // Unbiasedness by the Monte-Carlo rule, one check per coordinate:
  // |mean_i - expected(i)| <= z sqrt(variance(i) / T), variance(i) the exact
  // per-draw variance of C(x)_i. A coordinate with variance 0 is not random:
  // its mean must be within exact_tolerance(i) of expected(i). Returns the
  // largest deviation of a random coordinate in sigmas.
  template <class Expected, class Variance, class Tolerance>
  double check_means(Expected&& expected, Variance&& variance, Tolerance&& exact_tolerance,
                     double z = 5.0) const {
    double worst = 0.0;
    for (std::size_t i = 0; i < sum_.size(); ++i) {
      const double var = variance(i);
      const double sigma = std::sqrt(var / double(draws_));
      const double d = std::fabs(mean(i) - double(expected(i)));
      if (var != 0.0) worst = std::max(worst, d / sigma);
      INFO("coordinate " << i << ": |mean - x_i| = " << d << ", sigma " << sigma);
      CHECK(d <= (var == 0.0 ? double(exact_tolerance(i)) : z * sigma));
    }
    return worst;
  }
  template <class Expected, class Variance>
  double check_means(Expected&& expected, Variance&& variance, double z = 5.0) const {
    return check_means(std::forward<Expected>(expected), std::forward<Variance>(variance),
                       [](std::size_t) { return 0.0; }, z);
  }

 private:
  std::vector<double> sum_;
  double second_ = 0.0;
  std::size_t draws_;
};

// Whether the compressor in a determinism check is one object compressing
// under every policy in turn, or a fresh copy (of the unused one) per policy.
enum class reuse { one_compressor, fresh_per_policy };

// Compresses x with host_seq and with host_par of 1, 2, 3 and 7 threads from
// the same key: the encoded payloads must be equal byte for byte, and
// same_fields(m, ref) adds field-by-field checks; decompress_add(policy, m,
// out, scale) into out = out0 must give host_seq's output bit for bit.
// Returns host_seq's payload.
template <class C, class T, class SameFields>
typename C::payload check_same_payload_for_every_policy(C& c, const std::vector<T>& x, rng_key key,
                                                        const std::vector<T>& out0, T scale,
                                                        reuse mode, SameFields&& same_fields) {
  const C unused = c;
  typename C::payload ref;
  c.compress(gcomp::host_seq{}, std::span<const T>(x), ref, key);
  const auto ref_bytes = bytes_of(ref);
  std::vector<T> ref_out = out0;
  c.decompress_add(gcomp::host_seq{}, ref, std::span<T>(ref_out), scale);
  for (unsigned threads : policy_threads) {
    CAPTURE(threads);
    const gcomp::host_par pool(threads);
    C fresh = unused;
    C& cp = mode == reuse::one_compressor ? c : fresh;
    typename C::payload m;
    cp.compress(pool, std::span<const T>(x), m, key);
    CHECK(bytes_of(m) == ref_bytes);
    same_fields(m, ref);
    std::vector<T> out = out0;
    cp.decompress_add(pool, m, std::span<T>(out), scale);
    CHECK(same_bits(out, ref_out));
  }
  return ref;
}

// The same with out0 filled with `fill`.
template <class C, class T, class SameFields>
typename C::payload check_same_payload_for_every_policy(C& c, const std::vector<T>& x, rng_key key,
                                                        T fill, T scale, reuse mode,
                                                        SameFields&& same_fields) {
  return check_same_payload_for_every_policy(c, x, key, std::vector<T>(x.size(), fill), scale, mode,
                                             std::forward<SameFields>(same_fields));
}

// run(policy) for host_seq and host_par of 1, 2, 3 and 7 threads: both parts
// of each returned pair must equal host_seq's.
template <class Run>
void check_same_pair_for_every_policy(Run&& run) {
  const auto ref = run(gcomp::host_seq{});
  for (unsigned threads : policy_threads) {
    CAPTURE(threads);
    const auto got = run(gcomp::host_par(threads));
    CHECK(got.first == ref.first);
    CHECK(got.second == ref.second);
  }
}

// A stochastic quantizer's draws depend on the whole key: compressing x twice
// with `key` gives the same codes; another worker, step or seed gives the same
// scales but other codes.
template <class C>
void check_rounding_follows_the_key(C& c, const std::vector<float>& x, rng_key key) {
  typename C::payload a, b;
  c.compress(gcomp::host_seq{}, std::span<const float>(x), a, key);
  c.compress(gcomp::host_seq{}, std::span<const float>(x), b, key);
  CHECK(a.words == b.words);
  for (rng_key other : {rng_key{key.seed, key.step, key.worker + 1}, rng_key{key.seed, key.step + 1, key.worker},
                        rng_key{key.seed + 1, key.step, key.worker}}) {
    c.compress(gcomp::host_seq{}, std::span<const float>(x), b, other);
    CHECK(a.scales == b.scales);
    CHECK(a.words != b.words);
  }
}

// A refused compress left m as it was: every field of a quantized payload.
template <class P>
void check_quantized_unchanged(const P& m, const P& before) {
  CHECK(m.dimension == before.dimension);
  CHECK(m.bits == before.bits);
  CHECK(m.bucket == before.bucket);
  CHECK(m.scales == before.scales);
  CHECK(m.words == before.words);
}

// A refused compress left m as it was: every field of a sparse payload.
template <class P>
void check_sparse_unchanged(const P& m, const P& before) {
  CHECK(m.dimension == before.dimension);
  CHECK(m.indices == before.indices);
  CHECK(m.data == before.data);
}

// The tests' own dense compressor: rounds every value to a grid of step delta,
// either to the nearest point (deterministic and biased, an epsilon-compressor
// in Khirirat et al.'s terms, in float arithmetic) or stochastically,
// q = delta floor(x / delta + u) with u uniform from the key (unbiased:
// E[q] = x, Var q = delta^2 f (1 - f), f the fractional part of x / delta).
enum class grid_rounding { nearest, stochastic };

template <grid_rounding R>
struct grid_compressor {
  using value_type = float;
  using payload = gcomp::dense_payload<float>;
  static constexpr bool unbiased = R == grid_rounding::stochastic;
  static constexpr bool shared_support = R == grid_rounding::nearest;
  double delta = 0.5;

  template <class Policy>
  void compress(const Policy&, std::span<const float> g, payload& m, rng_key key) {
    m.data.resize(g.size());
    for (std::size_t i = 0; i < g.size(); ++i) {
      if constexpr (R == grid_rounding::stochastic)
        m.data[i] = float(delta * std::floor(double(g[i]) / delta + gcomp::uniform_double(key, i)));
      else
        m.data[i] = float(delta) * std::round(g[i] / float(delta));
    }
  }
  template <class Policy>
  void decompress_add(const Policy&, const payload& m, std::span<float> out, float scale) const {
    gcomp::check_same_size("grid_compressor", "out", out.size(), "message", m.size());
    for (std::size_t i = 0; i < out.size(); ++i) out[i] += scale * m.data[i];
  }
  std::size_t wire_bytes(const payload& m) const { return encoded_size(m); }
  double bits_per_element(std::size_t n) const {
    return n == 0 ? 0.0 : 8.0 * double(gcomp::wire::header_bytes + 4 * n) / double(n);
  }
};

}  // namespace gcomp::test
