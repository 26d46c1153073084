// Optimizers under cuda_par: state in device policy_buffers, results bitwise those of host_seq; exits 77 (skipped) without a GPU.
#include <doctest/doctest.h>

#include <gcomp/exec/buffer.hpp>
#include <gcomp/exec/cuda.cuh>
#include <gcomp/exec/host.hpp>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <vector>

#include "../optim_sameness.hpp"

#include "cuda_support.hpp"

using gcomp_test::cuda_require;
using gcomp_test::stream_holder;

namespace {
using namespace gcomp_test::sameness;

static_assert(gcomp::optimizer<gcomp::sgd<float>, gcomp::cuda_par>);
static_assert(gcomp::optimizer<gcomp::lamb<double>, gcomp::cuda_par, double>);
static_assert(gcomp::buffer_policy<gcomp::cuda_par>);

}  // namespace

TEST_CASE("sgd under cuda_par equals host_seq bitwise") {
  stream_holder s;
  check_sgd_cases(gcomp::cuda_par{s.stream});
}

TEST_CASE("adam and adamw under cuda_par equal host_seq bitwise") {
  stream_holder s;
  check_adam_cases(gcomp::cuda_par{s.stream});
}

TEST_CASE("lars under cuda_par equals host_seq bitwise") {
  stream_holder s;
  check_lars_cases(gcomp::cuda_par{s.stream});
}

TEST_CASE("lamb under cuda_par equals host_seq bitwise") {
  stream_holder s;
  check_lamb_cases(gcomp::cuda_par{s.stream});
}

TEST_CASE("optimizers on the default stream and under thrust_device equal host_seq bitwise") {
  check_same_as_host(gcomp::cuda_par{}, gcomp::adam<float>({.amsgrad = true}), true);
  check_same_as_host(gcomp::thrust_device{}, gcomp::sgd<float>({.lr = 0.05, .momentum = 0.9}), true);
}

TEST_CASE("optimizers refuse host state under cuda_par until reset") {
  stream_holder s;
  const gcomp::cuda_par policy{s.stream};
  check_refuses_foreign_state(policy, gcomp::sgd<float>({.lr = 0.1, .momentum = 0.9}),
                              "gcomp::sgd::step");
  check_refuses_foreign_state(policy, gcomp::adamw<float>(gcomp::adamw_options{}), "gcomp::adamw::step");
  check_refuses_foreign_state(policy, gcomp::lars<float>(gcomp::lars_options{}), "gcomp::lars::step");
  check_refuses_foreign_state(policy, gcomp::lamb<float>(gcomp::lamb_options{}), "gcomp::lamb::step");
}

TEST_CASE("policy_buffer under cuda_par: device memory, sized once, deep copies") {
  stream_holder s;
  const gcomp::cuda_par policy{s.stream};
  gcomp::policy_buffer<float> b;
  b.assign(policy, 1 << 20, 2.5f);
  CHECK(b.memory() == &gcomp::cuda_device_memory_kind);
  cudaPointerAttributes attributes{};
  cuda_require(cudaPointerGetAttributes(&attributes, b.data()), "cudaPointerGetAttributes");
  CHECK(attributes.type == cudaMemoryTypeDevice);
  // The fill was only queued on a non-blocking stream: to_host must wait for it.
  CHECK(b.to_host() == std::vector<float>(1 << 20, 2.5f));
  const float* first = b.data();
  b.clear();
  b.assign(policy, 1000, -1.0f);
  CHECK(b.data() == first);
  b.fill(policy, 7.0f);
  gcomp::policy_buffer<float> copy = b;  // device to device, after the queued fill
  CHECK(copy.data() != b.data());
  b.fill(policy, 1.0f);
  CHECK(copy.to_host() == std::vector<float>(1000, 7.0f));
  CHECK(b.to_host() == std::vector<float>(1000, 1.0f));
  // Host memory cannot serve cuda_par: assign moves the buffer to device memory.
  gcomp::policy_buffer<float> moved;
  moved.assign(gcomp::host_seq{}, 10, 1.0f);
  CHECK_THROWS_AS(moved.fill(policy, 0.0f), gcomp::error);
  moved.assign(policy, 10, 3.0f);
  CHECK(moved.memory() == &gcomp::cuda_device_memory_kind);
  CHECK(moved.to_host() == std::vector<float>(10, 3.0f));
}

TEST_CASE("policy_buffer turns CUDA errors into gcomp::error naming the call") {
  gcomp::policy_buffer<float> b;
  // 2^60 bytes: cudaMalloc must fail, deterministically, before anything runs.
  const std::size_t n = std::size_t{1} << 58;
  try {
    b.assign(gcomp::cuda_par{}, n, 0.0f, "caller");
    FAIL("no gcomp::error for a petabyte allocation");
  } catch (const gcomp::error& e) {
    const std::string message = e.what();
    CHECK(message.find("caller: cudaMalloc of ") == 0);
    CHECK(message.find(cudaGetErrorString(cudaErrorMemoryAllocation)) != std::string::npos);
  }
  CHECK(b.empty());
  CHECK(b.memory() == nullptr);
  // The error was cleared: the next allocation works.
  b.assign(gcomp::cuda_par{}, 4, 1.0f);
  CHECK(b.to_host() == std::vector<float>(4, 1.0f));
}
