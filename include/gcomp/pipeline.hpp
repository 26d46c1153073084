// pipeline: compressor -> aggregator (over a communicator) -> optimizer, one call per training step.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/core/concepts.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/core/random.hpp"

namespace gcomp {

/// One distributed training step: every worker calls step() with its local
/// gradient; afterwards all workers hold the same parameters. The parts are
/// chosen at compile time; a combination that cannot work (a compressor
/// without shared support under an all-reduce) does not compile.
///
/// The random key of step t on worker m is rng_key{seed, t, m}, so runs are
/// reproducible and shared-key compressors agree across workers.
template <class C, class A, class O>
class pipeline {
 public:
  using value_type = typename O::value_type;

  pipeline(C c, A a, O o, std::uint64_t seed = 0)
      : compressor(std::move(c)), aggregator(std::move(a)), optimizer(std::move(o)), seed_(seed) {}

  template <class Policy, class Comm>
    requires gcomp::aggregator<A, C, Comm, Policy, value_type> &&
             gcomp::optimizer<O, Policy, value_type>
  void step(const Policy& policy, Comm& comm, const layout& lay, std::span<value_type> params,
            std::span<const value_type> grads, layer_mask active = {}) {
    constexpr std::string_view where = "gcomp::pipeline::step";
    lay.check_buffer(where, "params", params.size());
    check_same_size(where, "grads", grads.size(), "params", params.size());
    global_.resize(grads.size());
    aggregator.aggregate(policy, comm, compressor, grads, std::span<value_type>(global_),
                         rng_key{seed_, step_, static_cast<std::uint32_t>(comm.rank())});
    optimizer.step(policy, lay, params, std::span<const value_type>(global_), active);
    ++step_;
  }

  /// Steps taken so far (the `step` of the next random key).
  std::uint64_t steps() const { return step_; }
  std::uint64_t seed() const { return seed_; }
  /// The aggregated gradient of the last step (the same on every worker).
  std::span<const value_type> global_gradient() const { return global_; }

  C compressor;
  A aggregator;
  O optimizer;

 private:
  std::uint64_t seed_;
  std::uint64_t step_ = 0;
  std::vector<value_type> global_;
};

}  // namespace gcomp
