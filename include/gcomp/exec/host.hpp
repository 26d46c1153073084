// Host execution policies (host_seq, host_par) and the primitives kernels are written in.
#pragma once

#include <algorithm>
#include <cstddef>
#include <deque>
#include <memory>
#include <span>
#include <thread>
#include <type_traits>
#include <vector>

#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/exec/detail/reduce_order.hpp"
#include "gcomp/exec/detail/thread_pool.hpp"
#include "gcomp/exec/policy.hpp"

namespace gcomp {

/// Runs kernels on the calling thread.
struct host_seq {};

/// Runs kernels on a pool of `threads` host threads (the caller among them).
/// Copies share one pool; results never depend on the thread count.
class host_par {
 public:
  /// threads == 0 means one per hardware thread.
  explicit host_par(unsigned threads = 0)
      : pool_(std::make_shared<detail::thread_pool>(
            (threads == 0 ? std::max(1u, std::thread::hardware_concurrency()) : threads) - 1)) {}

  unsigned threads() const { return pool_->concurrency(); }
  detail::thread_pool& pool() const { return *pool_; }

 private:
  std::shared_ptr<detail::thread_pool> pool_;
};

template <>
struct policy_traits<host_seq> {
  static constexpr bool is_policy = true;
  static constexpr bool host_memory = true;
};
template <>
struct policy_traits<host_par> {
  static constexpr bool is_policy = true;
  static constexpr bool host_memory = true;
};

/// host_seq or host_par: the policies whose primitives live in this header.
template <class P>
concept host_policy = std::same_as<std::remove_cvref_t<P>, host_seq> ||
                      std::same_as<std::remove_cvref_t<P>, host_par>;

/// The policy under which a step run with `policy` hands host-resident data
/// (a payload, its encoded bytes, a std::vector) to a communicator: the
/// policy itself for host_seq and host_par, host_seq under any other (a
/// device policy's payloads are host objects, so nccl_comm must stage them
/// rather than read them as device memory). Aggregators pass it with every
/// payload; buffers in the policy's memory go with the policy itself.
template <class Policy>
decltype(auto) host_side(const Policy& policy) {
  if constexpr (host_policy<Policy>)
    return (policy);
  else
    return host_seq{};
}

namespace detail {

// Below this many indices a parallel loop is not worth waking the pool.
inline constexpr std::size_t host_grain = 16384;

// Calls f(begin, end) over disjoint ranges covering [0, n), at most `parts` of them.
template <class F>
void parallel_ranges(const host_par& policy, std::size_t n, std::size_t parts, F&& f) {
  parts = std::max<std::size_t>(1, std::min(parts, n));
  const std::size_t chunk = (n + parts - 1) / std::max<std::size_t>(parts, 1);
  auto task = [&](std::size_t t) {
    const std::size_t begin = t * chunk;
    const std::size_t end = std::min(n, begin + chunk);
    if (begin < end) f(begin, end);
  };
  policy.pool().run((n + chunk - 1) / chunk, task);
}

// Reusable per-thread scratch for block partials, so reductions allocate only
// until the largest size has been seen. Each live lease gets its own buffer, so
// a kernel that reduces inside a reduction's transform is still safe.
template <class R>
class scratch {
 public:
  explicit scratch(std::size_t n) : buffer_(acquire()) {
    if (buffer_.size() < n) buffer_.resize(n);
  }
  scratch(const scratch&) = delete;
  scratch& operator=(const scratch&) = delete;
  ~scratch() { --depth(); }
  R& operator[](std::size_t i) { return buffer_[i]; }
  std::vector<R>& vector() { return buffer_; }

 private:
  static std::size_t& depth() {
    thread_local std::size_t d = 0;
    return d;
  }
  static std::vector<R>& acquire() {
    thread_local std::deque<std::vector<R>> buffers;  // deque: references stay valid
    if (buffers.size() <= depth()) buffers.emplace_back();
    return buffers[depth()++];
  }
  std::vector<R>& buffer_;
};

}  // namespace detail

/// Calls f(i) for every i in [0, n). Calls for different i may run concurrently.
template <class F>
void for_each_index(const host_seq&, std::size_t n, F&& f) {
  for (std::size_t i = 0; i < n; ++i) f(i);
}

template <class F>
void for_each_index(const host_par& policy, std::size_t n, F&& f) {
  if (n < detail::host_grain || policy.threads() == 1) return for_each_index(host_seq{}, n, f);
  const std::size_t parts = std::min<std::size_t>(policy.threads() * 4, n / detail::host_grain + 1);
  detail::parallel_ranges(policy, n, parts, [&](std::size_t begin, std::size_t end) {
    for (std::size_t i = begin; i < end; ++i) f(i);
  });
}

/// reduce over transform(i) for i in [0, n), in the fixed order of
/// detail/reduce_order.hpp. `identity` must be the identity of `reduce`
/// (0 for a sum, -infinity for a max): every lane and block starts from it.
/// Returns identity when n == 0.
template <class R, class Reduce, class Transform>
R transform_reduce(const host_seq&, std::size_t n, R identity, Reduce reduce, Transform transform) {
  R total = identity;
  for (std::size_t begin = 0; begin < n; begin += detail::reduce_block)
    total = reduce(total, detail::reduce_one_block(begin, std::min(n, begin + detail::reduce_block),
                                                   identity, reduce, transform));
  return total;
}

template <class R, class Reduce, class Transform>
R transform_reduce(const host_par& policy, std::size_t n, R identity, Reduce reduce,
                   Transform transform) {
  const std::size_t blocks = detail::reduce_block_count(n);
  if (blocks < 4 || policy.threads() == 1)
    return transform_reduce(host_seq{}, n, identity, reduce, transform);
  detail::scratch<R> partial(blocks);
  detail::parallel_ranges(policy, blocks, policy.threads() * 4, [&](std::size_t b0, std::size_t b1) {
    for (std::size_t b = b0; b < b1; ++b)
      partial[b] = detail::reduce_one_block(b * detail::reduce_block,
                                            std::min(n, (b + 1) * detail::reduce_block), identity,
                                            reduce, transform);
  });
  R total = identity;
  for (std::size_t b = 0; b < blocks; ++b) total = reduce(total, partial[b]);
  return total;
}

/// out[d] = reduce over transform(i) for i in layer d of `lay` (i is the index
/// in the flat buffer), each layer in the same fixed order as transform_reduce
/// over that layer alone. out.size() must equal lay.num_layers().
template <class R, class Reduce, class Transform>
void reduce_per_layer(const host_seq&, const layout& lay, std::span<R> out, R identity,
                      Reduce reduce, Transform transform) {
  check_same_size("gcomp::reduce_per_layer", "out", out.size(), "layout layers", lay.num_layers());
  for (std::size_t d = 0; d < lay.num_layers(); ++d) {
    const std::size_t offset = lay[d].offset;
    out[d] = transform_reduce(host_seq{}, lay[d].size, identity, reduce,
                              [&](std::size_t i) { return transform(offset + i); });
  }
}

template <class R, class Reduce, class Transform>
void reduce_per_layer(const host_par& policy, const layout& lay, std::span<R> out, R identity,
                      Reduce reduce, Transform transform) {
  check_same_size("gcomp::reduce_per_layer", "out", out.size(), "layout layers", lay.num_layers());
  const std::size_t layers = lay.num_layers();
  // first_block[d] = index of layer d's first block in the flat list of all
  // layers' blocks, so small and large layers share the pool evenly.
  detail::scratch<std::size_t> first_block(layers + 1);
  first_block[0] = 0;
  for (std::size_t d = 0; d < layers; ++d)
    first_block[d + 1] = first_block[d] + detail::reduce_block_count(lay[d].size);
  const std::size_t blocks = first_block[layers];
  if (blocks < 4 || policy.threads() == 1)
    return reduce_per_layer(host_seq{}, lay, out, identity, reduce, transform);
  detail::scratch<R> partial(blocks);
  detail::parallel_ranges(policy, blocks, policy.threads() * 4, [&](std::size_t b0, std::size_t b1) {
    std::size_t d = static_cast<std::size_t>(
        std::upper_bound(first_block.vector().begin(), first_block.vector().begin() + layers + 1, b0) -
        first_block.vector().begin() - 1);
    for (std::size_t b = b0; b < b1; ++b) {
      while (b >= first_block[d + 1]) ++d;
      const std::size_t begin = lay[d].offset + (b - first_block[d]) * detail::reduce_block;
      const std::size_t end = std::min(lay[d].offset + lay[d].size, begin + detail::reduce_block);
      partial[b] = detail::reduce_one_block(begin, end, identity, reduce, transform);
    }
  });
  for (std::size_t d = 0; d < layers; ++d) {
    R total = identity;
    for (std::size_t b = first_block[d]; b < first_block[d + 1]; ++b) total = reduce(total, partial[b]);
    out[d] = total;
  }
}

/// Writes, in increasing order, every i in [0, n) with pred(i) into out and
/// returns how many there are. If out is too small, throws gcomp::error and
/// leaves out unchanged.
template <class Index, class Pred>
std::size_t select_if(const host_seq&, std::size_t n, Pred pred, std::span<Index> out) {
  std::size_t count = 0;
  for (std::size_t i = 0; i < n; ++i) count += pred(i) ? 1 : 0;
  require(count <= out.size(), "gcomp::select_if", "out has room for ", out.size(),
          " indices but ", count, " were selected");
  std::size_t k = 0;
  for (std::size_t i = 0; i < n; ++i)
    if (pred(i)) out[k++] = static_cast<Index>(i);
  return count;
}

template <class Index, class Pred>
std::size_t select_if(const host_par& policy, std::size_t n, Pred pred, std::span<Index> out) {
  if (n < detail::host_grain || policy.threads() == 1) return select_if(host_seq{}, n, pred, out);
  const std::size_t parts = std::min<std::size_t>(policy.threads() * 4, n / detail::host_grain + 1);
  const std::size_t chunk = (n + parts - 1) / parts;
  const std::size_t chunks = (n + chunk - 1) / chunk;
  detail::scratch<std::size_t> start(chunks + 1);
  auto count_chunk = [&](std::size_t c) {
    std::size_t count = 0;
    for (std::size_t i = c * chunk, end = std::min(n, (c + 1) * chunk); i < end; ++i)
      count += pred(i) ? 1 : 0;
    start[c + 1] = count;
  };
  policy.pool().run(chunks, count_chunk);
  start[0] = 0;
  for (std::size_t c = 0; c < chunks; ++c) start[c + 1] += start[c];
  const std::size_t count = start[chunks];
  require(count <= out.size(), "gcomp::select_if", "out has room for ", out.size(),
          " indices but ", count, " were selected");
  auto write_chunk = [&](std::size_t c) {
    std::size_t k = start[c];
    for (std::size_t i = c * chunk, end = std::min(n, (c + 1) * chunk); i < end; ++i)
      if (pred(i)) out[k++] = static_cast<Index>(i);
  };
  policy.pool().run(chunks, write_chunk);
  return count;
}

}  // namespace gcomp
