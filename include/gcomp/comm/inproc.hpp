// inproc_group / inproc_comm: M workers as threads of one process, with deterministic collectives.
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "gcomp/comm/stats.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/exec/policy.hpp"

namespace gcomp {

class inproc_group;
class inproc_comm;
class inproc_request;

/// Options of an inproc_group.
struct inproc_options {
  /// How long a rank blocked in a collective or in a request's wait() waits
  /// for ranks that have not arrived before it declares them failed and
  /// throws gcomp::error naming the operation, those ranks and the timeout.
  /// It stands in for the failure detector a real cluster has: a worker that
  /// crashed or hangs never reports, so only the clock can tell. The default,
  /// 10 minutes (torch.distributed's), is far above any legitimate gap between
  /// ranks' arrivals (a slow rank, a sanitizer build), and ranks that wait for
  /// each other in a true deadlock are reported at once anyway; tests that
  /// inject failures set milliseconds. no_timeout waits forever.
  std::chrono::nanoseconds timeout = std::chrono::minutes(10);

  static constexpr std::chrono::nanoseconds no_timeout = std::chrono::nanoseconds::max();
};

/// Where an injected failure (inproc_group::inject_failure) stops its rank
/// inside the collective call it fails in.
enum class inproc_fault_point {
  /// On entry, before the call is published: the other ranks never see it and
  /// time out waiting for the rank to enter the collective.
  before_post,
  /// After the call is published (its buffers are visible to the others, and
  /// a non-blocking call is queued): the others start the collective, but the
  /// failed rank never does its share nor returns, like a process that dies
  /// mid-collective. The others' buffers are then partly reduced.
  after_post
};

namespace detail {

// Thrown on the thread of a rank stopped by an injected failure, once every
// other rank of the run has finished, so that run() can join it. Not derived
// from std::exception, so worker code that catches gcomp::error or
// std::exception does not stop the unwinding; run() reports it.
struct inproc_injected_failure {
  int rank;
};

inline std::string inproc_rank_list(const std::vector<int>& ranks) {
  std::string out = ranks.size() == 1 ? "rank " : "ranks ";
  for (std::size_t i = 0; i < ranks.size(); ++i)
    out += detail::concat(i == 0 ? "" : ", ", ranks[i]);
  return out;
}

// "300 ms", "2 s", "1500 us": the largest unit that shows the value exactly.
inline std::string inproc_duration_text(std::chrono::nanoseconds d) {
  const auto n = d.count();
  if (n % 1000000000 == 0) return detail::concat(n / 1000000000, " s");
  if (n % 1000000 == 0) return detail::concat(n / 1000000, " ms");
  if (n % 1000 == 0) return detail::concat(n / 1000, " us");
  return detail::concat(n, " ns");
}

enum class inproc_op : unsigned char {
  none,
  allreduce_sum,
  allgather,
  allgatherv,
  broadcast,
  barrier,
  iallreduce_sum
};

inline const char* inproc_op_name(inproc_op op) {
  switch (op) {
    case inproc_op::allreduce_sum: return "allreduce_sum";
    case inproc_op::allgather: return "allgather";
    case inproc_op::allgatherv: return "allgatherv";
    case inproc_op::broadcast: return "broadcast";
    case inproc_op::barrier: return "barrier";
    case inproc_op::iallreduce_sum: return "iallreduce_sum";
    case inproc_op::none: break;
  }
  return "nothing";
}

// The address of inproc_type_key<T> identifies T across ranks without RTTI.
template <class T>
inline constexpr char inproc_type_key = 0;

template <class T>
constexpr const char* inproc_type_name() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, float>) return "float";
  else if constexpr (std::is_same_v<U, double>) return "double";
  else if constexpr (std::is_same_v<U, long double>) return "long double";
  else if constexpr (std::is_same_v<U, int>) return "int";
  else if constexpr (std::is_same_v<U, unsigned>) return "unsigned int";
  else if constexpr (std::is_same_v<U, long>) return "long";
  else if constexpr (std::is_same_v<U, unsigned long>) return "unsigned long";
  else if constexpr (std::is_same_v<U, long long>) return "long long";
  else if constexpr (std::is_same_v<U, unsigned long long>) return "unsigned long long";
  else if constexpr (std::is_same_v<U, short>) return "short";
  else if constexpr (std::is_same_v<U, unsigned short>) return "unsigned short";
  else if constexpr (std::is_same_v<U, signed char>) return "signed char";
  else if constexpr (std::is_same_v<U, unsigned char>) return "unsigned char";
  else if constexpr (std::is_same_v<U, char>) return "char";
  else if constexpr (std::is_same_v<U, std::byte>) return "std::byte";
  else return "another element type";
}

template <class T>
inline constexpr bool inproc_summable =
    std::is_arithmetic_v<T> && !std::is_const_v<T> && !std::is_volatile_v<T> &&
    !std::is_same_v<T, bool>;

template <class T>
inline constexpr bool inproc_copyable =
    std::is_trivially_copyable_v<T> && !std::is_const_v<T> && !std::is_volatile_v<T>;

// Whether [a, a + an) and [b, b + bn) share a byte; std::less gives a total
// order even between unrelated objects.
inline bool inproc_overlap(const void* a, std::size_t an, const void* b, std::size_t bn) {
  if (an == 0 || bn == 0) return false;
  const auto* pa = static_cast<const std::byte*>(a);
  const auto* pb = static_cast<const std::byte*>(b);
  const std::less<const std::byte*> less;
  return less(pa, pb + bn) && less(pb, pa + an);
}

// What one rank hands to a blocking collective; the last rank to arrive checks
// all of them before anyone touches a buffer.
struct inproc_post {
  inproc_op op = inproc_op::none;
  const void* type = nullptr;  // &inproc_type_key<T>
  const char* type_name = "";
  std::size_t element_size = 0;
  void* data = nullptr;  // allreduce_sum, broadcast
  std::size_t count = 0;
  const std::byte* in = nullptr;  // allgather, allgatherv
  std::size_t in_size = 0;
  std::byte* out = nullptr;  // allgather
  std::size_t out_size = 0;
  std::vector<std::byte>* grown = nullptr;  // allgatherv
  std::size_t* counts = nullptr;
  std::size_t counts_size = 0;
  bool in_overlaps_out = false;
  int root = 0;
};

// What one rank hands to a non-blocking all-reduce. `reduce` is the typed
// reduction, so the progress thread needs no per-call allocation to erase T.
struct inproc_nb_post {
  const void* type = nullptr;
  const char* type_name = "";
  std::size_t element_size = 0;
  void* data = nullptr;
  std::size_t count = 0;
  void (*reduce)(const inproc_nb_post* posts, int size) = nullptr;
};

// Sums [lo, hi) of every rank's buffer as ((x_0 + x_1) + x_2) + ... and writes
// the sum into every buffer. Buffer 0 is the accumulator: its own values are
// the first term, so no scratch is needed. Blocks keep the accumulator in
// cache while the other ranks' buffers stream past it.
template <class T, class Buffer>
void inproc_reduce_range(int size, Buffer buffer, std::size_t lo, std::size_t hi) {
  if (size <= 1 || lo >= hi) return;
  constexpr std::size_t block = std::max<std::size_t>(1, 16384 / sizeof(T));
  T* const acc = buffer(0);
  for (std::size_t begin = lo; begin < hi; begin += block) {
    const std::size_t end = std::min(hi, begin + block);
    for (int j = 1; j < size; ++j) {
      const T* const x = buffer(j);
      for (std::size_t i = begin; i < end; ++i) acc[i] = static_cast<T>(acc[i] + x[i]);
    }
    for (int j = 1; j < size; ++j)
      std::memcpy(buffer(j) + begin, acc + begin, (end - begin) * sizeof(T));
  }
}

template <class T>
void inproc_reduce_all(const inproc_nb_post* posts, int size) {
  inproc_reduce_range<T>(
      size, [posts](int j) { return static_cast<T*>(posts[j].data); }, 0, posts[0].count);
}

// The r-th of `parts` balanced contiguous chunks of [0, n).
inline std::pair<std::size_t, std::size_t> inproc_chunk(std::size_t n, int parts, int r) {
  const std::size_t p = static_cast<std::size_t>(parts), i = static_cast<std::size_t>(r);
  const std::size_t base = n / p, extra = n % p;
  const std::size_t lo = i * base + std::min(i, extra);
  return {lo, lo + base + (i < extra ? 1 : 0)};
}

// The state a group's ranks share. Every field is guarded by mutex_, except
// the posts of a collective between its two phases (written before the
// opening phase completes, read-only until the closing phase completes) and
// nb_current_ (the progress thread's own).
class inproc_state {
 public:
  enum class nb_outcome { pending, done, failed };

  // What run() learns when it ends.
  struct run_end {
    int culprit = -1;      // the rank whose exception broke the group, or -1
    std::string injected;  // what the injected failures did, "" if none fired
  };

  inproc_state(int size, std::chrono::nanoseconds timeout)
      : size_(size),
        timeout_(timeout),
        posts_(static_cast<std::size_t>(size)),
        status_(static_cast<std::size_t>(size), status::running),
        wait_seq_(static_cast<std::size_t>(size), 0),
        calls_(static_cast<std::size_t>(size), 0),
        armed_(static_cast<std::size_t>(size)),
        faults_(static_cast<std::size_t>(size)),
        fired_(static_cast<std::size_t>(size)),
        nb_queue_(static_cast<std::size_t>(size)),
        nb_head_(static_cast<std::size_t>(size), 0),
        nb_posted_(static_cast<std::size_t>(size), 0),
        nb_current_(static_cast<std::size_t>(size)) {}

  inproc_state(const inproc_state&) = delete;
  inproc_state& operator=(const inproc_state&) = delete;

  ~inproc_state() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    progress_cv_.notify_all();
    if (progress_.joinable()) progress_.join();
  }

  int size() const { return size_; }
  // The group that owns this state, for shrink(); set once, before any rank runs.
  inproc_group* owner() const { return owner_; }
  void set_owner(inproc_group* owner) { owner_ = owner; }
  const inproc_post& post(int rank) const { return posts_[static_cast<std::size_t>(rank)]; }

  // Opening phase of a collective: publishes `p` and waits for every rank.
  // The last to arrive checks all posts; if they disagree, every rank throws
  // the same message before any buffer is touched.
  //
  // A rank that has not arrived within the timeout is declared failed. A rank
  // with an injected failure parks here, before or after publishing its post.
  void open(int rank, std::string_view where, const inproc_post& p) {
    std::unique_lock lock(mutex_);
    const fault_state fault = take_fault(rank, p.op);
    if (fault == fault_state::before_post || (fault == fault_state::after_post && broken_))
      park(lock, rank);
    throw_if_broken(lock, where);
    posts_[static_cast<std::size_t>(rank)] = p;
    const std::uint64_t generation = generation_;
    if (++arrived_ == size_) {
      validate_posts();
      release();
      if (fault == fault_state::after_post) park(lock, rank);
    } else {
      // Counted as arrived, so the others start without it, but it never
      // does its share: they wait for it in the closing phase.
      if (fault == fault_state::after_post) park(lock, rank);
      status_[static_cast<std::size_t>(rank)] = status::in_collective;
      check_deadlock();
      const bool settled =
          wait_within(sync_cv_, lock, [&] { return generation_ != generation || broken_; });
      if (!settled) {
        std::vector<int> missing, waiting;
        for (std::size_t r = 0; r < status_.size(); ++r)
          (status_[r] == status::in_collective ? waiting : missing).push_back(static_cast<int>(r));
        declare_failed(missing, detail::concat(inproc_rank_list(missing), " did not enter ",
                                               inproc_op_name(p.op), " (",
                                               inproc_rank_list(waiting), " did)"));
      }
      if (generation_ == generation) {
        status_[static_cast<std::size_t>(rank)] = status::running;
        throw_broken(lock, where);
      }
    }
    if (!verdict_.empty()) {
      std::string message = detail::concat(where, ": ", verdict_);
      lock.unlock();
      throw error(message);
    }
  }

  // Closing phase: nobody leaves until every rank has finished reading and
  // writing the others' buffers. Only a rank stopped by an injected failure
  // (parked in the opening phase) can miss it: every other rank passed the
  // opening phase and runs nothing but the library's copies until it gets
  // here. So once the timeout has passed, the ranks still missing when all
  // the others are here are declared failed, and the others leave, throwing:
  // their buffers are no longer used by anyone (the parked ranks never
  // touch them), and the result lacks the failed ranks' shares.
  void close(int rank, std::string_view where) {
    std::unique_lock lock(mutex_);
    const std::uint64_t generation = generation_;
    if (++arrived_ == size_) {
      release();
      return;
    }
    const auto r = static_cast<std::size_t>(rank);
    status_[r] = status::in_collective;
    if (parked_ != 0 && arrived_ + parked_ == size_) sync_cv_.notify_all();  // see below
    auto settled = [&] {
      return generation_ != generation || (broken_ && arrived_ + parked_ == size_);
    };
    if (!wait_within(sync_cv_, lock, settled)) {
      // Past the deadline, the last rank still able to arrive wakes us (above).
      sync_cv_.wait(lock, [&] { return settled() || arrived_ + parked_ == size_; });
      if (!settled()) {
        std::vector<int> missing, waiting;
        for (std::size_t j = 0; j < status_.size(); ++j)
          (status_[j] == status::in_collective ? waiting : missing).push_back(static_cast<int>(j));
        declare_failed(missing, detail::concat(inproc_rank_list(missing), " entered ",
                                               inproc_op_name(posts_[r].op),
                                               " but did not finish it (",
                                               inproc_rank_list(waiting), " did)"));
      }
    }
    if (generation_ == generation) {
      status_[r] = status::running;
      throw_broken(lock, where);
    }
  }

  // Queues rank's next non-blocking call; returns (epoch, sequence number).
  std::pair<std::uint64_t, std::uint64_t> post_nb(int rank, std::string_view where,
                                                  const inproc_nb_post& p) {
    std::unique_lock lock(mutex_);
    const fault_state fault = take_fault(rank, inproc_op::iallreduce_sum);
    if (fault == fault_state::before_post || (fault == fault_state::after_post && broken_))
      park(lock, rank);
    throw_if_broken(lock, where);
    // Started lazily so groups that never use non-blocking calls own no extra thread.
    if (!progress_.joinable()) progress_ = std::thread([this] { progress_loop(); });
    const auto r = static_cast<std::size_t>(rank);
    nb_queue_[r].push_back(p);  // capacity is reused once the queue has drained
    const std::uint64_t seq = nb_posted_[r]++;
    if (nb_ready()) progress_cv_.notify_one();
    // Queued: the call completes once the others post theirs, into a buffer
    // that stays valid because the parked thread's stack is not unwound yet.
    if (fault == fault_state::after_post) park(lock, rank);
    return {epoch_, seq};
  }

  // Whether call `seq` of `rank` has completed. With block, waits until it
  // completed or can never complete. On failure, `message` says why.
  nb_outcome poll_nb(int rank, std::uint64_t epoch, std::uint64_t seq, bool block,
                     bool unwinding, std::string& message) {
    std::unique_lock lock(mutex_);
    if (epoch != epoch_) {
      message = "the request outlived the run() that issued it, so its call was abandoned";
      return nb_outcome::failed;
    }
    const auto r = static_cast<std::size_t>(rank);
    if (unwinding && nb_completed_ <= seq && !broken_) {
      // The rank is dying with a call in flight: the others must stop waiting
      // for its later calls, and its buffer must not be reduced into after the
      // stack frame that owns it is gone.
      break_group(rank, detail::concat("worker ", rank,
                                       " failed: an exception escaped while its non-blocking call #",
                                       seq, " was pending"));
    }
    // Even a broken group finishes a reduction already running: the caller may
    // free its buffer as soon as we return.
    auto settled = [&] { return nb_completed_ > seq || (broken_ && !nb_processing_); };
    if (block && !settled()) {
      status_[r] = status::in_wait;
      wait_seq_[r] = seq;
      check_deadlock();
      if (!wait_within(done_cv_, lock, settled)) {
        // Calls complete in order, so a rank that has not posted call `seq`
        // is what holds it up; when all have, the reduction is running and
        // will finish.
        std::vector<int> missing;
        for (std::size_t j = 0; j < nb_posted_.size(); ++j)
          if (nb_posted_[j] <= seq) missing.push_back(static_cast<int>(j));
        if (!missing.empty() && !broken_)
          declare_failed(missing, detail::concat(inproc_rank_list(missing),
                                                 " did not post non-blocking call #", seq,
                                                 " (rank ", rank, " waited for it)"));
        done_cv_.wait(lock, settled);
      }
      status_[r] = status::running;
    }
    if (nb_completed_ > seq) {
      for (auto it = nb_failed_.begin(); it != nb_failed_.end(); ++it) {
        if (it->seq != seq) continue;
        message = it->message;
        if (++it->observed == size_) nb_failed_.erase(it);
        return nb_outcome::failed;
      }
      return nb_outcome::done;
    }
    if (broken_ && !nb_processing_) {
      message = broken_message_;
      return nb_outcome::failed;
    }
    return nb_outcome::pending;
  }

  // run() support ---------------------------------------------------------

  void begin_run() {
    std::unique_lock lock(mutex_);
    require(!running_, "gcomp::inproc_group::run",
            "run() is already in progress on this group; it cannot be nested or called "
            "concurrently");
    done_cv_.wait(lock, [&] { return !nb_processing_; });
    running_ = true;
    broken_ = false;
    broken_rank_ = -1;
    broken_message_.clear();
    failed_.clear();
    arrived_ = 0;
    parked_ = 0;
    std::fill(status_.begin(), status_.end(), status::running);
    std::fill(calls_.begin(), calls_.end(), std::uint64_t{0});
    faults_ = armed_;  // armed for this run only
    std::fill(armed_.begin(), armed_.end(), fault{});
    std::fill(fired_.begin(), fired_.end(), fired{});
    for (auto& q : nb_queue_) q.clear();
    std::fill(nb_head_.begin(), nb_head_.end(), std::size_t{0});
    std::fill(nb_posted_.begin(), nb_posted_.end(), std::uint64_t{0});
    nb_completed_ = 0;
    nb_failed_.clear();
    ++epoch_;  // requests of an earlier run can no longer match this run's calls
  }

  run_end end_run() {
    std::lock_guard lock(mutex_);
    running_ = false;
    // Threads the user starts later are not the ones that returned.
    std::fill(status_.begin(), status_.end(), status::running);
    std::fill(faults_.begin(), faults_.end(), fault{});  // unfired ones expire with the run
    run_end end;
    end.culprit = broken_ ? broken_rank_ : -1;
    for (std::size_t r = 0; r < fired_.size(); ++r) {
      const fired& f = fired_[r];
      if (!f.fired) continue;
      end.injected += detail::concat(end.injected.empty() ? "" : "; ", "worker ", r,
                                     " was stopped silently by an injected failure in ",
                                     inproc_op_name(f.op), ", its collective call #", f.call, ", ",
                                     f.point == inproc_fault_point::before_post
                                         ? "before posting it"
                                         : "after posting it");
    }
    if (!end.injected.empty())
      end.injected += broken_ ? detail::concat("; the others saw: ", broken_message_)
                              : std::string("; the others finished without waiting for it");
    return end;
  }

  void worker_finished(int rank) {
    std::lock_guard lock(mutex_);
    status_[static_cast<std::size_t>(rank)] = status::finished;
    check_deadlock();
    park_cv_.notify_all();
  }

  void worker_failed(int rank, std::string_view what) {
    std::lock_guard lock(mutex_);
    status_[static_cast<std::size_t>(rank)] = status::finished;
    if (!broken_) break_group(rank, detail::concat("worker ", rank, " failed: ", what));
    park_cv_.notify_all();
  }

  // A parked rank's thread has unwound (detail::inproc_injected_failure).
  void worker_stopped(int rank) {
    std::lock_guard lock(mutex_);
    status_[static_cast<std::size_t>(rank)] = status::finished;
    --parked_;
  }

  // Ranks from `started` on have no thread: they count as finished, so that
  // no parked rank waits for them.
  void fail_start(std::string_view what, int started) {
    std::lock_guard lock(mutex_);
    for (int r = started; r < size_; ++r) status_[static_cast<std::size_t>(r)] = status::finished;
    if (!broken_) break_group(-1, detail::concat("could not start the worker threads: ", what));
    park_cv_.notify_all();
  }

  // Fault injection and failures -------------------------------------------

  void arm(int rank, std::uint64_t call, inproc_fault_point point) {
    constexpr std::string_view where = "gcomp::inproc_group::inject_failure";
    std::lock_guard lock(mutex_);
    require(!running_, where,
            "cannot arm a failure while run() is in progress; arm it before the run");
    fault& f = armed_[static_cast<std::size_t>(rank)];
    require(!f.armed, where, "rank ", rank,
            " already has a failure armed, at its collective call #", f.call);
    f = fault{true, call, point};
  }

  // The ranks declared failed (ascending): the one whose exception broke the
  // group, or those a timeout found missing. Empty if not broken, or broken
  // by a deadlock or mismatch that no rank's failure caused.
  std::vector<int> failed() const {
    std::lock_guard lock(mutex_);
    return failed_;
  }

 private:
  enum class status : unsigned char { running, in_collective, in_wait, finished, parked };

  struct nb_failure {
    std::uint64_t seq;
    std::string message;
    int observed;
  };

  enum class fault_state { none, before_post, after_post };

  struct fault {
    bool armed = false;
    std::uint64_t call = 0;
    inproc_fault_point point = inproc_fault_point::after_post;
  };

  struct fired {
    bool fired = false;
    inproc_op op = inproc_op::none;
    std::uint64_t call = 0;
    inproc_fault_point point = inproc_fault_point::after_post;
  };

  // Caller holds the lock. Counts the rank's collective call and says
  // whether an injected failure stops it there (only inside run()).
  fault_state take_fault(int rank, inproc_op op) {
    const auto r = static_cast<std::size_t>(rank);
    const std::uint64_t call = calls_[r]++;
    fault& f = faults_[r];
    if (!running_ || !f.armed || f.call != call) return fault_state::none;
    f.armed = false;
    fired_[r] = fired{true, op, call, f.point};
    return f.point == inproc_fault_point::before_post ? fault_state::before_post
                                                      : fault_state::after_post;
  }

  // Caller holds the lock. The rank stops as a crashed or hung worker would:
  // it never reports and never returns, so the others find out only by the
  // timeout. When every other rank of the run has finished, it unwinds so
  // that run() can join it; by then no reduction reads its buffers.
  [[noreturn]] void park(std::unique_lock<std::mutex>& lock, int rank) {
    status_[static_cast<std::size_t>(rank)] = status::parked;
    ++parked_;
    sync_cv_.notify_all();  // closing phases count parked ranks
    park_cv_.wait(lock, [&] {
      if (nb_processing_) return false;
      for (status s : status_)
        if (s != status::finished && s != status::parked) return false;
      return true;
    });
    lock.unlock();
    throw inproc_injected_failure{rank};
  }

  // Caller holds the lock. Waits on cv until pred holds or the timeout has
  // passed since the call; returns pred().
  template <class Pred>
  bool wait_within(std::condition_variable& cv, std::unique_lock<std::mutex>& lock, Pred pred) {
    using clock = std::chrono::steady_clock;
    const clock::time_point now = clock::now();
    // A timeout that would overflow the clock is no timeout.
    if (timeout_ >= std::chrono::duration_cast<std::chrono::nanoseconds>(
                        clock::time_point::max() - now)) {
      cv.wait(lock, pred);
      return true;
    }
    return cv.wait_until(lock, now + std::chrono::duration_cast<clock::duration>(timeout_), pred);
  }

  // Caller holds the lock. A timeout found `missing` absent: they count as
  // failed, and everyone waiting throws.
  void declare_failed(std::vector<int> missing, std::string what) {
    break_group(-1, detail::concat("timed out after ", inproc_duration_text(timeout_), ": ",
                                   what, "; ", missing.size() == 1 ? "it counts" : "they count",
                                   " as failed"));
    failed_ = std::move(missing);
  }

  void release() {
    arrived_ = 0;
    ++generation_;
    for (auto& s : status_)
      if (s == status::in_collective) s = status::running;
    sync_cv_.notify_all();
  }

  void throw_if_broken(std::unique_lock<std::mutex>& lock, std::string_view where) {
    if (broken_) throw_broken(lock, where);
  }

  [[noreturn]] void throw_broken(std::unique_lock<std::mutex>& lock, std::string_view where) {
    std::string message = detail::concat(where, ": ", broken_message_);
    lock.unlock();
    throw error(message);
  }

  // Caller holds the lock. A rank >= 0 failed (it threw) and is the one
  // rank declared failed.
  void break_group(int rank, std::string message) {
    broken_ = true;
    broken_rank_ = rank;
    broken_message_ = std::move(message);
    failed_.clear();
    if (rank >= 0) failed_.push_back(rank);
    sync_cv_.notify_all();
    done_cv_.notify_all();
    progress_cv_.notify_all();
  }

  bool nb_ready() const {
    for (std::size_t r = 0; r < nb_queue_.size(); ++r)
      if (nb_head_[r] >= nb_queue_[r].size()) return false;
    return true;
  }

  // A parked rank is not stuck: from the outside it is indistinguishable from
  // a rank that is busy, which only the timeout can tell from a failed one.
  bool stuck(std::size_t r) const {
    switch (status_[r]) {
      case status::in_collective:
      case status::finished: return true;
      case status::in_wait: return nb_completed_ <= wait_seq_[r];
      case status::running:
      case status::parked: break;
    }
    return false;
  }

  // Caller holds the lock. When every rank waits for something only another
  // rank could provide, nothing will ever change: break the group so that all
  // of them throw instead of hanging.
  void check_deadlock() {
    if (broken_ || nb_processing_ || nb_ready()) return;
    bool waiting = false;  // ranks that all returned are done, not deadlocked
    for (std::size_t r = 0; r < status_.size(); ++r) {
      if (!stuck(r)) return;
      waiting = waiting || status_[r] != status::finished;
    }
    if (!waiting) return;
    std::string message = "deadlock:";
    for (std::size_t r = 0; r < status_.size(); ++r) {
      message += r == 0 ? " " : ", ";
      switch (status_[r]) {
        case status::in_collective:
          message += detail::concat("rank ", r, " waits in ", inproc_op_name(posts_[r].op));
          break;
        case status::in_wait:
          message += detail::concat("rank ", r, " waits for its non-blocking call #", wait_seq_[r]);
          break;
        default: message += detail::concat("rank ", r, " returned from run()"); break;
      }
    }
    message += "; every rank must make the same collective calls in the same order";
    break_group(-1, std::move(message));
  }

  // Caller holds the lock. Leaves verdict_ empty when the posts agree.
  void validate_posts() {
    verdict_.clear();
    const inproc_post& first = posts_[0];
    for (std::size_t r = 1; r < posts_.size(); ++r) {
      if (posts_[r].op != first.op) {
        verdict_ = detail::concat("rank 0 called ", inproc_op_name(first.op), " but rank ", r,
                                  " called ", inproc_op_name(posts_[r].op),
                                  "; every rank must make the same collective calls in the same "
                                  "order");
        return;
      }
    }
    switch (first.op) {
      case inproc_op::allreduce_sum:
        verdict_ = same_data("data");
        return;
      case inproc_op::broadcast:
        for (std::size_t r = 0; r < posts_.size(); ++r) {
          if (posts_[r].root < 0 || posts_[r].root >= size_) {
            verdict_ = detail::concat("root is ", posts_[r].root, " on rank ", r,
                                      " but must be in [0, ", size_, ")");
            return;
          }
        }
        for (std::size_t r = 1; r < posts_.size(); ++r) {
          if (posts_[r].root != first.root) {
            verdict_ = detail::concat("root is ", first.root, " on rank 0 but ", posts_[r].root,
                                      " on rank ", r, "; every rank must pass the same root");
            return;
          }
        }
        verdict_ = same_data("data");
        return;
      case inproc_op::allgather:
        for (std::size_t r = 1; r < posts_.size(); ++r) {
          if (posts_[r].in_size != first.in_size) {
            verdict_ = detail::concat("in has ", first.in_size, " bytes on rank 0 but ",
                                      posts_[r].in_size, " on rank ", r,
                                      "; every rank must pass the same size");
            return;
          }
        }
        for (std::size_t r = 0; r < posts_.size(); ++r) {
          const std::size_t want = static_cast<std::size_t>(size_) * first.in_size;
          if (posts_[r].out_size != want) {
            verdict_ = detail::concat("out has ", posts_[r].out_size, " bytes on rank ", r,
                                      " but must have size() * in.size() = ", size_, " * ",
                                      first.in_size, " = ", want);
            return;
          }
          if (posts_[r].in_overlaps_out) {
            verdict_ = detail::concat("in overlaps out on rank ", r,
                                      "; they must be separate buffers");
            return;
          }
        }
        return;
      case inproc_op::allgatherv:
        for (std::size_t r = 0; r < posts_.size(); ++r) {
          if (posts_[r].counts_size != static_cast<std::size_t>(size_)) {
            verdict_ = detail::concat("counts has size ", posts_[r].counts_size, " on rank ", r,
                                      " but must have size() = ", size_);
            return;
          }
          if (posts_[r].in_overlaps_out) {
            verdict_ = detail::concat("in overlaps the storage of out on rank ", r,
                                      "; it must be a separate buffer since out is resized");
            return;
          }
        }
        return;
      case inproc_op::barrier:
      case inproc_op::iallreduce_sum:
      case inproc_op::none: return;
    }
  }

  // Same element type and count on every rank; "" when they agree.
  template <class Post>
  static std::string check_same_data(const Post* posts, std::size_t n, const char* name) {
    for (std::size_t r = 1; r < n; ++r) {
      if (posts[r].type != posts[0].type)
        return detail::concat(name, " holds ", posts[0].type_name, " (", posts[0].element_size,
                              " bytes) on rank 0 but ", posts[r].type_name, " (",
                              posts[r].element_size, " bytes) on rank ", r,
                              "; every rank must pass the same element type");
    }
    for (std::size_t r = 1; r < n; ++r) {
      if (posts[r].count != posts[0].count)
        return detail::concat(name, " has ", posts[0].count, " elements on rank 0 but ",
                              posts[r].count, " on rank ", r,
                              "; every rank must pass the same size");
    }
    return {};
  }

  std::string same_data(const char* name) const {
    return check_same_data(posts_.data(), posts_.size(), name);
  }

  // The progress thread: runs the k-th non-blocking call once every rank has
  // posted its k-th, outside the lock so callers are never held up by it.
  void progress_loop() {
    std::unique_lock lock(mutex_);
    for (;;) {
      progress_cv_.wait(lock, [&] { return stop_ || (!broken_ && nb_ready()); });
      if (stop_) return;
      for (std::size_t r = 0; r < nb_queue_.size(); ++r) nb_current_[r] = nb_queue_[r][nb_head_[r]];
      const std::uint64_t seq = nb_completed_;
      std::string verdict = check_same_data(nb_current_.data(), nb_current_.size(), "data");
      nb_processing_ = true;
      if (verdict.empty()) {
        lock.unlock();
        nb_current_[0].reduce(nb_current_.data(), size_);
        lock.lock();
      } else {
        nb_failed_.push_back({seq, detail::concat("gcomp::inproc_comm::iallreduce_sum: ", verdict),
                              0});
      }
      nb_processing_ = false;
      for (std::size_t r = 0; r < nb_queue_.size(); ++r) {
        if (++nb_head_[r] == nb_queue_[r].size()) {
          nb_queue_[r].clear();
          nb_head_[r] = 0;
        }
      }
      ++nb_completed_;
      done_cv_.notify_all();
      if (parked_ != 0) park_cv_.notify_all();  // a parked rank waits for no reduction in flight
      check_deadlock();
    }
  }

  const int size_;
  const std::chrono::nanoseconds timeout_;
  inproc_group* owner_ = nullptr;
  mutable std::mutex mutex_;
  std::condition_variable sync_cv_;      // collective phases
  std::condition_variable done_cv_;      // non-blocking completions
  std::condition_variable progress_cv_;  // the progress thread
  std::condition_variable park_cv_;      // ranks stopped by injected failures

  // Blocking collectives: a two-phase rendezvous counted by generation.
  std::vector<inproc_post> posts_;
  int arrived_ = 0;
  std::uint64_t generation_ = 0;
  std::string verdict_;

  // Failure and deadlock detection.
  std::vector<status> status_;
  std::vector<std::uint64_t> wait_seq_;
  bool broken_ = false;
  int broken_rank_ = -1;
  std::string broken_message_;
  std::vector<int> failed_;
  bool running_ = false;

  // Injected failures: armed_ for the next run, faults_ for this one; calls_
  // counts each rank's collective calls in this run.
  std::vector<std::uint64_t> calls_;
  std::vector<fault> armed_;
  std::vector<fault> faults_;
  std::vector<fired> fired_;
  int parked_ = 0;

  // Non-blocking calls: per-rank FIFO queues; call k of every rank is
  // completed together, so one counter says which calls are done.
  std::vector<std::vector<inproc_nb_post>> nb_queue_;
  std::vector<std::size_t> nb_head_;
  std::vector<std::uint64_t> nb_posted_;
  std::vector<inproc_nb_post> nb_current_;
  std::uint64_t nb_completed_ = 0;
  bool nb_processing_ = false;
  std::vector<nb_failure> nb_failed_;
  std::uint64_t epoch_ = 0;
  std::thread progress_;
  bool stop_ = false;
};

}  // namespace detail

/// The handle of one non-blocking call. A default-constructed request is
/// already complete. Movable, not copyable. If it is destroyed while its call
/// is pending, the destructor waits for the call (and ignores its errors), so
/// the buffer is never written after the request is gone; if that happens
/// during stack unwinding (an exception is escaping the worker), the group is
/// broken first, so the other ranks stop waiting for this one and throw.
class inproc_request {
 public:
  inproc_request() = default;
  inproc_request(const inproc_request&) = delete;
  inproc_request& operator=(const inproc_request&) = delete;
  inproc_request(inproc_request&& other) noexcept
      : comm_(std::exchange(other.comm_, nullptr)),
        epoch_(other.epoch_),
        seq_(other.seq_),
        bytes_(other.bytes_),
        uncaught_(other.uncaught_) {}
  inproc_request& operator=(inproc_request&& other) noexcept {
    if (this != &other) {
      abandon();
      comm_ = std::exchange(other.comm_, nullptr);
      epoch_ = other.epoch_;
      seq_ = other.seq_;
      bytes_ = other.bytes_;
      uncaught_ = other.uncaught_;
    }
    return *this;
  }
  ~inproc_request() { abandon(); }

  /// Blocks until the call completed; then the data holds the sum. Throws
  /// gcomp::error if the ranks' calls did not match (the data is then
  /// unchanged) or the group broke. Afterwards the request is complete.
  void wait() { finish("gcomp::inproc_request::wait", true); }

  /// Whether the call completed (never blocks); throws like wait() when it
  /// failed. Once it returned true, the request is complete.
  bool test() { return finish("gcomp::inproc_request::test", false); }

 private:
  friend class inproc_comm;
  inproc_request(inproc_comm* comm, std::uint64_t epoch, std::uint64_t seq, std::uint64_t bytes)
      : comm_(comm), epoch_(epoch), seq_(seq), bytes_(bytes),
        uncaught_(std::uncaught_exceptions()) {}

  inline bool finish(std::string_view where, bool block);

  void abandon() noexcept {
    if (!comm_) return;
    try {
      (void)finish("gcomp::inproc_request::~inproc_request", true);
    } catch (...) {  // a destructor cannot report; wait() is the place to see errors
    }
    comm_ = nullptr;
  }

  inproc_comm* comm_ = nullptr;
  std::uint64_t epoch_ = 0;
  std::uint64_t seq_ = 0;
  std::uint64_t bytes_ = 0;
  int uncaught_ = 0;
};

/// One rank's handle on its group. Only that rank's thread may use it.
///
/// Every collective must be called by all ranks in the same order with
/// matching arguments; a mismatch makes every rank throw gcomp::error naming
/// the argument and the values, before any buffer is written. The Policy
/// parameter is accepted for uniformity with the MPI and NCCL communicators;
/// the in-process transport does its work on the calling threads.
class inproc_comm {
 public:
  inproc_comm(inproc_comm&&) noexcept = default;
  inproc_comm& operator=(inproc_comm&&) noexcept = default;
  inproc_comm(const inproc_comm&) = delete;
  inproc_comm& operator=(const inproc_comm&) = delete;

  int rank() const { return rank_; }
  int size() const { return state_->size(); }

  /// In place: data becomes ((x_0 + x_1) + x_2) + ... in rank order, bitwise
  /// identical on every rank. Rank r sums the r-th chunk of the index range
  /// from every rank's buffer and writes it back into all of them, so the
  /// ranks share the work and need no scratch.
  template <host_memory_policy Policy, class T>
  void allreduce_sum(const Policy&, std::span<T> data) {
    static_assert(detail::inproc_summable<T>,
                  "allreduce_sum sums in place: T must be a non-const arithmetic type other "
                  "than bool");
    constexpr std::string_view where = "gcomp::inproc_comm::allreduce_sum";
    detail::inproc_post p;
    p.op = detail::inproc_op::allreduce_sum;
    set_data(p, data);
    state_->open(rank_, where, p);
    const int m = size();
    const auto [lo, hi] = detail::inproc_chunk(data.size(), m, rank_);
    detail::inproc_reduce_range<T>(
        m, [this](int j) { return static_cast<T*>(state_->post(j).data); }, lo, hi);
    state_->close(rank_, where);
    count(data.size_bytes(), data.size_bytes());
  }

  /// out = every rank's `in`, in rank order. in.size() must be the same on
  /// every rank and out.size() == size() * in.size(); in and out must not overlap.
  template <host_memory_policy Policy>
  void allgather(const Policy&, std::span<const std::byte> in, std::span<std::byte> out) {
    constexpr std::string_view where = "gcomp::inproc_comm::allgather";
    detail::inproc_post p;
    p.op = detail::inproc_op::allgather;
    p.in = in.data();
    p.in_size = in.size();
    p.out = out.data();
    p.out_size = out.size();
    p.in_overlaps_out = detail::inproc_overlap(in.data(), in.size(), out.data(), out.size());
    state_->open(rank_, where, p);
    const std::size_t n = in.size();
    if (n != 0)
      for (int j = 0; j < size(); ++j)
        std::memcpy(out.data() + static_cast<std::size_t>(j) * n, state_->post(j).in, n);
    state_->close(rank_, where);
    count(n, static_cast<std::uint64_t>(size() - 1) * n);
  }

  /// out = every rank's `in` concatenated in rank order (sizes may differ);
  /// counts (size() entries) receives every rank's in.size(). out is resized
  /// to the total, so its capacity is reused from call to call; `in` must not
  /// point into out's storage.
  template <host_memory_policy Policy>
  void allgatherv(const Policy&, std::span<const std::byte> in, std::vector<std::byte>& out,
                  std::span<std::size_t> counts) {
    constexpr std::string_view where = "gcomp::inproc_comm::allgatherv";
    detail::inproc_post p;
    p.op = detail::inproc_op::allgatherv;
    p.in = in.data();
    p.in_size = in.size();
    p.grown = &out;
    p.counts = counts.data();
    p.counts_size = counts.size();
    p.in_overlaps_out = detail::inproc_overlap(in.data(), in.size(), out.data(), out.capacity());
    state_->open(rank_, where, p);
    // Growing `out` may throw; the closing phase must still be reached so
    // that no rank leaves while others read its `in`.
    std::exception_ptr failure;
    std::size_t total = 0;
    try {
      for (int j = 0; j < size(); ++j) total += state_->post(j).in_size;
      out.resize(total);
      std::size_t offset = 0;
      for (int j = 0; j < size(); ++j) {
        const detail::inproc_post& q = state_->post(j);
        counts[static_cast<std::size_t>(j)] = q.in_size;
        if (q.in_size != 0) std::memcpy(out.data() + offset, q.in, q.in_size);
        offset += q.in_size;
      }
    } catch (...) {
      failure = std::current_exception();
    }
    state_->close(rank_, where);
    if (failure) std::rethrow_exception(failure);
    count(in.size(), total - in.size());
  }

  /// Every rank's data becomes root's data. Size, element type and root must
  /// match on every rank; root must be in [0, size()).
  template <host_memory_policy Policy, class T>
  void broadcast(const Policy&, std::span<T> data, int root) {
    static_assert(detail::inproc_copyable<T>,
                  "broadcast writes data on every rank but the root: T must be a non-const "
                  "trivially copyable type");
    constexpr std::string_view where = "gcomp::inproc_comm::broadcast";
    detail::inproc_post p;
    p.op = detail::inproc_op::broadcast;
    set_data(p, data);
    p.root = root;
    state_->open(rank_, where, p);
    if (rank_ != root && !data.empty())
      std::memcpy(static_cast<void*>(data.data()), state_->post(root).data, data.size_bytes());
    state_->close(rank_, where);
    if (rank_ == root) count(data.size_bytes(), 0);
    else count(0, data.size_bytes());
  }

  /// Returns once every rank has called barrier().
  void barrier() {
    detail::inproc_post p;
    p.op = detail::inproc_op::barrier;
    state_->open(rank_, "gcomp::inproc_comm::barrier", p);
    count(0, 0);
  }

  /// Non-blocking allreduce_sum: returns at once. The k-th non-blocking call
  /// of each rank matches the k-th of the others; when all have posted it, the
  /// group's progress thread (started on first use) computes the same
  /// deterministic sum as allreduce_sum. The caller must not touch data until
  /// the request's wait() returned or test() returned true. A mismatch across
  /// ranks makes wait()/test() throw on every rank, with data unchanged.
  template <host_memory_policy Policy, class T>
  [[nodiscard]] inproc_request iallreduce_sum(const Policy&, std::span<T> data) {
    static_assert(detail::inproc_summable<T>,
                  "iallreduce_sum sums in place: T must be a non-const arithmetic type other "
                  "than bool");
    detail::inproc_nb_post p;
    p.type = &detail::inproc_type_key<T>;
    p.type_name = detail::inproc_type_name<T>();
    p.element_size = sizeof(T);
    p.data = data.data();
    p.count = data.size();
    p.reduce = &detail::inproc_reduce_all<T>;
    const auto [epoch, seq] = state_->post_nb(rank_, "gcomp::inproc_comm::iallreduce_sum", p);
    return inproc_request(this, epoch, seq, data.size_bytes());
  }

  /// Traffic of this rank since construction or reset_stats(); see comm_stats.
  comm_stats stats() const { return stats_; }
  void reset_stats() { stats_ = {}; }

  /// The ranks of this group declared failed, ascending: the worker whose
  /// exception broke the group, or the ranks a timeout found missing (see
  /// inproc_options::timeout). Empty while the group is whole, and when it
  /// was broken by something no rank's failure caused (a deadlock).
  std::vector<int> failed_ranks() const { return state_->failed(); }

  /// The communicator of the survivors, like MPI ULFM's MPI_Comm_shrink: a
  /// group of the ranks not in failed_ranks(), in the same order (survivor r
  /// has the r-th smallest old rank), with the same options. Every survivor
  /// gets its own handle on the same new group, whichever calls first; it
  /// lives until the next run() of this group or the group's end. Throws
  /// gcomp::error if no rank has failed or this rank is one of the failed.
  inline inproc_comm& shrink();

 private:
  friend class inproc_group;
  friend class inproc_request;

  inproc_comm(detail::inproc_state* state, int rank) : state_(state), rank_(rank) {}

  template <class T>
  static void set_data(detail::inproc_post& p, std::span<T> data) {
    p.type = &detail::inproc_type_key<T>;
    p.type_name = detail::inproc_type_name<T>();
    p.element_size = sizeof(T);
    p.data = static_cast<void*>(data.data());
    p.count = data.size();
  }

  // Applies the accounting rule of comm_stats: with one rank nothing crosses.
  void count(std::uint64_t sent, std::uint64_t received) {
    if (size() > 1) {
      stats_.bytes_sent += sent;
      stats_.bytes_received += received;
    }
    ++stats_.collectives;
  }

  detail::inproc_state* state_;
  int rank_;
  comm_stats stats_;
};

inline bool inproc_request::finish(std::string_view where, bool block) {
  if (!comm_) return true;
  std::string message;
  const bool unwinding = std::uncaught_exceptions() > uncaught_;
  const auto outcome =
      comm_->state_->poll_nb(comm_->rank_, epoch_, seq_, block, unwinding, message);
  using outcome_t = detail::inproc_state::nb_outcome;
  if (outcome == outcome_t::pending) return false;
  inproc_comm* comm = std::exchange(comm_, nullptr);
  if (outcome == outcome_t::failed) throw error(detail::concat(where, ": ", message));
  comm->count(bytes_, bytes_);
  return true;
}

/// A group of size() workers that are threads of this process; each rank's
/// handle is comm(rank). Tests and demos use it to run a distributed
/// algorithm without MPI. Not copyable or movable (the handles point into it);
/// it must outlive every request its handles issued.
///
/// Failures: a worker that throws breaks the group at once (see run()); one
/// that fails silently (crashed, hung) is declared failed by the others after
/// options().timeout. inject_failure() makes a worker fail silently at an
/// exact point, so tests of what the survivors do (inproc_comm::shrink) are
/// deterministic.
class inproc_group {
 public:
  explicit inproc_group(int size, inproc_options options = {})
      : options_(options), state_(make_state(size, options)) {
    state_->set_owner(this);
    comms_.reserve(static_cast<std::size_t>(size));
    for (int r = 0; r < size; ++r) comms_.push_back(inproc_comm(state_.get(), r));
  }
  inproc_group(const inproc_group&) = delete;
  inproc_group& operator=(const inproc_group&) = delete;

  int size() const { return state_->size(); }
  const inproc_options& options() const { return options_; }

  /// Arms a silent failure for the next run(): rank `rank` stops at its
  /// collective call number `call` of that run (0-based, counting
  /// allreduce_sum, allgather, allgatherv, broadcast, barrier and
  /// iallreduce_sum calls; waits are not calls), at `point`, and from then on
  /// neither returns nor reports, like a crashed process. The others get
  /// gcomp::error from the collective or wait they block in once
  /// options().timeout has passed, naming the operation, the missing rank(s)
  /// and the timeout. The stopped thread is released to unwind when every
  /// other worker of the run has finished (it throws an internal type that
  /// `catch (const std::exception&)` does not catch: never swallow it with
  /// `catch (...)`), and run() then reports the failure. The failure fires
  /// at most once and expires with the run; several ranks may have one each.
  /// Calls made outside run() (from threads the caller starts) never fail.
  void inject_failure(int rank, std::uint64_t call,
                      inproc_fault_point point = inproc_fault_point::after_post) {
    constexpr std::string_view where = "gcomp::inproc_group::inject_failure";
    check_in_half_open(where, "rank", rank, 0, size());
    require(point == inproc_fault_point::before_post || point == inproc_fault_point::after_post,
            where, "point must be before_post or after_post, got ", static_cast<int>(point));
    state_->arm(rank, call, point);
  }

  inproc_comm& comm(int rank) {
    check_in_half_open("gcomp::inproc_group::comm", "rank", rank, 0, size());
    return comms_[static_cast<std::size_t>(rank)];
  }
  const inproc_comm& comm(int rank) const {
    check_in_half_open("gcomp::inproc_group::comm", "rank", rank, 0, size());
    return comms_[static_cast<std::size_t>(rank)];
  }

  /// Calls f(comm(r)) on size() new threads, one per rank (f is shared: it is
  /// called concurrently), and joins them all.
  ///
  /// If a worker throws, the group is broken: every other rank blocked in, or
  /// later entering, a collective or a wait throws gcomp::error("...worker R
  /// failed: <what>") instead of hanging, and so does a set of ranks that can
  /// no longer make progress (mismatched calls, a worker that returned early:
  /// "deadlock: ..."), and so do ranks that waited options().timeout for
  /// ranks that never came ("...timed out after T: rank R did not enter
  /// allreduce_sum..."). After joining, run() rethrows the exception of the
  /// worker that broke the group, which is the original cause; else, if an
  /// injected failure fired, it throws gcomp::error("gcomp::inproc_group::run:
  /// worker R was stopped silently by an injected failure in <operation>...;
  /// the others saw: <their error>"), adding what the lowest other rank that
  /// threw said; else it rethrows the exception of the lowest rank that threw.
  /// Each run() starts with a healed group (and drops the survivors' group of
  /// an earlier shrink()), so a group can be reused after a failed run.
  template <class F>
  void run(F&& f) {
    state_->begin_run();  // throws if a run is in progress, which may use the survivors' group
    {
      std::lock_guard lock(successor_mutex_);
      successor_.reset();
    }
    const auto n = static_cast<std::size_t>(size());
    std::vector<std::exception_ptr> errors(n);
    std::vector<char> stopped(n, 0);  // stopped by an injected failure
    auto body = [&](int r) {
      const auto i = static_cast<std::size_t>(r);
      try {
        f(comms_[i]);
        state_->worker_finished(r);
      } catch (const detail::inproc_injected_failure&) {
        stopped[i] = 1;
        state_->worker_stopped(r);
      } catch (...) {
        errors[i] = std::current_exception();
        state_->worker_failed(r, describe(errors[i]));
      }
    };
    std::vector<std::thread> threads;
    try {
      threads.reserve(n);
      for (int r = 0; r < size(); ++r) threads.emplace_back(body, r);
    } catch (const std::exception& e) {
      state_->fail_start(e.what(), static_cast<int>(threads.size()));
      for (auto& t : threads) t.join();
      state_->end_run();
      throw;
    }
    for (auto& t : threads) t.join();
    const detail::inproc_state::run_end end = state_->end_run();
    if (end.culprit >= 0 && !stopped[static_cast<std::size_t>(end.culprit)] &&
        errors[static_cast<std::size_t>(end.culprit)])
      std::rethrow_exception(errors[static_cast<std::size_t>(end.culprit)]);
    if (!end.injected.empty()) {
      std::string message = end.injected;
      for (std::size_t r = 0; r < n; ++r) {
        if (!errors[r]) continue;
        message += detail::concat("; worker ", r, " threw: ", describe(errors[r]));
        break;
      }
      fail("gcomp::inproc_group::run", message);
    }
    for (auto& e : errors)
      if (e) std::rethrow_exception(e);
  }

 private:
  friend class inproc_comm;

  static std::unique_ptr<detail::inproc_state> make_state(int size,
                                                          const inproc_options& options) {
    constexpr std::string_view where = "gcomp::inproc_group::inproc_group";
    check_positive(where, "size", size);
    require(options.timeout > std::chrono::nanoseconds::zero(), where,
            "options.timeout must be > 0 (inproc_options::no_timeout waits forever), got ",
            detail::inproc_duration_text(options.timeout));
    return std::make_unique<detail::inproc_state>(size, options.timeout);
  }

  // The handle of survivor `rank` (a rank of this group) on the group of the
  // ranks not in `failed`, created by the first survivor to ask.
  inproc_comm& survivor(int rank, const std::vector<int>& failed) {
    std::lock_guard lock(successor_mutex_);
    if (!successor_)
      successor_ = std::make_unique<inproc_group>(size() - static_cast<int>(failed.size()),
                                                  options_);
    int below = 0;  // failed ranks before this one
    for (int f : failed) below += f < rank ? 1 : 0;
    return successor_->comms_[static_cast<std::size_t>(rank - below)];
  }

  static std::string describe(const std::exception_ptr& e) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& x) {
      return x.what();
    } catch (...) {
      return "an exception not derived from std::exception";
    }
  }

  inproc_options options_;
  std::unique_ptr<detail::inproc_state> state_;
  std::vector<inproc_comm> comms_;
  std::mutex successor_mutex_;  // survivors call shrink() concurrently
  std::unique_ptr<inproc_group> successor_;
};

inline inproc_comm& inproc_comm::shrink() {
  constexpr std::string_view where = "gcomp::inproc_comm::shrink";
  const std::vector<int> failed = state_->failed();
  require(!failed.empty(), where,
          "no rank of this group has failed (failed_ranks() is empty), so there are no survivors "
          "to shrink to");
  for (int f : failed)
    require(f != rank_, where, "rank ", rank_, " was declared failed (failed_ranks() is ",
            detail::inproc_rank_list(failed), "); only survivors can shrink");
  return state_->owner()->survivor(rank_, failed);
}

}  // namespace gcomp
