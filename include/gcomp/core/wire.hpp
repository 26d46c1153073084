// The wire format: a small versioned header and bounds-checked byte readers and writers for payloads.
//
// Every payload encodes to one message:
//
//   offset size  field
//   0      4     magic "GCMP"
//   4      1     version (1)
//   5      1     payload kind (wire::kind)
//   6      1     element type of the values (wire::element)
//   7      1     flags (meaning per kind)
//   8      8     dimension: length of the dense gradient the payload stands for
//   16     8     body bytes that follow the header
//   24     ...   body (layout per kind, documented beside each payload type)
//
// All integers and floats are little-endian (the only byte order gcomp builds
// for; a static_assert says so). Decoding treats the bytes as untrusted: every
// count is checked against the bytes that are really there (with overflow-safe
// arithmetic) and against the destination, and anything malformed throws a
// gcomp::error naming the field and its value; nothing is read or written out
// of bounds.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include "gcomp/core/error.hpp"

namespace gcomp {

static_assert(std::endian::native == std::endian::little,
              "gcomp's wire format is little-endian and only little-endian hosts are supported");

namespace wire {

inline constexpr std::uint32_t magic = 0x504D4347u;  // "GCMP" in memory order
inline constexpr std::uint8_t version = 1;
inline constexpr std::size_t header_bytes = 24;

/// What a message carries; the body layout depends on it.
enum class kind : std::uint8_t {
  dense = 1,      // n values
  sparse = 2,     // k (index, value) pairs
  quantized = 3,  // packed b-bit codes plus scales (1 bit: bitmask + scale)
  lowrank = 4,    // low-rank factors per layer (PowerSGD)
  chained = 5,    // a chain<A, B> message: A's support, then B's message
};

/// The element type of a payload's values.
enum class element : std::uint8_t {
  none = 0,  // the payload has no values of its own (e.g. a bitmask)
  f32 = 1,
  f64 = 2,
  f16 = 3,
  bf16 = 4,
  u8 = 5,
  u16 = 6,
  u32 = 7,
  u64 = 8,
};

/// wire_element<T>::value: the element code of T. Payload headers specialize it
/// for their own value types (half.hpp does for float16 and bfloat16).
template <class T>
struct wire_element;
template <>
struct wire_element<float> : std::integral_constant<element, element::f32> {};
template <>
struct wire_element<double> : std::integral_constant<element, element::f64> {};
template <>
struct wire_element<std::uint8_t> : std::integral_constant<element, element::u8> {};
template <>
struct wire_element<std::uint16_t> : std::integral_constant<element, element::u16> {};
template <>
struct wire_element<std::uint32_t> : std::integral_constant<element, element::u32> {};
template <>
struct wire_element<std::uint64_t> : std::integral_constant<element, element::u64> {};

template <class T>
inline constexpr element element_of = wire_element<T>::value;

/// The decoded header of a message.
struct header {
  wire::kind kind{};
  wire::element element{};
  std::uint8_t flags = 0;
  std::uint64_t dimension = 0;
  std::uint64_t body_bytes = 0;
};

/// a * b, or an error naming `what` when it does not fit in size_t (a count
/// read from the wire times an element size must never wrap around).
inline std::size_t checked_mul(std::string_view where, std::string_view what, std::uint64_t a,
                               std::uint64_t b) {
  if (a != 0 && b > std::numeric_limits<std::size_t>::max() / a)
    fail(where, what, " overflows: ", a, " * ", b);
  return static_cast<std::size_t>(a * b);
}

/// Bytes needed for `count` codes of `bits` bits each, rounded up to whole bytes.
constexpr std::size_t packed_bytes(std::size_t count, unsigned bits) {
  return (count / 8) * bits + ((count % 8) * bits + 7) / 8;
}

/// Appends little-endian fields to a byte vector whose capacity is reused.
class writer {
 public:
  explicit writer(std::vector<std::byte>& out) : out_(out) {}

  template <class V>
    requires std::is_trivially_copyable_v<V>
  void put(const V& value) {
    const std::size_t at = out_.size();
    out_.resize(at + sizeof(V));
    std::memcpy(out_.data() + at, &value, sizeof(V));
  }

  template <class V>
    requires std::is_trivially_copyable_v<V>
  void put_array(std::span<const V> values) {
    if (values.empty()) return;
    const std::size_t at = out_.size();
    out_.resize(at + values.size_bytes());
    std::memcpy(out_.data() + at, values.data(), values.size_bytes());
  }

  /// Reserves `bytes` and returns where they start, for a body written in place.
  std::byte* grow(std::size_t bytes) {
    const std::size_t at = out_.size();
    out_.resize(at + bytes);
    return out_.data() + at;
  }

  std::size_t size() const { return out_.size(); }

 private:
  std::vector<std::byte>& out_;
};

/// Reads little-endian fields from untrusted bytes; running past the end throws.
class reader {
 public:
  reader(std::span<const std::byte> bytes, std::string_view where) : bytes_(bytes), where_(where) {}

  template <class V>
    requires std::is_trivially_copyable_v<V>
  V get(std::string_view field) {
    need(sizeof(V), field);
    V value;
    std::memcpy(&value, bytes_.data() + pos_, sizeof(V));
    pos_ += sizeof(V);
    return value;
  }

  /// A view of the next `count` elements of V (not copied, possibly unaligned:
  /// copy out with std::memcpy or copy_to).
  template <class V>
  std::span<const std::byte> take(std::uint64_t count, std::string_view field) {
    const std::size_t bytes = checked_mul(where_, field, count, sizeof(V));
    need(bytes, field);
    auto view = bytes_.subspan(pos_, bytes);
    pos_ += bytes;
    return view;
  }

  /// The next `bytes` raw bytes.
  std::span<const std::byte> take_bytes(std::uint64_t bytes, std::string_view field) {
    return take<std::byte>(bytes, field);
  }

  std::size_t remaining() const { return bytes_.size() - pos_; }
  std::string_view where() const { return where_; }

  /// Every byte must have been consumed: trailing garbage is an error too.
  void finish() const {
    if (pos_ != bytes_.size())
      fail(where_, "message has ", bytes_.size() - pos_, " trailing bytes after its body");
  }

 private:
  void need(std::size_t bytes, std::string_view field) const {
    if (bytes > bytes_.size() - pos_)
      fail(where_, "message truncated: field ", field, " needs ", bytes, " bytes but ",
           bytes_.size() - pos_, " remain");
  }

  std::span<const std::byte> bytes_;
  std::size_t pos_ = 0;
  std::string_view where_;
};

/// Copies `count` elements of V out of a (possibly unaligned) byte view.
template <class V>
void copy_to(std::span<const std::byte> from, V* to) {
  if (!from.empty()) std::memcpy(to, from.data(), from.size());
}

/// Starts a message: writes the header (body_bytes must be exact) into `out`,
/// which is cleared first, and returns a writer positioned at the body.
inline writer begin(std::vector<std::byte>& out, kind k, element e, std::uint8_t flags,
                    std::uint64_t dimension, std::uint64_t body_bytes) {
  out.clear();
  out.reserve(header_bytes + body_bytes);
  writer w(out);
  w.put(magic);
  w.put(version);
  w.put(static_cast<std::uint8_t>(k));
  w.put(static_cast<std::uint8_t>(e));
  w.put(flags);
  w.put(dimension);
  w.put(body_bytes);
  return w;
}

/// Reads and checks a header without consuming the body.
inline header peek(std::span<const std::byte> bytes, std::string_view where) {
  reader r(bytes, where);
  const auto m = r.get<std::uint32_t>("magic");
  if (m != magic) fail(where, "bad magic ", m, " (not a gcomp message)");
  const auto v = r.get<std::uint8_t>("version");
  if (v != version)
    fail(where, "unsupported wire version ", unsigned(v), " (this build reads ", unsigned(version),
         ")");
  header h;
  h.kind = static_cast<kind>(r.get<std::uint8_t>("kind"));
  h.element = static_cast<element>(r.get<std::uint8_t>("element"));
  h.flags = r.get<std::uint8_t>("flags");
  h.dimension = r.get<std::uint64_t>("dimension");
  h.body_bytes = r.get<std::uint64_t>("body_bytes");
  return h;
}

/// Opens a message for decoding: checks magic, version, kind, element type,
/// that the body length matches the bytes present exactly, and (unless
/// expected_dimension is `any_dimension`) the dimension. Returns the header and
/// a reader over the body.
inline constexpr std::uint64_t any_dimension = std::numeric_limits<std::uint64_t>::max();

struct opened {
  header head;
  reader body;
};

inline opened open(std::span<const std::byte> bytes, kind expected_kind, element expected_element,
                   std::uint64_t expected_dimension, std::string_view where) {
  const header h = peek(bytes, where);
  if (h.kind != expected_kind)
    fail(where, "message kind is ", unsigned(h.kind), ", expected ", unsigned(expected_kind));
  if (h.element != expected_element)
    fail(where, "message element type is ", unsigned(h.element), ", expected ",
         unsigned(expected_element));
  if (expected_dimension != any_dimension && h.dimension != expected_dimension)
    fail(where, "message dimension is ", h.dimension, ", expected ", expected_dimension);
  const std::size_t body = bytes.size() - header_bytes;
  if (h.body_bytes != body)
    fail(where, "header says body_bytes = ", h.body_bytes, " but ", body, " bytes follow it");
  return opened{h, reader(bytes.subspan(header_bytes), where)};
}

}  // namespace wire
}  // namespace gcomp
