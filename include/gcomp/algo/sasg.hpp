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
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
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
        layout_(std::move(lay)) {}

  /// One step in the same_minibatch form. gradient_at(xhat, out) must write
  /// into out the gradient at xhat on the mini-batch that gave `grads`; it is
  /// called only on steps the rule does not force. Returns whether this
  /// worker uploaded. On a throw, params are unchanged.
  template <class Policy, class Comm, class GradientAt>
    requires std::invocable<GradientAt&, std::span<const value_type>, std::span<value_type>>
  bool step(const Policy& policy, Comm& comm, std::span<value_type> params,
            std::span<const value_type> grads, GradientAt&& gradient_at) {
    check_step(params, grads, lazy_rule_form::same_minibatch);
    bool upload = rule_.forced();
    if (!upload) {
      reference_.resize(grads.size());
      gradient_at(std::span<const value_type>(upload_point_), std::span<value_type>(reference_));
      upload = rule_.should_upload(distance2(policy, grads, reference_), comm.size());
    }
    return finish(policy, comm, params, grads, upload);
  }

  /// One step in the last_uploaded form. Returns whether this worker uploaded.
  template <class Policy, class Comm>
  bool step(const Policy& policy, Comm& comm, std::span<value_type> params,
            std::span<const value_type> grads) {
    check_step(params, grads, lazy_rule_form::last_uploaded);
    const bool upload =
        rule_.forced() || rule_.should_upload(distance2(policy, grads, reference_), comm.size());
    return finish(policy, comm, params, grads, upload);
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
  std::vector<value_type> reference_;     // grad at xhat on this batch, or the last uploaded grad
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
