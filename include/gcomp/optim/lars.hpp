// LARS, layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017); JointSpar-LARS uses it.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
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

struct lars_options {
  double lr = 0.1;                  // gamma_t, the global rate (or a schedule)
  double momentum = 0.9;            // mu, in [0, 1)
  double weight_decay = 5e-4;       // beta, >= 0
  double trust_coefficient = 1e-3;  // eta_L, > 0
  /// Layers for which exclude(layer) is true (typically biases and
  /// normalization layers) take the plain momentum step: ratio 1, no weight
  /// decay. Empty: every layer is scaled.
  std::function<bool(const layer&)> exclude = nullptr;
};

/// Per layer d, as in You et al. 2017 (Algorithm 1) and ALGORITHMS.md section 1:
///   lambda_d = eta_L * ||x_d|| / (||g_d|| + beta * ||x_d||)
///   v_d <- mu * v_d + gamma_t * lambda_d * (g_d + beta * x_d)
///   x_d <- x_d - v_d
/// lambda_d = 1 when ||x_d|| == 0 or ||g_d|| == 0 (a fresh zero-initialized
/// layer, or a layer without gradient, would otherwise get ratio 0 or
/// eta_L / beta), as torchlars and NVIDIA's LARS do, and for excluded layers,
/// which also take beta = 0.
/// The norms come from one fixed-order reduction per layer (bitwise the same
/// for any thread count), then one fused pass per layer updates v and x.
/// Layers switched off by the mask keep x and v untouched and are not read.
/// v starts at 0. The rate of step t (completed step() calls) is schedule(t);
/// options.lr is the constant schedule used until set_schedule.
/// v lives in a policy_buffer allocated at the first step in the memory of
/// its policy (device memory under cuda_par); later steps must use a policy
/// that memory serves (reset() to change). The per-layer norms and ratios are
/// host values (reduce_per_layer returns host memory under every policy, and
/// the host loop turns them into each layer's scale).
template <class T = float>
class lars : public detail::optimizer_base<lars_options> {
 public:
  using value_type = T;

  explicit lars(lars_options options = {})
      : detail::optimizer_base<lars_options>(std::move(options), "gcomp::lars",
                                             "gcomp::lars::set_lr") {
    constexpr std::string_view where = "gcomp::lars";
    check_in_half_open(where, "momentum", options_.momentum, 0.0, 1.0);
    check_non_negative(where, "weight_decay", options_.weight_decay);
    check_positive(where, "trust_coefficient", options_.trust_coefficient);
  }
  /// The rate gamma_t follows `schedule` (options.lr is ignored).
  lars(lars_options options, lr_schedule schedule) : lars(std::move(options)) {
    set_schedule(schedule);
  }

  /// Forgets the momentum and the step count.
  void reset() {
    momentum_.clear();
    norms_.clear();
    ratios_.clear();
    reset_steps();
  }

  template <class Policy>
  void step(const Policy& policy, const layout& lay, std::span<T> params, std::span<const T> grads,
            layer_mask active = {}) {
    constexpr std::string_view where = "gcomp::lars::step";
    check_step_args(where, lay, params.size(), grads.size(), active);
    const std::size_t layers = lay.num_layers();
    if (!ratios_.empty())
      check_same_model(policy, where, params.size(), layers, state_size_, ratios_.size(), momentum_,
                       {"the state built at the first step (call reset() first)",
                        "the layers the state was built for (call reset() first)",
                        "the momentum buffer"});
    const bool use_momentum = options_.momentum != 0.0;
    if (ratios_.empty()) {  // first step: every buffer is allocated here, once
      if (use_momentum) momentum_.assign(policy, params.size(), T(0), where);
      norms_.assign(layers, sums{});
      ratios_.assign(layers, 1.0);
      state_size_ = params.size();
    }

    // Squared norms of x_d and g_d, read together in one pass per layer.
    const T* x_all = params.data();
    const T* g_all = grads.data();
    auto squares = [=] GCOMP_HD(std::size_t i) {
      const acc xi = x_all[i], gi = g_all[i];
      return sums{detail::mul_unfused(xi, xi), detail::mul_unfused(gi, gi)};
    };
    if (active.empty()) {
      reduce_per_layer(policy, lay, std::span<sums>(norms_), sums{}, add_sums{}, squares);
    } else {
      // Inactive layers are not read at all; each active layer's sums are
      // bitwise those reduce_per_layer would give.
      for (std::size_t d = 0; d < layers; ++d) {
        if (active[d] == 0) continue;
        const std::size_t offset = lay[d].offset;
        norms_[d] = transform_reduce(policy, lay[d].size, sums{}, add_sums{},
                                     [=] GCOMP_HD(std::size_t i) { return squares(offset + i); });
      }
    }

    const double gamma = current_lr();
    const T mu = static_cast<T>(options_.momentum);
    for (std::size_t d = 0; d < layers; ++d) {
      if (!active.empty() && active[d] == 0) continue;
      const bool excluded = options_.exclude && options_.exclude(lay[d]);
      const double beta = excluded ? 0.0 : options_.weight_decay;
      const double x_norm = std::sqrt(static_cast<double>(norms_[d].x));
      const double g_norm = std::sqrt(static_cast<double>(norms_[d].y));
      const double ratio = excluded || x_norm == 0.0 || g_norm == 0.0
                               ? 1.0
                               : options_.trust_coefficient * x_norm / (g_norm + beta * x_norm);
      ratios_[d] = ratio;
      const T scale = static_cast<T>(gamma * ratio);
      const T wd = static_cast<T>(beta);
      T* x = params.data() + lay[d].offset;
      const T* g = grads.data() + lay[d].offset;
      const std::size_t n = lay[d].size;
      if (!use_momentum) {
        for_each_index(policy, n,
                       [=] GCOMP_HD(std::size_t i) {
                         using detail::add_unfused, detail::mul_unfused, detail::sub_unfused;
                         const T step = mul_unfused(scale, add_unfused(g[i], mul_unfused(wd, x[i])));
                         x[i] = sub_unfused(x[i], step);
                       });
        continue;
      }
      T* v = momentum_.data() + lay[d].offset;
      for_each_index(policy, n, [=] GCOMP_HD(std::size_t i) {
        using detail::add_unfused, detail::mul_unfused, detail::sub_unfused;
        const T step = mul_unfused(scale, add_unfused(g[i], mul_unfused(wd, x[i])));
        const T vi = add_unfused(mul_unfused(mu, v[i]), step);
        v[i] = vi;
        x[i] = sub_unfused(x[i], vi);
      });
    }
    finish_step();
  }

  /// v (empty until the first step, and always with momentum == 0), in the
  /// memory of the first step's policy: device memory under cuda_par.
  std::span<const T> momentum_buffer() const { return momentum_.span(); }
  /// lambda_d of each layer's last active step (1 before it; empty before the first step).
  std::span<const double> trust_ratios() const { return ratios_; }

  /// Checkpoint section "gcomp::lars" (version 1): the step count (the
  /// schedule's position), the parameter count the state was built for, the
  /// trust ratios of each layer's last active step (one per layer; empty
  /// before the first step) and v (empty with momentum 0). The norms are
  /// recomputed before every use, so they are not saved; nor are options.
  void save(checkpoint_writer& out) const {
    out.begin("gcomp::lars", 1);
    out.value("steps", steps());
    out.value("params", static_cast<std::uint64_t>(state_size_));
    out.array("trust_ratios", ratios_);
    out.array("momentum", momentum_.to_host());
    out.end();
  }

  /// Reads save()'s section, v into the memory of `policy`. Once this lars
  /// has stepped, only a checkpoint of the same sizes is taken; a rejected
  /// checkpoint leaves it unchanged.
  template <class Policy>
  void load(const Policy& policy, checkpoint_reader& in) {
    constexpr std::string_view where = "gcomp::lars::load";
    in.begin("gcomp::lars", 1);
    const auto steps = in.value<std::uint64_t>("steps");
    const auto params = in.value<std::uint64_t>("params");
    const bool started = !ratios_.empty();
    if (started && params != state_size_)
      fail(where, "the checkpoint's state is for ", params,
           " parameters but this lars has state for ", state_size_,
           " (a checkpoint of another model size?)");
    auto ratios = detail::load_state_array<double>(in, "trust_ratios", started, ratios_.size());
    const auto momentum = detail::load_state_array<T>(in, "momentum", started, momentum_.size());
    in.end();
    // step() indexes v by the parameter count whenever it has momentum: a
    // checkpoint without v (saved with momentum 0) or of another size would
    // make it read out of bounds.
    const bool needs_momentum = options_.momentum != 0.0 && !ratios.empty();
    if (momentum.size() != params && (needs_momentum || !momentum.empty()))
      fail(where, "the checkpoint's momentum holds ", momentum.size(),
           " values but its state is for ", params, " parameters and this lars has momentum ",
           options_.momentum,
           needs_momentum ? " (a checkpoint saved with momentum 0?)" : "");
    if (ratios.empty() && params != 0)
      fail(where, "the checkpoint's state is for ", params,
           " parameters but holds no trust ratios (one per layer after the first step)");
    auto buffer = detail::buffer_from_host(policy, momentum, where);
    std::vector<sums> norms(ratios.size());  // scratch, sized as step() expects
    momentum_ = std::move(buffer);
    norms_ = std::move(norms);
    ratios_ = std::move(ratios);
    state_size_ = static_cast<std::size_t>(params);
    restore_steps(steps);
  }

 private:
  // Sums of squares of x (.x) and g (.y) over a layer.
  using sums = detail::sums_of_squares<T>;
  using add_sums = detail::add_sums_of_squares<T>;
  using acc = typename sums::acc;

  std::size_t state_size_ = 0;
  policy_buffer<T> momentum_;
  std::vector<sums> norms_;
  std::vector<double> ratios_;
};

}  // namespace gcomp
