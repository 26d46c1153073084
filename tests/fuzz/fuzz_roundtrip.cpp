// libFuzzer target: compress -> encode -> decode -> decompress_add for every compressor, with the size, options and values taken from the fuzz input (layout in roundtrip_input.hpp).
//
// Each input builds one compressor from its option bytes and compresses two
// gradients into one reused payload: the input's values, then their negation
// (shorter when variant::resize_second is set). An oracle, written from each
// compressor's documented contract, says before every call whether it must
// succeed, must throw gcomp::error, or may do either (only where the outcome
// hinges on rounding, e.g. a norm that may overflow). The constructor is held
// to the same standard: invalid options must throw, valid ones must not.
//
// After every accepted compress:
//   - encode(payload).size() == encoded_size(payload) == c.wire_bytes(payload),
//     and for compressors that document it, bits_per_element(n) * n / 8 too;
//   - decode(bytes, n) succeeds and re-encodes to the same bytes;
//   - decompress_add of the decoded payload equals that of the original, bit
//     for bit, and neither throws.
// After every refused compress: the payload, and a wrapper's state, are
// exactly as they were.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.hpp"
#include "gcomp/compress/bernoulli.hpp"
#include "gcomp/compress/cast.hpp"
#include "gcomp/compress/chain.hpp"
#include "gcomp/compress/ef21.hpp"
#include "gcomp/compress/error_feedback.hpp"
#include "gcomp/compress/grid_round.hpp"
#include "gcomp/compress/identity.hpp"
#include "gcomp/compress/natural.hpp"
#include "gcomp/compress/onebit.hpp"
#include "gcomp/compress/powersgd.hpp"
#include "gcomp/compress/qsgd.hpp"
#include "gcomp/compress/random_block.hpp"
#include "gcomp/compress/randomk.hpp"
#include "gcomp/compress/sign.hpp"
#include "gcomp/compress/terngrad.hpp"
#include "gcomp/compress/threshold_topk.hpp"
#include "gcomp/compress/topk.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/layout.hpp"
#include "roundtrip_input.hpp"

namespace {

using namespace gcomp;
namespace rt = fuzz::roundtrip;
namespace variant = rt::variant;
using fuzz::check;
using fuzz::violation;

enum class expect { success, failure, either };

// ---------------------------------------------------------------------------
// The input

struct setup {
  std::uint8_t compressor = 0;
  std::uint8_t variant = 0;
  std::size_t n = 0;
  rt::value_mode mode = rt::value_mode::raw;
  int exponent = 0;
  std::uint8_t scale_byte = 0;
  std::uint8_t key_byte = 0;
  std::array<std::uint8_t, rt::option_bytes> o{};

  bool has(std::uint8_t bit) const { return (variant & bit) != 0; }
  rng_key key(std::uint64_t step) const {
    return rng_key{0x5eed0000u + key_byte, (key_byte & 7u) + step,
                   static_cast<std::uint32_t>(key_byte >> 3u)};
  }
};

setup read_setup(fuzz::cursor& in) {
  setup s;
  s.compressor = static_cast<std::uint8_t>(in.u8() % rt::compressors.size());
  s.variant = in.u8();
  s.n = rt::length_from(in.u16());
  s.mode = static_cast<rt::value_mode>(in.u8() % 4);
  s.exponent = static_cast<std::int8_t>(in.u8());
  s.scale_byte = in.u8();
  s.key_byte = in.u8();
  for (auto& b : s.o) b = in.u8();
  return s;
}

/// Edge values: signed zeros, subnormals, the limits, infinities, NaNs, and
/// the thresholds the compressors test against (float16's range, 2^127).
template <class T>
T special_value(std::uint8_t b) {
  using L = std::numeric_limits<T>;
  const T table[] = {T(0),           -T(0),          T(1),           T(-1),
                     T(0.5),         L::denorm_min(), -L::denorm_min(), L::min(),
                     -L::min(),      L::max(),       L::lowest(),    L::infinity(),
                     -L::infinity(), L::quiet_NaN(), -L::quiet_NaN(), T(65504),
                     T(65520),       T(-65520),      T(0x1p127),     T(-0x1p127),
                     T(0x1.ffp127),  T(1e-3),        L::epsilon(),   T(-7.25)};
  return table[b % (sizeof(table) / sizeof(table[0]))];
}

template <class T>
std::vector<T> read_values(fuzz::cursor& in, const setup& s) {
  std::vector<T> g(s.n);
  for (auto& v : g) {
    switch (s.mode) {
      case rt::value_mode::raw: v = in.get<T>(); break;
      case rt::value_mode::scaled:
        v = std::ldexp(static_cast<T>(static_cast<std::int8_t>(in.u8())), s.exponent);
        break;
      case rt::value_mode::special: v = special_value<T>(in.u8()); break;
      case rt::value_mode::mixed: {
        const std::uint8_t b = in.u8();
        v = b < 0xf0 ? std::ldexp(static_cast<T>(static_cast<std::int8_t>(b)), s.exponent)
                     : special_value<T>(b);
        break;
      }
    }
  }
  return g;
}

template <class T>
T scale_of(std::uint8_t b) {
  using L = std::numeric_limits<T>;
  const T table[] = {T(1), T(-1), T(0.5), T(2),       T(0),           -T(0),
                     T(3), T(1e-3), L::max(), L::denorm_min(), L::infinity(), L::quiet_NaN()};
  return table[b % (sizeof(table) / sizeof(table[0]))];
}

// ---------------------------------------------------------------------------
// Options from bytes: mostly valid, with the invalid and edge ones reachable

/// "k or ratio" (topk, randomk, sampled_topk, random block).
struct count_choice {
  std::size_t k = 0;
  double ratio = 0.0;

  /// check_count_options: exactly one of k > 0 and ratio in (0, 1].
  bool valid() const { return (k > 0 && ratio == 0.0) || (k == 0 && ratio > 0.0 && ratio <= 1.0); }
  /// The per-layer constructors take a ratio only.
  bool valid_per_layer() const { return k == 0 && valid(); }
  /// Whether an n-element gradient can give k elements.
  bool fits(std::size_t n) const { return k <= n; }
};

count_choice count_from(std::uint8_t a, std::uint8_t b, std::size_t n) {
  if (a < 0xf0) {
    if (a % 2 == 0 && n > 0) return {1 + ((std::size_t(a >> 1) << 8 | b) % n), 0.0};
    return {0, (b + 1) / 256.0};
  }
  const double weird[] = {std::numeric_limits<double>::quiet_NaN(), -0.5, 0.0, 1.0, 1.5,
                          std::numeric_limits<double>::infinity(), 1e-300, 0x1.0000000000001p0};
  switch (a) {
    case 0xf0: return {0, 0.0};
    case 0xf1: return {std::size_t{1} + b, 0.5};
    case 0xf2: return {0, weird[b % 8]};
    case 0xf3: return {n + 1 + b % 4, 0.0};
    default: return {b, 0.0};  // 0 leaves both unset; above n does not fit
  }
}

/// qsgd's levels: s = 2^b - 1 below 0xf0, else a table of invalid ones.
unsigned levels_from(std::uint8_t a) {
  if (a < 0xf0) return (1u << (1 + a % 15)) - 1;
  const unsigned weird[] = {0u, 2u, 4u, 6u, 32768u, 65535u, 5u, 1u << 31};
  return weird[a % 8];
}

bool levels_valid(unsigned s) { return s >= 1 && s <= 32767u && (s & (s + 1)) == 0; }

/// A bucket size: 0 (one group), whole quantization groups (the fused path), or any.
std::size_t bucket_from(std::uint8_t a, std::uint8_t b) {
  switch (a % 4) {
    case 0: return 0;
    case 1: return 64 * (1 + std::size_t{b} % 8);
    case 2: return 1 + std::size_t{b};
    default: return 1 + std::size_t{b} * 17;
  }
}

/// A probability for the Bernoulli sparsifier, with invalid ones from 0xf0 on.
double probability_from(std::uint8_t a) {
  if (a < 0xf0) return (a + 1) / 240.0;
  const double weird[] = {0.0, -0.25, 1.0000001, std::numeric_limits<double>::quiet_NaN(),
                          std::numeric_limits<double>::infinity(), 1e-300, 1e-40, 1.0};
  return weird[a % 8];
}

bool probability_valid(double p) { return p > 0.0 && p <= 1.0 && static_cast<float>(p) > 0.0f; }

/// Layers over [0, n): 1 to 4 of them, optionally with gaps before each, and
/// a shape per layer (none, 1-D, 2-D or 3-D) for PowerSGD. None for n == 0.
std::optional<layout> make_layout(std::size_t n, std::uint8_t count_byte, std::uint8_t split_byte,
                                  std::uint8_t shape_byte, bool gaps_wanted) {
  if (n == 0) return std::nullopt;
  const std::size_t count = std::min<std::size_t>(1 + count_byte % 4, n);
  std::vector<std::size_t> bounds(count + 1, 0);
  bounds[count] = n;
  for (std::size_t i = 1; i < count; ++i) {
    const std::size_t wanted = i * n / count + ((split_byte >> (2 * i)) & 3) * n / 16;
    bounds[i] = std::clamp(wanted, bounds[i - 1] + 1, n - (count - i));
  }
  std::vector<layer> layers;
  for (std::size_t i = 0; i < count; ++i) {
    const std::size_t part = bounds[i + 1] - bounds[i];
    const std::size_t gap = gaps_wanted ? (split_byte * (i + 3)) % part : 0;
    layer l{"l" + std::to_string(i), bounds[i] + gap, part - gap, {}};
    const std::size_t size = l.size;
    std::size_t rows = 1;  // a divisor of size picked by the shape byte
    for (std::size_t r = 2 + (shape_byte >> 4) % 8; r <= size && r <= 64; ++r)
      if (size % r == 0) {
        rows = r;
        break;
      }
    switch ((shape_byte >> (2 * (i % 4))) & 3) {
      case 0: break;
      case 1: l.shape = {size}; break;
      case 2: l.shape = {rows, size / rows}; break;
      case 3: l.shape = {rows, size / rows, 1}; break;
    }
    layers.push_back(std::move(l));
  }
  try {
    return layout::from_layers(std::move(layers), gaps_wanted ? gaps::allowed : gaps::forbidden);
  } catch (const gcomp::error& e) {
    violation("make_layout built an invalid layout: ", e.what());
  }
}

// ---------------------------------------------------------------------------
// What the oracles look at

struct facts {
  bool all_finite = true;
  double max_abs = 0.0;
};

/// Finiteness and the largest magnitude of x, over the layout's layers only
/// when one is given (elements in gaps are not compressed, so not checked).
template <class T>
facts facts_of(std::span<const T> x, const layout* lay = nullptr) {
  facts f;
  auto visit = [&](std::size_t begin, std::size_t end) {
    for (std::size_t i = begin; i < end; ++i) {
      if (!std::isfinite(x[i]))
        f.all_finite = false;
      else
        f.max_abs = std::max(f.max_abs, std::fabs(static_cast<double>(x[i])));
    }
  };
  if (lay)
    for (const layer& l : *lay) visit(l.offset, l.offset + l.size);
  else
    visit(0, x.size());
  return f;
}

/// Values so large that a sum or norm over n of them might overflow T.
template <class T>
bool huge(const facts& f, std::size_t n) {
  return f.max_abs >= static_cast<double>(std::numeric_limits<T>::max()) / (4.0 * double(n + 1));
}

/// Refuse non-finite input; succeed unless a sum over the values may overflow.
template <class T>
expect finite_sums(const facts& f, std::size_t n) {
  if (!f.all_finite) return expect::failure;
  return huge<T>(f, n) ? expect::either : expect::success;
}

expect finite_only(const facts& f) { return f.all_finite ? expect::success : expect::failure; }

// ---------------------------------------------------------------------------
// The checks

template <class C, class... A>
std::optional<C> construct(const char* name, bool valid, A&&... args) {
  std::optional<C> c;
  try {
    c.emplace(std::forward<A>(args)...);
  } catch (const gcomp::error& e) {
    check(!valid, name, ": the constructor refused valid options: ", e.what());
    return std::nullopt;
  }
  check(valid, name, ": the constructor accepted invalid options");
  return c;
}

/// A stateful wrapper's state (error_feedback's residual, ef21's estimate).
template <class C>
std::vector<typename C::value_type> state_of(const C& c) {
  if constexpr (requires { c.residual(); }) {
    const auto r = c.residual();
    return {r.begin(), r.end()};
  } else if constexpr (requires { c.state(); }) {
    const auto h = c.state();
    return {h.begin(), h.end()};
  } else {
    return {};
  }
}

template <class C>
void roundtrip(const char* name, const C& c, const typename C::payload& message, std::size_t n,
               typename C::value_type scale, bool exact_bits) {
  using T = typename C::value_type;
  std::vector<std::byte> bytes;
  encode(message, bytes);
  check(bytes.size() == encoded_size(message), name, ": encode wrote ", bytes.size(),
        " bytes but encoded_size says ", encoded_size(message));
  check(c.wire_bytes(message) == bytes.size(), name, ": wire_bytes is ", c.wire_bytes(message),
        " but the message has ", bytes.size(), " bytes");
  if (exact_bits && n > 0) {
    const double claimed = compressor_traits<C>::bits_per_element(c, n) * double(n) / 8.0;
    check(std::fabs(claimed - double(bytes.size())) <= 1e-9 * double(bytes.size()), name,
          ": bits_per_element(", n, ") stands for ", claimed, " bytes but the message has ",
          bytes.size());
  }
  typename C::payload decoded;
  try {
    decode(std::span<const std::byte>(bytes), decoded, std::uint64_t{n});
  } catch (const gcomp::error& e) {
    violation(name, ": its own message does not decode: ", e.what());
  }
  std::vector<std::byte> again;
  encode(decoded, again);
  check(again == bytes, name, ": the decoded message re-encodes to other bytes");

  const std::vector<T> start = fuzz::starting_output<T>(n);
  std::vector<T> from_original = start, from_decoded = start;
  try {
    c.decompress_add(host_seq{}, message, std::span<T>(from_original), scale);
  } catch (const gcomp::error& e) {
    violation(name, ": decompress_add refused the message compress made: ", e.what());
  }
  try {
    c.decompress_add(host_seq{}, decoded, std::span<T>(from_decoded), scale);
  } catch (const gcomp::error& e) {
    violation(name, ": decompress_add refused the decoded message: ", e.what());
  }
  check(fuzz::same_bits(from_original, from_decoded), name,
        ": decompress_add of the decoded message differs from that of the original");
}

/// One compress with its expected outcome, then the round trip if it succeeded.
/// Returns whether compress succeeded; `started`: whether an earlier one did.
template <class C>
bool compress_step(const char* name, C& c, typename C::payload& message,
                   std::span<const typename C::value_type> g, rng_key key, expect e,
                   typename C::value_type scale, bool exact_bits, bool started) {
  const auto before = message;
  const auto state_before = state_of(c);
  try {
    c.compress(host_seq{}, g, message, key);
  } catch (const gcomp::error& err) {
    check(e != expect::success, name, ": compress refused a valid input (n = ", g.size(),
          "): ", err.what());
    check(fuzz::same_payload(message, before), name, ": a refused compress changed the payload");
    // Until a step succeeds the state is zero, whether or not (and at what
    // size) a refused step has allocated it.
    const auto state_after = state_of(c);
    if (!started)
      check(std::all_of(state_after.begin(), state_after.end(),
                        [](auto v) { return v == decltype(v)(0); }),
            name, ": a refused first compress left a nonzero state");
    else
      check(fuzz::same_bits(state_after, state_before), name,
            ": a refused compress changed the compressor's state");
    return false;
  }
  check(e != expect::failure, name, ": compress accepted an input it must refuse (n = ",
        g.size(), ")");
  roundtrip(name, c, message, g.size(), scale, exact_bits);
  return true;
}

/// The oracle's verdict on x; oracles of stateful wrappers also take whether
/// an earlier step succeeded (only that fixes the wrapper's size).
template <class Oracle, class T>
expect ask(Oracle& oracle, std::span<const T> x, bool started) {
  if constexpr (std::is_invocable_v<Oracle&, std::span<const T>, bool>)
    return oracle(x, started);
  else
    return oracle(x);
}

/// The two steps: the input's values, then their negation (maybe shorter).
/// oracle(x) gives the expected outcome of compressing x in the current state.
template <class C, class Oracle>
void two_steps(const char* name, C& c, const setup& s,
               const std::vector<typename C::value_type>& g, Oracle oracle, bool exact_bits) {
  using T = typename C::value_type;
  const T scale = scale_of<T>(s.scale_byte);
  typename C::payload message;
  const bool started = compress_step(name, c, message, std::span<const T>(g), s.key(0),
                                     ask(oracle, std::span<const T>(g), false), scale, exact_bits,
                                     false);
  const std::size_t n2 = s.has(variant::resize_second) ? g.size() - g.size() / 3 : g.size();
  std::vector<T> g2(n2);
  for (std::size_t i = 0; i < n2; ++i) g2[i] = -g[i];
  compress_step(name, c, message, std::span<const T>(g2), s.key(1),
                ask(oracle, std::span<const T>(g2), started), scale, exact_bits, started);
}

// ---------------------------------------------------------------------------
// The compressors and their oracles

/// topk's rule: the layout must fit, k must fit, every compressed value finite.
template <class T>
expect topk_expect(std::span<const T> x, const count_choice& count, const layout* lay) {
  if (lay) return x.size() != lay->total_size() ? expect::failure : finite_only(facts_of(x, lay));
  if (!count.fits(x.size())) return expect::failure;
  return finite_only(facts_of(x));
}

template <class T, class I>
void run_topk(const setup& s, const std::vector<T>& g) {
  const count_choice count = count_from(s.o[0], s.o[1], s.n);
  const topk_options options{.k = count.k, .ratio = count.ratio};
  const auto lay = s.has(variant::with_layout)
                       ? make_layout(s.n, s.o[5], s.o[6], s.o[7], s.has(variant::layout_gaps))
                       : std::nullopt;
  auto c = lay ? construct<topk<T, I>>("topk<layout>", count.valid_per_layer(), options, *lay)
               : construct<topk<T, I>>("topk", count.valid(), options);
  if (!c) return;
  const layout* l = lay ? &*lay : nullptr;
  two_steps("topk", *c, s, g, [&](std::span<const T> x) { return topk_expect(x, count, l); }, true);
}

template <class T, key_use Key, rescale Scale, class I>
void run_randomk_as(const setup& s, const std::vector<T>& g) {
  const count_choice count = count_from(s.o[0], s.o[1], s.n);
  const randomk_options options{.k = count.k, .ratio = count.ratio};
  const auto lay = s.has(variant::with_layout)
                       ? make_layout(s.n, s.o[5], s.o[6], s.o[7], s.has(variant::layout_gaps))
                       : std::nullopt;
  using C = randomk<T, Key, Scale, I>;
  auto c = lay ? construct<C>("randomk<layout>", count.valid_per_layer(), options, *lay)
               : construct<C>("randomk", count.valid(), options);
  if (!c) return;
  // Random-k never looks at the values: only the sizes can be wrong.
  two_steps("randomk", *c, s, g, [&](std::span<const T> x) {
    if (lay) return x.size() == lay->total_size() ? expect::success : expect::failure;
    return count.fits(x.size()) ? expect::success : expect::failure;
  }, true);
}

template <class T, class I>
void run_randomk(const setup& s, const std::vector<T>& g) {
  const bool shared = s.has(variant::shared_key), unscaled = s.has(variant::no_rescale);
  if (shared && unscaled) run_randomk_as<T, key_use::shared, rescale::none, I>(s, g);
  if (shared && !unscaled) run_randomk_as<T, key_use::shared, rescale::unbiased, I>(s, g);
  if (!shared && unscaled) run_randomk_as<T, key_use::per_worker, rescale::none, I>(s, g);
  if (!shared && !unscaled) run_randomk_as<T, key_use::per_worker, rescale::unbiased, I>(s, g);
}

template <class T>
void run_bernoulli(const setup& s, const std::vector<T>& g) {
  const auto lay = s.has(variant::with_layout)
                       ? make_layout(s.n, s.o[5], s.o[6], s.o[7], s.has(variant::layout_gaps))
                       : std::nullopt;
  using C = bernoulli_sparsifier<T>;
  std::optional<C> c;
  if (lay) {
    std::vector<double> p(lay->num_layers());
    bool valid = true;
    for (std::size_t d = 0; d < p.size(); ++d) {
      p[d] = probability_from(s.o[d]);
      valid = valid && probability_valid(p[d]);
    }
    c = construct<C>("bernoulli<layout>", valid, *lay, std::span<const double>(p));
  } else {
    const double p = probability_from(s.o[0]);
    c = construct<C>("bernoulli", probability_valid(p), p);
  }
  if (!c) return;
  two_steps("bernoulli", *c, s, g, [&](std::span<const T> x) {
    return !lay || x.size() == lay->total_size() ? expect::success : expect::failure;
  }, false);
}

template <class T>
void run_hard_threshold(const setup& s, const std::vector<T>& g) {
  using L = std::numeric_limits<T>;
  T tau;
  if (s.o[0] == 0x80) {
    const T weird[] = {T(0), T(-1), L::quiet_NaN(), L::infinity(), L::denorm_min(), L::max()};
    tau = weird[s.o[1] % 6];
  } else {
    tau = std::ldexp(T(1) + T(s.o[1]) / T(256), static_cast<std::int8_t>(s.o[0]) / 4);
  }
  auto c = construct<hard_threshold<T>>("hard_threshold", std::isfinite(tau) && tau > T(0), tau);
  if (!c) return;
  two_steps("hard_threshold", *c, s, g,
            [](std::span<const T> x) { return finite_only(facts_of(x)); }, false);
}

template <class T>
void run_sampled_topk(const setup& s, const std::vector<T>& g) {
  const count_choice count = count_from(s.o[0], s.o[1], s.n);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double weird_sample[] = {0.0, -0.1, 1.5, nan, 1.0};
  const double weird_tolerance[] = {-0.5, nan, std::numeric_limits<double>::infinity(), 0.0};
  sampled_topk_options options{.k = count.k, .ratio = count.ratio};
  options.sample_ratio = s.o[2] < 0xf0 ? (s.o[2] + 1) / 240.0 : weird_sample[s.o[2] % 5];
  options.min_sample = s.o[3] == 0xff ? 0 : 1 + std::size_t{s.o[3]} * 8;
  options.tolerance = s.o[4] < 0xf0 ? s.o[4] / 64.0 : weird_tolerance[s.o[4] % 4];
  const bool valid = count.valid() && options.sample_ratio > 0.0 && options.sample_ratio <= 1.0 &&
                     options.min_sample > 0 && std::isfinite(options.tolerance) &&
                     options.tolerance >= 0.0;
  auto c = construct<sampled_topk<T>>("sampled_topk", valid, options);
  if (!c) return;
  two_steps("sampled_topk", *c, s, g,
            [&](std::span<const T> x) { return topk_expect(x, count, nullptr); }, false);
}

template <class T>
void run_qsgd(const setup& s, const std::vector<T>& g) {
  const qsgd_options options{.levels = levels_from(s.o[0]), .bucket = bucket_from(s.o[1], s.o[2])};
  auto c = construct<qsgd<T>>("qsgd", levels_valid(options.levels), options);
  if (!c) return;
  two_steps("qsgd", *c, s, g,
            [](std::span<const T> x) { return finite_sums<T>(facts_of(x), x.size()); }, true);
}

template <class T>
void run_terngrad(const setup& s, const std::vector<T>& g) {
  terngrad<T> c(terngrad_options{.bucket = bucket_from(s.o[1], s.o[2])});
  two_steps("terngrad", c, s, g, [](std::span<const T> x) { return finite_only(facts_of(x)); },
            true);
}

void run_natural(const setup& s, const std::vector<float>& g) {
  natural<float> c;
  two_steps("natural", c, s, g, [](std::span<const float> x) {
    for (float v : x)
      if (!(std::fabs(v) <= 0x1p127f)) return expect::failure;  // NaN, inf, or could round to inf
    return expect::success;
  }, true);
}

/// sign and onebit: the layout must fit, covered values finite, sums may overflow.
template <class T>
expect one_bit_expect(std::span<const T> x, const layout* lay) {
  if (lay && x.size() != lay->total_size()) return expect::failure;
  return finite_sums<T>(facts_of(x, lay), x.size());
}

template <template <class> class C, class T>
void run_one_bit(const char* name, const setup& s, const std::vector<T>& g) {
  const auto lay = s.has(variant::with_layout)
                       ? make_layout(s.n, s.o[5], s.o[6], s.o[7], s.has(variant::layout_gaps))
                       : std::nullopt;
  C<T> c = lay ? C<T>(*lay) : C<T>();
  const layout* l = lay ? &*lay : nullptr;
  two_steps(name, c, s, g, [&](std::span<const T> x) { return one_bit_expect(x, l); }, true);
}

template <class T>
void run_grid_round(const setup& s, const std::vector<T>& g) {
  grid_round_options options;
  const unsigned weird_bits[] = {0u, 1u, 17u, 32u, 100u};
  options.bits = s.o[0] < 0xf0 ? 2 + s.o[0] % 15 : weird_bits[s.o[0] % 5];
  const double weird_spacing[] = {0.0, -1.0, std::numeric_limits<double>::quiet_NaN(),
                                  std::numeric_limits<double>::infinity(), 1e-300, 1e300,
                                  1e-45, 3e38};
  options.spacing = s.o[1] < 0xf8 ? std::ldexp(1.0 + s.o[1] / 256.0, static_cast<std::int8_t>(s.o[2]) / 2)
                                  : weird_spacing[s.o[1] % 8];
  // The spacing is used rounded to T, which must leave it a normal number.
  const bool valid = std::isfinite(options.spacing) && options.spacing > 0.0 &&
                     options.bits >= 2 && options.bits <= 16 &&
                     std::isnormal(static_cast<T>(options.spacing));
  auto c = construct<grid_round<T>>("grid_round", valid, options);
  if (!c) return;
  // n_i = round(v_i / Delta) (ties away from zero) must be a b-bit two's
  // complement level, Delta being the spacing rounded to T.
  const double spacing = static_cast<double>(static_cast<T>(options.spacing));
  const double lowest = -std::ldexp(1.0, int(options.bits) - 1);
  const double highest = std::ldexp(1.0, int(options.bits) - 1) - 1.0;
  two_steps("grid_round", *c, s, g, [=](std::span<const T> x) {
    for (T v : x) {
      const double level = std::round(static_cast<double>(v) / spacing);
      if (!(level >= lowest && level <= highest)) return expect::failure;
    }
    return expect::success;
  }, true);
}

template <class T>
void run_powersgd(const setup& s, const std::vector<T>& g) {
  const auto lay = make_layout(s.n, s.o[5], s.o[6], s.o[7], s.has(variant::layout_gaps));
  if (!lay) return;  // PowerSGD needs a layout, and a layout needs an element
  const std::size_t rank = s.o[0] == 0xff ? 0 : 1 + s.o[0] % 4;
  auto c = construct<powersgd<T>>("powersgd", rank > 0, powersgd_options{.rank = rank}, *lay);
  if (!c) return;
  // Values are not checked (a NaN layer is sent as computed); only the size can be wrong.
  two_steps("powersgd", *c, s, g, [&](std::span<const T> x) {
    return x.size() == lay->total_size() ? expect::success : expect::failure;
  }, true);
}

template <class T, rescale Scale>
void run_random_block_as(const setup& s, const std::vector<T>& g) {
  const count_choice count = count_from(s.o[0], s.o[1], s.n);
  auto c = construct<random_contiguous_block<T, Scale>>(
      "random_block", count.valid(), random_contiguous_block_options{.k = count.k, .ratio = count.ratio});
  if (!c) return;
  two_steps("random_block", *c, s, g, [&](std::span<const T> x) {
    return count.fits(x.size()) ? expect::success : expect::failure;
  }, true);
}

template <class T>
void run_random_block(const setup& s, const std::vector<T>& g) {
  if (s.has(variant::no_rescale))
    run_random_block_as<T, rescale::none>(s, g);
  else
    run_random_block_as<T, rescale::unbiased>(s, g);
}

template <class T, class I>
void run_chain_topk_qsgd(const setup& s, const std::vector<T>& g) {
  const count_choice count = count_from(s.o[0], s.o[1], s.n);
  auto a = construct<topk<T, I>>("chain<topk, qsgd> topk", count.valid(),
                                 topk_options{.k = count.k, .ratio = count.ratio});
  const qsgd_options q{.levels = levels_from(s.o[2]), .bucket = bucket_from(s.o[3], s.o[4])};
  auto b = construct<qsgd<T>>("chain<topk, qsgd> qsgd", levels_valid(q.levels), q);
  if (!a || !b) return;
  chain<topk<T, I>, qsgd<T>> c(std::move(*a), std::move(*b));
  // QSGD sees the k kept values, which top-k has already checked for finiteness.
  two_steps("chain<topk, qsgd>", c, s, g, [&](std::span<const T> x) {
    const expect e = topk_expect(x, count, nullptr);
    return e == expect::success && huge<T>(facts_of(x), x.size()) ? expect::either : e;
  }, true);
}

template <class T, rescale Scale>
void run_chain_randomk_terngrad_as(const setup& s, const std::vector<T>& g) {
  using A = shared_randomk<T, Scale>;
  const count_choice count = count_from(s.o[0], s.o[1], s.n);
  auto a = construct<A>("chain<randomk, terngrad> randomk", count.valid(),
                        randomk_options{.k = count.k, .ratio = count.ratio});
  if (!a) return;
  chain<A, terngrad<T>> c(std::move(*a), terngrad<T>(terngrad_options{.bucket = bucket_from(s.o[3], s.o[4])}));
  // TernGrad sees k random values, rescaled by n / k: which ones is the key's business.
  two_steps("chain<randomk, terngrad>", c, s, g, [&](std::span<const T> x) {
    if (!count.fits(x.size())) return expect::failure;
    const facts f = facts_of(x);
    return f.all_finite && !huge<T>(f, x.size()) ? expect::success : expect::either;
  }, true);
}

template <class T>
void run_chain_randomk_terngrad(const setup& s, const std::vector<T>& g) {
  if (s.has(variant::no_rescale))
    run_chain_randomk_terngrad_as<T, rescale::none>(s, g);
  else
    run_chain_randomk_terngrad_as<T, rescale::unbiased>(s, g);
}

template <class T, rescale Scale>
void run_chain_block_fp16_as(const setup& s, const std::vector<T>& g) {
  using A = random_contiguous_block<T, Scale>;
  const count_choice count = count_from(s.o[0], s.o[1], s.n);
  auto a = construct<A>("chain<random_block, fp16_cast> block", count.valid(),
                        random_contiguous_block_options{.k = count.k, .ratio = count.ratio});
  if (!a) return;
  const A block = *a;
  chain<A, fp16_cast<T>> c(std::move(*a), fp16_cast<T>{});
  std::uint64_t step = 0;
  // The block's offset is public (offset_for), so the kept values are known
  // exactly: the cast refuses any of them at or beyond float16's range.
  two_steps("chain<random_block, fp16_cast>", c, s, g, [&](std::span<const T> x) {
    const rng_key key = s.key(step++);
    const std::size_t n = x.size();
    if (!count.fits(n)) return expect::failure;
    const std::size_t k = block.kept(n), offset = block.offset_for(key, n);
    const T factor = Scale == rescale::unbiased && k > 0
                         ? static_cast<T>(static_cast<double>(n) / static_cast<double>(k))
                         : T(1);
    const T limit = T(65520.0);  // float16's rounding-to-infinity threshold
    for (std::size_t j = 0; j < k; ++j) {
      const T v = Scale == rescale::unbiased ? x[(offset + j) % n] * factor : x[(offset + j) % n];
      if (!(v < limit && v > -limit)) return expect::failure;
    }
    return expect::success;
  }, true);
}

template <class T>
void run_chain_block_fp16(const setup& s, const std::vector<T>& g) {
  if (s.has(variant::no_rescale))
    run_chain_block_fp16_as<T, rescale::none>(s, g);
  else
    run_chain_block_fp16_as<T, rescale::unbiased>(s, g);
}

template <class T>
void run_chain_bernoulli_identity(const setup& s, const std::vector<T>& g) {
  using A = bernoulli_sparsifier<T, key_use::shared>;
  const double p = probability_from(s.o[0]);
  auto a = construct<A>("chain<bernoulli, identity> bernoulli", probability_valid(p), p);
  if (!a) return;
  chain<A, identity<T>> c(std::move(*a), identity<T>{});
  two_steps("chain<bernoulli, identity>", c, s, g,
            [](std::span<const T>) { return expect::success; }, false);
}

/// error_feedback compresses p = e + g, ef21 d = g - h, with the state zero
/// until a step has succeeded; after that, a gradient of another size than
/// the state's is refused. (A refused first step may allocate the state.)
template <class W, class Inner>
auto wrapper_expect(const W& w, Inner inner, bool subtract) {
  using T = typename W::value_type;
  return [&w, inner, subtract](std::span<const T> x, bool started) {
    const std::vector<T> state = state_of(w);
    if (started && state.size() != x.size()) return expect::failure;
    std::vector<T> p(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      const T e = started ? state[i] : T(0);
      p[i] = subtract ? x[i] - e : e + x[i];  // the wrappers' own arithmetic
    }
    return inner(std::span<const T>(p));
  };
}

template <class T>
void run_error_feedback_topk(const setup& s, const std::vector<T>& g) {
  const count_choice count = count_from(s.o[0], s.o[1], s.n);
  auto inner = construct<topk<T>>("error_feedback<topk>", count.valid(),
                                  topk_options{.k = count.k, .ratio = count.ratio});
  if (!inner) return;
  error_feedback<topk<T>> c(std::move(*inner));
  two_steps("error_feedback<topk>", c, s, g,
            wrapper_expect(c, [count](std::span<const T> p) { return topk_expect(p, count, nullptr); }, false),
            true);
}

template <class T>
void run_error_feedback_sign(const setup& s, const std::vector<T>& g) {
  error_feedback<sign<T>> c;
  two_steps("error_feedback<sign>", c, s, g,
            wrapper_expect(c, [](std::span<const T> p) { return one_bit_expect(p, nullptr); }, false),
            true);
}

template <class T>
void run_error_feedback_randomk(const setup& s, const std::vector<T>& g) {
  using R = randomk<T, key_use::per_worker, rescale::none>;
  const count_choice count = count_from(s.o[0], s.o[1], s.n);
  auto inner = construct<R>("error_feedback<randomk>", count.valid(),
                            randomk_options{.k = count.k, .ratio = count.ratio});
  if (!inner) return;
  error_feedback<R> c(std::move(*inner));
  two_steps("error_feedback<randomk>", c, s, g, wrapper_expect(c, [count](std::span<const T> p) {
              return count.fits(p.size()) ? expect::success : expect::failure;
            }, false), true);
}

template <class T>
void run_ef21_topk(const setup& s, const std::vector<T>& g) {
  const count_choice count = count_from(s.o[0], s.o[1], s.n);
  auto inner = construct<topk<T>>("ef21<topk>", count.valid(),
                                  topk_options{.k = count.k, .ratio = count.ratio});
  if (!inner) return;
  ef21<topk<T>> c(std::move(*inner));
  two_steps("ef21<topk>", c, s, g,
            wrapper_expect(c, [count](std::span<const T> d) { return topk_expect(d, count, nullptr); }, true),
            true);
}

template <class T>
void run_ef21_qsgd(const setup& s, const std::vector<T>& g) {
  const qsgd_options options{.levels = levels_from(s.o[0]), .bucket = bucket_from(s.o[1], s.o[2])};
  auto inner = construct<qsgd<T>>("ef21<qsgd>", levels_valid(options.levels), options);
  if (!inner) return;
  ef21<qsgd<T>> c(std::move(*inner));
  two_steps("ef21<qsgd>", c, s, g, wrapper_expect(c, [](std::span<const T> d) {
              return finite_sums<T>(facts_of(d), d.size());
            }, true), true);
}

template <class T>
void run(const setup& s, const std::vector<T>& g) {
  const bool wide = s.has(variant::wide_index);
  switch (s.compressor) {
    case 0: {
      identity<T> c;
      two_steps("identity", c, s, g, [](std::span<const T>) { return expect::success; }, true);
      break;
    }
    case 1:
    case 2: {
      // The cast refuses any value that is not finite or would round to infinity.
      auto cast_expect = [](T limit) {
        return [limit](std::span<const T> x) {
          for (T v : x)
            if (!(v < limit && v > -limit)) return expect::failure;
          return expect::success;
        };
      };
      // The documented thresholds: the smallest magnitudes that round to infinity.
      if (s.compressor == 1) {
        fp16_cast<T> c;
        two_steps("fp16_cast", c, s, g, cast_expect(T(65520.0)), true);
      } else {
        bf16_cast<T> c;
        two_steps("bf16_cast", c, s, g, cast_expect(T(0x1.ffp127)), true);
      }
      break;
    }
    case 3:
      if (wide) run_topk<T, std::uint64_t>(s, g);
      else run_topk<T, std::uint32_t>(s, g);
      break;
    case 4:
      if (wide) run_randomk<T, std::uint64_t>(s, g);
      else run_randomk<T, std::uint32_t>(s, g);
      break;
    case 5: run_bernoulli<T>(s, g); break;
    case 6: run_hard_threshold<T>(s, g); break;
    case 7: run_sampled_topk<T>(s, g); break;
    case 8: run_qsgd<T>(s, g); break;
    case 9: run_terngrad<T>(s, g); break;
    case 10:
      if constexpr (std::is_same_v<T, float>) run_natural(s, g);
      break;
    case 11: run_one_bit<sign, T>("sign", s, g); break;
    case 12: run_one_bit<onebit, T>("onebit", s, g); break;
    case 13: run_grid_round<T>(s, g); break;
    case 14: run_powersgd<T>(s, g); break;
    case 15: run_random_block<T>(s, g); break;
    case 16:
      if (wide) run_chain_topk_qsgd<T, std::uint64_t>(s, g);
      else run_chain_topk_qsgd<T, std::uint32_t>(s, g);
      break;
    case 17: run_chain_randomk_terngrad<T>(s, g); break;
    case 18: run_chain_block_fp16<T>(s, g); break;
    case 19: run_chain_bernoulli_identity<T>(s, g); break;
    case 20: run_error_feedback_topk<T>(s, g); break;
    case 21: run_error_feedback_sign<T>(s, g); break;
    case 22: run_error_feedback_randomk<T>(s, g); break;
    case 23: run_ef21_topk<T>(s, g); break;
    case 24: run_ef21_qsgd<T>(s, g); break;
    default: break;
  }
}

static_assert(rt::compressors.size() == 25, "run() handles 25 compressors; update both together");
constexpr std::size_t natural_index = 10;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz::cursor in(data, size);
  const setup s = read_setup(in);
  // natural is float only: it reads float values whatever the variant says.
  if (s.has(variant::use_double) && s.compressor != natural_index)
    run<double>(s, read_values<double>(in, s));
  else
    run<float>(s, read_values<float>(in, s));
  return 0;
}
