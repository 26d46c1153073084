// Sparse payloads under a device policy (cuda_par, thrust_device): gathers at host-chosen indices, the checked scatter-add, and the hook through which a CUDA build supplies the top-k selection; the payload stays a host sparse_payload.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <type_traits>

#include "gcomp/core/config.hpp"
#include "gcomp/core/sparse_payload.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/detail/unfused.hpp"

// As for the quantizers (compress/detail/quant_device.hpp), a sparse
// compressor under a device policy takes the gradient and the output in the
// policy's memory and keeps its message a host sparse_payload: the k indices
// and values cross once per step. The code here uses only the policy's
// generic primitives (for_each_index, copy_to_host, copy_from_host, found by
// argument-dependent lookup), so it runs, and is tested in CI, on Thrust's
// OpenMP system too. The top-k selection itself is CUDA code
// (compress/detail/topk_cuda.cuh); a header that must compile without CUDA
// reaches it through device_topk below, which that file specializes.

namespace gcomp::detail {

/// Device scratch of one sparse compressor object, sized at its first device
/// step in the policy's memory and reused: the k indices and values of a
/// message on their way to or from the host.
template <class T, class Index>
struct sparse_device_buffers {
  policy_buffer<Index> indices;
  policy_buffer<T> values;
};

/// out[idx[j]] += scale * v[j] with the product rounded before the sum on
/// both sides (nvcc would otherwise fuse them), so device and host agree bit
/// for bit.
template <class T, class Index>
struct scatter_add_entry {
  T* out;
  const Index* idx;
  const T* v;
  T scale;
  GCOMP_HD void operator()(std::size_t j) const {
    T& o = out[static_cast<std::size_t>(idx[j])];
    o = add_unfused(o, mul_unfused(scale, v[j]));
  }
};

/// out (memory of `policy`) += scale * message, for a message the caller has
/// validated on the host (check_sparse_addend: distinct indices below
/// out.size(), so the scattered adds never collide). Indices and values are
/// uploaded into buf, then one thread per entry adds.
template <class Policy, class T, class Index>
void sparse_device_scatter_add(const Policy& policy, const sparse_payload<T, Index>& message,
                               std::span<T> out, T scale, sparse_device_buffers<T, Index>& buf,
                               std::string_view where) {
  const std::size_t k = message.indices.size();
  if (k == 0) return;
  buf.indices.resize(policy, k, where);
  buf.values.resize(policy, k, where);
  copy_from_host(policy, std::span<const Index>(message.indices), buf.indices.span());
  copy_from_host(policy, std::span<const T>(message.data), buf.values.span());
  for_each_index(policy, k, scatter_add_entry<T, Index>{out.data(), buf.indices.data(), buf.values.data(), scale});
}

/// v[j] = g[idx[j]], or g[idx[j]] * s with a scale.
template <class T, class Index, bool Scaled>
struct gather_entry {
  const T* g;
  const Index* idx;
  T* v;
  T s;
  GCOMP_HD void operator()(std::size_t j) const {
    const T x = g[static_cast<std::size_t>(idx[j])];
    if constexpr (Scaled)
      v[j] = mul_unfused(x, s);
    else
      v[j] = x;
  }
};

/// idx[j] += shift: a layer's selected positions made global.
template <class Index>
struct shift_entry {
  Index* idx;
  Index shift;
  GCOMP_HD void operator()(std::size_t j) const { idx[j] += shift; }
};

/// Scratch whose type a header cannot name, such as the CUDA top-k workspace
/// in topk.hpp, which compiles without CUDA: created on first use by the code
/// that knows the type, owned here, and dropped rather than copied when its
/// owner is copied (a copy builds its own on first use; two objects never
/// share one).
class opaque_scratch {
 public:
  opaque_scratch() = default;
  opaque_scratch(const opaque_scratch&) noexcept {}
  opaque_scratch& operator=(const opaque_scratch& other) noexcept {
    if (this != &other) reset();
    return *this;
  }
  opaque_scratch(opaque_scratch&&) noexcept = default;
  opaque_scratch& operator=(opaque_scratch&&) noexcept = default;

  /// The scratch as an S, default-constructed on the first call (or when it
  /// held another type).
  template <class S>
  S& get() {
    if (!held_ || type_ != &type_tag<S>) {
      held_.reset();
      held_ = holder(new S(), &destroy<S>);
      type_ = &type_tag<S>;
    }
    return *static_cast<S*>(held_.get());
  }
  void reset() noexcept {
    held_.reset();
    type_ = nullptr;
  }

 private:
  using deleter = void (*)(void*);
  using holder = std::unique_ptr<void, deleter>;
  template <class S>
  static void destroy(void* p) {
    delete static_cast<S*>(p);
  }
  template <class S>
  static constexpr char type_tag = 0;  // its address names the type

  holder held_{nullptr, &destroy<char>};
  const void* type_ = nullptr;
};

/// Whether Policy has a top-k selection on device memory, and the selection:
///
///   static void select(const Policy&, std::span<const T> g, std::size_t k,
///                      std::size_t offset, opaque_scratch& scratch,
///                      T* values, Index* indices, std::string_view where);
///
/// writes the k elements of g with the largest |g| (ties to the lower index)
/// to values[0, k) and offset + i to indices[0, k), increasing, both device
/// memory of the policy, and returns when they are there; a non-finite
/// element throws gcomp::error naming gradient[offset + i] as the host
/// top-k does, with the outputs unchanged. compress/detail/topk_cuda.cuh
/// specializes it for cuda_par; topk.hpp includes that file when nvcc
/// compiles it.
template <class Policy>
struct device_topk : std::false_type {};

}  // namespace gcomp::detail
