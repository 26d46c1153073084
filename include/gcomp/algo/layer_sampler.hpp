// layer_sampler: JointSpar's random active-layer set with learned probabilities (Liu & Mozafari, "JointSpar", ICML 2022).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/random.hpp"

namespace gcomp {

/// How the layer probabilities are refreshed after each step
/// (ALGORITHMS.md section 1, step 6).
enum class probability_rule {
  /// EXP3 on the loss l_d = L^2 / p_min^2 - ||ghat_d||^2 (the authors' AdamBS
  /// bandit), then the KL projection onto the capped simplex.
  bandit,
  /// p_d proportional to an EMA of the observed layer norms ||g_d||,
  /// water-filled to sum s within [p_min, 1]: the minimiser of sum ||g_d||^2 / p_d.
  variance_optimal,
  /// p stays where it is (uniform s / D, or what set_probabilities gave).
  fixed
};

struct layer_sampler_options {
  /// s, the expected number of active layers (sum of p). 0 means D / 2, the
  /// paper's default (D * p_min if that is larger). Must lie in [D * p_min, D].
  double budget = 0.0;
  /// The floor of every probability, in (0, 1].
  double p_min = 0.0125;
  probability_rule rule = probability_rule::bandit;
  /// alpha_p, the bandit's step, >= 0. Unset: the learning rate of the
  /// jointspar pipeline that owns the sampler (the paper's alpha_p = eta), or
  /// 0.01 for a sampler used on its own.
  std::optional<double> bandit_rate = std::nullopt;
  /// Divides the bandit loss by its bound L^2 / p_min^2, so it lies in [0, 1]
  /// as in textbook EXP3 (our option; off is the spec's raw loss, whose scale
  /// makes alpha_p = eta a very large step unless gradients are small).
  bool normalize_bandit_loss = false;
  /// variance_optimal: the EMA keeps this share of the old norm estimate, in [0, 1).
  double norm_decay = 0.9;
  /// Seed of the shared key the active sets are drawn from.
  std::uint64_t seed = 0;
};

/// q_d = clip(c * exp(log_weights[d]), p_min, 1) with sum_d q_d = budget,
/// written into q. c is found by bisection on log c (working in logs lets
/// weights that differ by e^700 coexist); the free coordinates (strictly
/// inside (p_min, 1)) are then rescaled so that the sum is exact up to
/// rounding. This is both the KL projection of w onto {sum q = s,
/// p_min <= q <= 1} (the bandit rule) and the water-filling of the
/// variance-optimal rule. log_weights must be finite; q may alias nothing of it.
inline void water_fill(std::span<const double> log_weights, double budget, double p_min,
                       std::span<double> q) {
  constexpr std::string_view where = "gcomp::water_fill";
  const std::size_t n = log_weights.size();
  require(n > 0, where, "log_weights is empty");
  check_same_size(where, "q", q.size(), "log_weights", n);
  require(p_min > 0.0 && p_min <= 1.0, where, "p_min must be in (0, 1], got ", p_min);
  const double count = static_cast<double>(n);
  // The sum of the floors may round above count * p_min; a budget within
  // rounding of a bound is that bound.
  require(std::isfinite(budget) && budget >= count * p_min * (1.0 - 1e-12) &&
              budget <= count * (1.0 + 1e-12),
          where, "budget must be in [", count * p_min, ", ", count, "] (n * p_min, n), got ",
          budget);
  double amax = -std::numeric_limits<double>::infinity();
  double amin = std::numeric_limits<double>::infinity();
  for (std::size_t d = 0; d < n; ++d) {
    const double a = log_weights[d];
    require(std::isfinite(a), where, "log_weights[", d, "] must be finite, got ", a);
    amax = std::max(amax, a);
    amin = std::min(amin, a);
  }
  auto clipped = [&](double t, std::size_t d) {
    return std::clamp(std::exp(t + log_weights[d]), p_min, 1.0);
  };
  auto total = [&](double t) {
    double sum = 0.0;
    for (std::size_t d = 0; d < n; ++d) sum += clipped(t, d);
    return sum;
  };
  // At lo every q_d is p_min (sum n p_min <= s), at hi every q_d is 1 (sum n >= s).
  double lo = std::log(p_min) - amax, hi = -amin;
  for (int iteration = 0; iteration < 200; ++iteration) {
    const double mid = lo + 0.5 * (hi - lo);
    if (!(mid > lo && mid < hi)) break;  // the interval is down to adjacent doubles
    (total(mid) < budget ? lo : hi) = mid;
  }
  // Exact finish: the clipped sets are known, so c on the free set is closed-form.
  double free_sum = 0.0, fixed_sum = 0.0;
  for (std::size_t d = 0; d < n; ++d) {
    const double v = std::exp(hi + log_weights[d]);
    const bool free = v > p_min && v < 1.0;
    q[d] = free ? v : (v <= p_min ? p_min : 1.0);
    (free ? free_sum : fixed_sum) += q[d];
  }
  if (free_sum > 0.0) {
    const double scale = (budget - fixed_sum) / free_sum;
    for (std::size_t d = 0; d < n; ++d)
      if (q[d] > p_min && q[d] < 1.0) q[d] = std::clamp(q[d] * scale, p_min, 1.0);
  }
  // What rounding left over goes to the coordinates that would move first (a
  // larger weight rises first, a smaller one falls first). It is an ulp in
  // general, and the whole gap when the weights are so far apart that f(c)
  // jumps between adjacent doubles of log c.
  double residual = budget;
  for (std::size_t d = 0; d < n; ++d) residual -= q[d];
  for (std::size_t round = 0; round < n && residual != 0.0; ++round) {
    std::size_t pick = n;
    for (std::size_t d = 0; d < n; ++d) {
      const bool room = residual > 0.0 ? q[d] < 1.0 : q[d] > p_min;
      if (room && (pick == n || (residual > 0.0 ? log_weights[d] > log_weights[pick]
                                                : log_weights[d] < log_weights[pick])))
        pick = d;
    }
    if (pick == n) break;
    const double moved = std::clamp(q[pick] + residual, p_min, 1.0);
    residual -= moved - q[pick];
    q[pick] = moved;
  }
}

/// The random set of active layers of JointSpar, and its probabilities.
///
/// Each step t, layer d is active with probability p_d (sum p = s, p_min <=
/// p_d <= 1). The set is drawn from a key that depends on (seed, t) only, so
/// every worker draws the same set without communicating.
///
/// At least one layer must be active. Rather than forcing the argmax-p layer
/// (which biases that layer's estimate), the draw is the independent
/// Bernoulli(p_d) draw conditioned on a non-empty set (the spec's "redraw",
/// done in one pass: the first active layer by inverse CDF, the later ones
/// independently). Layer d is then active with probability
/// pi_d = p_d / (1 - P0), P0 = prod_d (1 - p_d), and scaling by 1 / pi_d
/// (inclusion_probabilities()) keeps the estimate exactly unbiased. pi_d
/// equals p_d up to P0, which is below 1e-6 for s >= 14 whatever D.
///
/// update() refreshes p from the all-reduced scaled gradient's layer norms, so
/// every worker that sees the same global gradient keeps bitwise the same p.
class layer_sampler {
 public:
  /// Tag that separates the draws of the sampler from any other shared-key stream of the same seed.
  static constexpr std::uint64_t key_tag = 0x4A6F696E74537061ull;  // "JointSpa"

  explicit layer_sampler(std::size_t layers, layer_sampler_options options = {})
      : options_(checked(layers, options)),
        p_(layers, options_.budget / static_cast<double>(layers)),
        pi_(layers),
        norm_estimate_(layers, 0.0),
        seen_(layers, 0),
        scratch_(layers) {
    refresh_inclusion();
  }

  std::size_t num_layers() const { return p_.size(); }
  /// The options with the defaults resolved (budget, bandit_rate).
  const layer_sampler_options& options() const { return options_; }
  double budget() const { return options_.budget; }

  /// p_1..p_D: sum s, each in [p_min, 1].
  std::span<const double> probabilities() const { return p_; }
  /// pi_d = P(layer d active): p_d / (1 - P0), what the gradient is scaled by.
  std::span<const double> inclusion_probabilities() const { return pi_; }
  /// P0 = prod (1 - p_d): how likely the unconditioned draw would be empty.
  double empty_probability() const { return empty_; }
  /// The bandit's L: the largest unscaled layer-gradient norm seen so far.
  double max_layer_norm() const { return max_norm_; }
  /// variance_optimal's per-layer norm estimates (0 where never observed).
  std::span<const double> norm_estimates() const { return norm_estimate_; }

  /// The key of step t's draw: the same on every worker.
  rng_key key(std::uint64_t step) const {
    return rng_key{options_.seed, step, 0}.shared().fork(key_tag);
  }

  /// Writes step t's active set into mask (1 = active) and returns its size (>= 1).
  std::size_t draw(std::uint64_t step, std::span<std::uint8_t> mask) const {
    check_same_size("gcomp::layer_sampler::draw", "mask", mask.size(), "layers", p_.size());
    const rng_key k = key(step);
    // The first active layer f: P(f = d) = prod_{e<d} (1 - p_e) p_d / (1 - P0).
    const double u = uniform_double(k, 0) * (1.0 - empty_);
    const std::size_t n = p_.size();
    std::size_t first = n - 1;  // rounding can leave the cumulative sum a hair short of 1 - P0
    double none_before = 1.0, cumulative = 0.0;
    for (std::size_t d = 0; d < n; ++d) {
      cumulative += none_before * p_[d];
      if (u < cumulative) {
        first = d;
        break;
      }
      none_before *= 1.0 - p_[d];
    }
    std::size_t count = 0;
    for (std::size_t d = 0; d < n; ++d) {
      const bool on = d == first || (d > first && uniform_double(k, 1 + d) < p_[d]);
      mask[d] = on ? 1 : 0;
      count += on ? 1 : 0;
    }
    return count;
  }

  /// Refreshes p after a step. active: the step's mask; scaled_norms[d]:
  /// ||ghat_d|| of the all-reduced scaled gradient for the active layers
  /// (ignored elsewhere). Throws, with nothing changed, on a size mismatch or
  /// an active layer's norm that is negative or not finite.
  void update(layer_mask active, std::span<const double> scaled_norms) {
    constexpr std::string_view where = "gcomp::layer_sampler::update";
    const std::size_t n = p_.size();
    check_same_size(where, "active", active.size(), "layers", n);
    check_same_size(where, "scaled_norms", scaled_norms.size(), "layers", n);
    for (std::size_t d = 0; d < n; ++d)
      if (active[d] != 0)
        require(std::isfinite(scaled_norms[d]) && scaled_norms[d] >= 0.0, where,
                "scaled_norms[", d, "] of an active layer must be finite and >= 0, got ",
                scaled_norms[d]);
    switch (options_.rule) {
      case probability_rule::bandit: update_bandit(active, scaled_norms); break;
      case probability_rule::variance_optimal: update_variance_optimal(active, scaled_norms); break;
      case probability_rule::fixed: return;
    }
    refresh_inclusion();
  }

  /// Sets p directly. Each value in [p_min, 1] and the sum equal to s within
  /// 1e-9 relative; throws with nothing changed otherwise.
  void set_probabilities(std::span<const double> p) {
    constexpr std::string_view where = "gcomp::layer_sampler::set_probabilities";
    check_same_size(where, "p", p.size(), "layers", p_.size());
    check_probabilities(where, p);
    std::copy(p.begin(), p.end(), p_.begin());
    refresh_inclusion();
  }

  /// Writes the sampler's state as the section "gcomp::layer_sampler"
  /// (version 1): layers, seed, rule, budget and p_min (what the state means
  /// and which draws it gives), then p, the bandit's L, the variance-optimal
  /// norm estimates and which layers were seen. pi and P0 are not stored: they
  /// are recomputed from p by the same expression, so they come back bitwise.
  void save(checkpoint_writer& out) const {
    out.begin("gcomp::layer_sampler", 1);
    out.value("layers", static_cast<std::uint64_t>(p_.size()));
    out.value("seed", options_.seed);
    out.value("rule", options_.rule);
    out.value("budget", options_.budget);
    out.value("p_min", options_.p_min);
    out.array("probabilities", p_);
    out.value("max_layer_norm", max_norm_);
    out.array("norm_estimates", norm_estimate_);
    out.array("seen", seen_);
    out.end();
  }

  /// Reads what save() wrote. The checkpoint must come from a sampler with
  /// the same layer count, seed, rule, budget and p_min, and its values must
  /// be ones a sampler can hold (p within [p_min, 1] summing to s, finite
  /// non-negative norms); otherwise gcomp::error, with the sampler unchanged.
  /// bandit_rate, normalize_bandit_loss and norm_decay are this sampler's own
  /// (settings, like a learning rate, not state).
  template <class Policy>
  void load(const Policy&, checkpoint_reader& in) {
    constexpr std::string_view where = "gcomp::layer_sampler::load";
    const std::size_t n = p_.size();
    in.begin("gcomp::layer_sampler", 1);
    const auto layers = in.value<std::uint64_t>("layers");
    require(layers == n, where, "the checkpoint has ", layers, " layers but this sampler has ", n);
    const auto seed = in.value<std::uint64_t>("seed");
    require(seed == options_.seed, where, "the checkpoint was written with seed ", seed,
            " but this sampler has seed ", options_.seed);
    const auto rule = in.value<probability_rule>("rule");
    require(rule == options_.rule, where, "the checkpoint was written with rule ",
            rule_name(rule), " but this sampler has rule ", rule_name(options_.rule));
    const auto budget = in.value<double>("budget");
    require(budget == options_.budget, where, "the checkpoint was written with budget ", budget,
            " but this sampler has budget ", options_.budget);
    const auto p_min = in.value<double>("p_min");
    require(p_min == options_.p_min, where, "the checkpoint was written with p_min ", p_min,
            " but this sampler has p_min ", options_.p_min);
    std::vector<double> p(n), estimates(n);
    std::vector<std::uint8_t> seen(n);
    in.array("probabilities", std::span<double>(p));
    const auto max_norm = in.value<double>("max_layer_norm");
    in.array("norm_estimates", std::span<double>(estimates));
    in.array("seen", std::span<std::uint8_t>(seen));
    in.end();
    // The bytes passed the CRC, so these fail only for a checkpoint that was
    // written wrong or crafted; the sampler must never hold such values.
    check_probabilities(where, p);
    require(std::isfinite(max_norm) && max_norm >= 0.0, where,
            "max_layer_norm must be finite and >= 0, got ", max_norm);
    for (std::size_t d = 0; d < n; ++d) {
      require(std::isfinite(estimates[d]) && estimates[d] >= 0.0, where, "norm_estimates[", d,
              "] must be finite and >= 0, got ", estimates[d]);
      require(seen[d] <= 1, where, "seen[", d, "] must be 0 or 1, got ", unsigned(seen[d]));
    }
    p_ = std::move(p);
    norm_estimate_ = std::move(estimates);
    seen_ = std::move(seen);
    max_norm_ = max_norm;
    refresh_inclusion();
  }

 private:
  static std::string_view rule_name(probability_rule rule) {
    switch (rule) {
      case probability_rule::bandit: return "bandit";
      case probability_rule::variance_optimal: return "variance_optimal";
      case probability_rule::fixed: return "fixed";
    }
    return "unknown";
  }

  // Each p_d in [p_min, 1] and sum p = s within 1e-9 relative.
  void check_probabilities(std::string_view where, std::span<const double> p) const {
    double sum = 0.0;
    for (std::size_t d = 0; d < p.size(); ++d) {
      require(p[d] >= options_.p_min && p[d] <= 1.0, where, "p[", d, "] must be in [",
              options_.p_min, ", 1], got ", p[d]);
      sum += p[d];
    }
    require(std::fabs(sum - options_.budget) <= 1e-9 * options_.budget, where,
            "p must sum to the budget ", options_.budget, ", got ", sum);
  }

  static layer_sampler_options checked(std::size_t layers, layer_sampler_options o) {
    constexpr std::string_view where = "gcomp::layer_sampler";
    require(layers > 0, where, "layers must be > 0, got 0");
    require(o.p_min > 0.0 && o.p_min <= 1.0, where, "p_min must be in (0, 1], got ", o.p_min);
    const double count = static_cast<double>(layers);
    if (o.budget == 0.0) o.budget = std::max(count / 2.0, count * o.p_min);
    require(std::isfinite(o.budget) && o.budget >= count * o.p_min && o.budget <= count, where,
            "budget must be in [layers * p_min, layers] = [", count * o.p_min, ", ", count,
            "], got ", o.budget);
    if (!o.bandit_rate) o.bandit_rate = 0.01;
    check_non_negative(where, "bandit_rate", *o.bandit_rate);
    check_in_half_open(where, "norm_decay", o.norm_decay, 0.0, 1.0);
    return o;
  }

  void refresh_inclusion() {
    double empty = 1.0;
    for (double p : p_) empty *= 1.0 - p;
    empty_ = empty;
    for (std::size_t d = 0; d < p_.size(); ++d) pi_[d] = std::min(1.0, p_[d] / (1.0 - empty));
  }

  // EXP3 (ALGORITHMS.md 1.6): for active d, l_d = L^2 / p_min^2 - ||ghat_d||^2 in
  // [0, L^2 / p_min^2] (ghat_d = g_d / pi_d, so ||ghat_d|| <= L / p_min), h_d = l_d / pi_d;
  // inactive layers have h_d = 0. w_d = p_d exp(-alpha h_d), then the KL projection.
  void update_bandit(layer_mask active, std::span<const double> scaled_norms) {
    const std::size_t n = p_.size();
    for (std::size_t d = 0; d < n; ++d)
      if (active[d] != 0) max_norm_ = std::max(max_norm_, pi_[d] * scaled_norms[d]);
    if (max_norm_ == 0.0) return;  // every loss is 0: w = p, nothing to learn yet
    const double bound = max_norm_ * max_norm_ / (options_.p_min * options_.p_min);
    const double alpha = *options_.bandit_rate;
    for (std::size_t d = 0; d < n; ++d) {
      double h = 0.0;
      if (active[d] != 0) {
        double loss = std::max(0.0, bound - scaled_norms[d] * scaled_norms[d]);
        if (options_.normalize_bandit_loss) loss /= bound;
        h = loss / pi_[d];
      }
      // A loss beyond double range still ranks below every inactive layer, with a finite log.
      scratch_[d] = std::max(std::log(p_[d]) - alpha * h, std::numeric_limits<double>::lowest());
    }
    water_fill(scratch_, options_.budget, options_.p_min, p_);
  }

  // Norm estimates n_d (EMA of ||g_d|| = pi_d ||ghat_d||, the first observation
  // taken as it is); a layer never observed borrows the largest estimate, so
  // that it is not starved before it is seen. Zero estimates get weight e^-745
  // relative to the largest: the floor p_min, with finite logs.
  void update_variance_optimal(layer_mask active, std::span<const double> scaled_norms) {
    const std::size_t n = p_.size();
    const double decay = options_.norm_decay;
    for (std::size_t d = 0; d < n; ++d) {
      if (active[d] == 0) continue;
      const double observed = pi_[d] * scaled_norms[d];
      norm_estimate_[d] = seen_[d] != 0 ? decay * norm_estimate_[d] + (1.0 - decay) * observed
                                        : observed;
      seen_[d] = 1;
    }
    double largest = 0.0;
    for (std::size_t d = 0; d < n; ++d)
      if (seen_[d] != 0) largest = std::max(largest, norm_estimate_[d]);
    if (largest == 0.0) {  // nothing seen but zeros: no information, stay uniform
      std::fill(p_.begin(), p_.end(), options_.budget / static_cast<double>(n));
      return;
    }
    const double log_largest = std::log(largest);
    for (std::size_t d = 0; d < n; ++d) {
      const double estimate = seen_[d] != 0 ? norm_estimate_[d] : largest;
      scratch_[d] = estimate > 0.0 ? std::log(estimate) : log_largest - 745.0;
    }
    water_fill(scratch_, options_.budget, options_.p_min, p_);
  }

  layer_sampler_options options_;
  std::vector<double> p_;
  std::vector<double> pi_;
  double empty_ = 0.0;
  double max_norm_ = 0.0;
  std::vector<double> norm_estimate_;
  std::vector<std::uint8_t> seen_;
  std::vector<double> scratch_;  // the log-weights, reused every update
};

}  // namespace gcomp
