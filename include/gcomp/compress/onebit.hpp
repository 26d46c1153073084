// 1-bit SGD quantization (Seide, Fu, Droppo, Li, Yu, "1-Bit Stochastic Gradient Descent and its Application to Data-Parallel Distributed Training of Speech DNNs", Interspeech 2014), two reconstruction values per layer.
#pragma once

#include <cmath>
#include <cstddef>
#include <span>
#include <string_view>
#include <utility>

#include "gcomp/compress/detail/sign_common.hpp"
#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/core/quantized_payload.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/exec/detail/unfused.hpp"

namespace gcomp {

namespace detail {

/// onebit's two summands, branch-free: s = 0 gives x if x >= 0 else 0, s = 1
/// gives x if x < 0 else 0 (a NaN or an infinity gives NaN, so its group's
/// sums are not finite). The host's fused pass and the device reductions
/// both call it.
template <class T>
struct onebit_split_term {
  using acc = sign_impl::sign_accumulator<T>;
  GCOMP_HD acc operator()(std::size_t s, T v) const {
    const acc x = static_cast<acc>(v);
    return s == 0 ? mul_unfused(x, static_cast<acc>(!(x < acc(0))))
                  : mul_unfused(x, static_cast<acc>(!(x >= acc(0))));
  }
};

}  // namespace detail

/// bit_i = (g_i >= 0) (-0 counts as non-negative), and element i of group d
/// is reconstructed as
///   p_d = mean of { g_j >= 0 : j in d }   when bit_i = 1,
///   m_d = mean of { g_j <  0 : j in d }   when bit_i = 0
/// (0 for an empty side). A group is the whole buffer, or each layer when
/// constructed with a layout. Two scales per group: scales[2d] = p_d >= 0,
/// scales[2d + 1] = m_d <= 0.
///
/// For the fixed partition by sign, the mean of each side is the constant
/// that minimizes the squared error on that side, so C is the per-group
/// least-squares 1-bit quantizer with this partition:
///   ||C(x) - x||^2 = ||x||^2 - P p_d^2 - N m_d^2  (P, N: sizes of the sides)
///                 <= the scaled-sign error (which uses +-||x||_1/d on the
///                    same partition) <= (1 - 1/d) ||x||^2.
/// Biased; meant to run inside gcomp::error_feedback as in the paper.
///
/// Layout gaps are handled as in gcomp::sign: not compressed, bits sent as 0,
/// left untouched by decompress_add, not checked for finiteness.
///
/// Payload: quantized_payload<T>, bits = 1, bucket = 0, 2 scales per group.
/// Wire: 24 + 17 + 2 sizeof(T) groups + ceil(n / 8) bytes. Non-finite input
/// throws gcomp::error naming the first bad index, before anything is
/// written. Bitwise the same on every policy and thread count, device
/// policies included (as gcomp::sign).
template <class T = float>
class onebit : public detail::sign_impl::one_bit_compressor<onebit<T>, T> {
  using base = detail::sign_impl::one_bit_compressor<onebit<T>, T>;
  friend base;

 public:
  using typename base::payload;

  /// One pair of scales for the whole gradient.
  onebit() = default;

  /// One pair of scales per layer of `lay`.
  explicit onebit(layout lay) : base(std::move(lay)) {}

  template <class Policy>
  void compress(const Policy& policy, std::span<const T> gradient, payload& message, rng_key) {
    // The sums of the non-negative part and of the negative part of every
    // group (onebit_split_term); the number of set bits per group gives the
    // sizes of the two sides.
    this->template compress_groups<2>(
        policy, gradient, message, "gcomp::onebit::compress", "the sums of group ", " overflow",
        detail::onebit_split_term<T>{},
        [this](std::size_t begin, std::size_t size, const acc* sum, T* scales) {
          const std::size_t np = detail::sign_impl::count_bits(this->staged_.data(), begin, begin + size);
          const acc p = static_cast<acc>(np);
          const acc m = static_cast<acc>(size - np);
          scales[0] = np == 0 ? T(0) : static_cast<T>(sum[0] / p);
          scales[1] = np == size ? T(0) : static_cast<T>(sum[1] / m);
        });
  }

  /// out += scale * C(g). The message must match out's size and this
  /// compressor's groups (bits 1, bucket 0, 2 finite scales per group with
  /// scales[2d] >= 0 >= scales[2d + 1], no bit set in a gap); otherwise it
  /// throws before writing.
  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<T> out,
                      T scale) const {
    constexpr std::string_view where = "gcomp::onebit::decompress_add";
    const detail::sign_impl::sign_groups groups = this->checked_groups(where, message, out.size());
    for (std::size_t d = 0; d < groups.count(); ++d) {
      if (message.scales[2 * d] < T(0))
        fail(where, "message.scales[", 2 * d, "] = ", message.scales[2 * d],
             " (mean of the non-negative elements) is negative");
      if (message.scales[2 * d + 1] > T(0))
        fail(where, "message.scales[", 2 * d + 1, "] = ", message.scales[2 * d + 1],
             " (mean of the negative elements) is positive");
    }
    this->add_levels(policy, where, groups, message, out, [&](std::size_t d) {
      return std::pair<T, T>(scale * message.scales[2 * d], scale * message.scales[2 * d + 1]);
    });
  }

 private:
  using typename base::acc;

  static constexpr std::size_t scales_per_group = 2;
  static constexpr std::string_view bits_per_element_where = "gcomp::onebit::bits_per_element";
};

}  // namespace gcomp
