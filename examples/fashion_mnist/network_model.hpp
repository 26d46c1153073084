// The modeled network clock: what each collective would cost on a given link
// (ring algorithms, latency-bandwidth model), and a communicator decorator that
// adds it up while forwarding every call to the real transport.
//
// With M workers, latency a (seconds per message step) and bandwidth b (bytes
// per second per link), the modeled time of each collective is:
//
//   allreduce of n bytes (ring reduce-scatter + allgather):
//       2(M-1) a + 2(M-1)/M * n / b
//   allgather of n bytes per rank (ring): (M-1) a + (M-1) n / b
//   allgatherv with c_m bytes from rank m (ring): (M-1) a + (sum c - min c) / b
//       - the receive volume of the rank that receives the most (the one
//       that sends least), so every rank models the same time
//   broadcast of n bytes (pipelined ring/chain): (M-1) a + n / b
//   barrier: 2(M-1) a - a ring allreduce of zero bytes
//
// and 0 for every collective when M == 1 (nothing crosses a link).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <gcomp/core/error.hpp>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace fmnist {

/// One modeled network link.
struct link {
  std::string name;
  double latency_s = 0;      // per message step
  double bandwidth_Bps = 0;  // bytes per second
};

/// "1gbit" (50 us, 125e6 B/s), "10gbit" (20 us, 1.25e9 B/s) or "100gbit"
/// (5 us, 12.5e9 B/s); anything else throws gcomp::error naming the value.
inline link parse_link(std::string_view name) {
  if (name == "1gbit") return {"1gbit", 50e-6, 125e6};
  if (name == "10gbit") return {"10gbit", 20e-6, 1.25e9};
  if (name == "100gbit") return {"100gbit", 5e-6, 12.5e9};
  gcomp::fail("fmnist::parse_link", "the link is \"", name,
              "\" but must be one of 1gbit, 10gbit, 100gbit");
}

namespace detail {

inline void check_model(std::string_view where, const link& l, int workers) {
  gcomp::check_positive(where, "workers", workers);
  gcomp::check_non_negative(where, "link latency_s", l.latency_s);
  gcomp::check_positive(where, "link bandwidth_Bps", l.bandwidth_Bps);
}

}  // namespace detail

/// Ring allreduce of n bytes: 2(M-1) a + 2(M-1)/M * n / b.
inline double allreduce_seconds(const link& l, int workers, std::uint64_t bytes) {
  detail::check_model("fmnist::allreduce_seconds", l, workers);
  if (workers == 1) return 0;
  const double m = workers;
  return 2 * (m - 1) * l.latency_s + 2 * (m - 1) / m * double(bytes) / l.bandwidth_Bps;
}

/// Ring allgather of n bytes per rank: (M-1) a + (M-1) n / b.
inline double allgather_seconds(const link& l, int workers, std::uint64_t bytes_per_rank) {
  detail::check_model("fmnist::allgather_seconds", l, workers);
  if (workers == 1) return 0;
  const double m = workers;
  return (m - 1) * l.latency_s + (m - 1) * double(bytes_per_rank) / l.bandwidth_Bps;
}

/// Ring allgatherv, counts[m] bytes from rank m (counts.size() == M):
/// (M-1) a + (sum c - min c) / b.
inline double allgatherv_seconds(const link& l, int workers, std::span<const std::size_t> counts) {
  constexpr std::string_view where = "fmnist::allgatherv_seconds";
  detail::check_model(where, l, workers);
  gcomp::check_same_size(where, "counts", counts.size(), "workers", std::size_t(workers));
  if (workers == 1) return 0;
  // sum c - min c: every count but the smallest one (summed in double: no
  // integer overflow, exact below 2^53 bytes).
  const auto least = std::min_element(counts.begin(), counts.end());
  double received = 0;
  for (auto c = counts.begin(); c != counts.end(); ++c)
    if (c != least) received += double(*c);
  return (double(workers) - 1) * l.latency_s + received / l.bandwidth_Bps;
}

/// Broadcast of n bytes (pipelined chain): (M-1) a + n / b.
inline double broadcast_seconds(const link& l, int workers, std::uint64_t bytes) {
  detail::check_model("fmnist::broadcast_seconds", l, workers);
  if (workers == 1) return 0;
  return (double(workers) - 1) * l.latency_s + double(bytes) / l.bandwidth_Bps;
}

/// Barrier (a zero-byte ring allreduce): 2(M-1) a.
inline double barrier_seconds(const link& l, int workers) {
  detail::check_model("fmnist::barrier_seconds", l, workers);
  if (workers == 1) return 0;
  return 2 * (double(workers) - 1) * l.latency_s;
}

/// A communicator (gcomp's `communicator` concept) that forwards every call
/// to the `Comm` it refers to and keeps two clocks:
///  - modeled_seconds(): after each blocking collective that returned
///    normally, the time the formulas above give for it on `link`;
///  - measured_comm_seconds(): the real wall time spent inside the blocking
///    calls (steady_clock), whether they returned or threw.
/// iallreduce_sum returns the inner request unchanged; its modeled time goes
/// to background_modeled_seconds() (it overlaps compute), and neither the
/// post nor the later wait() is measured. stats() are the inner
/// communicator's. The inner communicator must outlive this object; one
/// object per rank, used by that rank's thread only.
template <class Comm>
class modeled_comm {
 public:
  modeled_comm(Comm& inner, link network) : inner_(&inner), link_(std::move(network)) {
    detail::check_model("fmnist::modeled_comm::modeled_comm", link_, inner_->size());
  }
  modeled_comm(const modeled_comm&) = delete;
  modeled_comm& operator=(const modeled_comm&) = delete;

  int rank() const { return inner_->rank(); }
  int size() const { return inner_->size(); }

  template <class Policy, class T>
  void allreduce_sum(const Policy& policy, std::span<T> data) {
    timed([&] { inner_->allreduce_sum(policy, data); });
    modeled_ += allreduce_seconds(link_, size(), data.size_bytes());
  }

  template <class Policy>
  void allgather(const Policy& policy, std::span<const std::byte> in, std::span<std::byte> out) {
    timed([&] { inner_->allgather(policy, in, out); });
    modeled_ += allgather_seconds(link_, size(), in.size());
  }

  /// counts holds every rank's byte count after the call; the model reads it.
  template <class Policy>
  void allgatherv(const Policy& policy, std::span<const std::byte> in, std::vector<std::byte>& out,
                  std::span<std::size_t> counts) {
    timed([&] { inner_->allgatherv(policy, in, out, counts); });
    modeled_ += allgatherv_seconds(link_, size(), counts);
  }

  template <class Policy, class T>
  void broadcast(const Policy& policy, std::span<T> data, int root) {
    timed([&] { inner_->broadcast(policy, data, root); });
    modeled_ += broadcast_seconds(link_, size(), data.size_bytes());
  }

  void barrier() {
    timed([&] { inner_->barrier(); });
    modeled_ += barrier_seconds(link_, size());
  }

  template <class Policy, class T>
  [[nodiscard]] auto iallreduce_sum(const Policy& policy, std::span<T> data) {
    auto request = inner_->iallreduce_sum(policy, data);
    background_ += allreduce_seconds(link_, size(), data.size_bytes());
    return request;
  }

  auto stats() const { return inner_->stats(); }

  /// Forwards to the inner communicator's reset_stats(), where it has one.
  void reset_stats() requires requires(Comm& c) { c.reset_stats(); }
  { inner_->reset_stats(); }

  /// Modeled seconds of the blocking collectives since construction or reset_clock().
  double modeled_seconds() const { return modeled_; }
  /// Modeled seconds of the non-blocking all-reduces (overlapping compute).
  double background_modeled_seconds() const { return background_; }
  /// Real seconds spent inside the blocking collectives.
  double measured_comm_seconds() const { return measured_; }
  /// Sets all three clocks to 0 (the stats are left alone).
  void reset_clock() { modeled_ = background_ = measured_ = 0; }

  const link& network() const { return link_; }
  Comm& inner() const { return *inner_; }

 private:
  template <class F>
  void timed(F&& f) {
    struct stopwatch {
      double& total;
      std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
      ~stopwatch() {
        total += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      }
    } watch{measured_};
    f();
  }

  Comm* inner_;
  link link_;
  double modeled_ = 0, background_ = 0, measured_ = 0;
};

}  // namespace fmnist
