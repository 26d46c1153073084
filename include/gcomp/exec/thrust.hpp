// The Thrust policy thrust_device and the primitives of host.hpp written once with Thrust.
#pragma once

// Thrust's configuration first: it says which device system thrust::device is.
#include <thrust/detail/config.h>

#if THRUST_DEVICE_SYSTEM == THRUST_DEVICE_SYSTEM_CUDA && !defined(__CUDACC__)
#error "gcomp/exec/thrust.hpp: Thrust's CUDA device system needs nvcc; with a host compiler define THRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_OMP (and -fopenmp) or THRUST_DEVICE_SYSTEM_CPP"
#endif

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <thrust/copy.h>
#include <thrust/count.h>
#include <thrust/device_free.h>
#include <thrust/device_malloc.h>
#include <thrust/device_ptr.h>
#include <thrust/execution_policy.h>
#include <thrust/for_each.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/iterator/transform_iterator.h>
#include <thrust/system_error.h>

#include "gcomp/core/config.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/detail/reduce_order.hpp"
#include "gcomp/exec/policy.hpp"

namespace gcomp {
namespace detail {

/// Memory of one Thrust-backed policy that the primitives reuse from call to
/// call: their own block values and Thrust's temporaries (the scratch of
/// count_if and copy_if) are leased from it and handed back at the end of the
/// call, so after the first calls of a given size nothing is allocated.
///
/// Blocks live in the policy's device system (GPU memory for CUDA, host
/// memory for OpenMP/C++). A lease gets the smallest free block of at least
/// the size asked and at most twice it; when none fits, the free blocks that
/// are too small are released (they could serve nothing this large) and a new
/// one is allocated. The memory is returned when the last policy copy sharing
/// the workspace goes away. A mutex guards the bookkeeping, so policy copies
/// may be used from several host threads at once: each call leases its own blocks.
class thrust_workspace {
 public:
  // allocate throws on failure; `where` names the primitive for its message.
  using allocate_function = void* (*)(std::size_t bytes, std::string_view where);
  using free_function = void (*)(void* block) noexcept;

  thrust_workspace(allocate_function allocate, free_function free)
      : allocate_(allocate), free_(free) {}
  thrust_workspace(const thrust_workspace&) = delete;
  thrust_workspace& operator=(const thrust_workspace&) = delete;
  ~thrust_workspace() {
    for (const block& b : blocks_) free_(b.data);
  }

  /// A block of at least `bytes` bytes of device-system memory, for this caller alone.
  void* acquire(std::size_t bytes, std::string_view where) {
    require(bytes <= SIZE_MAX - 511, where, "a workspace of ", bytes, " bytes is more than memory can hold");
    // Rounding to 256 bytes keeps every block aligned for any element type
    // (cudaMalloc gives 256-byte alignment) and lets near sizes share blocks.
    bytes = (std::max<std::size_t>(bytes, 1) + 255) / 256 * 256;
    std::lock_guard lock(mutex_);
    block* best = nullptr;
    for (block& b : blocks_)
      if (!b.in_use && b.size >= bytes && b.size / 2 <= bytes && (!best || b.size < best->size))
        best = &b;
    if (best) {
      best->in_use = true;
      return best->data;
    }
    std::erase_if(blocks_, [&](const block& b) {
      if (b.in_use || b.size >= bytes) return false;
      free_(b.data);
      return true;
    });
    void* data = allocate_(bytes, where);
    ++allocations_;
    try {
      blocks_.push_back({data, bytes, true});
    } catch (...) {
      free_(data);
      throw;
    }
    return data;
  }

  /// Hands back a block from acquire(); it is kept for the next lease.
  void release(void* data) noexcept {
    std::lock_guard lock(mutex_);
    for (block& b : blocks_)
      if (b.data == data) b.in_use = false;
  }

  /// How many times device-system memory was allocated (tests use it to show reuse).
  std::size_t allocations() const {
    std::lock_guard lock(mutex_);
    return allocations_;
  }

  /// Runs f(std::span<std::size_t>) over a reused host buffer of at least n
  /// elements (layer tables on their way to the device), one caller at a time.
  template <class F>
  decltype(auto) with_host_staging(std::size_t n, F&& f) {
    std::lock_guard lock(staging_mutex_);
    if (staging_.size() < n) staging_.resize(n);
    return std::forward<F>(f)(std::span<std::size_t>(staging_.data(), n));
  }

 private:
  struct block {
    void* data;
    std::size_t size;
    bool in_use;
  };
  allocate_function allocate_;
  free_function free_;
  mutable std::mutex mutex_;
  std::vector<block> blocks_;
  std::size_t allocations_ = 0;
  std::mutex staging_mutex_;
  std::vector<std::size_t> staging_;
};

/// `count` elements of T leased from a workspace for one call.
template <class T>
class workspace_lease {
 public:
  workspace_lease(thrust_workspace& workspace, std::size_t count, std::string_view where)
      : workspace_(workspace), data_(static_cast<T*>(workspace.acquire(bytes(count, where), where))) {}
  workspace_lease(const workspace_lease&) = delete;
  workspace_lease& operator=(const workspace_lease&) = delete;
  ~workspace_lease() { workspace_.release(data_); }
  T* data() const { return data_; }

 private:
  static std::size_t bytes(std::size_t count, std::string_view where) {
    require(count <= SIZE_MAX / sizeof(T), where, "workspace of ", count, " elements of ",
            sizeof(T), " bytes overflows");
    return count * sizeof(T);
  }
  thrust_workspace& workspace_;
  T* data_;
};

/// The allocator Thrust gets for its temporaries, so they come from the workspace.
struct thrust_temporary_allocator {
  using value_type = char;
  thrust_workspace* workspace;
  std::string_view where;
  char* allocate(std::ptrdiff_t bytes) {
    return static_cast<char*>(workspace->acquire(static_cast<std::size_t>(bytes), where));
  }
  void deallocate(char* data, std::size_t) noexcept { workspace->release(data); }
};

inline thrust_workspace& checked_workspace(const std::shared_ptr<thrust_workspace>& workspace,
                                           std::string_view policy) {
  require(workspace != nullptr, policy, "workspace is null; keep the one the policy was built with");
  return *workspace;
}

// thrust_device's memory: the device system's own allocator (cudaMalloc for
// CUDA, malloc for OpenMP/C++); failure throws std::bad_alloc, as on the host.
inline void* thrust_device_allocate(std::size_t bytes, std::string_view) {
  return thrust::raw_pointer_cast(thrust::device_malloc<std::byte>(bytes));
}
inline void thrust_device_free(void* block) noexcept {
  try {
    thrust::device_free(thrust::device_pointer_cast(static_cast<std::byte*>(block)));
  } catch (...) {
    // Freeing at exit may fail once the CUDA runtime is torn down; nothing to do then.
  }
}

}  // namespace detail

/// Runs kernels through Thrust on thrust::device: on the device system that
/// THRUST_DEVICE_SYSTEM selects (CUDA under nvcc by default, OpenMP when
/// compiled with -DTHRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_OMP -fopenmp).
/// Spans handed to it point to that system's memory. Every primitive returns
/// when its work is done. Copies share one workspace (see thrust_workspace).
/// A program uses one device system: Thrust itself requires it, and
/// policy_traits<thrust_device> depends on it.
struct thrust_device {
  std::shared_ptr<detail::thrust_workspace> workspace = std::make_shared<detail::thrust_workspace>(
      &detail::thrust_device_allocate, &detail::thrust_device_free);
};

template <>
struct policy_traits<thrust_device> {
  static constexpr bool is_policy = true;
  static constexpr bool host_memory = THRUST_DEVICE_SYSTEM != THRUST_DEVICE_SYSTEM_CUDA;
};

namespace detail {

// ---------------------------------------------------------------------------
// The shared implementation. A Backend is what a Thrust-backed policy supplies:
//   workspace()                       its thrust_workspace
//   exec(thrust_temporary_allocator&) the Thrust execution policy to run on
//   to_device(where, dst, src, bytes) host -> policy memory
//   to_host(where, dst, src, bytes)   policy -> host memory; returns when the bytes are there
//   wait(where)                       returns when the work queued so far is done
//   fail(where, thrust::system_error) throws gcomp::error (noreturn)
// Every primitive that leases workspace memory waits before handing it back,
// so a lease is never reused while a kernel may still touch it.

/// Runs body(), turning Thrust's errors into gcomp::error.
template <class Backend, class Body>
decltype(auto) thrust_guarded(const Backend& backend, std::string_view where, Body&& body) {
  try {
    return std::forward<Body>(body)();
  } catch (const thrust::system_error& e) {
    backend.fail(where, e);
  }
}

GCOMP_HD constexpr std::size_t min_index(std::size_t a, std::size_t b) { return a < b ? a : b; }

template <class Index>
struct to_index {
  GCOMP_HD Index operator()(std::size_t i) const { return static_cast<Index>(i); }
};

// partial[b] = value of block b of [0, n): one thread per block, the order of reduce_order.hpp.
template <class R, class Reduce, class Transform>
struct reduce_blocks {
  R* partial;
  std::size_t n;
  R identity;
  Reduce reduce;
  Transform transform;
  GCOMP_HD void operator()(std::size_t b) const {
    // Local copies: reduce_one_block takes the functors by non-const reference.
    Reduce r = reduce;
    Transform t = transform;
    const std::size_t begin = b * reduce_block;
    partial[b] = reduce_one_block(begin, min_index(n, begin + reduce_block), identity, r, t);
  }
};

// *total = identity, then each of partial[0..count) combined left to right:
// one thread does the whole loop because Thrust's reductions promise no order.
template <class R, class Reduce>
struct combine_blocks {
  const R* partial;
  std::size_t count;
  R identity;
  Reduce reduce;
  R* total;
  GCOMP_HD void operator()(std::size_t) const {
    Reduce r = reduce;
    R value = identity;
    for (std::size_t b = 0; b < count; ++b) value = r(value, partial[b]);
    *total = value;
  }
};

// Layer tables on the device: first_block[layers + 1], then offset[layers], then size[layers].
struct layer_table {
  const std::size_t* first_block;
  const std::size_t* offset;
  const std::size_t* size;
  std::size_t layers;

  // The layer that block b (counted over all layers) belongs to.
  GCOMP_HD std::size_t layer_of(std::size_t b) const {
    std::size_t lo = 0, hi = layers;  // first_block[lo] <= b < first_block[hi]
    while (hi - lo > 1) {
      const std::size_t mid = lo + (hi - lo) / 2;
      if (first_block[mid] <= b)
        lo = mid;
      else
        hi = mid;
    }
    return lo;
  }
};

template <class R, class Reduce, class Transform>
struct reduce_layer_blocks {
  layer_table table;
  R* partial;
  R identity;
  Reduce reduce;
  Transform transform;
  GCOMP_HD void operator()(std::size_t b) const {
    Reduce r = reduce;
    Transform t = transform;
    const std::size_t d = table.layer_of(b);
    const std::size_t begin = table.offset[d] + (b - table.first_block[d]) * reduce_block;
    const std::size_t end = min_index(table.offset[d] + table.size[d], begin + reduce_block);
    partial[b] = reduce_one_block(begin, end, identity, r, t);
  }
};

// One thread per layer, each combining its own blocks left to right.
template <class R, class Reduce>
struct combine_layers {
  layer_table table;
  const R* partial;
  R identity;
  Reduce reduce;
  R* totals;
  GCOMP_HD void operator()(std::size_t d) const {
    Reduce r = reduce;
    R value = identity;
    for (std::size_t b = table.first_block[d]; b < table.first_block[d + 1]; ++b)
      value = r(value, partial[b]);
    totals[d] = value;
  }
};

template <class Backend, class F>
void thrust_for_each_index(const Backend& backend, std::size_t n, F f) {
  if (n == 0) return;
  thrust_guarded(backend, "gcomp::for_each_index", [&] {
    thrust_temporary_allocator alloc{&backend.workspace(), "gcomp::for_each_index"};
    thrust::for_each_n(backend.exec(alloc), thrust::counting_iterator<std::size_t>(0), n, f);
  });
}

template <class Backend, class R, class Reduce, class Transform>
R thrust_transform_reduce(const Backend& backend, std::size_t n, R identity, Reduce reduce,
                          Transform transform) {
  static_assert(std::is_trivially_copyable_v<R>,
                "gcomp::transform_reduce: on a Thrust policy the result type must be trivially "
                "copyable (it is computed in device memory)");
  const std::size_t blocks = reduce_block_count(n);
  if (blocks == 0) return identity;
  constexpr std::string_view where = "gcomp::transform_reduce";
  return thrust_guarded(backend, where, [&] {
    thrust_workspace& workspace = backend.workspace();
    workspace_lease<R> partial(workspace, blocks + 1, where);  // block values, then the total
    thrust_temporary_allocator alloc{&workspace, where};
    const auto exec = backend.exec(alloc);
    thrust::counting_iterator<std::size_t> zero(0);
    thrust::for_each_n(exec, zero, blocks,
                       reduce_blocks<R, Reduce, Transform>{partial.data(), n, identity, reduce, transform});
    thrust::for_each_n(exec, zero, 1,
                       combine_blocks<R, Reduce>{partial.data(), blocks, identity, reduce,
                                                 partial.data() + blocks});
    R total = identity;
    backend.to_host(where, &total, partial.data() + blocks, sizeof(R));
    return total;
  });
}

template <class Backend, class R, class Reduce, class Transform>
void thrust_reduce_per_layer(const Backend& backend, const layout& lay, std::span<R> out,
                             R identity, Reduce reduce, Transform transform) {
  static_assert(std::is_trivially_copyable_v<R>,
                "gcomp::reduce_per_layer: on a Thrust policy the result type must be trivially "
                "copyable (it is computed in device memory)");
  constexpr std::string_view where = "gcomp::reduce_per_layer";
  check_same_size(where, "out", out.size(), "layout layers", lay.num_layers());
  const std::size_t layers = lay.num_layers();
  if (layers == 0) return;
  thrust_guarded(backend, where, [&] {
    thrust_workspace& workspace = backend.workspace();
    const std::size_t table_size = 3 * layers + 1;
    workspace_lease<std::size_t> table_memory(workspace, table_size, where);
    // Blocks are numbered over all layers in layer order, so small and large
    // layers share the threads evenly.
    const std::size_t blocks = workspace.with_host_staging(table_size, [&](std::span<std::size_t> host) {
      host[0] = 0;
      for (std::size_t d = 0; d < layers; ++d) {
        host[d + 1] = host[d] + reduce_block_count(lay[d].size);
        host[layers + 1 + d] = lay[d].offset;
        host[2 * layers + 1 + d] = lay[d].size;
      }
      backend.to_device(where, table_memory.data(), host.data(), table_size * sizeof(std::size_t));
      return host[layers];
    });
    const layer_table table{table_memory.data(), table_memory.data() + layers + 1,
                            table_memory.data() + 2 * layers + 1, layers};
    workspace_lease<R> partial(workspace, blocks + layers, where);  // block values, then layer totals
    thrust_temporary_allocator alloc{&workspace, where};
    const auto exec = backend.exec(alloc);
    thrust::counting_iterator<std::size_t> zero(0);
    thrust::for_each_n(exec, zero, blocks,
                       reduce_layer_blocks<R, Reduce, Transform>{table, partial.data(), identity,
                                                                 reduce, transform});
    thrust::for_each_n(exec, zero, layers,
                       combine_layers<R, Reduce>{table, partial.data(), identity, reduce,
                                                 partial.data() + blocks});
    backend.to_host(where, out.data(), partial.data() + blocks, layers * sizeof(R));
  });
}

template <class Backend, class Index, class Pred>
std::size_t thrust_select_if(const Backend& backend, std::size_t n, Pred pred, std::span<Index> out) {
  if (n == 0) return 0;
  constexpr std::string_view where = "gcomp::select_if";
  return thrust_guarded(backend, where, [&] {
    thrust_temporary_allocator alloc{&backend.workspace(), where};
    const auto exec = backend.exec(alloc);
    thrust::counting_iterator<std::size_t> first(0);
    // Counting first lets a too-small out be reported before anything is written.
    const auto count = static_cast<std::size_t>(thrust::count_if(exec, first, first + n, pred));
    require(count <= out.size(), where, "out has room for ", out.size(), " indices but ", count,
            " were selected");
    auto indices = thrust::make_transform_iterator(first, to_index<Index>{});
    // copy_if is stable: the indices come out in increasing order.
    thrust::copy_if(exec, indices, indices + n, first, out.data(), pred);
    backend.wait(where);
    return count;
  });
}

/// What thrust_device supplies to the shared implementation.
struct thrust_device_backend {
  const thrust_device& policy;

  thrust_workspace& workspace() const {
    return checked_workspace(policy.workspace, "gcomp::thrust_device");
  }
  // Thrust's synchronous thrust::device: each algorithm returns when done.
  static auto exec(thrust_temporary_allocator& alloc) { return thrust::device(alloc); }
  static void to_device(std::string_view, void* dst, const void* src, std::size_t bytes) {
    const auto* from = static_cast<const std::byte*>(src);
    thrust::copy(from, from + bytes, thrust::device_pointer_cast(static_cast<std::byte*>(dst)));
  }
  static void to_host(std::string_view, void* dst, const void* src, std::size_t bytes) {
    const auto from = thrust::device_pointer_cast(static_cast<const std::byte*>(src));
    thrust::copy(from, from + bytes, static_cast<std::byte*>(dst));
  }
  static void wait(std::string_view) {}
  [[noreturn]] static void fail(std::string_view where, const thrust::system_error& e) {
    gcomp::fail(where, "Thrust error: ", e.what());
  }
};

// policy_buffer's memory under thrust_device: the device system's allocator,
// as for the workspace, with Thrust's copies; errors become gcomp::error.
template <class Body>
void thrust_buffer_guarded(std::string_view where, Body&& body) {
  try {
    std::forward<Body>(body)();
  } catch (const thrust::system_error& e) {
    thrust_device_backend::fail(where, e);
  }
}
inline void* thrust_buffer_allocate(std::size_t bytes, std::string_view where) {
  try {
    return thrust_device_allocate(bytes, where);
  } catch (const std::bad_alloc& e) {
    fail(where, "thrust::device_malloc of ", bytes, " bytes failed: ", e.what());
  } catch (const thrust::system_error& e) {
    fail(where, "thrust::device_malloc of ", bytes, " bytes failed: ", e.what());
  }
}
inline void thrust_buffer_copy(void* dst, const void* src, std::size_t bytes, std::string_view where) {
  thrust_buffer_guarded(where, [&] {
    const auto from = thrust::device_pointer_cast(static_cast<const std::byte*>(src));
    thrust::copy(thrust::device, from, from + bytes,
                 thrust::device_pointer_cast(static_cast<std::byte*>(dst)));
  });
}
inline void thrust_buffer_to_host(void* dst, const void* src, std::size_t bytes,
                                  std::string_view where) {
  thrust_buffer_guarded(where, [&] { thrust_device_backend::to_host(where, dst, src, bytes); });
}
inline void thrust_buffer_from_host(void* dst, const void* src, std::size_t bytes,
                                    std::string_view where) {
  thrust_buffer_guarded(where, [&] { thrust_device_backend::to_device(where, dst, src, bytes); });
}

}  // namespace detail

/// thrust_device's memory for policy_buffer: the device system's (host memory
/// under OpenMP/C++, GPU memory under CUDA).
inline constexpr memory_kind thrust_device_memory_kind{
    policy_traits<thrust_device>::host_memory ? "Thrust device-system memory (host)"
                                              : "Thrust device-system memory (CUDA)",
    policy_traits<thrust_device>::host_memory, &detail::thrust_buffer_allocate,
    &detail::thrust_device_free,               &detail::thrust_buffer_copy,
    &detail::thrust_buffer_to_host,            &detail::thrust_buffer_from_host};

inline const memory_kind& memory_kind_of(const thrust_device&) { return thrust_device_memory_kind; }

/// Calls f(i) for every i in [0, n) on the device system. Calls for different
/// i run concurrently; f must be callable there (under nvcc: [=] GCOMP_HD (std::size_t i)).
template <class F>
void for_each_index(const thrust_device& policy, std::size_t n, F&& f) {
  detail::thrust_for_each_index(detail::thrust_device_backend{policy}, n, std::forward<F>(f));
}

/// As transform_reduce for host_seq: the same fixed order, so the result is
/// bitwise the host's (on CUDA only without FMA contraction: nvcc --fmad=false,
/// or __fmul_rn in the transform). reduce and transform run on the device system.
template <class R, class Reduce, class Transform>
R transform_reduce(const thrust_device& policy, std::size_t n, R identity, Reduce reduce,
                   Transform transform) {
  return detail::thrust_transform_reduce(detail::thrust_device_backend{policy}, n, identity,
                                         reduce, transform);
}

/// As reduce_per_layer for host_seq; `out` is host memory whatever the device system.
template <class R, class Reduce, class Transform>
void reduce_per_layer(const thrust_device& policy, const layout& lay, std::span<R> out,
                      R identity, Reduce reduce, Transform transform) {
  detail::thrust_reduce_per_layer(detail::thrust_device_backend{policy}, lay, out, identity,
                                  reduce, transform);
}

/// As select_if for host_seq; `out` is device-system memory. pred may be
/// called more than once per index.
template <class Index, class Pred>
std::size_t select_if(const thrust_device& policy, std::size_t n, Pred pred, std::span<Index> out) {
  return detail::thrust_select_if(detail::thrust_device_backend{policy}, n, pred, out);
}

}  // namespace gcomp
