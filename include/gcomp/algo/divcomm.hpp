// Divisible communication for Adam (Xu & Bai, ECML PKDD 2023) as a ready method: the divisible aggregator feeding gcomp::adam; the design beyond the paper's abstract is ours (ALGORITHMS.md section 4).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/aggregate/divisible.hpp"
#include "gcomp/compress/random_block.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/core/nonfinite.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/optim/adam.hpp"

namespace gcomp {

/// One training step of divisible Adam on every worker:
///   1. foreground: global = mean over workers of C(e + g), e keeps the rest
///      (divisible::aggregate, error feedback);
///   2. Adam on global: m and v are bitwise identical on all workers because
///      their input is the all-reduced global gradient (with weight_decay > 0
///      they also depend on x, see the parameters payload below);
///   3. background (divisible::background): the non-blocking all-reduce of the
///      parameters or of the residual, applied when it has finished, never waited for.
///
/// Workers that start from the same parameters keep bitwise identical
/// parameters with the residual payload or none, whatever the timing. With the
/// parameters payload the correction avg(x_then) - x_then of identical workers
/// is exactly 0 for M = 1, 2 or 4 (the rank-ordered sum of 4 equal values is
/// exactly 4 times the value); for other M it can be an ulp, and ranks that see
/// completion at different steps apply it at different steps, so parameters
/// may then differ by that rounding until the next correction.
///
/// The random key of step t on worker m is rng_key{seed, t, m}; the compressor
/// draws its block from key.shared(), the same on every worker.
///
/// Non-finite gradients (core/nonfinite.hpp): every worker's gradient is
/// checked before the foreground adds it to the residual, and a one-element
/// flag is all-reduced (sizeof(T) bytes, one blocking collective per step,
/// counted by comm.stats() but in neither foreground_stats() nor
/// background_stats()), so all workers decide alike. With skip_step (the
/// default) step() returns false on every worker and nothing changes: not
/// the parameters, the residual, Adam's moments, the step count, nor the
/// background, which is not polled, so an operation in flight simply waits
/// one step longer. throw_error throws gcomp::error on every worker instead;
/// propagate makes no check and no extra all-reduce.
///
/// Checkpoints (core/checkpoint.hpp): save() and load() cover the seed, the
/// step count, the model's size and layer count, the skip count and the
/// compressor's, the aggregator's (residual, background schedule and
/// counters) and Adam's state. They need no background operation in flight:
/// call finish() on every rank, then save; the resumed run equals the run
/// that called finish() at the same step and went on, bitwise. The averaged
/// gradient of the last step (global_gradient()) is an output, not state: it
/// is empty after a load until the next step.
template <class T = float, class C = random_contiguous_block<T, rescale::none>>
class divcomm {
 public:
  using value_type = T;
  using compressor_type = C;

  /// nonfinite: what a step does when a worker's gradient has NaN or Inf.
  divcomm(C compressor, divisible_options background = {}, adam_options adam_opts = {},
          std::uint64_t seed = 0, on_nonfinite nonfinite = on_nonfinite::skip_step)
      : compressor(std::move(compressor)),
        aggregator(background),
        optimizer(adam_opts),
        seed_(seed),
        guard_(nonfinite) {}

  /// One step; params and grads are this worker's flat buffers under `lay`.
  /// Everything is checked before anything changes. Returns true when the
  /// step was taken, false (on every worker alike, nothing changed) when it
  /// was skipped for a non-finite gradient under on_nonfinite::skip_step.
  template <class Policy, class Comm>
    requires allreducible_compressor<C, Policy, T> && communicator<Comm, Policy, T> &&
             communicator<Comm, Policy, std::uint64_t>
  bool step(const Policy& policy, Comm& comm, const layout& lay, std::span<T> params,
            std::span<const T> grads) {
    detail::require_host_memory<Policy>();
    constexpr std::string_view where = "gcomp::divcomm::step";
    lay.check_buffer(where, "params", params.size());
    check_same_size(where, "grads", grads.size(), "params", params.size());
    if (step_ > 0) {
      check_same_size(where, "params", params.size(), "the model of the first step", size_);
      check_same_size(where, "layout layers", lay.num_layers(),
                      "the layers of the first step", layers_);
    }
    aggregator.check_background(comm, params.size());
    // Before the residual absorbs the gradient: a NaN there would never leave it.
    if (!guard_.admit(policy, comm, grads, where)) return false;
    global_.resize(grads.size());
    size_ = params.size();
    layers_ = lay.num_layers();
    aggregator.aggregate(policy, comm, compressor, grads, std::span<T>(global_),
                         rng_key{seed_, step_, static_cast<std::uint32_t>(comm.rank())});
    optimizer.step(policy, lay, params, std::span<const T>(global_));
    aggregator.background(policy, comm, params);
    ++step_;
    return true;
  }

  /// Waits for the background operation in flight and applies it (the only
  /// blocking call; for the end of training). True if something was applied.
  template <class Policy, class Comm>
  bool finish(const Policy& policy, Comm& comm, std::span<T> params) {
    return aggregator.finish(policy, comm, params);
  }

  std::uint64_t steps() const { return step_; }
  std::uint64_t seed() const { return seed_; }
  /// The averaged foreground gradient of the last step (the same on every worker).
  std::span<const T> global_gradient() const { return global_; }
  const comm_stats& foreground_stats() const { return aggregator.foreground_stats(); }
  const comm_stats& background_stats() const { return aggregator.background_stats(); }
  /// Steps skipped because some worker's gradient was not finite (the same on every worker).
  std::uint64_t skipped_steps() const { return guard_.skipped_steps(); }
  on_nonfinite nonfinite_action() const { return guard_.action(); }
  void set_nonfinite_action(on_nonfinite action) { guard_.set_action(action); }

  /// Writes the section "gcomp::divcomm" (version 1): seed, steps, the
  /// model's size and layer count (0 before the first step), then the
  /// sections of the non-finite guard, the compressor (if it has state), the
  /// divisible aggregator and Adam. Throws gcomp::error, writing nothing,
  /// while a background operation is in flight.
  void save(checkpoint_writer& out) const {
    idle("gcomp::divcomm::save");
    out.begin("gcomp::divcomm", 1);
    out.value("seed", seed_);
    out.value("steps", step_);
    out.value("model_size", static_cast<std::uint64_t>(size_));
    out.value("layers", static_cast<std::uint64_t>(layers_));
    guard_.save(out);
    save_state(out, compressor);
    save_state(out, aggregator);
    save_state(out, optimizer);
    out.end();
  }

  /// Reads what save() wrote, into memory `policy` uses. A checkpoint of
  /// another method, seed, compressor, background option or element type, of
  /// another model size or layer count when this object has taken a step,
  /// or a load while a background operation is in flight, is rejected with
  /// gcomp::error and the object is left as it was. A fresh object takes the
  /// checkpoint's model, which its next step() then checks. Loading into a
  /// fresh object and training on gives bitwise the run that called finish()
  /// at the checkpoint and went on. The non-finite action is this object's.
  template <class Policy>
  void load(const Policy& policy, checkpoint_reader& in) {
    constexpr std::string_view where = "gcomp::divcomm::load";
    idle(where);
    divcomm next(*this);  // all or nothing: the parts load into a copy
    in.begin("gcomp::divcomm", 1);
    const auto seed = in.value<std::uint64_t>("seed");
    require(seed == seed_, where, "the checkpoint was written with seed ", seed,
            " but this divcomm has seed ", seed_);
    next.step_ = in.value<std::uint64_t>("steps");
    const auto size = in.value<std::uint64_t>("model_size");
    const auto layers = in.value<std::uint64_t>("layers");
    if (step_ > 0) {
      require(size == size_, where, "the checkpoint's model has ", size,
              " elements but this divcomm's has ", size_);
      require(layers == layers_, where, "the checkpoint's model has ", layers,
              " layers but this divcomm's has ", layers_);
    }
    next.guard_.load(policy, in);
    load_state(policy, in, next.compressor);
    load_state(policy, in, next.aggregator);
    load_state(policy, in, next.optimizer);
    in.end();
    // Past the CRC only a badly written or crafted checkpoint fails these.
    require((next.step_ == 0) == (size == 0) && (size == 0) == (layers == 0), where,
            "steps ", next.step_, ", model_size ", size, " and layers ", layers,
            " do not fit together (all 0 before the first step, none after)");
    if (next.step_ > 0)
      check_same_size(where, "the checkpoint's residual", next.aggregator.residual().size(),
                      "its model_size", static_cast<std::size_t>(size));
    next.size_ = static_cast<std::size_t>(size);
    next.layers_ = static_cast<std::size_t>(layers);
    next.global_.clear();  // the last step's output belongs to the run before the load
    next.guard_.set_action(guard_.action());  // the action is configuration, not state
    *this = std::move(next);
  }

  C compressor;
  divisible<T> aggregator;
  adam<T> optimizer;

 private:
  // Copies and checkpoints need the background idle (aggregate/divisible.hpp).
  void idle(std::string_view where) const {
    require(!aggregator.background_pending(), where,
            "a background operation is in flight; call finish() on every rank first");
  }

  std::uint64_t seed_;
  std::uint64_t step_ = 0;
  std::size_t size_ = 0;    // the model's elements, fixed by the first step
  std::size_t layers_ = 0;  // and its layer count
  std::vector<T> global_;
  nonfinite_guard<T> guard_;
};

}  // namespace gcomp
