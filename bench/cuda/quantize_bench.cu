// QSGD and TernGrad under cuda_par on n = 2^26 float, each call timed against a device copy of the gradient (cudaMemcpyAsync, device to device) in the same run; counter x_copy_pass = call time / copy time (issue 8's target for quantizers: <= 1.4).
//
// The call is the whole public one: compress ends with the message's words
// and scales in host memory (compress/detail/quant_device.hpp), so its time
// includes that device-to-host copy and the waits; decompress_add includes
// uploading the message. Timing the kernels alone needs a device payload,
// which does not exist yet.
#include <benchmark/benchmark.h>

#include <gcomp/compress/qsgd.hpp>
#include <gcomp/compress/terngrad.hpp>

#include <cstddef>

#include "bench_support.cuh"

namespace {

void bench(benchmark::State& state, auto make_call) {
  gcomp_bench::vs_copy_pass(state, std::size_t{1} << 26, make_call);
}

const gcomp::qsgd<float> qsgd7({.levels = 7, .bucket = 512});

}  // namespace

BENCHMARK_CAPTURE(bench, qsgd_compress, gcomp_bench::compressor_call(qsgd7))
    ->Name("cuda_qsgd_compress/s=7/bucket=512/n=2^26")->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(bench, terngrad_compress, gcomp_bench::compressor_call(gcomp::terngrad<float>({.bucket = 512})))
    ->Name("cuda_terngrad_compress/bucket=512/n=2^26")->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(bench, qsgd_decompress_add, gcomp_bench::compressor_call<gcomp::qsgd<float>, true>(qsgd7))
    ->Name("cuda_qsgd_decompress_add/s=7/bucket=512/n=2^26")->UseManualTime()->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
