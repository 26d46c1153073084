// sign, onebit and the casts (fp16_cast, bf16_cast) under cuda_par: payloads, decompress_add and errors bitwise those of host_seq; exits 77 (skipped) without a GPU.
#include <doctest/doctest.h>

#include <gcomp/compress/cast.hpp>
#include <gcomp/compress/error_feedback.hpp>
#include <gcomp/compress/onebit.hpp>
#include <gcomp/compress/sign.hpp>
#include <gcomp/core/concepts.hpp>
#include <gcomp/exec/cuda.cuh>

#include "../sign_sameness.hpp"

#include "cuda_support.hpp"

using gcomp_test::stream_holder;

namespace {
using namespace gcomp_test::sign_sameness;

static_assert(gcomp::compressor<gcomp::sign<float>, gcomp::cuda_par>);
static_assert(gcomp::compressor<gcomp::onebit<double>, gcomp::cuda_par, double>);
static_assert(gcomp::compressor<gcomp::fp16_cast<float>, gcomp::cuda_par>);
static_assert(gcomp::compressor<gcomp::bf16_cast<double>, gcomp::cuda_par, double>);
static_assert(gcomp::compressor<gcomp::error_feedback<gcomp::sign<float>>, gcomp::cuda_par>);

}  // namespace

TEST_CASE("sign and onebit under cuda_par equal host_seq bitwise") {
  stream_holder s;
  check_sign_cases(gcomp::cuda_par{s.stream});
}

TEST_CASE("fp16_cast and bf16_cast under cuda_par equal host_seq bitwise") {
  stream_holder s;
  check_cast_cases(gcomp::cuda_par{s.stream});
}

TEST_CASE("sign and onebit under cuda_par fail as host_seq does, writing nothing") {
  stream_holder s;
  check_sign_errors(gcomp::cuda_par{s.stream});
}

TEST_CASE("fp16_cast and bf16_cast under cuda_par fail as host_seq does, writing nothing") {
  stream_holder s;
  check_cast_errors(gcomp::cuda_par{s.stream});
}

TEST_CASE("error_feedback around sign, onebit and fp16_cast under cuda_par equals host_seq bitwise") {
  stream_holder s;
  check_sign_wrapper_cases(gcomp::cuda_par{s.stream});
}
