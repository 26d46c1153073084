// Periodic model averaging (local SGD, and RI-SGD of Haddadpour et al., ICML 2019): every tau local
// steps the workers' parameters are replaced by their mean.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

#include "gcomp/comm/stats.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp {

struct periodic_average_options {
  /// tau: local steps between two averaging rounds (>= 1; 1 is synchronous).
  std::size_t period = 50;
  /// Also measure ||x_m - mean||^2 of this worker's parameters before each
  /// round (the averaging error RI-SGD's redundancy reduces). Costs one copy
  /// of the parameters per round and a buffer of their size.
  bool measure_disagreement = false;
};

/// Call step() once after every local optimizer step; every period-th call
/// all-reduces the parameters and divides by the group size, so every worker
/// leaves with the same mean (rank-ordered sum on inproc_comm and on mpi_comm
/// with rank_ordered summation, then one division: bitwise equal on all
/// workers). Optimizer state such as momentum buffers is not averaged.
///
/// The communicator is an argument of each call, not a member: after a
/// worker leaves, the survivors pass their new, smaller communicator (a new
/// inproc_group, an MPI_Comm_split communicator) and averaging goes on over
/// them with the same schedule.
template <class T = float>
class periodic_average {
 public:
  using value_type = T;

  explicit periodic_average(periodic_average_options options = {}) : options_(options) {
    check_positive("gcomp::periodic_average", "period", options.period);
  }

  const periodic_average_options& options() const { return options_; }
  std::size_t period() const { return options_.period; }

  /// Counts one local step; when it is the period-th since the last round,
  /// averages `params` over `comm` and returns true.
  template <class Policy, class Comm>
    requires communicator<Comm, Policy, T>
  bool step(const Policy& policy, Comm& comm, std::span<T> params) {
    check_params("gcomp::periodic_average::step", params);
    const bool now = due();
    if (now) average(policy, comm, params);
    ++steps_;
    return now;
  }

  /// Averages now, outside the schedule (e.g. once more at the end of
  /// training). Every rank of comm must call it with the same size.
  template <class Policy, class Comm>
    requires communicator<Comm, Policy, T>
  void average(const Policy& policy, Comm& comm, std::span<T> params) {
    check_params("gcomp::periodic_average::average", params);
    const std::size_t n = params.size();
    if (options_.measure_disagreement) {
      before_.resize(n);  // sized on the first round, reused after
      T* copy = before_.data();
      const T* x = params.data();
      for_each_index(policy, n, [=] GCOMP_HD(std::size_t i) { copy[i] = x[i]; });
    }
    const comm_stats start = comm.stats();
    comm.allreduce_sum(policy, params);
    const T size = static_cast<T>(comm.size());
    T* x = params.data();
    for_each_index(policy, n, [=] GCOMP_HD(std::size_t i) { x[i] = x[i] / size; });
    last_traffic_ = comm_stats{comm.stats().bytes_sent - start.bytes_sent,
                               comm.stats().bytes_received - start.bytes_received,
                               comm.stats().collectives - start.collectives};
    traffic_ += last_traffic_;
    ++rounds_;
    size_ = n;
    if (options_.measure_disagreement) {
      const T* copy = before_.data();
      const T* mean = params.data();
      last_disagreement_ = transform_reduce(
          policy, n, 0.0, [] GCOMP_HD(double a, double b) { return a + b; },
          [=] GCOMP_HD(std::size_t i) {
            const double d = static_cast<double>(copy[i]) - static_cast<double>(mean[i]);
            return d * d;
          });
    }
  }

  /// Whether the next step() averages.
  bool due() const { return (steps_ + 1) % options_.period == 0; }
  /// step() calls so far.
  std::uint64_t steps() const { return steps_; }
  /// Averaging rounds so far (scheduled and forced).
  std::uint64_t rounds() const { return rounds_; }
  /// What all rounds moved, read from the communicators' own counters.
  comm_stats traffic() const { return traffic_; }
  /// What the last round moved.
  comm_stats last_traffic() const { return last_traffic_; }
  /// ||x_m - mean||^2 of this worker before the last round; NaN until a
  /// round with measure_disagreement on.
  double last_disagreement() const { return last_disagreement_; }

 private:
  // One object averages one model: a size change is a caller's bug.
  void check_params(std::string_view where, std::span<T> params) const {
    if (size_ != unsized)
      check_same_size(where, "params", params.size(), "the parameters of earlier rounds", size_);
  }

  static constexpr std::size_t unsized = std::numeric_limits<std::size_t>::max();

  periodic_average_options options_;
  std::uint64_t steps_ = 0;
  std::uint64_t rounds_ = 0;
  comm_stats traffic_;
  comm_stats last_traffic_;
  double last_disagreement_ = std::numeric_limits<double>::quiet_NaN();
  std::size_t size_ = unsized;  // the parameters' size, fixed by the first round
  std::vector<T> before_;       // the parameters before the round (measure_disagreement)
};

}  // namespace gcomp
