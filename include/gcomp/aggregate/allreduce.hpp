// The all-reduce aggregator: sums shared-support payloads of all workers and averages them.
#pragma once

#include <cstddef>
#include <span>

#include "gcomp/core/concepts.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/detail/typed_slot.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp {

/// global = (1/M) * sum over workers m of decompress(compress(local_m)).
/// Only for compressors with shared support, whose payloads can be summed
/// element by element without decoding (identity, casts, shared-key
/// random-k, PowerSGD factors); others need an allgather aggregator, and
/// handing one here is a compile error naming `shared_support`.
class allreduce {
 public:
  template <class Policy, class Comm, class C, class T>
    requires allreducible_compressor<C, Policy, T> && communicator<Comm, Policy, T>
  void aggregate(const Policy& policy, Comm& comm, C& c, std::span<const T> local,
                 std::span<T> global, rng_key key) {
    check_same_size("gcomp::allreduce::aggregate", "global", global.size(), "local", local.size());
    auto& message = message_.get<typename C::payload>("gcomp::allreduce::aggregate");
    c.compress(policy, local, message, key);
    comm.allreduce_sum(host_side(policy), message.values());  // a host payload under every policy
    T* out = global.data();
    for_each_index(policy, global.size(), [=] GCOMP_HD(std::size_t i) { out[i] = T(0); });
    c.decompress_add(policy, message, global, T(1) / static_cast<T>(comm.size()));
  }

 private:
  detail::typed_slot message_;  // the payload, reused every step
};

}  // namespace gcomp
