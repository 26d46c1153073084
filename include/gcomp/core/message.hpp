// Payload types compressors emit (the messages that travel between workers) and the dense one's wire form.
//
// Each payload type comes with three free functions found by argument-
// dependent lookup, so aggregators can send any payload as bytes:
//   std::size_t encoded_size(const P&)                 exact bytes of encode()
//   void encode(const P&, std::vector<std::byte>& out) out = the whole message
//   void decode(std::span<const std::byte>, P& into, std::uint64_t dimension)
// decode checks everything against the header and `dimension` (the length of
// the gradient the receiver expects; wire::any_dimension skips that check) and
// throws gcomp::error on malformed bytes, leaving `into` unchanged.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "gcomp/core/wire.hpp"

namespace gcomp {

/// A dense vector of n values: what identity and cast compressors send, and
/// what an all-reduce sums element by element.
/// Wire body: the n values (dimension = n).
template <class T>
struct dense_payload {
  using value_type = T;
  std::vector<T> data;  // grows on first use and is reused afterwards

  std::span<T> values() { return data; }
  std::span<const T> values() const { return data; }
  std::size_t size() const { return data.size(); }
};

template <class T>
std::size_t encoded_size(const dense_payload<T>& message) {
  return wire::header_bytes + message.size() * sizeof(T);
}

template <class T>
void encode(const dense_payload<T>& message, std::vector<std::byte>& out) {
  auto w = wire::begin(out, wire::kind::dense, wire::element_of<T>, 0, message.size(),
                       message.size() * sizeof(T));
  w.put_array(std::span<const T>(message.data));
}

template <class T>
void decode(std::span<const std::byte> bytes, dense_payload<T>& into,
            std::uint64_t dimension = wire::any_dimension) {
  constexpr std::string_view where = "gcomp::decode(dense_payload)";
  // Typed, not auto: an auto here would make every member call dependent.
  wire::opened msg = wire::open(bytes, wire::kind::dense, wire::element_of<T>, dimension, where);
  if (msg.head.flags != 0) fail(where, "unknown flags ", unsigned(msg.head.flags));
  const auto values = msg.body.take<T>(msg.head.dimension, "values");
  msg.body.finish();
  into.data.resize(static_cast<std::size_t>(msg.head.dimension));
  wire::copy_to(values, into.data.data());
}

}  // namespace gcomp
