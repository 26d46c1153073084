// Checkpoints of optimizers (sgd, adam, adamw, lars, lamb): 2N steps equal N, save, load into a fresh optimizer, N more, bitwise; corrupt and mismatched checkpoints are rejected with the optimizer unchanged.
#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "gcomp/core/checkpoint.hpp"
#include "gcomp/exec/host.hpp"
#include "gcomp/optim/adam.hpp"
#include "gcomp/optim/lamb.hpp"
#include "gcomp/optim/lars.hpp"
#include "gcomp/optim/sgd.hpp"
#include "optim_sameness.hpp"

namespace {

using bytes = std::vector<std::byte>;
constexpr std::size_t header_bytes = 32;  // magic, version, flags, length, CRC-32, reserved

static_assert(gcomp::checkpointable<gcomp::sgd<float>, gcomp::host_seq>);
static_assert(gcomp::checkpointable<gcomp::adam<double>, gcomp::host_par>);
static_assert(gcomp::checkpointable<gcomp::adamw<float>, gcomp::host_seq>);
static_assert(gcomp::checkpointable<gcomp::lars<float>, gcomp::host_seq>);
static_assert(gcomp::checkpointable<gcomp::lamb<float>, gcomp::host_seq>);

// `opt` after `steps` steps on `lay` (deterministic parameters and gradients,
// every other step with the last layer masked off).
template <class O>
O stepped(O opt, const gcomp::layout& lay, int steps = 2) {
  using T = typename O::value_type;
  const std::size_t n = lay.total_size();
  std::vector<T> x(n), g(n);
  for (std::size_t i = 0; i < n; ++i) x[i] = static_cast<T>(0.25 * double(i) - 1.0);
  std::vector<std::uint8_t> mask(lay.num_layers(), 1);
  mask.back() = 0;
  for (int t = 0; t < steps; ++t) {
    for (std::size_t i = 0; i < n; ++i)
      g[i] = static_cast<T>(double((i * 7 + std::size_t(t) * 3) % 5) - 2.0);
    opt.step(gcomp::host_seq{}, lay, std::span<T>(x), std::span<const T>(g),
             t % 2 == 1 ? gcomp::layer_mask(mask) : gcomp::layer_mask{});
  }
  return opt;
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

// Every single-byte change (all 255 other values at every position but the
// reserved header word, which checkpoint_reader does not read) and every
// truncation of `saved` must be rejected, leaving `target` unchanged.
template <class O>
void check_corruptions(O& target, const bytes& saved) {
  for (std::size_t at = 0; at < saved.size(); ++at) {
    if (at >= 28 && at < 32) continue;
    for (unsigned value = 0; value < 256; ++value) {
      if (std::byte(value) == saved[at]) continue;
      bytes corrupt = saved;
      corrupt[at] = std::byte(value);
      const std::string message = rejection(target, corrupt);
      if (message.empty() ||
          (at >= header_bytes && message.find("checksum mismatch") == std::string::npos)) {
        CAPTURE(at);
        CAPTURE(value);
        CAPTURE(message);
        FAIL_CHECK("a corrupt checkpoint was accepted, or a changed body passed the CRC-32");
      }
    }
  }
  for (std::size_t length = 0; length < saved.size(); ++length) {
    CAPTURE(length);
    CHECK(rejection(target, std::span<const std::byte>(saved.data(), length))
              .find(length < header_bytes ? "bytes of header" : "truncated or padded") !=
          std::string::npos);
    if (length >= header_bytes) {
      const bytes resealed =
          reseal(bytes(saved.begin(), saved.begin() + static_cast<std::ptrdiff_t>(length)));
      CHECK(rejection(target, resealed).find("gcomp::checkpoint_reader") == 0);
    }
  }
}

}  // namespace

TEST_CASE("optimizers resume from a checkpoint bitwise under host_seq and host_par") {
  gcomp_test::sameness::check_resume_cases(gcomp::host_seq{});
  gcomp_test::sameness::check_resume_cases(gcomp::host_par{3});
}

TEST_CASE(
    "every single-byte corruption and every truncation of an optimizer checkpoint is rejected") {
  const gcomp::layout lay{2, 3};
  {
    auto target = stepped(gcomp::sgd<float>({.momentum = 0.9}), lay, 3);
    const bytes saved = gcomp::checkpoint_bytes(stepped(gcomp::sgd<float>({.momentum = 0.9}), lay));
    check_corruptions(target, saved);
    // The intact checkpoint loads.
    gcomp::load_checkpoint(gcomp::host_seq{}, std::span<const std::byte>(saved), target);
    CHECK(gcomp::checkpoint_bytes(target) == saved);
  }
  {
    auto target = stepped(gcomp::adam<float>({.amsgrad = true}), lay, 3);
    check_corruptions(target,
                      gcomp::checkpoint_bytes(stepped(gcomp::adam<float>({.amsgrad = true}), lay)));
  }
  {
    auto target = stepped(gcomp::lars<float>(gcomp::lars_options{}), lay, 3);
    check_corruptions(
        target, gcomp::checkpoint_bytes(stepped(gcomp::lars<float>(gcomp::lars_options{}), lay)));
  }
  {
    auto target = stepped(gcomp::lamb<float>(gcomp::lamb_options{}), lay, 3);
    check_corruptions(
        target, gcomp::checkpoint_bytes(stepped(gcomp::lamb<float>(gcomp::lamb_options{}), lay)));
  }
}

TEST_CASE("a started optimizer rejects a checkpoint of another model size or layer count") {
  const gcomp::layout six{3, 3};
  auto sgd = stepped(gcomp::sgd<float>({.momentum = 0.9}), six);
  CHECK(rejection(sgd, gcomp::checkpoint_bytes(
                           stepped(gcomp::sgd<float>({.momentum = 0.9}), gcomp::layout{3, 4}))) ==
        "gcomp::checkpoint_reader (gcomp::sgd): field 'momentum' holds 7 elements but this part "
        "expects 6 (a checkpoint of another model size?)");
  CHECK(rejection(sgd, gcomp::checkpoint_bytes(
                           stepped(gcomp::sgd<float>({.momentum = 0.9}), gcomp::layout{6}))) ==
        "gcomp::checkpoint_reader (gcomp::sgd): field 'layer_started' holds 1 elements but this "
        "part expects 2 (a checkpoint of another model size?)");
  // A fresh optimizer's checkpoint has no state to fit: a started one refuses it too.
  CHECK(rejection(sgd, gcomp::checkpoint_bytes(gcomp::sgd<float>({.momentum = 0.9}))) ==
        "gcomp::checkpoint_reader (gcomp::sgd): field 'layer_started' holds 0 elements but this "
        "part expects 2 (a checkpoint of another model size?)");

  auto adam = stepped(gcomp::adam<float>(), six);
  CHECK(
      rejection(adam,
                gcomp::checkpoint_bytes(stepped(gcomp::adam<float>(), gcomp::layout{2, 2, 2}))) ==
      "gcomp::checkpoint_reader (gcomp::adam): field 'layer_steps' holds 3 elements but this part "
      "expects 2 (a checkpoint of another model size?)");
  auto adamw = stepped(gcomp::adamw<float>(), six);
  CHECK(rejection(adamw,
                  gcomp::checkpoint_bytes(stepped(gcomp::adamw<float>(), gcomp::layout{3, 5}))) ==
        "gcomp::checkpoint_reader (gcomp::adamw): field 'exp_avg' holds 8 elements but this part "
        "expects 6 (a checkpoint of another model size?)");

  auto lars = stepped(gcomp::lars<float>(gcomp::lars_options{}), six);
  CHECK(rejection(lars, gcomp::checkpoint_bytes(stepped(gcomp::lars<float>(gcomp::lars_options{}),
                                                        gcomp::layout{3, 4}))) ==
        "gcomp::lars::load: the checkpoint's state is for 7 parameters but this lars has state for "
        "6 (a checkpoint of another model size?)");
  CHECK(rejection(lars, gcomp::checkpoint_bytes(stepped(gcomp::lars<float>(gcomp::lars_options{}),
                                                        gcomp::layout{1, 2, 3}))) ==
        "gcomp::checkpoint_reader (gcomp::lars): field 'trust_ratios' holds 3 elements but this "
        "part expects 2 (a checkpoint of another model size?)");

  auto lamb = stepped(gcomp::lamb<float>(gcomp::lamb_options{}), six);
  CHECK(rejection(lamb, gcomp::checkpoint_bytes(stepped(gcomp::lamb<float>(gcomp::lamb_options{}),
                                                        gcomp::layout{2, 5}))) ==
        "gcomp::checkpoint_reader (gcomp::lamb): field 'exp_avg' holds 7 elements but this part "
        "expects 6 (a checkpoint of another model size?)");
}

TEST_CASE("a fresh optimizer takes the checkpoint's sizes, and its next step names a mismatch") {
  const auto saved =
      gcomp::checkpoint_bytes(stepped(gcomp::sgd<float>({.momentum = 0.9}), gcomp::layout{3, 4}));
  gcomp::sgd<float> fresh({.momentum = 0.9});
  gcomp::load_checkpoint(gcomp::host_seq{}, std::span<const std::byte>(saved), fresh);
  CHECK(fresh.steps() == 2);
  CHECK(fresh.momentum_buffer().size() == 7);
  std::vector<float> x(6, 1.0f), g(6, 1.0f);
  CHECK_THROWS_WITH_AS(fresh.step(gcomp::host_seq{}, gcomp::layout{3, 3}, std::span<float>(x),
                                  std::span<const float>(g)),
                       "gcomp::sgd::step: params has size 6 but the momentum buffer (call reset() "
                       "first) has size 7; "
                       "they must match",
                       gcomp::error);
  CHECK(x == std::vector<float>(6, 1.0f));
}

TEST_CASE(
    "a checkpoint of another element type, another optimizer or a newer version is rejected") {
  const gcomp::layout lay{3, 3};
  auto sgd = stepped(gcomp::sgd<float>({.momentum = 0.9}), lay);
  CHECK(
      rejection(sgd,
                gcomp::checkpoint_bytes(stepped(gcomp::sgd<double>({.momentum = 0.9}), lay))) ==
      "gcomp::checkpoint_reader (gcomp::sgd): field 'momentum' holds floating point elements of 8 "
      "bytes, expected floating point of 4 bytes (another element type?)");
  // Without momentum the (empty) momentum field still says its element type.
  gcomp::sgd<float> plain;
  CHECK(
      rejection(plain, gcomp::checkpoint_bytes(stepped(gcomp::sgd<double>(), lay))) ==
      "gcomp::checkpoint_reader (gcomp::sgd): field 'momentum' holds floating point elements of 8 "
      "bytes, expected floating point of 4 bytes (another element type?)");
  gcomp::adam<double> fresh_adam;
  CHECK(
      rejection(fresh_adam, gcomp::checkpoint_bytes(stepped(gcomp::adam<float>(), lay))) ==
      "gcomp::checkpoint_reader (gcomp::adam): field 'exp_avg' holds floating point elements of 4 "
      "bytes, expected floating point of 8 bytes (another element type?)");

  auto adam = stepped(gcomp::adam<float>(), lay);
  CHECK(
      rejection(adam, gcomp::checkpoint_bytes(sgd)) ==
      "gcomp::checkpoint_reader::begin: expected the state of gcomp::adam but the checkpoint holds "
      "gcomp::sgd at byte 0 (a checkpoint of another pipeline or method?)");
  auto adamw = stepped(gcomp::adamw<float>(), lay);
  CHECK(rejection(adamw, gcomp::checkpoint_bytes(adam)) ==
        "gcomp::checkpoint_reader::begin: expected the state of gcomp::adamw but the checkpoint "
        "holds gcomp::adam at byte 0 (a checkpoint of another pipeline or method?)");
  auto lars = stepped(gcomp::lars<float>(gcomp::lars_options{}), lay);
  auto lamb = stepped(gcomp::lamb<float>(gcomp::lamb_options{}), lay);
  CHECK(rejection(lars, gcomp::checkpoint_bytes(lamb))
            .find("expected the state of gcomp::lars but the checkpoint holds gcomp::lamb") !=
        std::string::npos);

  // A newer layout of the sgd section: version 2.
  bytes newer = gcomp::checkpoint_bytes(sgd);
  const std::uint32_t version = 2;
  std::memcpy(newer.data() + header_bytes + 1 + std::string("gcomp::sgd").size(), &version,
              sizeof(version));
  CHECK(rejection(sgd, reseal(newer)) ==
        "gcomp::checkpoint_reader::begin: gcomp::sgd state has layout version 2; this build reads "
        "versions 1 to 1");
}

TEST_CASE("state the optimizer's options could not use is rejected before any step reads it") {
  const gcomp::layout lay{3, 3};
  gcomp::adam<float> amsgrad({.amsgrad = true});
  CHECK(rejection(amsgrad, gcomp::checkpoint_bytes(stepped(gcomp::adam<float>(), lay))) ==
        "gcomp::adam::load: the checkpoint's max_exp_avg_sq holds 0 values but this optimizer has "
        "amsgrad and expects 6 (exp_avg's size; a checkpoint saved without amsgrad?)");
  gcomp::lars<float> with_momentum(gcomp::lars_options{});
  CHECK(rejection(with_momentum,
                  gcomp::checkpoint_bytes(stepped(gcomp::lars<float>({.momentum = 0.0}), lay))) ==
        "gcomp::lars::load: the checkpoint's momentum holds 0 values but its state is for 6 "
        "parameters and this lars has momentum 0.9 (a checkpoint saved with momentum 0?)");

  // Hand-made sections whose arrays disagree with each other.
  gcomp::checkpoint_writer lamb_out;
  lamb_out.begin("gcomp::lamb", 1);
  lamb_out.value("steps", std::uint64_t{1});
  lamb_out.array("layer_steps", std::vector<std::uint64_t>{1, 1});
  lamb_out.array("trust_ratios", std::vector<double>{1.0, 1.0, 1.0});
  lamb_out.array("exp_avg", std::vector<float>(6, 0.0f));
  lamb_out.array("exp_avg_sq", std::vector<float>(6, 0.0f));
  lamb_out.end();
  gcomp::lamb<float> lamb(gcomp::lamb_options{});
  CHECK(rejection(lamb, lamb_out.bytes()) ==
        "gcomp::lamb::load: trust_ratios of the checkpoint has size 3 but its layer_steps has size "
        "2; they must match");

  gcomp::checkpoint_writer adam_out;
  adam_out.begin("gcomp::adam", 1);
  adam_out.value("steps", std::uint64_t{1});
  adam_out.array("layer_steps", std::vector<std::uint64_t>{1, 1});
  adam_out.array("exp_avg", std::vector<float>(6, 0.0f));
  adam_out.array("exp_avg_sq", std::vector<float>(5, 0.0f));
  adam_out.array("max_exp_avg_sq", std::vector<float>{});
  adam_out.end();
  gcomp::adam<float> adam;
  CHECK(rejection(adam, adam_out.bytes()) ==
        "gcomp::adam::load: exp_avg_sq of the checkpoint has size 5 but its exp_avg has size 6; "
        "they must match");
  CHECK(adam.steps() == 0);
}
