// The whole training step under a device policy (cuda_par, thrust_device): gcomp::pipeline with the allreduce, allgather and lazy aggregators, the active_layers aggregator, JointSpar (SGD and LARS) and RI-SGD give host_seq's parameters and aggregated gradients bit for bit, and hand the communicator every host payload under a host policy and every buffer of the policy's memory under the policy itself; shared by tests/thrust and tests/cuda.
//
// The including test calls check_pipeline_cases(policy, device_comm,
// host_comm) on every rank: the device run talks to device_comm through a
// routing_comm, the host_seq reference to host_comm (the same group under
// Thrust's OpenMP system; a single-rank NCCL communicator and a single-rank
// in-process group under CUDA). The routing matters to nccl_comm, which reads
// a span handed with cuda_par as device memory and stages one handed with a
// host policy: a host payload sent under cuda_par is a host pointer given to
// NCCL as device memory.
#pragma once

#include <doctest/doctest.h>

#include <gcomp/aggregate/active_layers.hpp>
#include <gcomp/aggregate/allgather.hpp>
#include <gcomp/aggregate/allreduce.hpp>
#include <gcomp/aggregate/lazy.hpp>
#include <gcomp/algo/jointspar.hpp>
#include <gcomp/algo/ri_sgd.hpp>
#include <gcomp/compress/error_feedback.hpp>
#include <gcomp/compress/identity.hpp>
#include <gcomp/compress/qsgd.hpp>
#include <gcomp/compress/randomk.hpp>
#include <gcomp/compress/topk.hpp>
#include <gcomp/core/layout.hpp>
#include <gcomp/exec/buffer.hpp>
#include <gcomp/exec/host.hpp>
#include <gcomp/optim/adam.hpp>
#include <gcomp/optim/lamb.hpp>
#include <gcomp/optim/lars.hpp>
#include <gcomp/optim/sgd.hpp>
#include <gcomp/pipeline.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "device_sameness.hpp"

namespace gcomp_test::pipeline_sameness {

/// A communicator that forwards every call to `inner` and records it as
/// "<operation>:host" (handed with host_seq or host_par, so host memory) or
/// "<operation>:device" (handed with the step's device policy).
template <class Inner>
class routing_comm {
 public:
  explicit routing_comm(Inner& inner) : inner_(inner) {}

  int rank() const { return inner_.rank(); }
  int size() const { return inner_.size(); }
  gcomp::comm_stats stats() const { return inner_.stats(); }

  template <class Policy, class T>
  void allreduce_sum(const Policy& policy, std::span<T> data) {
    note<Policy>("allreduce_sum");
    inner_.allreduce_sum(policy, data);
  }
  template <class Policy>
  void allgather(const Policy& policy, std::span<const std::byte> in, std::span<std::byte> out) {
    note<Policy>("allgather");
    inner_.allgather(policy, in, out);
  }
  template <class Policy>
  void allgatherv(const Policy& policy, std::span<const std::byte> in, std::vector<std::byte>& out,
                  std::span<std::size_t> counts) {
    note<Policy>("allgatherv");
    inner_.allgatherv(policy, in, out, counts);
  }
  template <class Policy, class T>
  void broadcast(const Policy& policy, std::span<T> data, int root) {
    note<Policy>("broadcast");
    inner_.broadcast(policy, data, root);
  }
  void barrier() { inner_.barrier(); }
  template <class Policy, class T>
  auto iallreduce_sum(const Policy& policy, std::span<T> data) {
    note<Policy>("iallreduce_sum");
    return inner_.iallreduce_sum(policy, data);
  }

  /// The calls since the last take, in order; clears them.
  std::vector<std::string> take() { return std::exchange(calls_, {}); }

 private:
  template <class Policy>
  void note(const char* operation) {
    calls_.push_back(std::string(operation) + (gcomp::host_policy<Policy> ? ":host" : ":device"));
  }

  Inner& inner_;
  std::vector<std::string> calls_;
};

using gcomp_test::device_sameness::read_back;  // device_sameness.hpp
using gcomp_test::device_sameness::same_bytes;

/// Worker `rank`'s gradient at step t: smooth, signed, different per rank
/// and step, with a NaN at element 5 when `nan_at` == t on rank 0.
inline std::vector<float> gradient_of(int rank, int t, std::size_t n, int nan_at) {
  std::vector<float> g(n);
  for (std::size_t i = 0; i < n; ++i)
    g[i] = static_cast<float>(std::sin(0.37 * double(i) + 1.3 * rank + 0.71 * t) * (1.0 + double(i % 7)) / 4.0);
  if (rank == 0 && t == nan_at && n > 5) g[5] = std::numeric_limits<float>::quiet_NaN();
  return g;
}

/// Starting parameters: cos(frequency i) / divisor.
inline std::vector<float> initial_params(std::size_t n, double frequency, double divisor) {
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i) x[i] = static_cast<float>(std::cos(frequency * double(i)) / divisor);
  return x;
}

inline gcomp::layout sample_layout() { return gcomp::layout{{"w1", 1200}, {"b1", 40}, {"w2", 800}, {"b2", 10}}; }

/// Steps a copy of `prototype` under host_seq on host_comm and another under
/// `policy` on device_comm (through a routing_comm) for `steps` steps:
/// after every step the parameters and the aggregated gradient are bitwise
/// the host's, the step's result (taken or skipped) is the same, and the
/// device run's calls are `per_step` (on a skipped step only its first
/// entry, the non-finite guard's all-reduce).
template <class Pipeline, class Policy, class DeviceComm, class HostComm>
void check_pipeline(const Policy& policy, DeviceComm& device_comm, HostComm& host_comm, const Pipeline& prototype,
                    int steps, const std::vector<std::string>& per_step, int nan_at = -1) {
  const gcomp::layout lay = sample_layout();
  const std::size_t n = lay.total_size();
  Pipeline on_host = prototype;
  Pipeline on_device = prototype;
  routing_comm<DeviceComm> routed(device_comm);
  std::vector<float> params_host = initial_params(n, 0.1, 8.0);
  gcomp::policy_buffer<float> params_device, grads_device;
  params_device.assign_from_host(policy, std::span<const float>(params_host));
  for (int t = 0; t < steps; ++t) {
    CAPTURE(t);
    const std::vector<float> g = gradient_of(device_comm.rank(), t, n, nan_at);
    const bool host_took = on_host.step(gcomp::host_seq{}, host_comm, lay, std::span<float>(params_host),
                                        std::span<const float>(g));
    grads_device.assign_from_host(policy, std::span<const float>(g));
    const bool device_took = on_device.step(policy, routed, lay, params_device.span(),
                                            std::span<const float>(grads_device.span()));
    CHECK(host_took == device_took);
    CHECK(same_bytes(params_host, read_back(policy, std::span<const float>(params_device.span()))));
    if (host_took) {
      const auto global = on_host.global_gradient();
      CHECK(same_bytes(std::vector<float>(global.begin(), global.end()),
                       read_back(policy, on_device.global_gradient())));
      CHECK(routed.take() == per_step);
    } else {
      CHECK(routed.take() == std::vector<std::string>{per_step.front()});
    }
  }
  CHECK(on_host.steps() == on_device.steps());
  CHECK(on_host.skipped_steps() == on_device.skipped_steps());
}

/// The active_layers aggregator (JointSpar's) under `policy`: the packed
/// layers are the policy's memory and all-reduced under the policy; the
/// result is host_seq's bit for bit.
template <class Policy, class DeviceComm, class HostComm>
void check_active_layers(const Policy& policy, DeviceComm& device_comm, HostComm& host_comm) {
  const gcomp::layout lay = sample_layout();
  const std::size_t n = lay.total_size();
  gcomp::active_layers on_host, on_device;
  routing_comm<DeviceComm> routed(device_comm);
  const std::vector<std::uint8_t> active{1, 0, 1, 1};
  const std::vector<double> inclusion{0.5, 1.0, 0.25, 1.0};
  for (int t = 0; t < 3; ++t) {
    CAPTURE(t);
    const std::vector<float> g = gradient_of(device_comm.rank(), t, n, -1);
    std::vector<float> global_host(n, 9.0f);
    on_host.aggregate(gcomp::host_seq{}, host_comm, lay, gcomp::layer_mask(active), std::span<const double>(inclusion),
                        std::span<const float>(g), std::span<float>(global_host));
    gcomp::policy_buffer<float> local, global;
    local.assign_from_host(policy, std::span<const float>(g));
    global.assign(policy, n, 9.0f);
    on_device.aggregate(policy, routed, lay, gcomp::layer_mask(active), std::span<const double>(inclusion),
                          std::span<const float>(local.span()), global.span());
    CHECK(same_bytes(global_host, read_back(policy, std::span<const float>(global.span()))));
    CHECK(routed.take() == std::vector<std::string>{"allreduce_sum:device"});
  }
}

/// JointSpar (SGD or LARS) under `policy`: the same drawn sets,
/// probabilities, parameters and ghat as host_seq, bit for bit (the layer
/// norms behind the probabilities are sums of unfused products); the guard's
/// flag and the packed layers go to the communicator under the policy.
template <class O, class Policy, class DeviceComm, class HostComm>
void check_jointspar(const Policy& policy, DeviceComm& device_comm, HostComm& host_comm, const O& opt) {
  const gcomp::layout lay = sample_layout();
  const std::size_t n = lay.total_size();
  gcomp::jointspar<O> on_host(lay.num_layers(), opt);
  gcomp::jointspar<O> on_device(lay.num_layers(), opt);
  routing_comm<DeviceComm> routed(device_comm);
  std::vector<float> params_host = initial_params(n, 0.2, 4.0);
  gcomp::policy_buffer<float> params_device, grads_device;
  params_device.assign_from_host(policy, std::span<const float>(params_host));
  for (int t = 0; t < 6; ++t) {
    CAPTURE(t);
    const auto mask_host = on_host.begin_step();
    const auto mask_device = on_device.begin_step();
    CHECK(std::vector<std::uint8_t>(mask_host.begin(), mask_host.end()) ==
          std::vector<std::uint8_t>(mask_device.begin(), mask_device.end()));
    const std::vector<float> g = gradient_of(device_comm.rank(), t, n, -1);
    CHECK(on_host.finish_step(gcomp::host_seq{}, host_comm, lay, std::span<float>(params_host),
                              std::span<const float>(g)));
    grads_device.assign_from_host(policy, std::span<const float>(g));
    CHECK(on_device.finish_step(policy, routed, lay, params_device.span(),
                                std::span<const float>(grads_device.span())));
    CHECK(same_bytes(params_host, read_back(policy, std::span<const float>(params_device.span()))));
    const auto global = on_host.global_gradient();
    CHECK(same_bytes(std::vector<float>(global.begin(), global.end()), read_back(policy, on_device.global_gradient())));
    const auto p_host = on_host.probabilities();
    const auto p_device = on_device.probabilities();
    CHECK(same_bytes(std::vector<double>(p_host.begin(), p_host.end()),
                     std::vector<double>(p_device.begin(), p_device.end())));
    CHECK(routed.take() == std::vector<std::string>{"allreduce_sum:device", "allreduce_sum:device"});
  }
}

/// RI-SGD under `policy`: local momentum SGD and, every second step, the
/// parameters all-reduced in place under the policy (a round measures the
/// disagreement too); the same parameters, rounds and disagreement as
/// host_seq, bit for bit, including a local step skipped for a NaN.
template <class Policy, class DeviceComm, class HostComm>
void check_ri_sgd(const Policy& policy, DeviceComm& device_comm, HostComm& host_comm) {
  const gcomp::layout lay = sample_layout();
  const std::size_t n = lay.total_size();
  const gcomp::ri_sgd_options options{.period = 2, .own_batch = 4, .seed = 3, .measure_disagreement = true};
  const int workers = device_comm.size(), rank = device_comm.rank();
  gcomp::ri_sgd<float> on_host(64, workers, rank, options);
  gcomp::ri_sgd<float> on_device(64, workers, rank, options);
  routing_comm<DeviceComm> routed(device_comm);
  std::vector<float> params_host = initial_params(n, 0.3, 2.0);
  gcomp::policy_buffer<float> params_device, grads_device;
  params_device.assign_from_host(policy, std::span<const float>(params_host));
  for (int t = 0; t < 6; ++t) {
    CAPTURE(t);
    const std::vector<float> g = gradient_of(rank, t, n, 3);
    const bool host_round = on_host.step(gcomp::host_seq{}, host_comm, lay, std::span<float>(params_host),
                                         std::span<const float>(g));
    grads_device.assign_from_host(policy, std::span<const float>(g));
    const bool device_round =
        on_device.step(policy, routed, lay, params_device.span(), std::span<const float>(grads_device.span()));
    CHECK(host_round == device_round);
    CHECK(same_bytes(params_host, read_back(policy, std::span<const float>(params_device.span()))));
    CHECK(same_bytes(std::vector<double>{on_host.last_disagreement()}, std::vector<double>{on_device.last_disagreement()}));
    CHECK(routed.take() == (device_round ? std::vector<std::string>{"allreduce_sum:device"} : std::vector<std::string>{}));
  }
  CHECK(on_host.rounds() == on_device.rounds());
  CHECK(on_device.rounds() == 3);
  CHECK(on_host.skipped_steps() == on_device.skipped_steps());
}

/// Every case, in order, on every rank of the group (no SUBCASE: the ranks
/// may be threads of one test).
template <class Policy, class DeviceComm, class HostComm>
void check_pipeline_cases(const Policy& policy, DeviceComm& device_comm, HostComm& host_comm) {
  const std::vector<std::string> reduced{"allreduce_sum:device", "allreduce_sum:host"};
  const std::vector<std::string> gathered{"allreduce_sum:device", "allgatherv:host"};
  {
    INFO("identity, allreduce, SGD with momentum; a NaN step skipped on every worker");
    check_pipeline(policy, device_comm, host_comm,
                   gcomp::pipeline{gcomp::identity<float>{}, gcomp::allreduce{},
                                   gcomp::sgd<float>{{.lr = 0.05, .momentum = 0.9, .weight_decay = 1e-4}}, 3},
                   5, reduced, 2);
  }
  {
    INFO("shared random-k, allreduce, LAMB");
    check_pipeline(policy, device_comm, host_comm,
                   gcomp::pipeline{gcomp::shared_randomk<float>({.ratio = 0.1}), gcomp::allreduce{},
                                   gcomp::lamb<float>{{.lr = 0.01}}, 4},
                   4, reduced);
  }
  {
    INFO("error feedback around top-k, allgather, Adam");
    check_pipeline(policy, device_comm, host_comm,
                   gcomp::pipeline{gcomp::error_feedback<gcomp::topk<float>>(gcomp::topk<float>({.ratio = 0.05})),
                                   gcomp::allgather{}, gcomp::adam<float>{{.lr = 0.01}}, 5},
                   4, gathered);
  }
  {
    INFO("QSGD, allgather, LARS");
    check_pipeline(policy, device_comm, host_comm,
                   gcomp::pipeline{gcomp::qsgd<float>({.levels = 7, .bucket = 256}), gcomp::allgather{},
                                   gcomp::lars<float>{{.lr = 0.1}}, 6},
                   4, gathered);
  }
  {
    INFO("per-worker random-k, lazy allgather (every worker uploads), SGD");
    check_pipeline(policy, device_comm, host_comm,
                   gcomp::pipeline{gcomp::randomk<float>({.ratio = 0.2}), gcomp::lazy<gcomp::allgather>{},
                                   gcomp::sgd<float>{{.lr = 0.05}}, 7},
                   3, gathered);
  }
  {
    INFO("active_layers");
    check_active_layers(policy, device_comm, host_comm);
  }
  {
    INFO("JointSpar");
    check_jointspar(policy, device_comm, host_comm, gcomp::sgd<float>{{.lr = 0.05, .momentum = 0.9}});
  }
  {
    INFO("RI-SGD");
    check_ri_sgd(policy, device_comm, host_comm);
  }
  {
    INFO("JointSpar-LARS");
    check_jointspar(policy, device_comm, host_comm, gcomp::lars<float>{{.lr = 0.1}});
  }
}

}  // namespace gcomp_test::pipeline_sameness
