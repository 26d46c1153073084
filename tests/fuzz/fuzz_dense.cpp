// libFuzzer target: gcomp::decode(dense_payload<T>) for every element type, then identity's and the casts' decompress_add on what it accepts.
#include <cstddef>
#include <cstdint>
#include <span>

#include "common.hpp"
#include "wire_mutator.hpp"
#include "gcomp/compress/cast.hpp"
#include "gcomp/compress/identity.hpp"
#include "gcomp/core/half.hpp"

namespace {

using namespace gcomp;

template <class T>
dense_payload<T> sentinel() {
  dense_payload<T> p;
  p.data = {T(1), T(2), T(3)};
  return p;
}

template <class H>
dense_payload<H> half_sentinel() {
  dense_payload<H> p;
  p.data = {H{0x3c00}, H{0xc000}};
  return p;
}

// Decodes the bytes as dense_payload<V> at every dimension of interest and
// hands what is accepted to `use`.
template <class V, class Use>
void try_decode(const char* name, std::span<const std::byte> bytes, const dense_payload<V>& s,
                Use use) {
  dense_payload<V> into;
  for (std::uint64_t dim : fuzz::dimensions_to_try(bytes))
    if (fuzz::decode_contract(name, bytes, s, dim, into)) use(into);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  try_decode("dense<float>", bytes, sentinel<float>(), [](const dense_payload<float>& m) {
    fuzz::decompress_checks("identity<float>", identity<float>{}, m);
  });
  try_decode("dense<double>", bytes, sentinel<double>(), [](const dense_payload<double>& m) {
    fuzz::decompress_checks("identity<double>", identity<double>{}, m);
  });
  try_decode("dense<float16>", bytes, half_sentinel<float16>(), [](const dense_payload<float16>& m) {
    fuzz::decompress_checks("fp16_cast<float>", fp16_cast<float>{}, m);
    fuzz::decompress_checks("fp16_cast<double>", fp16_cast<double>{}, m);
  });
  try_decode("dense<bfloat16>", bytes, half_sentinel<bfloat16>(),
             [](const dense_payload<bfloat16>& m) {
               fuzz::decompress_checks("bf16_cast<float>", bf16_cast<float>{}, m);
             });
  try_decode("dense<uint8>", bytes, sentinel<std::uint8_t>(), [](const dense_payload<std::uint8_t>&) {});
  return 0;
}
