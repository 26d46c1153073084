// libFuzzer target: gcomp::decode(lowrank_payload<T>) (PowerSGD's message), then powersgd's decompress_add on what it accepts.
#include <cstddef>
#include <cstdint>
#include <span>

#include "common.hpp"
#include "wire_mutator.hpp"
#include "gcomp/compress/powersgd.hpp"
#include "gcomp/core/layout.hpp"

namespace {

using namespace gcomp;

template <class T>
lowrank_payload<T> sentinel() {
  lowrank_payload<T> p;
  p.dimension = 12;
  p.blocks = {{0, 2, 3, 1}, {6, 2, 3, 0}};
  p.data.assign(1 * (2 + 3) + 6, T(0.5));
  return p;
}

// lowrank_payload's documented shape, restated independently of the
// library's checks (in 128-bit arithmetic): blocks in increasing offset
// order, not overlapping, inside the dimension, extents > 0, rank <=
// min(rows, cols), and exactly the values the blocks need.
template <class T>
void check_shape(const char* name, const lowrank_payload<T>& m) {
  using u128 = unsigned __int128;
  u128 end = 0, values = 0;
  for (std::size_t b = 0; b < m.blocks.size(); ++b) {
    const auto& k = m.blocks[b];
    fuzz::check(k.rows > 0 && k.cols > 0, name, ": block ", b, " has an empty extent");
    fuzz::check(k.offset >= end, name, ": block ", b, " overlaps or precedes the one before");
    end = u128(k.offset) + u128(k.rows) * k.cols;
    fuzz::check(end <= m.dimension, name, ": block ", b, " runs past the dimension ", m.dimension);
    fuzz::check(k.rank <= k.rows && k.rank <= k.cols, name, ": block ", b, " has rank ", k.rank,
                " above its extents");
    values += k.rank == 0 ? u128(k.rows) * k.cols : u128(k.rank) * (u128(k.rows) + k.cols);
  }
  fuzz::check(values == m.data.size(), name, ": the blocks need other than the ", m.data.size(),
              " values decoded");
}

template <class T>
void try_decode(const char* name, std::span<const std::byte> bytes) {
  const auto s = sentinel<T>();
  lowrank_payload<T> into;
  // decompress_add reads the shapes from the message; the layout only plans compress.
  const powersgd<T> c(powersgd_options{.rank = 1}, layout{1});
  for (std::uint64_t dim : fuzz::dimensions_to_try(bytes))
    if (fuzz::decode_contract(name, bytes, s, dim, into)) {
      check_shape(name, into);
      // And the library's own check, which encode and decompress_add rely on.
      try {
        detail::check_lowrank("fuzz_lowrank", into, into.dimension);
      } catch (const gcomp::error& e) {
        fuzz::violation(name, ": decode accepted a message check_lowrank refuses: ", e.what());
      }
      fuzz::decompress_checks("powersgd", c, into);
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  try_decode<float>("lowrank<float>", bytes);
  try_decode<double>("lowrank<double>", bytes);
  return 0;
}
