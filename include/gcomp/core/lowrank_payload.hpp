// The low-rank payload PowerSGD sends: per layer either factors P (rows x rank) and Q (cols x rank) or the layer's values as they are.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

#include "gcomp/core/error.hpp"
#include "gcomp/core/wire.hpp"

namespace gcomp {

/// Blocks of a `dimension`-long gradient, in increasing offset order and not
/// overlapping (elements outside every block stand for zeros). Block b stands
/// for the rows x cols matrix at elements [offset, offset + rows * cols),
/// row-major:
///   rank > 0:  data holds P (rows x rank, row-major) then Q (cols x rank,
///              row-major), and the block is P Q^T; rank <= min(rows, cols);
///   rank == 0: data holds the rows * cols values themselves (a layer that
///              is not worth factoring, or has no 2-D shape).
/// data is the concatenation over blocks, in block order.
///
/// Wire body (kind lowrank, element = T, flags 0):
///   u64 block count B | B x (u64 offset, u64 rows, u64 cols, u64 rank) | the values
/// Decoding checks every shape against the dimension (overflow-safe) and the
/// number of values against the bytes present.
template <class T>
struct lowrank_payload {
  using value_type = T;

  struct block {
    std::uint64_t offset = 0;
    std::uint64_t rows = 0;
    std::uint64_t cols = 0;
    std::uint64_t rank = 0;
    friend bool operator==(const block&, const block&) = default;
  };

  std::uint64_t dimension = 0;
  std::vector<block> blocks;  // reused between steps
  std::vector<T> data;

  std::span<T> values() { return data; }
  std::span<const T> values() const { return data; }
  std::size_t size() const { return data.size(); }
};

namespace detail {

inline constexpr std::size_t lowrank_block_bytes = 32;

/// Values one block carries, or an error naming the block when its shape is
/// inconsistent: zero extents, rank above min(rows, cols), a matrix that
/// overruns the dimension, overlaps or precedes the previous block (`end`,
/// updated), or counts that overflow.
inline std::uint64_t lowrank_block_values(std::string_view where, std::size_t b,
                                          std::uint64_t offset, std::uint64_t rows,
                                          std::uint64_t cols, std::uint64_t rank,
                                          std::uint64_t dimension, std::uint64_t& end) {
  constexpr std::uint64_t max = std::numeric_limits<std::uint64_t>::max();
  if (rows == 0 || cols == 0)
    fail(where, "block ", b, " has shape ", rows, " x ", cols, "; extents must be > 0");
  if (rows > max / cols) fail(where, "block ", b, " shape ", rows, " x ", cols, " overflows");
  const std::uint64_t elements = rows * cols;
  if (offset < end)
    fail(where, "block ", b, " at offset ", offset, " overlaps or precedes the previous block, which ends at ", end);
  if (offset > dimension || elements > dimension - offset)
    fail(where, "block ", b, " (offset ", offset, ", ", rows, " x ", cols,
         ") runs past the dimension ", dimension);
  end = offset + elements;
  if (rank == 0) return elements;
  if (rank > rows || rank > cols)
    fail(where, "block ", b, " has rank ", rank, " above min(rows, cols) of ", rows, " x ", cols);
  if (rows > max - cols || rows + cols > max / rank)
    fail(where, "block ", b, " factor sizes overflow");
  return rank * (rows + cols);
}

/// Throws unless `message` is self-consistent for a `dimension`-long gradient;
/// returns the number of values its blocks need (== data.size()).
template <class T>
std::uint64_t check_lowrank(std::string_view where, const lowrank_payload<T>& message,
                            std::uint64_t dimension) {
  if (message.dimension != dimension)
    fail(where, "message dimension is ", message.dimension, " but ", dimension, " was expected");
  std::uint64_t end = 0, total = 0;
  for (std::size_t b = 0; b < message.blocks.size(); ++b) {
    const auto& k = message.blocks[b];
    const std::uint64_t v =
        lowrank_block_values(where, b, k.offset, k.rows, k.cols, k.rank, dimension, end);
    if (v > std::numeric_limits<std::uint64_t>::max() - total) fail(where, "value count overflows");
    total += v;
  }
  if (total != message.data.size())
    fail(where, "the blocks need ", total, " values but the message holds ", message.data.size());
  return total;
}

}  // namespace detail

template <class T>
std::size_t encoded_size(const lowrank_payload<T>& message) {
  return wire::header_bytes + 8 + message.blocks.size() * detail::lowrank_block_bytes +
         message.data.size() * sizeof(T);
}

template <class T>
void encode(const lowrank_payload<T>& message, std::vector<std::byte>& out) {
  detail::check_lowrank("gcomp::encode(lowrank_payload)", message, message.dimension);
  const std::uint64_t body =
      8 + message.blocks.size() * detail::lowrank_block_bytes + message.data.size() * sizeof(T);
  auto w = wire::begin(out, wire::kind::lowrank, wire::element_of<T>, 0, message.dimension, body);
  w.put(static_cast<std::uint64_t>(message.blocks.size()));
  for (const auto& b : message.blocks) {
    w.put(b.offset);
    w.put(b.rows);
    w.put(b.cols);
    w.put(b.rank);
  }
  w.put_array(std::span<const T>(message.data));
}

template <class T>
void decode(std::span<const std::byte> bytes, lowrank_payload<T>& into,
            std::uint64_t dimension = wire::any_dimension) {
  constexpr std::string_view where = "gcomp::decode(lowrank_payload)";
  wire::opened msg = wire::open(bytes, wire::kind::lowrank, wire::element_of<T>, dimension, where);
  if (msg.head.flags != 0) fail(where, "unknown flags ", unsigned(msg.head.flags));
  const auto count = msg.body.get<std::uint64_t>("block count");
  const auto shapes = msg.body.take_bytes(
      wire::checked_mul(where, "block count", count, detail::lowrank_block_bytes), "blocks");
  // Validate every shape before anything is written, reading straight from the bytes.
  auto field = [&](std::uint64_t b, unsigned f) {
    std::uint64_t v;
    std::memcpy(&v, shapes.data() + b * detail::lowrank_block_bytes + 8 * f, 8);
    return v;
  };
  std::uint64_t end = 0, total = 0;
  for (std::uint64_t b = 0; b < count; ++b) {
    const std::uint64_t v = detail::lowrank_block_values(
        where, static_cast<std::size_t>(b), field(b, 0), field(b, 1), field(b, 2), field(b, 3),
        msg.head.dimension, end);
    if (v > std::numeric_limits<std::uint64_t>::max() - total) fail(where, "value count overflows");
    total += v;
  }
  const auto values = msg.body.take<T>(total, "values");
  msg.body.finish();
  into.dimension = msg.head.dimension;
  into.blocks.resize(static_cast<std::size_t>(count));
  for (std::uint64_t b = 0; b < count; ++b)
    into.blocks[b] = {field(b, 0), field(b, 1), field(b, 2), field(b, 3)};
  into.data.resize(static_cast<std::size_t>(total));
  wire::copy_to(values, into.data.data());
}

}  // namespace gcomp
