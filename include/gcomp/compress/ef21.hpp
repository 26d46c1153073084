// ef21<C>: send the compressed change of a gradient estimate both sides keep (Richtarik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically Better, and Practically Faster Error Feedback", NeurIPS 2021).
#pragma once

#include <algorithm>
#include <cstddef>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/core/concepts.hpp"
#include "gcomp/core/error.hpp"
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
class ef21 {
 public:
  using compressor_type = C;
  using value_type = typename C::value_type;
  using payload = typename C::payload;
  static constexpr bool unbiased = false;
  static constexpr bool shared_support = compressor_traits<C>::shared_support;

  ef21() = default;
  explicit ef21(C inner) : inner_(std::move(inner)) {}

  template <class Policy>
  void compress(const Policy& policy, std::span<const value_type> gradient, payload& message,
                rng_key key) {
    constexpr std::string_view where = "gcomp::ef21::compress";
    const std::size_t n = gradient.size();
    if (started_)
      check_same_size(where, "gradient", n, "state", state_.size());
    else
      state_.assign(n, value_type(0));
    difference_.resize(n);
    value_type* d = difference_.data();
    const value_type* h = state_.data();
    const value_type* g = gradient.data();
    for_each_index(policy, n, [=](std::size_t i) { d[i] = g[i] - h[i]; });
    inner_.compress(policy, std::span<const value_type>(difference_), message, key);
    started_ = true;
    inner_.decompress_add(policy, message, std::span<value_type>(state_), value_type(1));
  }

  /// out += scale * (the increment of h that `message` carries).
  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<value_type> out,
                      value_type scale) const {
    inner_.decompress_add(policy, message, out, scale);
  }

  std::size_t wire_bytes(const payload& message) const { return inner_.wire_bytes(message); }
  double bits_per_element(std::size_t n) const {
    return compressor_traits<C>::bits_per_element(inner_, n);
  }

  /// The worker's estimate h after the last compress() (empty before the first).
  std::span<const value_type> state() const { return state_; }
  /// Writable h (empty before the first compress() or assign_state()).
  std::span<value_type> state() { return state_; }
  /// Sets h (and its size) before or between steps, e.g. h = g_0.
  void assign_state(std::span<const value_type> h) {
    state_.assign(h.begin(), h.end());
    started_ = true;
  }
  /// h = 0 again (storage and size kept); the receiver must reset its
  /// estimate at the same step.
  void reset() { std::fill(state_.begin(), state_.end(), value_type(0)); }

  C& inner() { return inner_; }
  const C& inner() const { return inner_; }

 private:
  C inner_;
  std::vector<value_type> state_;       // h
  std::vector<value_type> difference_;  // g - h, reused
  bool started_ = false;
};

}  // namespace gcomp
