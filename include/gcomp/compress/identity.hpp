// The identity compressor: sends the gradient as it is (the uncompressed baseline).
#pragma once

#include <cstddef>
#include <span>

#include "gcomp/core/error.hpp"
#include "gcomp/core/message.hpp"
#include "gcomp/core/random.hpp"
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

  template <class Policy>
  void compress(const Policy& policy, std::span<const T> gradient, payload& message, rng_key) {
    message.data.resize(gradient.size());
    T* out = message.data.data();
    const T* in = gradient.data();
    for_each_index(policy, gradient.size(), [=](std::size_t i) { out[i] = in[i]; });
  }

  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<T> out,
                      T scale) const {
    check_same_size("gcomp::identity::decompress_add", "out", out.size(), "message",
                    message.size());
    T* o = out.data();
    const T* v = message.data.data();
    for_each_index(policy, out.size(), [=](std::size_t i) { o[i] += scale * v[i]; });
  }

  std::size_t wire_bytes(const payload& message) const { return encoded_size(message); }
  double bits_per_element(std::size_t n) const {
    return n == 0 ? 0.0 : 8.0 * double(wire::header_bytes + n * sizeof(T)) / double(n);
  }
};

}  // namespace gcomp
