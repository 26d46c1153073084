// error_feedback<C>: compress the gradient plus the error left over from earlier steps (Seide et al., "1-bit SGD", 2014; Karimireddy et al., "Error Feedback Fixes SignSGD", ICML 2019).
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

/// Wraps a compressor C with a per-worker residual e (zero at first):
///   p = e + g;  message = C(p);  e = p - decompress(message).
/// What the worker sends over T steps plus its final residual add up to the
/// sum of its gradients, so no gradient mass is ever lost, only delayed; this
/// is what makes biased compressors (top-k, sign, PowerSGD) converge.
///
/// It is a compressor itself with C's payload, so aggregators need not know
/// about it. It is biased whatever C is (the residual is re-sent later), and
/// has shared support exactly when C has: the residual changes what is
/// compressed, not where it lands. Pair it with the unscaled random
/// sparsifiers (rescale::none): with the n / k rescaling the residual
/// p - (n / k) p_kept grows instead of shrinking.
///
/// One object per worker: the residual is that worker's state. It is
/// allocated at the first compress() (sized to that gradient) and reused; a
/// gradient of another size afterwards is an error. compress() needs one more
/// buffer of the same size for p, so that a throwing C leaves e untouched.
template <class C>
class error_feedback {
 public:
  using compressor_type = C;
  using value_type = typename C::value_type;
  using payload = typename C::payload;
  static constexpr bool unbiased = false;
  static constexpr bool shared_support = compressor_traits<C>::shared_support;

  error_feedback() = default;
  explicit error_feedback(C inner) : inner_(std::move(inner)) {}

  template <class Policy>
  void compress(const Policy& policy, std::span<const value_type> gradient, payload& message,
                rng_key key) {
    constexpr std::string_view where = "gcomp::error_feedback::compress";
    const std::size_t n = gradient.size();
    if (started_)
      check_same_size(where, "gradient", n, "residual", residual_.size());
    else
      residual_.assign(n, value_type(0));
    sum_.resize(n);
    value_type* p = sum_.data();
    const value_type* e = residual_.data();
    const value_type* g = gradient.data();
    for_each_index(policy, n, [=](std::size_t i) { p[i] = e[i] + g[i]; });
    inner_.compress(policy, std::span<const value_type>(sum_), message, key);
    // Only now is e replaced: p becomes the residual and loses what was sent.
    std::swap(residual_, sum_);
    started_ = true;
    inner_.decompress_add(policy, message, std::span<value_type>(residual_), value_type(-1));
  }

  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<value_type> out,
                      value_type scale) const {
    inner_.decompress_add(policy, message, out, scale);
  }

  std::size_t wire_bytes(const payload& message) const { return inner_.wire_bytes(message); }
  double bits_per_element(std::size_t n) const {
    return compressor_traits<C>::bits_per_element(inner_, n);
  }

  /// The residual e after the last compress() (empty before the first).
  std::span<const value_type> residual() const { return residual_; }
  /// Writable residual, for methods that replace e (e.g. by its average over
  /// workers, ALGORITHMS.md section 4). Empty before the first compress().
  std::span<value_type> residual() { return residual_; }
  /// Zeroes the residual (keeping its storage and size).
  void reset() { std::fill(residual_.begin(), residual_.end(), value_type(0)); }

  C& inner() { return inner_; }
  const C& inner() const { return inner_; }

 private:
  C inner_;
  std::vector<value_type> residual_;
  std::vector<value_type> sum_;  // p = e + g, swapped with residual_ every step
  bool started_ = false;
};

}  // namespace gcomp
