// Top-k (the GPU radix select), random-k, hard threshold and sampled top-k under cuda_par: payloads, decompress_add, error-feedback residuals and errors bitwise those of host_seq; exits 77 (skipped) without a GPU.
#include <doctest/doctest.h>

#include <gcomp/compress/randomk.hpp>
#include <gcomp/compress/topk.hpp>
#include <gcomp/core/concepts.hpp>
#include <gcomp/exec/cuda.cuh>

#include "../sparse_sameness.hpp"

#include "cuda_support.hpp"

using gcomp_test::stream_holder;

namespace {
using namespace gcomp_test::sparse_sameness;

static_assert(gcomp::compressor<gcomp::topk<float>, gcomp::cuda_par>);
static_assert(gcomp::compressor<gcomp::topk<double, std::uint64_t>, gcomp::cuda_par, double>);
static_assert(gcomp::compressor<gcomp::randomk<float>, gcomp::cuda_par>);
static_assert(gcomp::compressor<gcomp::hard_threshold<float>, gcomp::cuda_par>);
static_assert(gcomp::compressor<gcomp::sampled_topk<float>, gcomp::cuda_par>);
static_assert(gcomp::compressor<gcomp::sampled_topk<double, std::uint64_t>, gcomp::cuda_par, double>);
static_assert(gcomp::detail::device_topk<gcomp::cuda_par>::value);

}  // namespace

TEST_CASE("sparse and dense compressors under cuda_par equal host_seq bitwise") {
  stream_holder s;
  check_sparse_cases(gcomp::cuda_par{s.stream});
}

TEST_CASE("sampled_topk under cuda_par equals host_seq bitwise, on every path") {
  stream_holder s;
  check_sampled_topk_cases(gcomp::cuda_par{s.stream});
}

TEST_CASE("chains of a sparsifier and a quantizer under cuda_par equal host_seq bitwise") {
  stream_holder s;
  check_chain_cases(gcomp::cuda_par{s.stream});
}

TEST_CASE("powersgd under cuda_par equals host_seq bitwise") {
  stream_holder s;
  check_powersgd_cases(gcomp::cuda_par{s.stream});
}

TEST_CASE("error_feedback around top-k and random-k under cuda_par equals host_seq bitwise") {
  stream_holder s;
  check_sparse_wrappers(gcomp::cuda_par{s.stream});
}

TEST_CASE("sparse compressors under cuda_par fail as host_seq does, writing nothing") {
  stream_holder s;
  check_sparse_errors(gcomp::cuda_par{s.stream});
}

TEST_CASE("a copied top-k builds its own GPU workspace and selects the same") {
  stream_holder s;
  const gcomp::cuda_par policy{s.stream};
  const std::vector<float> g = sample_gradient<float>(50000, 12);
  gcomp::policy_buffer<float> g_device;
  g_device.assign_from_host(policy, std::span<const float>(g));
  gcomp::topk<float> first({.k = 500});
  gcomp::sparse_payload<float> a, b, host;
  first.compress(policy, std::span<const float>(g_device.span()), a, gcomp::rng_key{});
  gcomp::topk<float> second = first;  // the workspace is not shared
  second.compress(policy, std::span<const float>(g_device.span()), b, gcomp::rng_key{});
  first.compress(gcomp::host_seq{}, std::span<const float>(g), host, gcomp::rng_key{});
  check_same_payload(host, a);
  check_same_payload(host, b);
}
