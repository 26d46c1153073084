// Payload types compressors emit: the messages that travel between workers.
#pragma once

#include <cstddef>
#include <span>
#include <vector>

namespace gcomp {

/// A dense vector of n values: what identity and cast compressors send, and
/// what an all-reduce sums element by element.
template <class T>
struct dense_payload {
  using value_type = T;
  std::vector<T> data;  // grows on first use and is reused afterwards

  std::span<T> values() { return data; }
  std::span<const T> values() const { return data; }
  std::size_t size() const { return data.size(); }
};

}  // namespace gcomp
