// 1-bit SGD quantization (Seide, Fu, Droppo, Li, Yu, "1-Bit Stochastic Gradient Descent and its Application to Data-Parallel Distributed Training of Speech DNNs", Interspeech 2014), two reconstruction values per layer.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/compress/detail/sign_common.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/core/quantized_payload.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp {

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
/// written. Bitwise the same on every policy and thread count.
template <class T = float>
class onebit {
 public:
  using value_type = T;
  using payload = quantized_payload<T>;
  static constexpr bool unbiased = false;
  static constexpr bool shared_support = false;

  /// One pair of scales for the whole gradient.
  onebit() = default;

  /// One pair of scales per layer of `lay`.
  explicit onebit(layout lay) : layout_(std::move(lay)), per_layer_(true) {
    gaps_ = detail::sign_impl::layout_gaps(layout_);
  }

  template <class Policy>
  void compress(const Policy& policy, std::span<const T> gradient, payload& message, rng_key) {
    constexpr std::string_view where = "gcomp::onebit::compress";
    const std::size_t n = gradient.size();
    const detail::sign_impl::sign_groups groups = groups_for(where, n);
    const std::size_t count = groups.count();
    positive_.resize(count);
    negative_.resize(count);
    const T* g = gradient.data();
    // The sums of the non-negative part and of the negative part of every
    // group, branch-free (a non-finite element makes its group's sums
    // non-finite), and the bits (into the staging words; the number of set
    // bits per group gives the sizes of the two sides).
    const auto nonneg = [](acc x) { return x * static_cast<acc>(!(x < acc(0))); };  // x if x >= 0 else 0; NaN, inf -> NaN
    const auto neg = [](acc x) { return x * static_cast<acc>(!(x >= acc(0))); };    // x if x < 0 else 0; NaN, inf -> NaN
    staged_.resize(quantized::word_count(n, 1));
    if (!per_layer_) {
      // One pass for the whole buffer: both sums in the fixed order and the bits.
      acc sums[2];
      detail::sign_impl::fused_sums_and_bits<2, acc>(
          policy, g, n, staged_.data(), sums, [=](std::size_t s, T v) {
            const acc x = static_cast<acc>(v);
            return s == 0 ? nonneg(x) : neg(x);
          });
      positive_[0] = sums[0];
      negative_[0] = sums[1];
    } else {
      detail::sign_impl::reduce_groups(policy, groups, std::span<acc>(positive_), acc(0),
                                       [](acc a, acc b) { return a + b; },
                                       [=](std::size_t i) { return nonneg(static_cast<acc>(g[i])); });
      detail::sign_impl::reduce_groups(policy, groups, std::span<acc>(negative_), acc(0),
                                       [](acc a, acc b) { return a + b; },
                                       [=](std::size_t i) { return neg(static_cast<acc>(g[i])); });
    }
    for (std::size_t d = 0; d < count; ++d)
      if (!std::isfinite(positive_[d]) || !std::isfinite(negative_[d])) {
        detail::sign_impl::throw_first_non_finite(where, g, groups.offset(d),
                                                  groups.offset(d) + groups.size(d));
        fail(where, "the sums of group ", d, " overflow");
      }
    if (per_layer_) {
      detail::sign_impl::pack_ge_zero(policy, n, g, staged_.data());
      for (const auto& [b, e] : gaps_) detail::sign_impl::clear_bits(staged_.data(), b, e);
    }
    message.dimension = n;
    message.bits = 1;
    message.bucket = 0;
    message.scales.resize(2 * count);
    for (std::size_t d = 0; d < count; ++d) {
      const std::size_t size = groups.size(d);
      const std::size_t np =
          detail::sign_impl::count_bits(staged_.data(), groups.offset(d), groups.offset(d) + size);
      const acc p = static_cast<acc>(np);
      const acc m = static_cast<acc>(size - np);
      message.scales[2 * d] = np == 0 ? T(0) : static_cast<T>(positive_[d] / p);
      message.scales[2 * d + 1] = np == size ? T(0) : static_cast<T>(negative_[d] / m);
    }
    message.words.swap(staged_);
  }

  /// out += scale * C(g). The message must match out's size and this
  /// compressor's groups (bits 1, bucket 0, 2 finite scales per group with
  /// scales[2d] >= 0 >= scales[2d + 1], no bit set in a gap); otherwise it
  /// throws before writing.
  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<T> out,
                      T scale) const {
    constexpr std::string_view where = "gcomp::onebit::decompress_add";
    const std::size_t n = out.size();
    const detail::sign_impl::sign_groups groups = groups_for(where, n, "out");
    detail::sign_impl::check_one_bit_payload(where, message, n, 2 * groups.count(), gaps_);
    for (std::size_t d = 0; d < groups.count(); ++d) {
      if (message.scales[2 * d] < T(0))
        fail(where, "message.scales[", 2 * d, "] = ", message.scales[2 * d],
             " (mean of the non-negative elements) is negative");
      if (message.scales[2 * d + 1] > T(0))
        fail(where, "message.scales[", 2 * d + 1, "] = ", message.scales[2 * d + 1],
             " (mean of the negative elements) is positive");
    }
    const std::uint64_t* words = message.words.data();
    T* o = out.data();
    for (std::size_t d = 0; d < groups.count(); ++d) {
      const T up = scale * message.scales[2 * d];
      const T down = scale * message.scales[2 * d + 1];
      const std::size_t offset = groups.offset(d);
      for_each_index(policy, groups.size(d), [=](std::size_t k) {
        const std::size_t i = offset + k;
        const bool bit = (words[i / 64] >> (i % 64)) & 1u;
        o[i] += bit ? up : down;
      });
    }
  }

  std::size_t wire_bytes(const payload& message) const { return encoded_size(message); }

  /// Exact: 8 (24 + 17 + 2 sizeof(T) groups + ceil(n / 8)) / n.
  double bits_per_element(std::size_t n) const {
    if (n == 0) return 0.0;
    const std::size_t groups =
        per_layer_ ? groups_for("gcomp::onebit::bits_per_element", n).count() : 1;
    const std::size_t bytes =
        wire::header_bytes + 17 + 2 * groups * sizeof(T) + wire::packed_bytes(n, 1);
    return 8.0 * static_cast<double>(bytes) / static_cast<double>(n);
  }

  std::size_t groups() const { return per_layer_ ? layout_.num_layers() : 1; }
  bool per_layer() const { return per_layer_; }
  const layout& layers() const { return layout_; }

 private:
  using acc = detail::sign_impl::sign_accumulator<T>;

  detail::sign_impl::sign_groups groups_for(std::string_view where, std::size_t n,
                                             std::string_view name = "gradient") const {
    if (per_layer_) layout_.check_buffer(where, name, n);
    return detail::sign_impl::sign_groups{per_layer_ ? &layout_ : nullptr, n};
  }

  layout layout_;
  bool per_layer_ = false;
  std::vector<std::pair<std::size_t, std::size_t>> gaps_;
  std::vector<acc> positive_, negative_;  // per group: sums of the two sides, reused
  std::vector<std::uint64_t> staged_;     // the bits before they reach the message
};

}  // namespace gcomp
