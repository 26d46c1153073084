// jointspar: JointSpar and JointSpar-LARS, layer sampling that skips both the backward pass and the communication of dropped layers (Liu & Mozafari, "JointSpar", ICML 2022).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/aggregate/active_layers.hpp"
#include "gcomp/algo/layer_sampler.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/core/nonfinite.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/detail/unfused.hpp"
#include "gcomp/optim/lars.hpp"
#include "gcomp/optim/sgd.hpp"

namespace gcomp {

/// What one JointSpar step did.
struct jointspar_step_stats {
  std::uint64_t step = 0;           // the step's index
  std::size_t active_layers = 0;    // |S_t|
  std::size_t active_elements = 0;  // sum over S_t of |x_d|
  /// Bytes this rank handed to the gradient's all-reduce: active_elements *
  /// sizeof(T). comm.stats() adds this to bytes_sent and to bytes_received
  /// when M > 1, plus, unless the non-finite action is propagate, the
  /// check's one-element all-reduce (sizeof(T) bytes, a second collective).
  std::uint64_t bytes = 0;
};

/// JointSpar (ALGORITHMS.md section 1), one object per worker:
///
///   auto active = js.begin_step();            // S_t, before the backward pass
///   ... backward only for layers with active[d] != 0 ...
///   js.finish_step(policy, comm, lay, params, grads);
///
/// finish_step scales the active layers by 1 / pi_d, all-reduces (mean) only
/// them, packed (aggregate/active_layers.hpp), updates only them with the
/// optimizer O, and refreshes the probabilities from the global gradient's
/// layer norms, so every worker keeps the same probabilities and draws the
/// same next set. O = sgd<T> is JointSpar (the momentum of inactive layers is
/// left untouched, as sgd does under a mask); O = lars<T> is JointSpar-LARS,
/// whose trust ratio lambda_d = eta_L ||x_d|| / (||ghat_d|| + beta ||x_d||) and
/// update v_d <- mu v_d + gamma_t lambda_d (ghat_d + beta x_d) are the spec's
/// (lars takes lambda_d = 1 when ||x_d|| or ||ghat_d|| is 0).
///
/// Non-finite gradients (core/nonfinite.hpp): before anything is aggregated,
/// the active layers of every worker's gradient are checked (the inactive
/// ones are never read, so a NaN there does no harm) and a one-element flag
/// is all-reduced, so that all workers take the same decision. With
/// skip_step (the default) finish_step returns false on every worker and
/// nothing changes: parameters, optimizer state, probabilities, the step
/// count and the drawn set stay as they were, so the next call retries the
/// same step with the same set. throw_error throws gcomp::error on every
/// worker instead; propagate makes no check and no extra all-reduce, and a
/// non-finite aggregated gradient is then caught after the all-reduce (also
/// the last line of defence against a finite gradient that overflows when
/// scaled by 1 / pi_d).
///
/// Checkpoints (core/checkpoint.hpp): save() and load() cover the step count
/// (the step of the next draw's key), the drawn set and whether it was drawn
/// (so a checkpoint may be taken between begin_step and finish_step), the
/// byte counts, the skip count, the sampler and the optimizer. ghat of the
/// last step (global_gradient()) is an output, not state: it is empty after
/// a load until the next step.
template <class O>
class jointspar {
 public:
  using value_type = typename O::value_type;
  using T = value_type;

  /// layers: D, the layout's layer count. An unset options.bandit_rate takes
  /// the optimizer's first learning rate (the paper's alpha_p = eta).
  /// nonfinite: what a step does when a worker's gradient has NaN or Inf.
  jointspar(std::size_t layers, O opt, layer_sampler_options options = {},
            on_nonfinite nonfinite = on_nonfinite::skip_step)
      : optimizer(std::move(opt)),
        sampler_(layers, with_rate(optimizer, options)),
        mask_(layers, 0),
        norms_(layers, 0.0),
        guard_(nonfinite) {}

  /// The active set S_t of the coming step (1 = active), the same on every
  /// worker. Call it before computing gradients and skip the inactive layers'
  /// backward pass; calling it again before finish_step gives the same set.
  layer_mask begin_step() {
    if (!drawn_) {
      sampler_.draw(step_, mask_);
      drawn_ = true;
    }
    return mask_;
  }

  /// Aggregates the active layers of grads, updates them in params and
  /// refreshes the probabilities; draws S_t itself if begin_step was not
  /// called. Only active layers of grads are read. Returns true when the step
  /// was taken, false (on every worker alike, nothing changed) when it was
  /// skipped for a non-finite gradient under on_nonfinite::skip_step. Throws
  /// gcomp::error, with params, the optimizer and the sampler unchanged, on a
  /// size mismatch, on a non-finite gradient under throw_error, or on a
  /// non-finite aggregated gradient (the same on every worker, so all throw).
  template <class Policy, class Comm>
    requires communicator<Comm, Policy, T> && gcomp::optimizer<O, Policy, T>
  bool finish_step(const Policy& policy, Comm& comm, const layout& lay, std::span<T> params,
                   std::span<const T> grads) {
    constexpr std::string_view where = "gcomp::jointspar::finish_step";
    check_same_size(where, "layout layers", lay.num_layers(), "the sampler's layers",
                    mask_.size());
    lay.check_buffer(where, "params", params.size());
    check_same_size(where, "grads", grads.size(), "params", params.size());
    begin_step();
    // Before any state sees the gradient; a skip keeps the drawn set, so the
    // retry reads the same layers.
    if (!guard_.admit(policy, comm, lay, layer_mask(mask_), grads, where)) return false;
    global_.resize(policy, params.size(), where);  // allocates on the first step only
    aggregator.aggregate(policy, comm, lay, layer_mask(mask_), sampler_.inclusion_probabilities(),
                         grads, global_.span());

    // ||ghat_d|| of the active layers, in the fixed reduction order (the same
    // for every thread count, hence the same probabilities on every worker).
    for (std::size_t d = 0; d < mask_.size(); ++d) {
      if (mask_[d] == 0) continue;
      const T* g = global_.data() + lay[d].offset;
      // Products and sums unfused, so a device policy gives the host's norms
      // and so the same probabilities and draws.
      const double squares = transform_reduce(
          policy, lay[d].size, 0.0, [] GCOMP_HD(double a, double b) { return detail::add_unfused(a, b); },
          [=] GCOMP_HD(std::size_t i) {
            const double x = static_cast<double>(g[i]);
            return detail::mul_unfused(x, x);
          });
      norms_[d] = std::sqrt(squares);
      require(std::isfinite(norms_[d]), where, "the aggregated gradient of layer '", lay[d].name,
              "' is not finite (squared norm ", squares, ")");
    }
    optimizer.step(policy, lay, params, std::span<const T>(global_.span()), layer_mask(mask_));
    sampler_.update(mask_, norms_);

    last_.step = step_;
    last_.active_layers = aggregator.last_active_layers();
    last_.active_elements = aggregator.last_elements();
    last_.bytes = aggregator.last_bytes();
    total_bytes_ += last_.bytes;
    ++step_;
    drawn_ = false;
    return true;
  }

  /// Completed steps: the index of the next one.
  std::uint64_t steps() const { return step_; }
  /// The current step's mask (all zero before the first begin_step).
  layer_mask mask() const { return mask_; }
  /// p_1..p_D for the next draw.
  std::span<const double> probabilities() const { return sampler_.probabilities(); }
  const layer_sampler& sampler() const { return sampler_; }
  /// Sets p for the next draws (e.g. from a checkpoint); see layer_sampler::set_probabilities.
  void set_probabilities(std::span<const double> p) { sampler_.set_probabilities(p); }
  /// Counts of the last finish_step.
  const jointspar_step_stats& last_step() const { return last_; }
  /// Bytes handed to the all-reduce over all steps.
  std::uint64_t total_bytes() const { return total_bytes_; }
  /// ghat of the last step, the same on every worker (0 on inactive layers),
  /// in the memory of that step's policy (device memory under cuda_par).
  std::span<const T> global_gradient() const { return global_.span(); }
  /// Steps skipped because some worker's gradient was not finite (the same on every worker).
  std::uint64_t skipped_steps() const { return guard_.skipped_steps(); }
  on_nonfinite nonfinite_action() const { return guard_.action(); }
  void set_nonfinite_action(on_nonfinite action) { guard_.set_action(action); }

  /// Writes the section "gcomp::jointspar" (version 1): layers, steps, drawn
  /// and mask, the byte counts and last_step(), then the sections of the
  /// non-finite guard, the sampler and the optimizer (if it has state).
  void save(checkpoint_writer& out) const {
    out.begin("gcomp::jointspar", 1);
    out.value("layers", static_cast<std::uint64_t>(mask_.size()));
    out.value("steps", step_);
    out.value("drawn", static_cast<std::uint8_t>(drawn_ ? 1 : 0));
    out.array("mask", mask_);
    out.value("total_bytes", total_bytes_);
    out.value("last_step", last_.step);
    out.value("last_active_layers", static_cast<std::uint64_t>(last_.active_layers));
    out.value("last_active_elements", static_cast<std::uint64_t>(last_.active_elements));
    out.value("last_bytes", last_.bytes);
    guard_.save(out);
    sampler_.save(out);
    save_state(out, optimizer);
    out.end();
  }

  /// Reads what save() wrote, into memory `policy` uses. A checkpoint of
  /// another layer count, seed, sampler rule or optimizer is rejected with
  /// gcomp::error and the object is left as it was. Loading into a fresh
  /// object and training on gives bitwise the run that was never
  /// interrupted. The non-finite action is this object's (configuration).
  template <class Policy>
  void load(const Policy& policy, checkpoint_reader& in) {
    constexpr std::string_view where = "gcomp::jointspar::load";
    jointspar next(*this);  // all or nothing: the parts load into a copy
    const std::size_t n = mask_.size();
    in.begin("gcomp::jointspar", 1);
    const auto layers = in.value<std::uint64_t>("layers");
    require(layers == n, where, "the checkpoint has ", layers, " layers but this jointspar has ",
            n);
    next.step_ = in.value<std::uint64_t>("steps");
    const auto drawn = in.value<std::uint8_t>("drawn");
    in.array("mask", std::span<std::uint8_t>(next.mask_));
    next.total_bytes_ = in.value<std::uint64_t>("total_bytes");
    next.last_.step = in.value<std::uint64_t>("last_step");
    const auto last_layers = in.value<std::uint64_t>("last_active_layers");
    const auto last_elements = in.value<std::uint64_t>("last_active_elements");
    next.last_.bytes = in.value<std::uint64_t>("last_bytes");
    next.guard_.load(policy, in);
    next.sampler_.load(policy, in);
    load_state(policy, in, next.optimizer);
    in.end();
    // Past the CRC only a badly written or crafted checkpoint fails these.
    require(drawn <= 1, where, "drawn must be 0 or 1, got ", unsigned(drawn));
    std::size_t active = 0;
    for (std::size_t d = 0; d < n; ++d) {
      require(next.mask_[d] <= 1, where, "mask[", d, "] must be 0 or 1, got ",
              unsigned(next.mask_[d]));
      active += next.mask_[d];
    }
    require(drawn == 0 || active > 0, where, "the drawn set of step ", next.step_,
            " is empty; a drawn set has at least one layer");
    require(last_layers <= n, where, "last_active_layers must be at most ", n, ", got ",
            last_layers);
    next.drawn_ = drawn != 0;
    next.last_.active_layers = static_cast<std::size_t>(last_layers);
    next.last_.active_elements = static_cast<std::size_t>(last_elements);
    next.global_.clear();  // the last step's output belongs to the run before the load
    next.guard_.set_action(guard_.action());  // the action is configuration, not state
    *this = std::move(next);
  }

  O optimizer;
  active_layers aggregator;

 private:
  static layer_sampler_options with_rate(const O& o, layer_sampler_options options) {
    if (!options.bandit_rate) {
      if constexpr (requires { o.schedule()(std::uint64_t{0}); })
        options.bandit_rate = o.schedule()(0);
    }
    return options;
  }

  layer_sampler sampler_;
  std::vector<std::uint8_t> mask_;
  std::vector<double> norms_;
  policy_buffer<T> global_;  // the last step's ghat, in the memory of its policy
  jointspar_step_stats last_;
  std::uint64_t step_ = 0;
  std::uint64_t total_bytes_ = 0;
  bool drawn_ = false;
  nonfinite_guard<T> guard_;
};

/// JointSpar with (momentum) SGD.
template <class T = float>
using jointspar_sgd = jointspar<sgd<T>>;

/// JointSpar-LARS.
template <class T = float>
using jointspar_lars = jointspar<lars<T>>;

}  // namespace gcomp
