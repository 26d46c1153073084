// Benchmarks here report a kernel's time as a ratio to a reference pass timed in
// the same run, alternating the two, because the machines are shared and noisy.
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace gcomp_bench {

/// Each iteration runs reference() then kernel(); the benchmark's time is the
/// kernel's (register with ->UseManualTime()) and counter "x_<name>" is the
/// median of the per-iteration ratios kernel / reference.
template <class Reference, class Kernel>
void time_against(benchmark::State& state, const std::string& name, Reference reference,
                  Kernel kernel) {
  using clock = std::chrono::steady_clock;
  std::vector<double> ratios;
  double reference_seconds = 0;
  for (auto _ : state) {
    const auto t0 = clock::now();
    reference();
    const auto t1 = clock::now();
    kernel();
    const auto t2 = clock::now();
    const double r = std::chrono::duration<double>(t1 - t0).count();
    const double k = std::chrono::duration<double>(t2 - t1).count();
    state.SetIterationTime(k);
    reference_seconds += r;
    ratios.push_back(k / r);
  }
  std::nth_element(ratios.begin(), ratios.begin() + ratios.size() / 2, ratios.end());
  state.counters["x_" + name] = ratios[ratios.size() / 2];
  state.counters[name + "_ms"] = 1e3 * reference_seconds / double(state.iterations());
}

/// A read pass over n bytes: an integer xor the compiler vectorizes, so it
/// runs at memory bandwidth. The reference most kernels are measured against.
inline std::uint64_t read_pass(const void* data, std::size_t bytes) {
  const auto* words = static_cast<const std::uint64_t*>(data);
  std::uint64_t acc[4] = {0, 0, 0, 0};
  const std::size_t n = bytes / 8;
  std::size_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int l = 0; l < 4; ++l) acc[l] ^= words[i + l];
  for (; i < n; ++i) acc[0] ^= words[i];
  return acc[0] ^ acc[1] ^ acc[2] ^ acc[3];
}

}  // namespace gcomp_bench
