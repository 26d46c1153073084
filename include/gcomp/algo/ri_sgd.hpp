// RI-SGD, redundancy-infused local SGD (Haddadpour, Kamani, Mahdavi, Cadambe, "Trading Redundancy
// for Communication: Speeding up Distributed SGD for Non-convex Optimization", ICML 2019), and
// local SGD as its mu = 0 case.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/aggregate/periodic_average.hpp"
#include "gcomp/comm/stats.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/core/nonfinite.hpp"
#include "gcomp/data/shard.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/optim/sgd.hpp"

namespace gcomp {

namespace detail {

/// to[i] = from[i]: a named functor, since nvcc takes no extended lambda in
/// a private member function.
template <class T>
struct copy_entry {
  T* to;
  const T* from;
  GCOMP_HD void operator()(std::size_t i) const { to[i] = from[i]; }
};

}  // namespace detail

/// The paper's defaults (the authors' code: mu = 0.25 with 8 workers, tau = 50,
/// momentum 0.9, weight decay 2e-4).
struct ri_sgd_options {
  /// mu: every worker also holds mu * M of its neighbours' shards (see shard_plan).
  double redundancy = 0.25;
  /// tau: local steps between two parameter averages.
  std::size_t period = 50;
  /// B / M: samples per step from the worker's own shard; the redundant
  /// parts add their proportional share (see shard_sampler).
  std::size_t own_batch = 32;
  /// The local optimizer; its momentum buffer stays local (never averaged).
  sgd_options optimizer{.lr = 0.01, .momentum = 0.9, .weight_decay = 2e-4};
  /// Seed of the mini-batch streams rng_key{seed, step, worker}.
  std::uint64_t seed = 0;
  /// Measure ||x_m - mean||^2 before every average (periodic_average_options).
  bool measure_disagreement = false;
  /// A local gradient with NaN/Inf: skip_step leaves the local model and its
  /// momentum as they were but still counts the step, so that every worker
  /// reaches the averaging rounds together; the decision is this worker's own
  /// (local steps communicate nothing, and one worker's model is its own
  /// business until it is averaged). throw_error throws with nothing changed;
  /// propagate takes the step as it is.
  on_nonfinite nonfinite = on_nonfinite::skip_step;
};

/// One worker of RI-SGD. Per local step the trainer asks batch() for the
/// sample indices, computes the gradient of its model on them, and calls
/// step(): one momentum-SGD step on the local model (gcomp::sgd), then every
/// tau-th step an all-reduce mean of the parameters (periodic_average).
///
/// Failure tolerance: when a worker leaves, every survivor calls
/// remove_worker(j) and from then on passes a communicator of the survivors
/// only, in which worker plan().survivors()[r] has rank r; step() checks
/// both. covered() says whether every sample is still held by a survivor,
/// which one lost worker cannot break while mu * M >= 1. A worker that fails
/// in the middle of an averaging round makes step() throw on the others with
/// their parameters back at their values before the round; after
/// remove_worker they call redo_average() with the survivors' communicator,
/// which completes the round over the survivors.
template <class T = float>
class ri_sgd {
 public:
  using value_type = T;

  /// Worker `worker` of `workers`, over a data set of `samples` samples.
  ri_sgd(std::size_t samples, int workers, int worker, ri_sgd_options options = {})
      : options_(options),
        plan_(samples, workers, options.redundancy),
        worker_(worker),
        sampler_(plan_, worker, options.own_batch, options.seed),
        optimizer_(options.optimizer),
        averager_(periodic_average_options{options.period, options.measure_disagreement}),
        batch_(sampler_.batch_size()),
        guard_(options.nonfinite) {}

  const ri_sgd_options& options() const { return options_; }
  int worker() const { return worker_; }
  const shard_plan& plan() const { return plan_; }
  const shard_sampler& sampler() const { return sampler_; }

  /// The samples of the next step's mini-batch (own shard first, then the
  /// redundant parts); the same until step() is called.
  std::span<const std::size_t> batch() {
    if (batch_step_ != steps()) {
      sampler_.sample(steps(), std::span<std::size_t>(batch_));
      batch_step_ = steps();
    }
    return batch_;
  }

  /// One local step with the gradient of the local model on batch(); returns
  /// whether the parameters were averaged afterwards. A non-finite gradient is
  /// handled as options().nonfinite says (skipped_steps() counts the skips). comm must be the group
  /// of the remaining workers, this worker at rank plan().survivor_rank().
  /// Argument errors throw before params change; a collective that fails on
  /// another rank throws after the local step, with params restored to this
  /// worker's values after it (the round may have written partial sums into
  /// them) and the round pending: see redo_average(). Rounds keep a copy of
  /// the parameters for that, in a buffer allocated at the first round.
  template <class Policy, class Comm>
    requires communicator<Comm, Policy, T> && gcomp::optimizer<sgd<T>, Policy, T>
  bool step(const Policy& policy, Comm& comm, const layout& lay, std::span<T> params,
            std::span<const T> grads) {
    constexpr std::string_view where = "gcomp::ri_sgd::step";
    require(plan_.active(worker_), where, "worker ", worker_,
            " was removed from the group and cannot step");
    require(!pending_, where,
            "the averaging round of the last step failed and is pending; call redo_average with "
            "the communicator of the remaining workers first");
    check_comm(where, comm);
    lay.check_buffer(where, "params", params.size());
    check_same_size(where, "grads", grads.size(), "params", params.size());
    // One object trains one model; checked here so that a new size throws
    // before the local step rather than in the averaging after it.
    if (steps() > 0)
      check_same_size(where, "params", params.size(), "the parameters of earlier steps", size_);
    if (guard_.admit_local(policy, grads, where)) optimizer_.step(policy, lay, params, grads);
    size_ = params.size();
    return average_or_restore(where, policy, comm, params);
  }

  /// Completes the step whose averaging round failed (average_pending()):
  /// averages params, which step() restored to this worker's values before
  /// the round, over comm, which must be the communicator of the remaining
  /// workers, as in step(). Every remaining worker must call it, after
  /// remove_worker() for each worker that failed. If it fails again, the
  /// round stays pending, with params restored again.
  template <class Policy, class Comm>
    requires communicator<Comm, Policy, T>
  void redo_average(const Policy& policy, Comm& comm, std::span<T> params) {
    constexpr std::string_view where = "gcomp::ri_sgd::redo_average";
    require(pending_, where, "no averaging round is pending; step() did not fail in one");
    require(plan_.active(worker_), where, "worker ", worker_,
            " was removed from the group and cannot average");
    check_comm(where, comm);
    check_same_size(where, "params", params.size(), "the parameters of earlier steps", size_);
    (void)average_or_restore(where, policy, comm, params);
  }

  /// Whether step() failed in its averaging round and redo_average() is due.
  bool average_pending() const { return pending_; }

  /// Worker j left the group. Every survivor calls it (j may be this worker
  /// itself, which then stops stepping). Returns covered().
  bool remove_worker(int worker) {
    plan_.remove(worker);
    return covered();
  }

  /// Whether every shard still has all its samples on some remaining worker.
  bool covered() const { return plan_.covered(); }
  std::vector<int> uncovered_shards() const { return plan_.uncovered_shards(); }

  /// Local steps taken (the step of the next batch's random stream).
  std::uint64_t steps() const { return averager_.steps(); }
  /// Averaging rounds so far and the bytes they moved (the communicators' counts).
  std::uint64_t rounds() const { return averager_.rounds(); }
  comm_stats traffic() const { return averager_.traffic(); }
  /// ||x_m - mean||^2 before the last average (measure_disagreement).
  double last_disagreement() const { return averager_.last_disagreement(); }

  /// Local steps whose update was skipped for a non-finite gradient.
  std::uint64_t skipped_steps() const { return guard_.skipped_steps(); }

  /// Section "gcomp::ri_sgd", version 1: the plan's shape (samples, workers,
  /// redundancy, must match) and survivors, this worker, the model size, the
  /// guard, the local optimizer (momentum) and the averager (step and round
  /// counts). The mini-batch stream is a function of the step, so it resumes
  /// by itself. A round that failed and is pending cannot be saved: redo it first.
  void save(checkpoint_writer& out) const {
    require(!pending_, "gcomp::ri_sgd::save",
            "an averaging round is pending; call redo_average before saving");
    out.begin("gcomp::ri_sgd", 1);
    out.value("samples", static_cast<std::uint64_t>(plan_.samples()));
    out.value("workers", static_cast<std::int32_t>(plan_.workers()));
    out.value("redundancy", plan_.redundancy());
    out.value("worker", static_cast<std::int32_t>(worker_));
    out.array("survivors", plan_.survivors());
    out.value("size", static_cast<std::uint64_t>(size_));
    guard_.save(out);
    save_state(out, optimizer_);
    save_state(out, averager_);
    out.end();
  }

  /// Reads what save() wrote; a checkpoint of another plan, worker or model
  /// size is rejected with this object unchanged. Workers removed in the
  /// checkpoint are removed here too.
  template <class Policy>
  void load(const Policy& policy, checkpoint_reader& in) {
    constexpr std::string_view where = "gcomp::ri_sgd::load";
    require(!pending_, where, "an averaging round is pending; call redo_average before loading");
    ri_sgd next(*this);
    in.begin("gcomp::ri_sgd", 1);
    const auto samples = in.value<std::uint64_t>("samples");
    const auto workers = in.value<std::int32_t>("workers");
    const auto redundancy = in.value<double>("redundancy");
    const auto worker = in.value<std::int32_t>("worker");
    const auto survivors = in.vector<int>("survivors");
    const auto size = in.value<std::uint64_t>("size");
    require(samples == plan_.samples() && workers == plan_.workers() &&
                redundancy == plan_.redundancy(),
            where, "the checkpoint's plan has ", samples, " samples, ", workers,
            " workers and redundancy ", redundancy, " but this one has ", plan_.samples(), ", ",
            plan_.workers(), " and ", plan_.redundancy());
    require(worker == worker_, where, "the checkpoint is worker ", worker, "'s, this is worker ",
            worker_, "'s");
    if (size_ != 0)
      require(size == size_, where, "the checkpoint's model has ", size,
              " parameters but this one has ", size_);
    const auto now = plan_.survivors();
    for (std::size_t i = 0; i < survivors.size(); ++i)
      require(survivors[i] >= 0 && survivors[i] < workers && (i == 0 || survivors[i] > survivors[i - 1]),
              where, "the checkpoint's survivors are not increasing worker indices (entry ", i,
              " is ", survivors[i], ")");
    for (int w : survivors)
      require(plan_.active(w), where, "worker ", w,
              " survives in the checkpoint but was removed here");
    for (int w : now)
      if (!std::binary_search(survivors.begin(), survivors.end(), w)) next.plan_.remove(w);
    next.size_ = static_cast<std::size_t>(size);
    next.guard_.load(policy, in);
    load_state(policy, in, next.optimizer_);
    load_state(policy, in, next.averager_);
    in.end();
    next.guard_.set_action(guard_.action());
    next.batch_step_ = static_cast<std::uint64_t>(-1);
    *this = std::move(next);
  }

  sgd<T>& optimizer() { return optimizer_; }
  const sgd<T>& optimizer() const { return optimizer_; }
  periodic_average<T>& averager() { return averager_; }
  const periodic_average<T>& averager() const { return averager_; }

 private:
  template <class Comm>
  void check_comm(std::string_view where, const Comm& comm) const {
    require(comm.size() == plan_.active_workers(), where, "comm has size ", comm.size(), " but ",
            plan_.active_workers(),
            " workers remain; pass the communicator of the remaining workers");
    const int rank = plan_.survivor_rank(worker_);
    require(comm.rank() == rank, where, "comm.rank() is ", comm.rank(), " but worker ", worker_,
            " must have rank ", rank, " among the remaining workers");
  }

  // The averager's step, with the parameters saved before a round so that a
  // round another worker's failure interrupts can be redone over the
  // survivors. The averager counts the step only when it succeeds, so a
  // failed round is still due when redone.
  template <class Policy, class Comm>
  bool average_or_restore(std::string_view where, const Policy& policy, Comm& comm,
                          std::span<T> params) {
    const std::size_t n = params.size();
    const bool round = averager_.due();
    if (round) {
      if (backup_.size() != n) backup_.assign(policy, n, T(0), where);
      backup_.check_serves(policy, where, "the saved parameters");
      copy(policy, backup_.data(), params.data(), n);
    }
    try {
      const bool averaged = averager_.step(policy, comm, params);
      pending_ = false;
      return averaged;
    } catch (...) {
      if (round) {
        copy(policy, params.data(), backup_.data(), n);
        pending_ = true;
      }
      throw;
    }
  }

  template <class Policy>
  static void copy(const Policy& policy, T* to, const T* from, std::size_t n) {
    for_each_index(policy, n, detail::copy_entry<T>{to, from});
  }

  ri_sgd_options options_;
  shard_plan plan_;
  int worker_;
  shard_sampler sampler_;
  sgd<T> optimizer_;
  periodic_average<T> averager_;
  std::vector<std::size_t> batch_;
  std::size_t size_ = 0;  // the parameters' size, fixed by the first step
  policy_buffer<T> backup_;  // the parameters before the current round
  bool pending_ = false;     // a round failed and awaits redo_average()
  std::uint64_t batch_step_ = static_cast<std::uint64_t>(-1);  // the step batch_ was drawn for
  nonfinite_guard<T> guard_;
};

/// The options of local SGD: ri_sgd_options' defaults with redundancy 0.
inline ri_sgd_options local_sgd_options() {
  ri_sgd_options options;
  options.redundancy = 0.0;
  return options;
}

/// Local SGD with periodic averaging: RI-SGD with mu = 0 (every worker holds
/// only its own shard). options.redundancy must be 0.
template <class T = float>
ri_sgd<T> local_sgd(std::size_t samples, int workers, int worker,
                    ri_sgd_options options = local_sgd_options()) {
  require(options.redundancy == 0.0, "gcomp::local_sgd",
          "redundancy must be 0 for local SGD (use ri_sgd for mu > 0), got ", options.redundancy);
  return ri_sgd<T>(samples, workers, worker, options);
}

}  // namespace gcomp
