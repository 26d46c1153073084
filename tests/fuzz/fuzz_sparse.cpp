// libFuzzer target: gcomp::decode and decode_support of sparse_payload<T, Index> (both index widths), then the sparse compressors' decompress_add on what they accept.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>

#include "common.hpp"
#include "wire_mutator.hpp"
#include "gcomp/compress/bernoulli.hpp"
#include "gcomp/compress/randomk.hpp"
#include "gcomp/compress/threshold_topk.hpp"
#include "gcomp/compress/topk.hpp"

namespace {

using namespace gcomp;

template <class T, class I>
sparse_payload<T, I> sentinel() {
  sparse_payload<T, I> p;
  p.dimension = 10;
  p.indices = {1, 7};
  p.data = {T(0.5), T(-4)};
  return p;
}

// Every sparse compressor scatters through the same checked path, but each
// adds its own checks (random-k: the count; Bernoulli: none) on top.
template <class T, class I>
void decompress_all(const sparse_payload<T, I>& m) {
  fuzz::decompress_checks("topk", topk<T, I>(topk_options{.k = 1}), m);
  fuzz::decompress_checks("hard_threshold", hard_threshold<T, I>(T(1)), m);
  fuzz::decompress_checks("bernoulli_sparsifier", bernoulli_sparsifier<T, key_use::per_worker, I>(0.5), m);
  const std::size_t k = std::max<std::size_t>(1, m.size());
  fuzz::decompress_checks("randomk", randomk<T, key_use::per_worker, rescale::unbiased, I>(randomk_options{.k = k}), m);
}

// The invariant sparse_payload documents and decode promises to enforce:
// indices strictly increasing and below the dimension, one value each.
template <class T, class I>
void check_invariant(const char* name, const sparse_payload<T, I>& m) {
  fuzz::check(m.indices.size() == m.data.size(), name, ": decoded ", m.indices.size(),
              " indices but ", m.data.size(), " values");
  for (std::size_t j = 0; j < m.indices.size(); ++j) {
    fuzz::check(m.indices[j] < m.dimension, name, ": decoded index ", m.indices[j],
                " is not below the dimension ", m.dimension);
    fuzz::check(j == 0 || m.indices[j] > m.indices[j - 1], name,
                ": decoded indices are not strictly increasing at position ", j);
  }
}

template <class T, class I>
void try_decode(const char* name, const char* support_name, std::span<const std::byte> bytes) {
  const auto s = sentinel<T, I>();
  sparse_payload<T, I> into;
  for (std::uint64_t dim : fuzz::dimensions_to_try(bytes)) {
    if (fuzz::decode_contract(name, bytes, s, dim, into)) {
      check_invariant(name, into);
      decompress_all(into);
    }
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
  try_decode<float, std::uint32_t>("sparse<float,u32>", "support<float,u32>", bytes);
  try_decode<float, std::uint64_t>("sparse<float,u64>", "support<float,u64>", bytes);
  try_decode<double, std::uint32_t>("sparse<double,u32>", "support<double,u32>", bytes);
  try_decode<double, std::uint64_t>("sparse<double,u64>", "support<double,u64>", bytes);
  return 0;
}
