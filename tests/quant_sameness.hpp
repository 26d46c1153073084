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

#include "error_text.hpp"

namespace gcomp_test::quant_sameness {

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

template <class T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

template <class T, class Policy>
std::vector<T> read_back(const Policy& policy, std::span<const T> device) {
  std::vector<T> host(device.size());
  gcomp::copy_to_host(policy, device, std::span<T>(host));
  return host;
}

using gcomp_test::message_of;  // error_text.hpp
using gcomp_test::no_error;

// Quantized payloads field by field; any other payload (tests/sparse_sameness.hpp
// reuses check_one, check_wrapper and check_compress_error for sparse, block
// and chain payloads) by its wire encoding, which carries every field.
template <class Payload>
void check_same_payload(const Payload& host, const Payload& device) {
  if constexpr (requires { host.words; }) {
    CHECK(host.dimension == device.dimension);
    CHECK(unsigned(host.bits) == unsigned(device.bits));
    CHECK(host.bucket == device.bucket);
    CHECK(same_bytes(host.scales, device.scales));
    CHECK(same_bytes(host.words, device.words));
  } else {
    std::vector<std::byte> on_host, on_device;
    encode(host, on_host);
    encode(device, on_device);
    CHECK(same_bytes(on_host, on_device));
  }
}

// One compressor on one gradient: compress under host_seq and under `policy`
// (twice, with the same object, so reused scratch is exercised), then
// decompress_add of the host payload into the same base under both.
template <class C, class Policy>
void check_one(const Policy& policy, const C& prototype, const std::vector<typename C::value_type>& g,
               gcomp::rng_key key) {
  using T = typename C::value_type;
  C host = prototype;
  C device = prototype;
  typename C::payload on_host, on_device;
  host.compress(gcomp::host_seq{}, std::span<const T>(g), on_host, key);
  gcomp::policy_buffer<T> g_device;
  g_device.assign_from_host(policy, std::span<const T>(g));
  device.compress(policy, std::span<const T>(g_device.span()), on_device, key);
  check_same_payload(on_host, on_device);
  const gcomp::rng_key next{key.seed, key.step + 1, key.worker};
  host.compress(gcomp::host_seq{}, std::span<const T>(g), on_host, next);
  device.compress(policy, std::span<const T>(g_device.span()), on_device, next);
  check_same_payload(on_host, on_device);

  std::vector<T> base(g.size());
  for (std::size_t i = 0; i < base.size(); ++i) base[i] = static_cast<T>(0.25 * std::sin(double(i)));
  std::vector<T> out_host = base;
  host.decompress_add(gcomp::host_seq{}, on_host, std::span<T>(out_host), T(0.75));
  gcomp::policy_buffer<T> out_device;
  out_device.assign_from_host(policy, std::span<const T>(base));
  device.decompress_add(policy, on_host, out_device.span(), T(0.75));
  CHECK(same_bytes(out_host, read_back(policy, std::span<const T>(out_device.span()))));
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
  // Ties at half a grid step (away from zero) and the two ends of the code range.
  check_one(policy, gcomp::grid_round<T>({.spacing = 0.5, .bits = 3}),
            std::vector<T>{T(0.25), T(-0.25), T(0.75), T(-0.75), T(1.5), T(-2), T(1.7), T(-2.2), T(0)}, key);
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

// A wrapper (error_feedback or ef21 around a quantizer) stepped under host_seq
// and under `policy` on the same gradients: every payload and the state after
// every step bitwise equal; a copy of the device wrapper made halfway goes on
// equal too (the state is deep-copied), and reset(policy) zeroes it.
template <class W, class Policy>
void check_wrapper(const Policy& policy, const W& prototype, std::size_t n, int steps) {
  using T = typename W::value_type;
  W host = prototype;
  W device = prototype;
  typename W::payload on_host, on_device;
  gcomp::policy_buffer<T> g_device;
  const auto state_of = [](const W& w) {
    if constexpr (requires { w.residual(); }) return w.residual(); else return w.state();
  };
  for (int t = 0; t < steps; ++t) {
    CAPTURE(t);
    const std::vector<T> g = sample_gradient<T>(n, 100 + static_cast<unsigned>(t));
    const gcomp::rng_key key{77, static_cast<std::uint64_t>(t), 1};
    host.compress(gcomp::host_seq{}, std::span<const T>(g), on_host, key);
    g_device.assign_from_host(policy, std::span<const T>(g));
    device.compress(policy, std::span<const T>(g_device.span()), on_device, key);
    check_same_payload(on_host, on_device);
    const std::span<const T> h = state_of(host);
    CHECK(same_bytes(std::vector<T>(h.begin(), h.end()), read_back(policy, state_of(device))));
    if (t == steps / 2) {
      W copy = device;
      device.compress(policy, std::span<const T>(g_device.span()), on_device,
                      gcomp::rng_key{1, 1, 1});  // moves the original on alone
      device = copy;
    }
  }
  device.reset(policy);
  CHECK(same_bytes(std::vector<T>(n, T(0)), read_back(policy, state_of(device))));
}

/// error_feedback<qsgd>, error_feedback<natural> and ef21<terngrad> with
/// their state in the policy's memory, bitwise equal to host_seq step by step.
template <class Policy>
void check_wrapper_cases(const Policy& policy) {
  check_wrapper(policy, gcomp::error_feedback<gcomp::qsgd<float>>(gcomp::qsgd<float>({.levels = 3, .bucket = 128})),
                5000, 6);
  check_wrapper(policy, gcomp::error_feedback<gcomp::natural<float>>(), 777, 4);
  check_wrapper(policy, gcomp::ef21<gcomp::terngrad<double>>(gcomp::terngrad<double>({.bucket = 100})),
                4500, 6);
}

// compress of g must throw the host's error under both policies and leave the
// device's message as it was.
template <class C, class Policy>
void check_compress_error(const Policy& policy, C c, const std::vector<typename C::value_type>& g,
                          const std::string& expected_part) {
  using T = typename C::value_type;
  const gcomp::rng_key key{5, 1, 0};
  typename C::payload host_message, device_message, before;
  // A valid earlier message, which a failed compress must leave alone.
  const std::vector<T> ok(g.size(), T(0.5));
  c.compress(gcomp::host_seq{}, std::span<const T>(ok), before, key);
  device_message = before;
  const std::string host_error =
      message_of([&] { c.compress(gcomp::host_seq{}, std::span<const T>(g), host_message, key); });
  gcomp::policy_buffer<T> g_device;
  g_device.assign_from_host(policy, std::span<const T>(g));
  const std::string device_error = message_of(
      [&] { c.compress(policy, std::span<const T>(g_device.span()), device_message, key); });
  CAPTURE(host_error);
  CHECK(host_error.find(expected_part) != std::string::npos);
  CHECK(device_error == host_error);
  check_same_payload(before, device_message);
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
