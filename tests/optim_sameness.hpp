// Optimizer sameness: sgd, adam/adamw, lars and lamb stepped under a device policy equal host_seq bitwise; shared by tests/thrust and tests/cuda.
//
// The including test defines one TEST_CASE per optimizer that calls
// check_<name>_cases(policy). Parameters and gradients are put in the policy's
// memory with gcomp::policy_buffer, the optimizer's state is read back with
// gcomp::copy_to_host, and after every step parameters, state arrays, trust
// ratios and step counts must equal the host_seq run bit for bit: the kernels
// do the same float operations in the same order (the reductions follow
// exec/detail/reduce_order.hpp, and the CUDA build has --fmad=false), so any
// difference is a bug, not rounding.
#pragma once

#include <doctest/doctest.h>

#include <gcomp/core/checkpoint.hpp>
#include <gcomp/exec/buffer.hpp>
#include <gcomp/exec/host.hpp>
#include <gcomp/optim/adam.hpp>
#include <gcomp/optim/lamb.hpp>
#include <gcomp/optim/lars.hpp>
#include <gcomp/optim/sgd.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace gcomp_test::sameness {

// A zero-initialized layer (LARS/LAMB take ratio 1 for it), a one-element
// layer, a "bias" layer the exclude rules below pick, and layers around the
// 4096-element reduction block.
inline gcomp::layout test_layout() {
  return gcomp::layout{{"w1", 4097}, {"zero", 300}, {"one", 1}, {"bias", 7}, {"w2", 30000}};
}
inline constexpr std::size_t zero_layer = 1;

inline bool is_bias(const gcomp::layer& l) { return l.name == "bias"; }

// Mask sequences: every layer active, then patterns that switch layers off and
// back on, so per-layer step counts and "first step" flags diverge.
inline std::vector<std::vector<std::uint8_t>> mask_cycle(bool with_masks) {
  if (!with_masks) return {{}};
  return {{}, {1, 0, 1, 0, 1}, {0, 1, 1, 1, 0}, {}, {1, 1, 0, 1, 1}};
}

// Index of the first element whose bytes differ, or a.size() if all equal
// (sizes must match). Bytes, not ==, so -0.0 vs 0.0 and NaN payloads count.
template <class T>
std::size_t first_difference(const std::vector<T>& a, const std::vector<T>& b) {
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return i;
  return a.size();
}

template <class T>
void check_bitwise(const char* what, const std::vector<T>& host, const std::vector<T>& device) {
  const std::string name = what;
  CAPTURE(name);
  const std::size_t i = first_difference(host, device);
  if (i < host.size()) {
    CAPTURE(i);
    CAPTURE(host[i]);
    CAPTURE(device[i]);
    FAIL_CHECK("device differs from host_seq");
  } else {
    CHECK(i == host.size());
  }
}

template <class T, class Policy>
std::vector<T> read_back(const Policy& policy, std::span<const T> device) {
  std::vector<T> host(device.size());
  gcomp::copy_to_host(policy, device, std::span<T>(host));
  return host;
}

// The state arrays an optimizer exposes (momentum, moments), by name.
template <class O>
auto state_arrays(const O& o) {
  using T = typename O::value_type;
  std::vector<std::pair<const char*, std::span<const T>>> out;
  if constexpr (requires { o.momentum_buffer(); }) out.emplace_back("momentum", o.momentum_buffer());
  if constexpr (requires { o.exp_avg(); }) {
    out.emplace_back("exp_avg", o.exp_avg());
    out.emplace_back("exp_avg_sq", o.exp_avg_sq());
  }
  if constexpr (requires { o.max_exp_avg_sq(); })
    out.emplace_back("max_exp_avg_sq", o.max_exp_avg_sq());
  return out;
}

// Everything the host optimizer and the device one must agree on after a step.
template <class O, class Policy>
void check_same_state(const O& host, const O& device, const Policy& policy,
                      const gcomp::layout& lay) {
  using T = typename O::value_type;
  const auto host_arrays = state_arrays(host);
  const auto device_arrays = state_arrays(device);
  REQUIRE(host_arrays.size() == device_arrays.size());
  for (std::size_t k = 0; k < host_arrays.size(); ++k) {
    const std::span<const T> h = host_arrays[k].second;
    check_bitwise(host_arrays[k].first, std::vector<T>(h.begin(), h.end()),
                  read_back(policy, device_arrays[k].second));
  }
  if constexpr (requires { host.trust_ratios(); }) {
    // Host values under every policy (from reduce_per_layer's host out).
    const auto h = host.trust_ratios(), d = device.trust_ratios();
    check_bitwise("trust_ratios", std::vector<double>(h.begin(), h.end()),
                  std::vector<double>(d.begin(), d.end()));
  }
  if constexpr (requires { host.layer_steps(0); })
    for (std::size_t l = 0; l < lay.num_layers(); ++l) CHECK(host.layer_steps(l) == device.layer_steps(l));
  CHECK(host.steps() == device.steps());
}

// Data pointers of the state arrays: unchanged after the first step means no
// reallocation ("no allocation per step after the first").
template <class O>
std::vector<const void*> state_addresses(const O& o) {
  std::vector<const void*> out;
  for (const auto& array : state_arrays(o)) out.push_back(array.second.data());
  return out;
}

// Steps a copy of `prototype` under host_seq and another under `policy` over
// the same data for `steps` steps and checks, after each step, that
// parameters and state agree bitwise. Halfway, the device optimizer is copied,
// the original takes one extra step on other data, and the run continues on
// the copy: a shallow copy of the state would make it diverge. Once a cycle of
// masks has been seen, the policy's workspace (if it has one) must allocate
// nothing more.
template <class O, class Policy>
void check_same_as_host(const Policy& policy, const O& prototype, bool with_masks, int steps = 16) {
  using T = typename O::value_type;
  const gcomp::layout lay = test_layout();
  const std::size_t n = lay.total_size();
  std::mt19937 gen(1234);
  std::normal_distribution<double> normal;
  auto random_values = [&](double scale) {
    std::vector<T> v(n);
    for (T& e : v) e = static_cast<T>(scale * normal(gen));
    return v;
  };

  std::vector<T> x_host = random_values(1.0);
  for (std::size_t i = 0; i < lay[zero_layer].size; ++i) x_host[lay[zero_layer].offset + i] = T(0);
  gcomp::policy_buffer<T> x_device, g_device;
  x_device.assign_from_host(policy, std::span<const T>(x_host));

  O host = prototype;
  O device = prototype;
  const auto masks = mask_cycle(with_masks);
  std::vector<const void*> addresses;
  std::size_t workspace_allocations = 0;
  for (int step = 0; step < steps; ++step) {
    CAPTURE(step);
    std::vector<T> g = random_values(step % 5 == 3 ? 1e-6 : 1.0);  // tiny: eps matters
    if (step == 2)  // a layer without gradient: LARS's ratio-1 branch
      for (std::size_t i = 0; i < lay[0].size; ++i) g[lay[0].offset + i] = T(0);
    g_device.assign_from_host(policy, std::span<const T>(g));
    const gcomp::layer_mask mask(masks[static_cast<std::size_t>(step) % masks.size()]);

    if (step == steps / 2) {
      O copy = device;
      std::vector<T> other = random_values(1.0);
      gcomp::policy_buffer<T> x_other, g_other;
      x_other.assign_from_host(policy, std::span<const T>(other));
      g_other.assign_from_host(policy, std::span<const T>(other));
      device.step(policy, lay, x_other.span(), std::span<const T>(g_other.span()));
      device = std::move(copy);
    }
    host.step(gcomp::host_seq{}, lay, std::span<T>(x_host), std::span<const T>(g), mask);
    device.step(policy, lay, x_device.span(), std::span<const T>(g_device.span()), mask);

    check_bitwise("params", x_host, x_device.to_host());
    check_same_state(host, device, policy, lay);
    if (step == 0) addresses = state_addresses(device);
    else if (step < steps / 2) CHECK(state_addresses(device) == addresses);
    if constexpr (requires { policy.workspace->allocations(); }) {
      if (step + 1 == static_cast<int>(masks.size())) workspace_allocations = policy.workspace->allocations();
      else if (step + 1 > static_cast<int>(masks.size()))
        CHECK(policy.workspace->allocations() == workspace_allocations);
    }
  }
}

template <class Policy, class T>
void check_sgd_cases_for(const Policy& policy) {
  const gcomp::sgd_options cases[] = {
      {.lr = 0.1},
      {.lr = 0.05, .weight_decay = 0.01},
      {.lr = 0.05, .momentum = 0.9, .dampening = 0.1, .weight_decay = 1e-3},
      {.lr = 0.02, .momentum = 0.8, .nesterov = true, .weight_decay = 2e-4},
  };
  for (const auto& options : cases) {
    CAPTURE(options.momentum);
    CAPTURE(options.nesterov);
    check_same_as_host(policy, gcomp::sgd<T>(options), true);
  }
  // A schedule: the rate changes every step.
  check_same_as_host(policy, gcomp::sgd<T>({.momentum = 0.9}, gcomp::lr_schedule::cosine(0.1, 12)),
                     false);
}

template <class Policy>
void check_sgd_cases(const Policy& policy) {
  check_sgd_cases_for<Policy, float>(policy);
  check_sgd_cases_for<Policy, double>(policy);
}

template <class Policy, class T>
void check_adam_cases_for(const Policy& policy) {
  for (bool amsgrad : {false, true}) {
    CAPTURE(amsgrad);
    check_same_as_host(policy,
                       gcomp::adam<T>({.lr = 2e-3, .beta1 = 0.8, .beta2 = 0.99, .eps = 1e-7,
                                       .weight_decay = 1e-2, .amsgrad = amsgrad}),
                       true);
    check_same_as_host(policy,
                       gcomp::adamw<T>({.lr = 2e-3, .beta1 = 0.8, .beta2 = 0.99, .eps = 1e-7,
                                        .weight_decay = 5e-2, .amsgrad = amsgrad}),
                       true);
  }
  check_same_as_host(policy, gcomp::adam<T>({}, gcomp::lr_schedule::step(1e-2, 3, 0.5)), false);
}

template <class Policy>
void check_adam_cases(const Policy& policy) {
  check_adam_cases_for<Policy, float>(policy);
  check_adam_cases_for<Policy, double>(policy);
}

template <class Policy, class T>
void check_lars_cases_for(const Policy& policy) {
  check_same_as_host(policy, gcomp::lars<T>(gcomp::lars_options{}), true);
  check_same_as_host(policy, gcomp::lars<T>({.lr = 0.5, .exclude = is_bias}), true);
  check_same_as_host(policy, gcomp::lars<T>({.momentum = 0.0, .weight_decay = 1e-2}), true);
  // No mask: the norms come from one reduce_per_layer over all layers.
  check_same_as_host(policy, gcomp::lars<T>({.lr = 0.2, .exclude = is_bias}), false);
}

template <class Policy>
void check_lars_cases(const Policy& policy) {
  check_lars_cases_for<Policy, float>(policy);
  check_lars_cases_for<Policy, double>(policy);
}

template <class Policy, class T>
void check_lamb_cases_for(const Policy& policy) {
  check_same_as_host(policy, gcomp::lamb<T>(gcomp::lamb_options{}), true);
  check_same_as_host(policy, gcomp::lamb<T>({.lr = 1e-2, .exclude = is_bias}), true);
  check_same_as_host(policy,
                     gcomp::lamb<T>({.lr = 5e-3, .weight_decay = 0.0, .min_trust = 0.5,
                                     .max_trust = 20.0}),
                     false);
}

template <class Policy>
void check_lamb_cases(const Policy& policy) {
  check_lamb_cases_for<Policy, float>(policy);
  check_lamb_cases_for<Policy, double>(policy);
}

// State built under host_seq is host memory: a policy whose kernels cannot
// read it must be refused with a gcomp::error naming the step, before any
// parameter is touched. (Under a host-memory Thrust system it is accepted.)
template <class O, class Policy>
void check_refuses_foreign_state(const Policy& policy, O opt, const char* where) {
  using T = typename O::value_type;
  const gcomp::layout lay{8};
  std::vector<T> x(8, T(1)), g(8, T(1));
  opt.step(gcomp::host_seq{}, lay, std::span<T>(x), std::span<const T>(g));
  gcomp::policy_buffer<T> x_device, g_device;
  x_device.assign_from_host(policy, std::span<const T>(x));
  g_device.assign_from_host(policy, std::span<const T>(g));
  try {
    opt.step(policy, lay, x_device.span(), std::span<const T>(g_device.span()));
    FAIL("no gcomp::error for host state under a device policy");
  } catch (const gcomp::error& e) {
    const std::string message = e.what();
    CHECK(message.find(where) == 0);
    CHECK(message.find("host memory") != std::string::npos);
    CHECK(message.find("reset()") != std::string::npos);
  }
  CHECK(x_device.to_host() == x);
  // After reset() the state is rebuilt in the policy's memory.
  opt.reset();
  opt.step(policy, lay, x_device.span(), std::span<const T>(g_device.span()));
  CHECK(opt.steps() == 1);
}

// Checkpoints: 2N steps of one optimizer equal N steps, a checkpoint, a load
// under `policy` (so the state lands in its memory) into a fresh copy of
// `prototype` and N more steps, bitwise: parameters, every state array, step
// counts and trust ratios, and the checkpoint of the end state. A second save
// of the loaded optimizer gives the checkpoint's bytes, and a fresh optimizer
// that skips the load ends elsewhere (so the test sees the state).
template <class O, class Policy>
void check_resume_from_checkpoint(const Policy& policy, const O& prototype, int steps = 6) {
  using T = typename O::value_type;
  const gcomp::layout lay = test_layout();
  const std::size_t n = lay.total_size();
  std::mt19937 gen(4321);
  std::normal_distribution<double> normal;
  std::vector<T> x0(n);
  for (std::size_t i = 0; i < n; ++i)
    x0[i] = lay[zero_layer].offset <= i && i < lay[zero_layer].offset + lay[zero_layer].size
                ? T(0)
                : static_cast<T>(normal(gen));
  std::vector<std::vector<T>> grads(static_cast<std::size_t>(2 * steps), std::vector<T>(n));
  for (auto& g : grads)
    for (T& e : g) e = static_cast<T>(normal(gen));
  const auto masks = mask_cycle(true);
  auto run = [&](O& opt, gcomp::policy_buffer<T>& x, int from, int to) {
    gcomp::policy_buffer<T> g;
    for (int t = from; t < to; ++t) {
      const auto u = static_cast<std::size_t>(t);
      g.assign_from_host(policy, std::span<const T>(grads[u]));
      opt.step(policy, lay, x.span(), std::span<const T>(g.span()),
               gcomp::layer_mask(masks[u % masks.size()]));
    }
  };
  auto start = [&](std::span<const T> values) {
    gcomp::policy_buffer<T> x;
    x.assign_from_host(policy, values);
    return x;
  };

  O whole = prototype;
  auto x_whole = start(x0);
  run(whole, x_whole, 0, 2 * steps);

  O first = prototype;
  auto x = start(x0);
  run(first, x, 0, steps);
  const std::vector<std::byte> saved = gcomp::checkpoint_bytes(first);
  const std::vector<T> x_half = x.to_host();
  O resumed = prototype;
  gcomp::load_checkpoint(policy, std::span<const std::byte>(saved), resumed);
  CHECK(gcomp::checkpoint_bytes(resumed) == saved);
  run(resumed, x, steps, 2 * steps);

  check_bitwise("params after resuming", x_whole.to_host(), x.to_host());
  const auto whole_arrays = state_arrays(whole);
  const auto resumed_arrays = state_arrays(resumed);
  REQUIRE(whole_arrays.size() == resumed_arrays.size());
  for (std::size_t k = 0; k < whole_arrays.size(); ++k)
    check_bitwise(whole_arrays[k].first, read_back(policy, whole_arrays[k].second),
                  read_back(policy, resumed_arrays[k].second));
  if constexpr (requires { whole.trust_ratios(); }) {
    const auto w = whole.trust_ratios(), r = resumed.trust_ratios();
    check_bitwise("trust_ratios", std::vector<double>(w.begin(), w.end()),
                  std::vector<double>(r.begin(), r.end()));
  }
  if constexpr (requires { whole.layer_steps(0); })
    for (std::size_t l = 0; l < lay.num_layers(); ++l)
      CHECK(whole.layer_steps(l) == resumed.layer_steps(l));
  CHECK(whole.steps() == resumed.steps());
  CHECK(gcomp::checkpoint_bytes(resumed) == gcomp::checkpoint_bytes(whole));

  O restarted = prototype;
  auto x_restarted = start(x_half);
  run(restarted, x_restarted, steps, 2 * steps);
  CHECK(first_difference(x_whole.to_host(), x_restarted.to_host()) < n);
}

// Every optimizer with the state it can have: momentum or not, Nesterov,
// amsgrad, excluded layers, and schedules, so the step count is state too.
template <class Policy, class T>
void check_resume_cases_for(const Policy& policy) {
  check_resume_from_checkpoint(
      policy, gcomp::sgd<T>({.lr = 0.05, .momentum = 0.9, .dampening = 0.1, .weight_decay = 1e-3}));
  check_resume_from_checkpoint(policy, gcomp::sgd<T>({.momentum = 0.8, .nesterov = true},
                                                     gcomp::lr_schedule::cosine(0.1, 10)));
  // Without momentum the step count (the schedule's position) is all the state.
  check_resume_from_checkpoint(policy, gcomp::sgd<T>({}, gcomp::lr_schedule::step(0.1, 2, 0.5)));
  for (bool amsgrad : {false, true}) {
    CAPTURE(amsgrad);
    check_resume_from_checkpoint(
        policy, gcomp::adam<T>({.lr = 2e-3, .beta1 = 0.8, .beta2 = 0.99, .eps = 1e-7,
                                .weight_decay = 1e-2, .amsgrad = amsgrad}));
    const auto warmup = gcomp::lr_schedule::linear_warmup(3, gcomp::lr_schedule::constant(1e-2));
    check_resume_from_checkpoint(
        policy, gcomp::adamw<T>({.lr = 2e-3, .weight_decay = 5e-2, .amsgrad = amsgrad}, warmup));
  }
  check_resume_from_checkpoint(policy, gcomp::lars<T>(gcomp::lars_options{}));
  check_resume_from_checkpoint(
      policy, gcomp::lars<T>({.momentum = 0.0, .weight_decay = 1e-2, .exclude = is_bias},
                             gcomp::lr_schedule::step(0.1, 2, 0.5)));
  check_resume_from_checkpoint(policy, gcomp::lamb<T>(gcomp::lamb_options{}));
  check_resume_from_checkpoint(policy, gcomp::lamb<T>({.lr = 1e-2, .exclude = is_bias},
                                                      gcomp::lr_schedule::cosine(1e-2, 10)));
}

template <class Policy>
void check_resume_cases(const Policy& policy) {
  check_resume_cases_for<Policy, float>(policy);
  check_resume_cases_for<Policy, double>(policy);
}

}  // namespace gcomp_test::sameness
