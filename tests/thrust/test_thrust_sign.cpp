// sign, onebit and the casts (fp16_cast, bf16_cast) under thrust_device on Thrust's OpenMP system: payloads, decompress_add and errors bitwise those of host_seq.
#include <doctest/doctest.h>

#include <gcomp/compress/cast.hpp>
#include <gcomp/compress/error_feedback.hpp>
#include <gcomp/compress/onebit.hpp>
#include <gcomp/compress/sign.hpp>
#include <gcomp/core/concepts.hpp>
#include <gcomp/exec/thrust.hpp>

#include <omp.h>

#include "../sign_sameness.hpp"

namespace {
using namespace gcomp_test::sign_sameness;

static_assert(gcomp::compressor<gcomp::sign<float>, gcomp::thrust_device>);
static_assert(gcomp::compressor<gcomp::onebit<double>, gcomp::thrust_device, double>);
static_assert(gcomp::compressor<gcomp::fp16_cast<float>, gcomp::thrust_device>);
static_assert(gcomp::compressor<gcomp::bf16_cast<double>, gcomp::thrust_device, double>);
static_assert(gcomp::compressor<gcomp::error_feedback<gcomp::sign<float>>, gcomp::thrust_device>);

struct omp_threads_guard {
  int saved = omp_get_max_threads();
  ~omp_threads_guard() { omp_set_num_threads(saved); }
};

}  // namespace

TEST_CASE("sign and onebit under thrust_device equal host_seq bitwise") {
  check_sign_cases(gcomp::thrust_device{});
}

TEST_CASE("fp16_cast and bf16_cast under thrust_device equal host_seq bitwise") {
  check_cast_cases(gcomp::thrust_device{});
}

TEST_CASE("sign and onebit under thrust_device fail as host_seq does, writing nothing") {
  check_sign_errors(gcomp::thrust_device{});
}

TEST_CASE("fp16_cast and bf16_cast under thrust_device fail as host_seq does, writing nothing") {
  check_cast_errors(gcomp::thrust_device{});
}

TEST_CASE("error_feedback around sign, onebit and fp16_cast under thrust_device equals host_seq bitwise") {
  check_sign_wrapper_cases(gcomp::thrust_device{});
}

TEST_CASE("sign, onebit and casts under thrust_device do not depend on the OpenMP thread count") {
  omp_threads_guard guard;
  const std::vector<float> g = sample_gradient<float>(30011, 4);
  for (int threads : {1, 3, 4}) {
    CAPTURE(threads);
    omp_set_num_threads(threads);
    check_one(gcomp::thrust_device{}, gcomp::sign<float>{}, g);
    check_one(gcomp::thrust_device{}, gcomp::onebit<float>(gcomp::layout{5000, 20000, 5011}), g);
    check_one(gcomp::thrust_device{}, gcomp::bf16_cast<float>{}, g);
  }
}
