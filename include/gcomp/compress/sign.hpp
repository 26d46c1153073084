// Scaled sign compression (Karimireddy, Rebjock, Stich, Jaggi, "Error Feedback Fixes SignSGD and other Gradient Compression Schemes", ICML 2019), whole-vector or one scale per layer.
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

/// sign's summand |x| in the accumulator type; the host's fused pass and the
/// device reductions both call it.
template <class T>
struct sign_l1_term {
  using acc = sign_impl::sign_accumulator<T>;
  GCOMP_HD acc operator()(std::size_t, T x) const { return static_cast<acc>(magnitude(x)); }
};

}  // namespace detail

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
/// reduction order), device policies included (cuda_par, thrust_device: the
/// gradient and out in device memory, the payload on the host;
/// detail/sign_device.hpp). Cost on the host: one read pass for the whole buffer
/// (the l1 sum in the fixed order and the bits, 64 at a time), two with a
/// layout (the per-layer sums, then the packing), and a write of n / 8 bytes;
/// decompress_add one pass over out.
template <class T = float>
class sign : public detail::sign_impl::one_bit_compressor<sign<T>, T> {
  using base = detail::sign_impl::one_bit_compressor<sign<T>, T>;
  friend base;

 public:
  using typename base::payload;

  /// One scale for the whole gradient.
  sign() = default;

  /// One scale per layer of `lay`; gradients must have lay.total_size() elements.
  explicit sign(layout lay) : base(std::move(lay)) {}

  template <class Policy>
  void compress(const Policy& policy, std::span<const T> gradient, payload& message, rng_key) {
    // s_d = ||g_d||_1 / |d| (0 for an empty group).
    this->template compress_groups<1>(
        policy, gradient, message, "gcomp::sign::compress", "the l1 norm of group ", " overflows",
        detail::sign_l1_term<T>{},
        [](std::size_t, std::size_t size, const acc* l1, T* scales) {
          scales[0] = size == 0 ? T(0) : static_cast<T>(l1[0] / static_cast<acc>(size));
        });
  }

  /// out += scale * C(g): out_i += scale * (bit_i ? s_d : -s_d) for i in group
  /// d; gap elements are left alone. The message must match out's size and
  /// this compressor's groups (bits 1, bucket 0, one finite scale >= 0 per
  /// group, no bit set in a gap); otherwise it throws before writing.
  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<T> out,
                      T scale) const {
    constexpr std::string_view where = "gcomp::sign::decompress_add";
    const detail::sign_impl::sign_groups groups = this->checked_groups(where, message, out.size());
    for (std::size_t d = 0; d < groups.count(); ++d)
      if (message.scales[d] < T(0))
        fail(where, "message.scales[", d, "] = ", message.scales[d], " is negative");
    this->add_levels(policy, where, groups, message, out, [&](std::size_t d) {
      const T s = scale * message.scales[d];
      return std::pair<T, T>(s, -s);
    });
  }

  /// The worst-case delta of ||C(x) - x||^2 <= (1 - delta) ||x||^2 for an
  /// n-element x: 1 / (largest group size); 0 if the layout has gaps.
  double delta(std::size_t n) const {
    const detail::sign_impl::sign_groups groups = this->groups_for("gcomp::sign::delta", n);
    if (groups.has_gaps()) return 0.0;
    std::size_t largest = 0;
    for (std::size_t d = 0; d < groups.count(); ++d) largest = std::max(largest, groups.size(d));
    return largest == 0 ? 1.0 : 1.0 / static_cast<double>(largest);
  }

 private:
  using typename base::acc;

  static constexpr std::size_t scales_per_group = 1;
  static constexpr std::string_view bits_per_element_where = "gcomp::sign::bits_per_element";
};

}  // namespace gcomp
