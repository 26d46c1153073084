// libFuzzer target: gcomp::decode(chain_payload<PA, PB>) for the support/value pairings chain<A, B> builds, then the chain's decompress_add on what it accepts.
#include <cstddef>
#include <cstdint>
#include <span>

#include "common.hpp"
#include "wire_mutator.hpp"
#include "gcomp/compress/cast.hpp"
#include "gcomp/compress/chain.hpp"
#include "gcomp/compress/identity.hpp"
#include "gcomp/compress/qsgd.hpp"
#include "gcomp/compress/random_block.hpp"
#include "gcomp/compress/randomk.hpp"
#include "gcomp/compress/terngrad.hpp"
#include "gcomp/compress/topk.hpp"

namespace {

using namespace gcomp;

template <class T, class I>
sparse_payload<T, I> support_sentinel() {
  sparse_payload<T, I> p;
  p.dimension = 9;
  p.indices = {2, 5};
  p.data = {T(0), T(0)};
  return p;
}

template <class T>
quantized_payload<T> values_sentinel() {
  quantized_payload<T> p;
  p.dimension = 2;
  p.bits = 4;
  p.bucket = 0;
  p.scales = {T(2)};
  p.words = {0x3a};
  return p;
}

// by_dimension: the support decoder allocates by the dimension (a block's), so
// only dimensions a receiver could hold are passed (common.hpp).
template <class Payload, class Use>
void try_decode(const char* name, std::span<const std::byte> bytes, const Payload& s, Use use,
                bool by_dimension = false) {
  Payload into;
  for (std::uint64_t dim : by_dimension ? fuzz::receiver_dimensions(bytes) : fuzz::dimensions_to_try(bytes))
    if (fuzz::decode_contract(name, bytes, s, dim, into)) {
      // B's message stands for the k values A kept: its dimension is k.
      fuzz::check(fuzz::dimension_of(into.values_message) == into.support.values().size(), name,
                  ": decoded a values message of dimension ", fuzz::dimension_of(into.values_message),
                  " for ", into.support.values().size(), " kept values");
      use(into);
    }
}

template <class T, class I>
void sparse_then_quantized(const char* name, std::span<const std::byte> bytes) {
  using P = chain_payload<sparse_payload<T, I>, quantized_payload<T>>;
  P s;
  s.support = support_sentinel<T, I>();
  s.values_message = values_sentinel<T>();
  try_decode(name, bytes, s, [](const P& m) {
    const unsigned level_bits = m.values_message.bits - 1u;
    if (level_bits >= 1 && level_bits <= 15) {
      const qsgd_options q{.levels = (1u << level_bits) - 1, .bucket = m.values_message.bucket};
      fuzz::decompress_checks("chain<topk, qsgd>",
                              chain<topk<T, I>, qsgd<T>>(topk<T, I>(topk_options{.k = 1}), qsgd<T>(q)), m);
    }
    const std::size_t k = m.support.size() == 0 ? 1 : m.support.size();
    fuzz::decompress_checks(
        "chain<randomk, terngrad>",
        chain<shared_randomk<T, rescale::none, I>, terngrad<T>>(
            shared_randomk<T, rescale::none, I>(randomk_options{.k = k}),
            terngrad<T>(terngrad_options{.bucket = m.values_message.bucket})),
        m);
  });
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  sparse_then_quantized<float, std::uint32_t>("chain<sparse<float,u32>, quantized<float>>", bytes);
  sparse_then_quantized<double, std::uint64_t>("chain<sparse<double,u64>, quantized<double>>", bytes);

  using block_dense = chain_payload<block_payload<float>, dense_payload<float>>;
  block_dense bd;
  bd.support.dimension = 6;
  bd.support.offset = 4;
  bd.support.data = {0.0f, 0.0f, 0.0f};
  bd.values_message.data = {1.0f, 2.0f, 3.0f};
  try_decode("chain<block<float>, dense<float>>", bytes, bd, [](const block_dense& m) {
    const std::size_t k = m.support.size() == 0 ? 1 : m.support.size();
    fuzz::decompress_checks(
        "chain<random_contiguous_block, identity>",
        chain<random_contiguous_block<float>, identity<float>>(
            random_contiguous_block<float>(random_contiguous_block_options{.k = k}), identity<float>{}),
        m);
  }, true);

  using sparse_half = chain_payload<sparse_payload<float>, dense_payload<float16>>;
  sparse_half sh;
  sh.support = support_sentinel<float, std::uint32_t>();
  sh.values_message.data = {float16{0x3c00}, float16{0x4000}};
  try_decode("chain<sparse<float,u32>, dense<float16>>", bytes, sh, [](const sparse_half& m) {
    fuzz::decompress_checks("chain<topk, fp16_cast>",
                            chain<topk<float>, fp16_cast<float>>(topk<float>(topk_options{.k = 1}),
                                                                 fp16_cast<float>{}),
                            m);
  });
  return 0;
}
