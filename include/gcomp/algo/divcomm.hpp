// Divisible communication for Adam (Xu & Bai, ECML PKDD 2023) as a ready method: the divisible aggregator feeding gcomp::adam; the design beyond the paper's abstract is ours (ALGORITHMS.md section 4).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/aggregate/divisible.hpp"
#include "gcomp/compress/random_block.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/optim/adam.hpp"

namespace gcomp {

/// One training step of divisible Adam on every worker:
///   1. foreground: global = mean over workers of C(e + g), e keeps the rest
///      (divisible::aggregate, error feedback);
///   2. Adam on global: m and v are bitwise identical on all workers because
///      their input is the all-reduced global gradient (with weight_decay > 0
///      they also depend on x, see the parameters payload below);
///   3. background (divisible::background): the non-blocking all-reduce of the
///      parameters or of the residual, applied when it has finished, never waited for.
///
/// Workers that start from the same parameters keep bitwise identical
/// parameters with the residual payload or none, whatever the timing. With the
/// parameters payload the correction avg(x_then) - x_then of identical workers
/// is exactly 0 for M = 1, 2 or 4 (the rank-ordered sum of 4 equal values is
/// exactly 4 times the value); for other M it can be an ulp, and ranks that see
/// completion at different steps apply it at different steps, so parameters
/// may then differ by that rounding until the next correction.
///
/// The random key of step t on worker m is rng_key{seed, t, m}; the compressor
/// draws its block from key.shared(), the same on every worker.
template <class T = float, class C = random_contiguous_block<T, rescale::none>>
class divcomm {
 public:
  using value_type = T;
  using compressor_type = C;

  divcomm(C compressor, divisible_options background = {}, adam_options adam_opts = {},
          std::uint64_t seed = 0)
      : compressor(std::move(compressor)),
        aggregator(background),
        optimizer(adam_opts),
        seed_(seed) {}

  /// One step; params and grads are this worker's flat buffers under `lay`.
  /// Everything is checked before anything changes.
  template <class Policy, class Comm>
    requires allreducible_compressor<C, Policy, T> && communicator<Comm, Policy, T> &&
             communicator<Comm, Policy, std::uint64_t>
  void step(const Policy& policy, Comm& comm, const layout& lay, std::span<T> params,
            std::span<const T> grads) {
    constexpr std::string_view where = "gcomp::divcomm::step";
    lay.check_buffer(where, "params", params.size());
    check_same_size(where, "grads", grads.size(), "params", params.size());
    if (step_ > 0) {
      check_same_size(where, "params", params.size(), "the model of the first step",
                      global_.size());
      check_same_size(where, "layout layers", lay.num_layers(),
                      "the layers of the first step", layers_);
    }
    aggregator.check_background(comm, params.size());
    global_.resize(grads.size());
    layers_ = lay.num_layers();
    aggregator.aggregate(policy, comm, compressor, grads, std::span<T>(global_),
                         rng_key{seed_, step_, static_cast<std::uint32_t>(comm.rank())});
    optimizer.step(policy, lay, params, std::span<const T>(global_));
    aggregator.background(policy, comm, params);
    ++step_;
  }

  /// Waits for the background operation in flight and applies it (the only
  /// blocking call; for the end of training). True if something was applied.
  template <class Policy, class Comm>
  bool finish(const Policy& policy, Comm& comm, std::span<T> params) {
    return aggregator.finish(policy, comm, params);
  }

  std::uint64_t steps() const { return step_; }
  std::uint64_t seed() const { return seed_; }
  /// The averaged foreground gradient of the last step (the same on every worker).
  std::span<const T> global_gradient() const { return global_; }
  const comm_stats& foreground_stats() const { return aggregator.foreground_stats(); }
  const comm_stats& background_stats() const { return aggregator.background_stats(); }

  C compressor;
  divisible<T> aggregator;
  adam<T> optimizer;

 private:
  std::uint64_t seed_;
  std::uint64_t step_ = 0;
  std::size_t layers_ = 0;
  std::vector<T> global_;
};

}  // namespace gcomp
