// The GPU top-k (gcomp/compress/detail/topk_cuda.cuh): the same indices and values as the host gcomp::topk, the non-finite error path, argument checks; exits 77 (skipped) without a GPU.
#include <doctest/doctest.h>

#include <gcomp/compress/detail/topk_cuda.cuh>
#include <gcomp/compress/topk.hpp>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "cuda_support.hpp"

using gcomp_test::cuda_require;
using gcomp_test::stream_holder;

namespace {

template <class T>
struct device_array {
  T* p = nullptr;
  std::size_t n = 0;
  explicit device_array(std::size_t size) : n(size) {
    cuda_require(cudaMalloc(&p, std::max<std::size_t>(1, n) * sizeof(T)), "cudaMalloc");
  }
  ~device_array() { cudaFree(p); }
  device_array(const device_array&) = delete;
  device_array& operator=(const device_array&) = delete;
  void from(const std::vector<T>& v) {
    cuda_require(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  }
  std::vector<T> to_host(std::size_t count) const {
    std::vector<T> v(count);
    cuda_require(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    cuda_require(cudaMemcpy(v.data(), p, count * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return v;
  }
};

// Normal values with many exact ties (a third rounded to a 1/8 grid), 5%
// zeros of both signs, and negative values throughout.
template <class T>
std::vector<T> gradient(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<T> g(n);
  for (std::size_t i = 0; i < n; ++i) {
    double x = dist(rng);
    const std::uint32_t kind = rng() % 60;
    if (kind < 20) x = std::round(x * 8.0) / 8.0;
    if (kind == 20) x = 0.0;
    if (kind == 21) x = -0.0;
    if (kind == 22) x = -1.0;  // many exact ties at magnitude 1
    g[i] = static_cast<T>(x);
  }
  return g;
}

// Returns whether the selection took the candidate-list path.
template <class T, class Index = std::uint32_t>
bool check_against_host(const std::vector<T>& g, std::size_t k, gcomp::detail::cuda_topk_workspace<T>& ws,
                        cudaStream_t stream) {
  CAPTURE(g.size());
  CAPTURE(k);
  gcomp::topk<T, Index> host(gcomp::topk_options{.k = k});
  gcomp::sparse_payload<T, Index> expected;
  host.compress(gcomp::host_seq{}, std::span<const T>(g), expected, gcomp::rng_key{});

  device_array<T> dg(g.size()), dv(k);
  device_array<Index> di(k);
  dg.from(g);
  gcomp::detail::cuda_topk(stream, std::span<const T>(dg.p, g.size()), k, ws, dv.p, di.p);
  const std::vector<Index> indices = di.to_host(k);
  const std::vector<T> values = dv.to_host(k);
  CHECK(indices == expected.indices);
  // Bitwise: the values are copies of g's elements, signs and -0.0 included.
  bool same_bits = values.size() == expected.data.size();
  for (std::size_t j = 0; same_bits && j < values.size(); ++j)
    same_bits = std::memcmp(&values[j], &expected.data[j], sizeof(T)) == 0;
  CHECK(same_bits);
  return ws.last_used_list();
}

std::vector<std::size_t> ks_for(std::size_t n) {
  std::vector<std::size_t> ks{1, std::max<std::size_t>(1, n / 1000), std::max<std::size_t>(1, n / 100), n};
  std::sort(ks.begin(), ks.end());
  ks.erase(std::unique(ks.begin(), ks.end()), ks.end());
  return ks;
}

}  // namespace

TEST_CASE("float top-k on the GPU equals the host gcomp::topk") {
  stream_holder s;
  gcomp::detail::cuda_topk_workspace<float> ws;  // one workspace across sizes: reuse and growth
  for (std::size_t n : {std::size_t{1}, std::size_t{1000}, (std::size_t{1} << 20) + 7, std::size_t{1} << 24}) {
    const std::vector<float> g = gradient<float>(n, static_cast<std::uint32_t>(n));
    for (std::size_t k : ks_for(n)) check_against_host(g, k, ws, s.stream);
  }
  CHECK(ws.capacity() == (std::size_t{1} << 24));
}

TEST_CASE("ties everywhere: all-equal and two-valued gradients") {
  stream_holder s;
  gcomp::detail::cuda_topk_workspace<float> ws;
  const std::size_t n = (std::size_t{1} << 20) + 7;
  const std::vector<float> same(n, -0.5f);  // n candidates > the room: the fallback
  for (std::size_t k : ks_for(n)) CHECK_FALSE(check_against_host(same, k, ws, s.stream));
  std::vector<float> two(n, 0.0f);
  for (std::size_t i = 0; i < n; i += 3) two[i] = (i % 2 == 0) ? 2.0f : -2.0f;
  for (std::size_t k : ks_for(n)) check_against_host(two, k, ws, s.stream);
  std::vector<float> denormal(n);
  std::mt19937 rng(9);
  for (float& x : denormal) x = std::numeric_limits<float>::denorm_min() * static_cast<float>(rng() % 5000);
  for (std::size_t k : ks_for(n)) check_against_host(denormal, k, ws, s.stream);
}

TEST_CASE("Gaussian data takes the candidate list; heavy ties take the fallback") {
  stream_holder s;
  gcomp::detail::cuda_topk_workspace<float> ws;
  const std::size_t n = std::size_t{1} << 20, k = n / 1000;
  std::mt19937 rng(2024);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> g(n);
  for (float& x : g) x = dist(rng);
  CHECK(check_against_host(g, k, ws, s.stream));
  CHECK(ws.last_candidates() >= k);
  CHECK(ws.last_candidates() <= 3 * k);
  // 30% of the entries tie at magnitude 4 (both signs): the threshold's bin
  // holds more than the room, ties go to the lowest indices.
  std::vector<float> tied = g;
  for (float& x : tied)
    if (rng() % 10 < 3) x = (rng() & 1) ? 4.0f : -4.0f;
  CHECK_FALSE(check_against_host(tied, k, ws, s.stream));
  CHECK(ws.last_candidates() > gcomp::detail::radix::candidate_room(n));
  // The room is exact: room candidates use the list, room + 1 fall back.
  const std::size_t room = gcomp::detail::radix::candidate_room(n);
  for (std::size_t m : {room, room + 1}) {
    std::vector<float> edge(n, 0.001f);
    for (std::size_t j = 0; j < m; ++j) edge[j * 7] = (j % 2) ? 1.0f : -1.0f;
    CHECK(check_against_host(edge, 10, ws, s.stream) == (m <= room));
    CHECK(ws.last_candidates() == m);
  }
  // The fallback left the bitmaps zero: the list path is right again after it.
  CHECK(check_against_host(g, k, ws, s.stream));
}

TEST_CASE("double values and 64-bit indices") {
  stream_holder s;
  gcomp::detail::cuda_topk_workspace<double> ws;
  const std::size_t n = (std::size_t{1} << 20) + 7;
  const std::vector<double> g = gradient<double>(n, 17);
  for (std::size_t k : ks_for(n)) check_against_host<double, std::uint64_t>(g, k, ws, s.stream);
}

TEST_CASE("a non-finite gradient throws naming the first index and writes nothing") {
  stream_holder s;
  gcomp::detail::cuda_topk_workspace<float> ws;
  const std::size_t n = (std::size_t{1} << 20) + 7, k = 1000;
  std::vector<float> g = gradient<float>(n, 3);
  g[900000] = std::numeric_limits<float>::infinity();
  g[777777] = std::numeric_limits<float>::quiet_NaN();
  g[800000] = -std::numeric_limits<float>::infinity();
  device_array<float> dg(n), dv(k);
  device_array<std::uint32_t> di(k);
  dg.from(g);
  dv.from(std::vector<float>(k, 42.0f));
  di.from(std::vector<std::uint32_t>(k, 7u));
  std::string message;
  try {
    gcomp::detail::cuda_topk(s.stream, std::span<const float>(dg.p, n), k, ws, dv.p, di.p);
  } catch (const gcomp::error& e) {
    message = e.what();
  }
  CHECK(message.find("gradient[777777] = nan is not finite") != std::string::npos);
  CHECK(dv.to_host(k) == std::vector<float>(k, 42.0f));
  CHECK(di.to_host(k) == std::vector<std::uint32_t>(k, 7u));
  // The workspace is usable again after the error.
  g[900000] = g[777777] = g[800000] = 0.5f;
  check_against_host(g, k, ws, s.stream);
}

TEST_CASE("arguments are checked before anything is queued") {
  stream_holder s;
  gcomp::detail::cuda_topk_workspace<float> ws;
  device_array<float> dg(8), dv(8);
  device_array<std::uint32_t> di(8);
  const std::span<const float> g(dg.p, 7);
  CHECK_THROWS_WITH_AS(gcomp::detail::cuda_topk(s.stream, g, 8, ws, dv.p, di.p),
                       "gcomp::detail::cuda_topk: k = 8 exceeds the gradient size 7", gcomp::error);
  CHECK_THROWS_WITH_AS(gcomp::detail::cuda_topk(s.stream, g, 0, ws, dv.p, di.p),
                       "gcomp::detail::cuda_topk: k must be at least 1, got k = 0", gcomp::error);
  CHECK_THROWS_AS(gcomp::detail::cuda_topk(s.stream, g, 3, ws, static_cast<float*>(nullptr), di.p),
                  gcomp::error);
  CHECK(ws.capacity() == 0);  // nothing was allocated for rejected calls
}
