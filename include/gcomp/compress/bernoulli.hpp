// Bernoulli sparsification: keep each g_i with probability p_i and scale it by 1/p_i (the unbiased random sparsifier of Khirirat, Feyzmahdavian, Johansson 2018; Wangni et al., NeurIPS 2018).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <string>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/compress/detail/random_sampling.hpp"
#include "gcomp/compress/detail/sparse_device.hpp"
#include "gcomp/compress/detail/topk_sparse.hpp"
#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/core/sparse_payload.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp {

namespace detail {

/// The Bernoulli sparsifier's coin of flat index offset + i: a functor, so
/// select_if can run it on the device (a namespace-scope type: nvcc rejects
/// private types as kernel template arguments).
struct bernoulli_coin {
  rng_key stream;
  std::size_t offset;
  float p;
  GCOMP_HD bool operator()(std::size_t i) const { return bernoulli(stream, offset + i, p); }
};

}  // namespace detail

/// C(g)_i = g_i / q_i with probability q_i, else 0, independently per
/// coordinate: unbiased, E||C(g)||^2 = sum g_i^2 / q_i <= alpha ||g||^2 with
/// alpha = max 1 / q_i. The probability is uniform, or one per layer of a
/// layout (elements in gaps between layers are never kept).
///
/// q_i is the probability that is really used: a p given as a float is
/// compared with uniform(key, i), which lies on the 2^-24 grid, so the keep
/// probability is ceil(p 2^24) / 2^24; the scale is its inverse, which keeps
/// the compressor exactly unbiased (p itself may be off by up to 2^-24).
///
/// The number of kept elements is random (Binomial for a uniform p), so the
/// payload is a sparse_payload of varying length. key_use::shared draws the
/// coins from key.shared(): every worker keeps the same set, the payloads
/// line up and all-reduce.
template <class T = float, key_use Key = key_use::per_worker, class Index = std::uint32_t>
class bernoulli_sparsifier {
 public:
  using value_type = T;
  using index_type = Index;
  using payload = sparse_payload<T, Index>;
  static constexpr bool unbiased = true;
  static constexpr bool shared_support = Key == key_use::shared;

  /// The same keep probability p in (0, 1] for every element.
  explicit bernoulli_sparsifier(double p) {
    probabilities_.push_back(checked("gcomp::bernoulli_sparsifier", "p", p));
  }

  /// Keep probability p[d] in (0, 1] for the elements of layer d.
  bernoulli_sparsifier(layout lay, std::span<const double> p) : layout_(std::move(lay)), per_layer_(true) {
    constexpr std::string_view where = "gcomp::bernoulli_sparsifier";
    check_same_size(where, "p", p.size(), "layout layers", layout_.num_layers());
    for (std::size_t d = 0; d < p.size(); ++d)
      probabilities_.push_back(checked(where, "p[" + std::to_string(d) + "]", p[d]));
    order_.resize(layout_.num_layers());
    std::iota(order_.begin(), order_.end(), std::size_t{0});
    std::sort(order_.begin(), order_.end(),
              [&](std::size_t a, std::size_t b) { return layout_[a].offset < layout_[b].offset; });
    counts_.resize(layout_.num_layers());
  }

  /// The keep probability really used for layer d (or for all, d = 0 when uniform).
  double keep_probability(std::size_t d = 0) const {
    return static_cast<double>(effective(probabilities_.at(d)));
  }

  /// alpha = max 1 / q_i: E||C(x)||^2 <= alpha ||x||^2.
  double alpha() const {
    double worst = 1.0;
    for (float p : probabilities_) worst = std::max(worst, 1.0 / effective(p));
    return worst;
  }

  /// Expected number of kept elements of an n-element gradient.
  double expected_kept(std::size_t n) const {
    if (!per_layer_) return effective(probabilities_[0]) * static_cast<double>(n);
    layout_.check_buffer("gcomp::bernoulli_sparsifier::expected_kept", "gradient", n);
    double total = 0.0;
    for (std::size_t d = 0; d < layout_.num_layers(); ++d)
      total += effective(probabilities_[d]) * static_cast<double>(layout_[d].size);
    return total;
  }

  template <class Policy>
  void compress(const Policy& policy, std::span<const T> gradient, payload& message, rng_key key) {
    constexpr std::string_view where = "gcomp::bernoulli_sparsifier::compress";
    const std::size_t n = gradient.size();
    detail::check_index_range<Index>(where, n);
    if (per_layer_) layout_.check_buffer(where, "gradient", n);
    const rng_key stream = (Key == key_use::shared ? key.shared() : key).fork(detail::bernoulli_tag);
    if constexpr (!host_policy<Policy>) {
      compress_on_device(policy, gradient, message, stream, where);
    } else {
      compress_on_host(policy, gradient, message, stream);
    }
  }

  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<T> out, T scale) const {
    constexpr std::string_view where = "gcomp::bernoulli_sparsifier::decompress_add";
    detail::check_sparse_addend(where, message, out.size());
    if (per_layer_) layout_.check_buffer(where, "out", out.size());
    detail::sparse_scatter_add(policy, message, out, scale, device_, where);
  }

  std::size_t wire_bytes(const payload& message) const { return encoded_size(message); }

  /// Expected bits per element (the kept count is random).
  double bits_per_element(std::size_t n) const {
    if (n == 0) return 0.0;
    const double bytes = static_cast<double>(wire::header_bytes + 8) +
                         expected_kept(n) * static_cast<double>(sizeof(Index) + sizeof(T));
    return 8.0 * bytes / static_cast<double>(n);
  }

 private:
  template <class Policy>
  void compress_on_host(const Policy& policy, std::span<const T> gradient, payload& message,
                        const rng_key& stream) {
    const std::size_t n = gradient.size();
    message.dimension = n;
    message.indices.resize(n);  // room for every index; the capacity stays after the first step
    std::size_t kept = 0;
    if (!per_layer_) {
      kept = select(policy, stream, message, 0, 0, n, probabilities_[0]);
    } else {
      for (std::size_t d : order_) {
        counts_[d] = select(policy, stream, message, kept, layout_[d].offset, layout_[d].size,
                            probabilities_[d]);
        kept += counts_[d];
      }
    }
    message.indices.resize(kept);
    message.data.resize(kept);
    // Values after the indices: data may only grow once `kept` is known.
    std::size_t at = 0;
    auto gather = [&](std::size_t count, float p) {
      const T s = static_cast<T>(1.0 / effective(p));
      const Index* idx = message.indices.data() + at;
      T* v = message.data.data() + at;
      const T* g = gradient.data();
      for_each_index(policy, count, [=](std::size_t j) { v[j] = g[idx[j]] * s; });
      at += count;
    };
    if (!per_layer_) {
      gather(kept, probabilities_[0]);
    } else {
      for (std::size_t d : order_) gather(counts_[d], probabilities_[d]);
    }
  }

  // The same coins (bernoulli(stream, flat index, p)) drawn by the policy's
  // select_if into device scratch, the values gathered there, then both
  // copied into the host message.
  template <class Policy>
  void compress_on_device(const Policy& policy, std::span<const T> gradient, payload& message,
                          const rng_key& stream, std::string_view where) {
    const std::size_t n = gradient.size();
    device_.indices.resize(policy, n, where);
    Index* idx = device_.indices.data();
    auto select_on_device = [&](std::size_t at, std::size_t offset, std::size_t size, float p) {
      const std::size_t count = select_if(policy, size, detail::bernoulli_coin{stream, offset, p},
                                          std::span<Index>(idx + at, n - at));
      if (offset != 0 && count != 0)
        for_each_index(policy, count, detail::shift_entry<Index>{idx + at, static_cast<Index>(offset)});
      return count;
    };
    std::size_t kept = 0;
    if (!per_layer_) {
      kept = select_on_device(0, 0, n, probabilities_[0]);
    } else {
      for (std::size_t d : order_) {
        counts_[d] = select_on_device(kept, layout_[d].offset, layout_[d].size, probabilities_[d]);
        kept += counts_[d];
      }
    }
    device_.values.resize(policy, kept, where);
    std::size_t at = 0;
    auto gather = [&](std::size_t count, float p) {
      const T s = static_cast<T>(1.0 / effective(p));
      if (count != 0)
        for_each_index(policy, count,
                       detail::gather_entry<T, Index, true>{gradient.data(), idx + at, device_.values.data() + at, s});
      at += count;
    };
    if (!per_layer_) {
      gather(kept, probabilities_[0]);
    } else {
      for (std::size_t d : order_) gather(counts_[d], probabilities_[d]);
    }
    message.dimension = n;
    message.indices.resize(kept);
    message.data.resize(kept);
    copy_to_host(policy, std::span<const Index>(idx, kept), std::span<Index>(message.indices));
    copy_to_host(policy, std::span<const T>(device_.values.data(), kept), std::span<T>(message.data));
  }

  static float checked(std::string_view where, std::string_view name, double p) {
    if (!(p > 0.0 && p <= 1.0)) fail(where, name, " must be in (0, 1], got ", p);
    const float f = static_cast<float>(p);
    if (!(f > 0.0f)) fail(where, name, " = ", p, " rounds to 0 as a float");
    return f;
  }

  // P(uniform(key, i) < p) on the 2^-24 grid.
  static double effective(float p) {
    return std::min(1.0, std::ceil(static_cast<double>(p) * 0x1p24) * 0x1p-24);
  }

  // Coins for elements [offset, offset + size) (counter = flat index, so a
  // layer's coins do not depend on the layout's order); writes the kept flat
  // indices at message position `at` and returns how many.
  template <class Policy>
  static std::size_t select(const Policy& policy, const rng_key& stream, payload& message,
                            std::size_t at, std::size_t offset, std::size_t size,
                            float p) {
    std::span<Index> out(message.indices.data() + at, message.indices.size() - at);
    const std::size_t count = select_if(
        policy, size, [=](std::size_t i) { return bernoulli(stream, offset + i, p); }, out);
    const Index shift = static_cast<Index>(offset);
    Index* idx = out.data();
    for_each_index(policy, count, [=](std::size_t j) { idx[j] += shift; });
    return count;
  }

  layout layout_;
  bool per_layer_ = false;
  std::vector<float> probabilities_;  // one, or one per layer
  std::vector<std::size_t> order_;    // layers by offset
  std::vector<std::size_t> counts_;   // kept per layer in the last compress()
  // Device scratch (cuda_par, thrust_device): the selected indices and
  // gathered values, and decompress_add's upload.
  mutable detail::sparse_device_buffers<T, Index> device_;
};

}  // namespace gcomp
