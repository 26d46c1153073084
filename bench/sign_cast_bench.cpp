// Scaled sign, 1-bit SGD and float16 cast kernels against a memcpy of the same gradient.
//
// n = 2^24 float32 from N(0, 1) (64 MiB). Each benchmark alternates
// std::memcpy of the 64 MiB gradient into another buffer (one thread, the
// reference) with the kernel, and reports the median of the per-iteration
// ratios kernel time / memcpy time (target <= 2):
//   x_memcpy  for  compress           (sign, onebit, fp16)
//                  decompress_add     (sign, fp16; out += scale * C(g))
//                  roundtrip          (compress then decompress_add)
// on host_seq and host_par{2}. The memcpy is single-threaded in both cases.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <vector>

#include "gcomp/compress/cast.hpp"
#include "gcomp/compress/onebit.hpp"
#include "gcomp/compress/sign.hpp"
#include "ratio.hpp"

namespace {

constexpr std::size_t n_default = std::size_t{1} << 24;

const std::vector<float>& normal_floats() {
  static const std::vector<float> v = [] {
    std::mt19937 gen(1);
    std::normal_distribution<float> dist;
    std::vector<float> x(n_default);
    for (float& e : x) e = dist(gen);
    return x;
  }();
  return v;
}

const gcomp::host_par two_threads(2);

enum class what { compress, decompress_add, roundtrip };

template <class C, class Policy>
void against_memcpy(benchmark::State& state, C c, const Policy& policy, what part) {
  const auto& g = normal_floats();
  std::vector<float> copy(g.size());
  std::vector<float> out(g.size(), 0.0f);
  typename C::payload m;
  const std::span<const float> gs(g);
  c.compress(policy, gs, m, gcomp::rng_key{});  // sizes the payload
  gcomp_bench::time_against(
      state, "memcpy",
      [&] {
        std::memcpy(copy.data(), g.data(), g.size() * sizeof(float));
        benchmark::DoNotOptimize(copy.data());
        benchmark::ClobberMemory();
      },
      [&] {
        if (part != what::decompress_add) c.compress(policy, gs, m, gcomp::rng_key{});
        if (part != what::compress)
          c.decompress_add(policy, m, std::span<float>(out), 1e-3f);
        benchmark::DoNotOptimize(m);
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
      });
  state.counters["wire_MiB"] = double(c.wire_bytes(m)) / (1 << 20);
}

template <class Policy>
void sign_bench(benchmark::State& state, const Policy& policy, what part) {
  against_memcpy(state, gcomp::sign<float>(), policy, part);
}
template <class Policy>
void onebit_bench(benchmark::State& state, const Policy& policy, what part) {
  against_memcpy(state, gcomp::onebit<float>(), policy, part);
}
template <class Policy>
void fp16_bench(benchmark::State& state, const Policy& policy, what part) {
  against_memcpy(state, gcomp::fp16_cast<float>(), policy, part);
}

}  // namespace

BENCHMARK_CAPTURE(sign_bench, compress_host_seq, gcomp::host_seq{}, what::compress)->UseManualTime();
BENCHMARK_CAPTURE(sign_bench, compress_host_par2, two_threads, what::compress)->UseManualTime();
BENCHMARK_CAPTURE(sign_bench, decompress_add_host_seq, gcomp::host_seq{}, what::decompress_add)->UseManualTime();
BENCHMARK_CAPTURE(sign_bench, decompress_add_host_par2, two_threads, what::decompress_add)->UseManualTime();
BENCHMARK_CAPTURE(sign_bench, roundtrip_host_seq, gcomp::host_seq{}, what::roundtrip)->UseManualTime();
BENCHMARK_CAPTURE(sign_bench, roundtrip_host_par2, two_threads, what::roundtrip)->UseManualTime();
BENCHMARK_CAPTURE(onebit_bench, compress_host_seq, gcomp::host_seq{}, what::compress)->UseManualTime();
BENCHMARK_CAPTURE(onebit_bench, compress_host_par2, two_threads, what::compress)->UseManualTime();
BENCHMARK_CAPTURE(fp16_bench, compress_host_seq, gcomp::host_seq{}, what::compress)->UseManualTime();
BENCHMARK_CAPTURE(fp16_bench, compress_host_par2, two_threads, what::compress)->UseManualTime();
BENCHMARK_CAPTURE(fp16_bench, decompress_add_host_seq, gcomp::host_seq{}, what::decompress_add)->UseManualTime();
BENCHMARK_CAPTURE(fp16_bench, decompress_add_host_par2, two_threads, what::decompress_add)->UseManualTime();
BENCHMARK_CAPTURE(fp16_bench, roundtrip_host_seq, gcomp::host_seq{}, what::roundtrip)->UseManualTime();
BENCHMARK_CAPTURE(fp16_bench, roundtrip_host_par2, two_threads, what::roundtrip)->UseManualTime();

BENCHMARK_MAIN();
