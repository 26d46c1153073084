// libFuzzer target: gcomp::decode(quantized_payload<T>), then the decompress_add of every quantizing compressor (QSGD, TernGrad, natural, sign, 1-bit, grid rounding), built to match what was decoded so its own checks are reached.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>

#include "common.hpp"
#include "wire_mutator.hpp"
#include "gcomp/compress/grid_round.hpp"
#include "gcomp/compress/natural.hpp"
#include "gcomp/compress/onebit.hpp"
#include "gcomp/compress/qsgd.hpp"
#include "gcomp/compress/sign.hpp"
#include "gcomp/compress/terngrad.hpp"
#include "gcomp/core/layout.hpp"

namespace {

using namespace gcomp;

template <class T>
quantized_payload<T> sentinel() {
  quantized_payload<T> p;
  p.dimension = 5;
  p.bits = 3;
  p.bucket = 2;
  p.scales = {T(1), T(2), T(3)};
  p.words = {0x1234};  // 15 bits of codes; encode sends only those
  return p;
}

// Two layers with a gap between them, so sign and 1-bit check the gap bits.
layout gapped_layout(std::size_t n) {
  return layout::from_layers({{"a", 1, n / 2 - 1, {}}, {"b", n / 2 + 1, n - n / 2 - 1, {}}},
                             gaps::allowed);
}

template <class T>
void decompress_all(const quantized_payload<T>& m) {
  // Compressors configured like the message, so the checks past the shape run.
  const unsigned level_bits = m.bits - 1u;
  if (level_bits >= 1 && level_bits <= 15)
    fuzz::decompress_checks("qsgd", qsgd<T>(qsgd_options{.levels = (1u << level_bits) - 1, .bucket = m.bucket}), m);
  fuzz::decompress_checks("terngrad", terngrad<T>(terngrad_options{.bucket = m.bucket}), m);
  if constexpr (std::is_same_v<T, float>) fuzz::decompress_checks("natural", natural<float>{}, m);
  fuzz::decompress_checks("sign", sign<T>{}, m);
  fuzz::decompress_checks("onebit", onebit<T>{}, m);
  if (m.dimension >= 4 && m.dimension < fuzz::max_out) {
    const layout lay = gapped_layout(static_cast<std::size_t>(m.dimension));
    fuzz::decompress_checks("sign<layout>", sign<T>(lay), m);
    fuzz::decompress_checks("onebit<layout>", onebit<T>(lay), m);
  }
  const unsigned grid_bits = std::clamp<unsigned>(m.bits, 2, 16);
  double spacing = 1.0;
  if (!m.scales.empty() && std::isnormal(m.scales[0]) && m.scales[0] > T(0))
    spacing = static_cast<double>(m.scales[0]);
  fuzz::decompress_checks("grid_round", grid_round<T>(grid_round_options{.spacing = spacing, .bits = grid_bits}), m);
}

template <class T>
void try_decode(const char* name, std::span<const std::byte> bytes) {
  const auto s = sentinel<T>();
  quantized_payload<T> into;
  for (std::uint64_t dim : fuzz::dimensions_to_try(bytes))
    if (fuzz::decode_contract(name, bytes, s, dim, into)) {
      fuzz::check(into.bits >= 1 && into.bits <= quantized::max_bits, name, ": accepted bits = ",
                  unsigned(into.bits));
      fuzz::check(into.words.size() == quantized::word_count(into.size(), into.bits), name,
                  ": accepted ", into.words.size(), " words for ", into.dimension, " codes");
      decompress_all(into);
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  try_decode<float>("quantized<float>", bytes);
  try_decode<double>("quantized<double>", bytes);
  return 0;
}
