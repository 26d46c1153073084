// Top-k, threshold and sparse decompress_add kernels against a read pass, std::nth_element and torch::topk on the same data.
//
// n = 2^24 float32 from N(0, 1). Counters (medians of per-iteration ratios,
// kernel time / reference time, so below 1 means faster than the reference):
//   x_read         top-k / one read pass of g                     (target <= 4)
//   x_nth_element  top-k / (|g| into a buffer + std::nth_element)  (target <= 0.1)
//   x_torch        top-k / torch::topk(g.abs(), k)                 (target <= 0.05)
//   x_touched      8 sparse decompress_adds / reading their payload bytes and
//                  the output elements they touch                  (target <= 2)
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <span>
#include <vector>

#include "gcomp/compress/threshold_topk.hpp"
#include "gcomp/compress/topk.hpp"
#include "ratio.hpp"

#ifdef GCOMP_HAVE_TORCH
#include <ATen/Parallel.h>
#include <torch/torch.h>
#endif

namespace {

constexpr std::size_t n_default = std::size_t{1} << 24;

const std::vector<float>& normal_floats(std::uint32_t seed = 1) {
  static std::vector<std::vector<float>> cache(16);
  auto& v = cache[seed % cache.size()];
  if (v.empty()) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> dist;
    v.resize(n_default);
    for (float& x : v) x = dist(gen);
  }
  return v;
}

[[maybe_unused]] unsigned threads_of(const gcomp::host_seq&) { return 1; }
[[maybe_unused]] unsigned threads_of(const gcomp::host_par& p) { return p.threads(); }

std::uint64_t read_all(const std::vector<float>& v) {
  return gcomp_bench::read_pass(v.data(), v.size() * sizeof(float));
}

// Exact top-k (the sampled shortcut unless `radix_only`) against a read pass.
template <class Policy>
void topk_vs_read(benchmark::State& state, const Policy& policy, bool radix_only) {
  const auto& g = normal_floats();
  const std::size_t k = g.size() / std::size_t(state.range(0));
  gcomp::topk<float> c(gcomp::topk_options{.k = k});
  c.use_sampled_shortcut(!radix_only);
  gcomp::sparse_payload<float> m;
  gcomp_bench::time_against(
      state, "read", [&] { benchmark::DoNotOptimize(read_all(g)); },
      [&] {
        c.compress(policy, std::span<const float>(g), m, gcomp::rng_key{});
        benchmark::DoNotOptimize(m.data.data());
      });
  state.counters["k"] = double(k);
}

// Exact top-k against the standard library's selection on the magnitudes.
template <class Policy>
void topk_vs_nth_element(benchmark::State& state, const Policy& policy) {
  const auto& g = normal_floats();
  const std::size_t k = g.size() / std::size_t(state.range(0));
  gcomp::topk<float> c(gcomp::topk_options{.k = k});
  gcomp::sparse_payload<float> m;
  std::vector<float> magnitudes(g.size());
  gcomp_bench::time_against(
      state, "nth_element",
      [&] {
        std::transform(g.begin(), g.end(), magnitudes.begin(), [](float x) { return std::fabs(x); });
        std::nth_element(magnitudes.begin(), magnitudes.begin() + std::ptrdiff_t(k - 1), magnitudes.end(),
                         std::greater<float>());
        benchmark::DoNotOptimize(magnitudes[k - 1]);
      },
      [&] {
        c.compress(policy, std::span<const float>(g), m, gcomp::rng_key{});
        benchmark::DoNotOptimize(m.data.data());
      });
}

#ifdef GCOMP_HAVE_TORCH
// Exact top-k against torch::topk of |g| on the same memory, with LibTorch
// given as many threads as the policy has.
template <class Policy>
void topk_vs_torch(benchmark::State& state, const Policy& policy) {
  const auto& g = normal_floats();
  const std::size_t k = g.size() / std::size_t(state.range(0));
  at::set_num_threads(int(threads_of(policy)));
  const torch::Tensor t = torch::from_blob(const_cast<float*>(g.data()), {std::int64_t(g.size())},
                                           torch::kFloat32);
  gcomp::topk<float> c(gcomp::topk_options{.k = k});
  gcomp::sparse_payload<float> m;
  gcomp_bench::time_against(
      state, "torch",
      [&] {
        auto [values, indices] = torch::topk(t.abs(), std::int64_t(k));
        benchmark::DoNotOptimize(indices.data_ptr());
      },
      [&] {
        c.compress(policy, std::span<const float>(g), m, gcomp::rng_key{});
        benchmark::DoNotOptimize(m.data.data());
      });
}
#endif

// DGC's sampled threshold (1% sample) and a fixed threshold, against a read pass.
template <class Policy>
void sampled_vs_read(benchmark::State& state, const Policy& policy) {
  const auto& g = normal_floats();
  gcomp::sampled_topk<float> c(gcomp::sampled_topk_options{
      .ratio = 1.0 / double(state.range(0)), .sample_ratio = 0.001});
  gcomp::sparse_payload<float> m;
  std::uint64_t step = 0;
  gcomp_bench::time_against(
      state, "read", [&] { benchmark::DoNotOptimize(read_all(g)); },
      [&] {
        c.compress(policy, std::span<const float>(g), m, gcomp::rng_key{1, step++, 0});
        benchmark::DoNotOptimize(m.data.data());
      });
}

template <class Policy>
void hard_threshold_vs_read(benchmark::State& state, const Policy& policy) {
  const auto& g = normal_floats();
  gcomp::hard_threshold<float> c(3.29f);  // keeps about 0.1% of N(0, 1)
  gcomp::sparse_payload<float> m;
  gcomp_bench::time_against(
      state, "read", [&] { benchmark::DoNotOptimize(read_all(g)); },
      [&] {
        c.compress(policy, std::span<const float>(g), m, gcomp::rng_key{});
        benchmark::DoNotOptimize(m.data.data());
      });
}

// M = 8 top-k payloads with different supports (k = n / 100 each) added into
// one output, against reading the payloads' bytes and the output elements
// they touch (the bytes a scatter-add cannot avoid).
template <class Policy>
void decompress_add_8(benchmark::State& state, const Policy& policy) {
  constexpr int workers = 8;
  const std::size_t n = n_default, k = n / 100;
  std::vector<gcomp::sparse_payload<float>> messages(workers);
  gcomp::topk<float> c(gcomp::topk_options{.k = k});
  for (int w = 0; w < workers; ++w)
    c.compress(gcomp::host_seq{}, std::span<const float>(normal_floats(std::uint32_t(w + 2))),
               messages[std::size_t(w)], gcomp::rng_key{});
  std::vector<float> out(n, 0.0f);
  gcomp_bench::time_against(
      state, "touched",
      [&] {
        std::uint64_t acc = 0;
        float touched = 0.0f;
        for (const auto& m : messages) {
          acc ^= gcomp_bench::read_pass(m.indices.data(), m.indices.size() * sizeof(std::uint32_t));
          acc ^= gcomp_bench::read_pass(m.data.data(), m.data.size() * sizeof(float));
          const std::uint32_t* idx = m.indices.data();
          for (std::size_t j = 0; j < m.size(); ++j) touched += out[idx[j]];
        }
        benchmark::DoNotOptimize(acc);
        benchmark::DoNotOptimize(touched);
      },
      [&] {
        for (const auto& m : messages) c.decompress_add(policy, m, std::span<float>(out), 0.125f);
        benchmark::ClobberMemory();
      });
  state.counters["k"] = double(k);
}

const gcomp::host_par two_threads(2);

}  // namespace

BENCHMARK_CAPTURE(topk_vs_read, host_seq, gcomp::host_seq{}, false)->Arg(1000)->Arg(100)->UseManualTime();
BENCHMARK_CAPTURE(topk_vs_read, host_par2, two_threads, false)->Arg(1000)->Arg(100)->UseManualTime();
BENCHMARK_CAPTURE(topk_vs_read, radix_host_seq, gcomp::host_seq{}, true)->Arg(1000)->Arg(100)->UseManualTime();
BENCHMARK_CAPTURE(topk_vs_read, radix_host_par2, two_threads, true)->Arg(1000)->Arg(100)->UseManualTime();
BENCHMARK_CAPTURE(topk_vs_nth_element, host_seq, gcomp::host_seq{})->Arg(1000)->Arg(100)->UseManualTime();
BENCHMARK_CAPTURE(topk_vs_nth_element, host_par2, two_threads)->Arg(1000)->Arg(100)->UseManualTime();
#ifdef GCOMP_HAVE_TORCH
BENCHMARK_CAPTURE(topk_vs_torch, host_seq, gcomp::host_seq{})->Arg(1000)->Arg(100)->UseManualTime();
BENCHMARK_CAPTURE(topk_vs_torch, host_par2, two_threads)->Arg(1000)->Arg(100)->UseManualTime();
#endif
BENCHMARK_CAPTURE(sampled_vs_read, host_seq, gcomp::host_seq{})->Arg(1000)->UseManualTime();
BENCHMARK_CAPTURE(sampled_vs_read, host_par2, two_threads)->Arg(1000)->UseManualTime();
BENCHMARK_CAPTURE(hard_threshold_vs_read, host_seq, gcomp::host_seq{})->UseManualTime();
BENCHMARK_CAPTURE(hard_threshold_vs_read, host_par2, two_threads)->UseManualTime();
BENCHMARK_CAPTURE(decompress_add_8, host_seq, gcomp::host_seq{})->UseManualTime();
BENCHMARK_CAPTURE(decompress_add_8, host_par2, two_threads)->UseManualTime();

BENCHMARK_MAIN();
