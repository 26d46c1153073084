// Random contiguous block with a shared key: every worker keeps the same k consecutive elements (the foreground compressor of ALGORITHMS.md section 4, after Xu & Bai's divisible communication).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "gcomp/compress/detail/random_sampling.hpp"
#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/core/wire.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/detail/unfused.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp {

/// k consecutive values of a `dimension`-long vector, starting at `offset`
/// and wrapping around: data[j] belongs at (offset + j) % dimension. No
/// indices are stored or sent; an all-reduce sums data directly.
///
/// Wire form (kind sparse, element = T, flags = 4 "contiguous block"):
///   u64 offset | u64 k | k values
/// The support-only form chain<random_contiguous_block, B> sends (element none,
/// flags = 4 | 2) carries u64 offset and u64 k only. A sparse_payload decoder
/// rejects both (its flags differ), so the two are never confused.
template <class T>
struct block_payload {
  using value_type = T;
  std::uint64_t dimension = 0;
  std::uint64_t offset = 0;
  std::vector<T> data;  // reused between steps

  std::span<T> values() { return data; }
  std::span<const T> values() const { return data; }
  std::size_t size() const { return data.size(); }
};

namespace detail {

inline constexpr std::uint8_t block_flag = 4;
inline constexpr std::uint8_t block_support_flag = 4 | 2;

// Reads offset and k and checks them against the dimension (untrusted bytes).
inline void take_block_shape(wire::reader& body, std::uint64_t dimension, std::uint64_t& offset,
                             std::uint64_t& k) {
  offset = body.get<std::uint64_t>("offset");
  k = body.get<std::uint64_t>("k");
  if (dimension == 0 ? offset != 0 : offset >= dimension)
    fail(body.where(), "offset ", offset, " is out of range for dimension ", dimension);
  if (k > dimension) fail(body.where(), "k = ", k, " exceeds the dimension ", dimension);
}

}  // namespace detail

template <class T>
std::size_t encoded_size(const block_payload<T>& message) {
  return wire::header_bytes + 16 + message.size() * sizeof(T);
}

template <class T>
void encode(const block_payload<T>& message, std::vector<std::byte>& out) {
  auto w = wire::begin(out, wire::kind::sparse, wire::element_of<T>, detail::block_flag,
                       message.dimension, 16 + message.size() * sizeof(T));
  w.put(message.offset);
  w.put(static_cast<std::uint64_t>(message.size()));
  w.put_array(std::span<const T>(message.data));
}

template <class T>
void decode(std::span<const std::byte> bytes, block_payload<T>& into,
            std::uint64_t dimension = wire::any_dimension) {
  constexpr std::string_view where = "gcomp::decode(block_payload)";
  wire::opened msg = wire::open(bytes, wire::kind::sparse, wire::element_of<T>, dimension, where);
  if (msg.head.flags != detail::block_flag)
    fail(where, "flags ", unsigned(msg.head.flags), " do not mark a contiguous block message");
  std::uint64_t offset = 0, k = 0;
  detail::take_block_shape(msg.body, msg.head.dimension, offset, k);
  const auto values = msg.body.take<T>(k, "values");
  msg.body.finish();
  into.dimension = msg.head.dimension;
  into.offset = offset;
  into.data.resize(static_cast<std::size_t>(k));
  wire::copy_to(values, into.data.data());
}

/// Bytes of the support-only form (header, offset, k).
template <class T>
std::size_t encoded_support_size(const block_payload<T>&) {
  return wire::header_bytes + 16;
}

template <class T>
void encode_support(const block_payload<T>& message, std::vector<std::byte>& out) {
  auto w = wire::begin(out, wire::kind::sparse, wire::element::none, detail::block_support_flag,
                       message.dimension, 16);
  w.put(message.offset);
  w.put(static_cast<std::uint64_t>(message.size()));
}

/// Reads a support-only block message: offset set, values resized to k and zeroed.
template <class T>
void decode_support(std::span<const std::byte> bytes, block_payload<T>& into,
                    std::uint64_t dimension = wire::any_dimension) {
  constexpr std::string_view where = "gcomp::decode_support(block_payload)";
  wire::opened msg = wire::open(bytes, wire::kind::sparse, wire::element::none, dimension, where);
  if (msg.head.flags != detail::block_support_flag)
    fail(where, "flags ", unsigned(msg.head.flags),
         " do not mark a support-only contiguous block message");
  std::uint64_t offset = 0, k = 0;
  detail::take_block_shape(msg.body, msg.head.dimension, offset, k);
  msg.body.finish();
  into.dimension = msg.head.dimension;
  into.offset = offset;
  into.data.assign(static_cast<std::size_t>(k), T(0));
}

namespace detail {

/// d[j] = g[(offset + j) mod n], times s when Scaled: a block's values, on the
/// host and on the device (a functor, not a lambda: nvcc's extended lambdas
/// cannot capture inside if constexpr).
template <class T, bool Scaled>
struct block_gather {
  const T* g;
  T* d;
  std::size_t offset, n;
  T s;
  GCOMP_HD void operator()(std::size_t j) const {
    std::size_t i = offset + j;
    if (i >= n) i -= n;
    if constexpr (Scaled)
      d[j] = mul_unfused(g[i], s);
    else
      d[j] = g[i];
  }
};

/// o[(offset + j) mod n] += scale * d[j], the product rounded before the sum.
template <class T>
struct block_add {
  const T* d;
  T* o;
  std::size_t offset, n;
  T scale;
  GCOMP_HD void operator()(std::size_t j) const {
    std::size_t i = offset + j;
    if (i >= n) i -= n;
    o[i] = add_unfused(o[i], mul_unfused(scale, d[j]));
  }
};

}  // namespace detail

/// How many elements random_contiguous_block keeps: exactly one of the two is set.
struct random_contiguous_block_options {
  std::size_t k = 0;   // block length
  double ratio = 0.0;  // block length as a fraction of the gradient, rounded, at least 1
};

/// C(g) keeps the k consecutive elements starting at an offset drawn
/// uniformly from [0, n) with key.shared(), wrapping around the end.
///
/// Why wrap: with a uniform offset every coordinate is then kept with
/// probability exactly k / n, so scaling by n / k (rescale::unbiased) makes C
/// unbiased, and the unscaled block satisfies E||C(g) - g||^2 = (1 - k/n)||g||^2
/// (a contraction with delta = k / n in expectation; for a single draw only
/// ||C(g) - g||^2 <= ||g||^2 holds). A block clamped to [0, n - k] would keep
/// the first and last elements less often and be biased.
///
/// Every worker draws the same offset, so payloads line up and all-reduce
/// with no indices at all: k values on the wire (plus a 40-byte message
/// header and shape for a self-contained send).
template <class T = float, rescale Scale = rescale::unbiased>
class random_contiguous_block {
 public:
  using value_type = T;
  using payload = block_payload<T>;
  static constexpr bool unbiased = Scale == rescale::unbiased;
  static constexpr bool shared_support = true;

  explicit random_contiguous_block(random_contiguous_block_options options) : options_(options) {
    detail::check_count_options("gcomp::random_contiguous_block", options.k, options.ratio);
  }

  /// Block length for an n-element gradient (throws if k > n).
  std::size_t kept(std::size_t n) const {
    return detail::count_for("gcomp::random_contiguous_block", options_.k, options_.ratio, n);
  }

  /// The offset every worker draws at this key for an n-element gradient:
  /// lets a trainer know which block is sent (0 when nothing is kept).
  std::size_t offset_for(rng_key key, std::size_t n) const {
    if (kept(n) == 0) return 0;
    return static_cast<std::size_t>(
        detail::uniform_below(key.shared().fork(detail::random_block_tag), 0, n));
  }

  /// E||C(x)||^2 = alpha ||x||^2 in expectation: n / k rescaled, 1 otherwise.
  double alpha(std::size_t n) const {
    const std::size_t k = kept(n);
    if constexpr (Scale == rescale::unbiased)
      return k == 0 ? 1.0 : static_cast<double>(n) / static_cast<double>(k);
    return 1.0;
  }

  template <class Policy>
  void compress(const Policy& policy, std::span<const T> gradient, payload& message, rng_key key) {
    const std::size_t n = gradient.size();
    const std::size_t k = kept(n);  // throws before anything is written
    const std::size_t offset = offset_for(key, n);
    message.dimension = n;
    message.offset = offset;
    message.data.resize(k);
    T* v = message.data.data();
    const T* g = gradient.data();
    const T s = Scale == rescale::unbiased && k > 0
                    ? static_cast<T>(static_cast<double>(n) / static_cast<double>(k))
                    : T(1);
    using gather = detail::block_gather<T, Scale == rescale::unbiased>;
    if constexpr (host_policy<Policy>) {
      for_each_index(policy, k, gather{g, v, offset, n, s});
    } else {
      // Device memory: the block is gathered (and scaled) into device
      // scratch, then copied into the host message.
      device_.resize(policy, k, "gcomp::random_contiguous_block::compress");
      for_each_index(policy, k, gather{g, device_.data(), offset, n, s});
      copy_to_host(policy, std::span<const T>(device_.data(), k), std::span<T>(v, k));
    }
  }

  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<T> out, T scale) const {
    constexpr std::string_view where = "gcomp::random_contiguous_block::decompress_add";
    const std::size_t n = out.size();
    if (message.dimension != n)
      fail(where, "message dimension is ", message.dimension, " but out has size ", n);
    const std::size_t k = kept(n);
    if (message.size() != k)
      fail(where, "message has ", message.size(), " values but this random block keeps ", k,
           " of ", n);
    if (n == 0 ? message.offset != 0 : message.offset >= n)
      fail(where, "message offset ", message.offset, " is out of range for size ", n);
    const T* v = message.data.data();
    if constexpr (!host_policy<Policy>) {
      // Device memory: the checked values are uploaded, then added in place.
      if (k == 0) return;
      device_.resize(policy, k, where);
      copy_from_host(policy, std::span<const T>(v, k), device_.span());
      v = device_.data();
    }
    for_each_index(policy, k,
                   detail::block_add<T>{v, out.data(), static_cast<std::size_t>(message.offset), n, scale});
  }

  std::size_t wire_bytes(const payload& message) const { return encoded_size(message); }

  double bits_per_element(std::size_t n) const {
    if (n == 0) return 0.0;
    const std::size_t bytes = wire::header_bytes + 16 + kept(n) * sizeof(T);
    return 8.0 * static_cast<double>(bytes) / static_cast<double>(n);
  }

  const random_contiguous_block_options& options() const { return options_; }

 private:
  random_contiguous_block_options options_;
  // Device scratch (cuda_par, thrust_device): the block's values on their way
  // to or from the host message.
  mutable policy_buffer<T> device_;
};

}  // namespace gcomp
