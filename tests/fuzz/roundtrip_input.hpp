// The byte layout of fuzz_roundtrip's input, shared by the target and the seed-corpus generator so that seeds mean what the target reads.
//
//   offset  field
//   0       compressor: index into `compressors` below (mod its size)
//   1       variant bits (see `variant`)
//   2..3    v, little-endian: the gradient's length is n = (v & 0x1fff) >> (v >> 13),
//           so n reaches max_n but small lengths are common (v = n for n < 8192)
//   4       value mode (see `value_mode`)
//   5       exponent e (int8) of the scaled values: value = int8 * 2^e
//   6       decompress_add's scale (an index into the target's table)
//   7       key byte: seed, step and worker of the rng_key
//   8..15   eight option bytes; each compressor documents which it reads
//   16..    the values, as the value mode says
// Bytes past the end of the input read as zero, so every input is valid.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace gcomp::fuzz::roundtrip {

inline constexpr std::size_t header_bytes = 16;
inline constexpr std::size_t option_bytes = 8;
inline constexpr std::size_t max_n = 8191;  // two of the reductions' 4096-element blocks

/// The gradient length bytes 2..3 stand for.
constexpr std::size_t length_from(std::uint16_t v) { return (v & 0x1fffu) >> (v >> 13); }

/// Byte 1: independent switches; a compressor ignores those it has no use for.
namespace variant {
inline constexpr std::uint8_t use_double = 1;     // T = double (else float)
inline constexpr std::uint8_t wide_index = 2;     // 64-bit sparse indices
inline constexpr std::uint8_t shared_key = 4;     // key_use::shared
inline constexpr std::uint8_t no_rescale = 8;     // rescale::none
inline constexpr std::uint8_t with_layout = 16;   // per-layer form, when the compressor has one
inline constexpr std::uint8_t layout_gaps = 32;   // that layout leaves gaps between its layers
inline constexpr std::uint8_t resize_second = 64; // the second step compresses a shorter gradient
}  // namespace variant

/// Byte 4 (mod 4): how the values after the header are read.
enum class value_mode : std::uint8_t {
  raw = 0,      // sizeof(T) bytes each, the bit pattern as it is (NaN, Inf, subnormals)
  scaled = 1,   // one byte each: int8 * 2^e
  special = 2,  // one byte each: an index into a table of edge values
  mixed = 3,    // one byte each: scaled below 0xf0, special from 0xf0 on
};

/// The compressors, in the order byte 0 selects them.
inline constexpr std::array<std::string_view, 25> compressors = {
    "identity",           "fp16_cast",          "bf16_cast",
    "topk",               "randomk",            "bernoulli",
    "hard_threshold",     "sampled_topk",       "qsgd",
    "terngrad",           "natural",            "sign",
    "onebit",             "grid_round",         "powersgd",
    "random_block",       "chain_topk_qsgd",    "chain_randomk_terngrad",
    "chain_block_fp16",   "chain_bernoulli_identity", "error_feedback_topk",
    "error_feedback_sign", "error_feedback_randomk", "ef21_topk",
    "ef21_qsgd",
};

}  // namespace gcomp::fuzz::roundtrip
