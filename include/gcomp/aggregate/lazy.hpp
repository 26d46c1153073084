// lazy<allgather>: workers upload or skip and every worker reuses the skippers' last messages, plus the lazy upload rule (Chen, Giannakis, Sun, Yin, "LAG: Lazily Aggregated Gradient for Communication-Efficient Distributed Learning", NeurIPS 2018).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "gcomp/aggregate/allgather.hpp"
#include "gcomp/aggregate/detail/replicated_messages.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/message.hpp"
#include "gcomp/core/wire.hpp"
#include "gcomp/detail/typed_slot.hpp"

namespace gcomp {

/// How the M messages are combined: their mean (what allgather computes) or
/// their sum (what LAG's and SASG's servers compute: the step size is already
/// inside each message).
enum class lazy_reduction { mean, sum };

struct lazy_options {
  lazy_reduction reduction = lazy_reduction::mean;
};

/// lazy<Inner>: lazy aggregation over the aggregator Inner. Only
/// lazy<allgather> exists: reusing a worker's stale message needs that
/// message on its own, which an all-reduce sums away.
template <class Inner>
class lazy {
  static_assert(std::is_same_v<Inner, allgather>,
                "gcomp::lazy<Inner>: only lazy<allgather> is provided; a lazy all-reduce cannot "
                "reuse one worker's stale message because the sum hides it");
};

/// global = reduction over workers m of decompress(msg_m), where msg_m is the
/// message worker m compressed this step if it uploads, or the last message
/// it uploaded if it skips. Whether to upload is the caller's choice (a rule
/// such as lazy_rule below), made per worker and per step; the workers need
/// not agree on it.
///
/// One all-gather of variable size per step. An uploading worker contributes
/// its encoded payload (encoded_size bytes, at least the 24-byte header) and
/// a skipping one contributes nothing, so a skip costs exactly 0 bytes and
/// an empty contribution is never ambiguous. On worker m, with U the set of
/// uploaders of the step, comm.stats() grows by
///   bytes_sent     += (m in U) ? encoded_size(msg_m) : 0,
///   bytes_received += sum over r in U, r != m, of encoded_size(msg_r),
///   collectives    += 1.
/// Every worker keeps the last message of every worker (decoded, the others'
/// as untrusted input) and adds all M in rank order, so workers agree bitwise,
/// and every worker counts every worker's uploads and skips alike.
///
/// A worker that skips before its first upload has nothing to reuse: every
/// worker throws the same gcomp::error after the exchange, global and the
/// stored messages unchanged. So does a corrupt message. The compressor has
/// compressed by then (an error_feedback residual has moved), as with
/// allgather.
///
/// save()/load() checkpoint the counters and every worker's last message (in
/// wire form). A fresh aggregator does not know its compressor's payload type
/// until its first step, so load(policy, in) keeps the messages as bytes and
/// the next aggregate() decodes them (a message of another compressor throws
/// there, nothing changed); load(policy, in, compressor) decodes them at once.
template <>
class lazy<allgather> {
 public:
  explicit lazy(lazy_options options = {}) : options_(options) {
    require(options.reduction == lazy_reduction::mean || options.reduction == lazy_reduction::sum,
            "gcomp::lazy", "options.reduction must be mean or sum, got ",
            static_cast<int>(options.reduction));
  }

  /// Every worker uploads: the same result as allgather (mean) and a drop-in
  /// gcomp::aggregator for a pipeline.
  template <class Policy, class Comm, class C, class T>
    requires compressor<C, Policy, T> && communicator<Comm, Policy, T> &&
             wire_payload<typename C::payload>
  void aggregate(const Policy& policy, Comm& comm, C& c, std::span<const T> local,
                 std::span<T> global, rng_key key) {
    aggregate(policy, comm, c, local, global, key, true);
  }

  /// upload: compress `local` and send it; otherwise send nothing (local is
  /// not read, but must still have global's size) and let every worker reuse
  /// this worker's last message.
  template <class Policy, class Comm, class C, class T>
    requires compressor<C, Policy, T> && communicator<Comm, Policy, T> &&
             wire_payload<typename C::payload>
  void aggregate(const Policy& policy, Comm& comm, C& c, std::span<const T> local,
                 std::span<T> global, rng_key key, bool upload) {
    constexpr std::string_view where = "gcomp::lazy<allgather>::aggregate";
    check_same_size(where, "global", global.size(), "local", local.size());
    using payload = typename C::payload;
    auto& s = state_.get<detail::replicated_messages<payload>>(where.data());
    const auto workers = static_cast<std::size_t>(comm.size());
    const auto me = static_cast<std::size_t>(comm.rank());
    if (started_) {
      require(workers == uploads_.size(), where, "the group has ", workers,
              " workers but this aggregator has served a group of ", uploads_.size());
      require(global.size() == dimension_, where, "global has size ", global.size(),
              " but earlier steps had size ", dimension_, "; the stored messages are of that size");
    }
    s.size_for(workers);
    if (loaded_.pending()) {
      // A checkpoint was loaded before the payload type was known: decode it now.
      loaded_.install(s, dimension_, where);
      loaded_ = {};
    }
    snapshot_ = &snapshot<payload>;
    s.prepare(policy, c, local, key, me, upload);
    // Validate and decode everything before any state or global changes.
    s.exchange(policy, comm, global.size(), where, [&](std::size_t r, std::size_t count) {
      if (count == 0)
        require(s.held[r] != 0, where, "worker ", r,
                " skipped its upload but has never uploaded, so there is no message to reuse");
    });

    if (!started_) {
      uploads_.assign(workers, 0);
      skips_.assign(workers, 0);
      dimension_ = global.size();
      started_ = true;
    }
    for (std::size_t r = 0; r < workers; ++r) ++(s.counts[r] == 0 ? skips_ : uploads_)[r];
    s.commit();
    last_bytes_ = s.bytes.size();

    T* out = global.data();
    for_each_index(policy, global.size(), [=] GCOMP_HD(std::size_t i) { out[i] = T(0); });
    const T scale = options_.reduction == lazy_reduction::mean
                        ? T(1) / static_cast<T>(workers)
                        : T(1);
    for (std::size_t r = 0; r < workers; ++r) c.decompress_add(policy, s.stored[r], global, scale);
  }

  /// Uploads / skips of worker `rank` so far (the same on every worker).
  std::uint64_t uploads(int rank) const { return uploads_.at(checked_rank(rank)); }
  std::uint64_t skips(int rank) const { return skips_.at(checked_rank(rank)); }
  std::uint64_t total_uploads() const { return sum(uploads_); }
  std::uint64_t total_skips() const { return sum(skips_); }
  /// Bytes this worker put on the wire in the last step (0 if it skipped).
  std::size_t last_bytes() const { return last_bytes_; }
  const lazy_options& options() const { return options_; }
  /// The gradient size of the steps so far (0 before the first).
  std::size_t dimension() const { return dimension_; }
  /// The group size of the steps so far (0 before the first).
  std::size_t workers() const { return uploads_.size(); }

  /// Section "gcomp::lazy<allgather>", version 1: reduction, started,
  /// dimension, uploads and skips per rank, and every rank's last message
  /// (message_bytes per rank, 0 for none; messages, concatenated in wire form).
  void save(checkpoint_writer& out) const {
    out.begin("gcomp::lazy<allgather>", 1);
    out.value("reduction", options_.reduction);
    out.value("started", started_);
    out.value("dimension", static_cast<std::uint64_t>(dimension_));
    out.array("uploads", uploads_);
    out.array("skips", skips_);
    if (loaded_.pending() || snapshot_ == nullptr)
      loaded_.save(out);  // still as loaded, or nothing held yet
    else
      snapshot_(state_).save(out);
    out.end();
  }

  /// Reads what save() wrote. Rejected, with this aggregator unchanged: a
  /// checkpoint of the other reduction, or, once this aggregator has stepped,
  /// of another group size or gradient size; and anything inconsistent (a
  /// rank with uploads but no message, a message of another dimension).
  template <class Policy>
  void load(const Policy&, checkpoint_reader& in) {
    constexpr std::string_view where = "gcomp::lazy<allgather>::load";
    in.begin("gcomp::lazy<allgather>", 1);
    const auto reduction = in.value<lazy_reduction>("reduction");
    const auto started = in.value<bool>("started");
    const auto dimension = in.value<std::uint64_t>("dimension");
    auto uploads = in.vector<std::uint64_t>("uploads");
    auto skips = in.vector<std::uint64_t>("skips");
    require(reduction == options_.reduction, where,
            "the checkpoint combines the messages by their ", reduction_name(reduction), " but this aggregator takes their ",
            reduction_name(options_.reduction));
    const std::size_t workers = started ? uploads.size() : 0;
    if (started)
      require(workers >= 1, where, "the checkpoint has stepped but records no workers");
    else
      require(uploads.empty() && dimension == 0, where,
              "the checkpoint has not stepped but records ", uploads.size(),
              " workers and dimension ", dimension);
    check_same_size(where, "the checkpoint's skips", skips.size(), "its uploads", uploads.size());
    auto messages = detail::checkpointed_messages::read(in, workers, dimension, where);
    for (std::size_t r = 0; r < workers; ++r)
      require((uploads[r] > 0) == !messages.by_rank[r].empty(), where, "rank ", r, " has ",
              uploads[r], " uploads but ", messages.by_rank[r].empty() ? "no" : "a",
              " stored message");
    in.end();
    if (started_ && started) {
      require(workers == uploads_.size(), where, "the checkpoint is of a group of ", workers,
              " workers but this aggregator has served a group of ", uploads_.size());
      require(dimension == dimension_, where, "the checkpoint holds messages of size ", dimension,
              " but this aggregator's are of size ", dimension_);
    }
    // Everything is read and checked: replace the state. The store is rebuilt
    // from the loaded bytes at the next step, when the payload type is known.
    state_ = detail::typed_slot{};
    snapshot_ = nullptr;
    loaded_ = started ? std::move(messages) : detail::checkpointed_messages{};
    started_ = started;
    dimension_ = static_cast<std::size_t>(dimension);
    uploads_ = std::move(uploads);
    skips_ = std::move(skips);
    last_bytes_ = 0;
  }

  /// As load(policy, in), and decodes the messages at once with C's payload
  /// type, so a checkpoint of another compressor is rejected here.
  template <class Policy, class C>
    requires wire_payload<typename C::payload>
  void load(const Policy& policy, checkpoint_reader& in, const C&) {
    constexpr std::string_view where = "gcomp::lazy<allgather>::load";
    lazy next(*this);
    next.load(policy, in);
    if (next.loaded_.pending()) {
      using payload = typename C::payload;
      auto& s = next.state_.get<detail::replicated_messages<payload>>(where.data());
      next.loaded_.install(s, next.dimension_, where);
      next.loaded_ = {};
      next.snapshot_ = &snapshot<payload>;
    }
    *this = std::move(next);
  }

 private:
  static std::string_view reduction_name(lazy_reduction r) {
    return r == lazy_reduction::mean ? "mean" : r == lazy_reduction::sum ? "sum" : "unknown";
  }

  // Encodes the held messages of a slot that holds replicated_messages<P>.
  template <class P>
  static detail::checkpointed_messages snapshot(const detail::typed_slot& slot) {
    return detail::checkpointed_messages::of(
        slot.get<detail::replicated_messages<P>>("gcomp::lazy<allgather>::save"));
  }

  std::size_t checked_rank(int rank) const {
    require(rank >= 0 && static_cast<std::size_t>(rank) < uploads_.size(), "gcomp::lazy<allgather>",
            "rank ", rank, " is out of range [0, ", uploads_.size(), ")");
    return static_cast<std::size_t>(rank);
  }
  static std::uint64_t sum(const std::vector<std::uint64_t>& v) {
    std::uint64_t total = 0;
    for (std::uint64_t x : v) total += x;
    return total;
  }

  lazy_options options_;
  detail::typed_slot state_;  // buffers reused every step
  bool started_ = false;
  std::size_t dimension_ = 0;
  std::vector<std::uint64_t> uploads_, skips_;
  std::size_t last_bytes_ = 0;
  detail::checkpointed_messages loaded_;  // loaded, not yet decoded
  // Encodes the slot's messages; set when the slot gets its type.
  detail::checkpointed_messages (*snapshot_)(const detail::typed_slot&) = nullptr;
};

/// The lazy rule's parameters (LAG eq. (13), SASG eq. (9)).
struct lazy_rule_options {
  /// D: the first D steps always upload, the threshold weighs the last D
  /// model changes, and no message is reused more than D steps in a row.
  /// D = 0 turns laziness off (every step uploads).
  std::size_t history = 10;
  /// alpha: the step size, > 0 and finite.
  double alpha = 0.01;
  /// xi_1..xi_D (size D, each >= 0 and finite). Empty means what the SASG
  /// code does: xi_d = alpha for d < D and xi_D = 0, i.e. the threshold is
  /// the sum of the last D - 1 model changes over alpha M^2.
  std::vector<double> xi = {};
};

/// One worker's upload rule. At step k (k counted from 0) worker m uploads iff
///   k < D, or it never uploaded, or tau_m > D, or
///   change > (1 / (alpha^2 M^2)) * sum_{d=1..D} xi_d ||x_{k+1-d} - x_{k-d}||^2,
/// where change = ||grad(x_k) - grad(xhat_m)||^2 is measured by the caller
/// (same mini-batch, or the last uploaded gradient) and the model changes are
/// what record() was told. tau_m is the age of m's message: 1 after an upload,
/// one more after every skip, so the server never uses a message older than D
/// steps. (The SASG code resets tau to 0 and so allows D + 1 skips in a row;
/// we follow the paper's bound.) Model changes not yet seen count as 0.
/// No allocation after construction.
class lazy_rule {
 public:
  explicit lazy_rule(lazy_rule_options options) : options_(std::move(options)) {
    constexpr std::string_view where = "gcomp::lazy_rule";
    require(std::isfinite(options_.alpha) && options_.alpha > 0, where,
            "alpha must be positive and finite, got ", options_.alpha);
    const std::size_t d = options_.history;
    if (options_.xi.empty()) {
      options_.xi.assign(d, options_.alpha);
      if (d > 0) options_.xi.back() = 0.0;
    }
    require(options_.xi.size() == d, where, "xi has size ", options_.xi.size(),
            " but history (D) is ", d, "; give one weight per model change, or none");
    for (std::size_t i = 0; i < d; ++i)
      require(std::isfinite(options_.xi[i]) && options_.xi[i] >= 0, where, "xi[", i,
              "] must be non-negative and finite, got ", options_.xi[i]);
    changes_.assign(d, 0.0);
  }

  /// Whether this worker uploads whatever its gradient did (warm-up, first
  /// upload, or its message is D steps old); then no change need be measured.
  bool forced() const { return steps_ < options_.history || uploads_ == 0 || tau_ > options_.history; }

  /// (1 / (alpha^2 M^2)) * sum_{d=1..D} xi_d ||x_{k+1-d} - x_{k-d}||^2 for M workers.
  double threshold(int workers) const {
    require(workers >= 1, "gcomp::lazy_rule::threshold", "workers must be at least 1, got ",
            workers);
    double total = 0;
    for (std::size_t d = 0; d < changes_.size(); ++d) total += options_.xi[d] * change_ago(d);
    const double scale = options_.alpha * static_cast<double>(workers);
    return total / (scale * scale);
  }

  /// Whether to upload, given change = ||grad(x_k) - grad(xhat)||^2.
  bool should_upload(double change, int workers) const {
    require(std::isfinite(change) && change >= 0, "gcomp::lazy_rule::should_upload",
            "change must be non-negative and finite, got ", change);
    return forced() || change > threshold(workers);
  }

  /// Ends step k: whether this worker uploaded, and ||x_{k+1} - x_k||^2.
  void record(bool uploaded, double model_change) {
    constexpr std::string_view where = "gcomp::lazy_rule::record";
    require(std::isfinite(model_change) && model_change >= 0, where,
            "model_change must be non-negative and finite, got ", model_change);
    require(uploaded || !forced(), where, "step ", steps_,
            " must upload (warm-up, first upload or staleness ", tau_, " > D = ",
            options_.history, ") but was recorded as skipped");
    if (!changes_.empty()) {
      newest_ = (newest_ + 1) % changes_.size();
      changes_[newest_] = model_change;
    }
    if (uploaded) {
      tau_ = 1;
      ++uploads_;
    } else {
      ++tau_;
      ++skips_;
    }
    ++steps_;
  }

  std::uint64_t steps() const { return steps_; }
  std::uint64_t uploads() const { return uploads_; }
  std::uint64_t skips() const { return skips_; }
  /// tau: steps since this worker's last upload (0 before the first).
  std::uint64_t staleness() const { return tau_; }
  /// The options, xi filled in.
  const lazy_rule_options& options() const { return options_; }

  /// Section "gcomp::lazy_rule", version 1: history (D), alpha and xi (to
  /// reject a checkpoint of another rule), the ring of the last D model
  /// changes with the index of the newest, and the step, upload, skip and
  /// staleness counts.
  void save(checkpoint_writer& out) const {
    out.begin("gcomp::lazy_rule", 1);
    out.value("history", static_cast<std::uint64_t>(options_.history));
    out.value("alpha", options_.alpha);
    out.array("xi", options_.xi);
    out.array("changes", changes_);
    out.value("newest", static_cast<std::uint64_t>(newest_));
    out.value("steps", steps_);
    out.value("uploads", uploads_);
    out.value("skips", skips_);
    out.value("tau", tau_);
    out.end();
  }

  /// Reads what save() wrote; a checkpoint of another D, alpha or xi, or with
  /// counts that cannot occur, is rejected with the rule unchanged.
  template <class Policy>
  void load(const Policy&, checkpoint_reader& in) {
    constexpr std::string_view where = "gcomp::lazy_rule::load";
    in.begin("gcomp::lazy_rule", 1);
    const auto history = in.value<std::uint64_t>("history");
    const auto alpha = in.value<double>("alpha");
    const auto xi = in.vector<double>("xi");
    require(history == options_.history, where, "the checkpoint's rule has history D = ", history,
            " but this rule has D = ", options_.history);
    require(alpha == options_.alpha, where, "the checkpoint's rule has alpha ", alpha,
            " but this rule has alpha ", options_.alpha);
    require(xi == options_.xi, where, "the checkpoint's rule has other weights xi than this rule");
    std::vector<double> changes(changes_.size());
    in.array("changes", std::span<double>(changes));
    const auto newest = in.value<std::uint64_t>("newest");
    const auto steps = in.value<std::uint64_t>("steps");
    const auto uploads = in.value<std::uint64_t>("uploads");
    const auto skips = in.value<std::uint64_t>("skips");
    const auto tau = in.value<std::uint64_t>("tau");
    in.end();
    for (std::size_t d = 0; d < changes.size(); ++d)
      require(std::isfinite(changes[d]) && changes[d] >= 0, where, "model change ", d,
              " must be non-negative and finite, got ", changes[d]);
    require(newest < std::max<std::size_t>(changes.size(), 1), where, "newest = ", newest,
            " is out of range [0, ", std::max<std::size_t>(changes.size(), 1), ")");
    require(uploads <= steps && skips == steps - uploads, where, "uploads ", uploads, " and skips ",
            skips, " do not add up to steps ", steps);
    // The first step uploads, and no message is reused more than D steps in a row.
    require(uploads == 0 ? (tau == 0 && steps == 0)
                         : (tau >= 1 && tau <= skips + 1 && tau <= history + 1),
            where, "staleness ", tau, " cannot follow ", uploads, " uploads and ", skips,
            " skips with D = ", history);
    changes_ = std::move(changes);
    newest_ = static_cast<std::size_t>(newest);
    steps_ = steps;
    uploads_ = uploads;
    skips_ = skips;
    tau_ = tau;
  }

 private:
  // ||x_{k-d} - x_{k-d-1}||^2 for d = 0.. (0 where not yet recorded).
  double change_ago(std::size_t d) const {
    if (d >= steps_) return 0.0;
    return changes_[(newest_ + changes_.size() - d) % changes_.size()];
  }

  lazy_rule_options options_;
  std::vector<double> changes_;  // ring of the last D model changes
  std::size_t newest_ = 0;
  std::uint64_t steps_ = 0, uploads_ = 0, skips_ = 0, tau_ = 0;
};

}  // namespace gcomp
