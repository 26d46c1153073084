// Exact top-k sparsification (Aji & Heafield, "Sparse Communication for Distributed Gradient Descent", EMNLP 2017; the contraction of Stich et al. 2018 and Khirirat et al. 2018), whole-vector or per layer.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/compress/detail/count.hpp"
#include "gcomp/compress/detail/select.hpp"
#include "gcomp/compress/detail/sparse_device.hpp"
#include "gcomp/compress/detail/topk_sparse.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/core/sparse_payload.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/host.hpp"
#include "gcomp/exec/policy.hpp"

// Under nvcc the GPU selection comes with the header, so topk::compress takes
// cuda_par without another include; host compilers never see CUDA.
#if defined(__CUDACC__)
#include "gcomp/compress/detail/topk_cuda.cuh"
#endif

namespace gcomp {

/// How many elements top-k keeps: exactly one of the two is set.
struct topk_options {
  std::size_t k = 0;   // elements kept of the whole vector (not with a layout); k > n throws
  double ratio = 0.0;  // fraction kept, rounded to nearest, at least 1 (per layer with a layout)
};

/// C(g) keeps the k elements of largest magnitude and zeroes the rest. Among
/// equal magnitudes the lower index wins, so the kept set is a function of g
/// alone (the same on every policy and thread count). It is the biased
/// contraction ||C(g) - g||^2 <= (1 - delta) ||g||^2 with delta = k / n, and
/// per layer delta = min_d k_d / n_d (delta() returns it).
///
/// With a layout, layer d keeps k_d = max(1, round(ratio * n_d)) of its own
/// elements; the payload holds all layers' picks with global indices.
/// Elements in gaps between layers are never kept (delta() is then 0).
///
/// Non-finite gradients (NaN, +-inf) are rejected: compress throws
/// gcomp::error naming the first such index and leaves the payload as it was.
/// Cost on the host: about one read pass of g (a sampled lower bound on the
/// k-th magnitude, then one gathering pass) and O(k) more, falling back to a
/// radix select of two to four passes on inputs the sample misjudges
/// (detail/select.hpp). No allocation after the first step of a given size.
///
/// Under cuda_par the gradient and decompress_add's output are device memory
/// and the selection runs on the GPU (detail/topk_cuda.cuh: a radix select of
/// about 2.2 read passes, no sort); the payload is the same host message, bit
/// for bit, with the same errors. One object must not run two device steps
/// at once (its device scratch is reused). Under thrust_device on Thrust's
/// OpenMP system the host selection runs (host_seq); on Thrust's CUDA system
/// compress does not compile (use cuda_par), while decompress_add works
/// everywhere.
template <class T = float, class Index = std::uint32_t>
class topk {
 public:
  using value_type = T;
  using index_type = Index;
  using payload = sparse_payload<T, Index>;
  static constexpr bool unbiased = false;
  static constexpr bool shared_support = false;

  /// Whole-vector top-k: options.k elements, or round(options.ratio * n) (at least 1).
  explicit topk(topk_options options) : options_(options) {
    detail::check_count_options("gcomp::topk", options.k, options.ratio);
  }

  /// Per-layer top-k: every layer keeps the fraction options.ratio.
  topk(topk_options options, layout lay)
      : options_(options), layout_(std::move(lay)), per_layer_(true) {
    constexpr std::string_view where = "gcomp::topk";
    require(options.k == 0, where, "a per-layer top-k takes ratio, not k (got k = ", options.k, ")");
    detail::check_count_options(where, options.k, options.ratio);
    order_.resize(layout_.num_layers());
    std::iota(order_.begin(), order_.end(), std::size_t{0});
    // Visiting layers by offset keeps the concatenated indices increasing.
    std::sort(order_.begin(), order_.end(),
              [&](std::size_t a, std::size_t b) { return layout_[a].offset < layout_[b].offset; });
  }

  /// Elements kept of an n-element gradient (throws if k > n or n does not fit the layout).
  std::size_t kept(std::size_t n) const {
    constexpr std::string_view where = "gcomp::topk::kept";
    if (!per_layer_) return detail::count_for(where, options_.k, options_.ratio, n);
    layout_.check_buffer(where, "gradient", n);
    std::size_t total = 0;
    for (const layer& l : layout_) total += detail::count_for(where, 0, options_.ratio, l.size);
    return total;
  }

  /// The delta of ||C(x) - x||^2 <= (1 - delta) ||x||^2 for an n-element x:
  /// k / n, or the smallest k_d / n_d over the layers (0 if layers leave gaps).
  double delta(std::size_t n) const {
    const std::size_t k = kept(n);
    if (n == 0) return 1.0;
    if (!per_layer_) return static_cast<double>(k) / static_cast<double>(n);
    if (layout_.covered_size() != layout_.total_size()) return 0.0;
    double worst = 1.0;
    for (const layer& l : layout_)
      worst = std::min(worst, static_cast<double>(detail::count_for("gcomp::topk::delta", 0, options_.ratio,
                                                            l.size)) /
                                  static_cast<double>(l.size));
    return worst;
  }

  template <class Policy>
  void compress(const Policy& policy, std::span<const T> gradient, payload& message, rng_key) {
    constexpr std::string_view where = "gcomp::topk::compress";
    const std::size_t n = gradient.size();
    detail::check_index_range<Index>(where, n);
    const std::size_t k = kept(n);  // checks k <= n and the layout before anything is written
    if constexpr (detail::device_topk<Policy>::value) {
      compress_on_device(policy, gradient, k, message, where);
    } else if constexpr (host_policy<Policy>) {
      compress_on_host(policy, gradient, k, message, where);
    } else {
      static_assert(policy_traits<Policy>::host_memory,
                    "gcomp::topk::compress: this policy's memory is not readable by the host and it "
                    "has no device selection (cuda_par has one; thrust_device on Thrust's CUDA "
                    "system does not: use cuda_par)");
      // Host-readable memory (thrust_device on OpenMP): the host selection.
      compress_on_host(host_seq{}, gradient, k, message, where);
    }
  }

  /// out += scale * C(g). Any well-formed sparse message of dimension
  /// out.size() is accepted (indices strictly increasing and in range).
  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<T> out, T scale) const {
    detail::checked_scatter_add(policy, "gcomp::topk::decompress_add", message, out, scale, device_);
  }

  std::size_t wire_bytes(const payload& message) const { return encoded_size(message); }

  /// Exact bits on the wire per element: (24 + 8 + k (sizeof(Index) + sizeof(T))) * 8 / n.
  double bits_per_element(std::size_t n) const {
    if (n == 0) return 0.0;
    const std::size_t bytes = wire::header_bytes + 8 + kept(n) * (sizeof(Index) + sizeof(T));
    return 8.0 * static_cast<double>(bytes) / static_cast<double>(n);
  }

  const topk_options& options() const { return options_; }

  /// Whether the selection may take its sampled one-pass shortcut (on by
  /// default). The result is the same either way; tests and benchmarks
  /// switch it off to exercise or time the radix path alone.
  void use_sampled_shortcut(bool on) { selector_.speculate = on; }
  /// The route the last selection took (detail/select.hpp), for tests.
  detail::select_path last_path() const { return selector_.last_path; }

 private:
  // The host selection (detail/select.hpp), for host-readable memory.
  template <class Policy>
  void compress_on_host(const Policy& policy, std::span<const T> gradient, std::size_t k,
                        payload& message, std::string_view where) {
    const std::size_t n = gradient.size();
    if (!per_layer_) {
      // The selection validates the whole gradient before it writes, so it
      // can write straight into the message; only growth must be undone.
      detail::write_sparse_in_place(message, n, k, [&](Index* indices, T* values) {
        selector_.select_topk(policy, gradient, k, 0, indices, values, where);
      });
      return;
    }
    // Per layer a later layer may still throw, so the picks are staged and
    // copied (k entries, a small fraction of a pass) once all layers passed.
    staged_indices_.resize(k);
    staged_values_.resize(k);
    std::size_t at = 0;
    for (std::size_t d : order_) {
      const layer& l = layout_[d];
      const std::size_t kd = detail::count_for(where, 0, options_.ratio, l.size);
      selector_.select_topk(policy, gradient.subspan(l.offset, l.size), kd, l.offset,
                            staged_indices_.data() + at, staged_values_.data() + at, where);
      at += kd;
    }
    message.dimension = n;
    message.indices.assign(staged_indices_.begin(), staged_indices_.end());
    message.data.assign(staged_values_.begin(), staged_values_.end());
  }

  // The device selection (detail/sparse_device.hpp's device_topk): the picks
  // go to device scratch, layer after layer, and reach the message only once
  // every layer passed, so an error leaves it as it was.
  template <class Policy>
  void compress_on_device(const Policy& policy, std::span<const T> gradient, std::size_t k,
                          payload& message, std::string_view where) {
    const std::size_t n = gradient.size();
    device_.indices.resize(policy, k, where);
    device_.values.resize(policy, k, where);
    T* values = device_.values.data();
    Index* indices = device_.indices.data();
    if (!per_layer_) {
      if (k > 0)
        detail::device_topk<Policy>::select(policy, gradient, k, 0, device_scratch_, values, indices, where);
    } else {
      std::size_t at = 0;
      for (std::size_t d : order_) {
        const layer& l = layout_[d];
        const std::size_t kd = detail::count_for(where, 0, options_.ratio, l.size);
        detail::device_topk<Policy>::select(policy, gradient.subspan(l.offset, l.size), kd, l.offset,
                                            device_scratch_, values + at, indices + at, where);
        at += kd;
      }
    }
    detail::copy_sparse_to_message(policy, message, n, k, indices, values);
  }

  topk_options options_;
  layout layout_;
  bool per_layer_ = false;
  std::vector<std::size_t> order_;  // layer indices by increasing offset
  detail::magnitude_selector<T> selector_;
  std::vector<Index> staged_indices_;  // per-layer picks before they reach the message
  std::vector<T> staged_values_;
  // Device scratch (cuda_par, thrust_device): the picks on their way to the
  // message, and decompress_add's upload; the GPU selection's workspace.
  mutable detail::sparse_device_buffers<T, Index> device_;
  detail::opaque_scratch device_scratch_;
};

}  // namespace gcomp
