// What every gcomp fuzz target shares: the abort that records a broken contract, a byte cursor over the fuzz input, bitwise payload comparison, and the decode and decompress_add contracts.
//
// The decode contract (the same as tests/wire_fuzz.hpp): decoding any bytes
// either throws gcomp::error and leaves the destination exactly as it was, or
// succeeds with a payload that re-encodes to exactly the bytes decoded. The
// decompress_add contract: a payload that does not fit `out` (another
// dimension) must throw, and a throw leaves `out` bit for bit as it was.
// Anything else thrown (std::bad_alloc, std::length_error, ...) escapes the
// target, and libFuzzer records it as a crash.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "gcomp/compress/chain.hpp"
#include "gcomp/compress/random_block.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/lowrank_payload.hpp"
#include "gcomp/core/message.hpp"
#include "gcomp/core/quantized_payload.hpp"
#include "gcomp/core/sparse_payload.hpp"
#include "gcomp/core/wire.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp::fuzz {

// ---------------------------------------------------------------------------
// Reporting

/// Prints what broke and aborts, so libFuzzer saves the input as a crash.
template <class... Parts>
[[noreturn]] void violation(const Parts&... parts) {
  const std::string text = gcomp::detail::concat(parts...);
  std::fprintf(stderr, "\n==gcomp-fuzz== contract violated: %s\n", text.c_str());
  std::fflush(stderr);
  std::abort();
}

/// Aborts with the message unless `ok`; the message is built only on failure.
template <class... Parts>
void check(bool ok, const Parts&... parts) {
  if (!ok) violation(parts...);
}

// ---------------------------------------------------------------------------
// Reading the fuzz input

/// Consumes the fuzz input from the front; past its end every read gives
/// zeros, so any input length is a valid input.
class cursor {
 public:
  cursor(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}

  template <class V>
    requires std::is_trivially_copyable_v<V>
  V get() {
    unsigned char raw[sizeof(V)] = {};
    const std::size_t have = std::min(sizeof(V), size_ - pos_);
    if (have != 0) std::memcpy(raw, data_ + pos_, have);
    pos_ += have;
    V value;
    std::memcpy(&value, raw, sizeof(V));
    return value;
  }

  std::uint8_t u8() { return get<std::uint8_t>(); }
  std::uint16_t u16() { return get<std::uint16_t>(); }

  std::size_t remaining() const { return size_ - pos_; }
  std::span<const std::byte> rest() const {
    return {reinterpret_cast<const std::byte*>(data_) + pos_, size_ - pos_};
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
};

// ---------------------------------------------------------------------------
// Bitwise comparison (NaN equals itself, -0 differs from +0)

template <class V>
bool same_bits(const std::vector<V>& a, const std::vector<V>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(V)) == 0);
}

template <class T>
bool same_payload(const dense_payload<T>& a, const dense_payload<T>& b) {
  return same_bits(a.data, b.data);
}
template <class T, class I>
bool same_payload(const sparse_payload<T, I>& a, const sparse_payload<T, I>& b) {
  return a.dimension == b.dimension && same_bits(a.indices, b.indices) && same_bits(a.data, b.data);
}
template <class T>
bool same_payload(const quantized_payload<T>& a, const quantized_payload<T>& b) {
  return a.dimension == b.dimension && a.bits == b.bits && a.bucket == b.bucket &&
         same_bits(a.scales, b.scales) && same_bits(a.words, b.words);
}
template <class T>
bool same_payload(const lowrank_payload<T>& a, const lowrank_payload<T>& b) {
  return a.dimension == b.dimension && a.blocks == b.blocks && same_bits(a.data, b.data);
}
template <class T>
bool same_payload(const block_payload<T>& a, const block_payload<T>& b) {
  return a.dimension == b.dimension && a.offset == b.offset && same_bits(a.data, b.data);
}
template <class PA, class PB>
bool same_payload(const chain_payload<PA, PB>& a, const chain_payload<PA, PB>& b) {
  return same_payload(a.support, b.support) && same_payload(a.values_message, b.values_message);
}

/// The dimension a payload stands for (the size `out` must have).
template <class T>
std::uint64_t dimension_of(const dense_payload<T>& p) {
  return p.size();
}
template <class P>
  requires requires(const P& p) { p.dimension; }
std::uint64_t dimension_of(const P& p) {
  return p.dimension;
}
template <class PA, class PB>
std::uint64_t dimension_of(const chain_payload<PA, PB>& p) {
  return p.support.dimension;
}

// ---------------------------------------------------------------------------
// The decode contract

/// The full form: encode(payload, out) and decode(bytes, payload, dimension).
struct full_form {
  template <class P>
  void encode(const P& p, std::vector<std::byte>& out) const {
    using gcomp::encode;
    encode(p, out);
  }
  template <class P>
  void decode(std::span<const std::byte> bytes, P& p, std::uint64_t dimension) const {
    using gcomp::decode;
    decode(bytes, p, dimension);
  }
};

/// The support-only form chain<A, B> sends for A.
struct support_form {
  template <class P>
  void encode(const P& p, std::vector<std::byte>& out) const {
    encode_support(p, out);
  }
  template <class P>
  void decode(std::span<const std::byte> bytes, P& p, std::uint64_t dimension) const {
    decode_support(bytes, p, dimension);
  }
};

/// Decodes `bytes` into a copy of `sentinel` (a valid payload) and checks the
/// contract. Returns whether the bytes were accepted; `into` then holds them.
template <class Payload, class Form = full_form>
bool decode_contract(const char* name, std::span<const std::byte> bytes, const Payload& sentinel,
                     std::uint64_t dimension, Payload& into, Form form = {}) {
  into = sentinel;
  std::vector<std::byte> before, after;
  form.encode(sentinel, before);
  try {
    form.decode(bytes, into, dimension);
  } catch (const gcomp::error&) {
    check(same_payload(into, sentinel), name, ": a failed decode changed its destination");
    form.encode(into, after);
    check(after == before, name, ": a failed decode changed its destination's encoding");
    return false;
  }
  try {
    form.encode(into, after);
  } catch (const gcomp::error& e) {
    violation(name, ": an accepted message cannot be encoded again: ", e.what());
  }
  check(after.size() == bytes.size() &&
            std::equal(after.begin(), after.end(), bytes.begin(), bytes.end()),
        name, ": an accepted message (", bytes.size(), " bytes) re-encodes to ", after.size(),
        " other bytes");
  if (dimension != wire::any_dimension)
    check(dimension_of(into) == dimension, name, ": accepted dimension ", dimension_of(into),
          " but ", dimension, " was expected");
  return true;
}

/// The dimensions a decoder is asked for: any, the header's own, and one off.
inline std::vector<std::uint64_t> dimensions_to_try(std::span<const std::byte> bytes) {
  std::vector<std::uint64_t> dims{wire::any_dimension};
  if (bytes.size() >= wire::header_bytes) {
    std::uint64_t d;
    std::memcpy(&d, bytes.data() + 8, 8);
    dims.push_back(d);
    dims.push_back(d ^ 1);
  }
  return dims;
}

/// Outputs larger than this are not allocated (a decoded header may claim 2^60).
inline constexpr std::uint64_t max_out = std::uint64_t{1} << 14;

/// The dimensions a receiver could pass for a payload whose decoder allocates
/// by the dimension rather than by the bytes present (the support-only block
/// message is 16 bytes for any k <= dimension): the receiver's own gradient
/// size, so one it could allocate. any_dimension only when the header's is such a size.
inline std::vector<std::uint64_t> receiver_dimensions(std::span<const std::byte> bytes) {
  std::vector<std::uint64_t> dims;
  for (std::uint64_t d : dimensions_to_try(bytes)) {
    if (d != wire::any_dimension && d < max_out) dims.push_back(d);
    if (d == wire::any_dimension && bytes.size() >= wire::header_bytes) {
      std::uint64_t claimed;
      std::memcpy(&claimed, bytes.data() + 8, 8);
      if (claimed < max_out) dims.push_back(d);
    }
  }
  return dims;
}

// ---------------------------------------------------------------------------
// The decompress_add contract

/// A fixed, irregular starting output, so an unwanted write shows.
template <class T>
std::vector<T> starting_output(std::size_t n) {
  std::vector<T> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<T>(0.25 * double(i % 13) - 1.0);
  return out;
}

/// Calls c.decompress_add on a payload decoded from untrusted bytes, with an
/// output of size n. Returns whether it succeeded. A throw must be
/// gcomp::error and leave out untouched; an output of another dimension than
/// the payload's must be refused.
template <class C, class Payload, class T = typename C::value_type>
bool decompress_contract(const char* name, const C& c, const Payload& message, std::size_t n,
                         T scale = T(1)) {
  std::vector<T> out = starting_output<T>(n);
  const std::vector<T> before = out;
  try {
    c.decompress_add(host_seq{}, message, std::span<T>(out), scale);
  } catch (const gcomp::error&) {
    check(same_bits(out, before), name, ": a failed decompress_add wrote to out");
    return false;
  }
  check(dimension_of(message) == n, name, ": decompress_add accepted a payload of dimension ",
        dimension_of(message), " into an output of size ", n);
  return true;
}

/// decompress_contract at the payload's own dimension (when it is small
/// enough to allocate) and at one more, which must be refused.
template <class C, class Payload>
void decompress_checks(const char* name, const C& c, const Payload& message) {
  const std::uint64_t n = dimension_of(message);
  if (n >= max_out) return;
  decompress_contract(name, c, message, static_cast<std::size_t>(n));
  decompress_contract(name, c, message, static_cast<std::size_t>(n + 1));
}

}  // namespace gcomp::fuzz
