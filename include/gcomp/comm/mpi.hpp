// mpi_comm: gcomp's communicator over a user's MPI communicator (plus mpi_environment, an RAII MPI_Init for examples).
#pragma once

#include <mpi.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <climits>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
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

/// How mpi_comm sums.
///  - native: MPI_Allreduce / MPI_Iallreduce. Fastest; MPI may add the ranks'
///    values in any order (Open MPI uses recursive doubling, rings...), so sums
///    of floating-point values may differ in the last bits from a rank-ordered
///    sum (and, for some MPI libraries, from run to run).
///  - rank_ordered: every element becomes ((x_0 + x_1) + x_2) + ... in rank
///    order, bitwise identical to inproc_comm and on every rank. The blocking
///    call is a reduce-scatter built from MPI_Alltoallv (rank r sums the r-th
///    slice in rank order) followed by MPI_Allgatherv: the same traffic as a
///    ring all-reduce. The non-blocking call gathers every rank's whole buffer
///    (MPI_Iallgather, (M - 1) times the traffic and M times the buffer as
///    scratch, allocated per call) and sums once completion is observed.
enum class mpi_summation { native, rank_ordered };

struct mpi_options {
  mpi_summation summation = mpi_summation::native;
  /// Before each blocking collective, one small MPI_Allreduce compares the
  /// ranks' arguments (operation, element type, size, root) and whether each
  /// rank's own checks passed, so that a mismatch or a bad argument on one
  /// rank makes *every* rank throw the same gcomp::error instead of leaving
  /// the others blocked in MPI. Costs one latency-bound collective per call;
  /// turn it off once a program is known to be correct.
  bool check_across_ranks = true;
  /// The most elements one MPI call carries. MPI counts and displacements are
  /// int, so larger buffers are split into pieces of at most this many
  /// elements (bytes for allgather, allgatherv and broadcast). Must be in
  /// [1, INT_MAX]; tests lower it to exercise the splitting on small buffers.
  std::size_t max_count = static_cast<std::size_t>(INT_MAX);
  /// How long a blocking collective (all its MPI calls together) or a
  /// request's wait() may take before this rank gives up with gcomp::error
  /// naming the operation and the timeout, instead of hanging for a rank that
  /// failed, hangs or made another call. no_timeout (the default) uses MPI's
  /// blocking calls; any other value (> 0) uses their non-blocking forms
  /// (MPI_Iallreduce, MPI_Ialltoallv, MPI_Iallgather(v), MPI_Ibcast,
  /// MPI_Ibarrier), polled with MPI_Testall until the deadline: the same
  /// data and byte counts, though native sums may differ in the last bits
  /// from the blocking MPI_Allreduce's (rank_ordered sums do not). A timed-out
  /// operation cannot be cancelled: it stays pending and owns its buffers,
  /// so the communicator refuses every later call and, when destroyed, leaks
  /// its state rather than free memory MPI may still write. The job should
  /// end: see mpi_abort_on_exception.
  std::chrono::nanoseconds timeout = no_timeout;

  static constexpr std::chrono::nanoseconds no_timeout = std::chrono::nanoseconds::max();
};

namespace detail {

inline std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS)
    return concat("MPI error code ", code);
  return std::string(text, static_cast<std::size_t>(std::max(length, 0)));
}

/// Throws gcomp::error("where: what failed: <MPI_Error_string>") unless code is MPI_SUCCESS.
template <class... What>
void mpi_check(int code, std::string_view where, const What&... what) {
  if (code != MPI_SUCCESS) fail(where, what..., " failed: ", mpi_error_text(code));
}

// "300 ms", "2 s", "1500 us": the largest unit that shows the value exactly.
inline std::string mpi_duration_text(std::chrono::nanoseconds d) {
  const auto n = d.count();
  if (n % 1000000000 == 0) return concat(n / 1000000000, " s");
  if (n % 1000000 == 0) return concat(n / 1000000, " ms");
  if (n % 1000 == 0) return concat(n / 1000, " us");
  return concat(n, " ns");
}

// Now + timeout, or the clock's end where that would overflow.
inline std::chrono::steady_clock::time_point mpi_deadline(std::chrono::nanoseconds timeout) {
  using clock = std::chrono::steady_clock;
  const clock::time_point now = clock::now();
  const clock::duration left = clock::time_point::max() - now;
  if (timeout >= std::chrono::duration_cast<std::chrono::nanoseconds>(left))
    return clock::time_point::max();
  return now + std::chrono::duration_cast<clock::duration>(timeout);
}

// What every timeout message ends with.
inline constexpr const char* mpi_timeout_advice =
    ": another rank failed, hangs or made a different call. The operation stays pending and owns "
    "its buffers, so this communicator cannot be used again: end the job (MPI_Abort; see "
    "gcomp::mpi_abort_on_exception)";

// Polls n requests with MPI_Testall until they complete (true, with MPI's
// code in `code`) or the deadline passes (false). It yields at first, for
// short waits, then sleeps briefly between polls, so that a rank waiting
// long does not take a core from the ranks it waits for.
inline bool mpi_test_until(MPI_Request* requests, int n,
                           std::chrono::steady_clock::time_point deadline, int& code) {
  for (int polls = 0;; ++polls) {
    int done = 0;
    code = MPI_Testall(n, requests, &done, MPI_STATUSES_IGNORE);
    if (code != MPI_SUCCESS || done) return true;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    if (polls < 64) std::this_thread::yield();
    else std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

// The element types mpi_comm sums, with the MPI datatype and a code that lets
// ranks compare their types in one integer.
template <class T>
struct mpi_sum_type {
  static constexpr int code = 0;  // not summable
};
#define GCOMP_MPI_SUM_TYPE(T, CODE, DATATYPE)                   \
  template <>                                                   \
  struct mpi_sum_type<T> {                                      \
    static constexpr int code = CODE;                           \
    static constexpr const char* name = #T;                     \
    static MPI_Datatype datatype() { return DATATYPE; }         \
  };
GCOMP_MPI_SUM_TYPE(float, 1, MPI_FLOAT)
GCOMP_MPI_SUM_TYPE(double, 2, MPI_DOUBLE)
GCOMP_MPI_SUM_TYPE(long double, 3, MPI_LONG_DOUBLE)
GCOMP_MPI_SUM_TYPE(signed char, 4, MPI_SIGNED_CHAR)
GCOMP_MPI_SUM_TYPE(unsigned char, 5, MPI_UNSIGNED_CHAR)
GCOMP_MPI_SUM_TYPE(short, 6, MPI_SHORT)
GCOMP_MPI_SUM_TYPE(unsigned short, 7, MPI_UNSIGNED_SHORT)
GCOMP_MPI_SUM_TYPE(int, 8, MPI_INT)
GCOMP_MPI_SUM_TYPE(unsigned int, 9, MPI_UNSIGNED)
GCOMP_MPI_SUM_TYPE(long, 10, MPI_LONG)
GCOMP_MPI_SUM_TYPE(unsigned long, 11, MPI_UNSIGNED_LONG)
GCOMP_MPI_SUM_TYPE(long long, 12, MPI_LONG_LONG)
GCOMP_MPI_SUM_TYPE(unsigned long long, 13, MPI_UNSIGNED_LONG_LONG)
#undef GCOMP_MPI_SUM_TYPE
// plain char sums as whichever of signed/unsigned char it is
template <>
struct mpi_sum_type<char> {
  static constexpr int code = 14;
  static constexpr const char* name = "char";
  static MPI_Datatype datatype() {
    return std::is_signed_v<char> ? MPI_SIGNED_CHAR : MPI_UNSIGNED_CHAR;
  }
};

template <class T>
inline constexpr bool mpi_summable = !std::is_const_v<T> && !std::is_volatile_v<T> &&
                                     mpi_sum_type<std::remove_cv_t<T>>::code != 0;

inline std::string mpi_type_name(long long code) {
  if (code > 100) return concat("a ", code - 100, "-byte type");  // broadcast of other types
  switch (code) {
    case 1: return "float";
    case 2: return "double";
    case 3: return "long double";
    case 4: return "signed char";
    case 5: return "unsigned char";
    case 6: return "short";
    case 7: return "unsigned short";
    case 8: return "int";
    case 9: return "unsigned int";
    case 10: return "long";
    case 11: return "unsigned long";
    case 12: return "long long";
    case 13: return "unsigned long long";
    case 14: return "char";
    default: return "bytes";
  }
}

enum class mpi_op : int { allreduce_sum = 1, allgather, allgatherv, broadcast, barrier };

inline const char* mpi_op_name(long long op) {
  switch (op) {
    case 1: return "allreduce_sum";
    case 2: return "allgather";
    case 3: return "allgatherv";
    case 4: return "broadcast";
    case 5: return "barrier";
    default: return "another collective";
  }
}

// What a rank passes to a blocking collective, compared across ranks.
struct mpi_call {
  mpi_op op;
  long long type = 0;   // mpi_sum_type code, 0 for bytes
  long long size = 0;   // elements (bytes for allgather); not compared for allgatherv
  long long root = 0;
  bool compare_size = true;
};

// Whether [a, a + an) and [b, b + bn) share a byte.
inline bool mpi_overlap(const void* a, std::size_t an, const void* b, std::size_t bn) {
  if (an == 0 || bn == 0) return false;
  const auto* pa = static_cast<const std::byte*>(a);
  const auto* pb = static_cast<const std::byte*>(b);
  const std::less<const std::byte*> less;
  return less(pa, pb + bn) && less(pb, pa + an);
}

// The r-th of `parts` balanced contiguous slices of [0, n).
inline std::pair<std::size_t, std::size_t> mpi_slice(std::size_t n, int parts, int r) {
  const std::size_t p = static_cast<std::size_t>(parts), i = static_cast<std::size_t>(r);
  const std::size_t base = n / p, extra = n % p;
  const std::size_t lo = i * base + std::min(i, extra);
  return {lo, lo + base + (i < extra ? 1 : 0)};
}

// Pieces of at most max_count elements covering [0, n); n == 0 is one empty
// piece, so that an empty call is still one collective on every rank.
inline std::size_t mpi_pieces(std::size_t n, std::size_t max_count) {
  return n == 0 ? 1 : (n + max_count - 1) / max_count;
}

// Sums the gathered buffers of a rank-ordered iallreduce into data:
// gathered piece k (elements [k * max, k * max + len)) lies at M * k * max,
// rank j's part of it at M * k * max + j * len.
template <class T>
void mpi_sum_gathered(const std::byte* scratch, void* out, std::size_t n, int m,
                      std::size_t max_count) {
  const T* gathered = reinterpret_cast<const T*>(scratch);
  T* data = static_cast<T*>(out);
  for (std::size_t begin = 0; begin < n; begin += max_count) {
    const std::size_t len = std::min(max_count, n - begin);
    const T* piece = gathered + static_cast<std::size_t>(m) * begin;
    for (std::size_t i = 0; i < len; ++i) {
      T acc = piece[i];
      for (int j = 1; j < m; ++j) acc = static_cast<T>(acc + piece[static_cast<std::size_t>(j) * len + i]);
      data[begin + i] = acc;
    }
  }
}

// What a communicator and its requests share; on the heap so that moving an
// mpi_comm leaves its pending requests' pointers valid.
struct mpi_state {
  MPI_Comm comm = MPI_COMM_NULL;  // our own duplicate, with MPI_ERRORS_RETURN
  int rank = 0;
  int size = 1;
  mpi_options options;
  comm_stats stats;
  // Reused from call to call so that steady-state calls do not allocate.
  // Everything MPI reads or writes during a collective lives here, not on
  // the stack, so that an operation a timeout abandons never touches freed
  // memory (the user's buffers aside).
  std::vector<std::byte> scratch;
  std::vector<std::uint64_t> sizes;
  std::vector<int> counts, displs, send_counts, send_displs;
  std::array<long long, 9> agreement{};  // check_across_ranks
  std::uint64_t own_size = 0;            // allgatherv's size exchange

  // Timeouts: the deadline of the collective in progress; once one timed
  // out, what happened, and the operations (and request scratch) it left
  // pending, kept so that nothing MPI may still use is freed.
  std::chrono::steady_clock::time_point deadline;
  std::string timed_out;
  std::vector<MPI_Request> abandoned;
  std::vector<std::vector<std::byte>> abandoned_scratch;

  mpi_state() = default;
  mpi_state(const mpi_state&) = delete;
  mpi_state& operator=(const mpi_state&) = delete;
  ~mpi_state() {
    // A pending operation may still use the duplicate; MPI_Abort or
    // MPI_Finalize will take it.
    if (comm == MPI_COMM_NULL || !timed_out.empty()) return;
    int finalized = 1;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm);  // after MPI_Finalize the duplicate is gone anyway
  }

  // The accounting rule of comm_stats: with one rank nothing crosses.
  void count(std::uint64_t sent, std::uint64_t received) {
    if (size > 1) {
      stats.bytes_sent += sent;
      stats.bytes_received += received;
    }
    ++stats.collectives;
  }
};

}  // namespace detail

class mpi_comm;

/// The handle of one mpi_comm::iallreduce_sum. A default-constructed request
/// is already complete. Movable, not copyable; moving onto a pending request
/// first waits for it. wait() may be called again after completion (it
/// returns at once); test() never blocks. If a pending request is destroyed,
/// its destructor waits for the call (ignoring errors), so MPI never writes
/// the buffer after the request is gone. The mpi_comm must outlive it.
class mpi_request {
 public:
  mpi_request() = default;
  mpi_request(const mpi_request&) = delete;
  mpi_request& operator=(const mpi_request&) = delete;
  mpi_request(mpi_request&& other) noexcept { take(other); }
  mpi_request& operator=(mpi_request&& other) noexcept {
    if (this != &other) {
      abandon();
      take(other);
    }
    return *this;
  }
  ~mpi_request() { abandon(); }

  /// Blocks until the call completed; then the data holds the sum. Throws
  /// gcomp::error with MPI's error string if MPI reports a failure.
  void wait() { (void)finish("gcomp::mpi_request::wait", true); }

  /// Whether the call completed (MPI_Testall: never blocks, and drives MPI's
  /// progress). Once it returned true the request is complete.
  bool test() { return finish("gcomp::mpi_request::test", false); }

 private:
  friend class mpi_comm;
  using sum_fn = void (*)(const std::byte*, void*, std::size_t, int, std::size_t);

  MPI_Request* handles() { return more_.empty() ? &one_ : more_.data(); }

  bool finish(std::string_view where, bool block) {
    if (!state_) return true;
    const int n = static_cast<int>(more_.empty() ? 1 : more_.size());
    int code = MPI_SUCCESS;
    const std::chrono::nanoseconds timeout = state_->options.timeout;
    if (block && timeout != mpi_options::no_timeout) {
      if (!detail::mpi_test_until(handles(), n, detail::mpi_deadline(timeout), code))
        give_up(where, timeout);
    } else if (block) {
      code = MPI_Waitall(n, handles(), MPI_STATUSES_IGNORE);
    } else {
      int done = 0;
      code = MPI_Testall(n, handles(), &done, MPI_STATUSES_IGNORE);
      if (code == MPI_SUCCESS && !done) return false;
    }
    // Whatever MPI said, this request is over: never wait on it again.
    detail::mpi_state* state = std::exchange(state_, nullptr);
    const bool waited = block && timeout == mpi_options::no_timeout;
    detail::mpi_check(code, where, waited ? "MPI_Waitall" : "MPI_Testall",
                      " on an iallreduce_sum of ", count_, " elements");
    if (sum_) sum_(scratch_.data(), data_, count_, state->size, max_count_);
    state->count(bytes_, bytes_);
    return true;
  }

  void abandon() noexcept {
    if (!state_) return;
    try {
      (void)finish("gcomp::mpi_request::~mpi_request", true);
    } catch (...) {  // a destructor cannot report; wait() is the place to see errors
    }
    state_ = nullptr;
  }

  // The call did not complete in time: the communicator keeps what MPI may
  // still write (the handles, the gathered scratch) and refuses later calls.
  [[noreturn]] void give_up(std::string_view where, std::chrono::nanoseconds timeout) {
    detail::mpi_state* state = std::exchange(state_, nullptr);
    MPI_Request* h = handles();
    state->abandoned.insert(state->abandoned.end(), h, h + (more_.empty() ? 1 : more_.size()));
    if (!scratch_.empty()) state->abandoned_scratch.push_back(std::move(scratch_));
    const std::string what =
        detail::concat("the iallreduce_sum of ", count_,
                       " elements did not complete within the timeout of ",
                       detail::mpi_duration_text(timeout), " on rank ", state->rank, " of ",
                       state->size);
    state->timed_out = detail::concat(where, ": ", what);
    fail(where, what, detail::mpi_timeout_advice);
  }

  void take(mpi_request& other) noexcept {
    state_ = std::exchange(other.state_, nullptr);
    one_ = other.one_;
    more_ = std::move(other.more_);
    other.more_.clear();
    scratch_ = std::move(other.scratch_);
    sum_ = other.sum_;
    data_ = other.data_;
    count_ = other.count_;
    max_count_ = other.max_count_;
    bytes_ = other.bytes_;
  }

  detail::mpi_state* state_ = nullptr;  // null once complete
  MPI_Request one_ = MPI_REQUEST_NULL;  // the common case: a single MPI request
  std::vector<MPI_Request> more_;       // a buffer split into several pieces
  std::vector<std::byte> scratch_;      // rank_ordered: every rank's buffer
  sum_fn sum_ = nullptr;                // rank_ordered: the sum run on completion
  void* data_ = nullptr;
  std::size_t count_ = 0;
  std::size_t max_count_ = 1;
  std::uint64_t bytes_ = 0;
};

/// One rank's handle on an MPI communicator, satisfying gcomp::communicator.
///
/// Ownership: the constructor duplicates the user's communicator
/// (MPI_Comm_dup, collective) and sets MPI_ERRORS_RETURN on the duplicate
/// only, so gcomp's traffic never matches the user's and MPI failures become
/// gcomp::error with MPI_Error_string's text; the destructor frees the
/// duplicate (if MPI is not finalized yet). The user's communicator is left
/// as it was. The constructor never initializes MPI (see mpi_environment).
///
/// Every collective must be called by all ranks in the same order, from one
/// thread at a time (MPI_THREAD_FUNNELED or SERIALIZED suffices). Data is in
/// host memory (host_seq / host_par; MPI reads and writes it directly); the
/// Policy argument is accepted for uniformity with the other communicators.
/// Counters follow comm_stats's accounting rule, exactly as inproc_comm.
class mpi_comm {
 public:
  explicit mpi_comm(MPI_Comm comm, mpi_options options = {}) : state_(make_state(comm, options)) {}
  mpi_comm(mpi_comm&&) noexcept = default;
  mpi_comm& operator=(mpi_comm&& other) noexcept {
    if (this != &other) {
      leak_if_timed_out();
      state_ = std::move(other.state_);
    }
    return *this;
  }
  mpi_comm(const mpi_comm&) = delete;
  mpi_comm& operator=(const mpi_comm&) = delete;
  ~mpi_comm() { leak_if_timed_out(); }

  /// Whether a collective or a wait timed out (mpi_options::timeout); the
  /// communicator then refuses every call.
  bool timed_out() const { return !state_->timed_out.empty(); }

  int rank() const { return state_->rank; }
  int size() const { return state_->size; }
  /// The duplicate gcomp communicates on (for tools; do not free it).
  MPI_Comm native() const { return state_->comm; }
  const mpi_options& options() const { return state_->options; }

  /// In place: data becomes the sum over ranks (see mpi_summation for the
  /// order). Element type and size must match on every rank.
  template <host_memory_policy Policy, class T>
  void allreduce_sum(const Policy&, std::span<T> data) {
    static_assert(detail::mpi_summable<T>,
                  "mpi_comm::allreduce_sum sums in place: T must be a non-const arithmetic type "
                  "other than bool");
    constexpr std::string_view where = "gcomp::mpi_comm::allreduce_sum";
    using S = detail::mpi_sum_type<std::remove_cv_t<T>>;
    begin(where);
    agree(where, {detail::mpi_op::allreduce_sum, S::code, to_ll(data.size()), 0, true}, {});
    detail::mpi_state& s = *state_;
    const std::size_t max = s.options.max_count;
    if (s.options.summation == mpi_summation::rank_ordered) {
      ordered_allreduce(where, data);
    } else {
      for (std::size_t begin = 0, k = 0; k < detail::mpi_pieces(data.size(), max); ++k, begin += max) {
        const std::size_t len = std::min(max, data.size() - begin);
        T* piece = data.data() + begin;
        collective(
            where,
            [&] {
              return MPI_Allreduce(MPI_IN_PLACE, piece, static_cast<int>(len), S::datatype(),
                                   MPI_SUM, s.comm);
            },
            [&](MPI_Request* r) {
              return MPI_Iallreduce(MPI_IN_PLACE, piece, static_cast<int>(len), S::datatype(),
                                    MPI_SUM, s.comm, r);
            },
            "MPI_Allreduce", "MPI_Iallreduce", " of ", len, " ", S::name, " at offset ", begin,
            " of ", data.size());
      }
    }
    s.count(data.size_bytes(), data.size_bytes());
  }

  /// out = every rank's `in`, in rank order. in.size() must be the same on
  /// every rank and out.size() == size() * in.size(); in and out must not overlap.
  template <host_memory_policy Policy>
  void allgather(const Policy&, std::span<const std::byte> in, std::span<std::byte> out) {
    constexpr std::string_view where = "gcomp::mpi_comm::allgather";
    begin(where);
    detail::mpi_state& s = *state_;
    const std::size_t n = in.size();
    std::string problem;
    if (out.size() != static_cast<std::size_t>(s.size) * n)
      problem = detail::concat("out has ", out.size(), " bytes on rank ", s.rank,
                               " but must have size() * in.size() = ", s.size, " * ", n, " = ",
                               static_cast<std::size_t>(s.size) * n);
    else if (detail::mpi_overlap(in.data(), n, out.data(), out.size()))
      problem = detail::concat("in overlaps out on rank ", s.rank, "; they must be separate buffers");
    agree(where, {detail::mpi_op::allgather, 0, to_ll(n), 0, true}, problem);
    if (n <= s.options.max_count) {
      collective(
          where,
          [&] {
            return MPI_Allgather(in.data(), static_cast<int>(n), MPI_BYTE, out.data(),
                                 static_cast<int>(n), MPI_BYTE, s.comm);
          },
          [&](MPI_Request* r) {
            return MPI_Iallgather(in.data(), static_cast<int>(n), MPI_BYTE, out.data(),
                                  static_cast<int>(n), MPI_BYTE, s.comm, r);
          },
          "MPI_Allgather", "MPI_Iallgather", " of ", n, " bytes per rank");
    } else {
      // Pieces of one rank's block would need per-rank strides; broadcasting
      // each rank's block from its owner in max_count pieces needs none.
      std::memcpy(out.data() + static_cast<std::size_t>(s.rank) * n, in.data(), n);
      for (int j = 0; j < s.size; ++j)
        broadcast_bytes(where, out.data() + static_cast<std::size_t>(j) * n, n, j);
    }
    s.count(n, static_cast<std::uint64_t>(s.size - 1) * n);
  }

  /// out = every rank's `in` concatenated in rank order (sizes may differ);
  /// counts (size() entries) receives every rank's in.size(). The sizes are
  /// exchanged first (MPI_Allgather), then the bytes (MPI_Allgatherv, or one
  /// chunked MPI_Bcast per rank when the total exceeds max_count, since
  /// MPI_Allgatherv's displacements are int). out is resized to the total, so
  /// its capacity is reused; `in` must not point into out's storage.
  template <host_memory_policy Policy>
  void allgatherv(const Policy&, std::span<const std::byte> in, std::vector<std::byte>& out,
                  std::span<std::size_t> counts) {
    constexpr std::string_view where = "gcomp::mpi_comm::allgatherv";
    begin(where);
    detail::mpi_state& s = *state_;
    const auto m = static_cast<std::size_t>(s.size);
    std::string problem;
    if (counts.size() != m)
      problem = detail::concat("counts has size ", counts.size(), " on rank ", s.rank,
                               " but must have size() = ", s.size);
    else if (detail::mpi_overlap(in.data(), in.size(), out.data(), out.capacity()))
      problem = detail::concat("in overlaps the storage of out on rank ", s.rank,
                               "; it must be a separate buffer since out is resized");
    agree(where, {detail::mpi_op::allgatherv, 0, 0, 0, false}, problem);

    s.sizes.resize(m);
    const std::uint64_t own = in.size();
    s.own_size = own;
    collective(
        where,
        [&] {
          return MPI_Allgather(&s.own_size, 1, MPI_UINT64_T, s.sizes.data(), 1, MPI_UINT64_T,
                               s.comm);
        },
        [&](MPI_Request* r) {
          return MPI_Iallgather(&s.own_size, 1, MPI_UINT64_T, s.sizes.data(), 1, MPI_UINT64_T,
                                s.comm, r);
        },
        "MPI_Allgather", "MPI_Iallgather", " of the sizes");
    std::size_t total = 0;
    for (std::uint64_t b : s.sizes) total += static_cast<std::size_t>(b);
    // If this throws (out of memory), the other ranks block in the exchange
    // below: reported on this rank only.
    out.resize(total);
    if (total <= s.options.max_count) {
      s.counts.resize(m);
      s.displs.resize(m);
      std::size_t offset = 0;
      for (std::size_t j = 0; j < m; ++j) {
        s.counts[j] = static_cast<int>(s.sizes[j]);
        s.displs[j] = static_cast<int>(offset);
        offset += static_cast<std::size_t>(s.sizes[j]);
      }
      collective(
          where,
          [&] {
            return MPI_Allgatherv(in.data(), static_cast<int>(own), MPI_BYTE, out.data(),
                                  s.counts.data(), s.displs.data(), MPI_BYTE, s.comm);
          },
          [&](MPI_Request* r) {
            return MPI_Iallgatherv(in.data(), static_cast<int>(own), MPI_BYTE, out.data(),
                                   s.counts.data(), s.displs.data(), MPI_BYTE, s.comm, r);
          },
          "MPI_Allgatherv", "MPI_Iallgatherv", " of ", own, " bytes from rank ", s.rank, " (",
          total, " in all)");
    } else {
      std::size_t offset = 0;
      for (int j = 0; j < s.size; ++j) {
        const auto b = static_cast<std::size_t>(s.sizes[static_cast<std::size_t>(j)]);
        if (j == s.rank && b != 0) std::memcpy(out.data() + offset, in.data(), b);
        broadcast_bytes(where, out.data() + offset, b, j);
        offset += b;
      }
    }
    for (std::size_t j = 0; j < m; ++j) counts[j] = static_cast<std::size_t>(s.sizes[j]);
    s.count(own, total - own);
  }

  /// Every rank's data becomes root's data. Size, element type and root must
  /// match on every rank; root must be in [0, size()).
  template <host_memory_policy Policy, class T>
  void broadcast(const Policy&, std::span<T> data, int root) {
    static_assert(std::is_trivially_copyable_v<T> && !std::is_const_v<T>,
                  "mpi_comm::broadcast writes data on every rank but the root: T must be a "
                  "non-const trivially copyable type");
    constexpr std::string_view where = "gcomp::mpi_comm::broadcast";
    begin(where);
    detail::mpi_state& s = *state_;
    std::string problem;
    if (root < 0 || root >= s.size)
      problem = detail::concat("root is ", root, " on rank ", s.rank, " but must be in [0, ",
                               s.size, ")");
    // The element size stands in for the type of types MPI cannot sum.
    const long long type = detail::mpi_sum_type<std::remove_cv_t<T>>::code != 0
                               ? detail::mpi_sum_type<std::remove_cv_t<T>>::code
                               : 100 + static_cast<long long>(sizeof(T));
    agree(where, {detail::mpi_op::broadcast, type, to_ll(data.size()), root, true}, problem);
    broadcast_bytes(where, reinterpret_cast<std::byte*>(data.data()), data.size_bytes(), root);
    if (s.rank == root) s.count(data.size_bytes(), 0);
    else s.count(0, data.size_bytes());
  }

  /// Returns once every rank has called barrier().
  void barrier() {
    constexpr std::string_view where = "gcomp::mpi_comm::barrier";
    begin(where);
    agree(where, {detail::mpi_op::barrier, 0, 0, 0, true}, {});
    const MPI_Comm comm = state_->comm;
    collective(
        where, [&] { return MPI_Barrier(comm); },
        [&](MPI_Request* r) { return MPI_Ibarrier(comm, r); }, "MPI_Barrier", "MPI_Ibarrier");
    state_->count(0, 0);
  }

  /// Non-blocking allreduce_sum: posts the call and returns; data must not be
  /// touched until the request's wait() returned or test() returned true. It
  /// is not checked across ranks (that would take a blocking exchange): the
  /// k-th non-blocking call of every rank must pass the same type and size,
  /// or MPI fails or hangs. Counted when its completion is observed.
  template <host_memory_policy Policy, class T>
  [[nodiscard]] mpi_request iallreduce_sum(const Policy&, std::span<T> data) {
    static_assert(detail::mpi_summable<T>,
                  "mpi_comm::iallreduce_sum sums in place: T must be a non-const arithmetic type "
                  "other than bool");
    constexpr std::string_view where = "gcomp::mpi_comm::iallreduce_sum";
    using S = detail::mpi_sum_type<std::remove_cv_t<T>>;
    refuse_if_timed_out(where);
    detail::mpi_state& s = *state_;
    const std::size_t max = s.options.max_count;
    const std::size_t pieces = detail::mpi_pieces(data.size(), max);
    const bool ordered = s.options.summation == mpi_summation::rank_ordered && s.size > 1;
    mpi_request request;
    if (pieces > 1) request.more_.assign(pieces, MPI_REQUEST_NULL);
    if (ordered) {
      request.scratch_.resize(static_cast<std::size_t>(s.size) * data.size_bytes());
      request.sum_ = &detail::mpi_sum_gathered<std::remove_cv_t<T>>;
    }
    request.data_ = static_cast<void*>(data.data());
    request.count_ = data.size();
    request.max_count_ = max;
    request.bytes_ = data.size_bytes();
    auto* gathered = reinterpret_cast<T*>(request.scratch_.data());
    for (std::size_t k = 0, begin = 0; k < pieces; ++k, begin += max) {
      const std::size_t len = std::min(max, data.size() - begin);
      MPI_Request* handle = request.handles() + k;
      const int code =
          ordered ? MPI_Iallgather(data.data() + begin, static_cast<int>(len), S::datatype(),
                                   gathered + static_cast<std::size_t>(s.size) * begin,
                                   static_cast<int>(len), S::datatype(), s.comm, handle)
                  : MPI_Iallreduce(MPI_IN_PLACE, data.data() + begin, static_cast<int>(len),
                                   S::datatype(), MPI_SUM, s.comm, handle);
      if (code != MPI_SUCCESS) {
        // The pieces already posted still use the buffer: finish them first.
        if (k != 0) MPI_Waitall(static_cast<int>(k), request.handles(), MPI_STATUSES_IGNORE);
        detail::mpi_check(code, where, ordered ? "MPI_Iallgather of " : "MPI_Iallreduce of ", len,
                          " ", S::name, " at offset ", begin, " of ", data.size());
      }
    }
    request.state_ = &s;
    return request;
  }

  /// Traffic of this rank since construction or reset_stats(); see comm_stats.
  comm_stats stats() const { return state_->stats; }
  void reset_stats() { state_->stats = {}; }

 private:
  static long long to_ll(std::size_t n) { return static_cast<long long>(n); }

  void leak_if_timed_out() noexcept {
    // MPI may still write into the state's buffers: never free them.
    if (state_ && !state_->timed_out.empty()) (void)state_.release();
  }

  void refuse_if_timed_out(std::string_view where) const {
    const detail::mpi_state& s = *state_;
    if (!s.timed_out.empty())
      fail(where, "an earlier operation timed out (", s.timed_out,
           "), so this communicator cannot be used again");
  }

  // Every blocking collective starts here: the deadline covers all its MPI calls.
  void begin(std::string_view where) {
    refuse_if_timed_out(where);
    detail::mpi_state& s = *state_;
    if (s.options.timeout != mpi_options::no_timeout)
      s.deadline = detail::mpi_deadline(s.options.timeout);
  }

  // One MPI call of a collective: `blocking`, or with a timeout `start`
  // (its non-blocking form) polled until the collective's deadline. Errors
  // name the call that was made, with `what` after its name.
  template <class Blocking, class Start, class... What>
  void collective(std::string_view where, Blocking&& blocking, Start&& start,
                  const char* blocking_name, const char* start_name, const What&... what) {
    detail::mpi_state& s = *state_;
    if (s.options.timeout == mpi_options::no_timeout) {
      detail::mpi_check(blocking(), where, blocking_name, what...);
      return;
    }
    MPI_Request request = MPI_REQUEST_NULL;
    detail::mpi_check(start(&request), where, start_name, what...);
    int code = MPI_SUCCESS;
    if (detail::mpi_test_until(&request, 1, s.deadline, code)) {
      detail::mpi_check(code, where, start_name, what...);
      return;
    }
    s.abandoned.push_back(request);
    const std::string message =
        detail::concat(start_name, what..., " did not complete within the timeout of ",
                       detail::mpi_duration_text(s.options.timeout), " on rank ", s.rank, " of ",
                       s.size);
    s.timed_out = detail::concat(where, ": ", message);
    fail(where, message, detail::mpi_timeout_advice);
  }

  static std::unique_ptr<detail::mpi_state> make_state(MPI_Comm comm, const mpi_options& options) {
    constexpr std::string_view where = "gcomp::mpi_comm::mpi_comm";
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    require(initialized && !finalized, where,
            "MPI is not initialized (or already finalized); call MPI_Init first or hold a "
            "gcomp::mpi_environment");
    require(comm != MPI_COMM_NULL, where, "comm is MPI_COMM_NULL");
    check_in_range(where, "options.max_count", options.max_count, std::size_t{1},
                   static_cast<std::size_t>(INT_MAX));
    require(options.timeout > std::chrono::nanoseconds::zero(), where,
            "options.timeout must be > 0 (mpi_options::no_timeout waits forever), got ",
            detail::mpi_duration_text(options.timeout));
    int inter = 0;
    detail::mpi_check(MPI_Comm_test_inter(comm, &inter), where, "MPI_Comm_test_inter");
    require(!inter, where, "comm is an intercommunicator; gcomp needs an intracommunicator");
    auto state = std::make_unique<detail::mpi_state>();
    state->options = options;
    // Errors of the dup itself are reported through the user's handler.
    detail::mpi_check(MPI_Comm_dup(comm, &state->comm), where, "MPI_Comm_dup");
    detail::mpi_check(MPI_Comm_set_errhandler(state->comm, MPI_ERRORS_RETURN), where,
                      "MPI_Comm_set_errhandler");
    detail::mpi_check(MPI_Comm_rank(state->comm, &state->rank), where, "MPI_Comm_rank");
    detail::mpi_check(MPI_Comm_size(state->comm, &state->size), where, "MPI_Comm_size");
    return state;
  }

  // Every rank calls this before a blocking collective with what it passed
  // and its own verdict on its arguments ("" when fine). With
  // check_across_ranks, one MPI_Allreduce(MAX) of the values and their
  // negations gives every rank the maximum and minimum of each, so all ranks
  // reach the same verdict and throw together; without it, only a rank whose
  // own checks failed throws.
  void agree(std::string_view where, const detail::mpi_call& call, const std::string& problem) {
    detail::mpi_state& s = *state_;
    if (!s.options.check_across_ranks) {
      if (!problem.empty()) fail(where, problem);
      return;
    }
    const long long op = static_cast<long long>(call.op);
    const long long size = call.compare_size ? call.size : 0;
    std::array<long long, 9>& v = s.agreement;
    v = {problem.empty() ? 0 : s.rank + 1, op, -op, call.type, -call.type, size, -size,
         call.root, -call.root};
    collective(
        where,
        [&] {
          return MPI_Allreduce(MPI_IN_PLACE, v.data(), static_cast<int>(v.size()), MPI_LONG_LONG,
                               MPI_MAX, s.comm);
        },
        [&](MPI_Request* r) {
          return MPI_Iallreduce(MPI_IN_PLACE, v.data(), static_cast<int>(v.size()), MPI_LONG_LONG,
                                MPI_MAX, s.comm, r);
        },
        "MPI_Allreduce", "MPI_Iallreduce", " checking the arguments across ranks");
    if (!problem.empty()) fail(where, problem);
    if (v[0] != 0)
      fail(where, "rank ", v[0] - 1,
           " rejected its arguments (it reports why); no data was exchanged");
    if (v[1] != -v[2])
      fail(where, "ranks called different collectives (", detail::mpi_op_name(-v[2]), " and ",
           detail::mpi_op_name(v[1]),
           "); every rank must make the same collective calls in the same order");
    if (v[3] != -v[4])
      fail(where, "data holds ", detail::mpi_type_name(-v[4]), " on some ranks but ",
           detail::mpi_type_name(v[3]),
           " on others; every rank must pass the same element type");
    if (v[5] != -v[6])
      fail(where, call.op == detail::mpi_op::allgather ? "in has between " : "data has between ",
           -v[6], " and ", v[5], call.op == detail::mpi_op::allgather ? " bytes" : " elements",
           " across ranks; every rank must pass the same size");
    if (v[7] != -v[8])
      fail(where, "root is between ", -v[8], " and ", v[7],
           " across ranks; every rank must pass the same root");
  }

  // MPI_Bcast of n bytes from root, in pieces of at most max_count bytes.
  void broadcast_bytes(std::string_view where, std::byte* data, std::size_t n, int root) {
    detail::mpi_state& s = *state_;
    const std::size_t max = s.options.max_count;
    for (std::size_t k = 0, begin = 0; k < detail::mpi_pieces(n, max); ++k, begin += max) {
      const std::size_t len = std::min(max, n - begin);
      std::byte* piece = data + begin;
      collective(
          where,
          [&] { return MPI_Bcast(piece, static_cast<int>(len), MPI_BYTE, root, s.comm); },
          [&](MPI_Request* r) {
            return MPI_Ibcast(piece, static_cast<int>(len), MPI_BYTE, root, s.comm, r);
          },
          "MPI_Bcast", "MPI_Ibcast", " of ", len, " bytes at offset ", begin, " of ", n,
          " from rank ", root);
    }
  }

  // Reduce-scatter by MPI_Alltoallv (rank r receives slice r of every rank's
  // piece), a sum in rank order, then MPI_Allgatherv of the summed slices.
  // Piece by piece of at most max_count elements, so every count and
  // displacement fits an int.
  template <class T>
  void ordered_allreduce(std::string_view where, std::span<T> data) {
    detail::mpi_state& s = *state_;
    if (s.size == 1) return;
    using U = std::remove_cv_t<T>;
    const MPI_Datatype type = detail::mpi_sum_type<U>::datatype();
    const auto m = static_cast<std::size_t>(s.size);
    const std::size_t max = s.options.max_count;
    s.counts.resize(m);
    s.displs.resize(m);
    s.send_counts.resize(m);
    s.send_displs.resize(m);
    const std::size_t first = std::min(max, data.size());
    const std::size_t widest = first / m + (first % m != 0 ? 1 : 0);
    if (s.scratch.size() < m * widest * sizeof(U)) s.scratch.resize(m * widest * sizeof(U));
    U* received = reinterpret_cast<U*>(s.scratch.data());
    for (std::size_t begin = 0; begin < data.size(); begin += max) {
      const std::size_t len = std::min(max, data.size() - begin);
      U* piece = data.data() + begin;
      const auto [lo, hi] = detail::mpi_slice(len, s.size, s.rank);
      const std::size_t mine = hi - lo;
      for (std::size_t j = 0; j < m; ++j) {
        const auto [jlo, jhi] = detail::mpi_slice(len, s.size, static_cast<int>(j));
        s.send_counts[j] = static_cast<int>(jhi - jlo);
        s.send_displs[j] = static_cast<int>(jlo);
        s.counts[j] = static_cast<int>(mine);
        s.displs[j] = static_cast<int>(j * mine);
      }
      collective(
          where,
          [&] {
            return MPI_Alltoallv(piece, s.send_counts.data(), s.send_displs.data(), type, received,
                                 s.counts.data(), s.displs.data(), type, s.comm);
          },
          [&](MPI_Request* r) {
            return MPI_Ialltoallv(piece, s.send_counts.data(), s.send_displs.data(), type,
                                  received, s.counts.data(), s.displs.data(), type, s.comm, r);
          },
          "MPI_Alltoallv", "MPI_Ialltoallv", " of ", len, " ", detail::mpi_sum_type<U>::name,
          " at offset ", begin, " of ", data.size());
      for (std::size_t i = 0; i < mine; ++i) {
        U acc = received[i];
        for (std::size_t j = 1; j < m; ++j) acc = static_cast<U>(acc + received[j * mine + i]);
        piece[lo + i] = acc;
      }
      collective(
          where,
          [&] {
            return MPI_Allgatherv(MPI_IN_PLACE, 0, type, piece, s.send_counts.data(),
                                  s.send_displs.data(), type, s.comm);
          },
          [&](MPI_Request* r) {
            return MPI_Iallgatherv(MPI_IN_PLACE, 0, type, piece, s.send_counts.data(),
                                   s.send_displs.data(), type, s.comm, r);
          },
          "MPI_Allgatherv", "MPI_Iallgatherv", " of the summed slices at offset ", begin, " of ",
          data.size());
    }
  }

  std::unique_ptr<detail::mpi_state> state_;
};

/// Initializes MPI for a program that does not do it itself (examples,
/// tests, benchmarks) and finalizes it at scope exit, unless MPI was already
/// initialized. The library's communicators never call MPI_Init.
///
/// If an exception leaves the environment's scope, it does not finalize:
/// this rank is giving up while others may wait for it in a collective, and
/// MPI_Finalize waits for every rank (Open MPI synchronizes them in it), so
/// the job would hang. MPI stays initialized for a handler outside the scope
/// to report the error and call MPI_Abort (as mpi_abort_on_exception does
/// inside it); an exception nobody catches ends the process, and mpiexec
/// then ends the job.
class mpi_environment {
 public:
  mpi_environment(int& argc, char**& argv, int required = MPI_THREAD_FUNNELED)
      : uncaught_(std::uncaught_exceptions()) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (initialized) {
      MPI_Query_thread(&provided_);
      return;
    }
    detail::mpi_check(MPI_Init_thread(&argc, &argv, required, &provided_),
                      "gcomp::mpi_environment::mpi_environment", "MPI_Init_thread");
    owner_ = true;
    if (provided_ < required) {
      MPI_Finalize();
      fail("gcomp::mpi_environment::mpi_environment", "MPI provides thread level ", provided_,
           " but ", required, " was required");
    }
  }
  mpi_environment(const mpi_environment&) = delete;
  mpi_environment& operator=(const mpi_environment&) = delete;
  ~mpi_environment() {
    if (owner_ && std::uncaught_exceptions() <= uncaught_) MPI_Finalize();
  }

  /// The thread level MPI provides (MPI_THREAD_SINGLE ... MPI_THREAD_MULTIPLE).
  int thread_level() const { return provided_; }

 private:
  int uncaught_ = 0;  // exceptions in flight at construction
  bool owner_ = false;
  int provided_ = MPI_THREAD_SINGLE;
};

/// Runs body() on this rank; if it throws, hands report a message naming this
/// rank and the exception's what() ("gcomp::mpi_abort_on_exception: rank 1 of
/// 4 threw: <what>; aborting the job with error code 1"), then calls
/// MPI_Abort(comm, error_code), which ends every rank of the job (of comm's
/// processes, at least) with that exit code. Without it, the other ranks
/// would wait for this one in their next collective forever. report is where
/// the message goes (the library never prints); e.g. a lambda writing it to
/// stderr. If MPI is not initialized, or already finalized, there is no job
/// to abort and the exception propagates.
template <class Body, class Report>
  requires std::invocable<Body&> && std::invocable<Report&, std::string_view>
void mpi_abort_on_exception(MPI_Comm comm, Body&& body, Report&& report, int error_code = 1) {
  try {
    body();
    return;
  } catch (...) {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (!initialized || finalized) throw;
    std::string what = "an exception not derived from std::exception";
    try {
      throw;
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    int rank = -1, size = 0;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    const std::string message =
        detail::concat("gcomp::mpi_abort_on_exception: rank ", rank, " of ", size, " threw: ",
                       what, "; aborting the job with error code ", error_code);
    try {
      report(std::string_view(message));
    } catch (...) {  // the abort matters more than the report
    }
    MPI_Abort(comm, error_code);
  }
  std::abort();  // MPI_Abort does not return; if it did, this rank must still not go on
}

}  // namespace gcomp
