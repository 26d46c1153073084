// active_layers: JointSpar's aggregator, an all-reduce of only the active layers packed contiguously (Liu & Mozafari, "JointSpar", ICML 2022).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "gcomp/core/concepts.hpp"
#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/detail/typed_slot.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/detail/unfused.hpp"

namespace gcomp {

/// global_d = (1/M) * sum over workers m of local_{m,d} / pi_d for the active
/// layers d, and 0 for the others (and for any gap between layers).
///
/// The active layers of `local`, each scaled by 1 / pi_d, are packed one after
/// the other into one buffer, in layer order; that buffer alone is
/// all-reduced and unpacked. Every worker must pass the same mask (JointSpar
/// draws it from a shared key): nothing but the values travels, so the wire
/// carries exactly sum over active d of |x_d| * sizeof(T) bytes, with no
/// indices. Inactive layers of `local` are never read, so a trainer that
/// skipped their backward pass may leave anything there. One all-reduce is
/// made per call even when no layer is active, so that workers stay in step.
///
/// It keeps no state from one step to the next (only the last call's counts
/// and a reused buffer), so it has no checkpoint section: save_state writes
/// nothing for it, and jointspar saves the counts it reports.
class active_layers {
 public:
  active_layers() = default;
  // A copy gets a buffer of its own: copies made for other workers' threads must not share one.
  active_layers(const active_layers& other)
      : last_layers_(other.last_layers_),
        last_elements_(other.last_elements_),
        last_bytes_(other.last_bytes_) {}
  active_layers& operator=(const active_layers& other) {
    if (this != &other) *this = active_layers(other);
    return *this;
  }
  active_layers(active_layers&&) noexcept = default;
  active_layers& operator=(active_layers&&) noexcept = default;

  template <class Policy, class Comm, class T>
    requires communicator<Comm, Policy, T>
  void aggregate(const Policy& policy, Comm& comm, const layout& lay, layer_mask active,
                 std::span<const double> inclusion, std::span<const T> local,
                 std::span<T> global) {
    constexpr std::string_view where = "gcomp::active_layers::aggregate";
    lay.check_buffer(where, "local", local.size());
    check_same_size(where, "global", global.size(), "local", local.size());
    const std::size_t layers = lay.num_layers();
    check_same_size(where, "active", active.size(), "layout layers", layers);
    check_same_size(where, "inclusion", inclusion.size(), "layout layers", layers);
    std::size_t packed = 0, count = 0;
    for (std::size_t d = 0; d < layers; ++d) {
      if (active[d] == 0) continue;
      require(inclusion[d] > 0.0 && inclusion[d] <= 1.0, where, "inclusion[", d,
              "] of an active layer must be in (0, 1], got ", inclusion[d]);
      packed += lay[d].size;
      ++count;
    }

    // Sized for every layer on first use, so no later step allocates.
    // In the policy's memory, so under cuda_par NCCL all-reduces device memory.
    auto& buffer = buffer_.get<policy_buffer<T>>("gcomp::active_layers::aggregate");
    buffer.resize(policy, lay.covered_size(), where);  // allocates on the first step only
    T* const pack = buffer.data();
    std::size_t at = 0;
    for (std::size_t d = 0; d < layers; ++d) {
      if (active[d] == 0) continue;
      const T scale = static_cast<T>(1.0 / inclusion[d]);
      const T* src = local.data() + lay[d].offset;
      T* dst = pack + at;
      for_each_index(policy, lay[d].size,
                     [=] GCOMP_HD(std::size_t i) { dst[i] = detail::mul_unfused(src[i], scale); });
      at += lay[d].size;
    }
    comm.allreduce_sum(policy, std::span<T>(pack, packed));

    // Unpack only after the all-reduce succeeded: a failed one leaves global as it was.
    T* const out = global.data();
    if (lay.covered_size() != lay.total_size())
      for_each_index(policy, global.size(), [=] GCOMP_HD(std::size_t i) { out[i] = T(0); });
    const T mean = T(1) / static_cast<T>(comm.size());
    at = 0;
    for (std::size_t d = 0; d < layers; ++d) {
      T* dst = out + lay[d].offset;
      if (active[d] == 0) {
        for_each_index(policy, lay[d].size, [=] GCOMP_HD(std::size_t i) { dst[i] = T(0); });
        continue;
      }
      const T* src = pack + at;
      for_each_index(policy, lay[d].size,
                     [=] GCOMP_HD(std::size_t i) { dst[i] = detail::mul_unfused(src[i], mean); });
      at += lay[d].size;
    }
    last_layers_ = count;
    last_elements_ = packed;
    last_bytes_ = static_cast<std::uint64_t>(packed) * sizeof(T);
  }

  /// Active layers of the last call.
  std::size_t last_active_layers() const { return last_layers_; }
  /// Elements all-reduced by the last call.
  std::size_t last_elements() const { return last_elements_; }
  /// Bytes the last call handed to the all-reduce: what this rank sent and
  /// received under the accounting rule of comm/stats.hpp (which counts 0
  /// in a one-rank group).
  std::uint64_t last_bytes() const { return last_bytes_; }

 private:
  detail::typed_slot buffer_;  // policy_buffer<T>, the packed active layers
  std::size_t last_layers_ = 0;
  std::size_t last_elements_ = 0;
  std::uint64_t last_bytes_ = 0;
};

}  // namespace gcomp
