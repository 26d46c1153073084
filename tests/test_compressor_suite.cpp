// Every compressor of the library through the same contract: concept, exact wire size, byte round trip, determinism, allgather.
//
// The per-compressor tests check each method's mathematics; this file checks
// what an aggregator relies on, for all of them alike, so a new compressor is
// one line in the list below.
#include <doctest/doctest.h>

#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "gcomp/gcomp.hpp"

namespace {

using gcomp::host_par;
using gcomp::host_seq;

const gcomp::layout& model() {
  // Two matrices (PowerSGD factors them), a vector, and an odd tail.
  static const gcomp::layout lay = gcomp::layout::from_layers({
      {"conv", 0, 600, {20, 30}},
      {"fc", 600, 400, {40, 10}},
      {"bias", 1000, 40, {40}},
      {"tail", 1040, 17, {17}},
  });
  return lay;
}

std::vector<float> gradient(std::uint32_t worker, std::size_t n) {
  std::vector<float> g(n);
  const gcomp::rng_key key{11, 0, worker};
  for (std::size_t i = 0; i < n; ++i) g[i] = gcomp::normal(key, i) * (i % 7 == 0 ? 10.0f : 1.0f);
  return g;
}

template <class C>
std::vector<float> decompressed(const C& c, const typename C::payload& m, std::size_t n) {
  std::vector<float> out(n, 0.0f);
  c.decompress_add(host_seq{}, m, std::span<float>(out), 1.0f);
  return out;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// make() returns a fresh compressor (stateful ones start from scratch).
template <class Make>
void check_contract(const char* name, Make make, bool exact_bits) {
  using C = decltype(make());
  static_assert(gcomp::compressor<C, host_seq, float>);
  static_assert(gcomp::compressor<C, host_par, float>);
  static_assert(gcomp::wire_payload<typename C::payload>);
  INFO("compressor: ", name);
  const std::size_t n = model().total_size();
  const auto g = gradient(0, n);
  const gcomp::rng_key key{5, 3, 0};

  C c = make();
  typename C::payload m;
  c.compress(host_seq{}, std::span<const float>(g), m, key);
  std::vector<std::byte> bytes;
  encode(m, bytes);
  CHECK(c.wire_bytes(m) == bytes.size());
  if (exact_bits) CHECK(c.bits_per_element(n) * double(n) / 8.0 == doctest::Approx(bytes.size()));
  CHECK(bytes.size() < n * sizeof(float) + gcomp::wire::header_bytes + 64);

  // Bytes -> payload -> bytes is the identity, and both payloads decode alike.
  typename C::payload back;
  decode(std::span<const std::byte>(bytes), back, n);
  std::vector<std::byte> again;
  encode(back, again);
  CHECK(again == bytes);
  CHECK(same_bits(decompressed(c, m, n), decompressed(c, back, n)));
  // A message for another dimension is refused.
  CHECK_THROWS_AS(decode(std::span<const std::byte>(bytes), back, n + 1), gcomp::error);

  // The same key gives the same bytes on any thread count.
  for (unsigned threads : {1u, 2u, 3u}) {
    C d = make();
    typename C::payload p;
    d.compress(host_par{threads}, std::span<const float>(g), p, key);
    std::vector<std::byte> b;
    encode(p, b);
    CHECK_MESSAGE(b == bytes, "threads = ", threads);
  }

  // Three workers through allgather hold (1/3) * sum of each worker's C(g_m),
  // added in rank order, bit for bit.
  const int workers = 3;
  std::vector<float> expected(n, 0.0f);
  for (int r = 0; r < workers; ++r) {
    C d = make();
    typename C::payload p;
    const auto gr = gradient(std::uint32_t(r), n);
    d.compress(host_seq{}, std::span<const float>(gr), p, gcomp::rng_key{5, 0, std::uint32_t(r)});
    d.decompress_add(host_seq{}, p, std::span<float>(expected), 1.0f / 3.0f);
  }
  gcomp::inproc_group group(workers);
  std::vector<std::vector<float>> results(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    C d = make();
    gcomp::allgather agg;
    const auto gr = gradient(std::uint32_t(comm.rank()), n);
    std::vector<float> global(n);
    agg.aggregate(host_seq{}, comm, d, std::span<const float>(gr), std::span<float>(global),
                  gcomp::rng_key{5, 0, std::uint32_t(comm.rank())});
    results[std::size_t(comm.rank())] = global;
  });
  for (int r = 0; r < workers; ++r) CHECK(same_bits(results[std::size_t(r)], expected));
}

}  // namespace

TEST_CASE("every compressor keeps the wire and aggregation contract") {
  const auto& lay = model();
  check_contract("identity", [] { return gcomp::identity<float>{}; }, true);
  check_contract("topk", [] { return gcomp::topk<float>(gcomp::topk_options{.k = 50}); }, true);
  check_contract("topk per layer",
                 [&] { return gcomp::topk<float>(gcomp::topk_options{.ratio = 0.05}, lay); }, true);
  check_contract("hard_threshold", [] { return gcomp::hard_threshold<float>(2.0f); }, false);
  check_contract("sampled_topk", [] {
    return gcomp::sampled_topk<float>(gcomp::sampled_topk_options{.k = 40});
  }, false);
  check_contract("randomk", [] { return gcomp::randomk<float>(gcomp::randomk_options{.k = 64}); },
                 true);
  check_contract("shared_randomk",
                 [] { return gcomp::shared_randomk<float>(gcomp::randomk_options{.ratio = 0.1}); },
                 true);
  check_contract("random_contiguous_block", [] {
    return gcomp::random_contiguous_block<float>(gcomp::random_contiguous_block_options{.k = 100});
  }, true);
  check_contract("bernoulli_sparsifier", [] { return gcomp::bernoulli_sparsifier<float>(0.2); },
                 false);
  check_contract("powersgd", [&] {
    return gcomp::powersgd<float>(gcomp::powersgd_options{.rank = 2}, lay);
  }, true);
  check_contract("qsgd", [] { return gcomp::qsgd<float>(gcomp::qsgd_options{.levels = 7, .bucket = 128}); },
                 true);
  check_contract("terngrad", [] { return gcomp::terngrad<float>(gcomp::terngrad_options{.bucket = 100}); },
                 true);
  check_contract("natural", [] { return gcomp::natural<float>{}; }, true);
  check_contract("grid_round", [] { return gcomp::grid_round<float>({.spacing = 0.05, .bits = 16}); }, true);
  check_contract("sign", [] { return gcomp::sign<float>{}; }, true);
  check_contract("sign per layer", [&] { return gcomp::sign<float>(lay); }, true);
  check_contract("onebit per layer", [&] { return gcomp::onebit<float>(lay); }, true);
  check_contract("fp16_cast", [] { return gcomp::fp16_cast<float>{}; }, true);
  check_contract("bf16_cast", [] { return gcomp::bf16_cast<float>{}; }, true);
  check_contract("error_feedback<topk>", [] {
    return gcomp::error_feedback<gcomp::topk<float>>(gcomp::topk<float>(gcomp::topk_options{.k = 30}));
  }, true);
  check_contract("error_feedback<sign>", [&] {
    return gcomp::error_feedback<gcomp::sign<float>>(gcomp::sign<float>(lay));
  }, true);
  check_contract("chain<topk, qsgd>", [] {
    return gcomp::chain<gcomp::topk<float>, gcomp::qsgd<float>>(
        gcomp::topk<float>(gcomp::topk_options{.k = 64}),
        gcomp::qsgd<float>(gcomp::qsgd_options{.levels = 15, .bucket = 16}));
  }, false);
}

TEST_CASE("traits: exactly the shared-support compressors are all-reducible") {
  static_assert(gcomp::allreducible_compressor<gcomp::identity<float>>);
  static_assert(gcomp::allreducible_compressor<gcomp::shared_randomk<float>>);
  static_assert(gcomp::allreducible_compressor<gcomp::random_contiguous_block<float>>);
  static_assert(!gcomp::allreducible_compressor<gcomp::randomk<float>>);
  static_assert(!gcomp::allreducible_compressor<gcomp::topk<float>>);
  static_assert(!gcomp::allreducible_compressor<gcomp::qsgd<float>>);
  static_assert(!gcomp::allreducible_compressor<gcomp::sign<float>>);
  static_assert(!gcomp::allreducible_compressor<gcomp::fp16_cast<float>>);
  static_assert(!gcomp::allreducible_compressor<gcomp::powersgd<float>>);
  static_assert(gcomp::compressor_traits<gcomp::qsgd<float>>::unbiased);
  static_assert(gcomp::compressor_traits<gcomp::terngrad<float>>::unbiased);
  static_assert(gcomp::compressor_traits<gcomp::natural<float>>::unbiased);
  static_assert(gcomp::compressor_traits<gcomp::randomk<float>>::unbiased);
  static_assert(!gcomp::compressor_traits<gcomp::topk<float>>::unbiased);
  static_assert(!gcomp::compressor_traits<gcomp::sign<float>>::unbiased);
  static_assert(!gcomp::compressor_traits<gcomp::error_feedback<gcomp::randomk<float>>>::unbiased);
}
