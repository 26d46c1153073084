// Sign, 1-bit and cast sameness: sign, onebit, fp16_cast and bf16_cast under a device policy give host_seq's payload and decompress_add output bit for bit, and the same errors with nothing written; shared by tests/thrust and tests/cuda.
//
// The including test calls check_sign_cases(policy), check_cast_cases(policy),
// check_sign_errors(policy), check_cast_errors(policy) and
// check_sign_wrapper_cases(policy) from its TEST_CASEs. Gradients and outputs
// are put in the policy's memory with gcomp::policy_buffer. The device path
// (compress/detail/sign_device.hpp) sums in the order of
// exec/detail/reduce_order.hpp and shares its per-element functors with the
// host loops, so any difference is a bug, not rounding.
#pragma once

#include <doctest/doctest.h>

#include <gcomp/compress/cast.hpp>
#include <gcomp/compress/error_feedback.hpp>
#include <gcomp/compress/onebit.hpp>
#include <gcomp/compress/sign.hpp>
#include <gcomp/core/error.hpp>
#include <gcomp/core/half.hpp>
#include <gcomp/core/layout.hpp>
#include <gcomp/core/message.hpp>
#include <gcomp/core/quantized_payload.hpp>
#include <gcomp/core/random.hpp>
#include <gcomp/exec/buffer.hpp>
#include <gcomp/exec/host.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <initializer_list>
#include <type_traits>
#include <utility>
#include <vector>

#include "device_sameness.hpp"

namespace gcomp_test::sign_sameness {

using namespace gcomp_test::device_sameness;

// Values every compressor here accepts (|x| < 65504, so float16 too), with the
// shapes the code paths care about: exact zeros, negative zeros, subnormals of
// T, float16 subnormals and ties, values just below float16's overflow, and
// runs of one sign (a side of onebit empty in some group).
template <class T>
std::vector<T> sample_gradient(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<T> g(n);
  for (std::size_t i = 0; i < n; ++i) g[i] = static_cast<T>(normal(rng) * std::pow(10.0, double(i % 7) - 3.0));
  for (std::size_t i = 0; i < n; i += 17) g[i] = T(0);
  for (std::size_t i = 5; i < n; i += 29) g[i] = -T(0);
  const T tiny = std::numeric_limits<T>::denorm_min();
  for (std::size_t i = 11; i < n; i += 37) g[i] = tiny * static_cast<T>(1 + i % 5) * (i % 2 == 0 ? T(1) : T(-1));
  for (std::size_t i = 13; i < n; i += 41) g[i] = static_cast<T>(std::ldexp(double(1 + i % 1000), -26)) * (i % 2 ? T(1) : T(-1));
  for (std::size_t i = 19; i < n; i += 43) g[i] = static_cast<T>(1.0 + std::ldexp(1.0, -11)) * (i % 2 ? T(1) : T(-1));  // float16 tie
  for (std::size_t i = 23; i < n; i += 301) g[i] = i % 2 ? T(65519) : T(-65503.5);
  for (std::size_t i = n / 3; i < n / 3 + 200 && i < n; ++i) g[i] = static_cast<T>(0.5 + double(i % 3));  // all >= 0
  for (std::size_t i = n / 2; i < n / 2 + 100 && i < n; ++i) g[i] = static_cast<T>(-0.25 - double(i % 3));  // all < 0
  return g;
}

// Layouts over n elements: two layers, several (one of a single element, one
// over more than one reduce block), layers listed out of offset order, and
// gaps (whose elements are never read for the sums, so they hold NaN below).
inline std::vector<gcomp::layout> layouts_for(std::size_t n) {
  std::vector<gcomp::layout> out;
  if (n == 0) return out;
  out.push_back(gcomp::layout{n});
  if (n >= 2) out.push_back(gcomp::layout{n / 2, n - n / 2});
  if (n >= 4200) out.push_back(gcomp::layout{1, 63, 4097, n - 4161});
  if (n >= 8) {
    out.push_back(gcomp::layout::from_layers(
        {{"late", n / 2, n - n / 2, {}}, {"early", 0, n / 4, {}}, {"mid", n / 4, n / 2 - n / 4, {}}}));
    out.push_back(gcomp::layout::from_layers({{"a", 1, n / 3, {}}, {"b", n / 2, n - n / 2, {}}},
                                             gcomp::gaps::allowed));
  }
  return out;
}

template <class T>
std::vector<T> with_nan_in_gaps(std::vector<T> g, const gcomp::layout& lay) {
  std::vector<char> covered(g.size(), 0);
  for (const gcomp::layer& l : lay)
    for (std::size_t i = l.offset; i < l.offset + l.size; ++i) covered[i] = 1;
  for (std::size_t i = 0; i < g.size(); ++i)
    if (!covered[i]) g[i] = i % 2 ? std::numeric_limits<T>::quiet_NaN() : -std::numeric_limits<T>::infinity();
  return g;
}

inline const std::size_t sizes[] = {0, 1, 63, 64, 65, 4096 * 3 + 17, 100003};

template <class T, class Policy>
void check_sign_cases_of(const Policy& policy) {
  for (std::size_t n : sizes) {
    CAPTURE(n);
    const std::vector<T> g = sample_gradient<T>(n, static_cast<unsigned>(n) + 1);
    check_one(policy, gcomp::sign<T>{}, g);
    check_one(policy, gcomp::onebit<T>{}, g);
    for (const gcomp::layout& lay : layouts_for(n)) {
      CAPTURE(lay.num_layers());
      const std::vector<T> h = with_nan_in_gaps(g, lay);
      check_one(policy, gcomp::sign<T>(lay), h);
      check_one(policy, gcomp::onebit<T>(lay), h);
    }
  }
  // Only subnormals; only zeros of both signs; one sign only.
  std::vector<T> tiny(300, std::numeric_limits<T>::denorm_min());
  for (std::size_t i = 0; i < tiny.size(); i += 3) tiny[i] = -tiny[i];
  std::vector<T> zeros(130, T(0));
  for (std::size_t i = 0; i < zeros.size(); i += 2) zeros[i] = -T(0);
  const std::vector<T> negative(77, T(-3));
  for (const std::vector<T>* x : std::initializer_list<const std::vector<T>*>{&tiny, &zeros, &negative}) {
    check_one(policy, gcomp::sign<T>{}, *x);
    check_one(policy, gcomp::onebit<T>{}, *x);
    check_one(policy, gcomp::onebit<T>(gcomp::layout{x->size() - 10, 10}), *x);
  }
}

/// sign and onebit payloads and decompress_add outputs bitwise equal to
/// host_seq, float and double, whole-buffer and per-layer (gaps included),
/// sizes around the 64-bit words and the 4096-element reduce blocks.
template <class Policy>
void check_sign_cases(const Policy& policy) {
  SUBCASE("float") { check_sign_cases_of<float>(policy); }
  SUBCASE("double") { check_sign_cases_of<double>(policy); }
}

template <class T, class Policy>
void check_cast_cases_of(const Policy& policy) {
  for (std::size_t n : sizes) {
    CAPTURE(n);
    const std::vector<T> g = sample_gradient<T>(n, static_cast<unsigned>(n) + 2);
    check_one(policy, gcomp::fp16_cast<T>{}, g);
    check_one(policy, gcomp::bf16_cast<T>{}, g);
  }
  // bfloat16's range: up to just below its overflow threshold, and float's
  // largest values (finite in float, rounding within bfloat16's range or not).
  std::vector<T> wide = {T(1e38), T(-3.3e38), T(0x1.fep127), T(-0x1.fe8p127), T(1e-38), T(-1e-40), T(0)};
  if constexpr (std::is_same_v<T, double>) {
    wide.push_back(T(0x1.fefffffffffffp127));  // just below the threshold: rounds to bfloat16's max
    wide.push_back(T(1e-300));                 // below every float: rounds to (signed) zero
    wide.push_back(T(-1e-300));
    wide.push_back(T(0x1.0000000001p-20));  // round-to-odd matters for float16
  }
  check_one(policy, gcomp::bf16_cast<T>{}, wide);
}

/// fp16_cast and bf16_cast payloads and outputs bitwise equal to host_seq,
/// float and double gradients.
template <class Policy>
void check_cast_cases(const Policy& policy) {
  SUBCASE("float") { check_cast_cases_of<float>(policy); }
  SUBCASE("double") { check_cast_cases_of<double>(policy); }
}

template <class T, class Policy>
void check_sign_errors_of(const Policy& policy) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T inf = std::numeric_limits<T>::infinity();
  const gcomp::layout lay{300, 4500, 200};
  const std::size_t n = lay.total_size();
  std::vector<T> g = sample_gradient<T>(n, 3);
  g[4700] = inf;
  g[321] = nan;  // the first non-finite index
  check_compress_error(policy, gcomp::sign<T>{}, g, "gradient[321]");
  check_compress_error(policy, gcomp::onebit<T>{}, g, "gradient[321]");
  check_compress_error(policy, gcomp::sign<T>(lay), g, "gradient[321]");
  check_compress_error(policy, gcomp::onebit<T>(lay), g, "gradient[321]");
  g[321] = T(1);
  g[4700] = -inf;
  check_compress_error(policy, gcomp::sign<T>{}, g, "gradient[4700]");
  check_compress_error(policy, gcomp::onebit<T>(lay), g, "gradient[4700]");
  g[4999] = nan;  // in the last layer, after the -inf of the second
  check_compress_error(policy, gcomp::onebit<T>(lay), g, "gradient[4700]");
  g[4700] = T(2);
  check_compress_error(policy, gcomp::sign<T>(lay), g, "gradient[4999]");
  // A gradient of the wrong size for the layout.
  check_compress_error(policy, gcomp::sign<T>(lay), std::vector<T>(n - 1, T(1)), "gradient");
  // Finite values whose sums overflow.
  const T big = std::numeric_limits<T>::max() / T(2);
  const std::vector<T> huge(200, big);
  if constexpr (std::is_same_v<T, double>) {
    check_compress_error(policy, gcomp::sign<T>{}, huge, "overflows");
    check_compress_error(policy, gcomp::onebit<T>(gcomp::layout{100, 100}), huge, "overflow");
  } else {
    check_one(policy, gcomp::sign<T>{}, huge);  // summed in double: fine
    check_one(policy, gcomp::onebit<T>{}, huge);
  }

  // decompress_add: messages that do not match, with out left alone.
  gcomp::sign<T> s(lay);
  gcomp::onebit<T> o(lay);
  const std::vector<T> x = sample_gradient<T>(n, 9);
  gcomp::quantized_payload<T> ms, mo;
  s.compress(gcomp::host_seq{}, std::span<const T>(x), ms, gcomp::rng_key{});
  o.compress(gcomp::host_seq{}, std::span<const T>(x), mo, gcomp::rng_key{});
  check_decompress_error(policy, s, ms, n - 1, "out");
  check_decompress_error(policy, o, mo, n + 1, "out");
  check_decompress_error(policy, gcomp::sign<T>{}, ms, n, "message.scales");  // 3 scales, 1 group
  auto bad = ms;
  bad.bits = 2;
  check_decompress_error(policy, s, bad, n, "message.bits");
  bad = ms;
  bad.scales[1] = -bad.scales[1] - T(1);
  check_decompress_error(policy, s, bad, n, "negative");
  bad = ms;
  bad.scales[2] = nan;
  check_decompress_error(policy, s, bad, n, "not finite");
  bad = ms;
  bad.words.pop_back();
  check_decompress_error(policy, s, bad, n, "message.words");
  bad = mo;
  bad.scales[3] = T(1);  // the mean of the negative elements of layer 1
  check_decompress_error(policy, o, bad, n, "positive");
  bad = mo;
  bad.dimension = n + 64;
  check_decompress_error(policy, o, bad, n, "message.dimension");
  // A bit set in a gap.
  const auto gapped = gcomp::layout::from_layers({{"a", 2, 100, {}}, {"b", 200, 50, {}}}, gcomp::gaps::allowed);
  gcomp::onebit<T> og(gapped);
  const std::vector<T> y = sample_gradient<T>(250, 4);
  gcomp::quantized_payload<T> mg;
  og.compress(gcomp::host_seq{}, std::span<const T>(y), mg, gcomp::rng_key{});
  mg.words[2] |= std::uint64_t{1} << 10;  // element 138
  check_decompress_error(policy, og, mg, 250, "gap");
}

/// Non-finite gradients (the first index named, whole-buffer and per layer),
/// sums that overflow, and decompress_add's rejections, with the message and
/// the output untouched, as on the host.
template <class Policy>
void check_sign_errors(const Policy& policy) {
  SUBCASE("float") { check_sign_errors_of<float>(policy); }
  SUBCASE("double") { check_sign_errors_of<double>(policy); }
}

template <class T, class Policy>
void check_cast_errors_of(const Policy& policy) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T inf = std::numeric_limits<T>::infinity();
  std::vector<T> g = sample_gradient<T>(9000, 5);
  g[8000] = nan;
  g[4500] = T(65520);  // rounds to infinity in float16 (the first bad index there)
  check_compress_error(policy, gcomp::fp16_cast<T>{}, g, "gradient[4500]");
  check_compress_error(policy, gcomp::bf16_cast<T>{}, g, "gradient[8000]");
  g[4500] = T(-65520);
  check_compress_error(policy, gcomp::fp16_cast<T>{}, g, "overflows float16");
  g[4500] = T(1);
  g[100] = -inf;
  check_compress_error(policy, gcomp::fp16_cast<T>{}, g, "gradient[100]");
  check_compress_error(policy, gcomp::bf16_cast<T>{}, g, "not finite");
  g[100] = T(1);
  g[7000] = T(0x1.ffp127);  // bfloat16's threshold
  check_compress_error(policy, gcomp::bf16_cast<T>{}, g, "overflows bfloat16");
  g[7000] = -std::numeric_limits<T>::max();
  check_compress_error(policy, gcomp::bf16_cast<T>{}, g, "gradient[7000]");

  // decompress_add: a message of another size.
  gcomp::fp16_cast<T> c;
  const std::vector<T> x = sample_gradient<T>(300, 6);
  gcomp::dense_payload<gcomp::float16> m;
  c.compress(gcomp::host_seq{}, std::span<const T>(x), m, gcomp::rng_key{});
  check_decompress_error(policy, c, m, 299, "out");
  check_decompress_error(policy, c, m, 301, "out");
  // Any 16-bit value is added as it is, bitwise as on the host: infinities
  // and subnormals included, NaNs not (a GPU's arithmetic returns its
  // canonical NaN, not the operand's payload).
  for (std::size_t i = 0; i < m.data.size(); i += 7) {
    std::uint16_t bits = static_cast<std::uint16_t>(i * 2654435761u >> 7);
    if ((bits & 0x7c00u) == 0x7c00u) bits &= 0xfc00u;  // NaN -> inf
    m.data[i].bits = bits;
  }
  std::vector<T> base(300, T(0.5));
  std::vector<T> host_out = base;
  c.decompress_add(gcomp::host_seq{}, m, std::span<T>(host_out), T(3));
  gcomp::policy_buffer<T> out;
  out.assign_from_host(policy, std::span<const T>(base));
  c.decompress_add(policy, m, out.span(), T(3));
  CHECK(same_bytes(host_out, read_back(policy, std::span<const T>(out.span()))));
}

/// Out-of-range gradients (non-finite, or rounding to infinity in H) named
/// as on the host with the message untouched; decompress_add's size check.
template <class Policy>
void check_cast_errors(const Policy& policy) {
  SUBCASE("float") { check_cast_errors_of<float>(policy); }
  SUBCASE("double") { check_cast_errors_of<double>(policy); }
}

// sample_gradient with room for the residual below float16's overflow: the
// gradient source of check_wrapper.
template <class T>
auto sampled_for_feedback() {
  return [](std::size_t n, unsigned seed) {
    std::vector<T> g = sample_gradient<T>(n, seed);
    for (T& x : g)
      if (std::fabs(x) > T(60000)) x = x / T(4);
    return g;
  };
}

/// error_feedback<sign>, error_feedback<onebit> (per layer) and
/// error_feedback<fp16_cast> with their residual in the policy's memory,
/// bitwise equal to host_seq step by step.
template <class Policy>
void check_sign_wrapper_cases(const Policy& policy) {
  check_wrapper(policy, gcomp::error_feedback<gcomp::sign<float>>(), 5000, 5, sampled_for_feedback<float>());
  check_wrapper(policy, gcomp::error_feedback<gcomp::sign<double>>(gcomp::sign<double>(gcomp::layout{1000, 3100})),
                4100, 4, sampled_for_feedback<double>());
  check_wrapper(policy, gcomp::error_feedback<gcomp::onebit<float>>(gcomp::onebit<float>(gcomp::layout{70, 4500, 30})),
                4600, 5, sampled_for_feedback<float>());
  check_wrapper(policy, gcomp::error_feedback<gcomp::fp16_cast<float>>(), 777, 4, sampled_for_feedback<float>());
}

}  // namespace gcomp_test::sign_sameness
