// The identity compressor: sends the gradient as it is (the uncompressed baseline).
#pragma once

#include <cstddef>
#include <span>
#include <string_view>

#include "gcomp/core/error.hpp"
#include "gcomp/core/message.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/detail/unfused.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp {

/// C(g) = g. Unbiased and with shared support, so it all-reduces directly;
/// it is the dense baseline every other compressor is compared with.
template <class T = float>
struct identity {
  using value_type = T;
  using payload = dense_payload<T>;
  static constexpr bool unbiased = true;
  static constexpr bool shared_support = true;

  /// Under a device policy (cuda_par, thrust_device) the gradient is device
  /// memory and is copied into the host message; decompress_add uploads the
  /// message and adds on the device, bitwise as on the host.
  template <class Policy>
  void compress(const Policy& policy, std::span<const T> gradient, payload& message, rng_key) {
    message.data.resize(gradient.size());
    T* out = message.data.data();
    const T* in = gradient.data();
    if constexpr (host_policy<Policy>)
      for_each_index(policy, gradient.size(), [=](std::size_t i) { out[i] = in[i]; });
    else
      copy_to_host(policy, gradient, std::span<T>(message.data));
  }

  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<T> out,
                      T scale) const {
    constexpr std::string_view where = "gcomp::identity::decompress_add";
    check_same_size(where, "out", out.size(), "message", message.size());
    const T* v = message.data.data();
    if constexpr (!host_policy<Policy>) {
      if (out.empty()) return;
      device_.resize(policy, out.size(), where);
      copy_from_host(policy, std::span<const T>(message.data), device_.span());
      v = device_.data();
    }
    for_each_index(policy, out.size(), detail::add_scaled_entry<T>{v, out.data(), scale});
  }

  std::size_t wire_bytes(const payload& message) const { return encoded_size(message); }
  double bits_per_element(std::size_t n) const {
    return n == 0 ? 0.0 : 8.0 * double(wire::header_bytes + n * sizeof(T)) / double(n);
  }

 private:
  mutable policy_buffer<T> device_;  // decompress_add's upload under a device policy
};

}  // namespace gcomp
