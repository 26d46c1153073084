// LAMB, layer-wise adaptive moments (You et al. 2019, Large Batch Optimization, Algorithm 2).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <span>
#include <string_view>
#include <type_traits>
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
#include "gcomp/optim/detail/sums_of_squares.hpp"
#include "gcomp/optim/schedule.hpp"

namespace gcomp {

struct lamb_options {
  double lr = 1e-3;
  double beta1 = 0.9;          // in [0, 1)
  double beta2 = 0.999;        // in [0, 1)
  double eps = 1e-6;           // > 0
  double weight_decay = 0.01;  // lambda, >= 0, decoupled: added to the update as lambda * x
  /// phi(z) = min(max(z, min_trust), max_trust), the paper's optional clip of
  /// ||x||; the defaults make phi the identity.
  double min_trust = 0.0;
  double max_trust = std::numeric_limits<double>::infinity();
  /// Layers for which exclude(layer) is true (biases, normalization layers)
  /// take the plain Adam direction: ratio 1, no weight decay.
  std::function<bool(const layer&)> exclude = nullptr;
};

namespace detail {

/// One element of LAMB's update direction, shared by the norm pass and the
/// update pass so both see the same u.
template <class T>
struct lamb_direction {
  T b1, one_minus_b1, b2, one_minus_b2;
  T inv_bc1, inv_bc2;  // 1 / (1 - beta^t) of the layer's own t
  T eps, wd;
  GCOMP_HD T operator()(T x, T g, T& m, T& v) const {
    m = add_unfused(mul_unfused(b1, m), mul_unfused(one_minus_b1, g));
    v = add_unfused(mul_unfused(b2, v), mul_unfused(mul_unfused(one_minus_b2, g), g));
    return add_unfused(mul_unfused(m, inv_bc1) / add_unfused(std::sqrt(mul_unfused(v, inv_bc2)), eps),
                       mul_unfused(wd, x));
  }
};

}  // namespace detail

/// Per active layer d whose own step count becomes t_d (You et al. 2019, Algorithm 2):
///   m = beta1 * m + (1 - beta1) * g,  v = beta2 * v + (1 - beta2) * g^2
///   r = (m / (1 - beta1^t_d)) / (sqrt(v / (1 - beta2^t_d)) + eps)
///   u = r + lambda * x
///   x = x - lr * phi(||x_d||) / ||u_d|| * u
/// The ratio is 1 when ||x_d|| == 0 or ||u_d|| == 0 (as the reference
/// implementations do) and for excluded layers, which also take lambda = 0.
/// Two passes per layer: a fixed-order reduction of ||x_d||^2 and ||u_d||^2
/// (u computed, not stored), then a fused pass that recomputes u and writes
/// m, v, x; no temporaries. Masked-off layers keep x, m, v and t_d untouched.
/// lr is schedule(t), t = completed step() calls.
/// m and v live in policy_buffers allocated at the first step in the memory
/// of its policy (device memory under cuda_par); later steps must use a
/// policy that memory serves (reset() to change). The per-layer step counts
/// and ratios are host values.
template <class T = float>
class lamb : public detail::optimizer_base<lamb_options> {
 public:
  using value_type = T;

  explicit lamb(lamb_options options = {})
      : detail::optimizer_base<lamb_options>(std::move(options), "gcomp::lamb",
                                             "gcomp::lamb::set_lr") {
    constexpr std::string_view where = "gcomp::lamb";
    check_in_half_open(where, "beta1", options_.beta1, 0.0, 1.0);
    check_in_half_open(where, "beta2", options_.beta2, 0.0, 1.0);
    check_positive(where, "eps", options_.eps);
    check_non_negative(where, "weight_decay", options_.weight_decay);
    check_non_negative(where, "min_trust", options_.min_trust);
    require(options_.max_trust > 0 && options_.max_trust >= options_.min_trust, where,
            "max_trust must be > 0 and >= min_trust (", options_.min_trust, "), got ",
            options_.max_trust);
  }
  /// The learning rate follows `schedule` (options.lr is ignored).
  lamb(lamb_options options, lr_schedule schedule) : lamb(std::move(options)) {
    set_schedule(schedule);
  }

  /// Active steps layer d has taken: its bias-correction exponent.
  std::uint64_t layer_steps(std::size_t d) const {
    return d < layer_steps_.size() ? layer_steps_[d] : 0;
  }
  void reset() {
    exp_avg_.clear();
    exp_avg_sq_.clear();
    layer_steps_.clear();
    ratios_.clear();
    reset_steps();
  }

  template <class Policy>
  void step(const Policy& policy, const layout& lay, std::span<T> params, std::span<const T> grads,
            layer_mask active = {}) {
    constexpr std::string_view where = "gcomp::lamb::step";
    check_step_args(where, lay, params.size(), grads.size(), active);
    const std::size_t layers = lay.num_layers();
    if (!layer_steps_.empty())
      check_same_model(policy, where, params.size(), layers, exp_avg_.size(), layer_steps_.size(),
                       exp_avg_, detail::moments_names);
    if (layer_steps_.empty()) {  // first step: the state is allocated here, once
      exp_avg_.assign(policy, params.size(), T(0), where);
      exp_avg_sq_.assign(policy, params.size(), T(0), where);
      layer_steps_.assign(layers, 0);
      ratios_.assign(layers, 1.0);
    }

    const double lr = current_lr();
    for (std::size_t d = 0; d < layers; ++d) {
      if (!active.empty() && active[d] == 0) continue;
      const bool excluded = options_.exclude && options_.exclude(lay[d]);
      const auto t = static_cast<double>(++layer_steps_[d]);
      const detail::lamb_direction<T> direction{
          static_cast<T>(options_.beta1),
          static_cast<T>(1.0 - options_.beta1),
          static_cast<T>(options_.beta2),
          static_cast<T>(1.0 - options_.beta2),
          static_cast<T>(1.0 / (1.0 - std::pow(options_.beta1, t))),
          static_cast<T>(1.0 / (1.0 - std::pow(options_.beta2, t))),
          static_cast<T>(options_.eps),
          static_cast<T>(excluded ? 0.0 : options_.weight_decay)};
      const std::size_t offset = lay[d].offset;
      const std::size_t n = lay[d].size;
      T* x = params.data() + offset;
      const T* g = grads.data() + offset;
      T* m = exp_avg_.data() + offset;
      T* v = exp_avg_sq_.data() + offset;

      double ratio = 1.0;
      if (!excluded) {  // excluded layers skip the norm pass altogether
        const sums s = transform_reduce(policy, n, sums{}, add_sums{}, [=] GCOMP_HD(std::size_t i) {
          T mi = m[i], vi = v[i];
          const T u = direction(x[i], g[i], mi, vi);
          const acc xi = x[i], ui = u;
          return sums{detail::mul_unfused(xi, xi), detail::mul_unfused(ui, ui)};
        });
        const double x_norm = std::sqrt(static_cast<double>(s.x));
        const double u_norm = std::sqrt(static_cast<double>(s.y));
        const double phi = std::min(std::max(x_norm, options_.min_trust), options_.max_trust);
        if (x_norm > 0.0 && u_norm > 0.0) ratio = phi / u_norm;
      }
      ratios_[d] = ratio;
      const T neg_scale = static_cast<T>(-lr * ratio);
      for_each_index(policy, n, [=] GCOMP_HD(std::size_t i) {
        T mi = m[i], vi = v[i];
        const T u = direction(x[i], g[i], mi, vi);
        m[i] = mi;
        v[i] = vi;
        x[i] = detail::add_unfused(x[i], detail::mul_unfused(neg_scale, u));
      });
    }
    finish_step();
  }

  /// m and v: empty until the first step, then in the memory of its policy
  /// (device memory under cuda_par: read them with gcomp::copy_to_host).
  std::span<const T> exp_avg() const { return exp_avg_.span(); }
  std::span<const T> exp_avg_sq() const { return exp_avg_sq_.span(); }
  /// phi(||x_d||) / ||u_d|| of each layer's last active step (1 before it or when excluded).
  std::span<const double> trust_ratios() const { return ratios_; }

  /// Checkpoint section "gcomp::lamb" (version 1): the step count (the
  /// schedule's position), each layer's step count (its bias correction),
  /// the trust ratios of each layer's last active step (what trust_ratios()
  /// reports), m and v. Options and the schedule are not saved.
  void save(checkpoint_writer& out) const {
    out.begin("gcomp::lamb", 1);
    out.value("steps", steps());
    out.array("layer_steps", layer_steps_);
    out.array("trust_ratios", ratios_);
    out.array("exp_avg", exp_avg_.to_host());
    out.array("exp_avg_sq", exp_avg_sq_.to_host());
    out.end();
  }

  /// Reads save()'s section, m and v into the memory of `policy`. Once this
  /// lamb has stepped, only a checkpoint of the same sizes is taken; a
  /// rejected checkpoint leaves it unchanged.
  template <class Policy>
  void load(const Policy& policy, checkpoint_reader& in) {
    constexpr std::string_view where = "gcomp::lamb::load";
    in.begin("gcomp::lamb", 1);
    const auto steps = in.value<std::uint64_t>("steps");
    const bool started = !layer_steps_.empty();
    auto layer_steps = detail::load_state_array<std::uint64_t>(in, "layer_steps", started,
                                                               layer_steps_.size());
    auto ratios = detail::load_state_array<double>(in, "trust_ratios", started, ratios_.size());
    const auto m = detail::load_state_array<T>(in, "exp_avg", started, exp_avg_.size());
    const auto v = detail::load_state_array<T>(in, "exp_avg_sq", started, exp_avg_sq_.size());
    in.end();
    // step() writes a ratio per layer and indexes v by m's size: other sizes
    // would make it write out of bounds.
    check_same_size(where, "trust_ratios of the checkpoint", ratios.size(), "its layer_steps",
                    layer_steps.size());
    check_same_size(where, "exp_avg_sq of the checkpoint", v.size(), "its exp_avg", m.size());
    auto m_buffer = detail::buffer_from_host(policy, m, where);
    auto v_buffer = detail::buffer_from_host(policy, v, where);
    exp_avg_ = std::move(m_buffer);
    exp_avg_sq_ = std::move(v_buffer);
    layer_steps_ = std::move(layer_steps);
    ratios_ = std::move(ratios);
    restore_steps(steps);
  }

 private:
  // Sums of squares of x (.x) and u (.y) over a layer, reduced together in one pass.
  using sums = detail::sums_of_squares<T>;
  using add_sums = detail::add_sums_of_squares<T>;
  using acc = typename sums::acc;

  policy_buffer<T> exp_avg_;
  policy_buffer<T> exp_avg_sq_;
  std::vector<std::uint64_t> layer_steps_;
  std::vector<double> ratios_;
};

}  // namespace gcomp
