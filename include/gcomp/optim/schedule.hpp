// Learning-rate schedules (constant, step, cosine, linear warm-up) that every optimizer accepts.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>
#include <string_view>

#include "gcomp/core/error.hpp"

namespace gcomp {

/// The learning rate as a function of the step index t = 0, 1, 2, ...
/// (the number of step() calls the optimizer has completed before this one):
///   constant(lr):                 lr
///   step(lr, step_size, gamma):   lr * gamma^floor(t / step_size)
///   cosine(lr, total, min_lr):    min_lr + (lr - min_lr) * (1 + cos(pi * t / total)) / 2
///                                 for t < total, then min_lr
///   linear_warmup(w, inner):      inner(0) * (t + 1) / w for t < w, then inner(t - w)
/// The warm-up reaches the full rate on its last step (t = w - 1) and never
/// spends a step at rate 0; the inner schedule starts counting after it, so a
/// cosine's `total` counts the steps after the warm-up.
///
/// A plain value (no pointers, no allocation): copied into optimizers and
/// evaluated on the host once per step.
class lr_schedule {
 public:
  enum class kind : std::uint8_t { constant, step, cosine };

  /// The same rate at every step. Also what an optimizer uses until given a schedule.
  static lr_schedule constant(double lr) {
    check_non_negative("gcomp::lr_schedule::constant", "lr", lr);
    lr_schedule s;
    s.kind_ = kind::constant;
    s.lr_ = lr;
    return s;
  }

  /// Multiplies the rate by gamma every step_size steps (torch's StepLR).
  static lr_schedule step(double lr, std::uint64_t step_size, double gamma) {
    constexpr std::string_view where = "gcomp::lr_schedule::step";
    check_non_negative(where, "lr", lr);
    check_positive(where, "step_size", step_size);
    check_in_range(where, "gamma", gamma, 0.0, 1.0);
    lr_schedule s;
    s.kind_ = kind::step;
    s.lr_ = lr;
    s.period_ = step_size;
    s.gamma_ = gamma;
    return s;
  }

  /// Half a cosine from lr down to min_lr over total_steps, then min_lr
  /// (torch's CosineAnnealingLR without restarts, T_max = total_steps).
  static lr_schedule cosine(double lr, std::uint64_t total_steps, double min_lr = 0.0) {
    constexpr std::string_view where = "gcomp::lr_schedule::cosine";
    check_non_negative(where, "lr", lr);
    check_positive(where, "total_steps", total_steps);
    check_in_range(where, "min_lr", min_lr, 0.0, lr);
    lr_schedule s;
    s.kind_ = kind::cosine;
    s.lr_ = lr;
    s.period_ = total_steps;
    s.min_lr_ = min_lr;
    return s;
  }

  /// Ramps linearly up to `inner`'s first rate over warmup_steps steps, then
  /// follows `inner` (Goyal et al. 2017's gradual warm-up). One warm-up per schedule.
  static lr_schedule linear_warmup(std::uint64_t warmup_steps, lr_schedule inner) {
    constexpr std::string_view where = "gcomp::lr_schedule::linear_warmup";
    check_positive(where, "warmup_steps", warmup_steps);
    require(inner.warmup_ == 0, where, "inner already has a warm-up of ", inner.warmup_,
            " steps; a schedule takes one warm-up");
    inner.warmup_ = warmup_steps;
    return inner;
  }

  /// The rate for step t (t = 0 is the first step).
  double operator()(std::uint64_t t) const {
    if (t < warmup_) return base(0) * (static_cast<double>(t) + 1.0) / static_cast<double>(warmup_);
    return base(t - warmup_);
  }

  kind shape() const { return kind_; }
  std::uint64_t warmup_steps() const { return warmup_; }

 private:
  lr_schedule() = default;

  double base(std::uint64_t t) const {
    switch (kind_) {
      case kind::constant:
        return lr_;
      case kind::step:
        return lr_ * std::pow(gamma_, static_cast<double>(t / period_));
      case kind::cosine:
        if (t >= period_) return min_lr_;
        return min_lr_ + (lr_ - min_lr_) *
                             (1.0 + std::cos(std::numbers::pi * static_cast<double>(t) /
                                             static_cast<double>(period_))) /
                             2.0;
    }
    return lr_;
  }

  kind kind_ = kind::constant;
  double lr_ = 0.0;
  double gamma_ = 1.0;
  double min_lr_ = 0.0;
  std::uint64_t period_ = 1;  // step_size for step, total_steps for cosine
  std::uint64_t warmup_ = 0;
};

}  // namespace gcomp
