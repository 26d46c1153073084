// The checked scatter-add of a sparse payload into a dense output, shared by every compressor with a sparse payload.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "gcomp/compress/detail/sparse_device.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/sparse_payload.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp::detail {

/// Throws unless `message` can be added into an n-element output: dimension
/// n, as many values as indices, indices strictly increasing and below n. A
/// payload can be built by hand, and distinct indices are what make the
/// parallel scatter-add free of races.
template <class T, class Index>
void check_sparse_addend(std::string_view where, const sparse_payload<T, Index>& message,
                         std::size_t n) {
  if (message.dimension != n)
    fail(where, "message dimension is ", message.dimension, " but out has size ", n);
  check_same_size(where, "message.indices", message.indices.size(), "message.data",
                  message.data.size());
  const std::size_t k = message.indices.size();
  if (k == 0) return;
  const Index* idx = message.indices.data();
  // Branch-free first (it vectorizes); the position is looked up only on failure.
  unsigned bad = 0;
  for (std::size_t j = 1; j < k; ++j) bad |= idx[j] <= idx[j - 1] ? 1u : 0u;
  if (bad != 0)
    for (std::size_t j = 1; j < k; ++j)
      if (idx[j] <= idx[j - 1])
        fail(where, "message indices must be strictly increasing, but index ", idx[j],
             " at position ", j, " follows ", idx[j - 1]);
  if (static_cast<std::uint64_t>(idx[k - 1]) >= n)
    fail(where, "message index ", idx[k - 1], " at position ", k - 1,
         " is out of range for size ", n);
}

/// out[indices[j]] += scale * data[j] for every j of a message the caller
/// has checked (check_sparse_addend: distinct indices, so the adds never
/// collide). Host policies add in place; a device policy (cuda_par,
/// thrust_device) uploads the message into `device` and adds there (out is
/// then the policy's memory).
template <class Policy, class T, class Index>
void sparse_scatter_add(const Policy& policy, const sparse_payload<T, Index>& message, std::span<T> out,
                        T scale, sparse_device_buffers<T, Index>& device, std::string_view where) {
  if constexpr (host_policy<Policy>) {
    for_each_index(policy, message.indices.size(),
                   scatter_add_entry<T, Index>{out.data(), message.indices.data(), message.data.data(), scale});
  } else {
    sparse_device_scatter_add(policy, message, out, scale, device, where);
  }
}

/// check_sparse_addend, then sparse_scatter_add.
template <class Policy, class T, class Index>
void checked_scatter_add(const Policy& policy, std::string_view where,
                         const sparse_payload<T, Index>& message, std::span<T> out, T scale,
                         sparse_device_buffers<T, Index>& device) {
  check_sparse_addend(where, message, out.size());
  sparse_scatter_add(policy, message, out, scale, device, where);
}

/// Sets message to dimension n and k entries written by write(indices,
/// values), which must validate its input before writing anything. If it
/// throws, the message is left as it was: its entries are untouched and only
/// a growth of the vectors is undone.
template <class T, class Index, class Write>
void write_sparse_in_place(sparse_payload<T, Index>& message, std::size_t n, std::size_t k,
                           Write&& write) {
  const std::size_t old_indices = message.indices.size();
  const std::size_t old_data = message.data.size();
  if (old_indices < k) message.indices.resize(k);
  if (old_data < k) message.data.resize(k);
  try {
    write(message.indices.data(), message.data.data());
  } catch (...) {
    message.indices.resize(old_indices);
    message.data.resize(old_data);
    throw;
  }
  message.indices.resize(k);
  message.data.resize(k);
  message.dimension = n;
}

/// write_sparse_in_place of `count` indices and values held in the memory of
/// a device policy: both copied to the host message.
template <class Policy, class T, class Index>
void copy_sparse_to_message(const Policy& policy, sparse_payload<T, Index>& message, std::size_t n,
                            std::size_t count, const Index* indices, const T* values) {
  write_sparse_in_place(message, n, count, [&](Index* to_indices, T* to_values) {
    if (count == 0) return;
    copy_to_host(policy, std::span<const Index>(indices, count), std::span<Index>(to_indices, count));
    copy_to_host(policy, std::span<const T>(values, count), std::span<T>(to_values, count));
  });
}

}  // namespace gcomp::detail
