// Tests of gcomp/exec/cuda.cuh: cuda_par's primitives on device memory agree bitwise with host_seq; exits 77 (skipped) without a GPU.
#include <doctest/doctest.h>

#include <gcomp/exec/cuda.cuh>
#include <gcomp/exec/host.hpp>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "../primitive_oracles.hpp"

#include "cuda_support.hpp"

using gcomp_test::cuda_require;
using gcomp_test::stream_holder;

namespace {
using namespace gcomp_test;

static_assert(gcomp::execution_policy<gcomp::cuda_par>);
static_assert(!gcomp::host_memory_policy<gcomp::cuda_par>);
static_assert(!gcomp::host_memory_policy<gcomp::thrust_device>,
              "under nvcc thrust::device is the CUDA system");

constexpr std::size_t sizes[] = {0, 1, 7, 8, 4095, 4096, 4097, 100003, std::size_t{1} << 20};

// Device memory holding a copy of a host vector (or n elements), freed at scope exit.
template <class T>
class device_buffer {
 public:
  explicit device_buffer(std::size_t n) : size_(n) {
    cuda_require(cudaMalloc(&data_, std::max<std::size_t>(n, 1) * sizeof(T)), "cudaMalloc");
  }
  explicit device_buffer(const std::vector<T>& host) : device_buffer(host.size()) {
    cuda_require(cudaMemcpy(data_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
                 "cudaMemcpy to device");
  }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  ~device_buffer() { cudaFree(data_); }
  T* data() const { return data_; }
  std::size_t size() const { return size_; }
  std::span<T> span() const { return {data_, size_}; }
  std::vector<T> to_host() const {
    std::vector<T> host(size_);
    cuda_require(cudaMemcpy(host.data(), data_, size_ * sizeof(T), cudaMemcpyDeviceToHost),
                 "cudaMemcpy to host");
    return host;
  }

 private:
  T* data_ = nullptr;
  std::size_t size_;
};

}  // namespace

TEST_CASE("cuda_par and thrust_device transform_reduce equal host_seq bitwise") {
  stream_holder s;
  const gcomp::cuda_par on_stream{s.stream};
  const gcomp::cuda_par on_default{};
  const gcomp::thrust_device device;
  for (std::size_t n : sizes) {
    CAPTURE(n);
    const auto values = make_values(n, 1);
    const device_buffer<float> x(values);
    const reductions expected = reduce_all(gcomp::host_seq{}, values.data(), n);
    check_same(expected, reduce_all(on_stream, x.data(), n));
    check_same(expected, reduce_all(on_default, x.data(), n));
    check_same(expected, reduce_all(device, x.data(), n));
  }
}


TEST_CASE("cuda_par and thrust_device reduce_per_layer equal host_seq bitwise") {
  stream_holder s;
  const gcomp::cuda_par policy{s.stream};
  const gcomp::layout contiguous{1, 7, 4096, 4097, 100003, 3, std::size_t{1} << 18, 8, 4095};
  const auto scattered = gcomp::layout::from_layers(
      {{"b", 5000, 300, {}}, {"a", 0, 4097, {}}, {"c", 10000, 9000, {}}, {"d", 4097, 1, {}}},
      gcomp::gaps::allowed);
  for (const gcomp::layout* lay : {&contiguous, &scattered}) {
    const auto values = make_values(lay->total_size(), 3);
    const device_buffer<float> x(values);
    check_same_bits(per_layer_sums(gcomp::host_seq{}, *lay, values.data()),
                    per_layer_sums(policy, *lay, x.data()));
    check_same_bits(per_layer_max(gcomp::host_seq{}, *lay, values.data()),
                    per_layer_max(policy, *lay, x.data()));
    check_same_bits(per_layer_sums(gcomp::host_seq{}, *lay, values.data()),
                    per_layer_sums(gcomp::thrust_device{}, *lay, x.data()));
  }
}

TEST_CASE("cuda_par reduce_per_layer rejects an out of the wrong size like the host") {
  const gcomp::layout lay{3, 4};
  std::vector<float> out(3, 7.0f);
  const std::string host = message_of([&] {
    gcomp::reduce_per_layer(gcomp::host_seq{}, lay, std::span<float>(out), 0.0f, plus_f{},
                            [] GCOMP_HD(std::size_t) { return 1.0f; });
  });
  const std::string device = message_of([&] {
    gcomp::reduce_per_layer(gcomp::cuda_par{}, lay, std::span<float>(out), 0.0f, plus_f{},
                            [] GCOMP_HD(std::size_t) { return 1.0f; });
  });
  CHECK(device == host);
  CHECK(out == std::vector<float>(3, 7.0f));
}

namespace {

template <class Index, class Policy>
void check_select(const Policy& policy, const std::vector<float>& values, float threshold) {
  const std::size_t n = values.size();
  CAPTURE(n);
  CAPTURE(threshold);
  const device_buffer<float> x(values);
  const float* dx = x.data();
  const auto pred = [=] GCOMP_HD(std::size_t i) { return dx[i] > threshold || i % 1000 == 3; };
  std::vector<Index> oracle;
  for (std::size_t i = 0; i < n; ++i)
    if (values[i] > threshold || i % 1000 == 3) oracle.push_back(static_cast<Index>(i));
  // Room for three more than needed: the tail must stay untouched.
  const Index sentinel = static_cast<Index>(0xabcdef);
  const device_buffer<Index> out(std::vector<Index>(oracle.size() + 3, sentinel));
  const std::size_t count = gcomp::select_if(policy, n, pred, out.span());
  REQUIRE(count == oracle.size());
  const auto got = out.to_host();
  CHECK(std::equal(oracle.begin(), oracle.end(), got.begin()));
  CHECK(got[count] == sentinel);
  CHECK(got[count + 2] == sentinel);
}

}  // namespace

TEST_CASE("cuda_par and thrust_device select_if match a plain loop") {
  stream_holder s;
  const gcomp::cuda_par policy{s.stream};
  const gcomp::thrust_device device;
  for (std::size_t n : sizes) {
    const auto values = make_values(n, 4);
    for (float threshold : {0.5f, 2.0f, 1e9f, -1e9f}) {
      check_select<std::uint32_t>(policy, values, threshold);
      check_select<std::size_t>(policy, values, threshold);
    }
    check_select<std::uint32_t>(device, values, 0.5f);
  }
}

TEST_CASE("cuda_par select_if throws on a too-small out and leaves it unchanged") {
  const std::size_t n = 100003;
  const auto pred = [] GCOMP_HD(std::size_t i) { return i % 7 == 0; };
  const std::size_t expected = (n + 6) / 7;
  const std::vector<std::uint32_t> before(expected - 1, 42u);
  const device_buffer<std::uint32_t> out(before);
  const std::string device =
      message_of([&] { gcomp::select_if(gcomp::cuda_par{}, n, pred, out.span()); });
  CHECK(out.to_host() == before);
  std::vector<std::uint32_t> host_out(before);
  const std::string host =
      message_of([&] { gcomp::select_if(gcomp::host_seq{}, n, pred, std::span<std::uint32_t>(host_out)); });
  CHECK(device == host);
  CHECK(device.find(std::to_string(expected)) != std::string::npos);
}

TEST_CASE("cuda_par for_each_index writes every index once") {
  stream_holder s;
  const gcomp::cuda_par policy{s.stream};
  for (std::size_t n : sizes) {
    CAPTURE(n);
    const auto values = make_values(n, 5);
    const device_buffer<float> x(values);
    const device_buffer<float> y(std::vector<float>(n + 1, -7.0f));
    const float* dx = x.data();
    float* dy = y.data();
    gcomp::for_each_index(policy, n, [=] GCOMP_HD(std::size_t i) {
      dy[i] = 2.0f * dx[i] + static_cast<float>(i % 17);
    });
    // for_each_index only queues the kernel: wait for the stream before reading.
    cuda_require(cudaStreamSynchronize(s.stream), "cudaStreamSynchronize");
    const auto got = y.to_host();
    bool all = true;
    for (std::size_t i = 0; i < n; ++i)
      all = all && got[i] == 2.0f * values[i] + static_cast<float>(i % 17);
    CHECK(all);
    CHECK(got[n] == -7.0f);
  }
}

TEST_CASE("cuda_par reuses its workspace: no allocation once sizes have been seen") {
  stream_holder s;
  const gcomp::cuda_par policy{s.stream};
  const gcomp::layout lay{5, 100003, 4096};
  const auto values = make_values(lay.total_size(), 6);
  const device_buffer<float> x(values);
  const device_buffer<std::uint32_t> selected(values.size());
  std::vector<float> per_layer(lay.num_layers());
  const float* dx = x.data();
  auto step = [&] {
    reduce_all(policy, dx, values.size());
    gcomp::reduce_per_layer(policy, lay, std::span<float>(per_layer), 0.0f, plus_f{},
                            [=] GCOMP_HD(std::size_t i) { return dx[i]; });
    gcomp::select_if(policy, values.size(), [=] GCOMP_HD(std::size_t i) { return dx[i] > 0.0f; },
                     selected.span());
  };
  step();
  step();
  const std::size_t settled = policy.workspace->allocations();
  CHECK(settled > 0);
  for (int round = 0; round < 3; ++round) step();
  CHECK(policy.workspace->allocations() == settled);
}

TEST_CASE("cuda_par turns CUDA errors into gcomp::error") {
  // 2^62 elements need petabytes of block values: cudaMalloc must fail, and
  // deterministically, before any kernel runs.
  const gcomp::cuda_par policy{};
  const std::string message = message_of([&] {
    gcomp::transform_reduce(policy, std::size_t{1} << 62, 0, plus_i{},
                            [] GCOMP_HD(std::size_t) { return 1; });
  });
  CHECK(message.find("gcomp::transform_reduce") != std::string::npos);
  CHECK(message.find(cudaGetErrorString(cudaErrorMemoryAllocation)) != std::string::npos);
  // The error was cleared: the policy still works.
  CHECK(gcomp::transform_reduce(policy, 5000, 0, plus_i{}, [] GCOMP_HD(std::size_t) { return 1; }) ==
        5000);
}
