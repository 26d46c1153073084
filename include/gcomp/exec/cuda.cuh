// The CUDA stream policy cuda_par: the Thrust primitives of thrust.hpp run on one CUDA stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>
#include <span>
#include <string_view>
#include <utility>

#include <thrust/system/cuda/execution_policy.h>
#include <thrust/system/cuda/error.h>

#include "gcomp/core/error.hpp"
#include "gcomp/core/layout.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/policy.hpp"
#include "gcomp/exec/thrust.hpp"

namespace gcomp {
namespace detail {

/// Throws gcomp::error naming the CUDA error unless status is cudaSuccess.
inline void cuda_check(cudaError_t status, std::string_view where, std::string_view what) {
  if (status == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so later calls do not report it again
  fail(where, what, " failed: ", cudaGetErrorName(status), ": ", cudaGetErrorString(status));
}

inline void* cuda_workspace_allocate(std::size_t bytes, std::string_view where) {
  void* block = nullptr;
  const cudaError_t status = cudaMalloc(&block, bytes);
  if (status != cudaSuccess)
    cuda_check(status, where, concat("cudaMalloc of ", bytes, " bytes of workspace"));
  return block;
}

// cudaFree waits for the device, so a block is never freed under a running
// kernel; its error at exit (runtime already torn down) is ignored.
inline void cuda_workspace_free(void* block) noexcept { cudaFree(block); }

// policy_buffer's memory under cuda_par (see memory_kind in exec/buffer.hpp).
//
// cudaMalloc/cudaFree rather than cudaMallocAsync/cudaFreeAsync on the
// policy's stream: a buffer is allocated once (a part's first step) and lives
// as long as the part, so stream-ordered allocation would save nothing per
// step, while it would tie the buffer to a stream the user may destroy
// first (cudaFreeAsync on a dead stream is undefined) and to devices with
// memory pools. cudaFree waits for the device, so no kernel on any stream
// still uses a freed block; copies wait for the device before and after for
// the same reason (cudaMemcpy alone does not order after non-blocking streams).
inline void* cuda_buffer_allocate(std::size_t bytes, std::string_view where) {
  void* block = nullptr;
  const cudaError_t status = cudaMalloc(&block, bytes);
  if (status != cudaSuccess) cuda_check(status, where, concat("cudaMalloc of ", bytes, " bytes"));
  return block;
}
inline void cuda_buffer_free(void* block) noexcept { cudaFree(block); }

inline void cuda_buffer_memcpy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind,
                               std::string_view where, std::string_view what) {
  cuda_check(cudaDeviceSynchronize(), where, concat("cudaDeviceSynchronize before cudaMemcpy ", what));
  cuda_check(cudaMemcpy(dst, src, bytes, kind), where, concat("cudaMemcpy ", what, " of ", bytes, " bytes"));
  // From pageable host memory cudaMemcpy may return before the device holds
  // the bytes; waiting makes them visible to kernels on every stream.
  cuda_check(cudaDeviceSynchronize(), where, concat("cudaDeviceSynchronize after cudaMemcpy ", what));
}
inline void cuda_buffer_copy(void* dst, const void* src, std::size_t bytes, std::string_view where) {
  cuda_buffer_memcpy(dst, src, bytes, cudaMemcpyDeviceToDevice, where, "device to device");
}
inline void cuda_buffer_to_host(void* dst, const void* src, std::size_t bytes, std::string_view where) {
  cuda_buffer_memcpy(dst, src, bytes, cudaMemcpyDeviceToHost, where, "device to host");
}
inline void cuda_buffer_from_host(void* dst, const void* src, std::size_t bytes,
                                  std::string_view where) {
  cuda_buffer_memcpy(dst, src, bytes, cudaMemcpyHostToDevice, where, "host to device");
}

}  // namespace detail

/// Runs kernels on `stream` (0: the legacy default stream) through Thrust's
/// CUDA system with thrust::cuda::par_nosync.on(stream): for_each_index only
/// queues its kernel and returns, like a <<<>>> launch, so order later work
/// through the stream; transform_reduce, reduce_per_layer and select_if return
/// host values and wait for the stream before returning. Spans point to device
/// memory (reduce_per_layer's out excepted: it is host memory). Copies share
/// one workspace of device memory (see detail::thrust_workspace), so after the
/// first calls of a given size no primitive allocates. CUDA errors are thrown
/// as gcomp::error with cudaGetErrorString's text. State that parts keep
/// across steps lives in policy_buffers of cuda_device_memory_kind (below).
struct cuda_par {
  cudaStream_t stream = 0;
  std::shared_ptr<detail::thrust_workspace> workspace = std::make_shared<detail::thrust_workspace>(
      &detail::cuda_workspace_allocate, &detail::cuda_workspace_free);
};

template <>
struct policy_traits<cuda_par> {
  static constexpr bool is_policy = true;
  static constexpr bool host_memory = false;
};

/// cuda_par's memory for policy_buffer: CUDA device memory of the device
/// current at allocation (cudaMalloc; see detail::cuda_buffer_allocate).
inline constexpr memory_kind cuda_device_memory_kind{
    "CUDA device memory",          false,
    &detail::cuda_buffer_allocate, &detail::cuda_buffer_free,
    &detail::cuda_buffer_copy,     &detail::cuda_buffer_to_host,
    &detail::cuda_buffer_from_host};

inline const memory_kind& memory_kind_of(const cuda_par&) { return cuda_device_memory_kind; }

namespace detail {

/// What cuda_par supplies to the shared implementation of thrust.hpp.
struct cuda_par_backend {
  const cuda_par& policy;

  thrust_workspace& workspace() const { return checked_workspace(policy.workspace, "gcomp::cuda_par"); }
  auto exec(thrust_temporary_allocator& alloc) const {
    return thrust::cuda::par_nosync(alloc).on(policy.stream);
  }
  void to_device(std::string_view where, void* dst, const void* src, std::size_t bytes) const {
    // From pageable memory the copy has taken the bytes when it returns, so
    // the host buffer may be reused at once.
    cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, policy.stream), where,
               "cudaMemcpyAsync to the device");
  }
  void to_host(std::string_view where, void* dst, const void* src, std::size_t bytes) const {
    cuda_check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, policy.stream), where,
               "cudaMemcpyAsync to the host");
    wait(where);
  }
  void wait(std::string_view where) const {
    cuda_check(cudaStreamSynchronize(policy.stream), where, "cudaStreamSynchronize");
  }
  [[noreturn]] static void fail(std::string_view where, const thrust::system_error& e) {
    if (e.code().category() == thrust::cuda_category()) {
      const auto status = static_cast<cudaError_t>(e.code().value());
      cudaGetLastError();
      gcomp::fail(where, "CUDA error in Thrust: ", cudaGetErrorName(status), ": ",
                  cudaGetErrorString(status));
    }
    gcomp::fail(where, "Thrust error: ", e.what());
  }
};

}  // namespace detail

/// Queues f(i) for every i in [0, n) on the stream and returns without
/// waiting. f must be device-callable: [=] GCOMP_HD (std::size_t i) {...}.
template <class F>
void for_each_index(const cuda_par& policy, std::size_t n, F&& f) {
  detail::thrust_for_each_index(detail::cuda_par_backend{policy}, n, std::forward<F>(f));
}

/// As transform_reduce for host_seq, bitwise, provided neither side contracts
/// a multiply and an add into an FMA (nvcc does by default: --fmad=false, or
/// __fmul_rn in the transform, keeps products rounded). Waits for the stream.
template <class R, class Reduce, class Transform>
R transform_reduce(const cuda_par& policy, std::size_t n, R identity, Reduce reduce,
                   Transform transform) {
  return detail::thrust_transform_reduce(detail::cuda_par_backend{policy}, n, identity, reduce,
                                         transform);
}

/// As reduce_per_layer for host_seq; `out` is host memory. Waits for the stream.
template <class R, class Reduce, class Transform>
void reduce_per_layer(const cuda_par& policy, const layout& lay, std::span<R> out, R identity,
                      Reduce reduce, Transform transform) {
  detail::thrust_reduce_per_layer(detail::cuda_par_backend{policy}, lay, out, identity, reduce,
                                  transform);
}

/// As select_if for host_seq; `out` is device memory. Waits for the stream.
template <class Index, class Pred>
std::size_t select_if(const cuda_par& policy, std::size_t n, Pred pred, std::span<Index> out) {
  return detail::thrust_select_if(detail::cuda_par_backend{policy}, n, pred, out);
}

}  // namespace gcomp
