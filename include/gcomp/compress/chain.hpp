// chain<A, B>: A picks a support (top-k, random-k, a random block), B compresses the values A kept (e.g. QSGD): the sparsify-then-quantize compositions of DGC-style pipelines.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/core/wire.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp {

namespace detail {

inline constexpr std::uint64_t chain_tag = 0x6e69616863706d63ull;  // "cmpchain"

/// A payload whose support can travel without its values: what A must offer.
template <class P>
concept support_payload = requires(P& p, const P& cp, std::vector<std::byte>& out,
                                   std::span<const std::byte> bytes) {
  { p.values() } -> std::convertible_to<std::span<typename P::value_type>>;
  { cp.dimension } -> std::convertible_to<std::uint64_t>;
  { encoded_support_size(cp) } -> std::convertible_to<std::size_t>;
  encode_support(cp, out);
  decode_support(bytes, p, std::uint64_t{0});
};

/// A part that writes a checkpoint section of its own (one with state).
template <class P>
concept saves_checkpoint_state = requires(const P& part, checkpoint_writer& out) {
  part.save(out);
};

}  // namespace detail

/// A chain's message: A's payload (its support; its values are B's input and
/// are not sent) and B's payload of those k values.
///
/// Wire form (kind chained, element = T, flags 0, dimension n):
///   u64 bytes_a | A's support-only message (encode_support)
///   u64 bytes_b | B's message, whose dimension is k (the support's size)
template <class PA, class PB>
struct chain_payload {
  using value_type = typename PA::value_type;
  PA support;
  PB values_message;

  /// B's summable values, when B has them: a chain of two shared-support
  /// compressors all-reduces through these.
  auto values()
    requires requires(PB& b) { b.values(); }
  {
    return values_message.values();
  }
  auto values() const
    requires requires(const PB& b) { b.values(); }
  {
    return values_message.values();
  }
};

template <class PA, class PB>
std::size_t encoded_size(const chain_payload<PA, PB>& message) {
  return wire::header_bytes + 8 + encoded_support_size(message.support) + 8 +
         encoded_size(message.values_message);
}

template <class PA, class PB>
void encode(const chain_payload<PA, PB>& message, std::vector<std::byte>& out) {
  using T = typename PA::value_type;
  // Nested messages are built in place after their length field, so
  // encoding allocates nothing once `out` has grown.
  const std::size_t a_bytes = encoded_support_size(message.support);
  const std::size_t b_bytes = encoded_size(message.values_message);
  auto w = wire::begin(out, wire::kind::chained, wire::element_of<T>, 0,
                       message.support.dimension, 16 + a_bytes + b_bytes);
  w.put(static_cast<std::uint64_t>(a_bytes));
  thread_local std::vector<std::byte> nested;
  encode_support(message.support, nested);
  w.put_array(std::span<const std::byte>(nested));
  w.put(static_cast<std::uint64_t>(b_bytes));
  encode(message.values_message, nested);
  w.put_array(std::span<const std::byte>(nested));
}

template <class PA, class PB>
void decode(std::span<const std::byte> bytes, chain_payload<PA, PB>& into,
            std::uint64_t dimension = wire::any_dimension) {
  using T = typename PA::value_type;
  constexpr std::string_view where = "gcomp::decode(chain_payload)";
  wire::opened msg = wire::open(bytes, wire::kind::chained, wire::element_of<T>, dimension, where);
  if (msg.head.flags != 0) fail(where, "unknown flags ", unsigned(msg.head.flags));
  const auto a_bytes = msg.body.get<std::uint64_t>("support bytes");
  const auto a = msg.body.take_bytes(a_bytes, "support message");
  const auto b_bytes = msg.body.get<std::uint64_t>("values bytes");
  const auto b = msg.body.take_bytes(b_bytes, "values message");
  msg.body.finish();
  // Decode into copies (their capacity reused across calls on this thread) so
  // that a bad second part leaves `into` as it was.
  thread_local PA support;
  thread_local PB values;
  decode_support(a, support, msg.head.dimension);
  decode(b, values, static_cast<std::uint64_t>(support.values().size()));
  using std::swap;
  swap(into.support, support);
  swap(into.values_message, values);
}

/// C(g) = A's decompression of B(A's kept values): A selects a support and
/// B compresses only the k values on it, e.g. chain<topk<>, qsgd<>> sends the
/// top-k indices and k quantized values instead of k floats.
///
/// B gets its own sub-stream of the key (key.fork), so its randomness is
/// independent of A's and the expectations multiply: the chain is unbiased
/// iff both are. Shared support needs both: A's positions must agree across
/// workers and B's encodings of the k values must line up too; then summing
/// B's values() sums the chain's outputs (both decompressions are linear in
/// those values). Any other chain needs an allgather.
///
/// A::payload must offer values() and the support wire form
/// (encode_support, decode_support, encoded_support_size: sparse_payload and
/// block_payload do); B::payload the full wire form (wire_payload).
template <class A, class B>
  requires detail::support_payload<typename A::payload> && wire_payload<typename B::payload>
class chain {
 public:
  using value_type = typename A::value_type;
  using payload = chain_payload<typename A::payload, typename B::payload>;
  static constexpr bool unbiased = compressor_traits<A>::unbiased && compressor_traits<B>::unbiased;
  static constexpr bool shared_support =
      compressor_traits<A>::shared_support && compressor_traits<B>::shared_support;

  chain() = default;
  chain(A first, B second) : first_(std::move(first)), second_(std::move(second)) {}

  template <class Policy>
  void compress(const Policy& policy, std::span<const value_type> gradient, payload& message,
                rng_key key) {
    // A's support is staged in scratch_ and swapped in only once B has
    // accepted the kept values, so a throwing A or B leaves the message as it
    // was (the swap keeps both buffers' capacity for the next step).
    first_.compress(policy, gradient, scratch_, key);
    auto kept = scratch_.values();
    if constexpr (host_policy<Policy>) {
      second_.compress(policy, std::span<const value_type>(kept.data(), kept.size()),
                       message.values_message, key.fork(detail::chain_tag));
    } else {
      // A's message is on the host and B takes device memory: the k kept
      // values go up once.
      device_.resize(policy, kept.size(), "gcomp::chain::compress");
      copy_from_host(policy, std::span<const value_type>(kept.data(), kept.size()), device_.span());
      second_.compress(policy, std::span<const value_type>(device_.data(), kept.size()),
                       message.values_message, key.fork(detail::chain_tag));
    }
    using std::swap;
    swap(message.support, scratch_);
  }

  /// Decodes B's values into a copy of A's support, then lets A scatter them.
  /// The copy lives in this object, so two threads must not decompress
  /// through one chain object at the same time.
  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<value_type> out,
                      value_type scale) const {
    constexpr std::string_view where = "gcomp::chain::decompress_add";
    if (message.support.dimension != out.size())
      fail(where, "message dimension is ", message.support.dimension, " but out has size ",
           out.size());
    scratch_ = message.support;  // copy-assignment reuses the capacity
    auto kept = scratch_.values();
    if constexpr (host_policy<Policy>) {
      value_type* v = kept.data();
      for_each_index(policy, kept.size(), [=](std::size_t j) { v[j] = value_type(0); });
      second_.decompress_add(policy, message.values_message, kept, value_type(1));
    } else {
      // B decodes into zeroed device memory; the k values come down into the
      // support's copy, which A then adds on the device.
      device_.assign(policy, kept.size(), value_type(0), where);
      second_.decompress_add(policy, message.values_message, device_.span(), value_type(1));
      copy_to_host(policy, std::span<const value_type>(device_.data(), kept.size()), kept);
    }
    first_.decompress_add(policy, scratch_, out, scale);
  }

  std::size_t wire_bytes(const payload& message) const { return encoded_size(message); }

  /// The chain's own header and two length fields, A's support message and
  /// B's message for the k kept values, per element of an n-element gradient.
  /// A's support message is A's message without its k values (exact for
  /// sparse_payload and block_payload). When A cannot say its k (no kept(n)),
  /// this falls back to A's own bits per element.
  double bits_per_element(std::size_t n) const {
    const double a_bits = compressor_traits<A>::bits_per_element(first_, n);
    if constexpr (requires(const A& a) { { a.kept(n) } -> std::convertible_to<std::size_t>; }) {
      if (n == 0) return 0.0;
      const std::size_t k = first_.kept(n);
      const double kd = static_cast<double>(k);
      const double support_bits = a_bits * static_cast<double>(n) - 8.0 * sizeof(value_type) * kd;
      const double b_bits = k == 0 ? 8.0 * wire::header_bytes
                                   : compressor_traits<B>::bits_per_element(second_, k) * kd;
      return (8.0 * (wire::header_bytes + 16) + support_bits + b_bits) / static_cast<double>(n);
    } else {
      return a_bits;
    }
  }

  /// Checkpoint section "gcomp::chain" (version 1), only when A or B has
  /// state (an error_feedback inside): A's section, then B's, nested. A chain
  /// of stateless parts writes nothing, like the parts themselves.
  void save(checkpoint_writer& out) const
    requires detail::saves_checkpoint_state<A> || detail::saves_checkpoint_state<B>
  {
    out.begin("gcomp::chain", 1);
    save_state(out, first_);
    save_state(out, second_);
    out.end();
  }

  /// Reads save()'s section into copies of A and B, which replace them only
  /// when both loaded, so a rejected checkpoint leaves the chain unchanged.
  template <class Policy>
    requires detail::saves_checkpoint_state<A> || detail::saves_checkpoint_state<B>
  void load(const Policy& policy, checkpoint_reader& in) {
    in.begin("gcomp::chain", 1);
    A first(first_);
    B second(second_);
    load_state(policy, in, first);
    load_state(policy, in, second);
    in.end();
    first_ = std::move(first);
    second_ = std::move(second);
  }

  A& first() { return first_; }
  const A& first() const { return first_; }
  B& second() { return second_; }
  const B& second() const { return second_; }

 private:
  A first_;
  B second_;
  mutable typename A::payload scratch_;  // compress's staged support, decompress_add's copy
  mutable policy_buffer<value_type> device_;  // B's input and output under a device policy
};

}  // namespace gcomp
