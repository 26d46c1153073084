// QSGD, TernGrad and natural compression under thrust_device on Thrust's OpenMP system: payloads, decompress_add and errors bitwise those of host_seq.
#include <doctest/doctest.h>

#include <gcomp/compress/natural.hpp>
#include <gcomp/compress/qsgd.hpp>
#include <gcomp/compress/terngrad.hpp>
#include <gcomp/core/concepts.hpp>
#include <gcomp/exec/thrust.hpp>

#include <omp.h>

#include "../quant_sameness.hpp"

namespace {
using namespace gcomp_test::quant_sameness;

static_assert(gcomp::compressor<gcomp::qsgd<float>, gcomp::thrust_device>);
static_assert(gcomp::compressor<gcomp::terngrad<double>, gcomp::thrust_device, double>);
static_assert(gcomp::compressor<gcomp::natural<float>, gcomp::thrust_device>);

struct omp_threads_guard {
  int saved = omp_get_max_threads();
  ~omp_threads_guard() { omp_set_num_threads(saved); }
};

}  // namespace

TEST_CASE("qsgd, terngrad and natural under thrust_device equal host_seq bitwise") {
  check_quantizer_cases(gcomp::thrust_device{});
}

TEST_CASE("error_feedback and ef21 around quantizers under thrust_device equal host_seq bitwise") {
  check_wrapper_cases(gcomp::thrust_device{});
}

TEST_CASE("qsgd, terngrad and natural under thrust_device fail as host_seq does, writing nothing") {
  check_quantizer_errors(gcomp::thrust_device{});
}

TEST_CASE("qsgd, terngrad and natural under thrust_device do not depend on the OpenMP thread count") {
  omp_threads_guard guard;
  const std::vector<float> g = sample_gradient<float>(20000, 4);
  for (int threads : {1, 3, 4}) {
    CAPTURE(threads);
    omp_set_num_threads(threads);
    check_one(gcomp::thrust_device{}, gcomp::qsgd<float>({.levels = 15, .bucket = 0}), g,
              gcomp::rng_key{9, 9, 9});
    check_one(gcomp::thrust_device{}, gcomp::terngrad<float>({.bucket = 512}), g,
              gcomp::rng_key{9, 9, 9});
  }
}
