// Grid rounding: every element to the nearest point of spacing * Z, the deterministic epsilon-compressor of Khirirat, Feyzmahdavian, Johansson ("Distributed learning with compressed gradients", arXiv:1806.06573, 2018).
#pragma once

#include <algorithm>
#include <atomic>
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

/// round(x), halves away from zero, on both sides (an exact operation).
GCOMP_HD inline double grid_round_half_away(double x) {
#if defined(__CUDA_ARCH__)
  return ::round(x);
#else
  return std::round(x);
#endif
}

/// grid_round's code of one value under a device policy: the level
/// round(v / Delta) as b-bit two's complement (device functors of
/// quant_device.hpp; validity is checked by grid_valid before packing).
template <class T>
struct grid_bucket_coder {
  double spacing;
  std::uint32_t mask;
  GCOMP_HD std::uint32_t operator()(T v, std::uint32_t) const {
    const double level = grid_round_half_away(static_cast<double>(v) / spacing);
    return static_cast<std::uint32_t>(static_cast<std::int32_t>(level)) & mask;
  }
};
template <class T>
struct grid_coder {
  grid_bucket_coder<T> code;
  GCOMP_HD grid_bucket_coder<T> for_scale(T) const { return code; }
};

/// Whether v's level lies in [lo, hi] (false for NaN and infinities).
template <class T>
struct grid_valid {
  double spacing, lo, hi;
  GCOMP_HD bool operator()(T v) const {
    const double level = grid_round_half_away(static_cast<double>(v) / spacing);
    return level >= lo && level <= hi;
  }
};

/// out + scale * T(level * Delta) for a b-bit two's-complement code (flip the
/// sign bit, then shift down), unfused; decompress_add calls it on both sides.
template <class T>
struct grid_bucket_decoder {
  double spacing;
  std::int32_t half;
  T scale;
  GCOMP_HD T operator()(T out, std::uint32_t code) const {
    const std::int32_t level = (static_cast<std::int32_t>(code) ^ half) - half;
    return add_unfused(out, mul_unfused(scale, static_cast<T>(mul_unfused(static_cast<double>(level), spacing))));
  }
};
template <class T>
struct grid_decoder {
  double spacing;
  std::int32_t half;
  GCOMP_HD grid_bucket_decoder<T> for_scale(T, T scale) const { return {spacing, half, scale}; }
};

}  // namespace detail

struct grid_round_options {
  double spacing = 0.0;  // Delta > 0, the grid step (rounded to T once, in the constructor)
  unsigned bits = 16;    // code width b in [2, 16]: grid points -2^(b-1) .. 2^(b-1) - 1 times Delta
};

/// Q(v)_i = Delta * round(v_i / Delta) (ties away from zero): deterministic and
/// biased, and ||Q(v) - v||_2 <= epsilon = Delta * sqrt(d) / 2 for a
/// d-element v, since every element moves by at most Delta / 2 (up to the
/// rounding of the decoded value Delta * n_i to T, relative 2^-24 for float).
/// It is the epsilon-compressor with which compressed gradient descent stalls
/// in a neighbourhood O(epsilon / mu) of the optimum (algo/stale_compressed.hpp).
///
/// The integer n_i travels as a b-bit two's-complement code in a
/// quantized_payload (bucket 0, one scale: Delta as T), so every code is a
/// valid grid point and the message is b / 32 of a dense float one. A value
/// whose n_i falls outside [-2^(b-1), 2^(b-1) - 1] cannot be sent without
/// breaking the epsilon bound, so compress rejects it (as it rejects NaN and
/// infinities) with gcomp::error naming the first such index, before the
/// payload is touched: choose b and Delta so that max |v_i| / Delta < 2^(b-1).
/// The key is ignored; the codes do not depend on the policy or thread count.
template <class T = float>
class grid_round {
 public:
  using value_type = T;
  using payload = quantized_payload<T>;
  static constexpr bool unbiased = false;
  static constexpr bool shared_support = false;

  explicit grid_round(grid_round_options options) : options_(options) {
    constexpr std::string_view where = "gcomp::grid_round";
    check_positive(where, "options.spacing", options.spacing);
    check_in_range(where, "options.bits", options.bits, 2u, 16u);
    spacing_ = static_cast<T>(options.spacing);
    // A spacing that underflows or overflows T would make every code meaningless.
    require(std::isnormal(spacing_), where, "options.spacing = ", options.spacing,
            " is not a normal number once rounded to the element type");
  }

  unsigned bits() const { return options_.bits; }
  /// Delta as the compressor uses it (options.spacing rounded to T).
  T spacing() const { return spacing_; }
  /// The largest |n_i| range: codes cover [-2^(b-1), 2^(b-1) - 1].
  std::int32_t lowest_level() const { return -(std::int32_t{1} << (options_.bits - 1)); }
  std::int32_t highest_level() const { return (std::int32_t{1} << (options_.bits - 1)) - 1; }

  /// epsilon = Delta * sqrt(n) / 2: ||Q(v) - v|| <= epsilon for an n-element v.
  double epsilon(std::size_t n) const {
    return static_cast<double>(spacing_) * std::sqrt(static_cast<double>(n)) / 2.0;
  }

  template <class Policy>
  void compress(const Policy& policy, std::span<const T> gradient, payload& message, rng_key) {
    constexpr std::string_view where = "gcomp::grid_round::compress";
    const std::size_t n = gradient.size();
    const unsigned b = options_.bits;
    const T* g = gradient.data();
    const double spacing = static_cast<double>(spacing_);
    const double lo = lowest_level(), hi = highest_level();
    const std::uint32_t mask = (std::uint32_t{1} << b) - 1;
    if constexpr (!host_policy<Policy>) {
      // Device memory: one min-index reduction finds the first value off the
      // code range, then one thread per word packs (quant_device.hpp).
      const std::size_t bad = detail::quant_device_compress_unscaled(
          policy, gradient, b, rng_key{}, detail::grid_coder<T>{{spacing, mask}},
          detail::grid_valid<T>{spacing, lo, hi}, device_, words_, where);
      if (bad != n) {
        T value{};
        copy_to_host(policy, std::span<const T>(g + bad, 1), std::span<T>(&value, 1));
        throw_off_grid(where, bad, static_cast<double>(value));
      }
    } else {
      detail::resize_words(words_, quantized::word_count(n, b));
      std::uint64_t* words = words_.data();
      std::atomic<bool> all_fit{true};
      const std::size_t groups = (n + detail::quant_group - 1) / detail::quant_group;
      detail::with_code_bits(b, [&](auto width) {
        constexpr unsigned Bits = decltype(width)::value;
        detail::quant_ranges(policy, groups, detail::quant_group, [&](std::size_t q0, std::size_t q1) {
          alignas(64) std::uint32_t codes[detail::quant_group];
          bool fit = true;
          for (std::size_t q = q0; q < q1; ++q) {
            const std::size_t first = q * detail::quant_group;
            const std::size_t count = std::min(detail::quant_group, n - first);
            for (std::size_t j = 0; j < count; ++j) {
              const double level = std::round(static_cast<double>(g[first + j]) / spacing);
              const bool ok = level >= lo && level <= hi;  // false for NaN and infinities
              fit = fit && ok;
              codes[j] = ok ? static_cast<std::uint32_t>(static_cast<std::int32_t>(level)) & mask : 0u;
            }
            detail::store_group<Bits>(q, count, n, codes, words);
          }
          if (!fit) all_fit.store(false, std::memory_order_relaxed);
        });
      });
      if (!all_fit.load()) {
        for (std::size_t i = 0; i < n; ++i) {
          const double v = static_cast<double>(g[i]);
          const double level = std::round(v / spacing);
          if (!std::isfinite(v) || !(level >= lo && level <= hi)) throw_off_grid(where, i, v);
        }
      }
    }
    message.dimension = n;
    message.bits = static_cast<std::uint8_t>(b);
    message.bucket = 0;
    message.scales.assign(1, spacing_);
    message.words.swap(words_);
  }

  /// out += scale * Q(v). The message must carry this compressor's width and
  /// spacing: a grid of another spacing decodes to other values.
  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<T> out, T scale) const {
    constexpr std::string_view where = "gcomp::grid_round::decompress_add";
    const std::size_t n = out.size();
    const unsigned b = options_.bits;
    detail::check_quant_message(where, message, n, b, 0, 1);
    if (message.scales[0] != spacing_)
      fail(where, "message.scales[0] = ", message.scales[0], " but this compressor's spacing is ",
           spacing_);
    const double spacing = static_cast<double>(spacing_);
    const std::int32_t half = std::int32_t{1} << (b - 1);
    const detail::grid_decoder<T> decoder{spacing, half};
    if constexpr (!host_policy<Policy>) {
      detail::quant_device_decompress_add(policy, message, out, scale, 0, b, decoder, device_, where);
    } else {
      T* o = out.data();
      const auto add = decoder.for_scale(spacing_, scale);
      detail::quant_unpack(policy, n, b, message.words.data(),
                           [=](std::size_t first, std::size_t count, const std::uint32_t* codes) {
                             for (std::size_t j = 0; j < count; ++j) o[first + j] = add(o[first + j], codes[j]);
                           });
    }
  }

  std::size_t wire_bytes(const payload& message) const { return encoded_size(message); }

  /// Exactly 8 * encoded_size / n: header, bits, bucket, scale count, one scale, the codes.
  double bits_per_element(std::size_t n) const {
    if (n == 0) return 0.0;
    const std::size_t bytes =
        wire::header_bytes + 1 + 8 + 8 + sizeof(T) + wire::packed_bytes(n, options_.bits);
    return 8.0 * static_cast<double>(bytes) / static_cast<double>(n);
  }

  const grid_round_options& options() const { return options_; }

 private:
  [[noreturn]] void throw_off_grid(std::string_view where, std::size_t i, double v) const {
    if (!std::isfinite(v)) detail::fail_not_finite(where, i, v);
    const double level = std::round(v / static_cast<double>(spacing_));
    fail(where, "gradient[", i, "] = ", v, " rounds to grid level ", level, ", outside the ",
         options_.bits, "-bit code range [", static_cast<double>(lowest_level()), ", ",
         static_cast<double>(highest_level()), "] of spacing ", static_cast<double>(spacing_));
  }

  grid_round_options options_;
  T spacing_ = T(0);
  std::vector<std::uint64_t> words_;  // scratch, swapped with the message's words
  // Device scratch under cuda_par / thrust_device (quant_device.hpp);
  // decompress_add uploads the message there.
  mutable detail::quant_device_buffers<T> device_;
};

}  // namespace gcomp
