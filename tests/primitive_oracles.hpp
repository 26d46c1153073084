// Shared by the Thrust (OpenMP) and CUDA primitive tests: inputs whose sums are
// order-sensitive, the four reductions compared, and bitwise comparison.
#pragma once

#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "error_text.hpp"  // message_of

namespace gcomp_test {

// Values spread over many binades, so a sum taken in another order would
// almost surely round differently and the bitwise checks would notice.
inline std::vector<float> make_values(std::size_t n, std::uint32_t seed) {
  std::vector<float> values(n);
  std::uint64_t state = 0x9e3779b97f4a7c15ull * (seed + 1);
  for (float& v : values) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const auto bits = static_cast<std::uint32_t>(state >> 32);
    const float unit = static_cast<float>(bits >> 8) * 0x1p-24f * 2.0f - 1.0f;  // [-1, 1)
    v = std::ldexp(unit, static_cast<int>(bits % 24) - 12);
  }
  return values;
}

template <class T>
auto bits_of(T value) {
  if constexpr (sizeof(T) == 4)
    return std::bit_cast<std::uint32_t>(value);
  else
    return std::bit_cast<std::uint64_t>(value);
}

struct reductions {
  float sum_of_squares;
  double sum;
  float max;
  int positives;
};

struct plus_f {
  GCOMP_HD float operator()(float a, float b) const { return a + b; }
};
struct plus_d {
  GCOMP_HD double operator()(double a, double b) const { return a + b; }
};
struct max_f {
  GCOMP_HD float operator()(float a, float b) const { return a < b ? b : a; }
};
struct plus_i {
  GCOMP_HD int operator()(int a, int b) const { return a + b; }
};

// x points to memory the policy can read: host memory for host_seq, device
// memory for cuda_par and thrust_device.
template <class Policy>
reductions reduce_all(const Policy& policy, const float* x, std::size_t n) {
  reductions r;
  r.sum_of_squares = gcomp::transform_reduce(policy, n, 0.0f, plus_f{},
                                             [=] GCOMP_HD(std::size_t i) { return x[i] * x[i]; });
  r.sum = gcomp::transform_reduce(policy, n, 0.0, plus_d{}, [=] GCOMP_HD(std::size_t i) {
    return static_cast<double>(x[i]) * 1.000001 + 1e-3;
  });
  r.max = gcomp::transform_reduce(policy, n, -std::numeric_limits<float>::infinity(), max_f{},
                                  [=] GCOMP_HD(std::size_t i) { return x[i]; });
  r.positives = gcomp::transform_reduce(policy, n, 0, plus_i{},
                                        [=] GCOMP_HD(std::size_t i) { return x[i] > 0.0f ? 1 : 0; });
  return r;
}

template <class Policy>
reductions reduce_all(const Policy& policy, const std::vector<float>& values) {
  return reduce_all(policy, values.data(), values.size());
}

inline void check_same(const reductions& expected, const reductions& got) {
  CHECK(bits_of(got.sum_of_squares) == bits_of(expected.sum_of_squares));
  CHECK(bits_of(got.sum) == bits_of(expected.sum));
  CHECK(bits_of(got.max) == bits_of(expected.max));
  CHECK(got.positives == expected.positives);
}


// Per-layer reductions over x (memory the policy can read), compared bitwise.
template <class Policy>
std::vector<float> per_layer_sums(const Policy& policy, const gcomp::layout& lay, const float* x) {
  std::vector<float> out(lay.num_layers(), 123.0f);
  gcomp::reduce_per_layer(policy, lay, std::span<float>(out), 0.0f, plus_f{},
                          [=] GCOMP_HD(std::size_t i) { return x[i] * x[i]; });
  return out;
}

template <class Policy>
std::vector<float> per_layer_max(const Policy& policy, const gcomp::layout& lay, const float* x) {
  std::vector<float> out(lay.num_layers(), 123.0f);
  gcomp::reduce_per_layer(policy, lay, std::span<float>(out),
                          -std::numeric_limits<float>::infinity(), max_f{},
                          [=] GCOMP_HD(std::size_t i) { return x[i]; });
  return out;
}

inline void check_same_bits(const std::vector<float>& expected, const std::vector<float>& got) {
  REQUIRE(got.size() == expected.size());
  for (std::size_t d = 0; d < expected.size(); ++d) {
    CAPTURE(d);
    CHECK(bits_of(got[d]) == bits_of(expected[d]));
  }
}

}  // namespace gcomp_test
