// Host primitives against the memory passes they cannot beat: a read pass and memcpy.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "gcomp/exec/host.hpp"
#include "ratio.hpp"

namespace {

std::vector<float> normal_floats(std::size_t n) {
  std::mt19937 gen(1);
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

template <class Policy>
void sum_of_squares(benchmark::State& state, const Policy& policy) {
  const auto v = normal_floats(std::size_t(state.range(0)));
  const float* data = v.data();
  gcomp_bench::time_against(
      state, "read",
      [&] { benchmark::DoNotOptimize(gcomp_bench::read_pass(data, v.size() * sizeof(float))); },
      [&] {
        benchmark::DoNotOptimize(gcomp::transform_reduce(
            policy, v.size(), 0.0f, [](float a, float b) { return a + b; },
            [=](std::size_t i) { return data[i] * data[i]; }));
      });
  state.SetBytesProcessed(state.iterations() * std::int64_t(v.size() * sizeof(float)));
}

template <class Policy>
void scaled_copy(benchmark::State& state, const Policy& policy) {
  const auto v = normal_floats(std::size_t(state.range(0)));
  std::vector<float> out(v.size()), ref(v.size());
  const float* in = v.data();
  float* o = out.data();
  gcomp_bench::time_against(
      state, "memcpy", [&] { std::memcpy(ref.data(), in, v.size() * sizeof(float)); },
      [&] {
        gcomp::for_each_index(policy, v.size(), [=](std::size_t i) { o[i] = 0.5f * in[i]; });
        benchmark::ClobberMemory();
      });
}

template <class Policy>
void select_large(benchmark::State& state, const Policy& policy) {
  const auto v = normal_floats(std::size_t(state.range(0)));
  std::vector<std::uint32_t> out(v.size());
  const float* data = v.data();
  gcomp_bench::time_against(
      state, "read",
      [&] { benchmark::DoNotOptimize(gcomp_bench::read_pass(data, v.size() * sizeof(float))); },
      [&] {  // |x| > 3.29 keeps about 0.1% of a standard normal
        benchmark::DoNotOptimize(gcomp::select_if(
            policy, v.size(), [=](std::size_t i) { return std::abs(data[i]) > 3.29f; },
            std::span<std::uint32_t>(out)));
      });
}

const gcomp::host_par two_threads(2);

}  // namespace

BENCHMARK_CAPTURE(sum_of_squares, host_seq, gcomp::host_seq{})->Arg(1 << 24)->UseManualTime();
BENCHMARK_CAPTURE(sum_of_squares, host_par2, two_threads)->Arg(1 << 24)->UseManualTime();
BENCHMARK_CAPTURE(scaled_copy, host_seq, gcomp::host_seq{})->Arg(1 << 24)->UseManualTime();
BENCHMARK_CAPTURE(scaled_copy, host_par2, two_threads)->Arg(1 << 24)->UseManualTime();
BENCHMARK_CAPTURE(select_large, host_seq, gcomp::host_seq{})->Arg(1 << 24)->UseManualTime();
BENCHMARK_CAPTURE(select_large, host_par2, two_threads)->Arg(1 << 24)->UseManualTime();

BENCHMARK_MAIN();
