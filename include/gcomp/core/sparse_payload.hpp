// The sparse payload (k indices and their values) that top-k, threshold and random-k compressors send.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include "gcomp/core/error.hpp"
#include "gcomp/core/wire.hpp"

namespace gcomp {

/// k (index, value) pairs standing for a dense vector of `dimension` values
/// that is zero elsewhere. Invariant: indices are strictly increasing and
/// below dimension (decode enforces it; compressors produce it), which also
/// rules out duplicates.
///
/// Wire body (kind sparse, element = T, flags bit 0 = 64-bit indices):
///   u64 k | k indices (4 or 8 bytes each) | k values
/// The support-only form (flags bit 1, element none) carries u64 k and the
/// indices only: chain<A, B> sends the support this way and B's message for
/// the values. Flags bit 2 is taken by compress/random_block.hpp's
/// block_payload (a contiguous block: u64 offset | u64 k | values), which
/// shares this kind; new sparse forms must pick another bit.
template <class T, class Index = std::uint32_t>
struct sparse_payload {
  static_assert(std::is_same_v<Index, std::uint32_t> || std::is_same_v<Index, std::uint64_t>,
                "sparse_payload indices are std::uint32_t or std::uint64_t");
  using value_type = T;
  using index_type = Index;

  std::uint64_t dimension = 0;
  std::vector<Index> indices;  // reused between steps
  std::vector<T> data;         // data[j] belongs at indices[j]

  std::span<T> values() { return data; }
  std::span<const T> values() const { return data; }
  std::size_t size() const { return data.size(); }
};

namespace detail {

inline constexpr std::uint8_t sparse_wide_indices = 1;
inline constexpr std::uint8_t sparse_support_only = 2;

template <class Index>
constexpr std::uint8_t sparse_index_flag() {
  return sizeof(Index) == 8 ? sparse_wide_indices : 0;
}

// Reads and validates the indices of a sparse body into a check pass that
// writes nothing, so a bad message leaves the destination untouched.
template <class Index>
std::span<const std::byte> take_sparse_indices(wire::reader& body, std::uint64_t dimension,
                                               std::uint64_t& k) {
  k = body.get<std::uint64_t>("k");
  if (k > dimension) fail(body.where(), "k = ", k, " exceeds the dimension ", dimension);
  const auto raw = body.take<Index>(k, "indices");
  std::uint64_t previous = 0;
  for (std::uint64_t j = 0; j < k; ++j) {
    Index index;
    std::memcpy(&index, raw.data() + j * sizeof(Index), sizeof(Index));
    if (index >= dimension)
      fail(body.where(), "index ", index, " at position ", j, " is out of range for dimension ",
           dimension);
    if (j > 0 && index <= previous)
      fail(body.where(), "indices must be strictly increasing, but index ", index,
           " at position ", j, " follows ", previous);
    previous = index;
  }
  return raw;
}

template <class T, class Index>
void check_sparse_shape(std::string_view where, const sparse_payload<T, Index>& message) {
  check_same_size(where, "message.indices", message.indices.size(), "message.data",
                  message.data.size());
}

}  // namespace detail

template <class T, class Index>
std::size_t encoded_size(const sparse_payload<T, Index>& message) {
  return wire::header_bytes + 8 + message.size() * (sizeof(Index) + sizeof(T));
}

template <class T, class Index>
void encode(const sparse_payload<T, Index>& message, std::vector<std::byte>& out) {
  detail::check_sparse_shape("gcomp::encode(sparse_payload)", message);
  const std::uint64_t k = message.size();
  auto w = wire::begin(out, wire::kind::sparse, wire::element_of<T>,
                       detail::sparse_index_flag<Index>(), message.dimension,
                       8 + k * (sizeof(Index) + sizeof(T)));
  w.put(k);
  w.put_array(std::span<const Index>(message.indices));
  w.put_array(std::span<const T>(message.data));
}

template <class T, class Index>
void decode(std::span<const std::byte> bytes, sparse_payload<T, Index>& into,
            std::uint64_t dimension = wire::any_dimension) {
  constexpr std::string_view where = "gcomp::decode(sparse_payload)";
  wire::opened msg = wire::open(bytes, wire::kind::sparse, wire::element_of<T>, dimension, where);
  if (msg.head.flags != detail::sparse_index_flag<Index>())
    fail(where, "flags ", unsigned(msg.head.flags), " do not match this payload's index width ",
         sizeof(Index), " (or mark a support-only message)");
  std::uint64_t k = 0;
  const auto indices = detail::take_sparse_indices<Index>(msg.body, msg.head.dimension, k);
  const auto values = msg.body.take<T>(k, "values");
  msg.body.finish();
  into.dimension = msg.head.dimension;
  into.indices.resize(static_cast<std::size_t>(k));
  into.data.resize(static_cast<std::size_t>(k));
  wire::copy_to(indices, into.indices.data());
  wire::copy_to(values, into.data.data());
}

/// Bytes of the support-only form (header, k, indices).
template <class T, class Index>
std::size_t encoded_support_size(const sparse_payload<T, Index>& message) {
  return wire::header_bytes + 8 + message.size() * sizeof(Index);
}

/// The support (dimension and indices) without the values.
template <class T, class Index>
void encode_support(const sparse_payload<T, Index>& message, std::vector<std::byte>& out) {
  detail::check_sparse_shape("gcomp::encode_support(sparse_payload)", message);
  const std::uint64_t k = message.size();
  auto w = wire::begin(out, wire::kind::sparse, wire::element::none,
                       detail::sparse_index_flag<Index>() | detail::sparse_support_only,
                       message.dimension, 8 + k * sizeof(Index));
  w.put(k);
  w.put_array(std::span<const Index>(message.indices));
}

/// Reads a support-only message: indices set, values resized to k and zeroed.
template <class T, class Index>
void decode_support(std::span<const std::byte> bytes, sparse_payload<T, Index>& into,
                    std::uint64_t dimension = wire::any_dimension) {
  constexpr std::string_view where = "gcomp::decode_support(sparse_payload)";
  wire::opened msg = wire::open(bytes, wire::kind::sparse, wire::element::none, dimension, where);
  if (msg.head.flags != (detail::sparse_index_flag<Index>() | detail::sparse_support_only))
    fail(where, "flags ", unsigned(msg.head.flags), " do not mark a support-only message with ",
         sizeof(Index), "-byte indices");
  std::uint64_t k = 0;
  const auto indices = detail::take_sparse_indices<Index>(msg.body, msg.head.dimension, k);
  msg.body.finish();
  into.dimension = msg.head.dimension;
  into.indices.resize(static_cast<std::size_t>(k));
  into.data.assign(static_cast<std::size_t>(k), T(0));
  wire::copy_to(indices, into.indices.data());
}

}  // namespace gcomp
