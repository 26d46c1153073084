// Compressed gradient descent with bounded delays, its asynchronous aggregated (parameter-server) form, and the step-size and neighbourhood helpers (Khirirat, Feyzmahdavian, Johansson, "Distributed learning with compressed gradients", arXiv:1806.06573, 2018).
//
// The theory in one place (docs/staleness.md has the derivations):
//  - an unbiased Q with E||Q(v)||^2 <= alpha ||v||^2 on an L-smooth, mu-strongly
//    convex f, delays tau_k <= tau and gamma = 1 / (alpha L (1 + tau))
//    (stale_step_size) converges linearly in expectation;
//  - a deterministic Q with ||Q(v) - v|| <= epsilon (grid_round) converges
//    only to a ball around x* whose radius epsilon_neighbourhood gives with
//    explicit constants: epsilon / mu for a quadratic and tau = 0.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/aggregate/stale.hpp"
#include "gcomp/compress/bernoulli.hpp"
#include "gcomp/compress/qsgd.hpp"
#include "gcomp/compress/randomk.hpp"
#include "gcomp/compress/terngrad.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/core/nonfinite.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/optim/sgd.hpp"

namespace gcomp {

struct stale_options {
  double gamma = 0.0;        // step size > 0 (stale_step_size gives the paper's choice)
  delay_options delay{};     // tau and how each tau_k is drawn
  std::uint64_t seed = 0;    // compression keys: rng_key{seed, k, worker}
  std::size_t period = 1;    // parameter-server form: refresh rule of refresh_schedule; 1 otherwise
  /// What a step does with a non-finite gradient from the callback;
  /// configuration, not saved in a checkpoint.
  on_nonfinite nonfinite = on_nonfinite::skip_step;
};

// ---------------------------------------------------------------------------
// Step size and compressor constants

/// gamma = 1 / (alpha L (1 + tau)): the step for an unbiased compressor with
/// variance bound alpha (E||Q(v)||^2 <= alpha ||v||^2, alpha >= 1) on an
/// L-smooth problem with delays at most tau. For the parameter-server form
/// pass the effective delay (stale_parameter_server::effective_delay()).
inline double stale_step_size(double alpha, double smoothness, std::size_t tau) {
  constexpr std::string_view where = "gcomp::stale_step_size";
  require(alpha >= 1.0 && std::isfinite(alpha), where, "alpha must be finite and >= 1, got ", alpha);
  check_positive(where, "smoothness", smoothness);
  return 1.0 / (alpha * smoothness * (1.0 + static_cast<double>(tau)));
}

/// alpha of an unbiased compressor for an n-element input, from the
/// compressor itself: rand-k n / k, TernGrad sqrt(d), QSGD 1 + min(d / s^2,
/// sqrt(d) / s) (d the bucket), natural compression 9 / 8...
template <class C>
  requires compressor_traits<C>::unbiased && requires(const C& c, std::size_t n) {
    { c.alpha(n) } -> std::convertible_to<double>;
  }
double variance_bound(const C& c, std::size_t n) {
  return static_cast<double>(c.alpha(n));
}

/// ... and Bernoulli sparsification max 1 / p_i, which does not depend on n.
template <class C>
  requires compressor_traits<C>::unbiased && requires(const C& c) {
    { c.alpha() } -> std::convertible_to<double>;
  }
double variance_bound(const C& c, std::size_t) {
  return static_cast<double>(c.alpha());
}

/// alpha from options alone (they are checked as the compressor checks them).
inline double variance_bound(const randomk_options& options, std::size_t n) {
  return randomk<float>(options).alpha(n);
}
inline double variance_bound(const qsgd_options& options, std::size_t n) {
  return qsgd<float>(options).alpha(n);
}
inline double variance_bound(const terngrad_options& options, std::size_t n) {
  return terngrad<float>(options).alpha(n);
}
/// Bernoulli sparsification keeping every element with probability p.
inline double bernoulli_variance_bound(double p) { return bernoulli_sparsifier<float>(p).alpha(); }

/// What epsilon_neighbourhood needs to know about the problem and the run.
struct neighbourhood_options {
  double epsilon = 0.0;     // ||Q(v) - v|| <= epsilon (grid_round::epsilon(n))
  double mu = 0.0;          // strong convexity
  double smoothness = 0.0;  // L
  double gamma = 0.0;       // the step, at most 2 / (mu + L)
  std::size_t tau = 0;      // the delay bound
  bool quadratic = false;   // f(x) = 1/2 (x - x*)' H (x - x*): a tighter contraction
};

/// The radius R with limsup_k ||x_k - x*|| <= R for x_{k+1} = x_k - gamma
/// Q(grad f(x_{k - tau_k})), ||Q(v) - v|| <= epsilon, tau_k <= tau:
///   R = gamma epsilon (1 + gamma L tau) / (c - gamma^2 L^2 tau),
/// c = gamma mu for a quadratic and gamma mu L / (mu + L) in general (the
/// contraction of the exact gradient map for gamma <= 2 / (mu + L)). With
/// tau = 0 that is epsilon / mu (quadratic) and epsilon (mu + L) / (mu L) <=
/// 2 epsilon / mu (general). It needs c > gamma^2 L^2 tau, i.e. gamma <
/// c / (gamma L^2 tau); otherwise gcomp::error. The derivation is in
/// docs/staleness.md: ||e_{k+1}|| <= (1 - c) ||e_k|| + gamma^2 L^2 tau
/// max_{k-2tau <= i <= k} ||e_i|| + gamma epsilon (1 + gamma L tau), then the
/// delayed-sequence lemma of Feyzmahdavian et al.
inline double epsilon_neighbourhood(const neighbourhood_options& o) {
  constexpr std::string_view where = "gcomp::epsilon_neighbourhood";
  check_non_negative(where, "epsilon", o.epsilon);
  check_positive(where, "mu", o.mu);
  check_positive(where, "smoothness", o.smoothness);
  check_positive(where, "gamma", o.gamma);
  require(o.mu <= o.smoothness, where, "mu = ", o.mu, " exceeds smoothness = ", o.smoothness);
  require(o.gamma <= 2.0 / (o.mu + o.smoothness), where, "gamma = ", o.gamma,
          " exceeds 2 / (mu + L) = ", 2.0 / (o.mu + o.smoothness));
  const double g = o.gamma, l = o.smoothness, tau = static_cast<double>(o.tau);
  const double c = o.quadratic ? g * o.mu : g * o.mu * l / (o.mu + l);
  const double q = g * g * l * l * tau;
  require(q < c, where, "the delay term gamma^2 L^2 tau = ", q, " must stay below the contraction ",
          c, "; take gamma < ", c / (g * l * l * std::max(tau, 1.0)));
  return g * o.epsilon * (1.0 + g * l * tau) / (c - q);
}

// ---------------------------------------------------------------------------
// The methods

namespace detail {

/// What both methods share: the options, the delays, the ring buffer of past
/// models, and the update x -= gamma u through gcomp::sgd.
template <class T>
class stale_core {
 public:
  stale_core(std::string_view where, const stale_options& o)
      : options(checked(where, o)), delays(o.delay), history(o.delay.max_delay),
        update(sgd_options{.lr = o.gamma}) {}

  /// Throws unless x has the first step's size.
  void check_model(std::string_view where, std::span<const T> x) const {
    if (step != 0) check_same_size(where, "x", x.size(), "the model of the first step", lay.total_size());
  }
  /// The stale model x_{k - d}: x itself for d = 0, else the history's.
  std::span<const T> model(std::span<const T> x, std::size_t d) const {
    return d == 0 ? x : history.ago(d);
  }
  /// x_k joins the history, then x_{k+1} = x_k - gamma u.
  template <class Policy>
  void advance(const Policy& policy, std::span<T> x, std::span<const T> u) {
    if (step == 0) lay = layout{x.size()};
    history.push(policy, std::span<const T>(x));
    update.step(policy, lay, x, u);
    ++step;
  }

  /// The fields both methods' sections open with: the options that shape the
  /// run (gamma, the delays, the seed, the period), the step, the model's
  /// dimension, the history and the update's state.
  void save(checkpoint_writer& out) const {
    out.value("gamma", options.gamma);
    out.value("max_delay", static_cast<std::uint64_t>(options.delay.max_delay));
    out.value("delay_kind", options.delay.kind);
    out.value("delay_seed", options.delay.seed);
    out.value("seed", options.seed);
    out.value("period", static_cast<std::uint64_t>(options.period));
    out.value("step", step);
    out.value("dimension", static_cast<std::uint64_t>(lay.total_size()));
    history.save(out);
    save_state(out, update);
  }

  /// Reads what save() wrote into this core (callers load into a copy): a
  /// checkpoint of other options, or of another model size once this core
  /// has stepped, is rejected.
  template <class Policy>
  void load(const Policy& policy, checkpoint_reader& in, std::string_view where) {
    const auto gamma = in.value<double>("gamma");
    const auto max_delay = in.value<std::uint64_t>("max_delay");
    const auto kind = in.value<delay_kind>("delay_kind");
    const auto delay_seed = in.value<std::uint64_t>("delay_seed");
    const auto seed = in.value<std::uint64_t>("seed");
    const auto period = in.value<std::uint64_t>("period");
    require(gamma == options.gamma && max_delay == options.delay.max_delay &&
                kind == options.delay.kind && delay_seed == options.delay.seed &&
                seed == options.seed && period == options.period,
            where, "the checkpoint was written with gamma ", gamma, ", max_delay ", max_delay,
            ", delay kind ", int(kind), ", delay seed ", delay_seed, ", seed ", seed, ", period ",
            period, " but this method has gamma ", options.gamma, ", max_delay ",
            options.delay.max_delay, ", delay kind ", int(options.delay.kind), ", delay seed ",
            options.delay.seed, ", seed ", options.seed, ", period ", options.period);
    const auto saved_step = in.value<std::uint64_t>("step");
    const auto dimension = in.value<std::uint64_t>("dimension");
    require(saved_step != 0 || dimension == 0, where,
            "a checkpoint before the first step has a model of size ", dimension);
    if (step != 0 && saved_step != 0)
      require(dimension == lay.total_size(), where, "the checkpoint is of a model of size ",
              dimension, " but this method's model has size ", lay.total_size());
    history.load(policy, in);
    require(history.pushes() == saved_step &&
                (saved_step == 0 || history.dimension() == dimension),
            where, "the checkpoint's history has ", history.pushes(), " models of size ",
            history.dimension(), " after ", saved_step, " steps of a model of size ", dimension);
    load_state(policy, in, update);
    step = saved_step;
    lay = saved_step == 0 ? layout{} : layout{static_cast<std::size_t>(dimension)};
  }

  stale_options options;
  delay_schedule delays;
  model_history<T> history;
  sgd<T> update;
  layout lay;
  std::uint64_t step = 0;

 private:
  static const stale_options& checked(std::string_view where, const stale_options& o) {
    check_positive(where, "options.gamma", o.gamma);
    check_positive(where, "options.period", o.period);
    return o;
  }
};

}  // namespace detail

/// x_{k+1} = x_k - gamma Q(g_k), g_k = gradient(x_{k - tau_k}, k), tau_k from
/// the delay schedule (worker 0), Q compressed with rng_key{seed, k, 0}.
/// The gradient is a callback: gradient(std::span<const T> model,
/// std::uint64_t step, std::span<T> out) writes the (full or mini-batch)
/// gradient at `model` into out, which has x's size; the step lets a
/// mini-batch version pick its batch. The update is gcomp::sgd with lr =
/// gamma. Throws gcomp::error on bad options, a model of another size than
/// the first step's, or a compressor's refusal (non-finite gradient under
/// on_nonfinite::propagate...), with x and the method's state unchanged.
///
/// A non-finite gradient is handled as options.nonfinite says, checked on
/// this one process (no communication): skip_step (the default) returns
/// false with x, the step count, the history and the compressor untouched,
/// so the next step asks for the gradient of step k again; throw_error
/// throws with the same state kept. save()/load() checkpoint the step, the
/// history of models, the compressor's and the update's state.
template <class C>
class stale_compressed_gd {
 public:
  using value_type = typename C::value_type;
  using T = value_type;

  stale_compressed_gd(C c, stale_options options)
      : compressor(std::move(c)), core_("gcomp::stale_compressed_gd", options),
        guard_(options.nonfinite) {
    require(options.period == 1, "gcomp::stale_compressed_gd", "options.period = ", options.period,
            " applies to the parameter-server form only; it must be 1 here");
  }

  /// One step; false when it was skipped for a non-finite gradient.
  template <class Policy, class Gradient>
    requires gcomp::compressor<C, Policy, T> &&
             std::invocable<Gradient&, std::span<const T>, std::uint64_t, std::span<T>>
  bool step(const Policy& policy, std::span<T> x, Gradient&& gradient) {
    detail::require_host_memory<Policy>();
    constexpr std::string_view where = "gcomp::stale_compressed_gd::step";
    core_.check_model(where, x);
    const std::uint64_t k = core_.step;
    const std::size_t delay = core_.delays.delay(k, 0);
    grad_.resize(x.size());
    gradient(core_.model(std::span<const T>(x), delay), k, std::span<T>(grad_));
    if (!guard_.admit_local(policy, std::span<const T>(grad_), where)) return false;
    compressor.compress(policy, std::span<const T>(grad_), message_, rng_key{core_.options.seed, k, 0});
    update_buffer_.assign(x.size(), T(0));
    compressor.decompress_add(policy, message_, std::span<T>(update_buffer_), T(1));
    core_.advance(policy, x, std::span<const T>(update_buffer_));
    last_delay_ = delay;
    return true;
  }

  /// Steps skipped for a non-finite gradient (not in steps()).
  std::uint64_t skipped_steps() const { return guard_.skipped_steps(); }
  on_nonfinite nonfinite_action() const { return guard_.action(); }
  void set_nonfinite_action(on_nonfinite action) { guard_.set_action(action); }

  /// Section "gcomp::stale_compressed_gd", version 1: gamma, max_delay,
  /// delay_kind, delay_seed, seed, period, step, dimension, the history
  /// ("gcomp::model_history"), the update's state (gcomp::sgd), the guard's
  /// counts, the compressor's state, last_delay.
  void save(checkpoint_writer& out) const {
    out.begin("gcomp::stale_compressed_gd", 1);
    core_.save(out);
    guard_.save(out);
    save_state(out, compressor);
    out.value("last_delay", static_cast<std::uint64_t>(last_delay_));
    out.end();
  }

  /// Reads what save() wrote, all or nothing: a checkpoint of another method,
  /// of other options or (once this object has stepped) of another model size
  /// is rejected with the object unchanged. last_update() starts empty.
  template <class Policy>
  void load(const Policy& policy, checkpoint_reader& in) {
    constexpr std::string_view where = "gcomp::stale_compressed_gd::load";
    stale_compressed_gd next(*this);
    in.begin("gcomp::stale_compressed_gd", 1);
    next.core_.load(policy, in, where);
    next.guard_.load(policy, in);
    load_state(policy, in, next.compressor);
    const auto last_delay = in.value<std::uint64_t>("last_delay");
    in.end();
    require(last_delay <= next.core_.options.delay.max_delay, where, "last_delay ", last_delay,
            " exceeds max_delay ", next.core_.options.delay.max_delay);
    next.last_delay_ = static_cast<std::size_t>(last_delay);
    next.update_buffer_.clear();
    next.guard_.set_action(guard_.action());
    *this = std::move(next);
  }

  std::uint64_t steps() const { return core_.step; }
  /// tau_k of the last step (after the cut at k).
  std::size_t last_delay() const { return last_delay_; }
  /// Q(g_k) of the last step, decoded: x moved by -gamma times it.
  std::span<const T> last_update() const { return update_buffer_; }
  const stale_options& options() const { return core_.options; }
  const delay_schedule& delays() const { return core_.delays; }

  C compressor;

 private:
  detail::stale_core<T> core_;
  nonfinite_guard<T> guard_;
  typename C::payload message_;
  std::vector<T> grad_;           // g_k
  std::vector<T> update_buffer_;  // Q(g_k), decoded
  std::size_t last_delay_ = 0;
};

/// The asynchronous aggregated form on every worker of a communicator:
/// x_{k+1} = x_k - gamma sum_m q_m, where worker m refreshes
/// q_m = Q(grad f_m(x_{k - tau_k^m})) at the steps refresh_schedule(period)
/// marks due (every step with period 1; all workers at step 0) and the
/// others' q_m are reused (aggregate/stale.hpp explains why every worker
/// keeps identical x). tau_k^m comes from the delay schedule with worker m,
/// Q is keyed rng_key{seed, k, m}. gradient(model, step, out) is called only
/// on the steps this worker is due, with its own f_m (full or mini-batch).
/// The sum is over workers, not the mean: L is the smoothness of f = sum f_m.
///
/// Non-finite gradients (options.nonfinite): on every step where some worker
/// is due, the workers sum one flag (one more all-reduce of one T; a step
/// where none is due still needs no collective) saying whether a due
/// worker's gradient holds NaN or Inf. With skip_step (the default) every
/// worker then skips the step: x, the step count, the history, the stored
/// messages and the compressor stay as they were, step() returns false, and
/// the next step asks the due workers for the gradient of step k again.
/// throw_error throws on every worker with the same state kept.
/// save()/load() checkpoint the step, the history, every worker's last
/// message, the compressor's and the update's state, and the counts.
template <class C>
class stale_parameter_server {
 public:
  using value_type = typename C::value_type;
  using T = value_type;

  stale_parameter_server(C c, stale_options options)
      : compressor(std::move(c)), core_("gcomp::stale_parameter_server", options),
        refresh_(options.period), server_(refresh_schedule(options.period)),
        guard_(options.nonfinite) {}

  /// One step; false when every worker skipped it for a non-finite gradient.
  template <class Policy, class Comm, class Gradient>
    requires gcomp::compressor<C, Policy, T> && communicator<Comm, Policy, T> &&
             std::invocable<Gradient&, std::span<const T>, std::uint64_t, std::span<T>>
  bool step(const Policy& policy, Comm& comm, std::span<T> x, Gradient&& gradient) {
    detail::require_host_memory<Policy>();
    constexpr std::string_view where = "gcomp::stale_parameter_server::step";
    core_.check_model(where, x);
    const std::uint64_t k = core_.step;
    const int me = comm.rank();
    due_.resize(static_cast<std::size_t>(comm.size()));
    bool anyone = false;
    for (int r = 0; r < comm.size(); ++r) {
      due_[static_cast<std::size_t>(r)] = refresh_.due(k, r) ? 1 : 0;
      anyone = anyone || refresh_.due(k, r);
    }
    const bool sending = due_[static_cast<std::size_t>(me)] != 0;
    grad_.resize(x.size());
    std::size_t delay = 0;
    if (sending) {
      delay = core_.delays.delay(k, static_cast<std::uint32_t>(me));
      gradient(core_.model(std::span<const T>(x), delay), k, std::span<T>(grad_));
    }
    // Only due workers computed a gradient; the others check nothing but
    // join the flag's all-reduce. Every worker knows whether anyone is due.
    if (anyone && !guard_.admit(policy, comm,
                                sending ? std::span<const T>(grad_) : std::span<const T>(),
                                where))
      return false;
    sum_.resize(x.size());
    server_.aggregate(policy, comm, compressor, std::span<const std::uint8_t>(due_),
                      std::span<const T>(grad_), std::span<T>(sum_),
                      rng_key{core_.options.seed, k, static_cast<std::uint32_t>(me)});
    core_.advance(policy, x, std::span<const T>(sum_));
    if (sending) {
      ++uploads_;
      last_delay_ = delay;
    }
    last_sent_ = sending;
    return true;
  }

  /// Steps every worker skipped for a non-finite gradient (not in steps()).
  std::uint64_t skipped_steps() const { return guard_.skipped_steps(); }
  on_nonfinite nonfinite_action() const { return guard_.action(); }
  void set_nonfinite_action(on_nonfinite action) { guard_.set_action(action); }

  /// Section "gcomp::stale_parameter_server", version 1: the core's fields
  /// (as stale_compressed_gd's), the guard's counts, the compressor's state,
  /// the server ("gcomp::parameter_server": every worker's last message),
  /// uploads and last_delay.
  void save(checkpoint_writer& out) const {
    out.begin("gcomp::stale_parameter_server", 1);
    core_.save(out);
    guard_.save(out);
    save_state(out, compressor);
    server_.save(out);
    out.value("uploads", uploads_);
    out.value("last_delay", static_cast<std::uint64_t>(last_delay_));
    out.end();
  }

  /// Reads what save() wrote, all or nothing: a checkpoint of another method,
  /// of other options, of another compressor or (once this object has
  /// stepped) of another model or group size is rejected with the object
  /// unchanged. last_update() and last_sent() start empty.
  template <class Policy>
  void load(const Policy& policy, checkpoint_reader& in) {
    constexpr std::string_view where = "gcomp::stale_parameter_server::load";
    stale_parameter_server next(*this);
    in.begin("gcomp::stale_parameter_server", 1);
    next.core_.load(policy, in, where);
    next.guard_.load(policy, in);
    load_state(policy, in, next.compressor);
    next.server_.load(policy, in, next.compressor);
    const auto uploads = in.value<std::uint64_t>("uploads");
    const auto last_delay = in.value<std::uint64_t>("last_delay");
    in.end();
    const std::uint64_t steps = next.core_.step;
    require(uploads <= steps &&
                (steps == 0 || next.server_.dimension() == next.core_.lay.total_size()),
            where, "the checkpoint records ", uploads, " uploads and messages of size ",
            next.server_.dimension(), " after ", steps, " steps of a model of size ",
            next.core_.lay.total_size());
    require(last_delay <= next.core_.options.delay.max_delay, where, "last_delay ", last_delay,
            " exceeds max_delay ", next.core_.options.delay.max_delay);
    next.uploads_ = uploads;
    next.last_delay_ = static_cast<std::size_t>(last_delay);
    next.last_sent_ = false;
    next.sum_.clear();
    next.guard_.set_action(guard_.action());
    *this = std::move(next);
  }

  std::uint64_t steps() const { return core_.step; }
  /// Messages this worker has sent (steps it was due).
  std::uint64_t uploads() const { return uploads_; }
  /// Whether this worker sent at the last step, and the delay of its last message.
  bool last_sent() const { return last_sent_; }
  std::size_t last_delay() const { return last_delay_; }
  /// Bytes this worker put on the wire at the last step.
  std::size_t last_bytes() const { return server_.last_bytes(); }
  /// sum_m q_m of the last step: x moved by -gamma times it.
  std::span<const T> last_update() const { return sum_; }
  /// tau + period - 1: the oldest model a q_m in the sum can come from, the
  /// tau to give stale_step_size.
  std::size_t effective_delay() const { return core_.options.delay.max_delay + core_.options.period - 1; }
  const stale_options& options() const { return core_.options; }
  const delay_schedule& delays() const { return core_.delays; }
  const refresh_schedule& refresh() const { return refresh_; }

  C compressor;

 private:
  detail::stale_core<T> core_;
  refresh_schedule refresh_;
  parameter_server server_;
  nonfinite_guard<T> guard_;
  std::vector<std::uint8_t> due_;
  std::vector<T> grad_;  // this worker's g at its stale model
  std::vector<T> sum_;   // sum of the q_m
  std::uint64_t uploads_ = 0;
  std::size_t last_delay_ = 0;
  bool last_sent_ = false;
};

}  // namespace gcomp
