// Stochastic gradient descent with momentum, dampening, Nesterov, weight decay (torch semantics).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/detail/unfused.hpp"
#include "gcomp/optim/detail/optimizer_base.hpp"
#include "gcomp/optim/schedule.hpp"

namespace gcomp {

struct sgd_options {
  double lr = 0.01;
  double momentum = 0.0;      // in [0, 1)
  double dampening = 0.0;     // in [0, 1]
  bool nesterov = false;      // needs momentum > 0 and dampening == 0
  double weight_decay = 0.0;  // >= 0, added to the gradient as weight_decay * x
};

/// Per element, as torch.optim.SGD does it:
///   d = g + weight_decay * x
///   b = d on a layer's first step, else momentum * b + (1 - dampening) * d
///   d = d + momentum * b (Nesterov) or d = b
///   x = x - lr * d
/// Layers switched off by the mask keep parameters and momentum untouched, and
/// a layer's "first step" is its first active one. The learning rate of step
/// t (t = completed step() calls, masked or not) is schedule(t); options.lr
/// is the constant schedule used until set_schedule.
///
/// The momentum lives in a policy_buffer allocated at the first step with
/// momentum, in the memory of that step's policy (device memory under
/// cuda_par); later steps must use a policy that memory serves (reset() to
/// change). The per-layer "started" flags are read by the host loop and stay
/// in host memory.
template <class T = float>
class sgd : public detail::optimizer_base<sgd_options> {
 public:
  using value_type = T;

  explicit sgd(sgd_options options = {})
      : detail::optimizer_base<sgd_options>(options, "gcomp::sgd", "gcomp::sgd::set_lr") {
    constexpr std::string_view where = "gcomp::sgd";
    check_in_half_open(where, "momentum", options.momentum, 0.0, 1.0);
    check_in_range(where, "dampening", options.dampening, 0.0, 1.0);
    check_non_negative(where, "weight_decay", options.weight_decay);
    require(!options.nesterov || (options.momentum > 0 && options.dampening == 0), where,
            "nesterov needs momentum > 0 and dampening == 0, got momentum ", options.momentum,
            " and dampening ", options.dampening);
  }
  /// The learning rate follows `schedule` (options.lr is ignored).
  sgd(sgd_options options, lr_schedule schedule) : sgd(options) { set_schedule(schedule); }

  /// Forgets the momentum and the step count (e.g. to train another model).
  void reset() {
    momentum_.clear();
    started_.clear();
    reset_steps();
  }

  template <class Policy>
  void step(const Policy& policy, const layout& lay, std::span<T> params, std::span<const T> grads,
            layer_mask active = {}) {
    constexpr std::string_view where = "gcomp::sgd::step";
    check_step_args(where, lay, params.size(), grads.size(), active);
    const bool use_momentum = options_.momentum != 0.0;
    if (use_momentum && !momentum_.empty())
      check_same_model(policy, where, params.size(), lay.num_layers(), momentum_.size(),
                       started_.size(), momentum_,
                       {"the momentum buffer (call reset() first)",
                        "the layers the momentum was built for (call reset() first)",
                        "the momentum buffer"});
    if (use_momentum && momentum_.empty()) {
      momentum_.assign(policy, params.size(), T(0), where);
      started_.assign(lay.num_layers(), 0);
    }
    const T lr = static_cast<T>(current_lr());
    const T mu = static_cast<T>(options_.momentum);
    const T keep = static_cast<T>(1.0 - options_.dampening);
    const T wd = static_cast<T>(options_.weight_decay);
    const bool nesterov = options_.nesterov;
    for (std::size_t d = 0; d < lay.num_layers(); ++d) {
      if (!active.empty() && active[d] == 0) continue;
      T* x = params.data() + lay[d].offset;
      const T* g = grads.data() + lay[d].offset;
      const std::size_t n = lay[d].size;
      if (!use_momentum) {
        // Products and sums spelled unfused: the device never contracts
        // them into FMAs, so its steps are bitwise the host's without
        // --fmad=false (exec/detail/unfused.hpp).
        for_each_index(policy, n, [=] GCOMP_HD(std::size_t i) {
          using detail::add_unfused, detail::mul_unfused, detail::sub_unfused;
          x[i] = sub_unfused(x[i], mul_unfused(lr, add_unfused(g[i], mul_unfused(wd, x[i]))));
        });
        continue;
      }
      T* b = momentum_.data() + lay[d].offset;
      const bool first = started_[d] == 0;
      started_[d] = 1;
      for_each_index(policy, n, [=] GCOMP_HD(std::size_t i) {
        using detail::add_unfused, detail::mul_unfused, detail::sub_unfused;
        const T step = add_unfused(g[i], mul_unfused(wd, x[i]));
        const T buf = first ? step : add_unfused(mul_unfused(mu, b[i]), mul_unfused(keep, step));
        b[i] = buf;
        x[i] = sub_unfused(x[i], mul_unfused(lr, nesterov ? add_unfused(step, mul_unfused(mu, buf)) : buf));
      });
    }
    finish_step();
  }

  /// The momentum buffer (empty until the first step with momentum), in the
  /// memory of the policy of that step: device memory under cuda_par (read it
  /// with gcomp::copy_to_host).
  std::span<const T> momentum_buffer() const { return momentum_.span(); }

  /// Checkpoint section "gcomp::sgd" (version 1): the step count (the
  /// schedule's position), the per-layer "started" flags and the momentum
  /// buffer (both empty until the first step with momentum). Options and the
  /// schedule are configuration and are not saved.
  void save(checkpoint_writer& out) const {
    out.begin("gcomp::sgd", 1);
    out.value("steps", steps());
    out.array("layer_started", started_);
    out.array("momentum", momentum_.to_host());
    out.end();
  }

  /// Reads save()'s section, the momentum into the memory of `policy`. Once
  /// this sgd has a momentum buffer, only a checkpoint of the same sizes is
  /// taken; a rejected checkpoint leaves it unchanged.
  template <class Policy>
  void load(const Policy& policy, checkpoint_reader& in) {
    constexpr std::string_view where = "gcomp::sgd::load";
    in.begin("gcomp::sgd", 1);
    const auto steps = in.value<std::uint64_t>("steps");
    const bool started = !momentum_.empty();
    auto flags =
        detail::load_state_array<std::uint8_t>(in, "layer_started", started, started_.size());
    const auto momentum = detail::load_state_array<T>(in, "momentum", started, momentum_.size());
    in.end();
    auto buffer = detail::buffer_from_host(policy, momentum, where);
    momentum_ = std::move(buffer);
    started_ = std::move(flags);
    restore_steps(steps);
  }

 private:
  policy_buffer<T> momentum_;
  std::vector<std::uint8_t> started_;  // per layer: has it taken a step yet
};

}  // namespace gcomp
