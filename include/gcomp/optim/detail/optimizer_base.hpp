// The shell every optimizer shares: options, learning-rate schedule, step count and step()'s checks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/optim/schedule.hpp"

namespace gcomp::detail {

/// What step() names when the state built at the first step does not fit the
/// model it is given: the state's size, its layer count and its buffer.
struct state_names {
  std::string_view params;
  std::string_view layers;
  std::string_view buffer;
};

/// The moments of adam, adamw and lamb.
inline constexpr state_names moments_names{
    "the moments built at the first step (call reset() first)",
    "the layers the moments were built for (call reset() first)", "the moments"};

/// Reads one state array of a checkpoint: exactly `expected` elements when
/// the optimizer already has state (its model is known, and another size is
/// rejected naming both), as many as the checkpoint holds when it is fresh.
template <class V>
std::vector<V> load_state_array(checkpoint_reader& in, std::string_view name, bool started,
                                std::size_t expected) {
  if (!started) return in.vector<V>(name);
  std::vector<V> values(expected);
  in.array(name, std::span<V>(values));
  return values;
}

/// A new buffer holding host `values` in the memory of `policy` (device
/// memory under cuda_par), for loading state that steps keep in a policy_buffer.
template <class Policy, class T>
policy_buffer<T> buffer_from_host(const Policy& policy, const std::vector<T>& values,
                                  std::string_view where) {
  policy_buffer<T> buffer;
  buffer.assign_from_host(policy, std::span<const T>(values), where);
  return buffer;
}

/// Holds an optimizer's options (Options::lr is the rate until set_schedule),
/// its learning-rate schedule and its completed step() calls. The optimizer
/// keeps its own state and math, and its reset() calls reset_steps().
template <class Options>
class optimizer_base {
 public:
  const Options& options() const { return options_; }
  /// Changes the learning rate for the next steps to a constant.
  void set_lr(double lr) {
    check_non_negative(set_lr_where_, "lr", lr);
    options_.lr = lr;
    schedule_ = lr_schedule::constant(lr);
  }
  /// The learning rate of step t is schedule(t), t counting from this optimizer's first step.
  void set_schedule(lr_schedule schedule) { schedule_ = schedule; }
  const lr_schedule& schedule() const { return schedule_; }
  /// Completed step() calls: the schedule's index for the next step.
  std::uint64_t steps() const { return steps_; }

 protected:
  /// Checks options.lr (as `where`'s "lr") and makes it the constant schedule;
  /// set_lr reports as `set_lr_where`.
  optimizer_base(Options options, std::string_view where, std::string_view set_lr_where)
      : options_(std::move(options)), set_lr_where_(set_lr_where) {
    check_non_negative(where, "lr", options_.lr);
    schedule_ = lr_schedule::constant(options_.lr);
  }

  void reset_steps() { steps_ = 0; }
  /// Sets the step count read from a checkpoint (the schedule resumes there).
  void restore_steps(std::uint64_t steps) { steps_ = steps; }
  /// The learning rate of the step being taken; finish_step() moves on to the next.
  double current_lr() const { return schedule_(steps_); }
  void finish_step() { ++steps_; }

  /// step()'s argument checks: params fit the layout, grads match params, the
  /// mask (when given) has one entry per layer.
  static void check_step_args(std::string_view where, const layout& lay, std::size_t params,
                              std::size_t grads, layer_mask active) {
    lay.check_buffer(where, "params", params);
    check_same_size(where, "grads", grads, "params", params);
    if (!active.empty())
      check_same_size(where, "active", active.size(), "layout layers", lay.num_layers());
  }

  /// The state built at the first step belongs to one model, in memory `policy`
  /// can use: a different one is a caller's bug, not a fresh start.
  template <class Policy, class T>
  static void check_same_model(const Policy& policy, std::string_view where, std::size_t params,
                               std::size_t layers, std::size_t state_params,
                               std::size_t state_layers, const policy_buffer<T>& buffer,
                               const state_names& names) {
    check_same_size(where, "params", params, names.params, state_params);
    check_same_size(where, "layout layers", layers, names.layers, state_layers);
    buffer.check_serves(policy, where, names.buffer);
  }

  Options options_;
  lr_schedule schedule_ = lr_schedule::constant(0.0);

 private:
  std::uint64_t steps_ = 0;
  std::string_view set_lr_where_;
};

}  // namespace gcomp::detail
