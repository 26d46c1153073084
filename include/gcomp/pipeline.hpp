// pipeline: compressor -> aggregator (over a communicator) -> optimizer, one call per training step.
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
#include "gcomp/core/layout.hpp"
#include "gcomp/core/nonfinite.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/exec/buffer.hpp"

namespace gcomp {

/// One distributed training step: every worker calls step() with its local
/// gradient; afterwards all workers hold the same parameters. The parts are
/// chosen at compile time; a combination that cannot work (a compressor
/// without shared support under an all-reduce) does not compile.
///
/// The random key of step t on worker m is rng_key{seed, t, m}, so runs are
/// reproducible and shared-key compressors agree across workers.
///
/// A NaN or Inf in any worker's gradient is handled as `nonfinite` says
/// (core/nonfinite.hpp): by default every worker skips the step with all
/// state untouched, at the cost of one all-reduce of a single value per step.
template <class C, class A, class O>
class pipeline {
 public:
  using value_type = typename O::value_type;

  pipeline(C c, A a, O o, std::uint64_t seed = 0,
           on_nonfinite nonfinite = on_nonfinite::skip_step)
      : compressor(std::move(c)),
        aggregator(std::move(a)),
        optimizer(std::move(o)),
        seed_(seed),
        guard_(nonfinite) {}

  /// One step; returns false when it was skipped for a non-finite gradient
  /// (on every worker alike), true when the parameters were updated.
  template <class Policy, class Comm>
    requires gcomp::aggregator<A, C, Comm, Policy, value_type> &&
             gcomp::optimizer<O, Policy, value_type>
  bool step(const Policy& policy, Comm& comm, const layout& lay, std::span<value_type> params,
            std::span<const value_type> grads, layer_mask active = {}) {
    constexpr std::string_view where = "gcomp::pipeline::step";
    lay.check_buffer(where, "params", params.size());
    check_same_size(where, "grads", grads.size(), "params", params.size());
    if (!active.empty())
      check_same_size(where, "active", active.size(), "layout layers", lay.num_layers());
    // Before the compressor sees the gradient: error-feedback residuals and
    // lazy/stale aggregator state must not absorb a NaN.
    if (!guard_.admit(policy, comm, grads, where)) return false;
    global_.resize(policy, grads.size(), where);  // allocates on the first step only
    aggregator.aggregate(policy, comm, compressor, grads, global_.span(),
                         rng_key{seed_, step_, static_cast<std::uint32_t>(comm.rank())});
    optimizer.step(policy, lay, params, std::span<const value_type>(global_.span()), active);
    ++step_;
    return true;
  }

  /// Steps taken so far (the `step` of the next random key); skipped steps do not count.
  std::uint64_t steps() const { return step_; }
  std::uint64_t seed() const { return seed_; }
  /// Steps skipped because some worker's gradient was not finite.
  std::uint64_t skipped_steps() const { return guard_.skipped_steps(); }
  on_nonfinite nonfinite_action() const { return guard_.action(); }
  void set_nonfinite_action(on_nonfinite action) { guard_.set_action(action); }

  /// Writes the step count, the seed and the state of every stateful part
  /// (error-feedback residuals, aggregator state, optimizer moments) as one
  /// section of a checkpoint (core/checkpoint.hpp).
  void save(checkpoint_writer& out) const {
    out.begin("gcomp::pipeline", 1);
    out.value("seed", seed_);
    out.value("steps", step_);
    guard_.save(out);
    save_state(out, compressor);
    save_state(out, aggregator);
    save_state(out, optimizer);
    out.end();
  }

  /// Reads what save() wrote, into memory `policy` uses. A checkpoint of
  /// another seed, part or model size is rejected with gcomp::error and the
  /// pipeline is left as it was. Loading into a fresh pipeline and training
  /// on gives bitwise the run that was never interrupted.
  template <class Policy>
  void load(const Policy& policy, checkpoint_reader& in) {
    constexpr std::string_view where = "gcomp::pipeline::load";
    pipeline next(*this);  // all or nothing: the parts load into a copy
    in.begin("gcomp::pipeline", 1);
    const auto seed = in.value<std::uint64_t>("seed");
    require(seed == seed_, where, "the checkpoint was written with seed ", seed,
            " but this pipeline has seed ", seed_);
    next.step_ = in.value<std::uint64_t>("steps");
    next.guard_.load(policy, in);
    load_state(policy, in, next.compressor);
    load_state(policy, in, next.aggregator);
    load_state(policy, in, next.optimizer);
    in.end();
    next.guard_.set_action(guard_.action());  // the action is configuration, not state
    *this = std::move(next);
  }
  /// The aggregated gradient of the last step (the same on every worker), in
  /// the memory of the last step's policy (device memory under cuda_par:
  /// read it with copy_to_host).
  std::span<const value_type> global_gradient() const { return global_.span(); }

  C compressor;
  A aggregator;
  O optimizer;

 private:
  std::uint64_t seed_;
  std::uint64_t step_ = 0;
  nonfinite_guard<value_type> guard_;
  policy_buffer<value_type> global_;  // the policy's memory
};

}  // namespace gcomp
