// policy_buffer<T>: memory where a policy's data lives (host, Thrust's device system, a CUDA device), for the state parts keep across steps.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <span>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/exec/host.hpp"
#include "gcomp/exec/policy.hpp"

namespace gcomp {

/// How to manage one kind of memory: what policy_buffer calls to allocate,
/// free and copy its bytes. One constant object per kind; a buffer remembers
/// the address of the kind its memory came from, so it frees and copies with
/// the right calls whatever policy it meets later.
///
/// A policy names its kind through an overload of memory_kind_of(const
/// Policy&), found by argument-dependent lookup: the host policies get
/// host_memory_kind below, thrust_device its own in exec/thrust.hpp and
/// cuda_par its own in exec/cuda.cuh, so this header needs neither Thrust nor
/// CUDA. Every function throws gcomp::error naming `where` (the caller) and
/// the failed call; none is meant for the per-step path: CUDA's copies wait
/// for the whole device.
struct memory_kind {
  std::string_view name;  // for messages: "host memory", "CUDA device memory"
  bool host_accessible;   // the host may dereference pointers into it
  void* (*allocate)(std::size_t bytes, std::string_view where);
  void (*deallocate)(void* block) noexcept;
  // dst and src both of this kind, not overlapping.
  void (*copy)(void* dst, const void* src, std::size_t bytes, std::string_view where);
  // dst in host memory, src of this kind: the bytes are there when it returns.
  void (*to_host)(void* dst, const void* src, std::size_t bytes, std::string_view where);
  // dst of this kind, src in host memory: the host bytes may be reused when it
  // returns, and kernels launched afterwards on any stream see the new bytes.
  void (*from_host)(void* dst, const void* src, std::size_t bytes, std::string_view where);
};

namespace detail {

// 64 bytes: a cache line and an AVX-512 vector, so host kernels over a buffer
// start aligned (256 for CUDA comes from cudaMalloc itself).
inline constexpr std::size_t host_buffer_alignment = 64;

inline void* host_allocate(std::size_t bytes, std::string_view where) {
  try {
    return ::operator new(bytes, std::align_val_t{host_buffer_alignment});
  } catch (const std::bad_alloc&) {
    fail(where, "allocating ", bytes, " bytes of host memory failed");
  }
}
inline void host_deallocate(void* block) noexcept {
  ::operator delete(block, std::align_val_t{host_buffer_alignment});
}
inline void host_copy(void* dst, const void* src, std::size_t bytes, std::string_view) {
  std::memcpy(dst, src, bytes);
}

}  // namespace detail

/// Ordinary host memory (aligned operator new), for host_seq and host_par.
inline constexpr memory_kind host_memory_kind{"host memory", true, &detail::host_allocate,
                                              &detail::host_deallocate, &detail::host_copy,
                                              &detail::host_copy, &detail::host_copy};

/// Any policy whose data lives in host memory allocates it with new, unless
/// it has an overload of its own (thrust_device does, a non-template overload
/// wins over this one).
template <host_memory_policy Policy>
const memory_kind& memory_kind_of(const Policy&) {
  return host_memory_kind;
}

/// A policy whose memory_kind_of is found: the policies a policy_buffer serves.
template <class Policy>
concept buffer_policy = execution_policy<Policy> && requires(const Policy& p) {
  { memory_kind_of(p) } -> std::same_as<const memory_kind&>;
};

/// Whether memory of `kind` can hold data for kernels run under `policy`: the
/// policy's own kind, or host-accessible memory for a policy that works on
/// host memory (state built under host_seq serves host_par and the Thrust
/// OpenMP system, which see the same memory).
template <buffer_policy Policy>
bool memory_serves(const memory_kind& kind, const Policy& policy) {
  return &kind == &memory_kind_of(policy) ||
         (kind.host_accessible && policy_traits<std::remove_cvref_t<Policy>>::host_memory);
}

/// An array of T in the memory where a policy's data lives: host memory for
/// host_seq and host_par, Thrust's device system for thrust_device (host
/// memory under THRUST_DEVICE_SYSTEM_OMP), CUDA device memory for cuda_par.
/// Parts keep their state across steps in it (optimizer moments, momentum),
/// so the same code runs under every policy and spans over it can be handed
/// to kernels.
///
/// - Sized on first use: assign(policy, n, value) allocates for that policy
///   (nothing before), and later assigns of at most the capacity with a policy
///   the memory serves reuse it, so a part that assigns once at its first step
///   allocates nothing afterwards. clear() keeps the memory; release() frees it.
/// - Value semantics: a copy allocates the same kind and copies the contents
///   (device to device for CUDA); a move takes the memory.
/// - Access: span() and data() point into that memory, so under cuda_par they
///   are device pointers the host must not dereference: read them with
///   to_host()/copy_to_host().
/// - Filling goes through the policy's for_each_index: under cuda_par it is
///   queued on the policy's stream, ordered before the kernels that follow.
///   Allocation, copies and freeing are not per-step operations and, for
///   CUDA, wait for the whole device (cudaMalloc/cudaFree, cudaMemcpy between
///   cudaDeviceSynchronize calls), so they are correct whatever streams
///   touched the buffer and the buffer holds no stream that could be destroyed
///   before it.
/// T must be trivially copyable: contents move as bytes between memories.
template <class T>
class policy_buffer {
  static_assert(std::is_trivially_copyable_v<T>,
                "gcomp::policy_buffer: T must be trivially copyable (it is copied as bytes, "
                "possibly between host and device)");

 public:
  using value_type = T;

  policy_buffer() noexcept = default;
  policy_buffer(const policy_buffer& other) { copy_from(other); }
  policy_buffer(policy_buffer&& other) noexcept
      : kind_(std::exchange(other.kind_, nullptr)),
        data_(std::exchange(other.data_, nullptr)),
        size_(std::exchange(other.size_, 0)),
        capacity_(std::exchange(other.capacity_, 0)) {}
  policy_buffer& operator=(const policy_buffer& other) {
    if (this != &other) copy_from(other);
    return *this;
  }
  policy_buffer& operator=(policy_buffer&& other) noexcept {
    if (this != &other) {
      release();
      kind_ = std::exchange(other.kind_, nullptr);
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
      capacity_ = std::exchange(other.capacity_, 0);
    }
    return *this;
  }
  ~policy_buffer() { release(); }

  /// Makes the buffer n copies of `value` in the memory of `policy`,
  /// allocating only if the current memory is too small or does not serve
  /// the policy. `where` names the caller in error messages.
  template <buffer_policy Policy>
  void assign(const Policy& policy, std::size_t n, T value,
              std::string_view where = "gcomp::policy_buffer::assign") {
    reserve_for(policy, n, where);
    size_ = n;
    fill(policy, value, where);
  }

  /// Makes the buffer n elements in the memory of `policy` without writing
  /// them (scratch a kernel overwrites): allocates only if the current memory
  /// is too small or does not serve the policy; the contents are unspecified.
  template <buffer_policy Policy>
  void resize(const Policy& policy, std::size_t n,
              std::string_view where = "gcomp::policy_buffer::resize") {
    reserve_for(policy, n, where);
    size_ = n;
  }

  /// Makes the buffer a copy of host `values` in the memory of `policy`.
  template <buffer_policy Policy>
  void assign_from_host(const Policy& policy, std::span<const T> values,
                        std::string_view where = "gcomp::policy_buffer::assign_from_host") {
    reserve_for(policy, values.size(), where);
    size_ = values.size();
    if (size_ > 0) kind_->from_host(data_, values.data(), size_ * sizeof(T), where);
  }

  /// Sets every element to `value` with the policy's for_each_index (queued on
  /// cuda_par's stream, not waited for). The memory must serve the policy.
  template <buffer_policy Policy>
  void fill(const Policy& policy, T value, std::string_view where = "gcomp::policy_buffer::fill") {
    check_serves(policy, where, "the buffer");
    if (size_ == 0) return;
    T* p = data_;
    for_each_index(policy, size_, [=] GCOMP_HD(std::size_t i) { p[i] = value; });
  }

  /// Copies the contents into host memory `out` (out.size() must equal size()).
  void copy_to_host(std::span<T> out,
                    std::string_view where = "gcomp::policy_buffer::copy_to_host") const {
    check_same_size(where, "out", out.size(), "the buffer", size_);
    if (size_ > 0) kind_->to_host(out.data(), data_, size_ * sizeof(T), where);
  }
  /// The contents as a host vector.
  std::vector<T> to_host() const {
    std::vector<T> out(size_);
    copy_to_host(std::span<T>(out), "gcomp::policy_buffer::to_host");
    return out;
  }

  /// Throws gcomp::error unless the memory serves `policy` (or none is held
  /// yet): e.g. state built under host_seq handed to cuda_par kernels would
  /// be host pointers dereferenced on the GPU. `what` names the buffer.
  template <buffer_policy Policy>
  void check_serves(const Policy& policy, std::string_view where, std::string_view what) const {
    if (kind_ == nullptr || memory_serves(*kind_, policy)) return;
    fail(where, what, " in ", kind_->name, " cannot be used under this policy (its data is in ",
         memory_kind_of(policy).name, "); call reset() first");
  }

  /// Size 0; the memory is kept for the next assign.
  void clear() noexcept { size_ = 0; }
  /// Size 0 and the memory freed.
  void release() noexcept {
    if (data_ != nullptr) kind_->deallocate(data_);
    kind_ = nullptr;
    data_ = nullptr;
    size_ = capacity_ = 0;
  }

  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  std::size_t capacity() const noexcept { return capacity_; }
  /// The kind of the memory held (null before the first assign and after release()).
  const memory_kind* memory() const noexcept { return kind_; }
  T* data() noexcept { return data_; }
  const T* data() const noexcept { return data_; }
  std::span<T> span() noexcept { return {data_, size_}; }
  std::span<const T> span() const noexcept { return {data_, size_}; }

 private:
  static std::size_t bytes_of(std::size_t n, std::string_view where) {
    require(n <= SIZE_MAX / sizeof(T), where, "a buffer of n = ", n, " elements of ", sizeof(T),
            " bytes is more than memory can hold");
    return n * sizeof(T);
  }

  // Capacity for n elements in memory that serves `policy`.
  template <class Policy>
  void reserve_for(const Policy& policy, std::size_t n, std::string_view where) {
    const std::size_t bytes = bytes_of(n, where);
    if (kind_ != nullptr && memory_serves(*kind_, policy) && n <= capacity_) return;
    const memory_kind& kind = memory_kind_of(policy);
    release();  // before allocating: the old and new blocks need not fit at once
    if (n == 0) return;
    data_ = static_cast<T*>(kind.allocate(bytes, where));
    kind_ = &kind;
    capacity_ = n;
  }

  void copy_from(const policy_buffer& other) {
    constexpr std::string_view where = "gcomp::policy_buffer (copy)";
    if (other.size_ == 0) {
      size_ = 0;
      return;
    }
    if (kind_ != other.kind_ || capacity_ < other.size_) {
      release();
      data_ = static_cast<T*>(other.kind_->allocate(other.size_ * sizeof(T), where));
      kind_ = other.kind_;
      capacity_ = other.size_;
    }
    kind_->copy(data_, other.data_, other.size_ * sizeof(T), where);
    size_ = other.size_;
  }

  const memory_kind* kind_ = nullptr;
  T* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
};

/// Copies `from`, data of `policy` (device memory under cuda_par), into host
/// memory `to`; returns when the bytes are there. Sizes must match. For
/// reading a part's state (an optimizer's exp_avg()) whatever the policy.
template <class T, buffer_policy Policy>
void copy_to_host(const Policy& policy, std::span<const T> from, std::span<T> to) {
  constexpr std::string_view where = "gcomp::copy_to_host";
  check_same_size(where, "to", to.size(), "from", from.size());
  if (!from.empty()) memory_kind_of(policy).to_host(to.data(), from.data(), from.size_bytes(), where);
}

/// Copies host memory `from` into `to`, data of `policy`; kernels launched
/// afterwards see the new values. Sizes must match.
template <class T, buffer_policy Policy>
void copy_from_host(const Policy& policy, std::span<const T> from, std::span<T> to) {
  constexpr std::string_view where = "gcomp::copy_from_host";
  check_same_size(where, "to", to.size(), "from", from.size());
  if (!from.empty())
    memory_kind_of(policy).from_host(to.data(), from.data(), from.size_bytes(), where);
}

}  // namespace gcomp
