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
#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/detail/unfused.hpp"
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
      before_.resize(policy, n, "gcomp::periodic_average::average");  // sized on the first round, reused after
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
      // Unfused, so a device policy measures the host's value.
      last_disagreement_ = transform_reduce(
          policy, n, 0.0, [] GCOMP_HD(double a, double b) { return detail::add_unfused(a, b); },
          [=] GCOMP_HD(std::size_t i) {
            const double d = static_cast<double>(copy[i]) - static_cast<double>(mean[i]);
            return detail::mul_unfused(d, d);
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

  /// Section "gcomp::periodic_average", version 1: period, steps, rounds,
  /// the total traffic (bytes_sent, bytes_received, collectives) and the
  /// parameters' size (size_unset before the first round). The last round's
  /// traffic and disagreement are outputs of that round, not saved.
  void save(checkpoint_writer& out) const {
    out.begin("gcomp::periodic_average", 1);
    out.value("period", static_cast<std::uint64_t>(options_.period));
    out.value("steps", steps_);
    out.value("rounds", rounds_);
    out.value("bytes_sent", traffic_.bytes_sent);
    out.value("bytes_received", traffic_.bytes_received);
    out.value("collectives", traffic_.collectives);
    out.value("size", size_ == unsized ? size_unset : static_cast<std::uint64_t>(size_));
    out.end();
  }

  /// Reads what save() wrote; a checkpoint of another period, or of another
  /// parameter size once this object has averaged, is rejected with the
  /// object unchanged.
  template <class Policy>
  void load(const Policy&, checkpoint_reader& in) {
    constexpr std::string_view where = "gcomp::periodic_average::load";
    in.begin("gcomp::periodic_average", 1);
    const auto period = in.value<std::uint64_t>("period");
    const auto steps = in.value<std::uint64_t>("steps");
    const auto rounds = in.value<std::uint64_t>("rounds");
    comm_stats traffic;
    traffic.bytes_sent = in.value<std::uint64_t>("bytes_sent");
    traffic.bytes_received = in.value<std::uint64_t>("bytes_received");
    traffic.collectives = in.value<std::uint64_t>("collectives");
    const auto size = in.value<std::uint64_t>("size");
    in.end();
    require(period == options_.period, where, "the checkpoint averages every ", period,
            " steps but this object every ", options_.period);
    require((rounds == 0) == (size == size_unset), where, "the checkpoint records ", rounds,
            " rounds but ", size == size_unset ? "no" : "a", " parameter size");
    if (size_ != unsized && size != size_unset)
      require(size == size_, where, "the checkpoint averaged parameters of size ", size,
              " but this object averages parameters of size ", size_);
    steps_ = steps;
    rounds_ = rounds;
    traffic_ = traffic;
    last_traffic_ = {};
    last_disagreement_ = std::numeric_limits<double>::quiet_NaN();
    size_ = size == size_unset ? unsized : static_cast<std::size_t>(size);
  }

  /// The "size" a checkpoint records before the first round.
  static constexpr std::uint64_t size_unset = std::numeric_limits<std::uint64_t>::max();

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
  policy_buffer<T> before_;     // the parameters before the round (measure_disagreement), the policy's memory
};

}  // namespace gcomp
