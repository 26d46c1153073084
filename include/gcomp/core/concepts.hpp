// The concepts that define gcomp's parts: policies, compressors, communicators, aggregators, optimizers.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "gcomp/comm/stats.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/exec/host.hpp"
#include "gcomp/exec/policy.hpp"

namespace gcomp {

// ---------------------------------------------------------------------------
// Compressors

/// What a pipeline may rely on about a compressor. The default reads the
/// compressor's own static members; a third-party compressor may specialize
/// this instead.
///  - unbiased: E[decompress(compress(g))] = g over the random key.
///  - shared_support: payloads of different workers line up index by index
///    (same length, same positions), so they can be summed by an all-reduce
///    without decoding.
///  - bits_per_element(c, n): bits on the wire per gradient element for an
///    n-element input (headers included), for reports and byte budgets.
template <class C>
struct compressor_traits {};  // no members: a type without them is no compressor

template <class C>
  requires requires(const C& c, std::size_t n) {
    { C::unbiased } -> std::convertible_to<bool>;
    { C::shared_support } -> std::convertible_to<bool>;
    { c.bits_per_element(n) } -> std::convertible_to<double>;
  }
struct compressor_traits<C> {
  static constexpr bool unbiased = C::unbiased;
  static constexpr bool shared_support = C::shared_support;
  static double bits_per_element(const C& c, std::size_t n) { return c.bits_per_element(n); }
};

/// A compressor turns a gradient into a payload (a message type) and adds a
/// scaled decoded payload into an output. Checked for policy P and element
/// type T (host_seq and float by default).
template <class C, class P = host_seq, class T = float>
concept compressor =
    execution_policy<P> &&
    requires(C& c, const C& cc, const P& policy, std::span<const T> gradient,
             typename C::payload& message, const typename C::payload& const_message,
             std::span<T> out, T scale, rng_key key, std::size_t n) {
      typename C::payload;
      c.compress(policy, gradient, message, key);
      cc.decompress_add(policy, const_message, out, scale);
      { cc.wire_bytes(const_message) } -> std::convertible_to<std::size_t>;
      { compressor_traits<C>::unbiased } -> std::convertible_to<bool>;
      { compressor_traits<C>::shared_support } -> std::convertible_to<bool>;
      { compressor_traits<C>::bits_per_element(cc, n) } -> std::convertible_to<double>;
    };

/// A compressor whose payloads of different workers can be all-reduced as
/// they are: it has shared support and its payload exposes the span of T that
/// is summed (`values()`).
template <class C, class P = host_seq, class T = float>
concept allreducible_compressor =
    compressor<C, P, T> && compressor_traits<C>::shared_support &&
    requires(typename C::payload& message) {
      { message.values() } -> std::convertible_to<std::span<T>>;
    };

/// A payload that travels as bytes: encoded_size / encode / decode found by
/// argument-dependent lookup (core/message.hpp describes the contract).
template <class P>
concept wire_payload = requires(const P& cp, P& p, std::vector<std::byte>& out,
                                std::span<const std::byte> in, std::uint64_t dimension) {
  { encoded_size(cp) } -> std::convertible_to<std::size_t>;
  encode(cp, out);
  decode(in, p, dimension);
};

// ---------------------------------------------------------------------------
// Communicators

/// The handle a finished non-blocking collective is waited on with.
template <class R>
concept collective_request = requires(R& r) {
  r.wait();
  { r.test() } -> std::convertible_to<bool>;
};

/// One rank's view of a group of workers (in-process threads, MPI ranks,
/// NCCL ranks). Checked for policy P and element type T.
template <class X, class P = host_seq, class T = float>
concept communicator =
    execution_policy<P> &&
    requires(X& x, const X& cx, const P& policy, std::span<T> data, std::span<const std::byte> in,
             std::span<std::byte> out, std::vector<std::byte>& grown, std::span<std::size_t> counts,
             int root) {
      { cx.rank() } -> std::convertible_to<int>;
      { cx.size() } -> std::convertible_to<int>;
      x.allreduce_sum(policy, data);
      x.allgather(policy, in, out);
      x.allgatherv(policy, in, grown, counts);
      x.broadcast(policy, data, root);
      x.barrier();
      { x.iallreduce_sum(policy, data) } -> collective_request;
      { cx.stats() } -> std::convertible_to<comm_stats>;
    };

// ---------------------------------------------------------------------------
// Aggregators and optimizers

/// Per-layer switch: a non-empty mask with mask[d] == 0 leaves layer d (its
/// parameters and the optimizer's state for it) untouched. An empty mask
/// means every layer is active.
using layer_mask = std::span<const std::uint8_t>;

/// Turns every worker's local gradient into the global gradient (the same on
/// all workers) through a compressor and a communicator.
template <class A, class C, class X, class P = host_seq, class T = float>
concept aggregator =
    compressor<C, P, T> && communicator<X, P, T> &&
    requires(A& a, const P& policy, X& comm, C& c, std::span<const T> local, std::span<T> global,
             rng_key key) { a.aggregate(policy, comm, c, local, global, key); };

/// Updates parameters from gradients, layer by layer.
template <class O, class P = host_seq, class T = float>
concept optimizer = execution_policy<P> &&
                    requires(O& o, const P& policy, const layout& lay, std::span<T> params,
                             std::span<const T> grads, layer_mask active) {
                      o.step(policy, lay, params, grads, active);
                    };

}  // namespace gcomp
