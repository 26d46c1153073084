// libFuzzer target: core/wire.hpp itself: wire::peek and wire::open on arbitrary headers, the bounds-checked reader driven by a fuzzed program of reads, and the writer and size arithmetic against a model.
//
// Input: byte 0 picks the mode (mod 3).
//   0  header: byte 1 expected kind, byte 2 expected element, byte 3 how the
//      expected dimension is chosen; the rest is the message.
//   1  reader: byte 1 = program length L, then L program bytes, then the
//      buffer the program reads.
//   2  writer and arithmetic: the rest drives writes, read back and compared,
//      and packed_bytes / word_count / checked_mul against 128-bit arithmetic.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <vector>

#include "common.hpp"
#include "gcomp/core/quantized_payload.hpp"
#include "gcomp/core/wire.hpp"

namespace {

using namespace gcomp;
using u128 = unsigned __int128;

template <class V>
V load(std::span<const std::byte> bytes, std::size_t at) {
  V v;
  std::memcpy(&v, bytes.data() + at, sizeof(V));
  return v;
}

void header_mode(fuzz::cursor& in) {
  const auto expected_kind = static_cast<wire::kind>(in.u8());
  const auto expected_element = static_cast<wire::element>(in.u8());
  const std::uint8_t dim_mode = in.u8();
  const std::span<const std::byte> msg = in.rest();

  // The model: the documented layout, read straight from the bytes.
  const bool long_enough = msg.size() >= wire::header_bytes;
  const bool peek_ok = long_enough && load<std::uint32_t>(msg, 0) == wire::magic &&
                       load<std::uint8_t>(msg, 4) == wire::version;
  const std::uint64_t raw_dimension = long_enough ? load<std::uint64_t>(msg, 8) : 0;
  std::uint64_t expected_dimension = wire::any_dimension;
  if (dim_mode % 3 == 1) expected_dimension = raw_dimension;
  if (dim_mode % 3 == 2) expected_dimension = raw_dimension ^ 1;

  wire::header h;
  bool peeked = true;
  try {
    h = wire::peek(msg, "fuzz_wire");
  } catch (const gcomp::error&) {
    peeked = false;
  }
  fuzz::check(peeked == peek_ok, "wire::peek ", peeked ? "accepted" : "refused", " a ",
              msg.size(), "-byte message the model ", peek_ok ? "accepts" : "refuses");
  if (!peeked) return;
  fuzz::check(h.kind == static_cast<wire::kind>(load<std::uint8_t>(msg, 5)) &&
                  h.element == static_cast<wire::element>(load<std::uint8_t>(msg, 6)) &&
                  h.flags == load<std::uint8_t>(msg, 7) && h.dimension == raw_dimension &&
                  h.body_bytes == load<std::uint64_t>(msg, 16),
              "wire::peek read a field from the wrong offset");

  const bool open_ok = h.kind == expected_kind && h.element == expected_element &&
                       (expected_dimension == wire::any_dimension ||
                        h.dimension == expected_dimension) &&
                       h.body_bytes == msg.size() - wire::header_bytes;
  try {
    wire::opened o = wire::open(msg, expected_kind, expected_element, expected_dimension, "fuzz_wire");
    fuzz::check(open_ok, "wire::open accepted a message the model refuses");
    fuzz::check(o.body.remaining() == msg.size() - wire::header_bytes,
                "wire::open's body reader does not cover exactly the body");
    fuzz::check(o.head.dimension == h.dimension && o.head.body_bytes == h.body_bytes,
                "wire::open and wire::peek disagree on the header");
  } catch (const gcomp::error&) {
    fuzz::check(!open_ok, "wire::open refused a message the model accepts");
  }
}

// A count for take(): usually small, sometimes at the edges of overflow.
std::uint64_t fuzzed_count(fuzz::cursor& program) {
  const std::uint8_t b = program.u8();
  switch (b) {
    case 0xff: return std::numeric_limits<std::uint64_t>::max();
    case 0xfe: return std::numeric_limits<std::uint64_t>::max() / 4 + 1;  // * 4 or * 8 wraps to 0
    case 0xfd: return std::numeric_limits<std::uint64_t>::max() / 8 + 1;
    case 0xfc: return std::uint64_t{1} << 61;
    default: return b;
  }
}

template <class V>
void expect_get(wire::reader& r, std::span<const std::byte> buffer, std::size_t& pos) {
  const bool fits = sizeof(V) <= buffer.size() - pos;
  try {
    const V v = r.get<V>("field");
    fuzz::check(fits, "reader::get read past the end");
    fuzz::check(v == load<V>(buffer, pos), "reader::get returned the wrong bytes");
    pos += sizeof(V);
  } catch (const gcomp::error&) {
    fuzz::check(!fits, "reader::get refused a field that fits");
  }
}

template <class V>
void expect_take(wire::reader& r, std::span<const std::byte> buffer, std::size_t& pos,
                 std::uint64_t count) {
  const u128 bytes = u128(count) * sizeof(V);
  const bool fits = bytes <= buffer.size() - pos;
  try {
    const auto view = r.take<V>(count, "array");
    fuzz::check(fits, "reader::take handed out ", count, " elements past the end");
    fuzz::check(view.size() == bytes && (view.empty() || view.data() == buffer.data() + pos),
                "reader::take returned the wrong view");
    pos += view.size();
  } catch (const gcomp::error&) {
    fuzz::check(!fits, "reader::take refused ", count, " elements that fit");
  }
}

void reader_mode(fuzz::cursor& in) {
  const std::size_t length = in.u8();
  std::vector<std::uint8_t> code;
  for (std::size_t i = 0; i < length && in.remaining() > 0; ++i) code.push_back(in.u8());
  const std::span<const std::byte> buffer = in.rest();
  fuzz::cursor program(code.data(), code.size());
  wire::reader r(buffer, "fuzz_wire");
  std::size_t pos = 0;
  while (program.remaining() > 0) {
    switch (program.u8() % 8) {
      case 0: expect_get<std::uint8_t>(r, buffer, pos); break;
      case 1: expect_get<std::uint16_t>(r, buffer, pos); break;
      case 2: expect_get<std::uint32_t>(r, buffer, pos); break;
      case 3: expect_get<std::uint64_t>(r, buffer, pos); break;
      case 4: expect_take<std::uint32_t>(r, buffer, pos, fuzzed_count(program)); break;
      case 5: expect_take<std::byte>(r, buffer, pos, fuzzed_count(program)); break;
      case 6: expect_take<double>(r, buffer, pos, fuzzed_count(program)); break;
      case 7:
        try {
          r.finish();
          fuzz::check(pos == buffer.size(), "reader::finish accepted trailing bytes");
        } catch (const gcomp::error&) {
          fuzz::check(pos != buffer.size(), "reader::finish refused a fully read buffer");
        }
        break;
    }
    fuzz::check(r.remaining() == buffer.size() - pos, "reader::remaining is ", r.remaining(),
                " but ", buffer.size() - pos, " bytes are unread");
  }
}

void writer_mode(fuzz::cursor& in) {
  // Values written field by field, then read back in the same order.
  std::vector<std::byte> out;
  wire::writer w(out);
  const std::uint64_t a = in.get<std::uint64_t>();
  const std::uint16_t b = in.u16();
  const std::size_t array_length = in.u8() % 16;
  std::vector<std::uint32_t> array(array_length);
  for (auto& v : array) v = in.get<std::uint32_t>();
  w.put(a);
  w.put(b);
  w.put_array(std::span<const std::uint32_t>(array));
  std::byte* grown = w.grow(3);
  std::memset(grown, 0x5a, 3);
  fuzz::check(w.size() == 8 + 2 + 4 * array_length + 3, "writer::size is wrong");
  wire::reader r(out, "fuzz_wire");
  fuzz::check(r.get<std::uint64_t>("a") == a && r.get<std::uint16_t>("b") == b,
              "writer and reader disagree");
  std::vector<std::uint32_t> back(array_length);
  wire::copy_to(r.take<std::uint32_t>(array_length, "array"), back.data());
  fuzz::check(back == array, "put_array and take disagree");
  fuzz::check(r.take_bytes(3, "grown").size() == 3, "grow reserved the wrong size");
  r.finish();

  // Size arithmetic against 128-bit integers.
  const std::uint64_t count = in.get<std::uint64_t>() >> (in.u8() % 64);
  const unsigned bits = 1 + in.u8() % 32;
  if (u128(count) * bits + 64 <= std::numeric_limits<std::size_t>::max()) {
    fuzz::check(u128(wire::packed_bytes(count, bits)) == (u128(count) * bits + 7) / 8,
                "packed_bytes(", count, ", ", bits, ") is wrong");
    fuzz::check(u128(quantized::word_count(count, bits)) == (u128(count) * bits + 63) / 64,
                "word_count(", count, ", ", bits, ") is wrong");
  }
  const std::uint64_t factor = in.get<std::uint64_t>() >> (in.u8() % 64);
  const bool fits = u128(count) * factor <= std::numeric_limits<std::size_t>::max();
  try {
    const std::size_t product = wire::checked_mul("fuzz_wire", "count", count, factor);
    fuzz::check(fits && product == count * factor, "checked_mul accepted an overflow");
  } catch (const gcomp::error&) {
    fuzz::check(!fits, "checked_mul refused ", count, " * ", factor);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz::cursor in(data, size);
  switch (in.u8() % 3) {
    case 0: header_mode(in); break;
    case 1: reader_mode(in); break;
    case 2: writer_mode(in); break;
  }
  return 0;
}
