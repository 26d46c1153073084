// ef21<C>: send the compressed change of a gradient estimate both sides keep (Richtarik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically Better, and Practically Faster Error Feedback", NeurIPS 2021).
#pragma once

#include <algorithm>
#include <cstddef>
#include <span>
#include <utility>

#include "gcomp/compress/detail/stateful_wrapper.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/exec/detail/unfused.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp {

/// Wraps a compressor C (a contraction such as top-k; any C works) with the
/// worker's gradient estimate h (zero at first):
///   message = C(g - h);  h = h + decompress(message).
///
/// How it fits decompress_add: the message stands for the *increment* of h,
/// not for the gradient. decompress_add(message, out, scale) adds
/// scale * increment to out, so a receiver that keeps `out` between steps
/// (never zeroing it) holds scale * sum of increments = scale * h of the
/// sender; summing every worker's messages with scale 1/M into one persistent
/// buffer keeps the server's estimate G = (1/M) sum_m h_m, the quantity EF21
/// steps with. An aggregator that zeroes its output every step (allreduce)
/// would see only the mean increment, so plain allreduce + ef21 is wrong: it
/// needs an accumulating aggregator (to come), or a caller that keeps G
/// itself. Because increments add, shared support (an all-reduce of the
/// increments into a persistent G) is exactly C's.
///
/// Biased (h lags g). One object per worker; h is allocated at the first
/// compress() and reused. compress() keeps one more buffer for g - h so that
/// a throwing C leaves h untouched.
template <class C>
class ef21 : public detail::stateful_wrapper<C> {
  using base = detail::stateful_wrapper<C>;

 public:
  using typename base::payload;
  using typename base::value_type;

  ef21() = default;
  explicit ef21(C inner) : base(std::move(inner)) {}

  template <class Policy>
  void compress(const Policy& policy, std::span<const value_type> gradient, payload& message,
                rng_key key) {
    const std::size_t n = gradient.size();
    this->prepare(policy, "gcomp::ef21::compress", "state", n);
    value_type* d = this->scratch_.data();  // g - h, reused
    const value_type* h = this->state_.data();
    const value_type* g = gradient.data();
    for_each_index(policy, n, [=] GCOMP_HD(std::size_t i) { d[i] = detail::sub_unfused(g[i], h[i]); });
    this->inner_.compress(policy, std::span<const value_type>(this->scratch_.span()), message, key);
    this->started_ = true;
    this->inner_.decompress_add(policy, message, this->state_.span(), value_type(1));
  }

  // decompress_add(policy, message, out, scale) (from the base):
  // out += scale * (the increment of h that `message` carries).

  /// The worker's estimate h after the last compress() (empty before the
  /// first), in the memory of the policy it was built under (device memory
  /// under cuda_par: read it with gcomp::copy_to_host).
  std::span<const value_type> state() const { return this->state_span(); }
  /// Writable h (empty before the first compress() or assign_state()).
  std::span<value_type> state() { return this->state_span(); }
  /// Sets h (and its size) before or between steps, e.g. h = g_0, from host
  /// memory into host memory (for host policies).
  void assign_state(std::span<const value_type> h) { assign_state(host_seq{}, h); }
  /// Sets h from host memory into the memory of `policy`.
  template <class Policy>
  void assign_state(const Policy& policy, std::span<const value_type> h) {
    this->state_.assign_from_host(policy, h, "gcomp::ef21::assign_state");
    this->started_ = true;
  }
  /// h = 0 again (storage and size kept); the receiver must reset its
  /// estimate at the same step. Host memory only.
  void reset() { this->zero_host_state("gcomp::ef21::reset"); }
  /// h = 0 with `policy`'s kernels (any memory it serves).
  template <class Policy>
  void reset(const Policy& policy) { this->zero_state(policy); }

  /// Checkpoint section "gcomp::ef21" (version 1): started, h (as "state"),
  /// and C's section when C has state. The receiver's estimate G is the
  /// caller's (or its aggregator's) state, not this object's.
  void save(checkpoint_writer& out) const { this->save_section(out, "gcomp::ef21", "state"); }
  /// Reads save()'s section; a started object takes only an h of its own
  /// size, and a rejected checkpoint leaves it unchanged.
  template <class Policy>
  void load(const Policy& policy, checkpoint_reader& in) {
    this->load_section(policy, in, "gcomp::ef21", "state");
  }
};

}  // namespace gcomp
