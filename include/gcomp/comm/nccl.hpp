// nccl_comm: gcomp's communicator over a user's NCCL communicator and CUDA stream (device buffers, or host buffers staged).
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "gcomp/comm/stats.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/exec/policy.hpp"

namespace gcomp {
namespace detail {

/// Throws gcomp::error with ncclGetErrorString's text (and NCCL's last
/// message, which names the cause) unless result is ncclSuccess.
template <class... What>
void nccl_check(ncclResult_t result, ncclComm_t comm, std::string_view where, const What&... what) {
  if (result == ncclSuccess) return;
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && *last != '\0')
    fail(where, what..., " failed: ", ncclGetErrorString(result), " (", last, ")");
  fail(where, what..., " failed: ", ncclGetErrorString(result));
}

/// Throws gcomp::error with cudaGetErrorString's text unless status is cudaSuccess.
template <class... What>
void nccl_cuda_check(cudaError_t status, std::string_view where, const What&... what) {
  if (status == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so later calls do not report it again
  fail(where, what..., " failed: ", cudaGetErrorName(status), ": ", cudaGetErrorString(status));
}

// The NCCL datatype that sums T, or ncclNumTypes where there is none.
template <class T>
constexpr ncclDataType_t nccl_sum_type() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, float>) return ncclFloat32;
  else if constexpr (std::is_same_v<U, double>) return ncclFloat64;
  else if constexpr (std::is_integral_v<U> && !std::is_same_v<U, bool>) {
    if constexpr (sizeof(U) == 1) return std::is_signed_v<U> ? ncclInt8 : ncclUint8;
    else if constexpr (sizeof(U) == 4) return std::is_signed_v<U> ? ncclInt32 : ncclUint32;
    else if constexpr (sizeof(U) == 8) return std::is_signed_v<U> ? ncclInt64 : ncclUint64;
    else return ncclNumTypes;
  } else {
    return ncclNumTypes;
  }
}

template <class T>
inline constexpr bool nccl_summable =
    !std::is_const_v<T> && !std::is_volatile_v<T> && nccl_sum_type<T>() != ncclNumTypes;

// Whether [a, a + an) and [b, b + bn) share a byte (device pointers share the
// host's address space under unified addressing).
inline bool nccl_overlap(const void* a, std::size_t an, const void* b, std::size_t bn) {
  if (an == 0 || bn == 0) return false;
  const auto* pa = static_cast<const std::byte*>(a);
  const auto* pb = static_cast<const std::byte*>(b);
  const std::less<const std::byte*> less;
  return less(pa, pb + bn) && less(pb, pa + an);
}

// Device memory that grows and is reused, so steady-state calls do not allocate.
class nccl_scratch {
 public:
  nccl_scratch() = default;
  nccl_scratch(const nccl_scratch&) = delete;
  nccl_scratch& operator=(const nccl_scratch&) = delete;
  ~nccl_scratch() { cudaFree(data_); }  // cudaFree waits for the device

  std::byte* get(std::size_t bytes, cudaStream_t stream, std::string_view where) {
    if (bytes <= capacity_) return data_;
    // Work queued on the stream may still use the old block.
    nccl_cuda_check(cudaStreamSynchronize(stream), where, "cudaStreamSynchronize");
    cudaFree(data_);
    data_ = nullptr;
    capacity_ = 0;
    void* block = nullptr;
    nccl_cuda_check(cudaMalloc(&block, bytes), where, "cudaMalloc of ", bytes, " bytes of scratch");
    data_ = static_cast<std::byte*>(block);
    capacity_ = bytes;
    return data_;
  }

 private:
  std::byte* data_ = nullptr;
  std::size_t capacity_ = 0;
};

// What a communicator and its requests share; on the heap so that moving an
// nccl_comm leaves its pending requests' pointers valid.
struct nccl_state {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  int device = 0;
  int rank = 0;
  int size = 1;
  comm_stats stats;
  cudaStream_t copy_stream = nullptr;  // host copies of finished non-blocking calls
  cudaEvent_t policy_ready = nullptr;  // orders a cuda_par stream before the comm's stream
  cudaEvent_t comm_done = nullptr;     // and back
  std::vector<cudaEvent_t> free_events;
  nccl_scratch data, gathered, sizes;
  std::vector<std::uint64_t> host_sizes;

  nccl_state() = default;
  nccl_state(const nccl_state&) = delete;
  nccl_state& operator=(const nccl_state&) = delete;
  ~nccl_state() {
    if (copy_stream) cudaStreamDestroy(copy_stream);
    if (policy_ready) cudaEventDestroy(policy_ready);
    if (comm_done) cudaEventDestroy(comm_done);
    for (cudaEvent_t e : free_events) cudaEventDestroy(e);
  }

  void count(std::uint64_t sent, std::uint64_t received) {
    if (size > 1) {
      stats.bytes_sent += sent;
      stats.bytes_received += received;
    }
    ++stats.collectives;
  }

  cudaEvent_t take_event(std::string_view where) {
    if (!free_events.empty()) {
      cudaEvent_t e = free_events.back();
      free_events.pop_back();
      return e;
    }
    cudaEvent_t e = nullptr;
    nccl_cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), where,
                    "cudaEventCreateWithFlags");
    return e;
  }
  void give_event(cudaEvent_t e) noexcept {
    try {
      free_events.push_back(e);
    } catch (...) {
      cudaEventDestroy(e);
    }
  }

  // Whether `event` has completed; throws if it failed or NCCL reports an
  // asynchronous error (a peer died, a network error): polling both is how
  // NCCL asks to be waited on, since a plain synchronize would hang forever.
  bool poll(cudaEvent_t event, std::string_view where) {
    const cudaError_t status = cudaEventQuery(event);
    ncclResult_t async = ncclSuccess;
    nccl_check(ncclCommGetAsyncError(comm, &async), comm, where, "ncclCommGetAsyncError");
    if (async != ncclSuccess && async != ncclInProgress)
      fail(where, "NCCL reports an asynchronous error: ", ncclGetErrorString(async));
    if (status == cudaErrorNotReady) return false;
    nccl_cuda_check(status, where, "cudaEventQuery");
    return true;
  }
  void wait_for(cudaEvent_t event, std::string_view where) {
    while (!poll(event, where)) std::this_thread::yield();
  }
  // Waits until everything queued on the comm's stream has run.
  void synchronize(std::string_view where) {
    nccl_cuda_check(cudaEventRecord(comm_done, stream), where, "cudaEventRecord");
    wait_for(comm_done, where);
  }
};

// Makes the communicator's device current for one call and restores the
// caller's afterwards (a process may drive several GPUs).
class nccl_device_guard {
 public:
  nccl_device_guard(int device, std::string_view where) {
    nccl_cuda_check(cudaGetDevice(&previous_), where, "cudaGetDevice");
    if (previous_ != device) nccl_cuda_check(cudaSetDevice(device), where, "cudaSetDevice(", device, ")");
  }
  nccl_device_guard(const nccl_device_guard&) = delete;
  nccl_device_guard& operator=(const nccl_device_guard&) = delete;
  ~nccl_device_guard() {
    int current = previous_;
    cudaGetDevice(&current);
    if (current != previous_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0;
};

// A policy that carries its own CUDA stream (cuda_par).
template <class P>
concept nccl_stream_policy = requires(const P& p) {
  { p.stream } -> std::convertible_to<cudaStream_t>;
};

}  // namespace detail

class nccl_comm;

/// The handle of one nccl_comm::iallreduce_sum: a CUDA event recorded on the
/// communicator's stream after the all-reduce. A default-constructed request
/// is already complete. Movable, not copyable; moving onto a pending request
/// first waits for it. wait() polls the event and ncclCommGetAsyncError
/// (so a failed peer throws instead of hanging) and may be called again
/// after completion; test() never blocks. A pending request's destructor
/// waits (ignoring errors). The nccl_comm must outlive it.
class nccl_request {
 public:
  nccl_request() = default;
  nccl_request(const nccl_request&) = delete;
  nccl_request& operator=(const nccl_request&) = delete;
  nccl_request(nccl_request&& other) noexcept { take(other); }
  nccl_request& operator=(nccl_request&& other) noexcept {
    if (this != &other) {
      abandon();
      take(other);
    }
    return *this;
  }
  ~nccl_request() { abandon(); }

  void wait() { (void)finish("gcomp::nccl_request::wait", true); }
  bool test() { return finish("gcomp::nccl_request::test", false); }

 private:
  friend class nccl_comm;

  bool finish(std::string_view where, bool block) {
    if (!state_) return true;
    detail::nccl_state* state = state_;
    detail::nccl_device_guard device(state->device, where);
    // Once the call is over (done or failed), release what the request holds
    // however this function leaves.
    bool over = false;
    struct release {
      nccl_request& r;
      const bool& over;
      ~release() {
        if (!over) return;
        if (r.staged_) cudaFreeAsync(r.staged_, r.state_->copy_stream);
        r.state_->give_event(r.event_);
        r.staged_ = nullptr;
        r.state_ = nullptr;
      }
    } cleanup{*this, over};
    try {
      if (!block && !state->poll(event_, where)) return false;
      if (block) state->wait_for(event_, where);
    } catch (...) {
      over = true;
      throw;
    }
    over = true;
    if (staged_) {
      // The all-reduce is done: copy back on a stream of our own, so that work
      // queued on the comm's stream since then does not hold us up.
      detail::nccl_cuda_check(cudaMemcpyAsync(host_, staged_, bytes_, cudaMemcpyDeviceToHost,
                                              state->copy_stream),
                              where, "cudaMemcpyAsync of the result to the host");
      detail::nccl_cuda_check(cudaStreamSynchronize(state->copy_stream), where,
                              "cudaStreamSynchronize");
    }
    state->count(bytes_, bytes_);
    return true;
  }

  void abandon() noexcept {
    if (!state_) return;
    try {
      (void)finish("gcomp::nccl_request::~nccl_request", true);
    } catch (...) {  // a destructor cannot report; wait() is the place to see errors
    }
    state_ = nullptr;
  }

  void take(nccl_request& other) noexcept {
    state_ = std::exchange(other.state_, nullptr);
    event_ = other.event_;
    staged_ = other.staged_;
    host_ = other.host_;
    bytes_ = other.bytes_;
  }

  detail::nccl_state* state_ = nullptr;  // null once complete
  cudaEvent_t event_ = nullptr;
  void* staged_ = nullptr;  // host-memory policies: the device copy of the data
  void* host_ = nullptr;
  std::size_t bytes_ = 0;
};

/// One rank's handle on an NCCL communicator, satisfying gcomp::communicator.
///
/// Ownership: the ncclComm_t and the cudaStream_t stay the user's (they must
/// outlive this object and are not destroyed by it); the adapter owns only
/// its events, an internal copy stream and device scratch. The communicator
/// must be a blocking one (NCCL's default config). Every collective must be
/// called by all ranks in the same order, from one host thread at a time.
///
/// Memory follows the policy: with a device policy (cuda_par) spans are
/// device memory and the calls are stream-ordered: they are queued on the
/// comm's stream and return (if the policy's stream is another one, events
/// order it before and after the call); with a host policy (host_seq,
/// host_par) spans are host memory, staged through device scratch, and the
/// calls return when done. allgatherv's `out` is a host vector by the
/// communicator concept, so it always waits for the bytes. barrier() waits
/// for a one-element all-reduce. "Completed" in the accounting rule means
/// queued without error for the stream-ordered calls. NCCL reports
/// mismatched calls across ranks at best asynchronously (often by hanging):
/// only each rank's own arguments are checked before anything is queued.
class nccl_comm {
 public:
  nccl_comm(ncclComm_t comm, cudaStream_t stream) : state_(make_state(comm, stream)) {}
  nccl_comm(nccl_comm&&) noexcept = default;
  nccl_comm& operator=(nccl_comm&&) noexcept = default;
  nccl_comm(const nccl_comm&) = delete;
  nccl_comm& operator=(const nccl_comm&) = delete;
  ~nccl_comm() {
    if (state_) cudaStreamSynchronize(state_->stream);  // nothing may still use the scratch
  }

  int rank() const { return state_->rank; }
  int size() const { return state_->size; }
  ncclComm_t native() const { return state_->comm; }
  cudaStream_t stream() const { return state_->stream; }

  /// In place: data becomes the sum over ranks (ncclAllReduce, ncclSum; NCCL
  /// picks the order, so floating-point sums are not rank-ordered).
  template <class Policy, class T>
  void allreduce_sum(const Policy& policy, std::span<T> data) {
    static_assert(detail::nccl_summable<T>,
                  "nccl_comm::allreduce_sum: T must be float, double or a 1, 4 or 8-byte integer");
    constexpr std::string_view where = "gcomp::nccl_comm::allreduce_sum";
    detail::nccl_state& s = *state_;
    detail::nccl_device_guard device(s.device, where);
    if (!data.empty()) {
      void* buffer = stage_in(policy, where, s.data, data.data(), data.size_bytes());
      enter(policy, where);
      detail::nccl_check(ncclAllReduce(buffer, buffer, data.size(), detail::nccl_sum_type<T>(),
                                       ncclSum, s.comm, s.stream),
                         s.comm, where, "ncclAllReduce of ", data.size(), " elements");
      leave(policy, where);
      stage_out(policy, where, data.data(), buffer, data.size_bytes());
    }
    s.count(data.size_bytes(), data.size_bytes());
  }

  /// out = every rank's `in`, in rank order (ncclAllGather). in.size() must be
  /// the same on every rank and out.size() == size() * in.size(); in and out
  /// must not overlap.
  template <class Policy>
  void allgather(const Policy& policy, std::span<const std::byte> in, std::span<std::byte> out) {
    constexpr std::string_view where = "gcomp::nccl_comm::allgather";
    detail::nccl_state& s = *state_;
    const std::size_t n = in.size();
    const std::size_t total = static_cast<std::size_t>(s.size) * n;
    require(out.size() == total, where, "out has ", out.size(), " bytes on rank ", s.rank,
            " but must have size() * in.size() = ", s.size, " * ", n, " = ", total);
    require(!detail::nccl_overlap(in.data(), n, out.data(), out.size()), where,
            "in overlaps out on rank ", s.rank, "; they must be separate buffers");
    detail::nccl_device_guard device(s.device, where);
    if (n != 0) {
      const void* send = stage_in(policy, where, s.data, in.data(), n);
      void* receive = host_memory_policy<Policy> ? s.gathered.get(total, s.stream, where)
                                                 : static_cast<void*>(out.data());
      enter(policy, where);
      detail::nccl_check(ncclAllGather(send, receive, n, ncclUint8, s.comm, s.stream), s.comm,
                         where, "ncclAllGather of ", n, " bytes per rank");
      leave(policy, where);
      stage_out(policy, where, out.data(), receive, total);
    }
    s.count(n, static_cast<std::uint64_t>(s.size - 1) * n);
  }

  /// out = every rank's `in` concatenated in rank order; counts (size()
  /// entries) receives every rank's in.size(). The sizes are exchanged first
  /// (an ncclAllGather of one integer per rank), then the bytes by one
  /// ncclSend/ncclRecv per peer inside ncclGroupStart/End. `out` is host
  /// memory (a std::vector by the concept): the bytes are gathered in device
  /// scratch and copied to it, and the call returns when they are there.
  template <class Policy>
  void allgatherv(const Policy& policy, std::span<const std::byte> in, std::vector<std::byte>& out,
                  std::span<std::size_t> counts) {
    constexpr std::string_view where = "gcomp::nccl_comm::allgatherv";
    detail::nccl_state& s = *state_;
    const auto m = static_cast<std::size_t>(s.size);
    require(counts.size() == m, where, "counts has size ", counts.size(), " on rank ", s.rank,
            " but must have size() = ", s.size);
    require(!detail::nccl_overlap(in.data(), in.size(), out.data(), out.capacity()), where,
            "in overlaps the storage of out on rank ", s.rank,
            "; it must be a separate buffer since out is resized");
    detail::nccl_device_guard device(s.device, where);
    const std::size_t own = in.size();

    // 1. Every rank's size: slot m holds ours, slots [0, m) receive all of them.
    auto* sizes = reinterpret_cast<std::uint64_t*>(s.sizes.get((m + 1) * sizeof(std::uint64_t), s.stream, where));
    s.host_sizes.resize(m + 1);
    s.host_sizes[m] = own;
    detail::nccl_cuda_check(cudaMemcpyAsync(sizes + m, &s.host_sizes[m], sizeof(std::uint64_t),
                                            cudaMemcpyHostToDevice, s.stream),
                            where, "cudaMemcpyAsync of the size to the device");
    enter(policy, where);  // the policy's stream may still be writing `in`
    detail::nccl_check(ncclAllGather(sizes + m, sizes, 1, ncclUint64, s.comm, s.stream), s.comm,
                       where, "ncclAllGather of the sizes");
    detail::nccl_cuda_check(cudaMemcpyAsync(s.host_sizes.data(), sizes, m * sizeof(std::uint64_t),
                                            cudaMemcpyDeviceToHost, s.stream),
                            where, "cudaMemcpyAsync of the sizes to the host");
    s.synchronize(where);
    std::size_t total = 0;
    for (std::size_t j = 0; j < m; ++j) total += static_cast<std::size_t>(s.host_sizes[j]);
    out.resize(total);

    // 2. The bytes, into device scratch at each rank's offset.
    if (total != 0) {
      std::byte* gathered = s.gathered.get(total, s.stream, where);
      const void* send = stage_in(policy, where, s.data, in.data(), own);
      std::size_t offset = 0, own_offset = 0;
      detail::nccl_check(ncclGroupStart(), s.comm, where, "ncclGroupStart");
      ncclResult_t result = ncclSuccess;
      for (std::size_t j = 0; j < m && result == ncclSuccess; ++j) {
        const auto bytes = static_cast<std::size_t>(s.host_sizes[j]);
        if (j == static_cast<std::size_t>(s.rank)) {
          own_offset = offset;
        } else {
          if (own != 0) result = ncclSend(send, own, ncclUint8, static_cast<int>(j), s.comm, s.stream);
          if (result == ncclSuccess && bytes != 0)
            result = ncclRecv(gathered + offset, bytes, ncclUint8, static_cast<int>(j), s.comm, s.stream);
        }
        offset += bytes;
      }
      const ncclResult_t ended = ncclGroupEnd();  // always closes the group
      detail::nccl_check(result, s.comm, where, "ncclSend/ncclRecv of ", own, " bytes from rank ",
                         s.rank);
      detail::nccl_check(ended, s.comm, where, "ncclGroupEnd");
      if (own != 0)
        detail::nccl_cuda_check(cudaMemcpyAsync(gathered + own_offset, send, own,
                                                cudaMemcpyDeviceToDevice, s.stream),
                                where, "cudaMemcpyAsync of this rank's bytes");
      detail::nccl_cuda_check(cudaMemcpyAsync(out.data(), gathered, total, cudaMemcpyDeviceToHost,
                                              s.stream),
                              where, "cudaMemcpyAsync of the gathered bytes to the host");
      s.synchronize(where);
    }
    for (std::size_t j = 0; j < m; ++j) counts[j] = static_cast<std::size_t>(s.host_sizes[j]);
    s.count(own, total - own);
  }

  /// Every rank's data becomes root's data (ncclBroadcast in place). root
  /// must be in [0, size()).
  template <class Policy, class T>
  void broadcast(const Policy& policy, std::span<T> data, int root) {
    static_assert(std::is_trivially_copyable_v<T> && !std::is_const_v<T>,
                  "nccl_comm::broadcast writes data on every rank but the root: T must be a "
                  "non-const trivially copyable type");
    constexpr std::string_view where = "gcomp::nccl_comm::broadcast";
    detail::nccl_state& s = *state_;
    check_in_half_open(where, "root", root, 0, s.size);
    detail::nccl_device_guard device(s.device, where);
    if (!data.empty()) {
      void* buffer = stage_in(policy, where, s.data, data.data(), data.size_bytes());
      enter(policy, where);
      detail::nccl_check(ncclBroadcast(buffer, buffer, data.size_bytes(), ncclUint8, root, s.comm,
                                       s.stream),
                         s.comm, where, "ncclBroadcast of ", data.size_bytes(), " bytes from rank ",
                         root);
      leave(policy, where);
      stage_out(policy, where, data.data(), buffer, data.size_bytes());
    }
    if (s.rank == root) s.count(data.size_bytes(), 0);
    else s.count(0, data.size_bytes());
  }

  /// Returns once every rank has called barrier(): a one-integer all-reduce,
  /// waited for on the host.
  void barrier() {
    constexpr std::string_view where = "gcomp::nccl_comm::barrier";
    detail::nccl_state& s = *state_;
    detail::nccl_device_guard device(s.device, where);
    std::byte* one = s.sizes.get(sizeof(std::uint64_t), s.stream, where);
    detail::nccl_check(ncclAllReduce(one, one, 1, ncclInt32, ncclSum, s.comm, s.stream), s.comm,
                       where, "ncclAllReduce of one integer");
    s.synchronize(where);
    s.count(0, 0);
  }

  /// Non-blocking allreduce_sum: queues it and returns a request holding a
  /// CUDA event recorded after it. With a host policy the data is staged in
  /// device memory allocated for this call (cudaMallocAsync) and copied back
  /// when completion is observed; do not touch it before.
  template <class Policy, class T>
  [[nodiscard]] nccl_request iallreduce_sum(const Policy& policy, std::span<T> data) {
    static_assert(detail::nccl_summable<T>,
                  "nccl_comm::iallreduce_sum: T must be float, double or a 1, 4 or 8-byte integer");
    constexpr std::string_view where = "gcomp::nccl_comm::iallreduce_sum";
    detail::nccl_state& s = *state_;
    detail::nccl_device_guard device(s.device, where);
    nccl_request request;
    request.event_ = s.take_event(where);
    request.bytes_ = data.size_bytes();
    void* buffer = data.data();
    // Until the request owns them, the event and the staging block are freed here.
    struct pending {
      detail::nccl_state& s;
      nccl_request& r;
      bool armed = true;
      ~pending() {
        if (!armed) return;
        if (r.staged_) cudaFreeAsync(r.staged_, s.stream);
        s.give_event(r.event_);
        r.staged_ = nullptr;
      }
    } guard{s, request};
    if constexpr (host_memory_policy<Policy>) {
      if (!data.empty()) {
        detail::nccl_cuda_check(cudaMallocAsync(&request.staged_, data.size_bytes(), s.stream),
                                where, "cudaMallocAsync of ", data.size_bytes(), " bytes");
        detail::nccl_cuda_check(cudaMemcpyAsync(request.staged_, data.data(), data.size_bytes(),
                                                cudaMemcpyHostToDevice, s.stream),
                                where, "cudaMemcpyAsync of the data to the device");
        buffer = request.staged_;
        request.host_ = static_cast<void*>(data.data());
      }
    }
    enter(policy, where);
    if (!data.empty())
      detail::nccl_check(ncclAllReduce(buffer, buffer, data.size(), detail::nccl_sum_type<T>(),
                                       ncclSum, s.comm, s.stream),
                         s.comm, where, "ncclAllReduce of ", data.size(), " elements");
    leave(policy, where);
    detail::nccl_cuda_check(cudaEventRecord(request.event_, s.stream), where, "cudaEventRecord");
    guard.armed = false;
    request.state_ = &s;
    return request;
  }

  comm_stats stats() const { return state_->stats; }
  void reset_stats() { state_->stats = {}; }

 private:
  static std::unique_ptr<detail::nccl_state> make_state(ncclComm_t comm, cudaStream_t stream) {
    constexpr std::string_view where = "gcomp::nccl_comm::nccl_comm";
    require(comm != nullptr, where, "comm is a null ncclComm_t");
    auto s = std::make_unique<detail::nccl_state>();
    s->comm = comm;
    s->stream = stream;
    detail::nccl_check(ncclCommCount(comm, &s->size), comm, where, "ncclCommCount");
    detail::nccl_check(ncclCommUserRank(comm, &s->rank), comm, where, "ncclCommUserRank");
    detail::nccl_check(ncclCommCuDevice(comm, &s->device), comm, where, "ncclCommCuDevice");
    detail::nccl_device_guard device(s->device, where);
    detail::nccl_cuda_check(cudaStreamCreateWithFlags(&s->copy_stream, cudaStreamNonBlocking),
                            where, "cudaStreamCreateWithFlags");
    detail::nccl_cuda_check(cudaEventCreateWithFlags(&s->policy_ready, cudaEventDisableTiming),
                            where, "cudaEventCreateWithFlags");
    detail::nccl_cuda_check(cudaEventCreateWithFlags(&s->comm_done, cudaEventDisableTiming),
                            where, "cudaEventCreateWithFlags");
    return s;
  }

  // Host policies: copies `bytes` of host data into device scratch and
  // returns it; device policies: the data itself.
  template <class Policy, class V>
  void* stage_in(const Policy&, std::string_view where, detail::nccl_scratch& scratch, V* data,
                 std::size_t bytes) {
    void* p = const_cast<void*>(static_cast<const void*>(data));
    if constexpr (host_memory_policy<Policy>) {
      detail::nccl_state& s = *state_;
      std::byte* device = scratch.get(bytes, s.stream, where);
      if (bytes != 0)
        detail::nccl_cuda_check(cudaMemcpyAsync(device, p, bytes, cudaMemcpyHostToDevice, s.stream),
                                where, "cudaMemcpyAsync of ", bytes, " bytes to the device");
      return device;
    } else {
      return p;
    }
  }

  // Host policies: copies the result back and waits for it.
  template <class Policy>
  void stage_out(const Policy&, std::string_view where, void* host, const void* device,
                 std::size_t bytes) {
    if constexpr (host_memory_policy<Policy>) {
      detail::nccl_state& s = *state_;
      detail::nccl_cuda_check(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, s.stream),
                              where, "cudaMemcpyAsync of ", bytes, " bytes to the host");
      s.synchronize(where);
    }
  }

  // A policy with its own stream: the comm's stream waits for what the
  // policy's stream queued before the call (the data being produced)...
  template <class Policy>
  void enter(const Policy& policy, std::string_view where) {
    if constexpr (detail::nccl_stream_policy<Policy>) {
      detail::nccl_state& s = *state_;
      const cudaStream_t theirs = policy.stream;
      if (theirs == s.stream) return;
      detail::nccl_cuda_check(cudaEventRecord(s.policy_ready, theirs), where, "cudaEventRecord");
      detail::nccl_cuda_check(cudaStreamWaitEvent(s.stream, s.policy_ready, 0), where,
                              "cudaStreamWaitEvent");
    }
  }
  // ...and the policy's stream waits for the collective before its next work.
  template <class Policy>
  void leave(const Policy& policy, std::string_view where) {
    if constexpr (detail::nccl_stream_policy<Policy>) {
      detail::nccl_state& s = *state_;
      const cudaStream_t theirs = policy.stream;
      if (theirs == s.stream) return;
      detail::nccl_cuda_check(cudaEventRecord(s.comm_done, s.stream), where, "cudaEventRecord");
      detail::nccl_cuda_check(cudaStreamWaitEvent(theirs, s.comm_done, 0), where,
                              "cudaStreamWaitEvent");
    }
  }

  std::unique_ptr<detail::nccl_state> state_;
};

}  // namespace gcomp
