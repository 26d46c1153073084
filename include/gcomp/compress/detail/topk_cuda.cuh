// Exact top-k of |g| on a CUDA stream: a multi-pass radix select over magnitude keys and a stable two-pass collection, the same result as the host gcomp::topk (ties to the lower index, indices increasing).
//
// No full sort (and no cub::DeviceTopK: CUDA 13.0 ships CCCL 3.0.1, which
// lacks it). With 11-bit digits (detail/radix_select.hpp) a float key takes
// 3 levels (11, 11, 9 bits), a double 6:
//   level 0: one read pass of g; every block counts digit 0 in a shared
//            histogram and adds it to a global one; non-finite keys (key >=
//            infinity's) record the lowest offending index (atomicMin).
//   choose:  one block scans the histogram from the top (each thread owns a
//            few bins, a block scan gives the count above them) and appends
//            the digit holding the k-th key to the prefix, on the device: no
//            host round trip between passes.
//   level 1: a read pass counting digit 1 of the keys in the chosen bin; the
//            indices of those keys are appended (warp-aggregated atomics,
//            unordered) to a candidate list of n/16 + 1024 entries.
//   level 2+: only the candidate list is read, unless it overflowed (ties,
//            all-equal data), in which case the kernel reads g in full; the
//            kernel decides from the device-side count, so the host never waits.
// After the last level the prefix is the k-th key T, and the rank left is r,
// the number of keys equal to T to take. Collection (stable, index order):
//   count:   one block per tile of 4096 elements counts keys > T and == T,
//            packed in one 64-bit word (radix::pack_counts);
//   scan:    cub::DeviceScan::ExclusiveSum over the packed tile counts;
//   write:   each tile re-reads its elements, block-scans the flags in index
//            order and writes the k - r keys above T and the first r equal to
//            T at slot = above before + min(equal before, r) (radix::emit_slot).
// So a float selection reads g four times in full (levels 0 and 1, count,
// write) plus the small candidate list; host synchronization happens once, at
// the end, to bring back the non-finite flag (see cuda_topk_finish).
//
// Non-finite input: the write kernel writes nothing when the flag is set, so
// the outputs keep their contents, and cuda_topk_finish throws gcomp::error
// naming the first such index and its value, as the host does.
#pragma once

#include <cuda_runtime_api.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <string_view>

#include "gcomp/compress/detail/radix_select.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/exec/cuda.cuh"

namespace gcomp::detail {

namespace topk_cuda {

inline constexpr unsigned block_threads = 256;
inline constexpr unsigned tile_items = 16;  // per thread in the collection passes
inline constexpr unsigned tile = block_threads * tile_items;
inline constexpr unsigned long long no_index = ~0ull;

/// What the passes hand each other on the device (one per workspace).
template <class Key>
struct state {
  Key prefix;                   // digits chosen so far; after the last level the k-th key T
  unsigned long long rank;      // rank of the k-th key inside the prefix's range; at the end r
  unsigned long long first_bad; // lowest index of a non-finite element, or no_index
  double bad_value;             // its value, for the message
  unsigned int candidates;      // keys appended to the candidate list (may exceed its room)
};

template <class T>
using key_of = typename radix::key_traits<T>::key_type;

template <class T>
__global__ void init_kernel(state<key_of<T>>* st, unsigned int* hist, unsigned long long k) {
  for (unsigned b = threadIdx.x; b < radix::max_bins; b += blockDim.x) hist[b] = 0;
  if (threadIdx.x == 0) {
    st->prefix = 0;
    st->rank = k;
    st->first_bad = no_index;
    st->bad_value = 0.0;
    st->candidates = 0;
  }
}

// One level's histogram (see the header comment). The loop bound is
// block-uniform, so every warp reaches the ballot of the candidate append
// with all its lanes.
template <class T>
__global__ void __launch_bounds__(block_threads)
    histogram_kernel(const T* __restrict__ g, unsigned int n, state<key_of<T>>* st,
                     unsigned int* hist, unsigned int* candidates, unsigned int room, unsigned level,
                     bool collect) {
  using traits = radix::key_traits<T>;
  using key_type = key_of<T>;
  constexpr unsigned kb = traits::key_bits;
  __shared__ unsigned int counts[radix::max_bins];
  const unsigned bins = 1u << radix::width(kb, level);
  for (unsigned b = threadIdx.x; b < bins; b += blockDim.x) counts[b] = 0;
  __syncthreads();
  const key_type prefix = level == 0 ? key_type(0) : st->prefix;
  bool list = false;
  unsigned long long m = n;
  if (level >= 2) {
    const unsigned int c = st->candidates;
    if (c <= room) {
      list = true;
      m = c;
    }
  }
  unsigned long long bad = no_index;
  const unsigned long long stride = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
  for (unsigned long long base = static_cast<unsigned long long>(blockIdx.x) * blockDim.x; base < m;
       base += stride) {
    const unsigned long long j = base + threadIdx.x;
    bool hit = false;
    unsigned int i = 0;
    if (j < m) {
      i = list ? candidates[j] : static_cast<unsigned int>(j);
      const key_type key = traits::key(g[i]);
      if (level == 0 && !traits::finite_key(key)) bad = bad < i ? bad : i;
      hit = radix::in_range(key, kb, level, prefix);
      if (hit) atomicAdd(&counts[radix::digit(key, kb, level)], 1u);
    }
    if (collect) {
      // One atomic per warp, not per hit: the leader reserves the warp's slots.
      const unsigned ballot = __ballot_sync(0xffffffffu, hit);
      if (ballot != 0) {
        const unsigned lane = threadIdx.x & 31u;
        const int leader = __ffs(static_cast<int>(ballot)) - 1;
        unsigned int at = 0;
        if (static_cast<int>(lane) == leader) at = atomicAdd(&st->candidates, __popc(ballot));
        at = __shfl_sync(0xffffffffu, at, leader);
        const unsigned int pos = at + static_cast<unsigned>(__popc(ballot & ((1u << lane) - 1u)));
        if (hit && pos < room) candidates[pos] = i;
      }
    }
  }
  if (level == 0 && bad != no_index) atomicMin(&st->first_bad, bad);
  __syncthreads();
  for (unsigned b = threadIdx.x; b < bins; b += blockDim.x)
    if (counts[b] != 0) atomicAdd(&hist[b], counts[b]);
}

// Appends the digit holding the k-th key to the prefix and clears the
// global histogram for the next level. Each thread owns `per` bins counted
// from the top; the block scan gives the count above its share, and the one
// thread whose share holds the rank chooses (radix::choose_digit).
template <class T>
__global__ void __launch_bounds__(block_threads)
    choose_kernel(const T* __restrict__ g, state<key_of<T>>* st, unsigned int* hist, unsigned level) {
  using traits = radix::key_traits<T>;
  constexpr unsigned kb = traits::key_bits;
  using scan = cub::BlockScan<unsigned long long, block_threads>;
  __shared__ typename scan::TempStorage temp;
  __shared__ unsigned int counts[radix::max_bins];
  const unsigned bins = 1u << radix::width(kb, level);
  for (unsigned b = threadIdx.x; b < bins; b += blockDim.x) {
    counts[b] = hist[b];
    hist[b] = 0;
  }
  const unsigned long long rank = st->rank;
  const key_of<T> prefix = st->prefix;
  __syncthreads();
  const unsigned per = (bins + block_threads - 1) / block_threads;
  const unsigned hi = bins > threadIdx.x * per ? bins - threadIdx.x * per : 0u;
  const unsigned lo = hi > per ? hi - per : 0u;
  unsigned long long sum = 0;
  for (unsigned b = lo; b < hi; ++b) sum += counts[b];
  unsigned long long above = 0;
  scan(temp).ExclusiveSum(sum, above);
  if (above < rank && rank <= above + sum) {
    unsigned d = 0;
    unsigned long long in = 0;
    radix::choose_digit(counts, lo, hi, rank - above, d, in);
    st->prefix = radix::extend(prefix, kb, level, d);
    st->rank = in;
  }
  if (level == 0 && threadIdx.x == 0 && st->first_bad != no_index)
    st->bad_value = static_cast<double>(g[st->first_bad]);
}

// Per tile: keys above T and equal to T, packed.
template <class T>
__global__ void __launch_bounds__(block_threads)
    count_kernel(const T* __restrict__ g, unsigned int n, const state<key_of<T>>* st,
                 unsigned long long* packed) {
  using traits = radix::key_traits<T>;
  using reduce = cub::BlockReduce<unsigned long long, block_threads>;
  __shared__ typename reduce::TempStorage temp;
  const key_of<T> threshold = st->prefix;
  const unsigned long long start = static_cast<unsigned long long>(blockIdx.x) * tile;
  std::uint32_t above = 0, equal = 0;
  for (unsigned r = 0; r < tile_items; ++r) {
    const unsigned long long i = start + r * block_threads + threadIdx.x;
    if (i < n) {
      const key_of<T> key = traits::key(g[i]);
      above += key > threshold ? 1u : 0u;
      equal += key == threshold ? 1u : 0u;
    }
  }
  const unsigned long long total = reduce(temp).Sum(radix::pack_counts(above, equal));
  if (threadIdx.x == 0) packed[blockIdx.x] = total;
}

// Per tile, in index order: the elements above T and the first r equal to
// T go to their slots; nothing is written when the input had a non-finite value.
template <class T, class Index>
__global__ void __launch_bounds__(block_threads)
    write_kernel(const T* __restrict__ g, unsigned int n, const state<key_of<T>>* st,
                 const unsigned long long* __restrict__ tile_before, T* values, Index* indices) {
  using traits = radix::key_traits<T>;
  using scan = cub::BlockScan<unsigned long long, block_threads>;
  __shared__ typename scan::TempStorage temp;
  if (st->first_bad != no_index) return;
  const key_of<T> threshold = st->prefix;
  const unsigned long long ties = st->rank;
  unsigned long long running = tile_before[blockIdx.x];
  const unsigned long long start = static_cast<unsigned long long>(blockIdx.x) * tile;
  for (unsigned r = 0; r < tile_items; ++r) {
    const unsigned long long i = start + r * block_threads + threadIdx.x;
    key_of<T> key = 0;
    T value = T(0);
    unsigned long long flags = 0;
    if (i < n) {
      value = g[i];
      key = traits::key(value);
      flags = radix::pack_counts(key > threshold ? 1u : 0u, key == threshold ? 1u : 0u);
    }
    unsigned long long before = 0, aggregate = 0;
    scan(temp).ExclusiveSum(flags, before, aggregate);
    // Packed sums carry nothing from the low half: each half stays below 2^32.
    const unsigned long long at = running + before;
    unsigned long long slot = 0;
    if (i < n && radix::emit_slot<key_of<T>, unsigned long long>(key, threshold, ties,
                                                                 radix::packed_above(at),
                                                                 radix::packed_equal(at), slot)) {
      values[slot] = value;
      indices[slot] = static_cast<Index>(i);
    }
    running += aggregate;
    __syncthreads();  // the scan's temporary storage is reused next round
  }
}

}  // namespace topk_cuda

/// Device memory of the GPU top-k, sized on first use for a gradient size
/// and reused for every size up to it: a call after the first of a given
/// size allocates nothing. One selection may be in flight per workspace
/// (cuda_topk_async ... cuda_topk_finish). Freeing waits for the device
/// (cudaFree), so it never pulls memory from under a running kernel.
template <class T>
class cuda_topk_workspace {
 public:
  using state_type = topk_cuda::state<topk_cuda::key_of<T>>;

  /// Makes room for an n-element gradient (cudaMalloc, cudaMallocHost) if
  /// the memory held is smaller; otherwise does nothing.
  void reserve(std::size_t n, std::string_view where) {
    if (device_ && n <= capacity_) return;
    const std::size_t tiles = std::max<std::size_t>(1, (n + topk_cuda::tile - 1) / topk_cuda::tile);
    const std::size_t room = n / 16 + 1024;
    std::size_t scan_bytes = 0;
    cuda_check(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes,
                                             static_cast<const unsigned long long*>(nullptr),
                                             static_cast<unsigned long long*>(nullptr),
                                             static_cast<int>(tiles)),
               where, "sizing cub::DeviceScan::ExclusiveSum");
    // One cudaMalloc carved into 256-byte aligned pieces.
    std::size_t at = 0;
    auto place = [&at](std::size_t bytes) {
      const std::size_t offset = at;
      at += (bytes + 255) / 256 * 256;
      return offset;
    };
    const std::size_t state_at = place(sizeof(state_type));
    const std::size_t hist_at = place(radix::max_bins * sizeof(unsigned int));
    const std::size_t cand_at = place(room * sizeof(unsigned int));
    const std::size_t counts_at = place(tiles * sizeof(unsigned long long));
    const std::size_t before_at = place(tiles * sizeof(unsigned long long));
    const std::size_t scan_at = place(scan_bytes);
    device_.reset();  // free before allocating the larger block
    device_.reset(cuda_workspace_allocate(at, where));
    if (!host_) {
      void* pinned = nullptr;
      cuda_check(cudaMallocHost(&pinned, sizeof(state_type)), where, "cudaMallocHost of the status");
      host_.reset(pinned);
    }
    int device = 0;
    cuda_check(cudaGetDevice(&device), where, "cudaGetDevice");
    cuda_check(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, device), where,
               "cudaDeviceGetAttribute(multiProcessorCount)");
    auto* base = static_cast<unsigned char*>(device_.get());
    state_ = reinterpret_cast<state_type*>(base + state_at);
    hist_ = reinterpret_cast<unsigned int*>(base + hist_at);
    candidates_ = reinterpret_cast<unsigned int*>(base + cand_at);
    counts_ = reinterpret_cast<unsigned long long*>(base + counts_at);
    before_ = reinterpret_cast<unsigned long long*>(base + before_at);
    scan_temp_ = base + scan_at;
    scan_bytes_ = scan_bytes;
    room_ = static_cast<unsigned int>(room);
    capacity_ = n;
  }

  std::size_t capacity() const { return capacity_; }

 private:
  struct device_free {
    void operator()(void* p) const noexcept { cuda_workspace_free(p); }
  };
  struct host_free {
    void operator()(void* p) const noexcept { cudaFreeHost(p); }
  };

  template <class U, class Index>
  friend void cuda_topk_async(cudaStream_t, std::span<const U>, std::size_t, cuda_topk_workspace<U>&,
                              U*, Index*);
  template <class U>
  friend void cuda_topk_finish(cudaStream_t, cuda_topk_workspace<U>&);

  std::unique_ptr<void, device_free> device_;
  std::unique_ptr<void, host_free> host_;  // pinned: the status copy is a true async copy
  std::size_t capacity_ = 0;
  int sms_ = 1;
  state_type* state_ = nullptr;
  unsigned int* hist_ = nullptr;
  unsigned int* candidates_ = nullptr;
  unsigned int room_ = 0;
  unsigned long long* counts_ = nullptr;
  unsigned long long* before_ = nullptr;
  void* scan_temp_ = nullptr;
  std::size_t scan_bytes_ = 0;
  std::size_t pending_n_ = 0;  // the gradient size of the selection in flight (0: none)
};

/// Queues the exact top-k of |g| on `stream` and returns without waiting:
/// `values_out[0..k)` and `indices_out[0..k)` (device memory) receive the k
/// elements of largest magnitude (ties to the lower index) with their signed
/// values, indices strictly increasing: the host gcomp::topk's selection.
/// `g` is device memory of at most 2^32 - 1 elements. Arguments are checked
/// here (k = 0, k > n, n too large, null outputs: gcomp::error); non-finite
/// values are only reported by cuda_topk_finish, which must be called before
/// the workspace is used again. The first call for a size allocates the
/// workspace (cudaMalloc: not stream-ordered); later calls allocate nothing.
template <class T, class Index>
void cuda_topk_async(cudaStream_t stream, std::span<const T> g, std::size_t k,
                     cuda_topk_workspace<T>& ws, T* values_out, Index* indices_out) {
  static_assert(std::is_same_v<Index, std::uint32_t> || std::is_same_v<Index, std::uint64_t>,
                "gcomp::detail::cuda_topk: indices are std::uint32_t or std::uint64_t");
  constexpr std::string_view where = "gcomp::detail::cuda_topk";
  using namespace topk_cuda;
  const std::size_t n = g.size();
  require(k >= 1, where, "k must be at least 1, got k = ", k);
  require(k <= n, where, "k = ", k, " exceeds the gradient size ", n);
  require(n <= std::numeric_limits<std::uint32_t>::max(), where, "gradient size ", n,
          " exceeds the 2^32 - 1 elements one selection handles");
  require(g.data() != nullptr, where, "gradient is a null pointer with size ", n);
  require(values_out != nullptr && indices_out != nullptr, where,
          "values_out and indices_out must be device pointers to k = ", k, " entries");
  require(ws.pending_n_ == 0, where,
          "the workspace has a selection in flight; call cuda_topk_finish first");
  ws.reserve(n, where);
  const auto n32 = static_cast<unsigned int>(n);
  const T* p = g.data();
  constexpr unsigned kb = radix::key_traits<T>::key_bits;
  constexpr unsigned levels = radix::levels(kb);
  // Enough blocks to fill every SM several times over; each strides over the data.
  const std::size_t wanted = (n + block_threads - 1) / block_threads;
  const unsigned grid = static_cast<unsigned>(std::min<std::size_t>(wanted, std::size_t(ws.sms_) * 8));
  const unsigned tiles = static_cast<unsigned>((n + tile - 1) / tile);

  init_kernel<T><<<1, block_threads, 0, stream>>>(ws.state_, ws.hist_, k);
  for (unsigned level = 0; level < levels; ++level) {
    histogram_kernel<T><<<grid, block_threads, 0, stream>>>(p, n32, ws.state_, ws.hist_, ws.candidates_,
                                                            ws.room_, level, level == 1);
    choose_kernel<T><<<1, block_threads, 0, stream>>>(p, ws.state_, ws.hist_, level);
  }
  count_kernel<T><<<tiles, block_threads, 0, stream>>>(p, n32, ws.state_, ws.counts_);
  std::size_t scan_bytes = ws.scan_bytes_;
  cuda_check(cub::DeviceScan::ExclusiveSum(ws.scan_temp_, scan_bytes, ws.counts_, ws.before_,
                                           static_cast<int>(tiles), stream),
             where, "cub::DeviceScan::ExclusiveSum");
  write_kernel<T, Index><<<tiles, block_threads, 0, stream>>>(p, n32, ws.state_, ws.before_, values_out,
                                                              indices_out);
  // Launch errors (bad configuration, no device) show here without a sync.
  cuda_check(cudaGetLastError(), where, "launching the top-k kernels");
  ws.pending_n_ = n;
}

/// Waits for the selection queued by cuda_topk_async (the one host sync of a
/// top-k: the non-finite flag must come back to be thrown) and throws
/// gcomp::error naming the first non-finite index and its value, as the host
/// top-k does; the outputs were then left unchanged.
template <class T>
void cuda_topk_finish(cudaStream_t stream, cuda_topk_workspace<T>& ws) {
  constexpr std::string_view where = "gcomp::detail::cuda_topk";
  if (ws.pending_n_ == 0) return;
  ws.pending_n_ = 0;
  using state_type = typename cuda_topk_workspace<T>::state_type;
  auto* status = static_cast<state_type*>(ws.host_.get());
  cuda_check(cudaMemcpyAsync(status, ws.state_, sizeof(state_type), cudaMemcpyDeviceToHost, stream),
             where, "cudaMemcpyAsync of the status");
  cuda_check(cudaStreamSynchronize(stream), where, "cudaStreamSynchronize");
  if (status->first_bad != topk_cuda::no_index)
    fail(where, "gradient[", status->first_bad, "] = ", static_cast<T>(status->bad_value),
         " is not finite; top-k and threshold selection need finite values");
}

/// cuda_topk_async then cuda_topk_finish: the selection is in the outputs
/// (or gcomp::error was thrown) when it returns.
template <class T, class Index>
void cuda_topk(cudaStream_t stream, std::span<const T> g, std::size_t k, cuda_topk_workspace<T>& ws,
               T* values_out, Index* indices_out) {
  cuda_topk_async(stream, g, k, ws, values_out, indices_out);
  cuda_topk_finish(stream, ws);
}

}  // namespace gcomp::detail
