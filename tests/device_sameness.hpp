// The device-sameness harness: one compressor or wrapper stepped under host_seq and under a device policy (cuda_par, thrust_device) must give the same payloads, outputs and state bit for bit, and the same errors with nothing written; used by quant_sameness.hpp, sign_sameness.hpp and sparse_sameness.hpp.
//
// Gradients and outputs are put in the policy's memory with
// gcomp::policy_buffer and read back with gcomp::copy_to_host. The host side
// is the oracle: every compressor's host path has its own tests against
// independent references.
#pragma once

#include <doctest/doctest.h>

#include <gcomp/core/error.hpp>
#include <gcomp/core/random.hpp>
#include <gcomp/exec/buffer.hpp>
#include <gcomp/exec/host.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "error_text.hpp"

namespace gcomp_test::device_sameness {

using gcomp_test::message_of;  // error_text.hpp
using gcomp_test::no_error;

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

/// Quantized payloads field by field (a failure says which); every other
/// payload (dense, sparse, block, low-rank, chain) by its wire encoding, which
/// carries every field.
template <class Payload>
void check_same_payload(const Payload& host, const Payload& device) {
  if constexpr (requires { host.words; host.scales; }) {
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

/// Compresses g with `host` under host_seq and with `device` under `policy`
/// (g uploaded to the policy's memory), and checks that the payloads are the
/// same.
template <class C, class Policy>
void compress_both(const Policy& policy, C& host, C& device, const std::vector<typename C::value_type>& g,
                   const gcomp::rng_key& key, typename C::payload& on_host, typename C::payload& on_device) {
  using T = typename C::value_type;
  host.compress(gcomp::host_seq{}, std::span<const T>(g), on_host, key);
  gcomp::policy_buffer<T> g_device;
  g_device.assign_from_host(policy, std::span<const T>(g));
  device.compress(policy, std::span<const T>(g_device.span()), on_device, key);
  check_same_payload(on_host, on_device);
}

/// One compressor on one gradient: compress g under host_seq and under
/// `policy`, then -g with the next key on the same objects (reused scratch,
/// another sign pattern), then decompress_add of the host payload into the
/// same base with scales 0.75 and -1 under both.
template <class C, class Policy>
void check_one(const Policy& policy, const C& prototype, const std::vector<typename C::value_type>& g,
               gcomp::rng_key key = gcomp::rng_key{2024, 7, 3}) {
  using T = typename C::value_type;
  C host = prototype;
  C device = prototype;
  typename C::payload on_host, on_device;
  compress_both(policy, host, device, g, key, on_host, on_device);
  std::vector<T> minus(g.size());
  for (std::size_t i = 0; i < g.size(); ++i) minus[i] = -g[i];
  compress_both(policy, host, device, minus, gcomp::rng_key{key.seed, key.step + 1, key.worker}, on_host, on_device);

  std::vector<T> base(g.size());
  for (std::size_t i = 0; i < base.size(); ++i) base[i] = static_cast<T>(0.25 * std::sin(double(i)));
  for (const T scale : {T(0.75), T(-1)}) {
    std::vector<T> out_host = base;
    host.decompress_add(gcomp::host_seq{}, on_host, std::span<T>(out_host), scale);
    gcomp::policy_buffer<T> out_device;
    out_device.assign_from_host(policy, std::span<const T>(base));
    device.decompress_add(policy, on_host, out_device.span(), scale);
    CHECK(same_bytes(out_host, read_back(policy, std::span<const T>(out_device.span()))));
  }
}

/// compress of g must throw the host's error (containing expected_part) under
/// both policies, leave the device's earlier message as it was, and only read
/// the gradient.
template <class C, class Policy>
void check_compress_error(const Policy& policy, C c, const std::vector<typename C::value_type>& g,
                          const std::string& expected_part) {
  using T = typename C::value_type;
  const gcomp::rng_key key{5, 1, 0};
  typename C::payload host_message, device_message, before;
  // A valid earlier message (when g's size allows one).
  const std::vector<T> ok(g.size(), T(0.5));
  message_of([&] { c.compress(gcomp::host_seq{}, std::span<const T>(ok), before, key); });
  device_message = before;
  C host = c;
  const std::string host_error =
      message_of([&] { host.compress(gcomp::host_seq{}, std::span<const T>(g), host_message, key); });
  gcomp::policy_buffer<T> g_device;
  g_device.assign_from_host(policy, std::span<const T>(g));
  const std::string device_error =
      message_of([&] { c.compress(policy, std::span<const T>(g_device.span()), device_message, key); });
  CAPTURE(host_error);
  CHECK(host_error.find(expected_part) != std::string::npos);
  CHECK(device_error == host_error);
  check_same_payload(before, device_message);
  CHECK(same_bytes(g, read_back(policy, std::span<const T>(g_device.span()))));
}

/// decompress_add of `message` into an n-element output must throw the host's
/// error (containing expected_part) under both policies and leave the output
/// as it was.
template <class C, class Policy>
void check_decompress_error(const Policy& policy, const C& c, const typename C::payload& message,
                            std::size_t n, const std::string& expected_part) {
  using T = typename C::value_type;
  std::vector<T> base(n);
  for (std::size_t i = 0; i < n; ++i) base[i] = static_cast<T>(1.0 + double(i % 5));
  std::vector<T> host_out = base;
  const std::string host_error =
      message_of([&] { c.decompress_add(gcomp::host_seq{}, message, std::span<T>(host_out), T(1)); });
  gcomp::policy_buffer<T> out;
  out.assign_from_host(policy, std::span<const T>(base));
  const std::string device_error = message_of([&] { c.decompress_add(policy, message, out.span(), T(1)); });
  CAPTURE(host_error);
  CHECK(host_error != no_error);
  CHECK(host_error.find(expected_part) != std::string::npos);
  CHECK(device_error == host_error);
  CHECK(same_bytes(base, host_out));
  CHECK(same_bytes(base, read_back(policy, std::span<const T>(out.span()))));
}

/// A stateful wrapper (error_feedback, ef21) stepped under host_seq and under
/// `policy` on gradient(n, seed) for steps steps: every payload and the state
/// after every step bitwise equal; a copy of the device wrapper made halfway
/// goes on equal (the state is deep-copied), and reset(policy) zeroes it.
template <class W, class Policy, class Gradient>
void check_wrapper(const Policy& policy, const W& prototype, std::size_t n, int steps, Gradient gradient) {
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
    const std::vector<T> g = gradient(n, 100 + static_cast<unsigned>(t));
    const gcomp::rng_key key{77, static_cast<std::uint64_t>(t), 1};
    host.compress(gcomp::host_seq{}, std::span<const T>(g), on_host, key);
    g_device.assign_from_host(policy, std::span<const T>(g));
    device.compress(policy, std::span<const T>(g_device.span()), on_device, key);
    check_same_payload(on_host, on_device);
    const std::span<const T> h = state_of(host);
    CHECK(same_bytes(std::vector<T>(h.begin(), h.end()), read_back(policy, state_of(std::as_const(device)))));
    if (t == steps / 2) {
      W copy = device;
      device.compress(policy, std::span<const T>(g_device.span()), on_device,
                      gcomp::rng_key{1, 1, 1});  // moves the original on alone
      device = copy;
    }
  }
  device.reset(policy);
  CHECK(same_bytes(std::vector<T>(n, T(0)), read_back(policy, state_of(std::as_const(device)))));
}

}  // namespace gcomp_test::device_sameness
