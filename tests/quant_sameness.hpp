// Quantizer sameness: qsgd, terngrad, natural and grid_round under a device policy give host_seq's payload and decompress_add output bit for bit, and the same errors with nothing written; shared by tests/thrust and tests/cuda.
//
// The including test calls check_quantizer_cases(policy) and
// check_quantizer_errors(policy) from its TEST_CASEs. Gradients and outputs
// are put in the policy's memory with gcomp::policy_buffer. The device path
// (compress/detail/quant_device.hpp) shares its coders and decoders with the
// host loops and reduces in the order of exec/detail/reduce_order.hpp with
// unfused products, so any difference is a bug, not rounding.
#pragma once

#include <doctest/doctest.h>

#include <gcomp/compress/ef21.hpp>
#include <gcomp/compress/error_feedback.hpp>
#include <gcomp/compress/grid_round.hpp>
#include <gcomp/compress/natural.hpp>
#include <gcomp/compress/qsgd.hpp>
#include <gcomp/compress/terngrad.hpp>
#include <gcomp/core/error.hpp>
#include <gcomp/core/random.hpp>
#include <gcomp/exec/buffer.hpp>
#include <gcomp/exec/host.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "device_sameness.hpp"

namespace gcomp_test::quant_sameness {

using namespace gcomp_test::device_sameness;

// Normal values with the shapes the code paths care about: exact zeros, a run
// of subnormals (QSGD's tiny-norm rescaling when a bucket holds only them), an
// all-zero run (scale 0), negative zeros and repeated magnitudes.
template <class T>
std::vector<T> sample_gradient(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<T> g(n);
  for (std::size_t i = 0; i < n; ++i) g[i] = static_cast<T>(normal(rng));
  for (std::size_t i = 0; i < n; i += 17) g[i] = T(0);
  for (std::size_t i = 5; i < n; i += 29) g[i] = -T(0);
  for (std::size_t i = 3; i < n; i += 31) g[i] = i % 2 == 0 ? T(1.5) : T(-1.5);
  const T tiny = std::numeric_limits<T>::denorm_min();
  for (std::size_t i = n / 3; i < n / 3 + 140 && i < n; ++i)
    g[i] = static_cast<T>(static_cast<double>(tiny) * static_cast<double>(1 + i % 5)) *
           (i % 2 == 0 ? T(1) : T(-1));
  for (std::size_t i = n / 2 + 7; i < n / 2 + 160 && i < n; ++i) g[i] = T(0);
  return g;
}

/// sample_gradient<T> as the gradient source of check_wrapper.
template <class T>
auto sampled() {
  return [](std::size_t n, unsigned seed) { return sample_gradient<T>(n, seed); };
}

template <class T, class Policy>
void check_cases_of(const Policy& policy) {
  const gcomp::rng_key key{2024, 7, 3};
  for (std::size_t n : {1, 2, 63, 64, 65, 1000, 4097, 9001}) {
    const std::vector<T> g = sample_gradient<T>(n, static_cast<unsigned>(n));
    for (std::size_t bucket : {0, 64, 100, 512, 5000}) {
      CAPTURE(n);
      CAPTURE(bucket);
      for (unsigned levels : {1u, 3u, 7u, 127u, 32767u}) {
        CAPTURE(levels);
        check_one(policy, gcomp::qsgd<T>({.levels = levels, .bucket = bucket}), g, key);
      }
      check_one(policy, gcomp::terngrad<T>({.bucket = bucket}), g, key);
    }
    if constexpr (std::is_same_v<T, float>) check_one(policy, gcomp::natural<float>{}, g, key);
    for (unsigned bits : {4u, 16u})  // every level fits: |g| < 8 (spacing 1, 4 bits), 0.25 * 2^15
      check_one(policy, gcomp::grid_round<T>({.spacing = bits == 4 ? 1.0 : 0.25, .bits = bits}), g, key);
  }
  // Ties at half a grid step (away from zero) and the top of the code range
  // (check_one also compresses -g, so the bottom, -4, cannot be used here).
  check_one(policy, gcomp::grid_round<T>({.spacing = 0.5, .bits = 3}),
            std::vector<T>{T(0.25), T(-0.25), T(0.75), T(-0.75), T(1.5), T(-1.5), T(1.7), T(-1.6), T(0)}, key);
  // Whole-vector scales over many reduce blocks, and the default buckets.
  const std::vector<T> big = sample_gradient<T>(70001, 11);
  for (std::size_t bucket : {0, 512}) {
    CAPTURE(bucket);
    check_one(policy, gcomp::qsgd<T>({.levels = 7, .bucket = bucket}), big, key);
    check_one(policy, gcomp::terngrad<T>({.bucket = bucket}), big, key);
  }
  // A bucket of subnormals only: QSGD's tiny-norm rescaling.
  std::vector<T> tiny(256, std::numeric_limits<T>::denorm_min());
  for (std::size_t i = 0; i < tiny.size(); i += 3) tiny[i] = -tiny[i];
  check_one(policy, gcomp::qsgd<T>({.levels = 32767, .bucket = 64}), tiny, key);
  check_one(policy, gcomp::terngrad<T>({.bucket = 64}), tiny, key);
  if constexpr (std::is_same_v<T, float>) {
    check_one(policy, gcomp::natural<float>{}, big, key);
    // Subnormals, 2^127 itself and the largest floats below it.
    check_one(policy, gcomp::natural<float>{}, tiny, key);
    check_one(policy, gcomp::natural<float>{},
              std::vector<float>{0x1p127f, -0x1p127f, 0x1.fffffep126f, -0.0f, 0x1p-126f}, key);
  }
}

/// Payloads and decompress_add bitwise equal to host_seq for float and double,
/// sizes around the 64-element groups and 4096-element reduce blocks, buckets
/// of 0 (one scale), whole groups, partial groups and several reduce blocks,
/// every QSGD width from 2 to 16 bits.
template <class Policy>
void check_quantizer_cases(const Policy& policy) {
  SUBCASE("float") { check_cases_of<float>(policy); }
  SUBCASE("double") { check_cases_of<double>(policy); }
}

/// error_feedback<qsgd>, error_feedback<natural> and ef21<terngrad> with
/// their state in the policy's memory, bitwise equal to host_seq step by step.
template <class Policy>
void check_wrapper_cases(const Policy& policy) {
  check_wrapper(policy, gcomp::error_feedback<gcomp::qsgd<float>>(gcomp::qsgd<float>({.levels = 3, .bucket = 128})),
                5000, 6, sampled<float>());
  check_wrapper(policy, gcomp::error_feedback<gcomp::natural<float>>(), 777, 4, sampled<float>());
  check_wrapper(policy, gcomp::ef21<gcomp::terngrad<double>>(gcomp::terngrad<double>({.bucket = 100})),
                4500, 6, sampled<double>());
}

/// Non-finite values (the first index named, as on the host), norms that
/// overflow T, a double bucket whose squares overflow but whose norm does not
/// (rescaled as on the host, bitwise), and decompress_add's rejections, with
/// the output untouched.
template <class Policy>
void check_quantizer_errors(const Policy& policy) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (std::size_t bucket : {0, 64, 100}) {
    CAPTURE(bucket);
    std::vector<float> g = sample_gradient<float>(1000, 3);
    g[700] = inf;
    g[321] = nan;  // the first non-finite index, in an earlier bucket
    check_compress_error(policy, gcomp::qsgd<float>({.levels = 7, .bucket = bucket}), g, "gradient[321]");
    check_compress_error(policy, gcomp::terngrad<float>({.bucket = bucket}), g, "gradient[321]");
    g[321] = 1.0f;
    g[700] = -inf;
    check_compress_error(policy, gcomp::qsgd<float>({.levels = 7, .bucket = bucket}), g, "gradient[700]");
    check_compress_error(policy, gcomp::terngrad<float>({.bucket = bucket}), g, "gradient[700]");
  }
  {
    std::vector<float> g = sample_gradient<float>(1000, 5);
    g[900] = nan;
    g[400] = 0x1.000002p127f;  // finite, but could round up to infinity
    check_compress_error(policy, gcomp::natural<float>{}, g, "gradient[400]");
    g[400] = 1.0f;
    check_compress_error(policy, gcomp::natural<float>{}, g, "gradient[900]");
  }
  // grid_round: a NaN and a level off the 4-bit range (the first is named).
  {
    std::vector<float> g = sample_gradient<float>(1000, 6);
    for (float& x : g) x *= 0.5f;
    g[800] = nan;
    g[300] = 9.0f;  // level 9 > 7
    check_compress_error(policy, gcomp::grid_round<float>({.spacing = 1.0, .bits = 4}), g, "gradient[300]");
    g[300] = 0.0f;
    check_compress_error(policy, gcomp::grid_round<float>({.spacing = 1.0, .bits = 4}), g, "gradient[800]");
  }
  // float: each |g| fits, the bucket norm does not.
  std::vector<float> large(128, 3.0e38f);
  check_compress_error(policy, gcomp::qsgd<float>({.levels = 7, .bucket = 64}), large, "overflows");
  // double: squares overflow a double; the norm 1e300 sqrt(64) fits (rescaled),
  // 1.5e308 sqrt(2) does not.
  const std::vector<double> rescaled(128, 1e300);
  check_one(policy, gcomp::qsgd<double>({.levels = 7, .bucket = 64}), rescaled, gcomp::rng_key{1, 2, 3});
  check_compress_error(policy, gcomp::qsgd<double>({.levels = 7, .bucket = 0}),
                       std::vector<double>(2, 1.5e308), "overflows");

  // decompress_add: a message of another size, and a TernGrad code 3.
  gcomp::terngrad<float> t({.bucket = 64});
  const std::vector<float> g = sample_gradient<float>(300, 9);
  gcomp::quantized_payload<float> m;
  t.compress(gcomp::host_seq{}, std::span<const float>(g), m, gcomp::rng_key{1, 1, 0});
  std::vector<float> base(g.size(), 2.0f);
  gcomp::policy_buffer<float> out;
  out.assign_from_host(policy, std::span<const float>(base));
  const auto attempt = [&](const gcomp::quantized_payload<float>& message, std::size_t n) {
    std::vector<float> host_out(n, 2.0f);
    const std::string host_error = message_of(
        [&] { t.decompress_add(gcomp::host_seq{}, message, std::span<float>(host_out), 1.0f); });
    const std::string device_error =
        message_of([&] { t.decompress_add(policy, message, out.span().first(n), 1.0f); });
    CAPTURE(host_error);
    CHECK(host_error != no_error);
    CHECK(device_error == host_error);
    CHECK(same_bytes(base, read_back(policy, std::span<const float>(out.span()))));
  };
  attempt(m, 299);
  gcomp::quantized_payload<float> bad = m;
  bad.words[2] |= std::uint64_t{3} << 10;  // code 64 + 5 = 69 becomes 3
  attempt(bad, 300);
  gcomp::quantized_payload<float> bad_scale = m;
  bad_scale.scales[1] = -1.0f;
  attempt(bad_scale, 300);

  // natural: exponent 255 is no value.
  gcomp::natural<float> nat;
  gcomp::quantized_payload<float> nm;
  nat.compress(gcomp::host_seq{}, std::span<const float>(g), nm, gcomp::rng_key{1, 1, 0});
  nm.words[1] |= std::uint64_t{0xff} << 8;  // code 8 (bits 72-80) gets exponent 255
  std::vector<float> host_out(g.size(), 2.0f);
  const std::string host_error = message_of(
      [&] { nat.decompress_add(gcomp::host_seq{}, nm, std::span<float>(host_out), 1.0f); });
  const std::string device_error =
      message_of([&] { nat.decompress_add(policy, nm, out.span(), 1.0f); });
  CAPTURE(host_error);
  CHECK(host_error.find("code 8") != std::string::npos);
  CHECK(device_error == host_error);
  CHECK(same_bytes(base, read_back(policy, std::span<const float>(out.span()))));
}

}  // namespace gcomp_test::quant_sameness
