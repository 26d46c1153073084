// Casting compressors: send the gradient as float16 or bfloat16 (round to nearest even), 16 bits per element.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "gcomp/compress/detail/sign_common.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/half.hpp"
#include "gcomp/core/message.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp {

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
    message.data.swap(staged_);
  }

  /// out += scale * widen(message). Any dense payload of out.size() values is
  /// accepted; its values are added as they are (like identity, no value is
  /// rejected: compress never produces a non-finite one).
  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<T> out,
                      T scale) const {
    check_same_size(where_decompress(), "out", out.size(), "message", message.size());
    T* o = out.data();
    const H* v = message.data.data();
    for_each_index(policy, out.size(),
                   [=](std::size_t i) { o[i] += scale * static_cast<T>(to_float(v[i])); });
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
  static std::string where_compress() {
    return std::string("gcomp::cast<") + half_format<H>::name + ">::compress";
  }
  static std::string where_decompress() {
    return std::string("gcomp::cast<") + half_format<H>::name + ">::decompress_add";
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
    detail::sign_impl::check_below(policy, g, overflow_threshold(), [&](std::size_t i) {
      const T x = g[i];
      if (!std::isfinite(x)) fail(where_compress(), "gradient[", i, "] = ", x, " is not finite");
      fail(where_compress(), "gradient[", i, "] = ", x, " overflows ", half_format<H>::name,
           " (it would round to infinity; the largest finite value is ",
           half_format<H>::max_finite, ")");
    });
  }

  std::vector<H> staged_;  // the converted values before they reach the payload
};

/// Gradients sent as IEEE float16.
template <class T = float>
using fp16_cast = cast<T, float16>;

/// Gradients sent as bfloat16.
template <class T = float>
using bf16_cast = cast<T, bfloat16>;

}  // namespace gcomp
