// Checkpoints of compressors (error_feedback, ef21, powersgd, chain): 2N steps equal N, save, load into a fresh object, N more, bitwise; corrupt and mismatched checkpoints are rejected with the compressor unchanged.
#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "gcomp/compress/bernoulli.hpp"
#include "gcomp/compress/cast.hpp"
#include "gcomp/compress/chain.hpp"
#include "gcomp/compress/ef21.hpp"
#include "gcomp/compress/error_feedback.hpp"
#include "gcomp/compress/grid_round.hpp"
#include "gcomp/compress/identity.hpp"
#include "gcomp/compress/natural.hpp"
#include "gcomp/compress/onebit.hpp"
#include "gcomp/compress/powersgd.hpp"
#include "gcomp/compress/qsgd.hpp"
#include "gcomp/compress/random_block.hpp"
#include "gcomp/compress/randomk.hpp"
#include "gcomp/compress/sign.hpp"
#include "gcomp/compress/terngrad.hpp"
#include "gcomp/compress/threshold_topk.hpp"
#include "gcomp/compress/topk.hpp"
#include "gcomp/core/checkpoint.hpp"
#include "gcomp/exec/host.hpp"

namespace {

using bytes = std::vector<std::byte>;
using ef_topk = gcomp::error_feedback<gcomp::topk<float>>;
using ef_topk_double = gcomp::error_feedback<gcomp::topk<double>>;
using ef_powersgd = gcomp::error_feedback<gcomp::powersgd<float>>;
using ef21_topk = gcomp::ef21<gcomp::topk<float>>;
using ef_randomk =
    gcomp::error_feedback<gcomp::randomk<float, gcomp::key_use::per_worker, gcomp::rescale::none>>;
using ef_chain = gcomp::chain<ef_topk, gcomp::qsgd<float>>;

// Parts with state across steps save and load; every other compressor is
// stateless (its buffers are scratch rebuilt by each step) and writes nothing.
static_assert(gcomp::checkpointable<ef_topk, gcomp::host_seq>);
static_assert(gcomp::checkpointable<ef21_topk, gcomp::host_par>);
static_assert(gcomp::checkpointable<gcomp::powersgd<float>, gcomp::host_seq>);
static_assert(gcomp::checkpointable<ef_chain, gcomp::host_seq>);
static_assert(gcomp::checkpointable<gcomp::chain<gcomp::topk<float>, ef_topk>, gcomp::host_seq>);
static_assert(
    !gcomp::checkpointable<gcomp::chain<gcomp::topk<float>, gcomp::qsgd<float>>, gcomp::host_seq>);
static_assert(!gcomp::checkpointable<gcomp::topk<float>, gcomp::host_seq>);
static_assert(!gcomp::checkpointable<gcomp::randomk<float>, gcomp::host_seq>);
static_assert(!gcomp::checkpointable<gcomp::shared_randomk<float>, gcomp::host_seq>);
static_assert(!gcomp::checkpointable<gcomp::bernoulli_sparsifier<float>, gcomp::host_seq>);
static_assert(!gcomp::checkpointable<gcomp::random_contiguous_block<float>, gcomp::host_seq>);
static_assert(!gcomp::checkpointable<gcomp::hard_threshold<float>, gcomp::host_seq>);
static_assert(!gcomp::checkpointable<gcomp::sampled_topk<float>, gcomp::host_seq>);
static_assert(!gcomp::checkpointable<gcomp::qsgd<float>, gcomp::host_seq>);
static_assert(!gcomp::checkpointable<gcomp::terngrad<float>, gcomp::host_seq>);
static_assert(!gcomp::checkpointable<gcomp::natural<float>, gcomp::host_seq>);
static_assert(!gcomp::checkpointable<gcomp::sign<float>, gcomp::host_seq>);
static_assert(!gcomp::checkpointable<gcomp::onebit<float>, gcomp::host_seq>);
static_assert(!gcomp::checkpointable<gcomp::fp16_cast<float>, gcomp::host_seq>);
static_assert(!gcomp::checkpointable<gcomp::grid_round<float>, gcomp::host_seq>);
static_assert(!gcomp::checkpointable<gcomp::identity<float>, gcomp::host_seq>);

constexpr std::uint64_t seed = 77;
constexpr std::uint32_t worker = 3;
constexpr std::size_t header_bytes = 32;  // magic, version, flags, length, CRC-32, reserved

template <class T>
std::vector<T> gradient(std::size_t n, std::uint64_t t) {
  std::mt19937 gen(static_cast<unsigned>(1000 + t));
  std::normal_distribution<double> normal;
  std::vector<T> g(n);
  for (T& v : g) v = static_cast<T>(normal(gen));
  return g;
}

// Compresses the gradients of steps [from, to) and returns each step's
// message as it goes on the wire.
template <class C, class Policy>
std::vector<bytes> run(C& c, const Policy& policy, std::size_t n, std::uint64_t from,
                       std::uint64_t to) {
  using T = typename C::value_type;
  std::vector<bytes> sent;
  typename C::payload message;
  for (std::uint64_t t = from; t < to; ++t) {
    const auto g = gradient<T>(n, t);
    c.compress(policy, std::span<const T>(g), message, gcomp::rng_key{seed, t, worker});
    bytes wire;
    encode(message, wire);
    sent.push_back(std::move(wire));
  }
  return sent;
}

// 2N steps in one object equal N steps, a checkpoint, a load into a freshly
// made object and N more: the messages and the final state bitwise. Returns
// the 2N messages.
template <class Make, class Policy>
std::vector<bytes> check_resume(Make make, const Policy& policy, std::size_t n,
                                std::uint64_t steps) {
  auto whole = make();
  const auto expected = run(whole, policy, n, 0, 2 * steps);

  auto first = make();
  auto sent = run(first, policy, n, 0, steps);
  const bytes saved = gcomp::checkpoint_bytes(first);
  auto resumed = make();
  gcomp::load_checkpoint(gcomp::host_seq{}, std::span<const std::byte>(saved), resumed);
  CHECK(gcomp::checkpoint_bytes(resumed) == saved);  // a second save gives the same bytes
  const auto rest = run(resumed, policy, n, steps, 2 * steps);
  sent.insert(sent.end(), rest.begin(), rest.end());
  CHECK(sent == expected);
  CHECK(gcomp::checkpoint_bytes(resumed) == gcomp::checkpoint_bytes(whole));

  // The state matters: a fresh object without it sends other messages.
  auto restarted = make();
  const std::vector<bytes> tail(expected.begin() + static_cast<std::ptrdiff_t>(steps),
                                expected.end());
  CHECK(run(restarted, policy, n, steps, 2 * steps) != tail);
  return expected;
}

template <class Make>
void check_resume_on_host(Make make, std::size_t n, std::uint64_t steps) {
  const auto sequential = check_resume(make, gcomp::host_seq{}, n, steps);
  const auto threaded = check_resume(make, gcomp::host_par{3}, n, steps);
  CHECK(threaded == sequential);  // results do not depend on the thread count
}

// The checkpoint with its header's length and CRC-32 recomputed, so that a
// changed body reaches the parts instead of failing the checksum.
bytes reseal(bytes b) {
  const std::uint64_t length = b.size() - header_bytes;
  std::memcpy(b.data() + 16, &length, sizeof(length));
  const std::uint32_t crc =
      gcomp::detail::crc32(std::span<const std::byte>(b).subspan(header_bytes));
  std::memcpy(b.data() + 24, &crc, sizeof(crc));
  return b;
}

// The checkpoint with its first section's layout version set to `version`.
bytes with_version(bytes b, std::uint32_t version) {
  const auto name_length = std::to_integer<std::size_t>(b[header_bytes]);
  std::memcpy(b.data() + header_bytes + 1 + name_length, &version, sizeof(version));
  return reseal(std::move(b));
}

// Loads `b` straight into `part` (not through load_checkpoint, whose copies
// would hide a part that changes itself before failing) and returns the
// error's message, "" if it was accepted. The part must be unchanged.
template <class P>
std::string rejection(P& part, std::span<const std::byte> b) {
  const bytes before = gcomp::checkpoint_bytes(part);
  std::string message;
  try {
    gcomp::checkpoint_reader in(b);
    part.load(gcomp::host_seq{}, in);
  } catch (const gcomp::error& e) {
    message = e.what();
  }
  CHECK(gcomp::checkpoint_bytes(part) == before);
  return message;
}

ef_topk started_ef_topk(std::size_t n) {
  ef_topk ef(gcomp::topk<float>({.k = 2}));
  run(ef, gcomp::host_seq{}, n, 0, 2);
  return ef;
}

gcomp::layout matrices() {
  return gcomp::layout::from_layers(
      {{"w", 0, 12 * 10, {12, 10}}, {"bias", 120, 7, {}}, {"conv", 127, 4 * 3 * 5, {4, 3, 5}}});
}

}  // namespace

TEST_CASE("error_feedback resumes from a checkpoint bitwise") {
  check_resume_on_host([] { return ef_topk(gcomp::topk<float>({.k = 5})); }, 64, 4);
  check_resume_on_host(
      [] {
        return ef_topk_double(gcomp::topk<double>({.ratio = 0.1}, gcomp::layout{20, 30, 14}));
      },
      64, 3);
  // The key drives random-k: the resumed steps draw what the whole run drew.
  check_resume_on_host([] { return ef_randomk(ef_randomk::compressor_type({.k = 7})); }, 50, 3);
}

TEST_CASE("ef21 resumes from a checkpoint bitwise") {
  check_resume_on_host([] { return ef21_topk(gcomp::topk<float>({.k = 4})); }, 40, 4);
}

TEST_CASE(
    "powersgd's warm starts resume from a checkpoint bitwise, alone and under error_feedback") {
  const gcomp::layout lay = matrices();
  check_resume_on_host([&] { return gcomp::powersgd<float>({.rank = 2}, lay); }, lay.total_size(),
                       3);
  // The paper's setup: the residual and the nested warm starts.
  check_resume_on_host([&] { return ef_powersgd(gcomp::powersgd<float>({.rank = 1}, lay)); },
                       lay.total_size(), 3);
}

TEST_CASE("a chain saves and loads the state of its parts") {
  check_resume_on_host(
      [] {
        return ef_chain(ef_topk(gcomp::topk<float>({.k = 6})), gcomp::qsgd<float>({.levels = 3}));
      },
      48, 3);
  // A chain of stateless parts has nothing to save, like its parts.
  const gcomp::chain<gcomp::topk<float>, gcomp::qsgd<float>> plain(gcomp::topk<float>({.k = 3}),
                                                                   gcomp::qsgd<float>({}));
  CHECK(gcomp::checkpoint_bytes(plain) == gcomp::checkpoint_bytes());
  CHECK(gcomp::checkpoint_bytes(gcomp::topk<float>({.k = 3})) == gcomp::checkpoint_bytes());
}

TEST_CASE("a fresh wrapper takes the size of the checkpoint; a started one only its own") {
  const ef_topk eight = started_ef_topk(8);
  const bytes saved = gcomp::checkpoint_bytes(eight);
  ef_topk fresh(gcomp::topk<float>({.k = 2}));
  gcomp::load_checkpoint(gcomp::host_seq{}, std::span<const std::byte>(saved), fresh);
  REQUIRE(fresh.residual().size() == 8);
  CHECK(std::memcmp(fresh.residual().data(), eight.residual().data(), 8 * sizeof(float)) == 0);
  // Once loaded it is started: a gradient of another size is the usual error.
  std::vector<float> g(9, 1.0f);
  ef_topk::payload m;
  CHECK_THROWS_WITH_AS(fresh.compress(gcomp::host_seq{}, std::span<const float>(g), m, {}),
                       "gcomp::error_feedback::compress: gradient has size 9 but residual has "
                       "size 8; they must match",
                       gcomp::error);

  ef_topk nine = started_ef_topk(9);
  CHECK(rejection(nine, saved) ==
        "gcomp::checkpoint_reader (gcomp::error_feedback): field 'residual' holds 8 elements but "
        "this part expects 9 (a checkpoint of another model size?)");
}

TEST_CASE("every single-byte corruption and every truncation of a checkpoint is rejected") {
  const bytes saved = gcomp::checkpoint_bytes(started_ef_topk(5));
  ef_topk target = started_ef_topk(5);
  {
    bytes copy = saved;
    CHECK(rejection(target, copy).empty());  // the intact checkpoint loads
  }
  ef_topk other = started_ef_topk(5);
  run(other, gcomp::host_seq{}, 5, 7, 9);  // another state of the same size
  for (std::size_t at = 0; at < saved.size(); ++at) {
    // The reserved header word (bytes 28 to 31) is not read by
    // checkpoint_reader, so a change there is not detected (see the report).
    if (at >= 28 && at < 32) continue;
    for (unsigned value = 0; value < 256; ++value) {
      if (std::byte(value) == saved[at]) continue;
      bytes corrupt = saved;
      corrupt[at] = std::byte(value);
      const std::string message = rejection(other, corrupt);
      if (message.empty()) {
        CAPTURE(at);
        CAPTURE(value);
        FAIL_CHECK("a corrupt checkpoint was accepted");
      } else if (at >= header_bytes && message.find("checksum mismatch") == std::string::npos) {
        CAPTURE(at);
        CAPTURE(message);
        FAIL_CHECK("a changed body must fail the CRC-32");
      }
    }
  }
  for (std::size_t length = 0; length < saved.size(); ++length) {
    CAPTURE(length);
    const std::string message = rejection(other, std::span<const std::byte>(saved.data(), length));
    CHECK(message.find(length < header_bytes ? "bytes of header" : "truncated or padded") !=
          std::string::npos);
    // Truncated and resealed: the section structure itself must catch it.
    if (length >= header_bytes) {
      const bytes resealed =
          reseal(bytes(saved.begin(), saved.begin() + static_cast<std::ptrdiff_t>(length)));
      CHECK(rejection(other, resealed).find("gcomp::checkpoint_reader") == 0);
    }
  }
  CHECK(rejection(other, std::span<const std::byte>(saved.data(), 10)) ==
        "gcomp::checkpoint_reader: a checkpoint has at least 32 bytes of header, got 10");
}

TEST_CASE("a checkpoint of another element type, another part or a newer version is rejected") {
  ef_topk target = started_ef_topk(6);
  ef_topk_double as_double(gcomp::topk<double>({.k = 2}));
  run(as_double, gcomp::host_seq{}, 6, 0, 2);
  CHECK(rejection(target, gcomp::checkpoint_bytes(as_double)) ==
        "gcomp::checkpoint_reader (gcomp::error_feedback): field 'residual' holds floating point "
        "elements of 8 bytes, expected floating point of 4 bytes (another element type?)");
  // Fresh objects check element types too.
  ef_topk fresh(gcomp::topk<float>({.k = 2}));
  CHECK(rejection(fresh, gcomp::checkpoint_bytes(as_double)).find("of 8 bytes, expected") !=
        std::string::npos);

  ef21_topk ef21(gcomp::topk<float>({.k = 2}));
  run(ef21, gcomp::host_seq{}, 6, 0, 2);
  CHECK(rejection(target, gcomp::checkpoint_bytes(ef21)) ==
        "gcomp::checkpoint_reader::begin: expected the state of gcomp::error_feedback but the "
        "checkpoint holds gcomp::ef21 at byte 0 (a checkpoint of another pipeline or method?)");
  CHECK(
      rejection(ef21, gcomp::checkpoint_bytes(target))
          .find(
              "expected the state of gcomp::ef21 but the checkpoint holds gcomp::error_feedback") !=
      std::string::npos);

  CHECK(rejection(target, with_version(gcomp::checkpoint_bytes(target), 2)) ==
        "gcomp::checkpoint_reader::begin: gcomp::error_feedback state has layout version 2; this "
        "build reads versions 1 to 1");
  CHECK(rejection(target, with_version(gcomp::checkpoint_bytes(target), 0))
            .find("layout version 0") != std::string::npos);
}

TEST_CASE("powersgd rejects warm starts of another model, and error_feedback stays unchanged") {
  const gcomp::layout lay = matrices();
  gcomp::powersgd<float> rank2({.rank = 2}, lay);
  run(rank2, gcomp::host_seq{}, lay.total_size(), 0, 2);
  gcomp::powersgd<float> rank1({.rank = 1}, lay);
  CHECK(rejection(rank1, gcomp::checkpoint_bytes(rank2)) ==
        "gcomp::powersgd::load: warm_start[0] (layer 'w') holds 20 values but this powersgd "
        "expects 10 (cols 10 x rank 1) or none");
  const gcomp::layout two_layers =
      gcomp::layout::from_layers({{"w", 0, 12 * 10, {12, 10}}, {"bias", 120, 67, {}}});
  gcomp::powersgd<float> other(gcomp::powersgd_options{.rank = 2}, two_layers);
  CHECK(rejection(other, gcomp::checkpoint_bytes(rank2)) ==
        "gcomp::powersgd::load: the checkpoint holds warm starts for 3 blocks but this powersgd "
        "has 2 (one per layer; a checkpoint of another model?)");
  // A fresh powersgd's empty warm starts load into a started one: it draws Q afresh.
  gcomp::powersgd<float> restarted = rank2;
  gcomp::load_checkpoint(
      gcomp::host_seq{},
      std::span<const std::byte>(gcomp::checkpoint_bytes(gcomp::powersgd<float>({.rank = 2}, lay))),
      restarted);
  CHECK(restarted.warm_start(0).empty());

  // The residual fits, the nested warm starts do not: nothing changes.
  ef_powersgd outer2(gcomp::powersgd<float>({.rank = 2}, lay));
  run(outer2, gcomp::host_seq{}, lay.total_size(), 0, 2);
  ef_powersgd outer1(gcomp::powersgd<float>({.rank = 1}, lay));
  run(outer1, gcomp::host_seq{}, lay.total_size(), 0, 3);
  CHECK(rejection(outer1, gcomp::checkpoint_bytes(outer2)).find("gcomp::powersgd::load") == 0);
}
