// comm_stats: the traffic counters every communicator keeps, and the accounting rule they follow.
#pragma once

#include <cstdint>

namespace gcomp {

/// What one rank has handed to and received from its transport.
///
/// The accounting rule, the same for every transport (in-process threads, MPI,
/// NCCL), so that reports compare methods rather than transports: the counts
/// are the *logical payload* bytes a rank hands to / receives from the
/// collective, independent of the algorithm the transport runs inside (ring,
/// tree, chunked reduce...). With M = size():
///
///   - allreduce_sum / iallreduce_sum of n elements of T:
///       bytes_sent += n * sizeof(T), bytes_received += n * sizeof(T);
///   - allgather:   bytes_sent += in.size(), bytes_received += (M - 1) * in.size();
///   - allgatherv:  bytes_sent += own in.size(),
///                  bytes_received += (sum of every rank's in.size()) - own in.size();
///   - broadcast of b bytes: the root's bytes_sent += b, every other rank's
///       bytes_received += b;
///   - barrier: no bytes;
///   - every collective, barrier included: collectives += 1.
///
/// When M == 1 nothing crosses the transport, so every byte count stays 0
/// (collectives still counts the call). An operation is counted once it has
/// completed successfully on that rank: a call that throws counts nothing, and
/// a non-blocking one is counted when its completion is observed (wait(),
/// test() returning true, or the request's destructor).
struct comm_stats {
  std::uint64_t bytes_sent = 0;
  std::uint64_t bytes_received = 0;
  std::uint64_t collectives = 0;

  comm_stats& operator+=(const comm_stats& other) {
    bytes_sent += other.bytes_sent;
    bytes_received += other.bytes_received;
    collectives += other.collectives;
    return *this;
  }

  friend comm_stats operator+(comm_stats a, const comm_stats& b) { return a += b; }
  friend bool operator==(const comm_stats&, const comm_stats&) = default;
};

}  // namespace gcomp
