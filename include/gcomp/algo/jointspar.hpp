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
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/optim/lars.hpp"
#include "gcomp/optim/sgd.hpp"

namespace gcomp {

/// What one JointSpar step did.
struct jointspar_step_stats {
  std::uint64_t step = 0;           // the step's index
  std::size_t active_layers = 0;    // |S_t|
  std::size_t active_elements = 0;  // sum over S_t of |x_d|
  /// Bytes this rank handed to the all-reduce: active_elements * sizeof(T)
  /// (what comm.stats() adds to bytes_sent and to bytes_received when M > 1).
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
template <class O>
class jointspar {
 public:
  using value_type = typename O::value_type;
  using T = value_type;

  /// layers: D, the layout's layer count. An unset options.bandit_rate takes
  /// the optimizer's first learning rate (the paper's alpha_p = eta).
  jointspar(std::size_t layers, O opt, layer_sampler_options options = {})
      : optimizer(std::move(opt)),
        sampler_(layers, with_rate(optimizer, options)),
        mask_(layers, 0),
        norms_(layers, 0.0) {}

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
  /// called. Only active layers of grads are read. Throws gcomp::error, with
  /// params, the optimizer and the sampler unchanged, on a size mismatch or a
  /// non-finite aggregated gradient (the same on every worker, so all throw).
  template <class Policy, class Comm>
    requires communicator<Comm, Policy, T> && gcomp::optimizer<O, Policy, T>
  void finish_step(const Policy& policy, Comm& comm, const layout& lay, std::span<T> params,
                   std::span<const T> grads) {
    constexpr std::string_view where = "gcomp::jointspar::finish_step";
    check_same_size(where, "layout layers", lay.num_layers(), "the sampler's layers",
                    mask_.size());
    lay.check_buffer(where, "params", params.size());
    check_same_size(where, "grads", grads.size(), "params", params.size());
    begin_step();
    global_.resize(params.size());  // allocates on the first step only
    aggregator.aggregate(policy, comm, lay, layer_mask(mask_), sampler_.inclusion_probabilities(),
                         grads, std::span<T>(global_));

    // ||ghat_d|| of the active layers, in the fixed reduction order (the same
    // for every thread count, hence the same probabilities on every worker).
    for (std::size_t d = 0; d < mask_.size(); ++d) {
      if (mask_[d] == 0) continue;
      const T* g = global_.data() + lay[d].offset;
      const double squares = transform_reduce(
          policy, lay[d].size, 0.0, [] GCOMP_HD(double a, double b) { return a + b; },
          [=] GCOMP_HD(std::size_t i) { return static_cast<double>(g[i]) * static_cast<double>(g[i]); });
      norms_[d] = std::sqrt(squares);
      require(std::isfinite(norms_[d]), where, "the aggregated gradient of layer '", lay[d].name,
              "' is not finite (squared norm ", squares, ")");
    }
    optimizer.step(policy, lay, params, std::span<const T>(global_), layer_mask(mask_));
    sampler_.update(mask_, norms_);

    last_.step = step_;
    last_.active_layers = aggregator.last_active_layers();
    last_.active_elements = aggregator.last_elements();
    last_.bytes = aggregator.last_bytes();
    total_bytes_ += last_.bytes;
    ++step_;
    drawn_ = false;
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
  /// ghat of the last step, the same on every worker (0 on inactive layers).
  std::span<const T> global_gradient() const { return global_; }

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
  std::vector<T> global_;
  jointspar_step_stats last_;
  std::uint64_t step_ = 0;
  std::uint64_t total_bytes_ = 0;
  bool drawn_ = false;
};

/// JointSpar with (momentum) SGD.
template <class T = float>
using jointspar_sgd = jointspar<sgd<T>>;

/// JointSpar-LARS.
template <class T = float>
using jointspar_lars = jointspar<lars<T>>;

}  // namespace gcomp
