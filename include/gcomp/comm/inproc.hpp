// inproc_group / inproc_comm: M workers as threads of one process, with deterministic collectives.
#pragma once

#include <algorithm>
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

namespace gcomp {

class inproc_group;
class inproc_comm;
class inproc_request;

namespace detail {

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

  explicit inproc_state(int size)
      : size_(size),
        posts_(static_cast<std::size_t>(size)),
        status_(static_cast<std::size_t>(size), status::running),
        wait_seq_(static_cast<std::size_t>(size), 0),
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
  const inproc_post& post(int rank) const { return posts_[static_cast<std::size_t>(rank)]; }

  // Opening phase of a collective: publishes `p` and waits for every rank.
  // The last to arrive checks all posts; if they disagree, every rank throws
  // the same message before any buffer is touched.
  void open(int rank, std::string_view where, const inproc_post& p) {
    std::unique_lock lock(mutex_);
    throw_if_broken(lock, where);
    posts_[static_cast<std::size_t>(rank)] = p;
    const std::uint64_t generation = generation_;
    if (++arrived_ == size_) {
      validate_posts();
      release();
    } else {
      status_[static_cast<std::size_t>(rank)] = status::in_collective;
      check_deadlock();
      sync_cv_.wait(lock, [&] { return generation_ != generation || broken_; });
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
  // writing the others' buffers. It ignores a broken group on purpose: every
  // rank passed the opening phase and none can fail in between, so all will
  // arrive, and leaving early would free buffers others still use.
  void close(int rank) {
    std::unique_lock lock(mutex_);
    const std::uint64_t generation = generation_;
    if (++arrived_ == size_) {
      release();
    } else {
      status_[static_cast<std::size_t>(rank)] = status::in_collective;
      sync_cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }

  // Queues rank's next non-blocking call; returns (epoch, sequence number).
  std::pair<std::uint64_t, std::uint64_t> post_nb(int rank, std::string_view where,
                                                  const inproc_nb_post& p) {
    std::unique_lock lock(mutex_);
    throw_if_broken(lock, where);
    // Started lazily so groups that never use non-blocking calls own no extra thread.
    if (!progress_.joinable()) progress_ = std::thread([this] { progress_loop(); });
    const auto r = static_cast<std::size_t>(rank);
    nb_queue_[r].push_back(p);  // capacity is reused once the queue has drained
    const std::uint64_t seq = nb_posted_[r]++;
    if (nb_ready()) progress_cv_.notify_one();
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
      done_cv_.wait(lock, settled);
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
    arrived_ = 0;
    std::fill(status_.begin(), status_.end(), status::running);
    for (auto& q : nb_queue_) q.clear();
    std::fill(nb_head_.begin(), nb_head_.end(), std::size_t{0});
    std::fill(nb_posted_.begin(), nb_posted_.end(), std::uint64_t{0});
    nb_completed_ = 0;
    nb_failed_.clear();
    ++epoch_;  // requests of an earlier run can no longer match this run's calls
  }

  // Returns the rank whose failure broke the group, or -1.
  int end_run() {
    std::lock_guard lock(mutex_);
    running_ = false;
    // Threads the user starts later are not the ones that returned.
    std::fill(status_.begin(), status_.end(), status::running);
    return broken_ ? broken_rank_ : -1;
  }

  void worker_finished(int rank) {
    std::lock_guard lock(mutex_);
    status_[static_cast<std::size_t>(rank)] = status::finished;
    check_deadlock();
  }

  void worker_failed(int rank, std::string_view what) {
    std::lock_guard lock(mutex_);
    status_[static_cast<std::size_t>(rank)] = status::finished;
    if (!broken_) break_group(rank, detail::concat("worker ", rank, " failed: ", what));
  }

  void fail_start(std::string_view what) {
    std::lock_guard lock(mutex_);
    if (!broken_) break_group(-1, detail::concat("could not start the worker threads: ", what));
  }

 private:
  enum class status : unsigned char { running, in_collective, in_wait, finished };

  struct nb_failure {
    std::uint64_t seq;
    std::string message;
    int observed;
  };

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

  // Caller holds the lock.
  void break_group(int rank, std::string message) {
    broken_ = true;
    broken_rank_ = rank;
    broken_message_ = std::move(message);
    sync_cv_.notify_all();
    done_cv_.notify_all();
    progress_cv_.notify_all();
  }

  bool nb_ready() const {
    for (std::size_t r = 0; r < nb_queue_.size(); ++r)
      if (nb_head_[r] >= nb_queue_[r].size()) return false;
    return true;
  }

  bool stuck(std::size_t r) const {
    switch (status_[r]) {
      case status::in_collective:
      case status::finished: return true;
      case status::in_wait: return nb_completed_ <= wait_seq_[r];
      case status::running: break;
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
      check_deadlock();
    }
  }

  const int size_;
  std::mutex mutex_;
  std::condition_variable sync_cv_;      // collective phases
  std::condition_variable done_cv_;      // non-blocking completions
  std::condition_variable progress_cv_;  // the progress thread

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
  bool running_ = false;

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
  template <class Policy, class T>
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
    state_->close(rank_);
    count(data.size_bytes(), data.size_bytes());
  }

  /// out = every rank's `in`, in rank order. in.size() must be the same on
  /// every rank and out.size() == size() * in.size(); in and out must not overlap.
  template <class Policy>
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
    state_->close(rank_);
    count(n, static_cast<std::uint64_t>(size() - 1) * n);
  }

  /// out = every rank's `in` concatenated in rank order (sizes may differ);
  /// counts (size() entries) receives every rank's in.size(). out is resized
  /// to the total, so its capacity is reused from call to call; `in` must not
  /// point into out's storage.
  template <class Policy>
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
    state_->close(rank_);
    if (failure) std::rethrow_exception(failure);
    count(in.size(), total - in.size());
  }

  /// Every rank's data becomes root's data. Size, element type and root must
  /// match on every rank; root must be in [0, size()).
  template <class Policy, class T>
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
    state_->close(rank_);
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
  template <class Policy, class T>
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
class inproc_group {
 public:
  explicit inproc_group(int size) : state_(make_state(size)) {
    comms_.reserve(static_cast<std::size_t>(size));
    for (int r = 0; r < size; ++r) comms_.push_back(inproc_comm(state_.get(), r));
  }
  inproc_group(const inproc_group&) = delete;
  inproc_group& operator=(const inproc_group&) = delete;

  int size() const { return state_->size(); }

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
  /// "deadlock: ..."). After joining, run() rethrows the exception of the
  /// worker that broke the group, which is the original cause; if none did,
  /// the exception of the lowest rank that threw. Each run() starts with a
  /// healed group, so a group can be reused after a failed run.
  template <class F>
  void run(F&& f) {
    state_->begin_run();
    const auto n = static_cast<std::size_t>(size());
    std::vector<std::exception_ptr> errors(n);
    auto body = [&](int r) {
      try {
        f(comms_[static_cast<std::size_t>(r)]);
        state_->worker_finished(r);
      } catch (...) {
        errors[static_cast<std::size_t>(r)] = std::current_exception();
        state_->worker_failed(r, describe(errors[static_cast<std::size_t>(r)]));
      }
    };
    std::vector<std::thread> threads;
    try {
      threads.reserve(n);
      for (int r = 0; r < size(); ++r) threads.emplace_back(body, r);
    } catch (const std::exception& e) {
      state_->fail_start(e.what());
      for (auto& t : threads) t.join();
      state_->end_run();
      throw;
    }
    for (auto& t : threads) t.join();
    const int culprit = state_->end_run();
    if (culprit >= 0 && errors[static_cast<std::size_t>(culprit)])
      std::rethrow_exception(errors[static_cast<std::size_t>(culprit)]);
    for (auto& e : errors)
      if (e) std::rethrow_exception(e);
  }

 private:
  static std::unique_ptr<detail::inproc_state> make_state(int size) {
    check_positive("gcomp::inproc_group::inproc_group", "size", size);
    return std::make_unique<detail::inproc_state>(size);
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

  std::unique_ptr<detail::inproc_state> state_;
  std::vector<inproc_comm> comms_;
};

}  // namespace gcomp
