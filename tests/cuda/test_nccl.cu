// Tests of gcomp/comm/nccl.hpp on one GPU: a single-rank NCCL communicator runs the shared suite (host and device buffers); exits 77 (skipped) without a GPU.
#include <doctest/doctest.h>

#include <gcomp/comm/nccl.hpp>
#include <gcomp/core/concepts.hpp>
#include <gcomp/exec/cuda.cuh>
#include <gcomp/exec/host.hpp>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "../comm_suite.hpp"

#include "cuda_support.hpp"

using gcomp_test::cuda_require;
using gcomp_test::stream_holder;

namespace {

using gcomp::cuda_par;
using gcomp::host_seq;
using gcomp::nccl_comm;

static_assert(gcomp::communicator<nccl_comm, cuda_par, float>);
static_assert(gcomp::communicator<nccl_comm, cuda_par, double>);
static_assert(gcomp::communicator<nccl_comm, host_seq, int>);
static_assert(gcomp::collective_request<gcomp::nccl_request>);

// The suite's Memory for device policies: place() copies a host vector to a
// new device allocation (freed with this object), fetch() waits for `stream`
// (the policy's) and copies the result back.
class device_buffers {
 public:
  explicit device_buffers(cudaStream_t stream) : stream_(stream) {}

  template <class T>
  std::span<T> place(std::vector<T>& host) {
    void* block = nullptr;
    cuda_require(cudaMalloc(&block, std::max<std::size_t>(host.size(), 1) * sizeof(T)), "cudaMalloc");
    blocks_.emplace_back(block);
    if (!host.empty())
      cuda_require(cudaMemcpy(block, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
                   "cudaMemcpy to the device");
    cuda_require(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    return std::span<T>(static_cast<T*>(block), host.size());
  }

  template <class T>
  void fetch(std::span<T> placed, std::vector<T>& host) {
    cuda_require(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    if (!host.empty())
      cuda_require(cudaMemcpy(host.data(), placed.data(), host.size() * sizeof(T),
                              cudaMemcpyDeviceToHost),
                   "cudaMemcpy to the host");
  }

 private:
  struct free_block {
    void operator()(void* p) const { cudaFree(p); }
  };
  cudaStream_t stream_;
  std::vector<std::unique_ptr<void, free_block>> blocks_;
};

// One rank on device 0, and a stream for it; destroyed at scope exit.
struct single_rank {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  single_rank() {
    int device = 0;
    REQUIRE(ncclCommInitAll(&comm, 1, &device) == ncclSuccess);
    cuda_require(cudaStreamCreate(&stream), "cudaStreamCreate");
  }
  ~single_rank() {
    cudaStreamDestroy(stream);
    ncclCommDestroy(comm);
  }
};

}  // namespace

TEST_CASE("nccl: the suite passes with host buffers (staged through the device)") {
  single_rank one;
  nccl_comm comm(one.comm, one.stream);
  CHECK(comm.size() == 1);
  CHECK(comm.rank() == 0);
  // One rank: every sum is the rank's own value, so rank order holds.
  for (int pass = 0; pass < 2; ++pass) gcomp::test::run_comm_suite(host_seq{}, comm);
  CHECK(comm.stats().bytes_sent == 0);  // M = 1: nothing crosses
}

TEST_CASE("nccl: the suite passes with device buffers under cuda_par on the comm's stream") {
  single_rank one;
  nccl_comm comm(one.comm, one.stream);
  gcomp::test::run_comm_suite(cuda_par{one.stream}, comm, {}, device_buffers(one.stream));
}

TEST_CASE("nccl: the suite passes under cuda_par on another stream (events order the two)") {
  single_rank one;
  cudaStream_t other = nullptr;
  cuda_require(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking), "cudaStreamCreate");
  {
    nccl_comm comm(one.comm, one.stream);
    gcomp::test::run_comm_suite(cuda_par{other}, comm, {}, device_buffers(other));
  }
  cudaStreamDestroy(other);
}

TEST_CASE("nccl: each rank's own bad arguments throw before anything is queued") {
  single_rank one;
  nccl_comm comm(one.comm, one.stream);
  std::vector<float> x(4, 1.0f);
  CHECK_THROWS_WITH_AS(comm.broadcast(host_seq{}, std::span(x), 1),
                       "gcomp::nccl_comm::broadcast: root must be in [0, 1), got 1", gcomp::error);
  std::vector<std::byte> in(3), out(4);
  CHECK_THROWS_WITH_AS(
      comm.allgather(host_seq{}, std::span<const std::byte>(in), std::span(out)),
      "gcomp::nccl_comm::allgather: out has 4 bytes on rank 0 but must have size() * in.size() = "
      "1 * 3 = 3",
      gcomp::error);
  std::vector<std::byte> gathered;
  std::vector<std::size_t> counts(2);
  CHECK_THROWS_WITH_AS(
      comm.allgatherv(host_seq{}, std::span<const std::byte>(in), gathered, std::span(counts)),
      "gcomp::nccl_comm::allgatherv: counts has size 2 on rank 0 but must have size() = 1",
      gcomp::error);
  CHECK(comm.stats() == gcomp::comm_stats{});
  CHECK_THROWS_WITH_AS(nccl_comm(nullptr, one.stream),
                       "gcomp::nccl_comm::nccl_comm: comm is a null ncclComm_t", gcomp::error);
}

TEST_CASE("nccl: NCCL and CUDA failures become gcomp::error with their own strings") {
  const std::string nccl_text = ncclGetErrorString(ncclInvalidArgument);
  CHECK_THROWS_WITH_AS(gcomp::detail::nccl_check(ncclInvalidArgument, nullptr, "where", "ncclX"),
                       doctest::Contains(("where: ncclX failed: " + nccl_text).c_str()),
                       gcomp::error);
  const std::string cuda_text = cudaGetErrorString(cudaErrorInvalidValue);
  CHECK_THROWS_WITH_AS(gcomp::detail::nccl_cuda_check(cudaErrorInvalidValue, "where", "cudaX"),
                       doctest::Contains(cuda_text.c_str()), gcomp::error);
}
