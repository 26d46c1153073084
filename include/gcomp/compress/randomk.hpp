// Random-k sparsification (Stich, Cordonnier, Jaggi, "Sparsified SGD with Memory", NeurIPS 2018): k uniformly drawn distinct coordinates, per worker or with a shared key.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/compress/detail/random_sampling.hpp"
#include "gcomp/compress/detail/sparse_device.hpp"
#include "gcomp/compress/detail/topk_sparse.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/core/sparse_payload.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp {

/// How many elements random-k keeps: exactly one of the two is set.
struct randomk_options {
  std::size_t k = 0;   // elements kept of the whole vector (not with a layout)
  double ratio = 0.0;  // fraction kept, rounded to nearest, at least 1 (per layer with a layout)
};

/// C(g) keeps k coordinates drawn uniformly without replacement and zeroes the
/// rest. With rescale::unbiased the kept values are multiplied by n / k, so
/// E[C(g)] = g and E||C(g)||^2 = (n / k) ||g||^2 (alpha = n / k in the notation
/// of Khirirat et al.); with rescale::none it is the contraction Stich et al.
/// pair with error feedback: E||C(g) - g||^2 = (1 - k / n) ||g||^2.
///
/// key_use::per_worker draws from the worker's own key (the paper's setting:
/// supports differ, so the payloads need an allgather); key_use::shared draws
/// from key.shared(), so every worker keeps the same indices and the values
/// can be summed by an all-reduce (shared_randomk below).
///
/// With a layout, each layer keeps round(ratio * size) of its own elements
/// (at least one) and is scaled by its own size / k; elements in gaps between
/// layers are never kept.
///
/// The payload is a sparse_payload with strictly increasing indices; the
/// indices are drawn exactly uniformly from the key (detail/random_sampling.hpp),
/// so the result does not depend on the thread count. Under an all-reduce only
/// values() travel (k values); wire_bytes() counts the self-contained message
/// with its indices, which is what an allgather or a point-to-point send ships.
template <class T = float, key_use Key = key_use::per_worker, rescale Scale = rescale::unbiased,
          class Index = std::uint32_t>
class randomk {
 public:
  using value_type = T;
  using index_type = Index;
  using payload = sparse_payload<T, Index>;
  static constexpr bool unbiased = Scale == rescale::unbiased;
  static constexpr bool shared_support = Key == key_use::shared;

  explicit randomk(randomk_options options) : options_(options) {
    detail::check_count_options("gcomp::randomk", options.k, options.ratio);
  }

  /// Per-layer random-k: every layer keeps the fraction options.ratio.
  randomk(randomk_options options, layout lay) : options_(options), layout_(std::move(lay)), per_layer_(true) {
    constexpr std::string_view where = "gcomp::randomk";
    require(options.k == 0, where, "a per-layer random-k takes ratio, not k (got k = ", options.k, ")");
    detail::check_count_options(where, options.k, options.ratio);
    order_.resize(layout_.num_layers());
    std::iota(order_.begin(), order_.end(), std::size_t{0});
    // Visiting layers by offset keeps the concatenated indices increasing.
    std::sort(order_.begin(), order_.end(),
              [&](std::size_t a, std::size_t b) { return layout_[a].offset < layout_[b].offset; });
  }

  /// Elements kept of an n-element gradient (throws if k > n).
  std::size_t kept(std::size_t n) const {
    constexpr std::string_view where = "gcomp::randomk::kept";
    if (!per_layer_) return detail::count_for(where, options_.k, options_.ratio, n);
    layout_.check_buffer(where, "gradient", n);
    std::size_t total = 0;
    for (const layer& l : layout_) total += detail::count_for(where, 0, options_.ratio, l.size);
    return total;
  }

  /// The alpha of E||C(x)||^2 <= alpha ||x||^2 for an n-element x: the largest
  /// size / k over the layers when rescaled (equality for the whole-vector
  /// form), 1 when not.
  double alpha(std::size_t n) const {
    if constexpr (Scale == rescale::none) {
      kept(n);  // still validates n
      return 1.0;
    }
    if (!per_layer_) {
      const std::size_t k = kept(n);
      return k == 0 ? 1.0 : static_cast<double>(n) / static_cast<double>(k);
    }
    double worst = 1.0;
    for (const layer& l : layout_)
      worst = std::max(worst, static_cast<double>(l.size) /
                                  static_cast<double>(detail::count_for("gcomp::randomk::alpha", 0,
                                                                        options_.ratio, l.size)));
    return worst;
  }

  template <class Policy>
  void compress(const Policy& policy, std::span<const T> gradient, payload& message, rng_key key) {
    constexpr std::string_view where = "gcomp::randomk::compress";
    const std::size_t n = gradient.size();
    detail::check_index_range<Index>(where, n);
    const std::size_t k = kept(n);  // checks k <= n and the layout before anything is written
    const rng_key stream = (Key == key_use::shared ? key.shared() : key).fork(detail::randomk_tag);
    message.dimension = n;
    message.indices.resize(k);
    message.data.resize(k);
    if (!per_layer_) {
      select(policy, stream, gradient, message, 0, 0, n, k);
      return;
    }
    std::size_t at = 0;
    for (std::size_t d : order_) {
      const layer& l = layout_[d];
      const std::size_t kd = detail::count_for(where, 0, options_.ratio, l.size);
      select(policy, stream.fork(d), gradient, message, at, l.offset, l.size, kd);
      at += kd;
    }
  }

  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<T> out, T scale) const {
    constexpr std::string_view where = "gcomp::randomk::decompress_add";
    detail::check_sparse_addend(where, message, out.size());
    const std::size_t k = kept(out.size());
    if (message.size() != k)
      fail(where, "message has ", message.size(), " values but this random-k keeps ", k, " of ",
           out.size());
    detail::sparse_scatter_add(policy, message, out, scale, device_, where);
  }

  std::size_t wire_bytes(const payload& message) const { return encoded_size(message); }

  double bits_per_element(std::size_t n) const {
    if (n == 0) return 0.0;
    const std::size_t bytes = wire::header_bytes + 8 + kept(n) * (sizeof(Index) + sizeof(T));
    return 8.0 * static_cast<double>(bytes) / static_cast<double>(n);
  }

  const randomk_options& options() const { return options_; }

 private:
  // Draws kd of the `size` elements starting at `offset` into message
  // positions [at, at + kd) and gathers their (scaled) values.
  template <class Policy>
  void select(const Policy& policy, const rng_key& stream, std::span<const T> gradient,
              payload& message, std::size_t at, std::size_t offset, std::size_t size,
              std::size_t kd) {
    std::span<Index> indices(message.indices.data() + at, kd);
    const T* g = gradient.data();
    const Index shift = static_cast<Index>(offset);
    if constexpr (!host_policy<Policy>) {
      // The indices depend on the key alone: drawn on the device (the host's
      // set, detail/random_sampling.hpp), shifted to the layer, the values
      // gathered there, and both copied into the message.
      constexpr std::string_view where = "gcomp::randomk::compress";
      if (kd == 0) return;
      device_.indices.resize(policy, kd, where);
      device_.values.resize(policy, kd, where);
      Index* idx = device_.indices.data();
      T* v = device_.values.data();
      detail::sample_sorted_distinct_on_device(policy, stream, size, std::span<Index>(idx, kd), device_sampling_,
                                               where);
      if (shift != 0) for_each_index(policy, kd, detail::shift_entry<Index>{idx, shift});
      constexpr bool scaled = Scale == rescale::unbiased;
      const T s = scaled ? static_cast<T>(static_cast<double>(size) / static_cast<double>(kd)) : T(1);
      for_each_index(policy, kd, detail::gather_entry<T, Index, scaled>{g, idx, v, s});
      copy_to_host(policy, std::span<const Index>(idx, kd), indices);
      copy_to_host(policy, std::span<const T>(v, kd), std::span<T>(message.data.data() + at, kd));
    } else {
      detail::sample_sorted_distinct(policy, stream, size, indices, scratch_);
      Index* idx = indices.data();
      T* v = message.data.data() + at;
      if constexpr (Scale == rescale::unbiased) {
        const T s = static_cast<T>(static_cast<double>(size) / static_cast<double>(kd));
        for_each_index(policy, kd, [=](std::size_t j) {
          idx[j] += shift;
          v[j] = g[idx[j]] * s;
        });
      } else {
        for_each_index(policy, kd, [=](std::size_t j) {
          idx[j] += shift;
          v[j] = g[idx[j]];
        });
      }
    }
  }

  randomk_options options_;
  layout layout_;
  bool per_layer_ = false;
  std::vector<std::size_t> order_;  // layer indices by increasing offset
  detail::sampling_scratch<Index> scratch_;  // the sampler's buffers, reused
  // Device scratch (cuda_par, thrust_device): the drawn indices and gathered
  // values on their way to the message, decompress_add's upload, and the
  // sampler's bitmap.
  mutable detail::sparse_device_buffers<T, Index> device_;
  detail::device_sampling_scratch device_sampling_;
};

/// Random-k with the key every worker shares: identical indices on all
/// workers, so its payload all-reduces (shared_support = true).
template <class T = float, rescale Scale = rescale::unbiased, class Index = std::uint32_t>
using shared_randomk = randomk<T, key_use::shared, Scale, Index>;

}  // namespace gcomp
