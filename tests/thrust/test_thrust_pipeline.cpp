// gcomp::pipeline (allreduce, allgather, lazy) and the active_layers aggregator under thrust_device on Thrust's OpenMP system, two in-process workers: parameters and aggregated gradients bitwise those of host_seq, host payloads handed to the communicator under host_seq and the policy's buffers under thrust_device.
#include <doctest/doctest.h>

#include <gcomp/comm/inproc.hpp>
#include <gcomp/exec/thrust.hpp>

#include "../pipeline_sameness.hpp"

TEST_CASE("pipelines under thrust_device equal host_seq bitwise and route host payloads as host memory") {
  gcomp::inproc_group group(2);
  group.run([&](gcomp::inproc_comm& comm) {
    gcomp_test::pipeline_sameness::check_pipeline_cases(gcomp::thrust_device{}, comm, comm);
  });
}
