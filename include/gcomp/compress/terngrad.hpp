// TernGrad (Wen, Xu, Yan, Wu, Wang, Chen, Li, "TernGrad: Ternary Gradients to Reduce Communication in Distributed Deep Learning", NeurIPS 2017): stochastic ternarization {-s, 0, +s} with s the bucket's max |g|.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
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

/// TernGrad's code of one element of a bucket with scale st = max |g|: keep
/// (u < |v| / st) gives sign(v) (1 for +, 2 for -), else 0. Branch-free; for
/// st = 0 (all zeros) p is NaN and nothing is kept. The host loop and the
/// device kernel both call it.
template <class T>
struct terngrad_bucket_coder {
  T st;
  GCOMP_HD std::uint32_t operator()(T v, std::uint32_t random) const {
    // |v| <= st, so p <= 1, and p == 1 exactly when |v| == st.
    const T p = magnitude(v) / st;
    const std::uint32_t keep = unit_from_bits<T>(random) < p ? 1u : 0u;
    return keep + (keep & (v < T(0) ? 1u : 0u));
  }
};

template <class T>
struct terngrad_coder {
  GCOMP_HD terngrad_bucket_coder<T> for_scale(T st) const { return {st}; }
};

/// out + (0, +v or -v for codes 0, 1, 2), v = scale * st.
template <class T>
struct terngrad_bucket_decoder {
  T v;
  GCOMP_HD T operator()(T out, std::uint32_t code) const {
    return add_unfused(out, code == 0 ? T(0) : (code == 1 ? v : -v));
  }
};

template <class T>
struct terngrad_decoder {
  GCOMP_HD terngrad_bucket_decoder<T> for_scale(T st, T scale) const {
    return {mul_unfused(scale, st)};
  }
};

}  // namespace detail

struct terngrad_options {
  std::size_t bucket = 512;  // elements per scale; 0: one scale over the whole buffer
};

/// Per bucket of d elements with s_t = max |g_i| over the bucket, element i is
/// sent as the ternary b_i in {-1, 0, +1}:
///   b_i = sign(g_i) with probability |g_i| / s_t, else 0,
/// and decodes to s_t * b_i. Hence E[C(g)] = g, and per bucket
///   E||C(g)||^2 = s_t ||g||_1 <= ||g||_inf sqrt(d) ||g||_2 <= sqrt(d) ||g||_2^2,
/// so alpha = sqrt(d) (d = the largest bucket, min(bucket, n), or n with
/// bucket == 0); the per-coordinate variance is s_t |g_i| - g_i^2.
/// Codes are 2 bits: 0 -> 0, 1 -> +1, 2 -> -1 (3 is invalid); one T scale
/// per bucket (exactly max |g_i|). The decision for element i is
/// uniform(key.fork(terngrad_tag), i) < |g_i| / s_t, so the payload is the
/// same for every policy and thread count. Non-finite gradients are rejected
/// (gcomp::error naming the first index) before anything is written.
template <class T = float>
class terngrad {
 public:
  using value_type = T;
  using payload = quantized_payload<T>;
  static constexpr bool unbiased = true;
  static constexpr bool shared_support = false;
  static constexpr unsigned code_bits = 2;

  terngrad() : terngrad(terngrad_options{}) {}
  explicit terngrad(terngrad_options options) : options_(options) {}

  unsigned bits() const { return code_bits; }

  /// alpha = sqrt(d), d = min(bucket, n) (n with bucket == 0).
  double alpha(std::size_t n) const {
    const std::size_t d = options_.bucket == 0 ? n : std::min(options_.bucket, n);
    return std::max(1.0, std::sqrt(static_cast<double>(d)));
  }

  template <class Policy>
  void compress(const Policy& policy, std::span<const T> gradient, payload& message, rng_key key) {
    constexpr std::string_view where = "gcomp::terngrad::compress";
    const std::size_t n = gradient.size();
    const std::size_t bucket = options_.bucket;
    const rng_key stream = key.fork(detail::terngrad_tag);
    if constexpr (!host_policy<Policy>) {
      // Scales and words computed on the device, then brought to scratch.
      detail::quant_device_compress(policy, gradient, bucket, detail::quant_stat::max_abs,
                                    code_bits, stream, detail::terngrad_coder<T>{}, device_,
                                    scales_, words_, where);
    } else {
      // Scales and codes go to scratch; the message is touched once all is well.
      detail::resize_words(words_, quantized::word_count(n, code_bits));
      scales_.resize(bucket == 0 ? 1 : quantized::bucket_count(n, bucket));
      // Buckets of whole groups: max |g| and codes in one pass over the gradient.
      const bool fused = bucket != 0 && bucket % detail::quant_group == 0 &&
                         detail::quant_fused_pack(policy, gradient, bucket,
                                                  detail::quant_stat::max_abs, code_bits, stream,
                                                  scales_.data(), words_.data(), &code_ternary);
      if (!fused) {
        detail::quant_bucket_stats(policy, gradient, bucket, detail::quant_stat::max_abs, scales_,
                                   where);  // throws before the message is touched
        const T* g = gradient.data();
        const T* scales = scales_.data();
        detail::quant_pack(policy, n, code_bits, stream, words_.data(),
                           [=](std::size_t first, std::size_t count, const std::uint32_t* random,
                               std::uint32_t* codes) {
                             detail::split_by_bucket(first, count, bucket, [&](std::size_t j0,
                                                                               std::size_t j1,
                                                                               std::size_t k) {
                               code_ternary(g + first + j0, random + j0, codes + j0, j1 - j0,
                                            scales[k]);
                             });
                           });
      }
    }
    message.dimension = n;
    message.bits = static_cast<std::uint8_t>(code_bits);
    message.bucket = bucket;
    message.scales.assign(scales_.begin(), scales_.end());
    message.words.swap(words_);
  }

  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<T> out, T scale) const {
    constexpr std::string_view where = "gcomp::terngrad::decompress_add";
    const std::size_t n = out.size();
    const std::size_t bucket = options_.bucket;
    detail::check_quant_message(where, message, n, code_bits, bucket,
                                bucket == 0 ? 1 : quantized::bucket_count(n, bucket));
    // Code 3 has both bits set: one and/shift per word finds it (bits past
    // the last code are ignored), and only then is the element searched.
    // The message is host memory whatever the policy: under a device policy
    // the check runs on the host before anything is uploaded.
    const auto check = [&](const auto& host) {
      const std::uint64_t* words = message.words.data();
      const std::size_t n_words = message.words.size();
      const std::uint32_t any_bad = transform_reduce(
          host, n_words, std::uint32_t(0), [](std::uint32_t a, std::uint32_t b) { return a | b; },
          [=](std::size_t w) -> std::uint32_t {
            std::uint64_t both = words[w] & (words[w] >> 1) & 0x5555555555555555ull;
            const std::size_t valid_bits = std::min<std::size_t>(64, 2 * n - 64 * w);
            if (valid_bits < 64) both &= (std::uint64_t{1} << valid_bits) - 1;
            return both != 0 ? 1u : 0u;
          });
      if (any_bad != 0) {
        const std::size_t bad = detail::quant_first_invalid(
            host, n, code_bits, words, [](std::uint32_t c) { return c == 3u; });
        if (bad != n) fail(where, "code ", bad, " is 3, which is no ternary value");
      }
    };
    const detail::terngrad_decoder<T> decoder;
    if constexpr (!host_policy<Policy>) {
      check(host_seq{});
      detail::quant_device_decompress_add(policy, message, out, scale, bucket, code_bits, decoder,
                                          device_, where);
    } else {
      check(policy);
      const T* scales = message.scales.data();
      T* o = out.data();
      detail::quant_unpack(policy, n, code_bits, message.words.data(),
                           [=](std::size_t first, std::size_t count, const std::uint32_t* codes) {
                             detail::split_by_bucket(first, count, bucket, [&](std::size_t j0,
                                                                               std::size_t j1,
                                                                               std::size_t k) {
                               const detail::terngrad_bucket_decoder<T> add =
                                   decoder.for_scale(scales[k], scale);
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
        wire::header_bytes + 1 + 8 + 8 + scales * sizeof(T) + wire::packed_bytes(n, code_bits);
    return 8.0 * static_cast<double>(bytes) / static_cast<double>(n);
  }

  const terngrad_options& options() const { return options_; }

 private:
  terngrad_options options_;
  std::vector<T> scales_;             // scratch: the scales before they are known to be finite
  std::vector<std::uint64_t> words_;  // scratch, swapped with the message's words
  // Device scratch under cuda_par / thrust_device (see qsgd): mutable, since
  // decompress_add uploads the message there.
  mutable detail::quant_device_buffers<T> device_;

  /// The codes of count elements x[j] of a bucket with scale st = max |g|.
  static void code_ternary(const T* x, const std::uint32_t* random, std::uint32_t* codes,
                           std::size_t count, T st) {
    if (!(st > T(0))) {
      for (std::size_t j = 0; j < count; ++j) codes[j] = 0;
      return;
    }
    const detail::terngrad_bucket_coder<T> code{st};
    for (std::size_t j = 0; j < count; ++j) codes[j] = code(x[j], random[j]);
  }
};

}  // namespace gcomp
