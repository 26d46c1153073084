// QSGD, TernGrad and natural compression under cuda_par: payloads, decompress_add and errors bitwise those of host_seq; exits 77 (skipped) without a GPU.
#include <doctest/doctest.h>

#include <gcomp/compress/natural.hpp>
#include <gcomp/compress/qsgd.hpp>
#include <gcomp/compress/terngrad.hpp>
#include <gcomp/core/concepts.hpp>
#include <gcomp/exec/cuda.cuh>

#include "../quant_sameness.hpp"

#include "cuda_support.hpp"

using gcomp_test::stream_holder;

namespace {
using namespace gcomp_test::quant_sameness;

static_assert(gcomp::compressor<gcomp::qsgd<float>, gcomp::cuda_par>);
static_assert(gcomp::compressor<gcomp::terngrad<double>, gcomp::cuda_par, double>);
static_assert(gcomp::compressor<gcomp::natural<float>, gcomp::cuda_par>);

}  // namespace

TEST_CASE("qsgd, terngrad and natural under cuda_par equal host_seq bitwise") {
  stream_holder s;
  check_quantizer_cases(gcomp::cuda_par{s.stream});
}

TEST_CASE("error_feedback and ef21 around quantizers under cuda_par equal host_seq bitwise") {
  stream_holder s;
  check_wrapper_cases(gcomp::cuda_par{s.stream});
}

TEST_CASE("qsgd, terngrad and natural under cuda_par fail as host_seq does, writing nothing") {
  stream_holder s;
  check_quantizer_errors(gcomp::cuda_par{s.stream});
}
