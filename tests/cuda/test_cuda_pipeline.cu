// gcomp::pipeline (allreduce, allgather, lazy) and the active_layers aggregator under cuda_par on a single-rank NCCL communicator: parameters and aggregated gradients bitwise those of host_seq on a single-rank in-process group, host payloads handed to NCCL under host_seq (staged) and device buffers under cuda_par; exits 77 (skipped) without a GPU.
#include <doctest/doctest.h>

#include <gcomp/comm/inproc.hpp>
#include <gcomp/comm/nccl.hpp>
#include <gcomp/core/concepts.hpp>
#include <gcomp/exec/cuda.cuh>

#include <nccl.h>

#include "../pipeline_sameness.hpp"

#include "cuda_support.hpp"

using gcomp_test::stream_holder;

// The in-process and MPI communicators serve host memory only: a pipeline
// under cuda_par over them does not compile (it would read device pointers
// on the host).
static_assert(!gcomp::communicator<gcomp::inproc_comm, gcomp::cuda_par, float>);
static_assert(gcomp::communicator<gcomp::inproc_comm, gcomp::host_seq, float>);
static_assert(gcomp::communicator<gcomp::nccl_comm, gcomp::cuda_par, float>);

TEST_CASE("pipelines under cuda_par over NCCL equal host_seq bitwise and give NCCL host payloads as host memory") {
  int device = 0;
  ncclComm_t nccl = nullptr;
  REQUIRE(ncclCommInitAll(&nccl, 1, &device) == ncclSuccess);
  stream_holder s;
  {
    gcomp::nccl_comm comm(nccl, s.stream);
    gcomp::inproc_group group(1);
    group.run([&](gcomp::inproc_comm& host_comm) {
      gcomp_test::pipeline_sameness::check_pipeline_cases(gcomp::cuda_par{s.stream}, comm, host_comm);
    });
  }
  ncclCommDestroy(nccl);
}
