// error_feedback<C>: compress the gradient plus the error left over from earlier steps (Seide et al., "1-bit SGD", 2014; Karimireddy et al., "Error Feedback Fixes SignSGD", ICML 2019).
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
class error_feedback : public detail::stateful_wrapper<C> {
  using base = detail::stateful_wrapper<C>;

 public:
  using typename base::payload;
  using typename base::value_type;

  error_feedback() = default;
  explicit error_feedback(C inner) : base(std::move(inner)) {}

  template <class Policy>
  void compress(const Policy& policy, std::span<const value_type> gradient, payload& message,
                rng_key key) {
    const std::size_t n = gradient.size();
    this->prepare(policy, "gcomp::error_feedback::compress", "residual", n);
    value_type* p = this->scratch_.data();  // p = e + g, swapped with e every step
    const value_type* e = this->state_.data();
    const value_type* g = gradient.data();
    for_each_index(policy, n, [=] GCOMP_HD(std::size_t i) { p[i] = detail::add_unfused(e[i], g[i]); });
    this->inner_.compress(policy, std::span<const value_type>(this->scratch_.span()), message, key);
    // Only now is e replaced: p becomes the residual and loses what was sent.
    std::swap(this->state_, this->scratch_);
    this->started_ = true;
    this->inner_.decompress_add(policy, message, this->state_.span(), value_type(-1));
  }

  /// The residual e after the last compress() (empty before the first), in
  /// the memory of the policy it was built under (device memory under
  /// cuda_par: read it with gcomp::copy_to_host).
  std::span<const value_type> residual() const { return this->state_span(); }
  /// Writable residual, for methods that replace e (e.g. by its average over
  /// workers, ALGORITHMS.md section 4). Empty before the first compress().
  std::span<value_type> residual() { return this->state_span(); }
  /// Zeroes the residual (keeping its storage and size); host memory only.
  void reset() { this->zero_host_state("gcomp::error_feedback::reset"); }
  /// Zeroes the residual with `policy`'s kernels (any memory it serves).
  template <class Policy>
  void reset(const Policy& policy) { this->zero_state(policy); }

  /// Checkpoint section "gcomp::error_feedback" (version 1): started, the
  /// residual, and C's section when C has state (PowerSGD's warm starts).
  void save(checkpoint_writer& out) const {
    this->save_section(out, "gcomp::error_feedback", "residual");
  }
  /// Reads save()'s section; a started object takes only a residual of its
  /// own size, and a rejected checkpoint leaves it unchanged.
  template <class Policy>
  void load(const Policy& policy, checkpoint_reader& in) {
    this->load_section(policy, in, "gcomp::error_feedback", "residual");
  }
};

}  // namespace gcomp
