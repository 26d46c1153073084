// ef21<C>: send the compressed change of a gradient estimate both sides keep (Richtarik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically Better, and Practically Faster Error Feedback", NeurIPS 2021).
#pragma once

#include <algorithm>
#include <cstddef>
#include <span>
#include <utility>

#include "gcomp/compress/detail/stateful_wrapper.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/random.hpp"
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
    this->prepare("gcomp::ef21::compress", "state", n);
    value_type* d = this->scratch_.data();  // g - h, reused
    const value_type* h = this->state_.data();
    const value_type* g = gradient.data();
    for_each_index(policy, n, [=](std::size_t i) { d[i] = g[i] - h[i]; });
    this->inner_.compress(policy, std::span<const value_type>(this->scratch_), message, key);
    this->started_ = true;
    this->inner_.decompress_add(policy, message, std::span<value_type>(this->state_),
                                value_type(1));
  }

  // decompress_add(policy, message, out, scale) (from the base):
  // out += scale * (the increment of h that `message` carries).

  /// The worker's estimate h after the last compress() (empty before the first).
  std::span<const value_type> state() const { return this->state_; }
  /// Writable h (empty before the first compress() or assign_state()).
  std::span<value_type> state() { return this->state_; }
  /// Sets h (and its size) before or between steps, e.g. h = g_0.
  void assign_state(std::span<const value_type> h) {
    this->state_.assign(h.begin(), h.end());
    this->started_ = true;
  }
  /// h = 0 again (storage and size kept); the receiver must reset its
  /// estimate at the same step.
  void reset() { std::fill(this->state_.begin(), this->state_.end(), value_type(0)); }

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
