// Tests of aggregate/allgather.hpp: rank-ordered decoding of every worker's bytes, exact byte counts, corrupt input.
#include "gcomp/aggregate/allgather.hpp"

#include <doctest/doctest.h>

#include <cstring>
#include <utility>
#include <span>
#include <vector>

#include "gcomp/comm/inproc.hpp"
#include "gcomp/compress/identity.hpp"
#include "gcomp/core/sparse_payload.hpp"
#include "gcomp/exec/host.hpp"
#include "gcomp/optim/sgd.hpp"
#include "gcomp/pipeline.hpp"

namespace {

using gcomp::host_seq;

// A test compressor with a sparse payload and no shared support: it keeps the
// elements whose index is congruent to the worker's rank modulo 3, so the
// supports of different workers differ. It can also corrupt its message.
struct strided_keep {
  using value_type = float;
  using payload = gcomp::sparse_payload<float>;
  static constexpr bool unbiased = false;
  static constexpr bool shared_support = false;
  bool corrupt = false;

  template <class Policy>
  void compress(const Policy&, std::span<const float> g, payload& m, gcomp::rng_key key) {
    m.dimension = g.size();
    m.indices.clear();
    m.data.clear();
    for (std::size_t i = key.worker % 3; i < g.size(); i += 3) {
      m.indices.push_back(static_cast<std::uint32_t>(i));
      m.data.push_back(g[i]);
    }
    // Out of order: harmless to this compressor's own decompress_add, but
    // the wire contract (strictly increasing indices) is broken.
    if (corrupt && m.indices.size() >= 2) std::swap(m.indices[0], m.indices[1]);
  }
  template <class Policy>
  void decompress_add(const Policy&, const payload& m, std::span<float> out, float scale) const {
    gcomp::check_same_size("strided_keep", "out", out.size(), "dimension", m.dimension);
    for (std::size_t j = 0; j < m.size(); ++j) out[m.indices[j]] += scale * m.data[j];
  }
  std::size_t wire_bytes(const payload& m) const { return encoded_size(m); }
  double bits_per_element(std::size_t) const { return 64.0 / 3; }
};

std::vector<float> local_gradient(int rank, std::size_t n) {
  std::vector<float> g(n);
  for (std::size_t i = 0; i < n; ++i)
    g[i] = 0.37f * float(i % 17) - 1.1f * float(rank) + 1e-3f * float(i);
  return g;
}

}  // namespace

TEST_CASE("allgather sums every worker's decoded payload in rank order, bitwise on all workers") {
  const std::size_t n = 1001;
  for (int m : {1, 2, 3, 4}) {
    CAPTURE(m);
    // Oracle: out[i] = ((0 + s*c_0[i]) + s*c_1[i]) + ... with c_r the rank's kept values.
    std::vector<float> expected(n, 0.0f);
    const float scale = 1.0f / float(m);
    std::vector<std::uint64_t> sent(m);
    for (int r = 0; r < m; ++r) {
      const auto g = local_gradient(r, n);
      std::size_t kept = 0;
      for (std::size_t i = std::size_t(r) % 3; i < n; i += 3, ++kept) expected[i] += scale * g[i];
      sent[std::size_t(r)] = 24 + 8 + 8 * kept;
    }
    gcomp::inproc_group group(m);
    std::vector<std::vector<float>> results(m);
    group.run([&](gcomp::inproc_comm& comm) {
      gcomp::allgather agg;
      strided_keep c;
      const auto g = local_gradient(comm.rank(), n);
      std::vector<float> global(n, 99.0f);
      agg.aggregate(host_seq{}, comm, c, std::span<const float>(g), std::span<float>(global),
                    gcomp::rng_key{1, 0, static_cast<std::uint32_t>(comm.rank())});
      results[std::size_t(comm.rank())] = global;
      const auto own = sent[std::size_t(comm.rank())];
      CHECK(agg.last_bytes() == own);
      if (m > 1) {
        CHECK(comm.stats().bytes_sent == own);
        std::uint64_t total = 0;
        for (auto b : sent) total += b;
        CHECK(comm.stats().bytes_received == total - own);
      }
    });
    for (int r = 0; r < m; ++r)
      CHECK(std::memcmp(results[std::size_t(r)].data(), expected.data(), n * sizeof(float)) == 0);
  }
}

TEST_CASE("identity through allgather matches the rank-ordered dense mean") {
  const std::size_t n = 300;
  const int m = 3;
  std::vector<float> expected(n, 0.0f);
  for (int r = 0; r < m; ++r) {
    const auto g = local_gradient(r, n);
    for (std::size_t i = 0; i < n; ++i) expected[i] += (1.0f / 3.0f) * g[i];
  }
  gcomp::inproc_group group(m);
  group.run([&](gcomp::inproc_comm& comm) {
    gcomp::allgather agg;
    gcomp::identity<float> c;
    const auto g = local_gradient(comm.rank(), n);
    std::vector<float> global(n);
    for (int step = 0; step < 3; ++step) {  // buffers are reused across steps
      agg.aggregate(gcomp::host_par{2}, comm, c, std::span<const float>(g),
                    std::span<float>(global), gcomp::rng_key{});
      CHECK(std::memcmp(global.data(), expected.data(), n * sizeof(float)) == 0);
    }
    CHECK(agg.last_bytes() == 24 + n * 4);
  });
}

TEST_CASE("a corrupt message from one worker throws gcomp::error and leaves global untouched") {
  const std::size_t n = 50;
  gcomp::inproc_group group(3);
  std::vector<int> threw(3, 0);
  std::vector<std::vector<float>> globals(3, std::vector<float>(n, 7.0f));
  group.run([&](gcomp::inproc_comm& comm) {
    gcomp::allgather agg;
    strided_keep c;
    c.corrupt = comm.rank() == 1;
    const auto g = local_gradient(comm.rank(), n);
    try {
      agg.aggregate(host_seq{}, comm, c, std::span<const float>(g),
                    std::span<float>(globals[std::size_t(comm.rank())]), gcomp::rng_key{});
    } catch (const gcomp::error& e) {
      threw[std::size_t(comm.rank())] = 1;
      CHECK(std::string(e.what()).find("strictly increasing") != std::string::npos);
    }
  });
  CHECK(threw == std::vector<int>{1, 0, 1});  // the sender does not decode its own bytes
  for (int r : {0, 2}) CHECK(globals[std::size_t(r)] == std::vector<float>(n, 7.0f));
}

TEST_CASE("a compressor without shared support runs in a pipeline through allgather") {
  const gcomp::layout lay{{"w", 10}, {"b", 2}};
  gcomp::inproc_group group(2);
  std::vector<std::vector<float>> params(2);
  group.run([&](gcomp::inproc_comm& comm) {
    gcomp::pipeline p{strided_keep{}, gcomp::allgather{}, gcomp::sgd<float>{{.lr = 1.0}}};
    std::vector<float> x(12, 0.0f);
    const auto g = local_gradient(comm.rank(), 12);
    p.step(host_seq{}, comm, lay, std::span<float>(x), std::span<const float>(g));
    params[std::size_t(comm.rank())] = x;
  });
  CHECK(params[0] == params[1]);
  // Index 2 is kept by rank 2 only, which does not exist: it stays zero.
  CHECK(params[0][2] == 0.0f);
  CHECK(params[0][0] == -0.5f * local_gradient(0, 12)[0]);
}
