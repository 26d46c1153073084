// sgd, adam, adamw against torch::optim::SGD / Adam / AdamW over 100 steps, with masks and StepLR.
#include <doctest/doctest.h>
#include <torch/torch.h>
// Debian's LibTorch brings glog, whose CHECK replaces doctest's: this file
// spells doctest's checks DOCTEST_CHECK.

#include <algorithm>
#include <cmath>
#include <random>
#include <type_traits>
#include <vector>

#include "gcomp/optim/adam.hpp"
#include "gcomp/optim/schedule.hpp"
#include "gcomp/optim/sgd.hpp"

namespace {

template <class T>
constexpr torch::Dtype dtype_of = std::is_same_v<T, double> ? torch::kFloat64 : torch::kFloat32;

// One torch parameter tensor per layer (torch keeps optimizer state per
// tensor, which is our per-layer state). A masked-off layer gets an undefined
// .grad(): torch's optimizers skip such a tensor entirely, state and step
// count included, which is exactly gcomp's mask semantics.
template <class T>
std::vector<torch::Tensor> torch_params(const gcomp::layout& lay, const std::vector<T>& x) {
  std::vector<torch::Tensor> params;
  for (const auto& l : lay)
    params.push_back(
        torch::from_blob(const_cast<T*>(x.data() + l.offset), {std::int64_t(l.size)}, dtype_of<T>)
            .clone()
            .requires_grad_(true));
  return params;
}

// The parameters start as N(0, 1), so their scale is 1: `relative` divides
// the difference by max(|torch|, 1), the usual rtol-with-atol test, since
// float elements that pass near 0 carry an absolute rounding of a few ulps of
// 1 (seen: <= 5e-7) and a pure relative figure there measures only that.
// `strict` divides by max(|torch|, 1e-6), for double, where the sums agree to
// rounding.
struct outcome {
  double relative = 0;
  double strict = 0;
  std::size_t compared = 0;
};

/// Runs `steps` steps of our optimizer and torch's side by side from the same
/// parameters with the same random gradients, then compares the parameters.
/// `torch_step(t)` steps the torch optimizer (and its scheduler, if any).
template <class T, class Ours, class TorchStep>
outcome run_side_by_side(const gcomp::layout& lay, Ours& ours, std::vector<torch::Tensor>& tparams,
                         std::vector<T>& x, TorchStep torch_step,
                         const std::vector<std::vector<std::uint8_t>>& masks, int steps = 100,
                         unsigned seed = 1) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist;
  std::vector<T> g(lay.total_size());
  const gcomp::host_par pool(2);
  for (int t = 0; t < steps; ++t) {
    for (T& e : g) e = static_cast<T>(dist(gen));
    const auto& mask = masks[std::size_t(t) % masks.size()];
    if (t % 2 == 0)
      ours.step(gcomp::host_seq{}, lay, std::span<T>(x), std::span<const T>(g), mask);
    else
      ours.step(pool, lay, std::span<T>(x), std::span<const T>(g), mask);
    for (std::size_t d = 0; d < lay.num_layers(); ++d) {
      if (!mask.empty() && mask[d] == 0) {
        tparams[d].mutable_grad() = torch::Tensor();
        continue;
      }
      tparams[d].mutable_grad() =
          torch::from_blob(g.data() + lay[d].offset, {std::int64_t(lay[d].size)}, dtype_of<T>)
              .clone();
    }
    torch_step(t);
  }
  outcome out;
  for (std::size_t d = 0; d < lay.num_layers(); ++d) {
    const torch::Tensor p = tparams[d].detach().contiguous();
    const T* theirs = p.data_ptr<T>();
    for (std::size_t i = 0; i < lay[d].size; ++i) {
      const double a = double(x[lay[d].offset + i]), b = double(theirs[i]);
      out.relative = std::max(out.relative, std::abs(a - b) / std::max(std::abs(b), 1.0));
      out.strict = std::max(out.strict, std::abs(a - b) / std::max(std::abs(b), 1e-6));
      ++out.compared;
    }
  }
  return out;
}

/// The agreement every comparison asks for: relative 1e-5 (see outcome), and
/// for double also element by element without the floor.
template <class T>
void check_agreement(const outcome& r, std::size_t n) {
  INFO("relative " << r.relative << ", strict " << r.strict << ", " << sizeof(T) * 8
                   << "-bit floats");
  DOCTEST_CHECK(r.compared == n);
  DOCTEST_CHECK(r.relative <= 1e-5);
  if constexpr (std::is_same_v<T, double>) DOCTEST_CHECK(r.strict <= 1e-9);
}

const gcomp::layout layouts[] = {
    gcomp::layout{100000},
    gcomp::layout{{"conv.weight", 4608}, {"conv.bias", 16}, {"fc.weight", 40000}, {"fc.bias", 1}},
};
const std::vector<std::vector<std::uint8_t>> no_masks{{}};
// Cycles through partial masks (one all-off step included) for 4-layer layouts.
const std::vector<std::vector<std::uint8_t>> jointspar_masks{
    {1, 0, 1, 1}, {0, 1, 1, 0}, {}, {0, 0, 0, 0}, {1, 1, 0, 1}, {1, 0, 0, 0}, {0, 1, 0, 1}};

template <class T>
std::vector<T> initial_params(std::size_t n) {
  std::mt19937 gen(1234);
  std::normal_distribution<double> dist;
  std::vector<T> x(n);
  for (T& e : x) e = static_cast<T>(dist(gen));
  return x;
}

template <class T>
void check_sgd(const gcomp::sgd_options& o) {
  for (const auto& lay : layouts) {
    for (const auto* masks : {&no_masks, &jointspar_masks}) {
      if (masks == &jointspar_masks && lay.num_layers() != 4) continue;
      std::vector<T> x = initial_params<T>(lay.total_size());
      auto tparams = torch_params(lay, x);
      torch::optim::SGD theirs(tparams, torch::optim::SGDOptions(o.lr)
                                            .momentum(o.momentum)
                                            .dampening(o.dampening)
                                            .weight_decay(o.weight_decay)
                                            .nesterov(o.nesterov));
      gcomp::sgd<T> ours(o);
      const outcome r = run_side_by_side<T>(
          lay, ours, tparams, x, [&](int) { theirs.step(); }, *masks);
      INFO("layers " << lay.num_layers() << ", masked " << (masks != &no_masks));
      check_agreement<T>(r, lay.total_size());
    }
  }
}

template <class T, class Ours, class Options, class TorchOptimizer, class TorchOptions>
void check_adam_like(const Options& o, const TorchOptions& to) {
  for (const auto& lay : layouts) {
    for (const auto* masks : {&no_masks, &jointspar_masks}) {
      if (masks == &jointspar_masks && lay.num_layers() != 4) continue;
      std::vector<T> x = initial_params<T>(lay.total_size());
      auto tparams = torch_params(lay, x);
      TorchOptimizer theirs(tparams, to);
      Ours ours(o);
      const outcome r = run_side_by_side<T>(
          lay, ours, tparams, x, [&](int) { theirs.step(); }, *masks);
      INFO("layers " << lay.num_layers() << ", masked " << (masks != &no_masks));
      check_agreement<T>(r, lay.total_size());
    }
  }
}

template <class T>
void check_adam(const gcomp::adam_options& o) {
  check_adam_like<T, gcomp::adam<T>, gcomp::adam_options, torch::optim::Adam>(
      o, torch::optim::AdamOptions(o.lr)
             .betas(std::make_tuple(o.beta1, o.beta2))
             .eps(o.eps)
             .weight_decay(o.weight_decay)
             .amsgrad(o.amsgrad));
}

template <class T>
void check_adamw(const gcomp::adamw_options& o) {
  check_adam_like<T, gcomp::adamw<T>, gcomp::adamw_options, torch::optim::AdamW>(
      o, torch::optim::AdamWOptions(o.lr)
             .betas(std::make_tuple(o.beta1, o.beta2))
             .eps(o.eps)
             .weight_decay(o.weight_decay)
             .amsgrad(o.amsgrad));
}

const gcomp::sgd_options sgd_cases[] = {
    {.lr = 0.01},
    {.lr = 0.01, .weight_decay = 0.01},
    {.lr = 0.01, .momentum = 0.9},
    {.lr = 0.005, .momentum = 0.9, .dampening = 0.1, .weight_decay = 1e-3},
    {.lr = 0.005, .momentum = 0.8, .nesterov = true, .weight_decay = 2e-4},
};
const gcomp::adam_options adam_cases[] = {
    {},
    {.lr = 1e-2, .beta1 = 0.8, .beta2 = 0.99, .eps = 1e-6, .weight_decay = 0.01},
    {.amsgrad = true},
    {.lr = 3e-3, .beta1 = 0.5, .beta2 = 0.9, .eps = 1e-7, .weight_decay = 0.1, .amsgrad = true},
};
const gcomp::adamw_options adamw_cases[] = {
    {},
    {.lr = 1e-2, .beta1 = 0.8, .beta2 = 0.99, .eps = 1e-6, .weight_decay = 0.1},
    {.weight_decay = 0.0, .amsgrad = true},
    {.lr = 3e-3, .beta1 = 0.5, .beta2 = 0.9, .eps = 1e-7, .weight_decay = 0.05, .amsgrad = true},
};

}  // namespace

TEST_CASE("sgd matches torch::optim::SGD for every option (double and float)") {
  torch::set_num_threads(1);
  for (const auto& o : sgd_cases) {
    CAPTURE(o.momentum);
    CAPTURE(o.dampening);
    CAPTURE(o.nesterov);
    CAPTURE(o.weight_decay);
    check_sgd<double>(o);
    check_sgd<float>(o);
  }
}

TEST_CASE("adam matches torch::optim::Adam (double and float)") {
  torch::set_num_threads(1);
  for (const auto& o : adam_cases) {
    CAPTURE(o.lr);
    CAPTURE(o.weight_decay);
    CAPTURE(o.amsgrad);
    check_adam<double>(o);
    check_adam<float>(o);
  }
}

TEST_CASE("adamw matches torch::optim::AdamW (double and float)") {
  torch::set_num_threads(1);
  for (const auto& o : adamw_cases) {
    CAPTURE(o.lr);
    CAPTURE(o.weight_decay);
    CAPTURE(o.amsgrad);
    check_adamw<double>(o);
    check_adamw<float>(o);
  }
}

TEST_CASE("sgd and adam with a step schedule match torch with StepLR") {
  torch::set_num_threads(1);
  const gcomp::layout lay{{"w", 3000}, {"b", 10}};
  const auto schedule = gcomp::lr_schedule::step(0.05, 30, 0.3);
  {
    std::vector<double> x = initial_params<double>(lay.total_size());
    auto tparams = torch_params(lay, x);
    torch::optim::SGD theirs(tparams, torch::optim::SGDOptions(0.05).momentum(0.9));
    torch::optim::StepLR scheduler(theirs, 30, 0.3);
    // The C++ StepLR decays one call later than Python's, whose constructor
    // takes an initial step; this call makes it lr * gamma^floor(t / 30).
    scheduler.step();
    gcomp::sgd<double> ours({.momentum = 0.9}, schedule);
    const outcome r = run_side_by_side<double>(
        lay, ours, tparams, x,
        [&](int) {
          theirs.step();
          scheduler.step();
        },
        no_masks);
    check_agreement<double>(r, lay.total_size());
  }
  {
    std::vector<float> x = initial_params<float>(lay.total_size());
    auto tparams = torch_params(lay, x);
    torch::optim::Adam theirs(tparams, torch::optim::AdamOptions(0.05));
    torch::optim::StepLR scheduler(theirs, 30, 0.3);
    scheduler.step();
    gcomp::adam<float> ours({}, schedule);
    const outcome r = run_side_by_side<float>(
        lay, ours, tparams, x,
        [&](int) {
          theirs.step();
          scheduler.step();
        },
        no_masks);
    check_agreement<float>(r, lay.total_size());
  }
}
