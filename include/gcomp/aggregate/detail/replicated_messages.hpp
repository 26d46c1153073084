// The replicated server's message store shared by lazy<allgather> and the stale parameter server: the last message of every rank, refreshed by those that send.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/core/error.hpp"
#include "gcomp/core/message.hpp"
#include "gcomp/core/random.hpp"

namespace gcomp::detail {

/// Every worker keeps the last message of every rank. Each exchange, the
/// ranks that send contribute their encoded payload to one allgatherv and
/// the others contribute nothing (0 bytes: an encoded payload is never
/// empty, so no flag is needed). Received messages are decoded as untrusted
/// input into `staged`; commit() swaps them into `stored` only after the
/// caller has validated the whole exchange, so a corrupt message leaves the
/// store unchanged. Swapping keeps both buffers: nothing is allocated after
/// the first steps.
template <class P>
struct replicated_messages {
  std::vector<P> stored;            // the last message of every rank
  std::vector<P> staged;            // this exchange's messages, before they are committed
  std::vector<std::uint8_t> held;   // whether rank r has ever sent
  std::vector<std::byte> bytes;     // this worker's message, encoded (empty when it does not send)
  std::vector<std::byte> gathered;  // the senders' bytes, concatenated in rank order
  std::vector<std::size_t> counts;  // bytes per rank, 0 for a rank that did not send

  /// Sizes the store for `ranks` ranks on first use (nothing is held yet).
  void size_for(std::size_t ranks) {
    if (!stored.empty()) return;
    stored.resize(ranks);
    staged.resize(ranks);
    held.assign(ranks, 0);
    counts.resize(ranks);
  }

  /// Compresses `local` into this worker's staged message and encodes it if
  /// `send`, else prepares an empty contribution (local is not read).
  template <class Policy, class C, class T>
  void prepare(const Policy& policy, C& c, std::span<const T> local, rng_key key, std::size_t me,
               bool send) {
    if (send) {
      c.compress(policy, local, staged[me], key);
      encode(staged[me], bytes);
    } else {
      bytes.clear();
    }
  }

  /// The allgatherv, then every other rank's message decoded into staged.
  /// check(r, count) runs first for each rank (the caller's rules on who may
  /// send); the counts are checked against the bytes that arrived.
  template <class Policy, class Comm, class Check>
  void exchange(const Policy& policy, Comm& comm, std::size_t dimension, std::string_view where,
                Check check) {
    comm.allgatherv(policy, std::span<const std::byte>(bytes), gathered,
                    std::span<std::size_t>(counts));
    const auto me = static_cast<std::size_t>(comm.rank());
    std::size_t offset = 0;
    for (std::size_t r = 0; r < counts.size(); ++r) {
      const std::size_t count = counts[r];
      require(count <= gathered.size() - offset, where, "rank ", r, " sent ", count,
              " bytes but only ", gathered.size() - offset, " arrived");
      check(r, count);
      if (count != 0 && r != me)
        decode(std::span<const std::byte>(gathered).subspan(offset, count), staged[r], dimension);
      offset += count;
    }
  }

  /// The messages of the last exchange replace the stored ones of their ranks.
  void commit() {
    for (std::size_t r = 0; r < counts.size(); ++r) {
      if (counts[r] == 0) continue;
      std::swap(stored[r], staged[r]);
      held[r] = 1;
    }
  }
};

}  // namespace gcomp::detail
