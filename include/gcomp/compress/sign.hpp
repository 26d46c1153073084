// Scaled sign compression (Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes", ICML 2019), whole-vector or one scale per layer.
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

/// C(g) = (||g||_1 / d) sign(g) with sign(0) = +1 (also for -0): one bit per
/// element plus one scale (T) per group. A group is the whole buffer, or,
/// when constructed with a layout, each layer (d = the layer's size).
///
/// Contraction (per group, exact arithmetic): with s = ||x||_1 / d,
///   ||C(x) - x||^2 = ||x||^2 - 2 s ||x||_1 + d s^2 = ||x||^2 - ||x||_1^2 / d
///                  = (1 - delta(x)) ||x||^2,  delta(x) = ||x||_1^2 / (d ||x||_2^2) >= 1/d,
/// so delta() = 1 / (largest group). It is biased; pair it with
/// gcomp::error_feedback (EF-signSGD). Scales are rounded to T once, which
/// perturbs the bound by a relative 2^-24 (float).
///
/// Layout gaps (allowed with gaps::allowed): elements outside every layer
/// are not compressed. Their bits are sent as 0 and carry no value;
/// decompress_add leaves them in `out` untouched and rejects a message with a
/// bit set there. They are not checked for finiteness. C(x) is 0 on a gap,
/// so delta() is 0 for a layout with gaps.
///
/// Payload: quantized_payload<T> with bits = 1, bucket = 0, scales[d] =
/// ||g_d||_1 / |d| >= 0, bit i = (g_i >= 0). Wire: 24 + 17 + sizeof(T) *
/// groups + ceil(n / 8) bytes.
///
/// Non-finite gradients are rejected: compress throws gcomp::error naming
/// the first such index and leaves the payload as it was. The result is
/// bitwise the same on every policy and thread count (sums follow the fixed
/// reduction order). Cost on the host: one read pass for the whole buffer
/// (the l1 sum in the fixed order and the bits, 64 at a time), two with a
/// layout (the per-layer sums, then the packing), and a write of n / 8 bytes;
/// decompress_add one pass over out.
template <class T = float>
class sign {
 public:
  using value_type = T;
  using payload = quantized_payload<T>;
  static constexpr bool unbiased = false;
  static constexpr bool shared_support = false;

  /// One scale for the whole gradient.
  sign() = default;

  /// One scale per layer of `lay`; gradients must have lay.total_size() elements.
  explicit sign(layout lay) : layout_(std::move(lay)), per_layer_(true) {
    gaps_ = detail::sign_impl::layout_gaps(layout_);
  }

  template <class Policy>
  void compress(const Policy& policy, std::span<const T> gradient, payload& message, rng_key) {
    constexpr std::string_view where = "gcomp::sign::compress";
    const std::size_t n = gradient.size();
    const detail::sign_impl::sign_groups groups = groups_for(where, n);
    const std::size_t count = groups.count();
    using acc = detail::sign_impl::sign_accumulator<T>;
    sums_.resize(count);
    const T* g = gradient.data();
    if (!per_layer_) {
      // One pass: the l1 sum (fixed order) and the bits, into the staging
      // words, which reach the message only once the sum is known finite.
      staged_.resize(quantized::word_count(n, 1));
      detail::sign_impl::fused_sums_and_bits<1, acc>(
          policy, g, n, staged_.data(), sums_.data(),
          [](std::size_t, T x) { return static_cast<acc>(std::fabs(x)); });
    } else {
      detail::sign_impl::reduce_groups(policy, groups, std::span<acc>(sums_), acc(0),
                                       [](acc a, acc b) { return a + b; },
                                       [=](std::size_t i) { return static_cast<acc>(std::fabs(g[i])); });
    }
    for (std::size_t d = 0; d < count; ++d)
      if (!std::isfinite(sums_[d])) {
        detail::sign_impl::throw_first_non_finite(where, g, groups.offset(d),
                                       groups.offset(d) + groups.size(d));
        fail(where, "the l1 norm of group ", d, " overflows");
      }
    // Nothing can fail from here on.
    message.dimension = n;
    message.bits = 1;
    message.bucket = 0;
    message.scales.resize(count);
    for (std::size_t d = 0; d < count; ++d)
      message.scales[d] =
          groups.size(d) == 0 ? T(0) : static_cast<T>(sums_[d] / static_cast<acc>(groups.size(d)));
    if (!per_layer_) {
      message.words.swap(staged_);
      return;
    }
    message.words.resize(quantized::word_count(n, 1));
    detail::sign_impl::pack_ge_zero(policy, n, g, message.words.data());
    for (const auto& [b, e] : gaps_) detail::sign_impl::clear_bits(message.words.data(), b, e);
  }

  /// out += scale * C(g): out_i += scale * (bit_i ? s_d : -s_d) for i in group
  /// d; gap elements are left alone. The message must match out's size and
  /// this compressor's groups (bits 1, bucket 0, one finite scale >= 0 per
  /// group, no bit set in a gap); otherwise it throws before writing.
  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<T> out,
                      T scale) const {
    constexpr std::string_view where = "gcomp::sign::decompress_add";
    const std::size_t n = out.size();
    const detail::sign_impl::sign_groups groups = groups_for(where, n, "out");
    detail::sign_impl::check_one_bit_payload(where, message, n, groups.count(), gaps_);
    for (std::size_t d = 0; d < groups.count(); ++d)
      if (message.scales[d] < T(0))
        fail(where, "message.scales[", d, "] = ", message.scales[d], " is negative");
    const std::uint64_t* words = message.words.data();
    T* o = out.data();
    for (std::size_t d = 0; d < groups.count(); ++d) {
      const T s = scale * message.scales[d];
      const std::size_t offset = groups.offset(d);
      for_each_index(policy, groups.size(d), [=](std::size_t k) {
        const std::size_t i = offset + k;
        const bool bit = (words[i / 64] >> (i % 64)) & 1u;
        o[i] += bit ? s : -s;
      });
    }
  }

  std::size_t wire_bytes(const payload& message) const { return encoded_size(message); }

  /// Exact: 8 (24 + 17 + sizeof(T) groups + ceil(n / 8)) / n.
  double bits_per_element(std::size_t n) const {
    if (n == 0) return 0.0;
    const std::size_t groups = per_layer_ ? groups_for("gcomp::sign::bits_per_element", n).count() : 1;
    const std::size_t bytes =
        wire::header_bytes + 17 + groups * sizeof(T) + wire::packed_bytes(n, 1);
    return 8.0 * static_cast<double>(bytes) / static_cast<double>(n);
  }

  /// The worst-case delta of ||C(x) - x||^2 <= (1 - delta) ||x||^2 for an
  /// n-element x: 1 / (largest group size); 0 if the layout has gaps.
  double delta(std::size_t n) const {
    const detail::sign_impl::sign_groups groups = groups_for("gcomp::sign::delta", n);
    if (groups.has_gaps()) return 0.0;
    std::size_t largest = 0;
    for (std::size_t d = 0; d < groups.count(); ++d) largest = std::max(largest, groups.size(d));
    return largest == 0 ? 1.0 : 1.0 / static_cast<double>(largest);
  }

  /// Scale groups: 1, or the layout's layers.
  std::size_t groups() const { return per_layer_ ? layout_.num_layers() : 1; }
  bool per_layer() const { return per_layer_; }
  const layout& layers() const { return layout_; }

 private:
  detail::sign_impl::sign_groups groups_for(std::string_view where, std::size_t n,
                                             std::string_view name = "gradient") const {
    if (per_layer_) layout_.check_buffer(where, name, n);
    return detail::sign_impl::sign_groups{per_layer_ ? &layout_ : nullptr, n};
  }

  layout layout_;
  bool per_layer_ = false;
  std::vector<std::pair<std::size_t, std::size_t>> gaps_;
  std::vector<detail::sign_impl::sign_accumulator<T>> sums_;  // l1 norm per group, reused
  std::vector<std::uint64_t> staged_;  // whole-buffer bits before they reach the message
};

}  // namespace gcomp
