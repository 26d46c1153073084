// PowerSGD: rank-r approximation of each layer by one warm-started power iteration (Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed Optimization", NeurIPS 2019).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/compress/detail/lowrank_kernels.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/core/lowrank_payload.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp {

struct powersgd_options {
  std::size_t rank = 1;  // r, the rank of every factored layer
};

/// Per layer with a shape of two or more dimensions, the layer is the matrix
/// M = rows x cols with rows = shape[0] and cols = the product of the rest
/// (conv kernels flatten as in the paper), and one power step runs:
///   P = M Q;  P = orthonormalise(P);  Q = M^T P;  send P, Q;  C(M) = P Q^T,
/// with Q kept per layer from the last step (the warm start that makes one
/// iteration per step enough: over steps it is subspace iteration tracking
/// M's top-r subspace). Q starts as a standard normal matrix drawn from
/// key.shared() at the first compress(), so every worker starts alike.
///
/// A layer without a 2-D shape, or where r >= min(rows, cols) or the factors
/// r (rows + cols) would not be smaller than rows * cols, is sent as it is.
///
/// This is the compressor half of PowerSGD and the single-worker form of the
/// method: P Q^T is the orthogonal projection P P^T M, so ||M - C(M)||_F^2 =
/// ||M||_F^2 - ||P^T M||_F^2 <= ||M||_F^2 (a contraction, biased; pair it with
/// error_feedback as the paper does). The paper's multi-worker algorithm
/// all-reduces P, orthonormalises the sum, then all-reduces Q = M^T P: two
/// rounds with a computation between them, which is an aggregator's job (to
/// come), not a compressor's; hence shared_support = false here (payloads of
/// different workers hold different factors, and P Q^T is not linear in them).
///
/// Rank deficiency: a column of P that Gram-Schmidt finds (numerically)
/// dependent on the earlier ones is sent as zero, and its warm-start column
/// is redrawn from the key, so a layer whose rank grows later is still found.
/// Arithmetic is in double internally; results do not depend on the thread
/// count. Elements outside every layer are not sent (they decode as zero).
template <class T = float>
class powersgd {
 public:
  using value_type = T;
  using payload = lowrank_payload<T>;
  using block = typename payload::block;
  static constexpr bool unbiased = false;
  static constexpr bool shared_support = false;

  powersgd(powersgd_options options, layout lay) : options_(options), layout_(std::move(lay)) {
    constexpr std::string_view where = "gcomp::powersgd";
    check_positive(where, "rank", options.rank);
    std::vector<std::size_t> order(layout_.num_layers());
    std::iota(order.begin(), order.end(), std::size_t{0});
    // Blocks must come in offset order (lowrank_payload's invariant).
    std::sort(order.begin(), order.end(),
              [&](std::size_t a, std::size_t b) { return layout_[a].offset < layout_[b].offset; });
    const std::uint64_t r = options.rank;
    for (std::size_t d : order) {
      const layer& l = layout_[d];
      std::uint64_t rows = l.size, cols = 1, rank = 0;
      if (l.shape.size() >= 2) {
        rows = l.shape[0];
        cols = l.size / rows;
        if (r < std::min(rows, cols) && r * (rows + cols) < rows * cols) rank = r;
      }
      if (rank == 0) {
        rows = l.size;
        cols = 1;
      }
      plan_.push_back(block{l.offset, rows, cols, rank});
      layer_of_block_.push_back(d);
      values_ += rank == 0 ? rows * cols : rank * (rows + cols);
    }
    warm_.resize(plan_.size());
  }

  template <class Policy>
  void compress(const Policy& policy, std::span<const T> gradient, payload& message, rng_key key) {
    constexpr std::string_view where = "gcomp::powersgd::compress";
    layout_.check_buffer(where, "gradient", gradient.size());
    const std::size_t r = options_.rank;
    const rng_key stream = key.shared().fork(powersgd_tag);
    message.dimension = gradient.size();
    message.blocks = plan_;  // copy-assignment reuses the capacity
    message.data.resize(values_);
    std::size_t at = 0;
    for (std::size_t b = 0; b < plan_.size(); ++b) {
      const block& k = plan_[b];
      const T* m = gradient.data() + k.offset;
      T* out = message.data.data() + at;
      const std::size_t rows = k.rows, cols = k.cols;
      if (k.rank == 0) {
        if constexpr (host_policy<Policy>)
          for_each_index(policy, rows * cols, [=](std::size_t i) { out[i] = m[i]; });
        else
          copy_to_host(policy, std::span<const T>(m, rows * cols), std::span<T>(out, rows * cols));
        at += rows * cols;
        continue;
      }
      std::vector<T>& q = warm_[b];
      if (q.empty()) {  // first step: Q ~ N(0, 1) from the shared key (on the host: Q is host state)
        q.resize(cols * r);
        if constexpr (host_policy<Policy>)
          draw_normal(policy, stream.fork(b), q.data(), cols * r);
        else
          draw_normal(host_seq{}, stream.fork(b), q.data(), cols * r);
      }
      p_.resize(std::max(p_.size(), rows * r));
      q_.resize(std::max(q_.size(), cols * r));
      degenerate_.resize(std::max(degenerate_.size(), r));
      multiply(policy, m, rows, cols, q.data(), r, p_.data());
      detail::lowrank_orthonormalise(p_.data(), rows, r, degenerate_.data());
      T* p_out = out;
      T* q_out = out + rows * r;
      for (std::size_t i = 0; i < rows * r; ++i) p_out[i] = static_cast<T>(p_[i]);
      // Q from the P that is sent (rounded to T), so P Q^T is the receiver's projection.
      multiply_transposed(policy, m, rows, cols, p_out, r, q_.data());
      for (std::size_t i = 0; i < cols * r; ++i) q_out[i] = static_cast<T>(q_[i]);
      std::copy(q_out, q_out + cols * r, q.begin());
      for (std::size_t j = 0; j < r; ++j)
        if (degenerate_[j]) {
          // Its column of Q is M^T 0 = 0 and would stay 0 for ever: redraw it.
          const rng_key fresh = key.shared().fork(powersgd_reseed_tag).fork(b);
          for (std::size_t c = 0; c < cols; ++c) q[c * r + j] = normal(fresh, c * r + j);
        }
      at += k.rank * (rows + cols);
    }
  }

  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<T> out, T scale) const {
    constexpr std::string_view where = "gcomp::powersgd::decompress_add";
    detail::check_lowrank(where, message, out.size());
    // Under a device policy the message (host) goes up once; the block walk
    // is the same, with one thread per element adding the host loops' sums.
    const T* values = message.data.data();
    if constexpr (!host_policy<Policy>) {
      if (message.data.empty()) return;
      device_values_.resize(policy, message.data.size(), where);
      copy_from_host(policy, std::span<const T>(message.data), device_values_.span());
      values = device_values_.data();
    }
    std::size_t at = 0;
    for (const block& k : message.blocks) {
      const std::size_t rows = k.rows, cols = k.cols, r = k.rank;
      const T* v = values + at;
      T* o = out.data() + k.offset;
      if (r == 0) {
        for_each_index(policy, rows * cols, detail::add_scaled_entry<T>{v, o, scale});
        at += rows * cols;
        continue;
      }
      if constexpr (host_policy<Policy>)
        detail::lowrank_add_product(policy, v, v + rows * r, rows, cols, r, scale, o);
      else
        for_each_index(policy, rows * cols,
                       detail::lowrank_add_product_entry<T>{v, v + rows * r, o, cols, r, scale});
      at += r * (rows + cols);
    }
  }

  std::size_t wire_bytes(const payload& message) const { return encoded_size(message); }

  double bits_per_element(std::size_t n) const {
    layout_.check_buffer("gcomp::powersgd::bits_per_element", "n", n);
    const std::size_t bytes =
        wire::header_bytes + 8 + plan_.size() * detail::lowrank_block_bytes + values_ * sizeof(T);
    return 8.0 * static_cast<double>(bytes) / static_cast<double>(n);
  }

  /// The blocks every message has: one per layer, in offset order.
  std::span<const block> plan() const { return plan_; }
  /// The layer (index in the layout) that block b stands for.
  std::size_t layer_of_block(std::size_t b) const { return layer_of_block_.at(b); }
  /// The warm-start Q (cols x rank, row-major) of block b: empty for a dense
  /// block and before the first compress().
  std::span<const T> warm_start(std::size_t b) const { return warm_.at(b); }
  /// Forgets every warm start; the next compress() draws Q afresh.
  void reset() {
    for (auto& q : warm_) q.clear();
  }
  const powersgd_options& options() const { return options_; }

  /// Checkpoint section "gcomp::powersgd" (version 1): the block count and
  /// each block's warm-start Q ("warm_start[b]", cols x rank, or empty for a
  /// dense block and before the first compress). P and the other buffers are
  /// recomputed every step, so they are not saved.
  void save(checkpoint_writer& out) const {
    out.begin("gcomp::powersgd", 1);
    out.value("blocks", static_cast<std::uint64_t>(warm_.size()));
    for (std::size_t b = 0; b < warm_.size(); ++b)
      out.array(warm_start_name(b), std::span<const T>(warm_[b]));
    out.end();
  }

  /// Reads save()'s section. The layout fixes every block's shape, so each Q
  /// must be empty (drawn afresh at the next compress) or exactly cols x
  /// rank; anything else is rejected naming both sizes, with *this unchanged.
  template <class Policy>
  void load(const Policy&, checkpoint_reader& in) {
    constexpr std::string_view where = "gcomp::powersgd::load";
    in.begin("gcomp::powersgd", 1);
    const auto blocks = in.value<std::uint64_t>("blocks");
    if (blocks != plan_.size())
      fail(where, "the checkpoint holds warm starts for ", blocks,
           " blocks but this powersgd has ", plan_.size(),
           " (one per layer; a checkpoint of another model?)");
    std::vector<std::vector<T>> warm(plan_.size());
    for (std::size_t b = 0; b < plan_.size(); ++b) {
      warm[b] = in.vector<T>(warm_start_name(b));
      const block& k = plan_[b];
      const std::uint64_t expected = k.cols * k.rank;
      if (!warm[b].empty() && warm[b].size() != expected)
        fail(where, "warm_start[", b, "] (layer '", layout_[layer_of_block_[b]].name, "') holds ",
             warm[b].size(), " values but this powersgd expects ", expected, " (cols ", k.cols,
             " x rank ", k.rank, ") or none");
    }
    in.end();
    warm_ = std::move(warm);
  }

 private:
  // P = M Q (double, host p) with M in the policy's memory and Q on the host.
  template <class Policy>
  void multiply(const Policy& policy, const T* m, std::size_t rows, std::size_t cols, const T* q,
                std::size_t r, double* p) {
    if constexpr (host_policy<Policy>)
      detail::lowrank_multiply(policy, m, rows, cols, q, r, p);
    else
      product_on_device(policy, std::span<const T>(q, cols * r), std::span<double>(p, rows * r),
                        [&](const T* q_dev, double* p_dev) {
                          return detail::lowrank_multiply_entry<T>{m, q_dev, p_dev, cols, r};
                        });
  }

  // Q = M^T P (double, host q) with M in the policy's memory and P on the host.
  template <class Policy>
  void multiply_transposed(const Policy& policy, const T* m, std::size_t rows, std::size_t cols,
                           const T* p, std::size_t r, double* q) {
    if constexpr (host_policy<Policy>)
      detail::lowrank_multiply_transposed(policy, m, rows, cols, p, r, q);
    else
      product_on_device(policy, std::span<const T>(p, rows * r), std::span<double>(q, cols * r),
                        [&](const T* p_dev, double* q_dev) {
                          return detail::lowrank_multiply_transposed_entry<T>{m, p_dev, q_dev, rows, cols, r};
                        });
  }

  // A product under a device policy: the host factor goes up, one thread per
  // entry of the result runs entry_for(factor, result) (device pointers), and
  // the result comes down into host memory.
  template <class Policy, class EntryFor>
  void product_on_device(const Policy& policy, std::span<const T> factor, std::span<double> result,
                         EntryFor entry_for) {
    constexpr std::string_view where = "gcomp::powersgd::compress";
    device_values_.resize(policy, factor.size(), where);
    device_product_.resize(policy, result.size(), where);
    copy_from_host(policy, factor, device_values_.span());
    for_each_index(policy, result.size(), entry_for(device_values_.data(), device_product_.data()));
    copy_to_host(policy, std::span<const double>(device_product_.data(), result.size()), result);
  }

  static std::string warm_start_name(std::size_t b) {
    return "warm_start[" + std::to_string(b) + "]";
  }

  static constexpr std::uint64_t powersgd_tag = 0x6467737265776f70ull;         // "powersgd"
  static constexpr std::uint64_t powersgd_reseed_tag = 0x646565736572716bull;  // "kqreseed"

  template <class Policy>
  static void draw_normal(const Policy& policy, const rng_key& key, T* q, std::size_t count) {
    for_each_index(policy, count, [=](std::size_t i) { q[i] = static_cast<T>(normal(key, i)); });
  }

  powersgd_options options_;
  layout layout_;
  std::vector<block> plan_;
  std::vector<std::size_t> layer_of_block_;
  std::size_t values_ = 0;
  std::vector<std::vector<T>> warm_;  // per block: Q of the last step
  std::vector<double> p_, q_;         // double scratch for P and Q
  std::vector<unsigned char> degenerate_;
  // Device scratch (cuda_par, thrust_device): Q or P going up, or the whole
  // message for decompress_add; M Q or M^T P coming down. Q stays host state.
  mutable policy_buffer<T> device_values_;
  policy_buffer<double> device_product_;
};

}  // namespace gcomp
