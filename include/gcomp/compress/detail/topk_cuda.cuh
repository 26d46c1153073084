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
//            host round trip between passes. At level 0 it also counts the
//            candidates, the keys whose digit 0 is the chosen d0 or above
//            (the k - rank keys above d0's bin plus the bin), and picks the
//            path: the candidate list if they fit its room
//            (radix::candidate_room(n) = n/8 + 1024 entries), else the
//            fallback. The decision stays on the device.
//   level 1: a read pass counting digit 1 of the keys in d0's bin; on the
//            list path it also appends every candidate (index and value,
//            warp-aggregated atomics, any order). The count is known, so the
//            list never overflows.
//   level 2+: list path: only the list's values are read. Fallback (heavy
//            ties or a crowded top bin): g is read in full.
// After the last level the prefix is the k-th key T, and the rank left is r,
// the number of keys equal to T to take. Collection (stable, index order),
// through two bitmaps of n bits (keys > T, keys == T; zero between calls):
//   mark:    list path: each listed key > T or == T sets its bit (atomicOr);
//            fallback: one read pass of g, a warp ballot per bitmap word;
//   count:   one block per tile of 4096 words (131072 elements) pops the
//            counts of both bitmaps, packed in one 64-bit word
//            (radix::pack_counts);
//   scan:    cub::DeviceScan::ExclusiveSum over the packed tile counts;
//   write:   each thread takes 16 words, block-scans its counts, walks its
//            set bits in index order and writes the k - r keys above T and
//            the first r equal to T at slot = above before + min(equal
//            before, r) (radix::emit_flagged), gathering the values from g;
//            it zeroes the words it read.
// So a float selection reads g twice in full on the list path (levels 0 and
// 1), plus the list (a few k entries on bell-shaped data), the two bitmaps
// twice (n/16 bytes each time: 1/16 of a float read) and k gathers: about
// 2.15 read passes. The fallback reads g 4 times (levels 0, 1, 2 and mark;
// a double 7). Host synchronization happens once, at the end, to bring back
// the non-finite flag (see cuda_topk_finish).
//
// Non-finite input: mark and write do nothing when the flag is set, so the
// outputs keep their contents (and the bitmaps stay zero), and
// cuda_topk_finish throws gcomp::error naming the first such index and its
// value, as the host does.
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
#include "gcomp/compress/detail/select.hpp"
#include "gcomp/compress/detail/sparse_device.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/exec/cuda.cuh"

namespace gcomp::detail {

namespace topk_cuda {

inline constexpr unsigned block_threads = 256;
inline constexpr unsigned thread_words = 16;  // bitmap words per thread in the collection passes
inline constexpr unsigned tile_words = block_threads * thread_words;  // 4096 words = 131072 elements
inline constexpr unsigned long long no_index = ~0ull;

/// What the passes hand each other on the device (one per workspace).
template <class Key>
struct state {
  Key prefix;                   // digits chosen so far; after the last level the k-th key T
  unsigned long long rank;      // rank of the k-th key inside the prefix's range; at the end r
  unsigned long long first_bad; // lowest index of a non-finite element, or no_index
  double bad_value;             // its value, for the message
  unsigned long long candidates;  // keys at or above level 0's bin (from its histogram)
  unsigned int appended;        // entries the level-1 pass appended to the list
  unsigned int use_list;        // 1: the candidates fit the list; 0: the fallback (full reads)
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
    st->appended = 0;
    st->use_list = 0;
  }
}

// One level's histogram (see the header comment). Level 0 and 1 read g; on
// the list path level 1 also appends every key at or above level 0's digit
// (index and value) and later levels read only the list's values. The loop
// bound is block-uniform, so every warp reaches the ballot with all its lanes.
template <class T>
__global__ void __launch_bounds__(block_threads)
    histogram_kernel(const T* __restrict__ g, unsigned int n, state<key_of<T>>* st,
                     unsigned int* hist, unsigned int* list_index, T* list_value, unsigned int room,
                     unsigned level) {
  using traits = radix::key_traits<T>;
  using key_type = key_of<T>;
  constexpr unsigned kb = traits::key_bits;
  __shared__ unsigned int counts[radix::max_bins];
  const unsigned bins = 1u << radix::width(kb, level);
  for (unsigned b = threadIdx.x; b < bins; b += blockDim.x) counts[b] = 0;
  __syncthreads();
  const key_type prefix = level == 0 ? key_type(0) : st->prefix;
  const bool use_list = level >= 1 && st->use_list != 0;
  const bool list = use_list && level >= 2;     // read the list instead of g
  const bool collect = use_list && level == 1;  // build the list
  const unsigned d0 = static_cast<unsigned>(prefix);  // at level 1 the prefix is digit 0
  const unsigned long long m = list ? (st->appended < room ? st->appended : room) : n;
  unsigned long long bad = no_index;
  const unsigned long long stride = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
  for (unsigned long long base = static_cast<unsigned long long>(blockIdx.x) * blockDim.x; base < m;
       base += stride) {
    const unsigned long long j = base + threadIdx.x;
    bool hit = false;
    T value = T(0);
    if (j < m) {
      value = list ? list_value[j] : g[j];
      const key_type key = traits::key(value);
      if (level == 0 && !traits::finite_key(key)) bad = bad < j ? bad : j;
      hit = collect && radix::at_or_above_digit0(key, kb, d0);
      if (radix::in_range(key, kb, level, prefix)) atomicAdd(&counts[radix::digit(key, kb, level)], 1u);
    }
    if (collect) {
      // One atomic per warp, not per hit: the leader reserves the warp's slots.
      const unsigned ballot = __ballot_sync(0xffffffffu, hit);
      if (ballot != 0) {
        const unsigned lane = threadIdx.x & 31u;
        const int leader = __ffs(static_cast<int>(ballot)) - 1;
        unsigned int at = 0;
        if (static_cast<int>(lane) == leader) at = atomicAdd(&st->appended, __popc(ballot));
        at = __shfl_sync(0xffffffffu, at, leader);
        const unsigned int pos = at + static_cast<unsigned>(__popc(ballot & ((1u << lane) - 1u)));
        // The level-0 histogram announced the count and it fits: the guard never fails.
        if (hit && pos < room) {
          list_index[pos] = static_cast<unsigned int>(j);
          list_value[pos] = value;
        }
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
// thread whose share holds the rank chooses (radix::choose_digit). At level
// 0 it also decides the path: the candidates (keys above the chosen bin, k -
// rank inside it, plus the bin) go to the list iff they fit its room.
template <class T>
__global__ void __launch_bounds__(block_threads)
    choose_kernel(const T* __restrict__ g, state<key_of<T>>* st, unsigned int* hist, unsigned level,
                  unsigned int room) {
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
    if (level == 0) {
      const unsigned long long candidates = rank - in + counts[d];
      st->candidates = candidates;
      st->use_list = candidates <= room ? 1u : 0u;
    }
  }
  if (level == 0 && threadIdx.x == 0 && st->first_bad != no_index)
    st->bad_value = static_cast<double>(g[st->first_bad]);
}

// Marks the keys above T and equal to T in two bitmaps (bit i of word i/32):
// from the list (atomicOr, any order) or, on the fallback, from all of g (a
// warp's ballot is one word: each warp covers 32 aligned indices). The
// bitmaps are zero on entry; nothing is marked when the input was not finite.
template <class T>
__global__ void __launch_bounds__(block_threads)
    mark_kernel(const T* __restrict__ g, unsigned int n, const state<key_of<T>>* st,
                const unsigned int* __restrict__ list_index, const T* __restrict__ list_value,
                unsigned int room, unsigned int* above_bits, unsigned int* equal_bits) {
  using traits = radix::key_traits<T>;
  if (st->first_bad != no_index) return;
  const key_of<T> threshold = st->prefix;
  const unsigned long long stride = static_cast<unsigned long long>(gridDim.x) * blockDim.x;
  if (st->use_list != 0) {
    const unsigned long long m = st->appended < room ? st->appended : room;
    for (unsigned long long j = static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x;
         j < m; j += stride) {
      const key_of<T> key = traits::key(list_value[j]);
      const unsigned int i = list_index[j];
      if (key > threshold) atomicOr(&above_bits[i >> 5], 1u << (i & 31u));
      else if (key == threshold) atomicOr(&equal_bits[i >> 5], 1u << (i & 31u));
    }
    return;
  }
  for (unsigned long long base = static_cast<unsigned long long>(blockIdx.x) * blockDim.x; base < n;
       base += stride) {
    const unsigned long long i = base + threadIdx.x;
    key_of<T> key = 0;
    if (i < n) key = traits::key(g[i]);
    const unsigned up = __ballot_sync(0xffffffffu, i < n && key > threshold);
    const unsigned eq = __ballot_sync(0xffffffffu, i < n && key == threshold);
    if ((threadIdx.x & 31u) == 0) {
      if (up != 0) above_bits[i >> 5] = up;
      if (eq != 0) equal_bits[i >> 5] = eq;
    }
  }
}

// Per tile of bitmap words: keys above T and equal to T, packed. Each thread
// counts its 16 consecutive words (the bitmaps are padded to whole tiles).
__global__ void __launch_bounds__(block_threads)
    count_kernel(const unsigned int* __restrict__ above_bits, const unsigned int* __restrict__ equal_bits,
                 unsigned long long* packed) {
  using reduce = cub::BlockReduce<unsigned long long, block_threads>;
  __shared__ typename reduce::TempStorage temp;
  const std::size_t first = static_cast<std::size_t>(blockIdx.x) * tile_words + threadIdx.x * thread_words;
  const auto* up4 = reinterpret_cast<const uint4*>(above_bits + first);
  const auto* eq4 = reinterpret_cast<const uint4*>(equal_bits + first);
  std::uint32_t above = 0, equal = 0;
  for (unsigned q = 0; q < thread_words / 4; ++q) {
    const uint4 u = up4[q], e = eq4[q];
    above += __popc(u.x) + __popc(u.y) + __popc(u.z) + __popc(u.w);
    equal += __popc(e.x) + __popc(e.y) + __popc(e.z) + __popc(e.w);
  }
  const unsigned long long total = reduce(temp).Sum(radix::pack_counts(above, equal));
  if (threadIdx.x == 0) packed[blockIdx.x] = total;
}

// Per tile, in index order: each thread scans the counts of its 16 words
// after those of the threads before it, walks its set bits from the lowest
// index, places the keys above T and the first r equal to T (radix::
// emit_flagged), gathers their values from g, and zeroes its words for the
// next call. Nothing is written when the input had a non-finite value (the
// bitmaps are then still zero).
template <class T, class Index>
__global__ void __launch_bounds__(block_threads)
    write_kernel(const T* __restrict__ g, const state<key_of<T>>* st,
                 const unsigned long long* __restrict__ tile_before, unsigned int* above_bits,
                 unsigned int* equal_bits, T* values, Index* indices, std::size_t offset) {
  using scan = cub::BlockScan<unsigned long long, block_threads>;
  __shared__ typename scan::TempStorage temp;
  if (st->first_bad != no_index) return;
  const unsigned long long ties = st->rank;
  const std::size_t first = static_cast<std::size_t>(blockIdx.x) * tile_words + threadIdx.x * thread_words;
  auto* up4 = reinterpret_cast<uint4*>(above_bits + first);
  auto* eq4 = reinterpret_cast<uint4*>(equal_bits + first);
  uint4 up[thread_words / 4], eq[thread_words / 4];
  std::uint32_t above = 0, equal = 0;
  for (unsigned q = 0; q < thread_words / 4; ++q) {
    up[q] = up4[q];
    eq[q] = eq4[q];
    above += __popc(up[q].x) + __popc(up[q].y) + __popc(up[q].z) + __popc(up[q].w);
    equal += __popc(eq[q].x) + __popc(eq[q].y) + __popc(eq[q].z) + __popc(eq[q].w);
  }
  unsigned long long before = 0;
  scan(temp).ExclusiveSum(radix::pack_counts(above, equal), before);
  // Packed sums carry nothing from the low half: each half stays below 2^32.
  const unsigned long long at = tile_before[blockIdx.x] + before;
  unsigned long long above_before = radix::packed_above(at), equal_before = radix::packed_equal(at);
  if (above == 0 && equal == 0) return;
  for (unsigned q = 0; q < thread_words / 4; ++q) {
    const unsigned int uw[4] = {up[q].x, up[q].y, up[q].z, up[q].w};
    const unsigned int ew[4] = {eq[q].x, eq[q].y, eq[q].z, eq[q].w};
    for (unsigned w = 0; w < 4; ++w) {
      for (unsigned int bits = uw[w] | ew[w]; bits != 0; bits &= bits - 1u) {
        const unsigned b = static_cast<unsigned>(__ffs(static_cast<int>(bits)) - 1);
        const std::size_t i = (first + q * 4 + w) * 32 + b;
        const bool is_above = ((uw[w] >> b) & 1u) != 0;
        unsigned long long slot = 0;
        if (radix::emit_flagged<unsigned long long>(is_above, ties, above_before, equal_before, slot)) {
          values[slot] = g[i];
          indices[slot] = static_cast<Index>(offset + i);
        }
        above_before += is_above ? 1u : 0u;
        equal_before += is_above ? 0u : 1u;
      }
    }
    if ((up[q].x | up[q].y | up[q].z | up[q].w) != 0) up4[q] = make_uint4(0, 0, 0, 0);
    if ((eq[q].x | eq[q].y | eq[q].z | eq[q].w) != 0) eq4[q] = make_uint4(0, 0, 0, 0);
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
    const std::size_t words = (n + 31) / 32;
    const std::size_t tiles = std::max<std::size_t>(1, (words + topk_cuda::tile_words - 1) / topk_cuda::tile_words);
    const std::size_t bitmap_words = tiles * topk_cuda::tile_words;  // padded: whole uint4 tiles, zero tail
    const std::size_t room = radix::candidate_room(n);
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
    const std::size_t index_at = place(room * sizeof(unsigned int));
    const std::size_t value_at = place(room * sizeof(T));
    // The two bitmaps back to back (bitmap_words * 4 bytes is a multiple of 256): one memset clears both.
    const std::size_t above_at = place(bitmap_words * sizeof(unsigned int));
    const std::size_t equal_at = place(bitmap_words * sizeof(unsigned int));
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
    list_index_ = reinterpret_cast<unsigned int*>(base + index_at);
    list_value_ = reinterpret_cast<T*>(base + value_at);
    above_bits_ = reinterpret_cast<unsigned int*>(base + above_at);
    equal_bits_ = reinterpret_cast<unsigned int*>(base + equal_at);
    bitmap_words_ = bitmap_words;
    tiles_ = static_cast<unsigned>(tiles);
    fresh_ = true;  // the bitmaps must be zeroed (on the caller's stream) before first use
    counts_ = reinterpret_cast<unsigned long long*>(base + counts_at);
    before_ = reinterpret_cast<unsigned long long*>(base + before_at);
    scan_temp_ = base + scan_at;
    scan_bytes_ = scan_bytes;
    room_ = static_cast<unsigned int>(room);
    capacity_ = n;
  }

  std::size_t capacity() const { return capacity_; }

  /// After cuda_topk_finish: whether the last selection ran its later passes
  /// on the candidate list (true) or fell back to full reads of g (false),
  /// and how many candidates level 0 announced. For tests and benchmarks.
  bool last_used_list() const { return host_ && static_cast<const state_type*>(host_.get())->use_list != 0; }
  std::size_t last_candidates() const {
    return host_ ? static_cast<std::size_t>(static_cast<const state_type*>(host_.get())->candidates) : 0;
  }

 private:
  struct device_free {
    void operator()(void* p) const noexcept { cuda_workspace_free(p); }
  };
  struct host_free {
    void operator()(void* p) const noexcept { cudaFreeHost(p); }
  };

  template <class U, class Index>
  friend void cuda_topk_async(cudaStream_t, std::span<const U>, std::size_t, cuda_topk_workspace<U>&,
                              U*, Index*, std::size_t);
  template <class U>
  friend void cuda_topk_finish(cudaStream_t, cuda_topk_workspace<U>&, std::string_view);

  std::unique_ptr<void, device_free> device_;
  std::unique_ptr<void, host_free> host_;  // pinned: the status copy is a true async copy
  std::size_t capacity_ = 0;
  int sms_ = 1;
  state_type* state_ = nullptr;
  unsigned int* hist_ = nullptr;
  unsigned int* list_index_ = nullptr;  // candidate list: indices ...
  T* list_value_ = nullptr;             // ... and values, in append order
  unsigned int room_ = 0;
  unsigned int* above_bits_ = nullptr;  // bit i: key of element i > T (zero between calls)
  unsigned int* equal_bits_ = nullptr;  // bit i: key of element i == T (zero between calls)
  std::size_t bitmap_words_ = 0;
  unsigned tiles_ = 1;
  bool fresh_ = false;
  unsigned long long* counts_ = nullptr;
  unsigned long long* before_ = nullptr;
  void* scan_temp_ = nullptr;
  std::size_t scan_bytes_ = 0;
  std::size_t pending_n_ = 0;  // the gradient size of the selection in flight (0: none)
  std::size_t pending_offset_ = 0;  // its offset, for the error message
};

/// Queues the exact top-k of |g| on `stream` and returns without waiting:
/// `values_out[0..k)` and `indices_out[0..k)` (device memory) receive the k
/// elements of largest magnitude (ties to the lower index) with their signed
/// values, indices strictly increasing: the host gcomp::topk's selection.
/// `g` is device memory of at most 2^32 - 1 elements. With an offset (a
/// layer of a larger gradient) the indices written, and the index a
/// non-finite error names, are offset + i. Arguments are checked
/// here (k = 0, k > n, n too large, null outputs: gcomp::error); non-finite
/// values are only reported by cuda_topk_finish, which must be called before
/// the workspace is used again. The first call for a size allocates the
/// workspace (cudaMalloc: not stream-ordered); later calls allocate nothing.
template <class T, class Index>
void cuda_topk_async(cudaStream_t stream, std::span<const T> g, std::size_t k,
                     cuda_topk_workspace<T>& ws, T* values_out, Index* indices_out,
                     std::size_t offset) {
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
  require(offset + n - 1 <= std::numeric_limits<Index>::max(), where, "offset ", offset, " plus size ", n,
          " exceeds the index type's range");
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
  // Only the tiles covering n's bits; the workspace may be larger.
  const unsigned tiles = static_cast<unsigned>(std::max<std::size_t>(1, ((n + 31) / 32 + tile_words - 1) / tile_words));

  // The room of this size, not of the (maybe larger) workspace: the path
  // depends on the call alone, as in the host emulation.
  const auto room = static_cast<unsigned int>(radix::candidate_room(n));
  if (ws.fresh_) {
    cuda_check(cudaMemsetAsync(ws.above_bits_, 0, 2 * ws.bitmap_words_ * sizeof(unsigned int), stream), where,
               "cudaMemsetAsync of the bitmaps");
    ws.fresh_ = false;
  }
  init_kernel<T><<<1, block_threads, 0, stream>>>(ws.state_, ws.hist_, k);
  for (unsigned level = 0; level < levels; ++level) {
    histogram_kernel<T><<<grid, block_threads, 0, stream>>>(p, n32, ws.state_, ws.hist_, ws.list_index_,
                                                            ws.list_value_, room, level);
    choose_kernel<T><<<1, block_threads, 0, stream>>>(p, ws.state_, ws.hist_, level, room);
  }
  mark_kernel<T><<<grid, block_threads, 0, stream>>>(p, n32, ws.state_, ws.list_index_, ws.list_value_,
                                                     room, ws.above_bits_, ws.equal_bits_);
  count_kernel<<<tiles, block_threads, 0, stream>>>(ws.above_bits_, ws.equal_bits_, ws.counts_);
  std::size_t scan_bytes = ws.scan_bytes_;
  cuda_check(cub::DeviceScan::ExclusiveSum(ws.scan_temp_, scan_bytes, ws.counts_, ws.before_,
                                           static_cast<int>(tiles), stream),
             where, "cub::DeviceScan::ExclusiveSum");
  write_kernel<T, Index><<<tiles, block_threads, 0, stream>>>(p, ws.state_, ws.before_, ws.above_bits_,
                                                              ws.equal_bits_, values_out, indices_out, offset);
  // Launch errors (bad configuration, no device) show here without a sync.
  cuda_check(cudaGetLastError(), where, "launching the top-k kernels");
  ws.pending_n_ = n;
  ws.pending_offset_ = offset;
}

/// cuda_topk_async of a whole gradient (offset 0).
template <class T, class Index>
void cuda_topk_async(cudaStream_t stream, std::span<const T> g, std::size_t k,
                     cuda_topk_workspace<T>& ws, T* values_out, Index* indices_out) {
  cuda_topk_async(stream, g, k, ws, values_out, indices_out, std::size_t{0});
}

/// Waits for the selection queued by cuda_topk_async (the one host sync of a
/// top-k: the non-finite flag must come back to be thrown) and throws
/// gcomp::error naming the first non-finite index and its value, as the host
/// top-k does (`where` names the caller); the outputs were then left unchanged.
template <class T>
void cuda_topk_finish(cudaStream_t stream, cuda_topk_workspace<T>& ws, std::string_view where) {
  if (ws.pending_n_ == 0) return;
  ws.pending_n_ = 0;
  using state_type = typename cuda_topk_workspace<T>::state_type;
  auto* status = static_cast<state_type*>(ws.host_.get());
  cuda_check(cudaMemcpyAsync(status, ws.state_, sizeof(state_type), cudaMemcpyDeviceToHost, stream),
             where, "cudaMemcpyAsync of the status");
  cuda_check(cudaStreamSynchronize(stream), where, "cudaStreamSynchronize");
  if (status->first_bad != topk_cuda::no_index)
    fail_selection_nonfinite(where, ws.pending_offset_ + status->first_bad, static_cast<T>(status->bad_value));
}

template <class T>
void cuda_topk_finish(cudaStream_t stream, cuda_topk_workspace<T>& ws) {
  cuda_topk_finish(stream, ws, "gcomp::detail::cuda_topk");
}

/// cuda_topk_async then cuda_topk_finish: the selection is in the outputs
/// (or gcomp::error was thrown) when it returns.
template <class T, class Index>
void cuda_topk(cudaStream_t stream, std::span<const T> g, std::size_t k, cuda_topk_workspace<T>& ws,
               T* values_out, Index* indices_out) {
  cuda_topk_async(stream, g, k, ws, values_out, indices_out);
  cuda_topk_finish(stream, ws);
}

/// gcomp::topk's selection under cuda_par (compress/detail/sparse_device.hpp):
/// cuda_topk on the policy's stream with the workspace kept in the
/// compressor's opaque scratch.
template <>
struct device_topk<cuda_par> : std::true_type {
  template <class T, class Index>
  static void select(const cuda_par& policy, std::span<const T> g, std::size_t k, std::size_t offset,
                     opaque_scratch& scratch, T* values, Index* indices, std::string_view where) {
    auto& ws = scratch.get<cuda_topk_workspace<T>>();
    cuda_topk_async(policy.stream, g, k, ws, values, indices, offset);
    cuda_topk_finish(policy.stream, ws, where);
  }
};

}  // namespace gcomp::detail
