// The stochastic quantizers (QSGD, TernGrad, natural compression) under a device policy (cuda_par, thrust_device): per-bucket statistics in the fixed reduction order, codes packed word by word with the host's arithmetic, so payloads are bitwise the host's.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>
#include <vector>

#include "gcomp/compress/detail/quant_kernels.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/core/nonfinite.hpp"
#include "gcomp/core/quantized_payload.hpp"
#include "gcomp/core/random.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/detail/reduce_order.hpp"
#include "gcomp/exec/detail/unfused.hpp"

// How the device path is built (one pass over the gradient would fuse all of
// this into one kernel; these are the policy's generic primitives, so the same
// code runs, and is tested in CI, on Thrust's OpenMP system):
//   1. one thread per reduce block (4096 elements, exec/detail/reduce_order.hpp)
//      of each bucket: the block's sum of squares or max |g| in double, the
//      same lanes and tree as the host;
//   2. one thread per bucket: the blocks left to right from the identity, the
//      square root, the round-up to T, and a status (fine, non-finite, overflow);
//   3. one reduction over the statuses (the only host wait before the copy);
//   4. one thread per 64-bit word of the message: the codes of the elements
//      it holds, one Philox block per four elements, assembled in place;
//   5. scales and words copied to host scratch; the caller fills the message.
// The message is a host quantized_payload: under cuda_par the compressed
// bytes (1/8 to 1/32 of the gradient) cross to the host once per step, which a
// host transport needs anyway. Coders and decoders are the quantizer's own
// GCOMP_HD functors (qsgd.hpp, terngrad.hpp), which its host loops call too.

namespace gcomp::detail {

/// Device scratch of one quantizer object, sized at its first device step in
/// the policy's memory and reused: block partials, scales, statuses, words.
/// decompress_add reuses scales and words for the message it uploads.
template <class T>
struct quant_device_buffers {
  policy_buffer<double> partials;
  policy_buffer<T> scales;
  policy_buffer<std::uint8_t> status;
  policy_buffer<std::uint64_t> words;
};

enum : std::uint8_t { quant_bucket_fine = 0, quant_bucket_not_finite = 1, quant_bucket_overflow = 2 };

struct quant_add_double {
  GCOMP_HD double operator()(double a, double b) const { return add_unfused(a, b); }
};
struct quant_max_double {
  GCOMP_HD double operator()(double a, double b) const { return a < b ? b : a; }
};
struct quant_min_index {
  GCOMP_HD std::size_t operator()(std::size_t a, std::size_t b) const { return b < a ? b : a; }
};

/// The transform of quant_bucket_stats: v^2 (l2) or |v| (max), infinity for
/// a non-finite element.
template <class T>
struct quant_stat_of {
  const T* x;
  bool l2;
  GCOMP_HD double operator()(std::size_t i) const {
    const double v = static_cast<double>(x[i]);
    if (nonfinite_flag(v) != 0) return __builtin_huge_val();
    return l2 ? mul_unfused(v, v) : magnitude(v);
  }
};

/// The smallest T above t, for t >= 0 finite (std::nextafter(t, +inf)).
template <class T>
GCOMP_HD inline T next_up_nonnegative(T t) {
  if constexpr (sizeof(T) == 4) {
    std::uint32_t bits = 0;
    memcpy(&bits, &t, 4);
    ++bits;
    memcpy(&t, &bits, 4);
  } else {
    std::uint64_t bits = 0;
    memcpy(&bits, &t, 8);
    ++bits;
    memcpy(&t, &bits, 8);
  }
  return t;
}

/// Step 2 for one bucket [begin, end) whose combined raw statistic is v:
/// what quant_bucket_stats computes, written to *scale, or a status.
template <class T>
GCOMP_HD inline std::uint8_t quant_finish_bucket(const T* x, std::size_t begin, std::size_t end,
                                                 double v, bool l2, T* scale) {
  const double inf = __builtin_huge_val();
  if (!(v < inf)) {
    for (std::size_t i = begin; i < end; ++i)
      if (nonfinite_flag(x[i]) != 0) return quant_bucket_not_finite;
    // Finite values whose squares overflow a double (T = double only): the
    // host rescales by the largest magnitude, sequentially.
    double top = 0.0;
    for (std::size_t i = begin; i < end; ++i) {
      const double a = magnitude(static_cast<double>(x[i]));
      top = top < a ? a : top;
    }
    double sum = 0.0;
    for (std::size_t i = begin; i < end; ++i) {
      const double y = static_cast<double>(x[i]) / top;
      sum = add_unfused(sum, mul_unfused(y, y));
    }
    v = mul_unfused(top, std::sqrt(sum));
    if (!(v < inf)) return quant_bucket_overflow;
    *scale = static_cast<T>(v);
    return quant_bucket_fine;
  }
  if (l2) v = std::sqrt(v);
  T t = static_cast<T>(v);
  if (static_cast<double>(t) < v) t = next_up_nonnegative(t);
  if (nonfinite_flag(t) != 0) return quant_bucket_overflow;
  *scale = t;
  return quant_bucket_fine;
}

/// Word w of the packed codes of n elements: code i occupies bits
/// [i bits, (i + 1) bits) of the stream (quantized::read_code's layout).
/// The coder is rebuilt for each bucket met and the Philox block for each
/// four elements, so an element's code is computed from exactly the values
/// the host loop uses.
template <class T, class Coder>
GCOMP_HD inline std::uint64_t quant_pack_word(std::size_t w, std::size_t n, unsigned bits,
                                              std::size_t bucket, const T* x, const T* scales,
                                              const rng_key& stream, const Coder& coder) {
  const std::size_t first_bit = w * 64;
  std::size_t i = first_bit / bits;
  std::uint64_t word = 0;
  if (i >= n) return word;
  std::size_t k = bucket == 0 ? 0 : i / bucket;
  auto code_of = coder.for_scale(scales[k]);
  std::uint64_t block = i / 4;
  u32x4 random = random_block(stream, block);
  for (; i < n; ++i) {
    const std::size_t bit = i * bits;
    if (bit >= first_bit + 64) break;
    if (i / 4 != block) {
      block = i / 4;
      random = random_block(stream, block);
    }
    if (bucket != 0 && i / bucket != k) {
      k = i / bucket;
      code_of = coder.for_scale(scales[k]);
    }
    const std::uint64_t c = code_of(x[i], random.v[i % 4]);
    if (bit >= first_bit)
      word |= c << (bit - first_bit);
    else
      word |= c >> (first_bit - bit);
  }
  return word;
}

/// Compresses g (memory of `policy`) into host scratch: scales_out (one per
/// bucket, or one with bucket 0) and words_out (word_count(n, bits)), bitwise
/// what the host path gives. Throws gcomp::error like the host path (the
/// first bucket that fails: its first non-finite index and value, or its norm
/// overflowing) with nothing written to the outputs.
template <class T, class Coder, class Policy>
void quant_device_compress(const Policy& policy, std::span<const T> g, std::size_t bucket,
                           quant_stat stat, unsigned bits, const rng_key& stream, Coder coder,
                           quant_device_buffers<T>& buf, std::vector<T>& scales_out,
                           std::vector<std::uint64_t>& words_out, std::string_view where) {
  const std::size_t n = g.size();
  const std::size_t buckets = bucket == 0 ? 1 : quantized::bucket_count(n, bucket);
  const std::size_t span = bucket == 0 ? n : bucket;  // elements per bucket (the last may be fewer)
  const std::size_t per = reduce_block_count(span);   // reduce blocks per bucket
  const std::size_t word_count = quantized::word_count(n, bits);
  buf.partials.resize(policy, buckets * per, where);
  buf.scales.resize(policy, buckets, where);
  buf.status.resize(policy, buckets, where);
  buf.words.resize(policy, word_count, where);
  const T* x = g.data();
  double* partials = buf.partials.data();
  T* scales = buf.scales.data();
  std::uint8_t* status = buf.status.data();
  std::uint64_t* words = buf.words.data();
  const bool l2 = stat == quant_stat::l2;

  for_each_index(policy, buckets * per, [=] GCOMP_HD(std::size_t t) {
    const std::size_t k = t / per;
    const std::size_t bucket_end = k * span + span < n ? k * span + span : n;
    const std::size_t begin = k * span + (t % per) * reduce_block;
    const std::size_t end = begin + reduce_block < bucket_end ? begin + reduce_block : bucket_end;
    if (begin >= end) {
      partials[t] = 0.0;
      return;
    }
    quant_stat_of<T> transform{x, l2};
    if (l2) {
      quant_add_double reduce;
      partials[t] = reduce_one_block(begin, end, 0.0, reduce, transform);
    } else {
      quant_max_double reduce;
      partials[t] = reduce_one_block(begin, end, 0.0, reduce, transform);
    }
  });
  for_each_index(policy, buckets, [=] GCOMP_HD(std::size_t k) {
    const std::size_t begin = k * span;
    const std::size_t end = begin + span < n ? begin + span : n;
    const std::size_t blocks = reduce_block_count(end - begin);
    double v = 0.0;  // the identity, combined with the blocks left to right as the host does
    for (std::size_t b = 0; b < blocks; ++b) {
      const double p = partials[k * per + b];
      v = l2 ? add_unfused(v, p) : (v < p ? p : v);
    }
    status[k] = quant_finish_bucket(x, begin, end, v, l2, scales + k);
  });
  const std::size_t failed = transform_reduce(
      policy, buckets, buckets, quant_min_index{},
      [=] GCOMP_HD(std::size_t k) { return status[k] != quant_bucket_fine ? k : buckets; });
  if (failed != buckets) {
    const std::size_t begin = failed * span;
    const std::size_t end = begin + span < n ? begin + span : n;
    std::uint8_t what = 0;
    copy_to_host(policy, std::span<const std::uint8_t>(status + failed, 1), std::span<std::uint8_t>(&what, 1));
    if (what == quant_bucket_not_finite) {
      const std::size_t bad = begin + first_nonfinite(policy, g.subspan(begin, end - begin));
      T value{};
      copy_to_host(policy, std::span<const T>(x + bad, 1), std::span<T>(&value, 1));
      fail_not_finite(where, bad, static_cast<double>(value));
    }
    fail(where, "the norm of gradient[", begin, ", ", end, ") overflows");
  }
  for_each_index(policy, word_count, [=] GCOMP_HD(std::size_t w) {
    words[w] = quant_pack_word(w, n, bits, bucket, x, scales, stream, coder);
  });
  scales_out.resize(buckets);
  words_out.resize(word_count);
  copy_to_host(policy, std::span<const T>(scales, buckets), std::span<T>(scales_out));
  copy_to_host(policy, std::span<const std::uint64_t>(words, word_count),
               std::span<std::uint64_t>(words_out));
}

/// For quantizers without scales (natural compression): `valid(v)` says
/// which inputs may be coded; the first invalid index (or n) is returned
/// before anything is packed, and the caller throws naming it. Otherwise the
/// codes go to words_out as quant_device_compress writes them (bucket 0,
/// coder.for_scale(T(0))).
template <class T, class Coder, class Valid, class Policy>
std::size_t quant_device_compress_unscaled(const Policy& policy, std::span<const T> g,
                                           unsigned bits, const rng_key& stream, Coder coder,
                                           Valid valid, quant_device_buffers<T>& buf,
                                           std::vector<std::uint64_t>& words_out,
                                           std::string_view where) {
  const std::size_t n = g.size();
  const T* x = g.data();
  const std::size_t bad = transform_reduce(
      policy, n, n, quant_min_index{}, [=] GCOMP_HD(std::size_t i) { return valid(x[i]) ? n : i; });
  if (bad != n) return bad;
  const std::size_t word_count = quantized::word_count(n, bits);
  buf.scales.assign(policy, 1, T(0), where);
  buf.words.resize(policy, word_count, where);
  const T* scales = buf.scales.data();
  std::uint64_t* words = buf.words.data();
  for_each_index(policy, word_count, [=] GCOMP_HD(std::size_t w) {
    words[w] = quant_pack_word(w, n, bits, std::size_t{0}, x, scales, stream, coder);
  });
  words_out.resize(word_count);
  copy_to_host(policy, std::span<const std::uint64_t>(words, word_count),
               std::span<std::uint64_t>(words_out));
  return n;
}

/// out (memory of `policy`) += the decoded message, which the caller has
/// checked on the host (check_quant_message and the quantizer's code checks):
/// its scales and words are uploaded to buf, then one thread per element
/// reads its code and applies decoder.for_scale(bucket scale, scale).
template <class T, class Decoder, class Policy>
void quant_device_decompress_add(const Policy& policy, const quantized_payload<T>& message,
                                 std::span<T> out, T scale, std::size_t bucket, unsigned bits,
                                 Decoder decoder, quant_device_buffers<T>& buf,
                                 std::string_view where) {
  const std::size_t n = out.size();
  // Quantizers without scales decode with for_scale(T(0), scale).
  if (message.scales.empty()) {
    buf.scales.assign(policy, 1, T(0), where);
  } else {
    buf.scales.resize(policy, message.scales.size(), where);
    copy_from_host(policy, std::span<const T>(message.scales), buf.scales.span());
  }
  buf.words.resize(policy, message.words.size(), where);
  copy_from_host(policy, std::span<const std::uint64_t>(message.words), buf.words.span());
  const T* scales = buf.scales.data();
  const std::uint64_t* words = buf.words.data();
  T* o = out.data();
  for_each_index(policy, n, [=] GCOMP_HD(std::size_t i) {
    const std::size_t k = bucket == 0 ? 0 : i / bucket;
    o[i] = decoder.for_scale(scales[k], scale)(o[i], quantized::read_code(words, i, bits));
  });
}

}  // namespace gcomp::detail
