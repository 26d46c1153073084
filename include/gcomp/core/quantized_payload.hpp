// The quantized payload (packed b-bit codes plus scales; with 1 bit, a bitmask plus scales) and its wire form.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>
#include <vector>

#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/wire.hpp"

namespace gcomp {

/// `dimension` codes of `bits` bits each, packed into a little-endian bit
/// stream (code i occupies bits [i*bits, (i+1)*bits) of the stream, i.e. of
/// words[i*bits/64] and possibly the next word), plus scales. What a code and
/// a scale mean is the compressor's business (QSGD: sign and level with a norm
/// per bucket; TernGrad: {-1, 0, +1} with a max per bucket; sign: one bit with
/// one scale per layer).
///
/// Scales group the elements: with bucket > 0, scale j covers elements
/// [j*bucket, (j+1)*bucket) and there are exactly ceil(dimension / bucket)
/// of them; with bucket == 0 the groups are fixed by the compressor (e.g. the
/// layers of its layout), which checks the count itself.
///
/// Wire body (kind quantized, element = T of the scales, flags 0):
///   u8 bits | u64 bucket | u64 number of scales | the scales |
///   packed_bytes(dimension, bits) bytes of codes (trailing bits zero)
template <class T>
struct quantized_payload {
  using value_type = T;

  std::uint64_t dimension = 0;
  std::uint8_t bits = 0;      // 1..32
  std::uint64_t bucket = 0;   // elements per scale; 0: groups defined by the compressor
  std::vector<T> scales;      // reused between steps
  std::vector<std::uint64_t> words;  // the packed codes; words.size() == word_count(dimension, bits)

  std::size_t size() const { return static_cast<std::size_t>(dimension); }
};

namespace quantized {

inline constexpr unsigned max_bits = 32;

/// 64-bit words holding n codes of `bits` bits.
GCOMP_HD constexpr std::size_t word_count(std::size_t n, unsigned bits) {
  return (n / 64) * bits + ((n % 64) * bits + 63) / 64;
}

/// Number of scales a bucketed payload of n elements has.
/// Written without n + bucket - 1, which wraps for a bucket near 2^64 (a
/// decoded bucket is untrusted; the fuzzer found the decoder and encoder
/// disagreeing on it).
GCOMP_HD constexpr std::size_t bucket_count(std::size_t n, std::size_t bucket) {
  return bucket == 0 ? 0 : n / bucket + (n % bucket != 0 ? 1 : 0);
}

/// Code i of the stream.
GCOMP_HD inline std::uint32_t read_code(const std::uint64_t* words, std::size_t i, unsigned bits) {
  const std::size_t bit = i * bits;
  const std::size_t w = bit / 64;
  const unsigned shift = static_cast<unsigned>(bit % 64);
  std::uint64_t v = words[w] >> shift;
  if (shift + bits > 64) v |= words[w + 1] << (64 - shift);
  return static_cast<std::uint32_t>(v & ((std::uint64_t(1) << bits) - 1));
}

/// Word w of the stream of n codes, assembled from code(i) (which must return
/// a value below 2^bits) for every code overlapping the word. Writing whole
/// words lets threads pack in parallel without sharing a word; a code that
/// straddles two words is evaluated for both, so code(i) must be a pure
/// function of i (counter-based randomness is).
// Host code passes host-only lambdas here; tell nvcc not to check the callees.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <class Code>
GCOMP_HD std::uint64_t assemble_word(std::size_t w, std::size_t n, unsigned bits, Code code) {
  const std::size_t first_bit = w * 64;
  std::size_t i = first_bit / bits;
  std::uint64_t word = 0;
  for (; i < n; ++i) {
    const std::size_t bit = i * bits;
    if (bit >= first_bit + 64) break;
    const std::uint64_t c = code(i);
    if (bit >= first_bit)
      word |= c << (bit - first_bit);
    else
      word |= c >> (first_bit - bit);
  }
  return word;
}

}  // namespace quantized

template <class T>
std::size_t encoded_size(const quantized_payload<T>& message) {
  return wire::header_bytes + 1 + 8 + 8 + message.scales.size() * sizeof(T) +
         wire::packed_bytes(message.size(), message.bits);
}

namespace detail {

template <class T>
void check_quantized_shape(std::string_view where, const quantized_payload<T>& m) {
  if (m.bits < 1 || m.bits > quantized::max_bits)
    fail(where, "message.bits = ", unsigned(m.bits), " is outside [1, ", quantized::max_bits, "]");
  check_same_size(where, "message.words", m.words.size(), "word_count(dimension, bits)",
                  quantized::word_count(m.size(), m.bits));
  if (m.bucket != 0)
    check_same_size(where, "message.scales", m.scales.size(), "ceil(dimension / bucket)",
                    quantized::bucket_count(m.size(), m.bucket));
}

}  // namespace detail

template <class T>
void encode(const quantized_payload<T>& message, std::vector<std::byte>& out) {
  detail::check_quantized_shape("gcomp::encode(quantized_payload)", message);
  const std::size_t code_bytes = wire::packed_bytes(message.size(), message.bits);
  auto w = wire::begin(out, wire::kind::quantized, wire::element_of<T>, 0, message.dimension,
                       encoded_size(message) - wire::header_bytes);
  w.put(message.bits);
  w.put(message.bucket);
  w.put(static_cast<std::uint64_t>(message.scales.size()));
  w.put_array(std::span<const T>(message.scales));
  // Little-endian words: the stream's first code_bytes bytes are the codes.
  if (code_bytes != 0) {
    std::byte* at = w.grow(code_bytes);
    std::memcpy(at, message.words.data(), code_bytes);
    // Bits past the last code are sent as zero whatever the words hold there.
    const unsigned tail_bits = static_cast<unsigned>((message.size() * message.bits) % 8);
    if (tail_bits != 0) at[code_bytes - 1] &= static_cast<std::byte>((1u << tail_bits) - 1);
  }
}

template <class T>
void decode(std::span<const std::byte> bytes, quantized_payload<T>& into,
            std::uint64_t dimension = wire::any_dimension) {
  constexpr std::string_view where = "gcomp::decode(quantized_payload)";
  wire::opened msg =
      wire::open(bytes, wire::kind::quantized, wire::element_of<T>, dimension, where);
  if (msg.head.flags != 0) fail(where, "unknown flags ", unsigned(msg.head.flags));
  const std::uint64_t n = msg.head.dimension;
  const auto bits = msg.body.get<std::uint8_t>("bits");
  if (bits < 1 || bits > quantized::max_bits)
    fail(where, "bits = ", unsigned(bits), " is outside [1, ", quantized::max_bits, "]");
  const auto bucket = msg.body.get<std::uint64_t>("bucket");
  const auto n_scales = msg.body.get<std::uint64_t>("scales");
  if (bucket != 0 && n_scales != n / bucket + (n % bucket != 0))
    fail(where, "scales = ", n_scales, " but dimension ", n, " in buckets of ", bucket, " needs ",
         n / bucket + (n % bucket != 0));
  const auto scales = msg.body.take<T>(n_scales, "scale values");
  // n * bits could overflow for a hostile dimension: bound n by the bytes present first.
  if (n > 8 * msg.body.remaining())
    fail(where, "message truncated: ", n, " codes of ", unsigned(bits), " bits need more than the ",
         msg.body.remaining(), " bytes left");
  const std::size_t code_bytes = wire::packed_bytes(static_cast<std::size_t>(n), bits);
  const auto codes = msg.body.take_bytes(code_bytes, "codes");
  msg.body.finish();
  const unsigned tail_bits = static_cast<unsigned>((n * bits) % 8);
  if (tail_bits != 0 && (std::to_integer<unsigned>(codes[code_bytes - 1]) >> tail_bits) != 0)
    fail(where, "the unused bits after the last code are not zero");
  into.dimension = n;
  into.bits = bits;
  into.bucket = bucket;
  into.scales.resize(static_cast<std::size_t>(n_scales));
  wire::copy_to(scales, into.scales.data());
  into.words.assign(quantized::word_count(static_cast<std::size_t>(n), bits), 0);
  if (code_bytes != 0) std::memcpy(into.words.data(), codes.data(), code_bytes);
}

}  // namespace gcomp
