// Quantizer kernels (QSGD, TernGrad, natural compression) against a memcpy of the same buffer.
//
// n = 2^24 float32 from N(0, 1) (64 MiB). Every case alternates its kernel
// with a memcpy of the 64 MiB gradient into another buffer, timed in the same
// run; counter x_memcpy is the median of the per-iteration ratios kernel /
// memcpy (target <= 2). Cases, each for host_seq and host_par{2}:
//   <name>_compress    compress(g) into a reused payload
//   <name>_decompress  decompress_add(payload, out, 1) into a 64 MiB buffer
// To add a compressor: one register_quantizer(...) line in main() (the
// helpers below take any gcomp::compressor with a float payload).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "gcomp/compress/natural.hpp"
#include "gcomp/compress/qsgd.hpp"
#include "gcomp/compress/terngrad.hpp"
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

// The reference: copy the 64 MiB gradient into a buffer of the same size.
struct memcpy_reference {
  std::vector<float> copy = std::vector<float>(n_default);
  void operator()() {
    const auto& g = normal_floats();
    std::memcpy(copy.data(), g.data(), g.size() * sizeof(float));
    benchmark::DoNotOptimize(copy.data());
    benchmark::ClobberMemory();
  }
};

// compress(g) against memcpy; a new step each iteration, as in training.
template <class C, class Policy>
void compress_vs_memcpy(benchmark::State& state, C c, Policy policy) {
  const auto& g = normal_floats();
  typename C::payload m;
  memcpy_reference reference;
  std::uint64_t step = 0;
  gcomp_bench::time_against(state, "memcpy", reference, [&] {
    c.compress(policy, std::span<const float>(g), m, gcomp::rng_key{1, step++, 0});
    benchmark::DoNotOptimize(m.words.data());
    benchmark::ClobberMemory();
  });
  state.counters["bits_per_element"] = c.bits_per_element(g.size());
}

// decompress_add(payload, out, 1) against memcpy.
template <class C, class Policy>
void decompress_vs_memcpy(benchmark::State& state, C c, Policy policy) {
  const auto& g = normal_floats();
  typename C::payload m;
  c.compress(gcomp::host_seq{}, std::span<const float>(g), m, gcomp::rng_key{1, 0, 0});
  std::vector<float> out(g.size(), 0.0f);
  memcpy_reference reference;
  gcomp_bench::time_against(state, "memcpy", reference, [&] {
    c.decompress_add(policy, m, std::span<float>(out), 1.0f);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  });
}

// Registers <name>_compress and <name>_decompress for host_seq and host_par{2}.
template <class C>
void register_quantizer(const std::string& name, const C& c) {
  const gcomp::host_par two(2);
  benchmark::RegisterBenchmark((name + "_compress/host_seq").c_str(),
                               [c](benchmark::State& s) { compress_vs_memcpy(s, c, gcomp::host_seq{}); })
      ->UseManualTime();
  benchmark::RegisterBenchmark((name + "_compress/host_par2").c_str(),
                               [c, two](benchmark::State& s) { compress_vs_memcpy(s, c, two); })
      ->UseManualTime();
  benchmark::RegisterBenchmark((name + "_decompress/host_seq").c_str(),
                               [c](benchmark::State& s) { decompress_vs_memcpy(s, c, gcomp::host_seq{}); })
      ->UseManualTime();
  benchmark::RegisterBenchmark((name + "_decompress/host_par2").c_str(),
                               [c, two](benchmark::State& s) { decompress_vs_memcpy(s, c, two); })
      ->UseManualTime();
}

}  // namespace

int main(int argc, char** argv) {
  register_quantizer("qsgd_s7_b512", gcomp::qsgd<float>({.levels = 7, .bucket = 512}));
  register_quantizer("terngrad_b512", gcomp::terngrad<float>({.bucket = 512}));
  register_quantizer("natural", gcomp::natural<float>());
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
