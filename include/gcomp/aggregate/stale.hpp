// Bounded delays (Khirirat, Feyzmahdavian, Johansson, "Distributed learning with compressed gradients", arXiv:1806.06573, 2018): a seeded delay schedule, a ring buffer of past models, and the parameter server that keeps every worker's last compressed message.
//
// Why models and not gradients: the ring buffer keeps the last tau models
// x_{k-1}, ..., x_{k-tau}, and the gradient is computed at the one the delay
// picks, so a worker computes one gradient per refresh (not one per step) and
// a stochastic (mini-batch) gradient sees exactly the stale model the theory
// assumes.
//
// The distributed parameter server (class parameter_server): the paper's
// server keeps q_i, the last compressed gradient of worker i, and steps
// x_{k+1} = x_k - gamma * sum_i q_i. Here every worker plays the server for
// itself, so all workers keep identical x without a server process: at step
// k the workers whose refresh is due (a rule every worker evaluates alike,
// refresh_schedule) send their new encoded message through one allgatherv,
// the others send zero bytes; every worker decodes the new messages in rank
// order into its copy of the q_i, keeps the old q_i of the others, and adds
// all q_i in rank order. Every worker therefore applies bitwise the same sum,
// and the bytes on the wire are exactly the due workers' messages. A step on
// which no worker is due needs no collective at all.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "gcomp/aggregate/detail/replicated_messages.hpp"
#include "gcomp/compress/detail/random_sampling.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/message.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/detail/typed_slot.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp {

namespace detail {
inline constexpr std::uint64_t delay_tag = 0x79616c65642d6b74ull;  // "tk-delay"
}  // namespace detail

/// How the delay tau_k of step k is chosen.
enum class delay_kind {
  fixed,    // tau_k = tau: the worst case the bounds are stated for
  uniform,  // tau_k uniform in [0, tau], drawn from Philox
};

struct delay_options {
  std::size_t max_delay = 0;            // tau, at most delay_schedule::max_supported
  delay_kind kind = delay_kind::fixed;
  std::uint64_t seed = 0;               // keys of the uniform draws
};

/// tau_k^m for step k and worker m: a pure function of (options, k, m), so a
/// run is reproducible and any worker can compute any other's delay. A delay
/// that would reach before the first model is cut to k (x_j = x_0 for j < 0).
class delay_schedule {
 public:
  /// Bounds the ring buffer (tau + 1 models) against a typo'd tau.
  static constexpr std::size_t max_supported = std::size_t{1} << 20;

  delay_schedule() = default;
  explicit delay_schedule(delay_options options) : options_(options) {
    check_in_range("gcomp::delay_schedule", "options.max_delay", options.max_delay, std::size_t{0},
                   max_supported);
    require(options.kind == delay_kind::fixed || options.kind == delay_kind::uniform,
            "gcomp::delay_schedule", "options.kind = ", static_cast<int>(options.kind),
            " is neither fixed nor uniform");
  }

  std::size_t max_delay() const { return options_.max_delay; }
  const delay_options& options() const { return options_; }

  /// The drawn tau_k in [0, tau], before the cut at k: fixed gives tau, uniform
  /// gives uniform_below(rng_key{seed, k, m}.fork(delay_tag), 0, tau + 1),
  /// exactly uniform (Lemire's multiply-shift with rejection).
  std::size_t drawn(std::uint64_t step, std::uint32_t worker = 0) const {
    if (options_.kind == delay_kind::fixed || options_.max_delay == 0) return options_.max_delay;
    const rng_key key = rng_key{options_.seed, step, worker}.fork(detail::delay_tag);
    return static_cast<std::size_t>(detail::uniform_below(key, 0, options_.max_delay + 1));
  }

  /// The delay used at step k: min(drawn(k, m), k).
  std::size_t delay(std::uint64_t step, std::uint32_t worker = 0) const {
    return static_cast<std::size_t>(std::min<std::uint64_t>(drawn(step, worker), step));
  }

 private:
  delay_options options_;
};

/// The last `depth` models x_{k-1}, ..., x_{k-depth} in a ring buffer of
/// depth * n elements, sized on the first push and reused after it.
/// ago(d) is the model pushed d pushes ago (ago(1) the latest).
template <class T>
class model_history {
 public:
  explicit model_history(std::size_t depth = 0) : depth_(depth) {
    check_in_range("gcomp::model_history", "depth", depth, std::size_t{0},
                   delay_schedule::max_supported);
  }

  std::size_t depth() const { return depth_; }
  /// Models held: min(pushes, depth).
  std::size_t size() const { return static_cast<std::size_t>(std::min<std::uint64_t>(pushes_, depth_)); }
  std::uint64_t pushes() const { return pushes_; }
  /// Elements per model (0 before the first push).
  std::size_t dimension() const { return dimension_; }

  /// Appends x, dropping the oldest model once depth are held. Every model
  /// must have the first one's size (a caller's bug otherwise; throws, the
  /// history unchanged).
  template <class Policy>
  void push(const Policy& policy, std::span<const T> x) {
    detail::require_host_memory<Policy>();
    if (pushes_ != 0)
      check_same_size("gcomp::model_history::push", "x", x.size(), "the models held", dimension_);
    if (depth_ != 0) {
      if (pushes_ == 0) buffer_.resize(depth_ * x.size());
      T* slot = buffer_.data() + static_cast<std::size_t>(pushes_ % depth_) * x.size();
      const T* in = x.data();
      for_each_index(policy, x.size(), [=](std::size_t i) { slot[i] = in[i]; });
    }
    dimension_ = x.size();
    ++pushes_;
  }

  /// The model pushed d pushes ago, d in [1, size()].
  std::span<const T> ago(std::size_t d) const {
    check_in_range("gcomp::model_history::ago", "d", d, std::size_t{1}, std::max<std::size_t>(size(), 1));
    require(size() != 0, "gcomp::model_history::ago", "no model has been pushed (depth ", depth_, ")");
    const std::size_t slot = static_cast<std::size_t>((pushes_ - d) % depth_);
    return std::span<const T>(buffer_).subspan(slot * dimension_, dimension_);
  }

  /// Forgets every model (keeps the memory).
  void clear() {
    pushes_ = 0;
    dimension_ = 0;
  }

  /// Section "gcomp::model_history", version 1: depth, pushes, dimension and
  /// the size() models held, oldest first (ago(size()) ... ago(1)).
  void save(checkpoint_writer& out) const {
    out.begin("gcomp::model_history", 1);
    out.value("depth", static_cast<std::uint64_t>(depth_));
    out.value("pushes", pushes_);
    out.value("dimension", static_cast<std::uint64_t>(dimension_));
    std::vector<T> models;
    models.reserve(size() * dimension_);
    for (std::size_t d = size(); d >= 1; --d) {
      const auto m = ago(d);
      models.insert(models.end(), m.begin(), m.end());
    }
    out.array("models", models);
    out.end();
  }

  /// Reads what save() wrote; a checkpoint of another depth, or whose models
  /// do not add up, is rejected with the history unchanged.
  template <class Policy>
  void load(const Policy&, checkpoint_reader& in) {
    constexpr std::string_view where = "gcomp::model_history::load";
    in.begin("gcomp::model_history", 1);
    const auto depth = in.value<std::uint64_t>("depth");
    const auto pushes = in.value<std::uint64_t>("pushes");
    const auto dimension = in.value<std::uint64_t>("dimension");
    const auto models = in.vector<T>("models");
    in.end();
    require(depth == depth_, where, "the checkpoint's history holds ", depth,
            " models but this one holds ", depth_);
    require(pushes != 0 || dimension == 0, where, "a history without pushes has dimension ",
            dimension);
    const std::uint64_t held = std::min<std::uint64_t>(pushes, depth);
    require(dimension == 0 ? models.empty() : models.size() / dimension == held &&
                                                  models.size() % dimension == 0,
            where, "the checkpoint holds ", models.size(), " values, not ", held,
            " models of dimension ", dimension);
    std::vector<T> buffer(pushes != 0 ? depth_ * static_cast<std::size_t>(dimension) : 0);
    const std::size_t n = static_cast<std::size_t>(dimension);
    for (std::uint64_t j = 0; j < held; ++j) {
      // models[j] is the one pushed held - j pushes ago, at push number pushes - held + j.
      const std::size_t slot = static_cast<std::size_t>((pushes - held + j) % depth_);
      std::copy_n(models.begin() + static_cast<std::ptrdiff_t>(j * n), n,
                  buffer.begin() + static_cast<std::ptrdiff_t>(slot * n));
    }
    pushes_ = pushes;
    dimension_ = n;
    buffer_ = std::move(buffer);
  }

 private:
  std::size_t depth_;
  std::uint64_t pushes_ = 0;
  std::size_t dimension_ = 0;
  std::vector<T> buffer_;
};

/// Which workers refresh their message at step k: worker m when
/// k % period == m % period, and every worker at step 0 (so the server's sum
/// holds all M messages from the first step on). period 1 is every worker at
/// every step. A message used at step k is then at most period - 1 steps old
/// on the server and was computed from a model tau_k older still: the
/// effective delay is tau + period - 1.
class refresh_schedule {
 public:
  explicit refresh_schedule(std::size_t period = 1) : period_(period) {
    check_positive("gcomp::refresh_schedule", "period", period);
  }
  std::size_t period() const { return period_; }
  bool due(std::uint64_t step, int worker) const {
    return step == 0 || step % period_ == static_cast<std::uint64_t>(worker) % period_;
  }

 private:
  std::size_t period_;
};

/// The server's side of the asynchronous aggregated form, replicated on every
/// worker (see the top of this file): keeps the last message q_r of every
/// rank r and, each step, replaces those of the ranks marked due.
///
/// aggregate(policy, comm, c, due, local, global, key): due[r] != 0 for the
/// ranks that send at this step, the same on every worker (checked: a rank
/// that sends while marked idle, or the reverse, makes every worker throw).
/// This worker compresses `local` with `key` if it is due (else `local` is
/// not read), then global = sum over ranks r in rank order of
/// decompress(q_r); a rank that has never sent adds nothing. Received bytes
/// are decoded as untrusted input before anything is stored, so a corrupt
/// message throws with the stored messages and `global` unchanged.
///
/// As a gcomp::aggregator (aggregate without a mask, e.g. inside
/// gcomp::pipeline) the due ranks of step key.step are those the server's
/// refresh_schedule marks: with period 1 every rank sends every step and
/// global is the sum of the fresh messages; with period p each rank's
/// message is up to p - 1 steps stale.
///
/// save()/load() checkpoint every rank's last message (in wire form). As
/// with lazy<allgather>, a server that has not stepped yet does not know the
/// payload type, so the loaded messages are decoded at the next aggregate()
/// (a message of another compressor throws there, nothing changed), or at
/// once by load(policy, in, compressor).
class parameter_server {
 public:
  explicit parameter_server(refresh_schedule refresh = refresh_schedule{}) : refresh_(refresh) {}

  /// The aggregator form: due ranks from the refresh schedule at key.step.
  template <class Policy, class Comm, class C, class T>
    requires compressor<C, Policy, T> && communicator<Comm, Policy, T> &&
             wire_payload<typename C::payload>
  void aggregate(const Policy& policy, Comm& comm, C& c, std::span<const T> local,
                 std::span<T> global, rng_key key) {
    due_.resize(static_cast<std::size_t>(comm.size()));
    for (int r = 0; r < comm.size(); ++r)
      due_[static_cast<std::size_t>(r)] = refresh_.due(key.step, r) ? 1 : 0;
    aggregate(policy, comm, c, std::span<const std::uint8_t>(due_), local, global, key);
  }

  template <class Policy, class Comm, class C, class T>
    requires compressor<C, Policy, T> && communicator<Comm, Policy, T> &&
             wire_payload<typename C::payload>
  void aggregate(const Policy& policy, Comm& comm, C& c, std::span<const std::uint8_t> due,
                 std::span<const T> local, std::span<T> global, rng_key key) {
    detail::require_host_memory<Policy>();
    constexpr std::string_view where = "gcomp::parameter_server::aggregate";
    const std::size_t ranks = static_cast<std::size_t>(comm.size());
    const std::size_t me = static_cast<std::size_t>(comm.rank());
    check_same_size(where, "due", due.size(), "comm.size()", ranks);
    const bool sending = due[me] != 0;
    if (sending) check_same_size(where, "local", local.size(), "global", global.size());
    using payload = typename C::payload;
    auto& s = state_.get<state<payload, T>>(where.data());
    auto& store = s.messages;
    if (ranks_ == 0) {
      dimension_ = global.size();
      ranks_ = ranks;
    }
    check_same_size(where, "global", global.size(), "the dimension of the held messages",
                    dimension_);
    check_same_size(where, "comm.size()", ranks, "the ranks of the held messages", ranks_);
    store.size_for(ranks);
    if (loaded_.pending()) {
      // A checkpoint was loaded before the payload type was known: decode it now.
      loaded_.install(store, dimension_, where);
      loaded_ = {};
    }
    snapshot_ = &snapshot<payload, T>;
    last_bytes_ = 0;
    const bool anyone = std::any_of(due.begin(), due.end(), [](std::uint8_t d) { return d != 0; });
    if (anyone) {
      store.prepare(policy, c, local, key, me, sending);
      // Decode every new message before anything is stored.
      store.exchange(policy, comm, global.size(), where, [&](std::size_t r, std::size_t count) {
        require((count != 0) == (due[r] != 0), where, "rank ", r, " sent ", count,
                " bytes but is marked ", due[r] != 0 ? "due" : "idle",
                " at this step; every worker must pass the same due mask");
      });
      last_bytes_ = store.bytes.size();
    }
    // The sum goes to scratch first: a message that does not fit this
    // compressor throws in decompress_add before anything is stored or written.
    s.sum.assign(global.size(), T(0));
    const std::span<T> sum(s.sum);
    for (std::size_t r = 0; r < ranks; ++r) {
      if (anyone && due[r] != 0)
        c.decompress_add(policy, store.staged[r], sum, T(1));
      else if (store.held[r] != 0)
        c.decompress_add(policy, store.stored[r], sum, T(1));
    }
    if (anyone) store.commit();
    const T* in = s.sum.data();
    T* out = global.data();
    for_each_index(policy, global.size(), [=](std::size_t i) { out[i] = in[i]; });
  }

  /// Bytes this worker put on the wire in the last step (0 when not due).
  std::size_t last_bytes() const { return last_bytes_; }
  const refresh_schedule& refresh() const { return refresh_; }
  /// The gradient size and group size of the steps so far (0 before the first).
  std::size_t dimension() const { return dimension_; }
  std::size_t ranks() const { return ranks_; }

  /// Section "gcomp::parameter_server", version 1: period (to reject a
  /// checkpoint of another refresh schedule), ranks and dimension (0 before
  /// the first step), and every rank's last message (message_bytes per rank,
  /// 0 for none; messages, concatenated in wire form).
  void save(checkpoint_writer& out) const {
    out.begin("gcomp::parameter_server", 1);
    out.value("period", static_cast<std::uint64_t>(refresh_.period()));
    out.value("ranks", static_cast<std::uint64_t>(ranks_));
    out.value("dimension", static_cast<std::uint64_t>(dimension_));
    if (loaded_.pending() || snapshot_ == nullptr)
      loaded_.save(out);  // still as loaded, or nothing held yet
    else
      snapshot_(state_).save(out);
    out.end();
  }

  /// Reads what save() wrote. Rejected, with the server unchanged: another
  /// period, or, once this server has stepped, another group or gradient
  /// size; and messages that do not match the recorded sizes.
  template <class Policy>
  void load(const Policy&, checkpoint_reader& in) {
    constexpr std::string_view where = "gcomp::parameter_server::load";
    in.begin("gcomp::parameter_server", 1);
    const auto period = in.value<std::uint64_t>("period");
    const auto ranks = in.value<std::uint64_t>("ranks");
    const auto dimension = in.value<std::uint64_t>("dimension");
    require(period == refresh_.period(), where, "the checkpoint's server refreshes with period ",
            period, " but this one with period ", refresh_.period());
    require(ranks != 0 || dimension == 0, where, "a server that has not stepped has dimension ",
            dimension);
    auto messages = detail::checkpointed_messages::read(in, static_cast<std::size_t>(ranks),
                                                        dimension, where);
    in.end();
    if (ranks_ != 0 && ranks != 0) {
      require(ranks == ranks_, where, "the checkpoint is of a group of ", ranks,
              " ranks but this server has served ", ranks_);
      require(dimension == dimension_, where, "the checkpoint holds messages of size ", dimension,
              " but this server's are of size ", dimension_);
    }
    // The store is rebuilt from the loaded bytes at the next step, when the payload type is known.
    state_ = detail::typed_slot{};
    snapshot_ = nullptr;
    loaded_ = std::move(messages);
    ranks_ = static_cast<std::size_t>(ranks);
    dimension_ = static_cast<std::size_t>(dimension);
    last_bytes_ = 0;
  }

  /// As load(policy, in), and decodes the messages at once with C's payload
  /// type (summing in T), so a checkpoint of another compressor is rejected here.
  template <class Policy, class C>
    requires wire_payload<typename C::payload>
  void load(const Policy& policy, checkpoint_reader& in, const C&) {
    constexpr std::string_view where = "gcomp::parameter_server::load";
    using payload = typename C::payload;
    using T = typename C::value_type;
    parameter_server next(*this);
    next.load(policy, in);
    if (next.loaded_.pending()) {
      auto& store = next.state_.get<state<payload, T>>(where.data()).messages;
      next.loaded_.install(store, next.dimension_, where);
      next.loaded_ = {};
      next.snapshot_ = &snapshot<payload, T>;
    }
    *this = std::move(next);
  }

 private:
  template <class P, class T>
  struct state {
    detail::replicated_messages<P> messages;  // q_r, the last message of every rank
    std::vector<T> sum;                       // sum of the q_r before it reaches global
  };

  // Encodes the held messages of a slot that holds state<P, T>.
  template <class P, class T>
  static detail::checkpointed_messages snapshot(const detail::typed_slot& slot) {
    return detail::checkpointed_messages::of(
        slot.get<state<P, T>>("gcomp::parameter_server::save").messages);
  }

  refresh_schedule refresh_;
  detail::typed_slot state_;
  std::size_t last_bytes_ = 0;
  std::size_t ranks_ = 0, dimension_ = 0;  // fixed by the first step (or a checkpoint)
  std::vector<std::uint8_t> due_;           // the aggregator form's mask
  detail::checkpointed_messages loaded_;   // loaded, not yet decoded
  // Encodes the slot's messages; set when the slot gets its type.
  detail::checkpointed_messages (*snapshot_)(const detail::typed_slot&) = nullptr;
};

}  // namespace gcomp
