// Casting compressors: send the gradient as float16 or bfloat16 (round to nearest even), 16 bits per element.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "gcomp/compress/detail/sign_common.hpp"
#include "gcomp/compress/detail/sign_device.hpp"
#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/half.hpp"
#include "gcomp/core/message.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/detail/unfused.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp {

namespace detail {

/// cast's decoder: o + scale * widen(h), the product and the sum unfused so
/// that the device's result is the host's; decompress_add calls it on both.
template <class T, class H>
struct cast_widen_add {
  T scale;
  GCOMP_HD T operator()(T o, H h) const {
    return add_unfused(o, mul_unfused(scale, static_cast<T>(to_float(h))));
  }
};

}  // namespace detail

/// C(g)_i = round_to_nearest_even_H(g_i), sent as a dense vector of H
/// (float16 or bfloat16, core/half.hpp) and widened back on arrival:
/// decompress_add adds scale * float(H(g_i)).
///
///  - Biased (deterministic rounding): |C(g)_i - g_i| <= u |g_i| with unit
///    roundoff u = 2^-11 for float16 normals, 2^-8 for bfloat16; float16
///    values below 2^-14 in magnitude are rounded to the subnormal grid
///    (absolute error <= 2^-25).
///  - shared_support is false on purpose: the payloads of two workers do line
///    up index by index, but an all-reduce would sum them in 16-bit
///    precision, adding one rounding per worker and overflowing float16 at
///    65504. Send casts through gcomp::allgather (each worker's message is
///    widened and summed in T), or use identity for a full-precision all-reduce.
///  - Range: a finite g_i that would round to +-inf (|g_i| >= 65520 for
///    float16; >= (2 - 2^-8) 2^127 for bfloat16) is rejected like a
///    non-finite one: compress throws gcomp::error naming the first such
///    index, before writing anything (scale the loss down, or use bfloat16).
///  - Wire: 24 + 2 n bytes, so bits_per_element(n) = 16 + 192 / n.
///  - Cost on the host: one read-and-write pass (each block of 4096 elements
///    is range-checked and converted while in cache, into a staging buffer
///    swapped into the payload; F16C when compiled for it); decompress_add
///    one pass.
///  - Device policies (cuda_par, thrust_device: the gradient and out in
///    device memory, the payload on the host): a range check, a conversion
///    kernel and one copy of the 16-bit values to the host; decompress_add
///    uploads them and adds on the device. Payloads, outputs and errors are
///    bitwise those of host_seq (detail/sign_device.hpp).
template <class T, class H>
class cast {
 public:
  using value_type = T;
  using half_type = H;
  using payload = dense_payload<H>;
  static constexpr bool unbiased = false;
  static constexpr bool shared_support = false;

  template <class Policy>
  void compress(const Policy& policy, std::span<const T> gradient, payload& message, rng_key) {
    const std::size_t n = gradient.size();
    if constexpr (!host_policy<Policy>) {
      // The first element out of range (one reduction), then the conversion.
      const std::size_t bad = detail::first_out_of_range(policy, gradient, overflow_threshold());
      if (bad != n) {
        T x{};
        copy_to_host(policy, gradient.subspan(bad, 1), std::span<T>(&x, 1));
        fail_out_of_range(bad, x);
      }
      detail::cast_device_convert(policy, gradient, device_, staged_, where_compress());
    } else {
      // One pass: each block of the gradient is range-checked and converted
      // while it is in cache, into the staging buffer; it becomes the payload
      // (a swap) only when no element was out of range.
      staged_.resize(n);
      H* out = staged_.data();
      const T* in = gradient.data();
      const std::size_t blocks = detail::reduce_block_count(n);
      std::atomic<bool> bad{false};
      detail::sign_impl::for_each_block(policy, blocks, [=, &bad](std::size_t b) {
        const std::size_t begin = b * detail::reduce_block;
        const std::size_t len = std::min(n, begin + detail::reduce_block) - begin;
        if (convert_block(in + begin, len, out + begin)) bad.store(true, std::memory_order_relaxed);
      });
      if (bad.load()) {
        check_range(policy, gradient);  // throws, naming the first bad index
        fail(where_compress(), "internal error: an element was out of range");
      }
    }
    message.data.swap(staged_);
  }

  /// out += scale * widen(message). Any dense payload of out.size() values is
  /// accepted; its values are added as they are (like identity, no value is
  /// rejected: compress never produces a non-finite one).
  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<T> out,
                      T scale) const {
    check_same_size(where_decompress(), "out", out.size(), "message", message.size());
    const detail::cast_widen_add<T, H> add{scale};
    if constexpr (!host_policy<Policy>) {
      detail::cast_device_decompress_add(policy, message.data, out, add, device_, where_decompress());
    } else {
      T* o = out.data();
      const H* v = message.data.data();
      for_each_index(policy, out.size(), [=](std::size_t i) { o[i] = add(o[i], v[i]); });
    }
  }

  std::size_t wire_bytes(const payload& message) const { return encoded_size(message); }

  /// Exact: 8 (24 + 2 n) / n.
  double bits_per_element(std::size_t n) const {
    return n == 0 ? 0.0 : 8.0 * double(wire::header_bytes + n * sizeof(H)) / double(n);
  }

  /// Smallest |x| that rounds to infinity in H.
  static constexpr T overflow_threshold() {
    if constexpr (std::is_same_v<H, float16>)
      return T(65520.0);
    else
      return T(0x1.ffp127);
  }

 private:
  static const std::string& where_compress() {
    static const std::string where = std::string("gcomp::cast<") + half_format<H>::name + ">::compress";
    return where;
  }
  static const std::string& where_decompress() {
    static const std::string where =
        std::string("gcomp::cast<") + half_format<H>::name + ">::decompress_add";
    return where;
  }

  /// Converts x[0, len) into out; returns whether some element is out of
  /// range (not finite, or rounds to infinity).
  static bool convert_block(const T* x, std::size_t len, H* out) {
    constexpr T limit = overflow_threshold();
    std::uint32_t bad = 0;
    for (std::size_t i = 0; i < len; ++i)
      bad |= static_cast<std::uint32_t>(!(x[i] < limit)) | static_cast<std::uint32_t>(!(x[i] > -limit));
    if constexpr (std::is_same_v<T, float> && std::is_same_v<H, float16>) {
      to_float16_n(x, len, out);
    } else {
      for (std::size_t i = 0; i < len; ++i) out[i] = half_format<H>::from(x[i]);
    }
    return bad != 0;
  }

  template <class Policy>
  static void check_range(const Policy& policy, std::span<const T> g) {
    detail::sign_impl::check_below(policy, g, overflow_threshold(),
                                   [&](std::size_t i) { fail_out_of_range(i, g[i]); });
  }

  /// Throws for gradient[i] = x out of range: not finite, or rounding to infinity.
  [[noreturn]] static void fail_out_of_range(std::size_t i, T x) {
    if (!std::isfinite(x)) fail(where_compress(), "gradient[", i, "] = ", x, " is not finite");
    fail(where_compress(), "gradient[", i, "] = ", x, " overflows ", half_format<H>::name,
         " (it would round to infinity; the largest finite value is ", half_format<H>::max_finite,
         ")");
  }

  std::vector<H> staged_;  // the converted values before they reach the payload
  // Device scratch under cuda_par / thrust_device (the converted values, or
  // a message's values for decompress_add), sized at the first device call;
  // mutable for decompress_add: one object must not decompress on two
  // threads at once under a device policy.
  mutable policy_buffer<H> device_;
};

/// Gradients sent as IEEE float16.
template <class T = float>
using fp16_cast = cast<T, float16>;

/// Gradients sent as bfloat16.
template <class T = float>
using bf16_cast = cast<T, bfloat16>;

}  // namespace gcomp
