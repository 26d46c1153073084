// The non-quantizer compressors under cuda_par on n = 2^26 float (sign, 1-bit, fp16 cast, random-k, Bernoulli, hard threshold, PowerSGD, identity, and the sparse decompress_add), each call timed against a device copy of the gradient in the same run; counter x_copy_pass = call time / copy time.
//
// As in quantize_bench.cu, a call is the whole public one: compress ends with
// the message in host memory, so its time includes the device-to-host copy of
// the message (a sign message is n/32 words, a cast n halves, random-k k
// pairs) and the waits; decompress_add includes uploading the message. The
// issue's 1.4x target is for the quantizers' and optimizers' kernels; these
// figures say what the first, primitive-built device paths cost, so that
// fused kernels and device payloads can be judged against them.
#include <benchmark/benchmark.h>

#include <gcomp/compress/bernoulli.hpp>
#include <gcomp/compress/cast.hpp>
#include <gcomp/compress/identity.hpp>
#include <gcomp/compress/onebit.hpp>
#include <gcomp/compress/powersgd.hpp>
#include <gcomp/compress/randomk.hpp>
#include <gcomp/compress/sign.hpp>
#include <gcomp/compress/threshold_topk.hpp>

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "bench_support.cuh"

namespace {

using gcomp_bench::compressor_call;

void bench(benchmark::State& state, auto make_call) {
  gcomp_bench::vs_copy_pass(state, std::size_t{1} << 26, make_call);
}

// PowerSGD over the buffer as 8 layers of 4096 x 2048, rank 4.
gcomp::layout powersgd_layout() {
  std::vector<gcomp::layer> layers;
  for (std::size_t d = 0; d < 8; ++d)
    layers.push_back({std::string(1, static_cast<char>('a' + d)), d * 4096 * 2048, 4096 * 2048, {4096, 2048}});
  return gcomp::layout::from_layers(std::move(layers));
}

}  // namespace

#define GCOMP_CUDA_BENCH(name, ...)                                                           \
  BENCHMARK_CAPTURE(bench, name, __VA_ARGS__)                                                 \
      ->Name("cuda_" #name "/n=2^26")                                                         \
      ->UseManualTime()                                                                       \
      ->Unit(benchmark::kMillisecond)

GCOMP_CUDA_BENCH(identity_compress, compressor_call(gcomp::identity<float>{}));
GCOMP_CUDA_BENCH(sign_compress, compressor_call(gcomp::sign<float>{}));
GCOMP_CUDA_BENCH(sign_decompress_add, compressor_call<gcomp::sign<float>, true>(gcomp::sign<float>{}));
GCOMP_CUDA_BENCH(onebit_compress, compressor_call(gcomp::onebit<float>{}));
GCOMP_CUDA_BENCH(fp16_cast_compress, compressor_call(gcomp::fp16_cast<float>{}));
GCOMP_CUDA_BENCH(randomk_compress_ratio_0_01, compressor_call(gcomp::randomk<float>({.ratio = 0.01})));
GCOMP_CUDA_BENCH(randomk_decompress_add_ratio_0_01,
                 compressor_call<gcomp::randomk<float>, true>(gcomp::randomk<float>({.ratio = 0.01})));
GCOMP_CUDA_BENCH(bernoulli_compress_p_0_01, compressor_call(gcomp::bernoulli_sparsifier<float>(0.01)));
GCOMP_CUDA_BENCH(hard_threshold_compress_tau_2_5, compressor_call(gcomp::hard_threshold<float>(2.5f)));
GCOMP_CUDA_BENCH(powersgd_compress_8x4096x2048_rank_4,
                 compressor_call(gcomp::powersgd<float>({.rank = 4}, powersgd_layout())));

BENCHMARK_MAIN();
