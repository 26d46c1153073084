// The sign, 1-bit SGD and cast compressors under a device policy (cuda_par, thrust_device): group sums in the fixed reduction order, sign bits and 16-bit values computed on the device, so payloads are bitwise the host's.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include "gcomp/compress/detail/quant_device.hpp"  // quant_min_index
#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/half.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/core/nonfinite.hpp"
#include "gcomp/core/quantized_payload.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/detail/reduce_order.hpp"
#include "gcomp/exec/detail/unfused.hpp"

// How the device path is built (the policy's generic primitives only, found by
// ADL, so host-only builds never see CUDA and CI runs this code on Thrust's
// OpenMP system):
//  - sign / onebit, whole buffer: one transform_reduce whose value holds all
//    the sums of the compressor (component by component, so each is bitwise
//    a separate reduction in the order of exec/detail/reduce_order.hpp, which
//    is what the host's fused pass computes); per layer: one reduce_per_layer
//    per sum, as on the host. The sums come back to the host, which checks
//    them, computes the scales and fills the message as the host path does.
//  - a non-finite sum: first_nonfinite over the group, one value copied back,
//    the host's message; nothing is packed and the message is untouched.
//  - the bits: one thread per 64-bit word, copied to the host staging words;
//    gap bits are cleared there (the gaps are host ranges).
//  - cast: one min-index reduction finds the first element out of range (the
//    only host wait before the conversion), one thread per element converts
//    with half_format<H>::from (what the host's loop and F16C compute), and
//    the 16-bit values are copied to the host staging vector.
//  - decompress_add: the message's words or values are uploaded to device
//    scratch and one thread per element adds the same expression as the host
//    (the compressors' GCOMP_HD functors, products and sums unfused).
// Messages stay host payloads (quantized_payload, dense_payload): the
// compressed bytes cross to the host once per step, as for the quantizers.

namespace gcomp::detail {

/// The Sums sums of one group, reduced together.
template <class Acc, std::size_t Sums>
struct sign_sums {
  Acc v[Sums];
};

/// Adds sign_sums component by component (the same additions, in the same
/// order, as Sums separate reductions).
template <class Acc, std::size_t Sums>
struct sign_add_sums {
  GCOMP_HD sign_sums<Acc, Sums> operator()(sign_sums<Acc, Sums> a, const sign_sums<Acc, Sums>& b) const {
    for (std::size_t s = 0; s < Sums; ++s) a.v[s] = add_unfused(a.v[s], b.v[s]);
    return a;
  }
};

/// Element i's terms: v[s] = term(s, x[i]).
template <class Acc, std::size_t Sums, class T, class Term>
struct sign_terms_of {
  const T* x;
  Term term;
  GCOMP_HD sign_sums<Acc, Sums> operator()(std::size_t i) const {
    sign_sums<Acc, Sums> r;
    const T v = x[i];
    for (std::size_t s = 0; s < Sums; ++s) r.v[s] = term(s, v);
    return r;
  }
};

/// Element i's term of sum s alone (for reduce_per_layer).
template <class Acc, class T, class Term>
struct sign_term_of {
  const T* x;
  std::size_t s;
  Term term;
  GCOMP_HD Acc operator()(std::size_t i) const { return term(s, x[i]); }
};

struct sign_add {
  template <class Acc>
  GCOMP_HD Acc operator()(Acc a, Acc b) const {
    return add_unfused(a, b);
  }
};

/// For g in the policy's memory: sums[s * count + d] = the sum over i in
/// group d of term(s, g[i]), in the fixed reduction order, with count = 1 and
/// the group [0, n) when lay is null, else the layers of *lay. Host results.
/// Term is a GCOMP_HD functor term(std::size_t s, T x) -> Acc.
template <std::size_t Sums, class Acc, class Policy, class T, class Term>
void sign_device_sums(const Policy& policy, const layout* lay, std::span<const T> g, Acc* sums,
                      Term term) {
  static_assert(std::is_same_v<Acc, float> || std::is_same_v<Acc, double>,
                "the device path of sign/onebit sums in float or double");
  if (lay == nullptr) {
    const sign_sums<Acc, Sums> zero{};
    const sign_sums<Acc, Sums> total =
        transform_reduce(policy, g.size(), zero, sign_add_sums<Acc, Sums>{},
                         sign_terms_of<Acc, Sums, T, Term>{g.data(), term});
    for (std::size_t s = 0; s < Sums; ++s) sums[s] = total.v[s];
    return;
  }
  const std::size_t count = lay->num_layers();
  for (std::size_t s = 0; s < Sums; ++s)
    reduce_per_layer(policy, *lay, std::span<Acc>(sums + s * count, count), Acc(0), sign_add{},
                     sign_term_of<Acc, T, Term>{g.data(), s, term});
}

/// sign_impl::throw_first_non_finite for g in the policy's memory: throws
/// naming the first i in [begin, end) with a non-finite g[i], if there is one.
template <class Policy, class T>
void sign_device_throw_first_non_finite(const Policy& policy, std::string_view where,
                                        std::span<const T> g, std::size_t begin, std::size_t end) {
  const std::size_t k = first_nonfinite(policy, g.subspan(begin, end - begin));
  if (k == end - begin) return;
  T value{};
  copy_to_host(policy, g.subspan(begin + k, 1), std::span<T>(&value, 1));
  fail(where, "gradient[", begin + k, "] = ", value, " is not finite");
}

/// Word w of the 1-bit stream of x[0, n): bit j = (x[64 w + j] >= 0)
/// (-0 counts as non-negative), 0 past n.
template <class T>
struct ge_zero_packer {
  const T* x;
  std::size_t n;
  std::uint64_t* words;
  GCOMP_HD void operator()(std::size_t w) const {
    const std::size_t begin = 64 * w;
    const std::size_t count = n - begin < 64 ? n - begin : 64;
    std::uint64_t word = 0;
    for (std::size_t j = 0; j < count; ++j) word |= std::uint64_t(x[begin + j] >= T(0)) << j;
    words[w] = word;
  }
};

/// words (host memory, word_count(g.size(), 1) of them) = the 1-bit stream of
/// g (the policy's memory), computed in scratch on the device.
template <class Policy, class T>
void sign_device_pack(const Policy& policy, std::span<const T> g,
                      policy_buffer<std::uint64_t>& scratch, std::span<std::uint64_t> words,
                      std::string_view where) {
  const std::size_t count = quantized::word_count(g.size(), 1);
  check_same_size(where, "words", words.size(), "word_count(n, 1)", count);
  scratch.resize(policy, count, where);
  for_each_index(policy, count, ge_zero_packer<T>{g.data(), g.size(), scratch.data()});
  copy_to_host(policy, std::span<const std::uint64_t>(scratch.data(), count), words);
}

/// Uploads a checked message's words to scratch (the policy's memory).
template <class Policy>
const std::uint64_t* sign_device_upload_words(const Policy& policy,
                                              const std::vector<std::uint64_t>& words,
                                              policy_buffer<std::uint64_t>& scratch,
                                              std::string_view where) {
  scratch.resize(policy, words.size(), where);
  copy_from_host(policy, std::span<const std::uint64_t>(words), scratch.span());
  return scratch.data();
}

/// out[i] += bit_i ? up : down for i in [offset, offset + size); words and
/// out in the policy's memory.
template <class T>
struct sign_level_adder {
  const std::uint64_t* words;
  T* out;
  std::size_t offset;
  T up;
  T down;
  GCOMP_HD void operator()(std::size_t k) const {
    const std::size_t i = offset + k;
    const bool bit = (words[i / 64] >> (i % 64)) & 1u;
    out[i] = add_unfused(out[i], bit ? up : down);
  }
};

/// The first i with !(g[i] < limit && g[i] > -limit) (NaN, +-inf and, for a
/// finite limit, values that would round past it), or g.size(); g in the
/// policy's memory.
template <class Policy, class T>
std::size_t first_out_of_range(const Policy& policy, std::span<const T> g, T limit) {
  const T* x = g.data();
  const std::size_t n = g.size();
  return transform_reduce(policy, n, n, quant_min_index{}, [=] GCOMP_HD(std::size_t i) {
    const T v = x[i];
    return (v < limit && v > -limit) ? n : i;
  });
}

/// out (host) = the values of g (the policy's memory) converted to H with
/// half_format<H>::from, computed in scratch on the device.
template <class H, class Policy, class T>
void cast_device_convert(const Policy& policy, std::span<const T> g, policy_buffer<H>& scratch,
                         std::vector<H>& out, std::string_view where) {
  const std::size_t n = g.size();
  scratch.resize(policy, n, where);
  const T* x = g.data();
  H* h = scratch.data();
  for_each_index(policy, n, [=] GCOMP_HD(std::size_t i) { h[i] = half_format<H>::from(x[i]); });
  out.resize(n);
  copy_to_host(policy, std::span<const H>(h, n), std::span<H>(out));
}

/// out[i] = add(out[i], values[i]) for out in the policy's memory and host
/// values (already checked against out's size), uploaded to scratch.
template <class Policy, class T, class H, class Add>
void cast_device_decompress_add(const Policy& policy, const std::vector<H>& values, std::span<T> out,
                                Add add, policy_buffer<H>& scratch, std::string_view where) {
  const std::size_t n = out.size();
  scratch.resize(policy, n, where);
  copy_from_host(policy, std::span<const H>(values), scratch.span());
  const H* v = scratch.data();
  T* o = out.data();
  for_each_index(policy, n, [=] GCOMP_HD(std::size_t i) { o[i] = add(o[i], v[i]); });
}

}  // namespace gcomp::detail
