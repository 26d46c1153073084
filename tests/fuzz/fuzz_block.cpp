// libFuzzer target: gcomp::decode and decode_support of block_payload<T> (random_contiguous_block's message), then its decompress_add on what they accept.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>

#include "common.hpp"
#include "wire_mutator.hpp"
#include "gcomp/compress/random_block.hpp"

namespace {

using namespace gcomp;

template <class T>
block_payload<T> sentinel() {
  block_payload<T> p;
  p.dimension = 8;
  p.offset = 6;  // wraps around the end
  p.data = {T(1), T(-2), T(3)};
  return p;
}

template <class T>
void decompress_all(const block_payload<T>& m) {
  const std::size_t k = std::max<std::size_t>(1, m.size());
  fuzz::decompress_checks("random_contiguous_block",
                          random_contiguous_block<T>(random_contiguous_block_options{.k = k}), m);
  fuzz::decompress_checks(
      "random_contiguous_block<none>",
      random_contiguous_block<T, rescale::none>(random_contiguous_block_options{.ratio = 0.5}), m);
}

// What decode promises of a block: k <= dimension, and the offset inside
// the vector (0 for an empty one).
template <class T>
void check_invariant(const char* name, const block_payload<T>& m) {
  fuzz::check(m.size() <= m.dimension, name, ": decoded k = ", m.size(), " exceeds the dimension ",
              m.dimension);
  fuzz::check(m.dimension == 0 ? m.offset == 0 : m.offset < m.dimension, name,
              ": decoded offset ", m.offset, " is out of range for dimension ", m.dimension);
}

template <class T>
void try_decode(const char* name, const char* support_name, std::span<const std::byte> bytes) {
  const auto s = sentinel<T>();
  block_payload<T> into;
  for (std::uint64_t dim : fuzz::dimensions_to_try(bytes))
    if (fuzz::decode_contract(name, bytes, s, dim, into)) {
      check_invariant(name, into);
      decompress_all(into);
    }
  // The support form carries no values: decode_support allocates k zeros for
  // any k up to the dimension, so only dimensions a receiver could hold are used.
  for (std::uint64_t dim : fuzz::receiver_dimensions(bytes)) {
    if (fuzz::decode_contract(support_name, bytes, s, dim, into, fuzz::support_form{})) {
      check_invariant(support_name, into);
      fuzz::check(std::all_of(into.data.begin(), into.data.end(), [](T v) { return v == T(0); }),
                  support_name, ": decode_support left nonzero values");
      decompress_all(into);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  try_decode<float>("block<float>", "block_support<float>", bytes);
  try_decode<double>("block<double>", "block_support<double>", bytes);
  return 0;
}
