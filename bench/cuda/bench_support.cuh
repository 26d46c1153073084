// Shared pieces of the CUDA benchmarks: CUDA errors as skipped benchmarks, and a call timed against a device-to-device copy of the same gradient in the same run (counter x_copy_pass).
#pragma once

#include <benchmark/benchmark.h>

#include <gcomp/exec/cuda.cuh>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace gcomp_bench {

/// True on success; otherwise the benchmark is skipped with what failed.
inline bool check(cudaError_t status, benchmark::State& state, const char* what) {
  if (status == cudaSuccess) return true;
  state.SkipWithError((std::string(what) + ": " + cudaGetErrorString(status)).c_str());
  return false;
}

/// Times make_call(policy, g, out)(step), one step per iteration, against a
/// device-to-device copy of the n-float gradient g (N(0, 1) values), both on
/// the host clock after a sync: calls that stage their message in host memory
/// wait for the device themselves. Counters: x_copy_pass (the median ratio),
/// copy_ms and call_ms (means); the label is the device's name. Steps 0 and 1
/// are warm-up (buffers sized, kernels loaded).
template <class MakeCall>
void vs_copy_pass(benchmark::State& state, std::size_t n, MakeCall make_call) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    state.SkipWithError("no CUDA device");
    return;
  }
  std::vector<float> host(n);
  std::mt19937 rng(1);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (float& x : host) x = dist(rng);
  float *g = nullptr, *copy = nullptr;
  cudaStream_t stream = nullptr;
  if (!check(cudaMalloc(&g, n * sizeof(float)), state, "cudaMalloc") ||
      !check(cudaMalloc(&copy, n * sizeof(float)), state, "cudaMalloc") ||
      !check(cudaMemcpy(g, host.data(), n * sizeof(float), cudaMemcpyHostToDevice), state, "cudaMemcpy") ||
      !check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), state, "cudaStreamCreate"))
    return;
  {
    const gcomp::cuda_par policy{stream};
    auto call = make_call(policy, std::span<const float>(g, n), std::span<float>(copy, n));
    call(0);
    call(1);
    cudaStreamSynchronize(stream);
    using clock = std::chrono::steady_clock;
    std::vector<double> ratios;
    double copy_ms_total = 0, call_ms_total = 0;
    std::uint64_t step = 2;
    for (auto _ : state) {
      const auto t0 = clock::now();
      cudaMemcpyAsync(copy, g, n * sizeof(float), cudaMemcpyDeviceToDevice, stream);
      cudaStreamSynchronize(stream);
      const auto t1 = clock::now();
      call(step++);
      cudaStreamSynchronize(stream);
      const auto t2 = clock::now();
      const double copy_ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
      const double call_ms = std::chrono::duration<double, std::milli>(t2 - t1).count();
      state.SetIterationTime(call_ms / 1e3);
      copy_ms_total += copy_ms;
      call_ms_total += call_ms;
      ratios.push_back(call_ms / copy_ms);
    }
    std::nth_element(ratios.begin(), ratios.begin() + ratios.size() / 2, ratios.end());
    state.counters["x_copy_pass"] = ratios[ratios.size() / 2];
    state.counters["copy_ms"] = copy_ms_total / double(state.iterations());
    state.counters["call_ms"] = call_ms_total / double(state.iterations());
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) state.SetLabel(prop.name);
  }  // the call's device scratch is freed before the stream goes
  cudaStreamDestroy(stream);
  cudaFree(g);
  cudaFree(copy);
}

/// make_call for vs_copy_pass: each step compresses with a fresh key or (with
/// Decompress) compresses once at step 0 and decompress_adds at every step.
template <class C, bool Decompress = false>
auto compressor_call(C prototype) {
  return [prototype](const gcomp::cuda_par& policy, std::span<const float> g, std::span<float> out) {
    struct call {
      gcomp::cuda_par policy;
      std::span<const float> g;
      std::span<float> out;
      C c;
      typename C::payload message{};
      void operator()(std::uint64_t step) {
        if (!Decompress || step == 0) c.compress(policy, g, message, gcomp::rng_key{1, step, 0});
        if (Decompress) c.decompress_add(policy, message, out, 0.5f);
      }
    };
    return call{policy, g, out, prototype};
  };
}

}  // namespace gcomp_bench
