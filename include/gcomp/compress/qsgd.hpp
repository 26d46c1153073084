// QSGD (Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS 2017): stochastic rounding to s levels of the bucket norm.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
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

/// QSGD's code of one element of a bucket (see qsgd_coder): the host loop and
/// the device kernel both call it, so their codes agree bit for bit.
template <class T>
struct qsgd_bucket_coder {
  T pre, factor, s;
  unsigned b;
  /// l = floor(r) + (u < r - floor(r)), r = min(|v| pre factor, s); the sign
  /// in bit b for a nonzero level. Branch-free, so host loops vectorize.
  GCOMP_HD std::uint32_t operator()(T v, std::uint32_t random) const {
    const T a = mul_unfused(mul_unfused(magnitude(v), pre), factor);
    const T r = s < a ? s : a;
    // 0 <= r <= s < 2^15: truncation is floor (std::floor would not vectorize).
    const std::int32_t whole = static_cast<std::int32_t>(r);
    const T low = static_cast<T>(whole);
    const T u = unit_from_bits<T>(random);
    const std::int32_t level = whole + (u < sub_unfused(r, low) ? 1 : 0);
    const std::uint32_t sign = v < T(0) ? (1u << b) : 0u;
    return static_cast<std::uint32_t>(level) | (level != 0 ? sign : 0u);
  }
};

/// The per-bucket factors of QSGD with s levels and b level bits.
template <class T>
struct qsgd_coder {
  T s;
  unsigned b;
  /// s / norm overflows for a tiny (e.g. subnormal) norm, and 0 * inf would
  /// be NaN: such buckets are scaled up by 2^64 first (exact, and |x| <= norm
  /// keeps |x| 2^64 finite). pre = 1 leaves every other bucket bit for bit as
  /// the reference formula computes it.
  GCOMP_HD qsgd_bucket_coder<T> for_scale(T norm) const {
    const T largest = sizeof(T) == 4 ? static_cast<T>(__FLT_MAX__) : static_cast<T>(__DBL_MAX__);
    const bool tiny = norm > T(0) && !(s / norm <= largest);
    const T pre = tiny ? T(18446744073709551616.0) : T(1);
    const T factor = norm > T(0) ? s / mul_unfused(norm, pre) : T(0);
    return {pre, factor, s, b};
  }
};

/// out + scale * (the value of one code of a bucket with norm `norm`).
template <class T>
struct qsgd_bucket_decoder {
  T unit, scale;
  unsigned b;
  std::uint32_t level_mask;
  GCOMP_HD T operator()(T out, std::uint32_t code) const {
    const T v = mul_unfused(static_cast<T>(static_cast<std::int32_t>(code & level_mask)), unit);
    return add_unfused(out, mul_unfused(scale, (code >> b) != 0 ? -v : v));
  }
};

template <class T>
struct qsgd_decoder {
  T s;
  unsigned b;
  GCOMP_HD qsgd_bucket_decoder<T> for_scale(T norm, T scale) const {
    return {norm / s, scale, b, (1u << b) - 1};
  }
};

}  // namespace detail

struct qsgd_options {
  unsigned levels = 7;       // s = 2^b - 1 with b in [1, 15]: 1, 3, 7, ..., 32767
  std::size_t bucket = 512;  // elements per norm; 0: one norm over the whole buffer
};

/// Per bucket of d elements (the last one may be shorter) with norm
/// ||g_bucket||_2, element i is sent as sign(g_i) and the level
///   l_i = floor(s |g_i| / norm + u_i),   u_i uniform in [0, 1),
/// so l_i is s |g_i| / norm rounded up with probability equal to its
/// fractional part; it decodes to sign(g_i) * l_i * norm / s. Hence
///   E[C(g)] = g   and   E||C(g)||^2 <= alpha ||g||^2,
///   alpha = 1 + min(d / s^2, sqrt(d) / s)   (Alistarh et al., Lemma 3.1).
/// Codes are b + 1 bits (level in the low b bits, sign in bit b, the sign is
/// set only for a nonzero level); one T norm per bucket, rounded up so that
/// |g_i| <= norm. u_i = uniform(key.fork(qsgd_tag), i): the payload is the
/// same for every policy and thread count. Non-finite gradients are rejected
/// (gcomp::error naming the first index) before anything is written.
template <class T = float>
class qsgd {
 public:
  using value_type = T;
  using payload = quantized_payload<T>;
  static constexpr bool unbiased = true;
  static constexpr bool shared_support = false;

  explicit qsgd(qsgd_options options) : options_(options) {
    const unsigned s = options.levels;
    require(s >= 1 && s <= 32767u && (s & (s + 1)) == 0, "gcomp::qsgd",
            "options.levels = ", s, " must be 2^b - 1 with b in [1, 15] (1, 3, 7, ..., 32767)");
    level_bits_ = static_cast<unsigned>(std::popcount(s));
  }

  /// Bits per element on the wire: b level bits and a sign bit.
  unsigned bits() const { return level_bits_ + 1; }

  /// alpha = 1 + min(d / s^2, sqrt(d) / s) with d the largest bucket of an
  /// n-element input (min(bucket, n), or n with bucket == 0).
  double alpha(std::size_t n) const {
    const double d = static_cast<double>(options_.bucket == 0 ? n : std::min(options_.bucket, n));
    const double s = static_cast<double>(options_.levels);
    return 1.0 + std::min(d / (s * s), std::sqrt(d) / s);
  }

  template <class Policy>
  void compress(const Policy& policy, std::span<const T> gradient, payload& message, rng_key key) {
    constexpr std::string_view where = "gcomp::qsgd::compress";
    const std::size_t n = gradient.size();
    const std::size_t bucket = options_.bucket;
    const unsigned b = level_bits_;
    const T s = static_cast<T>(options_.levels);
    const rng_key stream = key.fork(detail::qsgd_tag);
    const detail::qsgd_coder<T> coder{s, b};
    if constexpr (!host_policy<Policy>) {
      // Scales and words computed on the device, then brought to scratch.
      detail::quant_device_compress(policy, gradient, bucket, detail::quant_stat::l2, b + 1, stream,
                                    coder, device_, norms_, words_, where);
    } else {
      // Norms and codes go to scratch; the message is touched once all is well.
      detail::resize_words(words_, quantized::word_count(n, b + 1));
      norms_.resize(bucket == 0 ? 1 : quantized::bucket_count(n, bucket));
      const auto code_bucket = [coder](const T* x, const std::uint32_t* random, std::uint32_t* codes,
                                       std::size_t count, T norm) {
        const detail::qsgd_bucket_coder<T> code = coder.for_scale(norm);
        for (std::size_t j = 0; j < count; ++j) codes[j] = code(x[j], random[j]);
      };
      // Buckets of whole groups: norm and codes in one pass over the gradient.
      const bool fused = bucket != 0 && bucket % detail::quant_group == 0 &&
                         detail::quant_fused_pack(policy, gradient, bucket, detail::quant_stat::l2,
                                                  b + 1, stream, norms_.data(), words_.data(),
                                                  code_bucket);
      if (!fused) {
        detail::quant_bucket_stats(policy, gradient, bucket, detail::quant_stat::l2, norms_,
                                   where);  // throws before the message is touched
        const T* g = gradient.data();
        const T* norms = norms_.data();
        detail::quant_pack(policy, n, b + 1, stream, words_.data(),
                           [=](std::size_t first, std::size_t count, const std::uint32_t* random,
                               std::uint32_t* codes) {
                             detail::split_by_bucket(first, count, bucket, [&](std::size_t j0,
                                                                               std::size_t j1,
                                                                               std::size_t k) {
                               code_bucket(g + first + j0, random + j0, codes + j0, j1 - j0, norms[k]);
                             });
                           });
      }
    }
    message.dimension = n;
    message.bits = static_cast<std::uint8_t>(b + 1);
    message.bucket = bucket;
    message.scales.assign(norms_.begin(), norms_.end());
    message.words.swap(words_);
  }

  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<T> out, T scale) const {
    constexpr std::string_view where = "gcomp::qsgd::decompress_add";
    const std::size_t n = out.size();
    const std::size_t bucket = options_.bucket;
    detail::check_quant_message(where, message, n, bits(), bucket,
                                bucket == 0 ? 1 : quantized::bucket_count(n, bucket));
    // Every code is valid: a level is at most 2^b - 1 = s.
    const unsigned b = level_bits_;
    const detail::qsgd_decoder<T> decoder{static_cast<T>(options_.levels), b};
    if constexpr (!host_policy<Policy>) {
      detail::quant_device_decompress_add(policy, message, out, scale, bucket, b + 1, decoder,
                                          device_, where);
    } else {
      const T* norms = message.scales.data();
      T* o = out.data();
      detail::quant_unpack(policy, n, b + 1, message.words.data(),
                           [=](std::size_t first, std::size_t count, const std::uint32_t* codes) {
                             detail::split_by_bucket(first, count, bucket, [&](std::size_t j0,
                                                                               std::size_t j1,
                                                                               std::size_t k) {
                               const detail::qsgd_bucket_decoder<T> add = decoder.for_scale(norms[k], scale);
                               T* at = o + first;
                               for (std::size_t j = j0; j < j1; ++j) at[j] = add(at[j], codes[j]);
                             });
                           });
    }
  }

  std::size_t wire_bytes(const payload& message) const { return encoded_size(message); }

  /// Exactly 8 * encoded_size / n for an n-element input.
  double bits_per_element(std::size_t n) const {
    if (n == 0) return 0.0;
    const std::size_t scales =
        options_.bucket == 0 ? 1 : quantized::bucket_count(n, options_.bucket);
    const std::size_t bytes =
        wire::header_bytes + 1 + 8 + 8 + scales * sizeof(T) + wire::packed_bytes(n, bits());
    return 8.0 * static_cast<double>(bytes) / static_cast<double>(n);
  }

  const qsgd_options& options() const { return options_; }

 private:
  qsgd_options options_;
  unsigned level_bits_ = 0;
  std::vector<T> norms_;               // scratch: the norms before they are known to be finite
  std::vector<std::uint64_t> words_;   // scratch, swapped with the message's words
  // Device scratch under cuda_par / thrust_device, sized at the first device
  // call; decompress_add uses it too, hence mutable: one object must not
  // decompress on two threads at once under a device policy.
  mutable detail::quant_device_buffers<T> device_;
};

}  // namespace gcomp
