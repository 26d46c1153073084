// Threshold sparsifiers: a fixed hard threshold, and the sampled-threshold top-k of Deep Gradient Compression (Lin et al., ICLR 2018) with an exact correction.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

#include "gcomp/compress/detail/count.hpp"
#include "gcomp/compress/detail/select.hpp"
#include "gcomp/compress/detail/sparse_device.hpp"
#include "gcomp/compress/detail/topk_sparse.hpp"
#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/nonfinite.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/core/sparse_payload.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/detail/unfused.hpp"
#include "gcomp/exec/host.hpp"
#include "gcomp/exec/policy.hpp"

// Under nvcc the GPU top-k comes with the header (as in topk.hpp), so
// sampled_topk::compress takes cuda_par without another include.
#if defined(__CUDACC__)
#include "gcomp/compress/detail/topk_cuda.cuh"
#endif

namespace gcomp {

namespace detail {

/// |g[i]| >= tau (device select_if predicate; for finite g it is the host's
/// key(g) >= key(tau)).
template <class T>
struct magnitude_at_least {
  const T* g;
  T tau;
  GCOMP_HD bool operator()(std::size_t i) const { return magnitude(g[i]) >= tau; }
};

inline void check_threshold_index_range(std::string_view where, std::size_t n) {
  // One selection handles up to 2^32 elements (detail/select.hpp).
  if (static_cast<std::uint64_t>(n) > (std::uint64_t{1} << 32))
    fail(where, "gradient size ", n, " exceeds the 2^32 elements a threshold selection handles");
}

template <class Index>
void check_threshold_index_type(std::string_view where, std::size_t n) {
  if (n != 0 && static_cast<std::uint64_t>(n) - 1 > std::numeric_limits<Index>::max())
    fail(where, "gradient size ", n, " does not fit ", sizeof(Index),
         "-byte indices; use std::uint64_t indices");
  check_threshold_index_range(where, n);
}

/// The selections' finiteness rule on device memory: one min-index pass, then
/// the host's error naming the first non-finite element and its value.
template <class Policy, class T>
void reject_nonfinite_on_device(const Policy& policy, std::span<const T> gradient, std::string_view where) {
  const std::size_t bad = first_nonfinite(policy, gradient);
  if (bad == gradient.size()) return;
  T value{};
  copy_to_host(policy, gradient.subspan(bad, 1), std::span<T>(&value, 1));
  fail_selection_nonfinite(where, bad, value);
}

inline constexpr std::uint64_t sampled_topk_tag = 0x44474354u;  // "DGCT": the sample's sub-stream

/// The j-th sampled position of an n-element gradient: floor(u * n) with the
/// 32-bit u drawn at j from the sample's stream, within 2^-32 n of uniform,
/// plenty for an estimate. Both sides of sampled_topk draw through it.
GCOMP_HD inline std::uint64_t sampled_position(const rng_key& stream, std::size_t j, std::uint64_t n) {
  return (static_cast<std::uint64_t>(random_bits(stream, j)) * n) >> 32;
}

/// out[j] = g[sampled_position(j)]: the device sample (values, not keys).
template <class T>
struct sample_entry {
  const T* g;
  rng_key stream;
  std::uint64_t n;
  T* out;
  GCOMP_HD void operator()(std::size_t j) const { out[j] = g[sampled_position(stream, j, n)]; }
};

/// |v[i]|, and the smaller of two: the device threshold is the smallest
/// magnitude among the sample's largest.
template <class T>
struct magnitude_at {
  const T* v;
  GCOMP_HD T operator()(std::size_t i) const { return magnitude(v[i]); }
};
template <class T>
struct smaller_of {
  GCOMP_HD T operator()(T a, T b) const { return b < a ? b : a; }
};

}  // namespace detail

/// C(g) keeps every element with |g_i| >= tau (a fixed tau > 0) and zeroes
/// the rest: the kept count depends on the data. Biased; it is the
/// epsilon-compressor ||C(g) - g||_inf < tau of Khirirat et al.
/// Non-finite gradients are rejected (gcomp::error naming the first index,
/// payload unchanged). One pass over g, parallel under host_par; the result
/// does not depend on the thread count.
template <class T = float, class Index = std::uint32_t>
class hard_threshold {
 public:
  using value_type = T;
  using index_type = Index;
  using payload = sparse_payload<T, Index>;
  static constexpr bool unbiased = false;
  static constexpr bool shared_support = false;

  explicit hard_threshold(T tau) : tau_(tau) {
    check_positive("gcomp::hard_threshold", "tau", tau);
  }

  /// Under a device policy (cuda_par, thrust_device) the gradient is device
  /// memory: a min-index reduction finds the first non-finite element (the
  /// host's error), the policy's select_if keeps |g_i| >= tau in index order,
  /// and the values are gathered there; the message is the host's, bit for bit.
  template <class Policy>
  void compress(const Policy& policy, std::span<const T> gradient, payload& message, rng_key key) {
    if constexpr (host_policy<Policy>)
      compress_host(policy, gradient, message, key);
    else
      compress_on_device(policy, gradient, message);
  }

  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<T> out, T scale) const {
    detail::checked_scatter_add(policy, "gcomp::hard_threshold::decompress_add", message, out, scale, device_);
  }

  std::size_t wire_bytes(const payload& message) const { return encoded_size(message); }

  /// The kept count depends on the data, so this reports the kept fraction of
  /// the last compressed gradient (0 before the first): header bits / n +
  /// fraction * (index + value bits).
  double bits_per_element(std::size_t n) const {
    if (n == 0) return 0.0;
    return 8.0 * static_cast<double>(wire::header_bytes + 8) / static_cast<double>(n) +
           last_fraction_ * 8.0 * static_cast<double>(sizeof(Index) + sizeof(T));
  }

  T tau() const { return tau_; }

 private:
  template <class Policy>
  void compress_on_device(const Policy& policy, std::span<const T> gradient, payload& message) {
    constexpr std::string_view where = "gcomp::hard_threshold::compress";
    const std::size_t n = gradient.size();
    detail::check_threshold_index_type<Index>(where, n);
    detail::reject_nonfinite_on_device(policy, gradient, where);
    device_.indices.resize(policy, n, where);
    Index* idx = device_.indices.data();
    const std::size_t count =
        select_if(policy, n, detail::magnitude_at_least<T>{gradient.data(), tau_}, std::span<Index>(idx, n));
    device_.values.resize(policy, count, where);
    if (count != 0)
      for_each_index(policy, count,
                     detail::gather_entry<T, Index, false>{gradient.data(), idx, device_.values.data(), T(1)});
    detail::copy_sparse_to_message(policy, message, n, count, idx, device_.values.data());
    last_fraction_ = n == 0 ? 0.0 : static_cast<double>(count) / static_cast<double>(n);
  }

  template <class Policy>
  void compress_host(const Policy& policy, std::span<const T> gradient, payload& message, rng_key) {
    constexpr std::string_view where = "gcomp::hard_threshold::compress";
    const std::size_t n = gradient.size();
    detail::check_threshold_index_type<Index>(where, n);
    bool overflow = false;
    // For finite g and tau > 0, |g| >= tau exactly when key(g) >= key(tau).
    const std::size_t count = selector_.gather_at_least(
        policy, gradient, detail::magnitude_bits<T>::key(tau_), 0, 0, where, overflow);
    message.dimension = n;
    message.indices.resize(count);
    message.data.resize(count);
    selector_.emit_gathered(policy, 0, message.indices.data(), message.data.data());
    last_fraction_ = n == 0 ? 0.0 : static_cast<double>(count) / static_cast<double>(n);
  }

  T tau_;
  // Device scratch: compress's selection and values, decompress_add's upload.
  mutable detail::sparse_device_buffers<T, Index> device_;
  double last_fraction_ = 0.0;
  detail::magnitude_selector<T> selector_;
};

/// Options of sampled_topk. Exactly one of k and ratio is set, as for top-k.
struct sampled_topk_options {
  std::size_t k = 0;            // elements kept (k > n throws)
  double ratio = 0.0;           // or a fraction, rounded to nearest, at least 1
  double sample_ratio = 0.01;   // fraction of g sampled to estimate the threshold (DGC: 0.1% to 1%)
  std::size_t min_sample = 1024;  // but at least this many samples (all of g if it is smaller)
  double tolerance = 0.25;      // a count in [k, floor((1 + tolerance) k)] is accepted as it is
};

/// Deep Gradient Compression's top-k by a sampled threshold: the k-th
/// largest magnitude is estimated from a random sample of g (drawn from the
/// key, so it is reproducible and thread-count independent), and every
/// element at or above the estimate is kept. DGC corrects a bad estimate;
/// so does this, exactly:
///  - count in [k, floor((1 + tolerance) k)]: kept as it is (accepted);
///  - more: the exact top-k of the selected elements, which is the exact
///    top-k of g (trimmed);
///  - fewer than k (or the gathered set grew past 4 (1 + tolerance) k + 4096):
///    an exact top-k of g (exact).
/// Guarantee: the kept count is always in [k, floor((1 + tolerance) k)], and
/// the kept set always contains the exact top-k (ties to the lower index),
/// so the contraction bound of top-k with delta = k / n holds. The sample is
/// taken at sample rank (1 + tolerance / 2) k s / n so the estimate lands in
/// the middle of the accepted band; on N(0,1) data with s k / n ~ 100
/// about 80% of steps are accepted (tests/test_threshold_topk.cpp measures it).
/// Non-finite gradients are rejected (gcomp::error naming the first index,
/// payload unchanged).
template <class T = float, class Index = std::uint32_t>
class sampled_topk {
 public:
  using value_type = T;
  using index_type = Index;
  using payload = sparse_payload<T, Index>;
  static constexpr bool unbiased = false;
  static constexpr bool shared_support = false;

  /// How the last compress reached its result.
  enum class outcome { accepted, trimmed, exact };

  explicit sampled_topk(sampled_topk_options options) : options_(options) {
    constexpr std::string_view where = "gcomp::sampled_topk";
    detail::check_count_options(where, options.k, options.ratio);
    if (!(options.sample_ratio > 0.0 && options.sample_ratio <= 1.0))
      fail(where, "sample_ratio must be in (0, 1], got ", options.sample_ratio);
    check_positive(where, "min_sample", options.min_sample);
    check_non_negative(where, "tolerance", options.tolerance);
  }

  /// Elements top-k would keep of an n-element gradient: the lower end of
  /// the kept count (throws if k > n).
  std::size_t kept(std::size_t n) const {
    if (options_.k != 0) {
      if (options_.k > n) fail("gcomp::sampled_topk::kept", "k = ", options_.k, " exceeds the gradient size ", n);
      return options_.k;
    }
    if (n == 0) return 0;
    const double wanted = std::round(options_.ratio * static_cast<double>(n));
    return static_cast<std::size_t>(std::clamp(wanted, 1.0, static_cast<double>(n)));
  }

  /// The upper end of the kept count: floor((1 + tolerance) k), at most n.
  std::size_t max_kept(std::size_t n) const {
    const std::size_t k = kept(n);
    const auto upper = static_cast<std::size_t>(
        std::floor((1.0 + options_.tolerance) * static_cast<double>(k)));
    return std::min(n, std::max(k, upper));
  }

  /// Under a device policy the gradient is the policy's memory and the
  /// message the same host payload, bit for bit, with the same errors: one
  /// min-index pass rejects a non-finite gradient up front, the sample is
  /// drawn there and its threshold found by a top-k of the sample (on the GPU
  /// under cuda_par), select_if and a gather collect the elements at or
  /// above it, and the trimmed and exact paths run the device top-k
  /// (compress/detail/topk_cuda.cuh). Under thrust_device on Thrust's OpenMP
  /// system the two top-k steps run the host selection on that memory.
  /// Thrust's CUDA system has no device top-k: use cuda_par.
  /// last_threshold() is the host's; last_outcome() is accepted exactly when
  /// the host's is, but may say exact where the host says trimmed or the
  /// other way round (the host gives up its gather at about the cap, per
  /// chunk): both mean the exact top-k, the same message.
  template <class Policy>
  void compress(const Policy& policy, std::span<const T> gradient, payload& message, rng_key key) {
    if constexpr (host_policy<Policy>) {
      compress_host(policy, gradient, message, key);
    } else {
      static_assert(detail::device_topk<Policy>::value || policy_traits<Policy>::host_memory,
                    "gcomp::sampled_topk::compress: this policy has no device top-k (cuda_par has one; "
                    "thrust_device on Thrust's CUDA system does not: use cuda_par)");
      compress_on_device(policy, gradient, message, key);
    }
  }

  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<T> out, T scale) const {
    detail::checked_scatter_add(policy, "gcomp::sampled_topk::decompress_add", message, out, scale, device_);
  }

  std::size_t wire_bytes(const payload& message) const { return encoded_size(message); }

  /// Bits per element of the largest message: floor((1 + tolerance) k) pairs.
  double bits_per_element(std::size_t n) const {
    if (n == 0) return 0.0;
    const std::size_t bytes = wire::header_bytes + 8 + max_kept(n) * (sizeof(Index) + sizeof(T));
    return 8.0 * static_cast<double>(bytes) / static_cast<double>(n);
  }

  const sampled_topk_options& options() const { return options_; }
  /// How the last compress ended, and the threshold its sample gave.
  outcome last_outcome() const { return last_; }
  T last_threshold() const { return threshold_; }

 private:
  template <class Policy>
  void compress_host(const Policy& policy, std::span<const T> gradient, payload& message, rng_key key) {
    constexpr std::string_view where = "gcomp::sampled_topk::compress";
    using bits = detail::magnitude_bits<T>;
    const std::size_t n = gradient.size();
    detail::check_threshold_index_type<Index>(where, n);
    const std::size_t k = kept(n);
    const std::size_t upper = max_kept(n);
    const std::size_t s = sample_size(n);
    if (k == 0 || s == n) {  // nothing to estimate: select exactly
      exact(policy, gradient, message, k, where);
      return;
    }
    // Sample s magnitudes at positions drawn from the key.
    sample_.resize(s);
    const rng_key stream = key.fork(detail::sampled_topk_tag);
    const T* g = gradient.data();
    auto* out = sample_.data();
    for_each_index(policy, s, [=](std::size_t j) { out[j] = bits::key(g[detail::sampled_position(stream, j, n)]); });
    const std::size_t rank = sample_rank(k, s, n);
    std::nth_element(sample_.begin(), sample_.begin() + static_cast<std::ptrdiff_t>(rank), sample_.end(),
                     std::greater<typename bits::key_type>());
    threshold_ = std::bit_cast<T>(std::min(sample_[rank], bits::infinity));
    bool overflow = false;
    const std::size_t count =
        selector_.gather_at_least(policy, gradient, bits::key(threshold_), gather_cap(n, k), 0, where, overflow);
    if (overflow || count < k) {
      exact(policy, gradient, message, k, where);
      return;
    }
    if (count > upper) {
      detail::write_sparse_in_place(message, n, k, [&](Index* indices, T* values) {
        selector_.select_from_gathered(k, 0, indices, values);
      });
      last_ = outcome::trimmed;
      return;
    }
    detail::write_sparse_in_place(message, n, count, [&](Index* indices, T* values) {
      selector_.emit_gathered(policy, 0, indices, values);
    });
    last_ = outcome::accepted;
  }

  // Elements sampled from an n-element gradient: sample_ratio n rounded up,
  // at least min_sample, at most n.
  std::size_t sample_size(std::size_t n) const {
    const double wanted = std::ceil(options_.sample_ratio * static_cast<double>(n));
    return std::min(n, std::max(options_.min_sample, static_cast<std::size_t>(wanted)));
  }

  // The sample rank (0-based, largest first) whose magnitude is the
  // threshold: (1 + tolerance / 2) k s / n rounded up, in [1, s], less one.
  std::size_t sample_rank(std::size_t k, std::size_t s, std::size_t n) const {
    const double rank_wanted = std::ceil((1.0 + options_.tolerance / 2.0) * static_cast<double>(k) *
                                         static_cast<double>(s) / static_cast<double>(n));
    return std::min(s - 1, static_cast<std::size_t>(std::max(1.0, rank_wanted)) - 1);
  }

  // The gathered set's cap, so a useless estimate (e.g. all values equal)
  // costs bounded memory before the exact path takes over.
  std::size_t gather_cap(std::size_t n, std::size_t k) const {
    return std::min(n, static_cast<std::size_t>(4.0 * (1.0 + options_.tolerance) * static_cast<double>(k)) + 4096);
  }

  // The device path (see compress). Every step is a policy primitive or the
  // device top-k, so it allocates nothing after the first step of a size.
  template <class Policy>
  void compress_on_device(const Policy& policy, std::span<const T> gradient, payload& message, rng_key key) {
    constexpr std::string_view where = "gcomp::sampled_topk::compress";
    const std::size_t n = gradient.size();
    detail::check_threshold_index_type<Index>(where, n);
    const std::size_t k = kept(n);
    const std::size_t upper = max_kept(n);
    const std::size_t s = sample_size(n);
    // The host meets a non-finite element in its gather or selection and
    // names the first; here one min-index pass names it before anything
    // else, so every step below sees finite values.
    detail::reject_nonfinite_on_device(policy, gradient, where);
    if (k == 0 || s == n) {
      exact_on_device(policy, gradient, message, k, where);
      return;
    }
    // The sample's values; the threshold is the smallest magnitude among its
    // rank + 1 largest, which is the host's rank-th key.
    const std::size_t rank = sample_rank(k, s, n);
    device_sample_.resize(policy, s, where);
    for_each_index(policy, s,
                   detail::sample_entry<T>{gradient.data(), key.fork(detail::sampled_topk_tag), n,
                                           device_sample_.data()});
    device_pick_values_.resize(policy, std::max(rank + 1, k), where);
    device_pick_positions_.resize(policy, std::max(rank + 1, k), where);
    T* pick_values = device_pick_values_.data();
    Index* pick_positions = device_pick_positions_.data();
    exact_topk(policy, std::span<const T>(device_sample_.data(), s), rank + 1, pick_values, pick_positions, where);
    threshold_ = transform_reduce(policy, rank + 1, std::numeric_limits<T>::infinity(), detail::smaller_of<T>{},
                                  detail::magnitude_at<T>{pick_values});
    // Everything at or above it, in index order; past the cap (or short of k)
    // the exact top-k of g takes over, as on the host.
    device_.indices.resize(policy, n, where);
    Index* selected = device_.indices.data();
    const std::size_t count = select_if(policy, n, detail::magnitude_at_least<T>{gradient.data(), threshold_},
                                        std::span<Index>(selected, n));
    if (count < k || count > gather_cap(n, k)) {
      exact_on_device(policy, gradient, message, k, where);
      return;
    }
    device_.values.resize(policy, count, where);
    T* gathered = device_.values.data();
    for_each_index(policy, count, detail::gather_entry<T, Index, false>{gradient.data(), selected, gathered, T(1)});
    if (count > upper) {
      // The exact top-k of the gathered values (ties to the lower position,
      // which is the lower index) is the exact top-k of g: its positions
      // are mapped back to g's indices.
      exact_topk(policy, std::span<const T>(gathered, count), k, pick_values, pick_positions, where);
      device_indices_.resize(policy, k, where);
      for_each_index(policy, k,
                     detail::gather_entry<Index, Index, false>{selected, pick_positions, device_indices_.data(),
                                                               Index(1)});
      detail::copy_sparse_to_message(policy, message, n, k, device_indices_.data(), pick_values);
      last_ = outcome::trimmed;
      return;
    }
    detail::copy_sparse_to_message(policy, message, n, count, selected, gathered);
    last_ = outcome::accepted;
  }

  // The exact top-k of x (the policy's memory, finite) into values and
  // indices (the policy's memory, k entries, indices increasing): the device
  // selection where the policy has one, else the host selection on
  // host-readable memory.
  template <class Policy>
  void exact_topk(const Policy& policy, std::span<const T> x, std::size_t k, T* values, Index* indices,
                  std::string_view where) {
    if constexpr (detail::device_topk<Policy>::value)
      detail::device_topk<Policy>::select(policy, x, k, 0, device_scratch_, values, indices, where);
    else
      selector_.select_topk(host_seq{}, x, k, 0, indices, values, where);
  }

  template <class Policy>
  void exact_on_device(const Policy& policy, std::span<const T> gradient, payload& message, std::size_t k,
                       std::string_view where) {
    if (k != 0) {
      device_pick_values_.resize(policy, k, where);
      device_indices_.resize(policy, k, where);
      exact_topk(policy, gradient, k, device_pick_values_.data(), device_indices_.data(), where);
    }
    detail::copy_sparse_to_message(policy, message, gradient.size(), k, device_indices_.data(),
                                   device_pick_values_.data());
    last_ = outcome::exact;
  }

  template <class Policy>
  void exact(const Policy& policy, std::span<const T> gradient, payload& message, std::size_t k,
             std::string_view where) {
    detail::write_sparse_in_place(message, gradient.size(), k, [&](Index* indices, T* values) {
      selector_.select_topk(policy, gradient, k, 0, indices, values, where);
    });
    last_ = outcome::exact;
  }

  sampled_topk_options options_;
  detail::magnitude_selector<T> selector_;
  std::vector<typename detail::magnitude_bits<T>::key_type> sample_;
  T threshold_ = T(0);
  outcome last_ = outcome::exact;
  // Device scratch: the selected indices and gathered values (also
  // decompress_add's upload), the sample, the top-k picks and their indices,
  // and the GPU top-k's workspace. One object must not run two device steps
  // at once.
  mutable detail::sparse_device_buffers<T, Index> device_;
  policy_buffer<T> device_sample_;
  policy_buffer<T> device_pick_values_;
  policy_buffer<Index> device_pick_positions_;
  policy_buffer<Index> device_indices_;
  detail::opaque_scratch device_scratch_;
};

}  // namespace gcomp
