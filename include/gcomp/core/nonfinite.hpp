// nonfinite: what a step does with a NaN or Inf gradient, and the guard that makes every worker agree.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <type_traits>

#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/concepts.hpp"  // layer_mask
#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp {

/// What a training step does when some worker's gradient holds NaN or Inf.
enum class on_nonfinite : std::uint8_t {
  /// Every worker skips the step: parameters, residuals, optimizer moments,
  /// sampler probabilities, lazy/stale state and the step counter stay as they
  /// were, and the skip is counted. The default: one overflowing batch (fp16
  /// loss scaling, a bad sample) should not end or poison a run.
  skip_step,
  /// Every worker throws gcomp::error, with all state unchanged.
  throw_error,
  /// No check and no extra communication: the values flow through as they
  /// are (compressors that reject non-finite input still throw).
  propagate,
};

constexpr std::string_view to_string(on_nonfinite action) {
  switch (action) {
    case on_nonfinite::skip_step: return "skip_step";
    case on_nonfinite::throw_error: return "throw_error";
    case on_nonfinite::propagate: return "propagate";
  }
  return "unknown";
}

/// 1 when v is NaN or +-Inf, else 0. Written without std::isfinite so that
/// the same expression runs in device code: v - v is 0 exactly when v is
/// finite. float16/bfloat16 are widened with their to_float (core/half.hpp).
template <class T>
GCOMP_HD inline std::size_t nonfinite_flag(T value) {
  if constexpr (std::is_floating_point_v<T>) {
    const T d = value - value;
    return d == T(0) ? 0 : 1;
  } else {
    const float v = to_float(value);
    const float d = v - v;
    return d == 0.0f ? 0 : 1;
  }
}

/// The number of NaN/Inf entries of `values`, counted with the policy.
template <class Policy, class T>
std::size_t count_nonfinite(const Policy& policy, std::span<const T> values) {
  const T* v = values.data();
  return transform_reduce(
      policy, values.size(), std::size_t{0},
      [] GCOMP_HD(std::size_t a, std::size_t b) { return a + b; },
      [=] GCOMP_HD(std::size_t i) { return nonfinite_flag(v[i]); });
}

/// The index of the first NaN/Inf entry of `values` (values.size() if none).
template <class Policy, class T>
std::size_t first_nonfinite(const Policy& policy, std::span<const T> values) {
  const T* v = values.data();
  const std::size_t n = values.size();
  return transform_reduce(
      policy, n, n, [] GCOMP_HD(std::size_t a, std::size_t b) { return a < b ? a : b; },
      [=] GCOMP_HD(std::size_t i) { return nonfinite_flag(v[i]) ? i : n; });
}

/// Decides, the same way on every worker, whether a step goes ahead.
///
/// admit() counts the non-finite entries of this worker's gradient and sums
/// a one-element flag (the number of workers that saw any) over the
/// communicator, so all workers take the same decision even though only one
/// of them saw the NaN. The flag is an all-reduce of one T of its own (a
/// separate collective, sizeof(T) bytes per worker per step) rather than a
/// slot in the gradient's message, because compressors and aggregators
/// change the gradient's wire format and an Inf would be lost inside them (a
/// sign, a top-k that drops it, a quantizer whose norm becomes Inf); the
/// check must happen before the gradient touches any state. propagate skips
/// the check and the collective.
///
/// One guard per worker; methods and gcomp::pipeline hold one each. The flag
/// lives in the policy's memory (one element, allocated at the first check).
template <class T>
class nonfinite_guard {
 public:
  explicit nonfinite_guard(on_nonfinite action = on_nonfinite::skip_step) { set_action(action); }

  on_nonfinite action() const { return action_; }
  void set_action(on_nonfinite action) {
    require(action == on_nonfinite::skip_step || action == on_nonfinite::throw_error ||
                action == on_nonfinite::propagate,
            "gcomp::nonfinite_guard", "action must be skip_step, throw_error or propagate, got ",
            static_cast<int>(action));
    action_ = action;
  }

  /// True when the step may go ahead. With skip_step it is false on every
  /// worker as soon as any worker's gradient has a NaN/Inf (the skip is
  /// counted); with throw_error every worker throws gcomp::error naming
  /// `where`, how many workers saw non-finite values and this worker's count
  /// and first index; with propagate it is true without looking.
  template <class Policy, class Comm>
  bool admit(const Policy& policy, Comm& comm, std::span<const T> gradient,
             std::string_view where) {
    if (action_ == on_nonfinite::propagate) return true;
    const std::size_t local = count_nonfinite(policy, gradient);
    return agree(policy, comm, local, where, [&] { return first_nonfinite(policy, gradient); });
  }

  /// As admit(), looking only at the layers with active[d] != 0 (the others
  /// are not read by the step, e.g. JointSpar's dropped layers).
  template <class Policy, class Comm>
  bool admit(const Policy& policy, Comm& comm, const layout& lay, layer_mask active,
             std::span<const T> gradient, std::string_view where) {
    if (action_ == on_nonfinite::propagate) return true;
    std::size_t local = 0;
    for (std::size_t d = 0; d < lay.num_layers(); ++d)
      if (active.empty() || active[d] != 0)
        local += count_nonfinite(policy, gradient.subspan(lay[d].offset, lay[d].size));
    return agree(policy, comm, local, where, [&] {
      for (std::size_t d = 0; d < lay.num_layers(); ++d) {
        if (!active.empty() && active[d] == 0) continue;
        const auto part = gradient.subspan(lay[d].offset, lay[d].size);
        const std::size_t i = first_nonfinite(policy, part);
        if (i < part.size()) return lay[d].offset + i;
      }
      return gradient.size();
    });
  }

  /// A check without communication, for steps that are local to one worker
  /// (RI-SGD's local steps): the decision is this worker's own.
  template <class Policy>
  bool admit_local(const Policy& policy, std::span<const T> gradient, std::string_view where) {
    if (action_ == on_nonfinite::propagate) return true;
    const std::size_t local = count_nonfinite(policy, gradient);
    if (local == 0) return true;
    if (action_ == on_nonfinite::throw_error)
      fail(where, "the gradient has ", local, " non-finite entries (first at index ",
           first_nonfinite(policy, gradient), ")");
    local_steps_ += 1;
    skipped_ += 1;
    return false;
  }

  /// Steps skipped so far (on every worker the same number, for admit()).
  std::uint64_t skipped_steps() const { return skipped_; }
  /// Skipped steps in which this worker's own gradient had non-finite entries
  /// (the others were skipped for another worker's). A throwing check counts
  /// nothing: with throw_error the guard, like the step, is left unchanged.
  std::uint64_t local_nonfinite_steps() const { return local_steps_; }

  void save(checkpoint_writer& out) const {
    out.begin("gcomp::nonfinite_guard", 1);
    out.value("skipped_steps", skipped_);
    out.value("local_nonfinite_steps", local_steps_);
    out.end();
  }
  template <class Policy>
  void load(const Policy&, checkpoint_reader& in) {
    in.begin("gcomp::nonfinite_guard", 1);
    const auto skipped = in.value<std::uint64_t>("skipped_steps");
    const auto local = in.value<std::uint64_t>("local_nonfinite_steps");
    in.end();
    skipped_ = skipped;
    local_steps_ = local;
  }

 private:
  template <class Policy, class Comm, class FirstIndex>
  bool agree(const Policy& policy, Comm& comm, std::size_t local, std::string_view where,
             FirstIndex&& first_index) {
    // Allocates at the first check only (or when the policy's memory changes).
    flag_.assign(policy, 1, local > 0 ? T(1) : T(0), where);
    comm.allreduce_sum(policy, flag_.span());
    std::array<T, 1> host{};
    flag_.copy_to_host(std::span<T>(host), where);
    const double workers = static_cast<double>(host[0]);
    if (!(workers > 0.0)) return true;
    if (action_ == on_nonfinite::throw_error) {
      if (local > 0)
        fail(where, "non-finite gradient on ", workers, " of ", comm.size(),
             " workers; this worker has ", local, " non-finite entries, the first at index ",
             first_index());
      fail(where, "non-finite gradient on ", workers, " of ", comm.size(),
           " workers (this worker's gradient is finite)");
    }
    if (local > 0) local_steps_ += 1;
    skipped_ += 1;
    return false;
  }

  on_nonfinite action_ = on_nonfinite::skip_step;
  policy_buffer<T> flag_;
  std::uint64_t skipped_ = 0;
  std::uint64_t local_steps_ = 0;
};

}  // namespace gcomp
