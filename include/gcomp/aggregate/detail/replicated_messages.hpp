// The replicated server's message store shared by lazy<allgather> and the stale parameter server: the last message of every rank, refreshed by those that send, and its checkpoint form.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/message.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/core/wire.hpp"
#include "gcomp/exec/host.hpp"

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
    comm.allgatherv(host_side(policy), std::span<const std::byte>(bytes), gathered,
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

/// A replicated store's messages in checkpoint form: every rank's last message
/// encoded as on the wire, empty for a rank that has never sent. An aggregator
/// learns its payload type only at its first step, so a store loaded into a
/// fresh aggregator stays in this form until the next step decodes it (as
/// untrusted input, like a received message). lazy<allgather> and
/// parameter_server share it.
struct checkpointed_messages {
  std::vector<std::vector<std::byte>> by_rank;  // empty: nothing loaded (or nothing held)

  /// Whether a loaded store waits for its payload type.
  bool pending() const { return !by_rank.empty(); }

  template <class P>
  static checkpointed_messages of(const replicated_messages<P>& store) {
    checkpointed_messages out;
    out.by_rank.resize(store.stored.size());
    for (std::size_t r = 0; r < store.stored.size(); ++r)
      if (store.held[r] != 0) encode(store.stored[r], out.by_rank[r]);
    return out;
  }

  /// Two fields: the bytes of each rank's message (0: none) and all of them in rank order.
  void save(checkpoint_writer& out) const {
    std::vector<std::uint64_t> sizes;
    std::vector<std::byte> all;
    for (const auto& m : by_rank) {
      sizes.push_back(m.size());
      all.insert(all.end(), m.begin(), m.end());
    }
    out.array("message_bytes", sizes);
    out.array("messages", all);
  }

  /// Reads what save() wrote: `ranks` messages (none when ranks is 0) of
  /// `dimension` elements. Headers are checked here; bodies when decoded.
  static checkpointed_messages read(checkpoint_reader& in, std::size_t ranks,
                                    std::uint64_t dimension, std::string_view where) {
    const auto sizes = in.vector<std::uint64_t>("message_bytes");
    const auto all = in.vector<std::byte>("messages");
    require(sizes.size() == ranks, where, "the checkpoint holds messages of ", sizes.size(),
            " ranks but records ", ranks, " ranks");
    checkpointed_messages out;
    out.by_rank.resize(ranks);
    std::size_t offset = 0;
    for (std::size_t r = 0; r < ranks; ++r) {
      require(sizes[r] <= all.size() - offset, where, "the message of rank ", r, " claims ",
              sizes[r], " bytes but only ", all.size() - offset, " remain");
      const auto bytes =
          std::span<const std::byte>(all).subspan(offset, static_cast<std::size_t>(sizes[r]));
      offset += bytes.size();
      if (bytes.empty()) continue;
      const wire::header head = wire::peek(bytes, where);
      require(head.dimension == dimension, where, "the message of rank ", r, " has dimension ",
              head.dimension, " but the checkpoint records dimension ", dimension);
      require(head.body_bytes == bytes.size() - wire::header_bytes, where, "the message of rank ",
              r, " says its body has ", head.body_bytes, " bytes but ",
              bytes.size() - wire::header_bytes, " follow its header");
      out.by_rank[r].assign(bytes.begin(), bytes.end());
    }
    require(offset == all.size(), where, "the checkpoint's messages have ", all.size() - offset,
            " bytes that belong to no rank");
    return out;
  }

  /// Decodes every message into temporaries first, so a message that does not
  /// fit the payload type P (another compressor's) throws with `store` unchanged;
  /// then the store holds exactly the loaded messages.
  template <class P>
  void install(replicated_messages<P>& store, std::uint64_t dimension,
               std::string_view where) const {
    std::vector<P> decoded(by_rank.size());
    for (std::size_t r = 0; r < by_rank.size(); ++r) {
      if (by_rank[r].empty()) continue;
      try {
        decode(std::span<const std::byte>(by_rank[r]), decoded[r], dimension);
      } catch (const error& e) {
        fail(where, "the message of rank ", r,
             " loaded from the checkpoint does not fit this compressor (a checkpoint of another "
             "method?): ",
             e.what());
      }
    }
    store.size_for(by_rank.size());
    check_same_size(where, "the loaded messages", by_rank.size(), "the ranks of the store",
                    store.stored.size());
    for (std::size_t r = 0; r < by_rank.size(); ++r) {
      store.held[r] = by_rank[r].empty() ? 0 : 1;
      if (!by_rank[r].empty()) std::swap(store.stored[r], decoded[r]);
    }
  }
};

}  // namespace gcomp::detail
