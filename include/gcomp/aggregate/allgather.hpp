// The allgather aggregator: every worker's payload travels as bytes and every worker decodes all of them.
#pragma once

#include <cstddef>
#include <span>
#include <string_view>
#include <vector>

#include "gcomp/core/concepts.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/message.hpp"
#include "gcomp/detail/typed_slot.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp {

/// global = (1/M) * sum over workers m of decompress(compress(local_m)), for
/// any compressor whose payload has a wire form (top-k, QSGD, sign, ...):
/// each worker encodes its payload, the bytes are all-gathered (sizes may
/// differ), and every worker decodes and adds the M messages in rank order,
/// so all workers end with bitwise equal results. Received bytes are decoded
/// as untrusted input: a corrupt message throws gcomp::error. The bytes on
/// the wire are exactly the payloads' encoded sizes (see comm/stats.hpp).
class allgather {
 public:
  template <class Policy, class Comm, class C, class T>
    requires compressor<C, Policy, T> && communicator<Comm, Policy, T> &&
             wire_payload<typename C::payload>
  void aggregate(const Policy& policy, Comm& comm, C& c, std::span<const T> local,
                 std::span<T> global, rng_key key) {
    constexpr std::string_view where = "gcomp::allgather::aggregate";
    check_same_size(where, "global", global.size(), "local", local.size());
    using payload = typename C::payload;
    auto& s = state_.get<state<payload>>("gcomp::allgather::aggregate");
    c.compress(policy, local, s.mine, key);
    encode(s.mine, s.bytes);
    s.counts.resize(static_cast<std::size_t>(comm.size()));
    comm.allgatherv(host_side(policy), std::span<const std::byte>(s.bytes), s.gathered,
                    std::span<std::size_t>(s.counts));
    last_bytes_ = s.bytes.size();
    // Decode every message before writing global, so a corrupt one leaves it untouched.
    s.theirs.resize(s.counts.size());
    std::size_t offset = 0;
    for (std::size_t r = 0; r < s.counts.size(); ++r) {
      require(s.counts[r] <= s.gathered.size() - offset, where, "rank ", r, " sent ",
              s.counts[r], " bytes but only ", s.gathered.size() - offset, " arrived");
      if (static_cast<int>(r) != comm.rank())
        decode(std::span<const std::byte>(s.gathered).subspan(offset, s.counts[r]), s.theirs[r],
               global.size());
      offset += s.counts[r];
    }
    T* out = global.data();
    for_each_index(policy, global.size(), [=] GCOMP_HD(std::size_t i) { out[i] = T(0); });
    const T scale = T(1) / static_cast<T>(comm.size());
    for (std::size_t r = 0; r < s.counts.size(); ++r)
      c.decompress_add(policy, static_cast<int>(r) == comm.rank() ? s.mine : s.theirs[r], global,
                       scale);
  }

  /// Bytes this worker put on the wire in the last step (its encoded payload).
  std::size_t last_bytes() const { return last_bytes_; }

 private:
  template <class P>
  struct state {
    P mine;                           // this worker's payload
    std::vector<P> theirs;            // decoded payloads of the others
    std::vector<std::byte> bytes;     // mine, encoded
    std::vector<std::byte> gathered;  // everyone's, concatenated in rank order
    std::vector<std::size_t> counts;  // bytes per rank
  };

  detail::typed_slot state_;  // buffers reused every step
  std::size_t last_bytes_ = 0;
};

}  // namespace gcomp
