// The divisible-communication aggregator: a compressed foreground all-reduce with error feedback and a background non-blocking all-reduce that never blocks a step (after Xu & Bai, "Divisible communication for Adam", ECML PKDD 2023; the design is ours, ALGORITHMS.md section 4).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/comm/stats.hpp"
#include "gcomp/compress/random_block.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/core/sparse_payload.hpp"
#include "gcomp/detail/typed_slot.hpp"
#include "gcomp/exec/host.hpp"

// Only the paper's abstract was available. It fixes: a synchronous, highly
// compressed foreground (x1024 on CIFAR-10), an asynchronous background with
// no synchronisation time, Adam as the base optimizer. Everything below (what
// the background carries, how and when it is applied, how ranks agree) is our
// own design, documented in docs/divisible_adam.md.

namespace gcomp {

/// What the background all-reduce carries.
///  - none: foreground only.
///  - parameters: the snapshot x_then; on completion x <- x + (avg(x_then) - x_then),
///    a drift correction that pulls workers that disagree onto their average.
///  - residual: the error-feedback residual e_then; on completion
///    e <- e + (avg(e_then) - e_then). This is "e replaced by its average" when
///    e has not moved since the snapshot, and in any case keeps the sum of the
///    workers' residuals (the gradient mass not yet sent) unchanged.
enum class background_payload : std::uint8_t { none, parameters, residual };

struct divisible_options {
  background_payload payload = background_payload::parameters;
  /// s >= 1: an operation started at the end of step t overlaps steps
  /// t+1..t+s and is first tested at the end of step t+s.
  std::uint64_t delay = 1;
  /// After an operation whose snapshots were taken at different steps on
  /// different ranks (it is then not applied), the next one starts only at a
  /// background call whose index is a multiple of this (>= 1), so that ranks
  /// that drifted apart in time line up again.
  std::uint64_t realign_every = 16;
};

/// What the background did so far on this rank.
struct background_counters {
  std::uint64_t started = 0;         // operations posted
  std::uint64_t applied = 0;         // completed and applied
  std::uint64_t skipped = 0;         // completed, but the ranks' snapshots differ in step
  std::uint64_t pending_checks = 0;  // test() found it unfinished: the step went on
};

namespace detail {

// "What was taken" from the compressed vector: zero it on the message's support.
// The rescaled value (n / k) * p_i travels, but p_i is what left the residual,
// so e_i = p_i - p_i = 0 exactly, whatever the compressor's rescale option.
template <class Policy, class T>
void zero_support(const Policy& policy, const block_payload<T>& message, std::span<T> p) {
  const std::size_t n = p.size();
  const auto offset = static_cast<std::size_t>(message.offset);
  T* q = p.data();
  for_each_index(policy, message.size(), [=](std::size_t j) {
    std::size_t i = offset + j;
    if (i >= n) i -= n;
    q[i] = T(0);
  });
}

template <class Policy, class T, class Index>
void zero_support(const Policy& policy, const sparse_payload<T, Index>& message, std::span<T> p) {
  T* q = p.data();
  const Index* idx = message.indices.data();
  for_each_index(policy, message.size(), [=](std::size_t j) { q[idx[j]] = T(0); });
}

template <class Payload, class Policy, class T>
concept zeroable_support_payload = requires(const Policy& policy, const Payload& m, std::span<T> p) {
  detail::zero_support(policy, m, p);
};

// Step indices are compared modulo 2^16 so that M * sum(u^2) and (sum u)^2
// fit in 64 bits for up to 2^16 ranks.
inline constexpr std::uint64_t divisible_tag_mask = 0xFFFF;

}  // namespace detail

/// Foreground, every step (aggregate(): the shape of gcomp::aggregator):
///   p = e + g;  c = C(p) with a shared-key compressor (random_contiguous_block
///   or shared_randomk, ratio 1/r);  all-reduce c;  e = p - (p on C's support);
///   global = (1/M) * sum over workers of decompress(c).
/// With rescale::unbiased the values sent are (n/k) p_i but the residual still
/// loses only p_i (what was taken), so the optimizer sees an unbiased estimate
/// of mean(p) while no gradient mass is lost or counted twice in e.
///
/// Background, after the optimizer (background()): at most one non-blocking
/// all-reduce in flight, started at the end of a step, first tested s = delay
/// steps later and then at every step until test() says it finished; it is
/// applied (see background_payload) at the step that sees it finish, and the
/// next one starts at that same step. Nothing ever waits: a test() that finds
/// it unfinished lets the step go on (counted in pending_checks). Not starting
/// a second one while one is in flight bounds memory to two snapshots.
///
/// Ranks agree without waiting: each operation carries, in a second 16-byte
/// all-reduce, the step its snapshot was taken at (u, u^2 summed over ranks).
/// If completion was seen at different steps on different ranks, the next
/// snapshots differ in time; every rank sees the same sums, so all of them
/// skip that operation (counted in skipped) and realign (realign_every).
///
/// Call finish() on every rank before destroying an object whose operation is
/// in flight: a pending request's destructor waits for it, and a rank one
/// operation ahead of the others would wait for a call they never make.
///
/// Bytes: foreground_stats() and background_stats() follow comm_stats's rule
/// (logical payload bytes, 0 on a one-rank group, counted when completion is
/// observed), so their sum equals what comm.stats() gained through this object.
///
/// Copies and checkpoints need no operation in flight: its buffers are being
/// written by the transport and its request cannot be copied or written to a
/// file. Copying, assigning to, saving or loading an object with one in
/// flight throws gcomp::error; call finish() on every rank first. A
/// checkpoint is therefore a synchronisation point of the background: the
/// run that is resumed from it equals the run that called finish() at the
/// same step and went on.
template <class T = float>
class divisible {
 public:
  using value_type = T;

  explicit divisible(divisible_options options = {}) : options_(options) {
    constexpr std::string_view where = "gcomp::divisible";
    require(options.payload == background_payload::none ||
                options.payload == background_payload::parameters ||
                options.payload == background_payload::residual,
            where, "payload must be none, parameters or residual, got ",
            static_cast<unsigned>(options.payload));
    check_positive(where, "delay", options.delay);
    check_positive(where, "realign_every", options.realign_every);
  }

  /// A copy of an object with nothing in flight (see the class comment);
  /// the copy's requests start empty.
  divisible(const divisible& other)
      : options_(idle(other, "gcomp::divisible (copy)").options_),
        residual_(other.residual_),
        sum_(other.sum_),
        send_(other.send_),
        snapshot_(other.snapshot_),
        tags_(other.tags_),
        foreground_(other.foreground_),
        background_(other.background_),
        counters_(other.counters_),
        calls_(other.calls_),
        start_(other.start_),
        comm_(nullptr),
        started_(other.started_),
        in_flight_(false),
        payload_done_(false),
        tag_done_(false),
        realign_(other.realign_),
        message_(other.message_) {}
  divisible& operator=(const divisible& other) {
    if (this != &other) *this = divisible(other);
    return *this;
  }
  // Moving keeps the buffers' storage, so a request in flight stays valid.
  divisible(divisible&&) = default;
  /// Assigning over an object with a request in flight could not keep that
  /// request valid, so it throws (nothing changes); the source may have one.
  divisible& operator=(divisible&& other) {
    if (this == &other) return *this;
    idle(*this, "gcomp::divisible (assignment)");
    options_ = other.options_;
    residual_ = std::move(other.residual_);
    sum_ = std::move(other.sum_);
    send_ = std::move(other.send_);
    snapshot_ = std::move(other.snapshot_);
    tags_ = std::move(other.tags_);
    foreground_ = other.foreground_;
    background_ = other.background_;
    counters_ = other.counters_;
    calls_ = other.calls_;
    start_ = other.start_;
    comm_ = std::exchange(other.comm_, nullptr);
    started_ = other.started_;
    in_flight_ = std::exchange(other.in_flight_, false);
    payload_done_ = other.payload_done_;
    tag_done_ = other.tag_done_;
    realign_ = other.realign_;
    message_ = std::move(other.message_);
    request_ = std::move(other.request_);
    tag_request_ = std::move(other.tag_request_);
    return *this;
  }

  /// The foreground step: global = mean over workers of C(e + local), e updated.
  template <class Policy, class Comm, class C>
    requires allreducible_compressor<C, Policy, T> && communicator<Comm, Policy, T> &&
             detail::zeroable_support_payload<typename C::payload, Policy, T>
  void aggregate(const Policy& policy, Comm& comm, C& c, std::span<const T> local,
                 std::span<T> global, rng_key key) {
    detail::require_host_memory<Policy>();
    constexpr std::string_view where = "gcomp::divisible::aggregate";
    check_same_size(where, "global", global.size(), "local", local.size());
    const std::size_t n = local.size();
    if (started_)
      check_same_size(where, "local", n, "the residual built at the first step", residual_.size());
    else
      residual_.assign(n, T(0));
    sum_.resize(n);
    T* p = sum_.data();
    const T* e = residual_.data();
    const T* g = local.data();
    for_each_index(policy, n, [=](std::size_t i) { p[i] = e[i] + g[i]; });
    auto& message = message_.get<typename C::payload>(where.data());
    c.compress(policy, std::span<const T>(sum_), message, key);
    comm.allreduce_sum(policy, message.values());  // a throw leaves e as it was
    detail::zero_support(policy, std::as_const(message), std::span<T>(sum_));
    std::swap(residual_, sum_);
    started_ = true;
    count(foreground_, comm.size(), message.values().size_bytes());
    T* out = global.data();
    for_each_index(policy, n, [=](std::size_t i) { out[i] = T(0); });
    c.decompress_add(policy, message, global, T(1) / static_cast<T>(comm.size()));
  }

  /// The background step, called once per step after the optimizer updated
  /// params. Never blocks. Returns true when a finished operation was applied
  /// in this call (to params or to the residual).
  template <class Policy, class Comm>
    requires communicator<Comm, Policy, T> && communicator<Comm, Policy, std::uint64_t>
  bool background(const Policy& policy, Comm& comm, std::span<T> params) {
    detail::require_host_memory<Policy>();
    constexpr std::string_view where = "gcomp::divisible::background";
    check_target(where, comm, params.size());
    require(started_ || options_.payload != background_payload::residual, where,
            "the residual payload needs aggregate() to have run first");
    bool applied = false;
    if (in_flight_ && calls_ >= start_ + options_.delay) {
      if (poll<Policy, Comm>(comm, false)) {
        applied = complete(policy, comm.size(), params);
      } else {
        ++counters_.pending_checks;
      }
    }
    if (options_.payload != background_payload::none && !in_flight_ &&
        (!realign_ || calls_ % options_.realign_every == 0))
      start(policy, comm, params);
    ++calls_;
    return applied;
  }

  /// Ends the background on every rank: the one blocking call, for the end of
  /// training (or before a checkpoint); every rank must call it. A rank that
  /// saw the last completion a step before the others has already started the
  /// next operation, which they have not, so the ranks first agree on how many
  /// were started (a blocking 8-byte all-reduce, counted as background bytes);
  /// a rank one behind posts the missing one (its step tag differs, so every
  /// rank skips it). Then each waits for what it has in flight and applies it.
  /// Returns true when something was applied.
  template <class Policy, class Comm>
    requires communicator<Comm, Policy, T> && communicator<Comm, Policy, std::uint64_t>
  bool finish(const Policy& policy, Comm& comm, std::span<T> params) {
    detail::require_host_memory<Policy>();
    constexpr std::string_view where = "gcomp::divisible::finish";
    check_target(where, comm, params.size());
    if (options_.payload == background_payload::none) return false;
    require(started_ || options_.payload != background_payload::residual, where,
            "the residual payload needs aggregate() to have run first");
    tag_type total = counters_.started;
    comm.allreduce_sum(policy, std::span<tag_type>(&total, 1));
    count(background_, comm.size(), sizeof(tag_type));
    bool applied = false;
    if (in_flight_) {
      poll<Policy, Comm>(comm, true);
      applied = complete(policy, comm.size(), params);
    }
    // Ranks differ by at most one operation: the next one cannot complete
    // before every rank has posted it.
    if (total > static_cast<tag_type>(comm.size()) * counters_.started) {
      start(policy, comm, params);
      poll<Policy, Comm>(comm, true);
      applied = complete(policy, comm.size(), params) || applied;
    }
    return applied;
  }

  /// Throws what background(comm, params) would throw about its arguments,
  /// without doing anything: a method can check before its foreground runs.
  template <class Comm>
  void check_background(const Comm& comm, std::size_t params_size) const {
    check_target("gcomp::divisible::background", comm, params_size);
  }

  const divisible_options& options() const { return options_; }
  bool background_pending() const { return in_flight_; }
  const background_counters& counters() const { return counters_; }
  /// Traffic of the foreground all-reduces and of the background ones (payload
  /// and the 16-byte step tag), under comm_stats's accounting rule.
  const comm_stats& foreground_stats() const { return foreground_; }
  const comm_stats& background_stats() const { return background_; }
  /// The error-feedback residual e (empty before the first aggregate()).
  std::span<const T> residual() const { return residual_; }

  /// Writes the section "gcomp::divisible" (version 1): the options (payload,
  /// delay, realign_every), whether aggregate() has run and the residual e,
  /// the background's call count and realignment flag, the counters and both
  /// traffic tallies. Throws gcomp::error while an operation is in flight.
  void save(checkpoint_writer& out) const {
    idle(*this, "gcomp::divisible::save");
    out.begin("gcomp::divisible", 1);
    out.value("payload", options_.payload);
    out.value("delay", options_.delay);
    out.value("realign_every", options_.realign_every);
    out.value("started", static_cast<std::uint8_t>(started_ ? 1 : 0));
    out.array("residual", residual_);
    out.value("calls", calls_);
    out.value("realign", static_cast<std::uint8_t>(realign_ ? 1 : 0));
    out.value("started_operations", counters_.started);
    out.value("applied_operations", counters_.applied);
    out.value("skipped_operations", counters_.skipped);
    out.value("pending_checks", counters_.pending_checks);
    out.value("foreground_bytes_sent", foreground_.bytes_sent);
    out.value("foreground_bytes_received", foreground_.bytes_received);
    out.value("foreground_collectives", foreground_.collectives);
    out.value("background_bytes_sent", background_.bytes_sent);
    out.value("background_bytes_received", background_.bytes_received);
    out.value("background_collectives", background_.collectives);
    out.end();
  }

  /// Reads what save() wrote. The checkpoint must come from an object with
  /// the same options, and once this object has a residual (aggregate() ran)
  /// the checkpoint's must have its size; otherwise, or with an operation in
  /// flight here, gcomp::error with the object unchanged. A fresh object takes
  /// the checkpoint's residual, whose size the next aggregate() then checks.
  template <class Policy>
  void load(const Policy&, checkpoint_reader& in) {
    constexpr std::string_view where = "gcomp::divisible::load";
    idle(*this, where);
    in.begin("gcomp::divisible", 1);
    const auto payload = in.value<background_payload>("payload");
    const auto delay = in.value<std::uint64_t>("delay");
    const auto realign_every = in.value<std::uint64_t>("realign_every");
    require(payload == options_.payload && delay == options_.delay &&
                realign_every == options_.realign_every,
            where, "the checkpoint was written with payload ", static_cast<unsigned>(payload),
            ", delay ", delay, ", realign_every ", realign_every, " but this object has payload ",
            static_cast<unsigned>(options_.payload), ", delay ", options_.delay,
            ", realign_every ", options_.realign_every);
    const auto started = in.value<std::uint8_t>("started");
    std::vector<T> residual = in.vector<T>("residual");
    const auto calls = in.value<std::uint64_t>("calls");
    const auto realign = in.value<std::uint8_t>("realign");
    background_counters counters;
    counters.started = in.value<std::uint64_t>("started_operations");
    counters.applied = in.value<std::uint64_t>("applied_operations");
    counters.skipped = in.value<std::uint64_t>("skipped_operations");
    counters.pending_checks = in.value<std::uint64_t>("pending_checks");
    comm_stats foreground, background;
    foreground.bytes_sent = in.value<std::uint64_t>("foreground_bytes_sent");
    foreground.bytes_received = in.value<std::uint64_t>("foreground_bytes_received");
    foreground.collectives = in.value<std::uint64_t>("foreground_collectives");
    background.bytes_sent = in.value<std::uint64_t>("background_bytes_sent");
    background.bytes_received = in.value<std::uint64_t>("background_bytes_received");
    background.collectives = in.value<std::uint64_t>("background_collectives");
    in.end();
    require(started <= 1 && realign <= 1, where, "started and realign must be 0 or 1, got ",
            unsigned(started), " and ", unsigned(realign));
    require(started != 0 || residual.empty(), where, "a residual of ", residual.size(),
            " elements before the first aggregate() (a corrupt checkpoint)");
    if (started_ && started != 0)
      check_same_size(where, "the checkpoint's residual", residual.size(),
                      "this object's residual", residual_.size());
    // The snapshot pins the model size for background(); the loaded state
    // pins it anew (through the residual), so the old one is dropped.
    snapshot_.clear();
    send_.clear();
    residual_ = std::move(residual);
    started_ = started != 0;
    calls_ = calls;
    start_ = 0;
    realign_ = realign != 0;
    counters_ = counters;
    foreground_ = foreground;
    background_ = background;
  }

 private:
  // Throws unless `d` has nothing in flight (copies and checkpoints need that).
  static const divisible& idle(const divisible& d, std::string_view where) {
    require(!d.in_flight_, where,
            "a background operation is in flight; call finish() on every rank first");
    return d;
  }

  using tag_type = std::uint64_t;

  template <class Policy, class Comm>
  using request_t = decltype(std::declval<Comm&>().iallreduce_sum(std::declval<const Policy&>(),
                                                                  std::span<T>()));
  template <class Policy, class Comm>
  using tag_request_t = decltype(std::declval<Comm&>().iallreduce_sum(
      std::declval<const Policy&>(), std::span<tag_type>()));

  // The checks background() and finish() make before anything changes.
  template <class Comm>
  void check_target(std::string_view where, const Comm& comm, std::size_t params_size) const {
    if (in_flight_)
      require(comm_ == static_cast<const void*>(&comm), where,
              "an operation is in flight on another communicator; pass the one it started on");
    if (started_)
      check_same_size(where, "params", params_size, "the residual", residual_.size());
    if (!snapshot_.empty())
      check_same_size(where, "params", params_size, "the snapshot built at the first call",
                      snapshot_.size());
  }

  static void count(comm_stats& stats, int size, std::size_t bytes) {
    if (size > 1) {
      stats.bytes_sent += bytes;
      stats.bytes_received += bytes;
    }
    ++stats.collectives;
  }

  // Tests (or waits for) both requests, each every time until it is done, so
  // that a transport which progresses only inside test() (MPI's non-blocking
  // collectives) moves both along; each one's bytes are counted when its
  // completion is first observed, as the communicator counts them.
  template <class Policy, class Comm>
  bool poll(Comm& comm, bool block) {
    auto& payload = request_.get<request_t<Policy, Comm>>("gcomp::divisible::background");
    auto& tag = tag_request_.get<tag_request_t<Policy, Comm>>("gcomp::divisible::background");
    try {
      if (!payload_done_) {
        if (block) payload.wait();
        payload_done_ = block || payload.test();
        if (payload_done_) count(background_, comm.size(), send_.size() * sizeof(T));
      }
      if (!tag_done_) {  // tested alongside, so the transport progresses both
        if (block) tag.wait();
        tag_done_ = block || tag.test();
        if (tag_done_) count(background_, comm.size(), tags_.size() * sizeof(tag_type));
      }
    } catch (...) {
      in_flight_ = false;  // a failed request is over; the next call may start anew
      throw;
    }
    return payload_done_ && tag_done_;
  }

  template <class Policy, class Comm>
  void start(const Policy& policy, Comm& comm, std::span<T> params) {
    const std::span<const T> source = options_.payload == background_payload::parameters
                                          ? std::span<const T>(params)
                                          : std::span<const T>(residual_);
    send_.resize(source.size());  // sized once: check_target pins the size
    snapshot_.resize(source.size());
    const T* s = source.data();
    T* a = send_.data();
    T* b = snapshot_.data();
    for_each_index(policy, source.size(), [=](std::size_t i) {
      a[i] = s[i];
      b[i] = s[i];
    });
    tags_.resize(2);
    const tag_type u = calls_ & detail::divisible_tag_mask;
    tags_[0] = u;
    tags_[1] = u * u;
    auto& payload = request_.get<request_t<Policy, Comm>>("gcomp::divisible::background");
    auto& tag = tag_request_.get<tag_request_t<Policy, Comm>>("gcomp::divisible::background");
    payload = comm.iallreduce_sum(policy, std::span<T>(send_));
    tag = comm.iallreduce_sum(policy, std::span<tag_type>(tags_));
    comm_ = static_cast<const void*>(&comm);
    in_flight_ = true;
    payload_done_ = tag_done_ = false;
    start_ = calls_;
    ++counters_.started;
  }

  // The operation finished on this rank: apply it, or skip it on every rank
  // alike when the ranks' snapshots were taken at different steps.
  template <class Policy>
  bool complete(const Policy& policy, int size, std::span<T> params) {
    in_flight_ = false;
    const auto m = static_cast<tag_type>(size);
    if (m * tags_[1] != tags_[0] * tags_[0]) {  // Cauchy-Schwarz: equal iff all u agree
      ++counters_.skipped;
      realign_ = true;
      return false;
    }
    realign_ = false;
    T* target = options_.payload == background_payload::parameters ? params.data()
                                                                     : residual_.data();
    const T* sum = send_.data();
    const T* then = snapshot_.data();
    const T inv = T(1) / static_cast<T>(size);
    for_each_index(policy, send_.size(),
                   [=](std::size_t i) { target[i] = target[i] + (inv * sum[i] - then[i]); });
    ++counters_.applied;
    return true;
  }

  divisible_options options_;
  std::vector<T> residual_;  // e, per worker
  std::vector<T> sum_;       // p = e + g, swapped with residual_ every step
  std::vector<T> send_;      // the background snapshot, summed in place by the transport
  std::vector<T> snapshot_;  // the same snapshot, kept: x_then or e_then
  std::vector<tag_type> tags_;  // {u, u^2}, u = the snapshot's step mod 2^16; summed in place
  comm_stats foreground_, background_;
  background_counters counters_;
  std::uint64_t calls_ = 0;  // background() calls so far
  std::uint64_t start_ = 0;  // the call the operation in flight started at
  const void* comm_ = nullptr;
  bool started_ = false;
  bool in_flight_ = false;
  bool payload_done_ = false, tag_done_ = false;
  bool realign_ = false;
  detail::typed_slot message_;
  // Declared last so they are destroyed first: a pending request's destructor
  // waits for the transport, which still writes send_ and tags_ until then.
  detail::typed_slot request_;
  detail::typed_slot tag_request_;
};

}  // namespace gcomp
