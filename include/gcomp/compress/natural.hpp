// Natural compression (Horvath, Ho, Horvath, Sahu, Canini, Richtarik, "Natural Compression for Distributed Deep Learning", 2019): stochastic rounding of each float to one of the two nearest powers of two.
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include "gcomp/compress/detail/quant_device.hpp"
#include "gcomp/compress/detail/quant_kernels.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/quantized_payload.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/core/wire.hpp"
#include "gcomp/exec/detail/unfused.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp {

namespace detail {

/// Natural compression's 9-bit code of one float (see gcomp::natural): the
/// exponent of the power of two it rounds to, up with probability
/// mantissa / 2^23 (the exact integer test k < 2 mantissa on the top 24
/// random bits), and the sign. Branch-free; the host loop and the device
/// kernel both call it.
struct natural_bucket_coder {
  GCOMP_HD std::uint32_t operator()(float v, std::uint32_t random) const {
    std::uint32_t x = 0;
    memcpy(&x, &v, 4);
    const std::uint32_t mantissa = x & 0x007fffffu;
    const std::uint32_t e = ((x & 0x7fffffffu) >> 23) + ((random >> 8) < 2u * mantissa ? 1u : 0u);
    return (e & 0xffu) | (e != 0 ? (x >> 31) << 8 : 0u);
  }
};

struct natural_coder {
  GCOMP_HD natural_bucket_coder for_scale(float) const { return {}; }
};

/// |v| <= 2^127 (finite, and cannot round up to infinity).
struct natural_valid {
  GCOMP_HD bool operator()(float v) const {
    std::uint32_t x = 0;
    memcpy(&x, &v, 4);
    return (x & 0x7fffffffu) <= 0x7f000000u;
  }
};

/// out + scale * (+-2^(E - 127), or 0 for E = 0).
struct natural_bucket_decoder {
  float scale;
  GCOMP_HD float operator()(float out, std::uint32_t c) const {
    const std::uint32_t bits = ((c >> 8) << 31) | ((c & 0xffu) << 23);
    float v = 0.0f;
    memcpy(&v, &bits, 4);
    return add_unfused(out, mul_unfused(scale, v));
  }
};

struct natural_decoder {
  GCOMP_HD natural_bucket_decoder for_scale(float, float scale) const { return {scale}; }
};

}  // namespace detail

/// C(g)_i for |g_i| in [2^e, 2^(e+1)) is sign(g_i) 2^(e+1) with probability
/// p = (|g_i| - 2^e) / 2^e and sign(g_i) 2^e otherwise, so E[C(g)] = g and
/// E[C(g)_i^2] = (1 + 3p) 4^e = g_i^2 (1 + 3p) / (1 + p)^2 <= 9/8 g_i^2 (the
/// maximum is at p = 1/3): alpha = 9/8, with per-coordinate variance
/// p (1 - p) 4^e.
///
/// Code (9 bits): the low 8 bits are the IEEE-754 biased exponent E of the
/// result (value 2^(E - 127)), bit 8 its sign. E = 0 is reserved for zero
/// (with the sign bit clear); E = 255 is invalid. Since p = mantissa / 2^23
/// and u = k 2^-24 with k the top 24 random bits, "round up" is the exact
/// integer test k < 2 mantissa: no floating-point rounding enters.
///
/// Zero stays zero. Values below the smallest normal 2^-126 (subnormals) round
/// to 2^-126 with probability |g_i| / 2^-126 and to 0 otherwise: unbiased, but
/// their second moment is |g_i| 2^-126 rather than <= 9/8 g_i^2, so in general
///   E||C(g)||^2 <= 9/8 ||g||^2 + 2^-126 sum_{|g_i| < 2^-126} |g_i|.
/// |g_i| > 2^127 would round up to infinity with positive probability and is
/// rejected like non-finite values (gcomp::error naming the first index,
/// nothing written). float only: the code carries a float32 exponent.
/// u_i = uniform(key.fork(natural_tag), i), so the payload is the same for
/// every policy and thread count. No scales (bucket 0).
template <class T = float>
class natural {
  static_assert(std::is_same_v<T, float>,
                "gcomp::natural encodes float32 exponents: use natural<float>");

 public:
  using value_type = T;
  using payload = quantized_payload<T>;
  static constexpr bool unbiased = true;
  static constexpr bool shared_support = false;
  static constexpr unsigned code_bits = 9;

  natural() = default;

  unsigned bits() const { return code_bits; }

  /// alpha = 9/8 for inputs without subnormals (see the class comment).
  double alpha(std::size_t) const { return 9.0 / 8.0; }

  template <class Policy>
  void compress(const Policy& policy, std::span<const T> gradient, payload& message, rng_key key) {
    constexpr std::string_view where = "gcomp::natural::compress";
    const std::size_t n = gradient.size();
    const rng_key stream = key.fork(detail::natural_tag);
    const T* g = gradient.data();
    std::size_t bad = n;
    if constexpr (!host_policy<Policy>) {
      bad = detail::quant_device_compress_unscaled(policy, gradient, code_bits, stream,
                                                   detail::natural_coder{}, detail::natural_valid{},
                                                   device_, words_, where);
      if (bad != n) {
        T value{};
        copy_to_host(policy, std::span<const T>(g + bad, 1), std::span<T>(&value, 1));
        throw_invalid(where, bad, value);
      }
    } else {
      // Codes go to scratch first; the message is touched only once all is well.
      detail::resize_words(words_, quantized::word_count(n, code_bits));
      std::atomic<std::size_t> first_bad{n};
      detail::quant_pack(policy, n, code_bits, stream, words_.data(),
                         [g, &first_bad](std::size_t first, std::size_t count,
                                         const std::uint32_t* random, std::uint32_t* codes) {
                           // Branch-free, so the loop vectorizes; the largest
                           // magnitude pattern tells whether any is > 2^127.
                           const T* at = g + first;
                           const detail::natural_bucket_coder code;
                           std::uint32_t top = 0;
                           for (std::size_t j = 0; j < count; ++j) {
                             const std::uint32_t mag = std::bit_cast<std::uint32_t>(at[j]) & 0x7fffffffu;
                             top = top < mag ? mag : top;
                             codes[j] = code(at[j], random[j]);
                           }
                           if (top <= 0x7f000000u) return;  // else > 2^127, inf or NaN
                           std::size_t j = 0;
                           while (detail::natural_valid{}(g[first + j])) ++j;
                           std::size_t seen = first_bad.load(std::memory_order_relaxed);
                           while (first + j < seen && !first_bad.compare_exchange_weak(seen, first + j)) {
                           }
                         });
      bad = first_bad.load();
      if (bad != n) throw_invalid(where, bad, g[bad]);
    }
    message.dimension = n;
    message.bits = static_cast<std::uint8_t>(code_bits);
    message.bucket = 0;
    message.scales.clear();
    message.words.swap(words_);
  }

  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<T> out, T scale) const {
    constexpr std::string_view where = "gcomp::natural::decompress_add";
    const std::size_t n = out.size();
    detail::check_quant_message(where, message, n, code_bits, 0, 0);
    // The message is host memory whatever the policy: checked on the host.
    const auto host = [&] {
      if constexpr (host_policy<Policy>) return policy; else return host_seq{};
    }();
    const std::size_t bad =
        detail::quant_first_invalid(host, n, code_bits, message.words.data(), [](std::uint32_t c) {
          return ((c & 0xffu) == 0xffu) | (c == 0x100u);  // no branch: the scan vectorizes
        });
    if (bad != n)
      fail(where, "code ", bad, " = ", quantized::read_code(message.words.data(), bad, code_bits),
           " is invalid (exponent 255, or a negative zero)");
    if constexpr (!host_policy<Policy>) {
      detail::quant_device_decompress_add(policy, message, out, scale, 0, code_bits,
                                          detail::natural_decoder{}, device_, where);
    } else {
      T* o = out.data();
      const detail::natural_bucket_decoder add{scale};
      detail::quant_unpack(policy, n, code_bits, message.words.data(),
                           [=](std::size_t first, std::size_t count, const std::uint32_t* codes) {
                             for (std::size_t j = 0; j < count; ++j)
                               o[first + j] = add(o[first + j], codes[j]);
                           });
    }
  }

  std::size_t wire_bytes(const payload& message) const { return encoded_size(message); }

  /// Exactly 8 * encoded_size / n for an n-element input (no scales).
  double bits_per_element(std::size_t n) const {
    if (n == 0) return 0.0;
    const std::size_t bytes = wire::header_bytes + 1 + 8 + 8 + wire::packed_bytes(n, code_bits);
    return 8.0 * static_cast<double>(bytes) / static_cast<double>(n);
  }

 private:
  std::vector<std::uint64_t> words_;  // scratch, swapped with the message's words
  // Device scratch under cuda_par / thrust_device (see qsgd): mutable, since
  // decompress_add uploads the message there.
  mutable detail::quant_device_buffers<T> device_;

  [[noreturn]] static void throw_invalid(std::string_view where, std::size_t i, T value) {
    if (!std::isfinite(value)) detail::fail_not_finite(where, i, static_cast<double>(value));
    fail(where, "gradient[", i, "] = ", value, " exceeds 2^127 and could round up to infinity");
  }
};

}  // namespace gcomp
