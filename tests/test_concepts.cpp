// The concepts accept conforming parts and reject non-conforming ones (checked at compile time).
#include <doctest/doctest.h>

#include <span>

#include "gcomp/gcomp.hpp"

namespace {

// Missing decompress_add: not a compressor.
struct no_decompress {
  using payload = gcomp::dense_payload<float>;
  static constexpr bool unbiased = true;
  static constexpr bool shared_support = true;
  void compress(const gcomp::host_seq&, std::span<const float>, payload&, gcomp::rng_key) {}
  std::size_t wire_bytes(const payload&) const { return 0; }
  double bits_per_element(std::size_t) const { return 32; }
};

// Everything but the traits' static members.
struct no_traits {
  using payload = gcomp::dense_payload<float>;
  void compress(const gcomp::host_seq&, std::span<const float>, payload&, gcomp::rng_key) {}
  void decompress_add(const gcomp::host_seq&, const payload&, std::span<float>, float) const {}
  std::size_t wire_bytes(const payload&) const { return 0; }
  double bits_per_element(std::size_t) const { return 32; }
};

// A complete compressor that says its payloads do not line up across workers.
struct unshared : no_traits {
  static constexpr bool unbiased = false;
  static constexpr bool shared_support = false;
};

// A communicator without the non-blocking all-reduce.
struct blocking_only_comm {
  int rank() const { return 0; }
  int size() const { return 1; }
  void allreduce_sum(const gcomp::host_seq&, std::span<float>) {}
  void allgather(const gcomp::host_seq&, std::span<const std::byte>, std::span<std::byte>) {}
  void allgatherv(const gcomp::host_seq&, std::span<const std::byte>, std::vector<std::byte>&,
                  std::span<std::size_t>) {}
  void broadcast(const gcomp::host_seq&, std::span<float>, int) {}
  void barrier() {}
  gcomp::comm_stats stats() const { return {}; }
};

struct not_a_policy {};

}  // namespace

// Policies.
static_assert(gcomp::execution_policy<gcomp::host_seq>);
static_assert(gcomp::execution_policy<gcomp::host_par>);
static_assert(gcomp::execution_policy<const gcomp::host_par&>);
static_assert(!gcomp::execution_policy<not_a_policy>);
static_assert(!gcomp::execution_policy<int>);

// Compressors.
static_assert(gcomp::compressor<gcomp::identity<float>>);
static_assert(gcomp::compressor<gcomp::identity<double>, gcomp::host_par, double>);
static_assert(gcomp::allreducible_compressor<gcomp::identity<float>>);
static_assert(!gcomp::compressor<no_decompress>);
static_assert(!gcomp::compressor<no_traits>);
static_assert(gcomp::compressor<unshared>);
static_assert(!gcomp::allreducible_compressor<unshared>);
static_assert(!gcomp::compressor<gcomp::identity<float>, not_a_policy>);
static_assert(gcomp::compressor_traits<gcomp::identity<float>>::unbiased);

// Communicators.
static_assert(gcomp::communicator<gcomp::inproc_comm>);
static_assert(gcomp::communicator<gcomp::inproc_comm, gcomp::host_par, double>);
static_assert(!gcomp::communicator<blocking_only_comm>);
static_assert(!gcomp::communicator<int>);

// Aggregators and optimizers.
static_assert(gcomp::aggregator<gcomp::allreduce, gcomp::identity<float>, gcomp::inproc_comm>);
static_assert(!gcomp::aggregator<gcomp::allreduce, unshared, gcomp::inproc_comm>);
static_assert(gcomp::optimizer<gcomp::sgd<float>>);
static_assert(gcomp::optimizer<gcomp::sgd<double>, gcomp::host_par, double>);
static_assert(!gcomp::optimizer<gcomp::identity<float>>);

TEST_CASE("compressor_traits report identity honestly") {
  using traits = gcomp::compressor_traits<gcomp::identity<float>>;
  CHECK(traits::unbiased);
  CHECK(traits::shared_support);
  // 32 bits per value plus the 24-byte header spread over the n elements.
  CHECK(traits::bits_per_element(gcomp::identity<float>{}, 100) == doctest::Approx(32.0 + 1.92));
  CHECK(gcomp::compressor_traits<gcomp::identity<double>>::bits_per_element({}, 1) ==
        64.0 + 192.0);
}

TEST_CASE("identity: compress then decompress_add reproduces the scaled input; wire bytes exact") {
  gcomp::identity<float> c;
  gcomp::identity<float>::payload message;
  const std::vector<float> g{1.0f, -2.0f, 3.5f};
  c.compress(gcomp::host_seq{}, std::span<const float>(g), message, {});
  CHECK(c.wire_bytes(message) == 24 + 3 * sizeof(float));  // header + values
  std::vector<float> out{10.0f, 10.0f, 10.0f};
  c.decompress_add(gcomp::host_seq{}, message, std::span<float>(out), 2.0f);
  CHECK(out == std::vector<float>{12.0f, 6.0f, 17.0f});
  std::vector<float> wrong(2, 0.0f);
  CHECK_THROWS_AS(c.decompress_add(gcomp::host_seq{}, message, std::span<float>(wrong), 1.0f),
                  gcomp::error);
  CHECK(wrong == std::vector<float>(2, 0.0f));
}
