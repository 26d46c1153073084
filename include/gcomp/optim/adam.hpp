// Adam and AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019) with torch.optim semantics and masks.
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

struct adam_options {
  double lr = 1e-3;
  double beta1 = 0.9;         // in [0, 1)
  double beta2 = 0.999;       // in [0, 1)
  double eps = 1e-8;          // > 0
  double weight_decay = 0.0;  // >= 0: L2, added to the gradient as weight_decay * x
  bool amsgrad = false;       // keep the running max of v and divide by it
};

/// AdamW's options: the same fields, torch's default decay of 1e-2, which is
/// decoupled (applied to x directly, not through the moments).
struct adamw_options {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
  bool amsgrad = false;
};

namespace detail {

/// The shared body of adam and adamw; `decoupled` chooses where the decay goes.
/// Per element of an active layer d whose own step count becomes t_d:
///   x = x * (1 - lr * wd)                    (AdamW only)
///   g = g + wd * x                            (Adam only)
///   m = beta1 * m + (1 - beta1) * g
///   v = beta2 * v + (1 - beta2) * g * g
///   vmax = max(vmax, v)                       (amsgrad; then v below means vmax)
///   x = x - (lr / (1 - beta1^t_d)) * m / (sqrt(v) / sqrt(1 - beta2^t_d) + eps)
/// which is torch 1.13's formula order. t_d counts the layer's active steps,
/// so a layer the mask switches off keeps x, m, v and its bias correction as
/// they were (JointSpar relies on this); lr is schedule(t) with t the
/// optimizer's completed step() calls.
/// The moments live in policy_buffers allocated at the first step in the
/// memory of its policy (device memory under cuda_par); later steps must use
/// a policy that memory serves (reset() to change). The per-layer step counts
/// feed the host's bias corrections and stay in host memory.
template <class T, class Options, bool decoupled>
class adam_base : public optimizer_base<Options> {
  using base = optimizer_base<Options>;

 public:
  using value_type = T;

  explicit adam_base(Options o)
      : base(o, name(), decoupled ? "gcomp::adamw::set_lr" : "gcomp::adam::set_lr") {
    const std::string_view where = name();
    check_in_half_open(where, "beta1", o.beta1, 0.0, 1.0);
    check_in_half_open(where, "beta2", o.beta2, 0.0, 1.0);
    check_positive(where, "eps", o.eps);
    check_non_negative(where, "weight_decay", o.weight_decay);
  }
  adam_base(Options o, lr_schedule schedule) : adam_base(o) { this->set_schedule(schedule); }

  /// Active steps layer d has taken: its bias-correction exponent.
  std::uint64_t layer_steps(std::size_t d) const {
    return d < layer_steps_.size() ? layer_steps_[d] : 0;
  }
  /// Forgets the moments and every step count.
  void reset() {
    exp_avg_.clear();
    exp_avg_sq_.clear();
    max_exp_avg_sq_.clear();
    layer_steps_.clear();
    this->reset_steps();
  }

  template <class Policy>
  void step(const Policy& policy, const layout& lay, std::span<T> params, std::span<const T> grads,
            layer_mask active = {}) {
    const std::string_view where = decoupled ? "gcomp::adamw::step" : "gcomp::adam::step";
    base::check_step_args(where, lay, params.size(), grads.size(), active);
    const std::size_t layers = lay.num_layers();
    if (!layer_steps_.empty())
      base::check_same_model(policy, where, params.size(), layers, exp_avg_.size(),
                             layer_steps_.size(), exp_avg_, moments_names);
    if (layer_steps_.empty()) {  // first step: the state is allocated here, once
      exp_avg_.assign(policy, params.size(), T(0), where);
      exp_avg_sq_.assign(policy, params.size(), T(0), where);
      if (options_.amsgrad) max_exp_avg_sq_.assign(policy, params.size(), T(0), where);
      layer_steps_.assign(layers, 0);
    }

    const double lr = this->current_lr();
    const T b1 = static_cast<T>(options_.beta1);
    const T b2 = static_cast<T>(options_.beta2);
    const T one_minus_b1 = static_cast<T>(1.0 - options_.beta1);
    const T one_minus_b2 = static_cast<T>(1.0 - options_.beta2);
    const T eps = static_cast<T>(options_.eps);
    // Adam folds the decay into g; AdamW shrinks x first (decay = 1 - lr * wd).
    const T l2 = static_cast<T>(decoupled ? 0.0 : options_.weight_decay);
    const T shrink = static_cast<T>(decoupled ? 1.0 - lr * options_.weight_decay : 1.0);
    const bool amsgrad = options_.amsgrad;
    for (std::size_t d = 0; d < layers; ++d) {
      if (!active.empty() && active[d] == 0) continue;
      const auto t = static_cast<double>(++layer_steps_[d]);
      const double bias_correction1 = 1.0 - std::pow(options_.beta1, t);
      const double bias_correction2 = 1.0 - std::pow(options_.beta2, t);
      const T neg_step_size = static_cast<T>(-lr / bias_correction1);
      const T sqrt_bc2 = static_cast<T>(std::sqrt(bias_correction2));
      const std::size_t offset = lay[d].offset;
      T* x = params.data() + offset;
      const T* g = grads.data() + offset;
      T* m = exp_avg_.data() + offset;
      T* v = exp_avg_sq_.data() + offset;
      T* vmax = amsgrad ? max_exp_avg_sq_.data() + offset : nullptr;
      for_each_index(policy, lay[d].size, [=] GCOMP_HD(std::size_t i) {
        // Unfused products and sums (exec/detail/unfused.hpp): bitwise the
        // host's on the device whatever nvcc's --fmad setting.
        using detail::add_unfused, detail::mul_unfused;
        const T xi = decoupled ? mul_unfused(x[i], shrink) : x[i];
        const T gi = decoupled ? g[i] : add_unfused(g[i], mul_unfused(l2, xi));
        const T mi = add_unfused(mul_unfused(m[i], b1), mul_unfused(one_minus_b1, gi));
        T vi = add_unfused(mul_unfused(v[i], b2), mul_unfused(mul_unfused(one_minus_b2, gi), gi));
        m[i] = mi;
        v[i] = vi;
        if (amsgrad) {
          vi = vmax[i] < vi ? vi : vmax[i];
          vmax[i] = vi;
        }
        const T denom = add_unfused(std::sqrt(vi) / sqrt_bc2, eps);
        x[i] = add_unfused(xi, mul_unfused(neg_step_size, mi) / denom);  // torch's addcdiv order
      });
    }
    this->finish_step();
  }

  /// m, v and (amsgrad) max v: empty until the first step. They are in the
  /// memory of the first step's policy: device memory under cuda_par (read
  /// them with gcomp::copy_to_host).
  std::span<const T> exp_avg() const { return exp_avg_.span(); }
  std::span<const T> exp_avg_sq() const { return exp_avg_sq_.span(); }
  std::span<const T> max_exp_avg_sq() const { return max_exp_avg_sq_.span(); }

  /// Checkpoint section "gcomp::adam" or "gcomp::adamw" (version 1): the step
  /// count (the schedule's position), each layer's step count (its bias
  /// correction), m, v and max v (empty without amsgrad). Options and the
  /// schedule are configuration and are not saved.
  void save(checkpoint_writer& out) const {
    out.begin(name(), 1);
    out.value("steps", this->steps());
    out.array("layer_steps", layer_steps_);
    out.array("exp_avg", exp_avg_.to_host());
    out.array("exp_avg_sq", exp_avg_sq_.to_host());
    out.array("max_exp_avg_sq", max_exp_avg_sq_.to_host());
    out.end();
  }

  /// Reads save()'s section, the moments into the memory of `policy`. Once
  /// this optimizer has stepped, only a checkpoint of the same sizes is
  /// taken; the moments must agree in size with each other and with amsgrad.
  /// A rejected checkpoint leaves the optimizer unchanged.
  template <class Policy>
  void load(const Policy& policy, checkpoint_reader& in) {
    const std::string_view where = decoupled ? "gcomp::adamw::load" : "gcomp::adam::load";
    in.begin(name(), 1);
    const auto steps = in.value<std::uint64_t>("steps");
    const bool started = !layer_steps_.empty();
    auto layer_steps = detail::load_state_array<std::uint64_t>(in, "layer_steps", started,
                                                               layer_steps_.size());
    const auto m = detail::load_state_array<T>(in, "exp_avg", started, exp_avg_.size());
    const auto v = detail::load_state_array<T>(in, "exp_avg_sq", started, exp_avg_sq_.size());
    const auto vmax =
        detail::load_state_array<T>(in, "max_exp_avg_sq", started, max_exp_avg_sq_.size());
    in.end();
    // step() indexes v and max v by m's size: a checkpoint of other sizes
    // would make it read out of bounds.
    check_same_size(where, "exp_avg_sq of the checkpoint", v.size(), "its exp_avg", m.size());
    if (options_.amsgrad && !layer_steps.empty() && vmax.size() != m.size())
      fail(where, "the checkpoint's max_exp_avg_sq holds ", vmax.size(),
           " values but this optimizer has amsgrad and expects ", m.size(),
           " (exp_avg's size; a checkpoint saved without amsgrad?)");
    if (!vmax.empty() && vmax.size() != m.size())
      fail(where, "the checkpoint's max_exp_avg_sq holds ", vmax.size(), " values, expected 0 or ",
           m.size(), " (exp_avg's size)");
    auto m_buffer = detail::buffer_from_host(policy, m, where);
    auto v_buffer = detail::buffer_from_host(policy, v, where);
    auto vmax_buffer = detail::buffer_from_host(policy, vmax, where);
    exp_avg_ = std::move(m_buffer);
    exp_avg_sq_ = std::move(v_buffer);
    max_exp_avg_sq_ = std::move(vmax_buffer);
    layer_steps_ = std::move(layer_steps);
    this->restore_steps(steps);
  }

 private:
  static constexpr std::string_view name() { return decoupled ? "gcomp::adamw" : "gcomp::adam"; }

  using base::options_;

  policy_buffer<T> exp_avg_;
  policy_buffer<T> exp_avg_sq_;
  policy_buffer<T> max_exp_avg_sq_;
  std::vector<std::uint64_t> layer_steps_;
};

}  // namespace detail

/// Adam with L2 weight decay folded into the gradient (torch.optim.Adam).
template <class T = float>
class adam : public detail::adam_base<T, adam_options, false> {
 public:
  explicit adam(adam_options options = {}) : detail::adam_base<T, adam_options, false>(options) {}
  /// The learning rate follows `schedule` (options.lr is ignored).
  adam(adam_options options, lr_schedule schedule)
      : detail::adam_base<T, adam_options, false>(options, schedule) {}
};

/// AdamW: decoupled weight decay, x *= 1 - lr * weight_decay before the Adam
/// step (torch.optim.AdamW).
template <class T = float>
class adamw : public detail::adam_base<T, adamw_options, true> {
 public:
  explicit adamw(adamw_options options = {}) : detail::adam_base<T, adamw_options, true>(options) {}
  /// The learning rate follows `schedule` (options.lr is ignored).
  adamw(adamw_options options, lr_schedule schedule)
      : detail::adam_base<T, adamw_options, true>(options, schedule) {}
};

}  // namespace gcomp
