// Top-k, random-k and the threshold top-k variants under thrust_device on Thrust's OpenMP system: payloads, decompress_add, error-feedback residuals and errors bitwise those of host_seq.
#include <doctest/doctest.h>

#include <gcomp/compress/randomk.hpp>
#include <gcomp/compress/topk.hpp>
#include <gcomp/core/concepts.hpp>
#include <gcomp/exec/thrust.hpp>

#include "../sparse_sameness.hpp"

namespace {
using namespace gcomp_test::sparse_sameness;

static_assert(gcomp::compressor<gcomp::topk<float>, gcomp::thrust_device>);
static_assert(gcomp::compressor<gcomp::randomk<double>, gcomp::thrust_device, double>);
static_assert(gcomp::compressor<gcomp::hard_threshold<float>, gcomp::thrust_device>);
static_assert(gcomp::compressor<gcomp::sampled_topk<float>, gcomp::thrust_device>);

}  // namespace

TEST_CASE("sparse and dense compressors under thrust_device equal host_seq bitwise") {
  check_sparse_cases(gcomp::thrust_device{});
}

TEST_CASE("sampled_topk under thrust_device equals host_seq bitwise, on every path") {
  check_sampled_topk_cases(gcomp::thrust_device{});
}

TEST_CASE("chains of a sparsifier and a quantizer under thrust_device equal host_seq bitwise") {
  check_chain_cases(gcomp::thrust_device{});
}

TEST_CASE("powersgd under thrust_device equals host_seq bitwise") {
  check_powersgd_cases(gcomp::thrust_device{});
}

TEST_CASE("error_feedback around top-k and random-k under thrust_device equals host_seq bitwise") {
  check_sparse_wrappers(gcomp::thrust_device{});
}

TEST_CASE("sparse compressors under thrust_device fail as host_seq does, writing nothing") {
  check_sparse_errors(gcomp::thrust_device{});
}
