// SASG (Deng, Li, Sun, Lu, "SASG: Sparse Communication with Adaptive Aggregated Stochastic Gradients for Distributed Learning", arXiv:2112.04088, 2021) and its dense baseline LAG (Chen, Giannakis, Sun, Yin, NeurIPS 2018), on one lazy-descent core.
#pragma once

#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/aggregate/allgather.hpp"
#include "gcomp/aggregate/lazy.hpp"
#include "gcomp/compress/error_feedback.hpp"
#include "gcomp/compress/identity.hpp"
#include "gcomp/compress/topk.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/core/nonfinite.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp {

/// What the lazy rule compares this step's gradient grad(x_k; xi_k) with.
enum class lazy_rule_form {
  /// grad(xhat_m; xi_k): the gradient at the last upload point on this
  /// step's mini-batch, from a user callback (the papers' rule; one more
  /// backward pass on the steps that are not forced to upload).
  same_minibatch,
  /// The gradient this worker last uploaded (from an older mini-batch): no
  /// extra pass, one more gradient-sized buffer.
  last_uploaded
};

struct lazy_descent_options {
  double alpha = 0.01;          // step size; it scales the message: msg = C(alpha g (+ e))
  std::size_t history = 10;     // D (lazy_rule_options::history); 0 = upload every step
  std::vector<double> xi = {};  // xi_1..xi_D; empty = the SASG code's (lazy_rule_options::xi)
  lazy_rule_form form = lazy_rule_form::same_minibatch;
  lazy_reduction reduction = lazy_reduction::sum;  // the papers' server sums
  std::uint64_t seed = 0;  // the compressor's key is rng_key{seed, step, rank}
  /// What a step does when some worker's gradient (or gradient_at's output)
  /// is not finite; configuration, not saved in a checkpoint.
  on_nonfinite nonfinite = on_nonfinite::skip_step;
};

/// What the last step() did on this worker.
enum class lazy_step : std::uint8_t {
  none,      // no step since construction or load
  uploaded,  // this worker sent a fresh message
  reused,    // this worker sent nothing; every worker reused its last message
  skipped,   // a non-finite gradient somewhere: no worker changed anything
};

/// Lazy compressed descent, one object per worker:
///   upload (lazy_rule):  msg_m = C(alpha * g_m), xhat_m = x_k (or ghat_m = g_m)
///   skip:                nothing sent; every worker reuses the old msg_m
///   everyone:            x_{k+1} = x_k - sum_m msg_m   (or the mean)
/// With C = error_feedback<topk> this is SASG (the residual e_m moves only on
/// uploads); with C = identity it is LAG / LASG. The threshold's model changes
/// are measured as ||x_{k+1} - x_k||^2 of the parameters actually written.
/// All workers end every step with bitwise equal parameters.
///
/// On a throw params are unchanged. Input errors (sizes, the rule form, a
/// non-finite gradient change) leave the object as it was; a failed exchange
/// (see lazy<allgather>) or a diverged update may leave the error memory and
/// the stored messages one step ahead, and the object should be discarded.
///
/// Non-finite gradients (core/nonfinite.hpp): before the rule or any state
/// sees them, every worker sums one flag over the communicator (one more
/// all-reduce of one value_type per step), covering this step's gradient and,
/// on the steps it is called, gradient_at's output. With skip_step (the
/// default) a NaN/Inf on any worker makes every worker skip the step: params,
/// error memory, stored messages, the rule and the step count stay as they
/// were, step() returns false, last_step() is lazy_step::skipped and
/// skipped_steps() grows by one on every worker. throw_error throws
/// gcomp::error on every worker with the same state kept; propagate checks
/// nothing (the rule then rejects a non-finite change, and a non-finite
/// update is the divergence error above).
///
/// save()/load() checkpoint everything the next steps depend on: the rule,
/// the error memory (through the compressor), every worker's last message,
/// the upload point or last uploaded gradient and the skip count. Training
/// 2N steps equals training N, saving, loading into a fresh object and
/// training N more, bitwise.
template <class C>
class lazy_descent {
 public:
  using compressor_type = C;
  using value_type = typename C::value_type;

  /// name: the method's name in error messages ("gcomp::sasg").
  lazy_descent(std::string_view name, lazy_descent_options options, C compressor, layout lay)
      : name_(name),
        options_(checked(name, std::move(options))),
        rule_({.history = options_.history, .alpha = options_.alpha, .xi = options_.xi}),
        compressor_(std::move(compressor)),
        aggregator_({.reduction = options_.reduction}),
        layout_(std::move(lay)),
        guard_(options_.nonfinite) {}

  /// One step in the same_minibatch form. gradient_at(xhat, out) must write
  /// into out the gradient at xhat on the mini-batch that gave `grads`; it is
  /// called only on steps the rule does not force. Returns whether this
  /// worker uploaded: false both when it reused its message and when the
  /// step was skipped for a non-finite gradient (last_step() tells which).
  /// On a throw, params are unchanged. With throw_error, the error's index of
  /// the first non-finite entry counts grads first, then gradient_at's output
  /// (index n + i is its element i).
  template <class Policy, class Comm, class GradientAt>
    requires std::invocable<GradientAt&, std::span<const value_type>, std::span<value_type>>
  bool step(const Policy& policy, Comm& comm, std::span<value_type> params,
            std::span<const value_type> grads, GradientAt&& gradient_at) {
    detail::require_host_memory<Policy>();
    check_step(params, grads, lazy_rule_form::same_minibatch);
    const bool forced = rule_.forced();
    std::span<const value_type> checked = grads, at_upload_point;
    if (!forced) {
      // The guard's one flag must cover both gradients, so when it checks,
      // gradient_at writes behind a copy of grads and both are checked at once.
      const std::size_t n = grads.size();
      const bool guarded = guard_.action() != on_nonfinite::propagate;
      reference_.resize(guarded ? 2 * n : n);
      const auto out = std::span<value_type>(reference_).subspan(guarded ? n : 0, n);
      gradient_at(std::span<const value_type>(upload_point_), out);
      if (guarded) {
        value_type* copy = reference_.data();
        const value_type* g = grads.data();
        for_each_index(policy, n, [=](std::size_t i) { copy[i] = g[i]; });
        checked = std::span<const value_type>(reference_);
      }
      at_upload_point = out;
    }
    if (!guard_.admit(policy, comm, checked, name_)) return skipped();
    const bool upload =
        forced || rule_.should_upload(distance2(policy, grads, at_upload_point), comm.size());
    return finish(policy, comm, params, grads, upload);
  }

  /// One step in the last_uploaded form. Returns whether this worker
  /// uploaded (false also for a skipped step; see last_step()).
  template <class Policy, class Comm>
  bool step(const Policy& policy, Comm& comm, std::span<value_type> params,
            std::span<const value_type> grads) {
    detail::require_host_memory<Policy>();
    check_step(params, grads, lazy_rule_form::last_uploaded);
    if (!guard_.admit(policy, comm, grads, name_)) return skipped();
    const bool upload =
        rule_.forced() || rule_.should_upload(distance2(policy, grads, reference_), comm.size());
    return finish(policy, comm, params, grads, upload);
  }

  /// What the last step did on this worker.
  lazy_step last_step() const { return last_; }
  /// Steps every worker skipped for a non-finite gradient (not in steps()).
  std::uint64_t skipped_steps() const { return guard_.skipped_steps(); }
  on_nonfinite nonfinite_action() const { return guard_.action(); }
  void set_nonfinite_action(on_nonfinite action) { guard_.set_action(action); }

  /// Section `name` (e.g. "gcomp::sasg"), version 1: layer_sizes, alpha,
  /// form, reduction and seed (to reject a checkpoint of another model or
  /// method), the guard's counts, the rule, the compressor's state (error
  /// memory), the aggregator (every worker's last message), upload_point
  /// (same_minibatch form, empty before the first upload) and
  /// uploaded_gradient (last_uploaded form, likewise).
  void save(checkpoint_writer& out) const {
    out.begin(name_, 1);
    out.array("layer_sizes", layer_sizes(layout_));
    out.value("alpha", options_.alpha);
    out.value("form", options_.form);
    out.value("reduction", options_.reduction);
    out.value("seed", options_.seed);
    guard_.save(out);
    rule_.save(out);
    save_state(out, compressor_);
    aggregator_.save(out);
    out.array("upload_point", upload_point_);
    out.array("uploaded_gradient", uploaded_gradient());
    out.end();
  }

  /// Reads what save() wrote into this object, all or nothing: a checkpoint
  /// of another method, model, option or compressor is rejected with
  /// gcomp::error and the object unchanged. The non-finite action is kept
  /// (configuration); update() and last_step() start empty, as after
  /// construction.
  template <class Policy>
  void load(const Policy& policy, checkpoint_reader& in) {
    const std::string where = name_ + "::load";
    lazy_descent next(*this);
    in.begin(name_, 1);
    const auto sizes = in.vector<std::uint64_t>("layer_sizes");
    require(sizes == layer_sizes(layout_), where, "the checkpoint is of a model with ",
            sizes.size(), " layers and ", sum(sizes), " elements but this one has ", layout_.num_layers(),
            " layers and ", layout_.total_size(), " (or layers of other sizes)");
    const auto alpha = in.value<double>("alpha");
    const auto form = in.value<lazy_rule_form>("form");
    const auto reduction = in.value<lazy_reduction>("reduction");
    const auto seed = in.value<std::uint64_t>("seed");
    require(alpha == options_.alpha && form == options_.form && reduction == options_.reduction &&
                seed == options_.seed,
            where, "the checkpoint was written with alpha ", alpha, ", form ", int(form),
            ", reduction ", int(reduction), ", seed ", seed, " but this object has alpha ",
            options_.alpha, ", form ", int(options_.form), ", reduction ", int(options_.reduction),
            ", seed ", options_.seed);
    next.guard_.load(policy, in);
    next.rule_.load(policy, in);
    load_state(policy, in, next.compressor_);
    next.aggregator_.load(policy, in, next.compressor_);
    auto upload_point = in.vector<value_type>("upload_point");
    auto uploaded = in.vector<value_type>("uploaded_gradient");
    in.end();
    const std::size_t n = layout_.total_size();
    const bool any = next.rule_.uploads() > 0;
    const bool callback = options_.form == lazy_rule_form::same_minibatch;
    require(upload_point.size() == (callback && any ? n : 0) &&
                uploaded.size() == (!callback && any ? n : 0),
            where, "the checkpoint holds an upload point of ", upload_point.size(),
            " and an uploaded gradient of ", uploaded.size(), " elements after ",
            next.rule_.uploads(), " uploads of a model of ", n);
    require(next.aggregator_.workers() == 0 || next.aggregator_.dimension() == n, where,
            "the checkpoint's stored messages have size ", next.aggregator_.dimension(),
            " but the model has ", n);
    next.upload_point_ = std::move(upload_point);
    if (!callback) next.reference_ = std::move(uploaded);
    next.update_.clear();
    next.last_ = lazy_step::none;
    next.guard_.set_action(guard_.action());
    *this = std::move(next);
  }

  /// This worker's rule: its uploads, skips, staleness tau_m and threshold.
  const lazy_rule& rule() const { return rule_; }
  /// The aggregator: every worker's upload and skip counts, last bytes sent.
  const lazy<allgather>& aggregator() const { return aggregator_; }
  C& compressor() { return compressor_; }
  const C& compressor() const { return compressor_; }
  /// The last step's x_k - x_{k+1} before rounding: sum (or mean) of the messages.
  std::span<const value_type> update() const { return update_; }
  /// xhat_m, the parameters at this worker's last upload (same_minibatch form).
  std::span<const value_type> upload_point() const { return upload_point_; }
  /// The gradient this worker last uploaded, before alpha (last_uploaded form).
  std::span<const value_type> uploaded_gradient() const {
    return options_.form == lazy_rule_form::last_uploaded ? std::span<const value_type>(reference_)
                                                          : std::span<const value_type>();
  }
  std::uint64_t steps() const { return rule_.steps(); }
  const lazy_descent_options& options() const { return options_; }
  const layout& model_layout() const { return layout_; }

 private:
  static lazy_descent_options checked(std::string_view name, lazy_descent_options options) {
    require(options.form == lazy_rule_form::same_minibatch ||
                options.form == lazy_rule_form::last_uploaded,
            name, "options.form must be same_minibatch or last_uploaded, got ",
            static_cast<int>(options.form));
    return options;  // the rest is checked by lazy_rule and lazy<allgather>
  }

  void check_step(std::span<value_type> params, std::span<const value_type> grads,
                  lazy_rule_form form) const {
    layout_.check_buffer(name_, "params", params.size());
    check_same_size(name_, "grads", grads.size(), "params", params.size());
    require(options_.form == form, name_, "this object uses the ",
            options_.form == lazy_rule_form::same_minibatch ? "same_minibatch" : "last_uploaded",
            " rule form: call step ",
            options_.form == lazy_rule_form::same_minibatch ? "with" : "without",
            " a gradient_at callback");
  }

  static std::vector<std::uint64_t> layer_sizes(const layout& lay) {
    std::vector<std::uint64_t> sizes;
    for (std::size_t d = 0; d < lay.num_layers(); ++d) sizes.push_back(lay[d].size);
    return sizes;
  }
  static std::uint64_t sum(const std::vector<std::uint64_t>& v) {
    std::uint64_t total = 0;
    for (std::uint64_t x : v) total += x;
    return total;
  }

  bool skipped() {
    last_ = lazy_step::skipped;
    return false;
  }

  // sum_i (a_i - b_i)^2 in double, in the library's fixed reduction order.
  template <class Policy>
  static double distance2(const Policy& policy, std::span<const value_type> a,
                          std::span<const value_type> b) {
    const value_type* x = a.data();
    const value_type* y = b.data();
    return transform_reduce(policy, a.size(), 0.0, [](double s, double t) { return s + t; },
                            [=](std::size_t i) {
                              const double d = static_cast<double>(x[i]) - static_cast<double>(y[i]);
                              return d * d;
                            });
  }

  template <class Policy, class Comm>
  bool finish(const Policy& policy, Comm& comm, std::span<value_type> params,
              std::span<const value_type> grads, bool upload) {
    const std::size_t n = params.size();
    scaled_.resize(n);
    update_.resize(n);
    if (upload) {
      value_type* s = scaled_.data();
      const value_type* g = grads.data();
      const auto alpha = static_cast<value_type>(options_.alpha);
      for_each_index(policy, n, [=](std::size_t i) { s[i] = alpha * g[i]; });
    }
    aggregator_.aggregate(policy, comm, compressor_, std::span<const value_type>(scaled_),
                          std::span<value_type>(update_),
                          rng_key{options_.seed, rule_.steps(), static_cast<std::uint32_t>(comm.rank())},
                          upload);
    value_type* x = params.data();
    const value_type* u = update_.data();
    const double moved = transform_reduce(policy, n, 0.0, [](double s, double t) { return s + t; },
                                          [=](std::size_t i) {
                                            const value_type next = x[i] - u[i];
                                            const double d = static_cast<double>(next) -
                                                             static_cast<double>(x[i]);
                                            return d * d;
                                          });
    require(std::isfinite(moved), name_, "the update moves the parameters by ", moved,
            " (squared); the run has diverged and this object must not be stepped again");
    if (upload) {
      if (options_.form == lazy_rule_form::same_minibatch)
        upload_point_.assign(params.begin(), params.end());
      else
        reference_.assign(grads.begin(), grads.end());
    }
    for_each_index(policy, n, [=](std::size_t i) { x[i] = x[i] - u[i]; });
    rule_.record(upload, moved);
    last_ = upload ? lazy_step::uploaded : lazy_step::reused;
    return upload;
  }

  std::string name_;
  lazy_descent_options options_;
  lazy_rule rule_;
  C compressor_;
  lazy<allgather> aggregator_;
  layout layout_;
  std::vector<value_type> scaled_;        // alpha * g, the compressor's input
  std::vector<value_type> update_;        // sum (or mean) of the M messages
  std::vector<value_type> upload_point_;  // xhat_m (same_minibatch form)
  // same_minibatch: scratch, [copy of grads,] grad at xhat on this batch;
  // last_uploaded: the last uploaded grad.
  std::vector<value_type> reference_;
  nonfinite_guard<value_type> guard_;
  lazy_step last_ = lazy_step::none;
};

/// SASG's options: the top-k fraction h and the lazy-descent options.
struct sasg_options {
  double ratio = 0.01;  // h: layer d sends k_d = max(1, round(h * n_d)) elements
  lazy_descent_options descent = {};
};

/// SASG: lazy descent with per-layer top-k and error feedback. Per worker m:
///   upload: u = alpha g + e_m; msg_m = topk_per_layer(u); e_m = u - msg_m;
///           xhat_m = x_k; tau_m = 1
///   skip:   nothing sent; e_m unchanged; tau_m += 1; the server reuses msg_m
///   x_{k+1} = x_k - sum_m msg_m
/// Defaults of the SASG code: h = 0.01, D = 10, alpha = 0.01. Our choices:
/// k_d rounds h n_d to nearest (gcomp::topk; the code truncates), tau_m is
/// reset to 1 (at most D skips in a row; the code allows D + 1), and xhat_m
/// moves only on uploads (the code moves its lag model every step).
template <class T = float>
class sasg : public lazy_descent<error_feedback<topk<T>>> {
 public:
  sasg(sasg_options options, layout lay)
      : lazy_descent<error_feedback<topk<T>>>(
            "gcomp::sasg", std::move(options.descent),
            error_feedback<topk<T>>(topk<T>(topk_options{.ratio = options.ratio}, lay)), lay) {}

  /// e_m, the error memory (empty before the first upload).
  std::span<const T> residual() const { return this->compressor().residual(); }
};

/// LAG / LASG: the same lazy rule on uncompressed gradients (identity, no
/// error feedback): upload msg_m = alpha g_m, x_{k+1} = x_k - sum_m msg_m.
/// With full local gradients this is LAG-WK (Chen et al. 2018); with
/// mini-batches it is the stochastic LASG the SASG code compares with.
template <class T = float>
class lag : public lazy_descent<identity<T>> {
 public:
  lag(lazy_descent_options options, layout lay)
      : lazy_descent<identity<T>>("gcomp::lag", std::move(options), identity<T>{}, std::move(lay)) {}
};

}  // namespace gcomp
