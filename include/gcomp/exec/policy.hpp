// What makes a type an execution policy: the trait every policy specializes.
#pragma once

#include <concepts>
#include <type_traits>

namespace gcomp {

/// Specialized by each policy (host_seq, host_par, cuda_par, thrust_device).
/// `host_memory` says whether the spans a kernel gets under this policy point
/// to memory the host can read directly.
template <class Policy>
struct policy_traits {
  static constexpr bool is_policy = false;
  static constexpr bool host_memory = false;
};

/// A type that says where and how a kernel runs.
template <class P>
concept execution_policy = policy_traits<std::remove_cvref_t<P>>::is_policy;

/// A policy whose data lives in host memory (host_seq, host_par, and the
/// Thrust policy when it is built for the OpenMP or C++ backend).
template <class P>
concept host_memory_policy =
    execution_policy<P> && policy_traits<std::remove_cvref_t<P>>::host_memory;

namespace detail {

/// Called first by the parts that work on host memory only so far (divisible,
/// the parameter server, the model history and the algorithms of algo/):
/// under a device policy the compiler stops here, below the part's name,
/// instead of the part reading device pointers on the host.
template <class Policy>
constexpr void require_host_memory() {
  static_assert(host_memory_policy<Policy>,
                "this gcomp part works on host memory only for now (host_seq, host_par, thrust_device on "
                "OpenMP); under cuda_par, gcomp::pipeline runs the allreduce, allgather and lazy "
                "aggregators, and active_layers aggregates on the device");
}

}  // namespace detail

}  // namespace gcomp
