// Optimizer steps on 2^24 floats against a STREAM-like pass over the same arrays and LibTorch.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "gcomp/optim/adam.hpp"
#include "gcomp/optim/lamb.hpp"
#include "gcomp/optim/lars.hpp"
#include "gcomp/optim/sgd.hpp"
#include "ratio.hpp"

#if defined(GCOMP_HAVE_TORCH)
#include <torch/torch.h>
#endif

namespace {

constexpr std::size_t n = std::size_t(1) << 24;

std::vector<float> normal_floats(std::size_t count, unsigned seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(count);
  for (float& x : v) x = dist(gen);
  return v;
}

// The references: one fused loop per step over as many arrays as the
// optimizer's update pass touches, with the same policy (so the same threads).
// Their own buffers, so the optimizer's data stays as it would be in training.
struct stream_arrays {
  std::vector<float> x = normal_floats(n, 11), g = normal_floats(n, 12),
                     m = std::vector<float>(n, 0.0f), v = std::vector<float>(n, 0.0f);
};

// Reads x, g, b; writes x, b (what momentum SGD and LARS's update pass touch).
template <class Policy>
void stream3(const Policy& policy, stream_arrays& a) {
  float* x = a.x.data();
  const float* g = a.g.data();
  float* b = a.m.data();
  gcomp::for_each_index(policy, n, [=](std::size_t i) {
    const float bi = 0.9f * b[i] + g[i];
    b[i] = bi;
    x[i] = x[i] - 1e-3f * bi;
  });
  benchmark::ClobberMemory();
}

// Reads x, g, m, v; writes x, m, v (what Adam, AdamW and LAMB's update pass touch).
template <class Policy>
void stream4(const Policy& policy, stream_arrays& a) {
  float* x = a.x.data();
  const float* g = a.g.data();
  float* m = a.m.data();
  float* v = a.v.data();
  gcomp::for_each_index(policy, n, [=](std::size_t i) {
    const float gi = g[i];
    const float mi = 0.9f * m[i] + gi;
    const float vi = 0.5f * v[i] + gi * gi;
    m[i] = mi;
    v[i] = vi;
    x[i] = x[i] - 1e-3f * (mi + vi);
  });
  benchmark::ClobberMemory();
}

const gcomp::layout one_layer{n};

template <class Optimizer, class Policy>
void against_stream(benchmark::State& state, Optimizer opt, const Policy& policy, int arrays) {
  stream_arrays reference;
  std::vector<float> x = normal_floats(n, 1, 0.05f), g = normal_floats(n, 2);
  auto step = [&] {
    opt.step(policy, one_layer, std::span<float>(x), std::span<const float>(g));
    benchmark::ClobberMemory();
  };
  step();  // the first step allocates the state; time the steady state
  if (arrays == 3)
    gcomp_bench::time_against(
        state, "stream", [&] { stream3(policy, reference); }, step);
  else
    gcomp_bench::time_against(
        state, "stream", [&] { stream4(policy, reference); }, step);
  state.SetBytesProcessed(state.iterations() * std::int64_t(n * sizeof(float)));
}

const gcomp::host_par two_threads(2);

const gcomp::sgd_options sgd_momentum{.lr = 1e-3, .momentum = 0.9, .weight_decay = 1e-4};
const gcomp::lars_options lars_default{.lr = 0.1,
                                       .momentum = 0.9,
                                       .weight_decay = 5e-4,
                                       .trust_coefficient = 1e-3,
                                       .exclude = nullptr};
const gcomp::lamb_options lamb_default{};

void sgd_vs_stream(benchmark::State& s) {
  if (s.range(0) == 1)
    against_stream(s, gcomp::sgd<float>(sgd_momentum), gcomp::host_seq{}, 3);
  else
    against_stream(s, gcomp::sgd<float>(sgd_momentum), two_threads, 3);
}
void lars_vs_stream(benchmark::State& s) {
  if (s.range(0) == 1)
    against_stream(s, gcomp::lars<float>(lars_default), gcomp::host_seq{}, 3);
  else
    against_stream(s, gcomp::lars<float>(lars_default), two_threads, 3);
}
void adam_vs_stream(benchmark::State& s) {
  if (s.range(0) == 1)
    against_stream(s, gcomp::adam<float>(), gcomp::host_seq{}, 4);
  else
    against_stream(s, gcomp::adam<float>(), two_threads, 4);
}
void adamw_vs_stream(benchmark::State& s) {
  if (s.range(0) == 1)
    against_stream(s, gcomp::adamw<float>(), gcomp::host_seq{}, 4);
  else
    against_stream(s, gcomp::adamw<float>(), two_threads, 4);
}
void lamb_vs_stream(benchmark::State& s) {
  if (s.range(0) == 1)
    against_stream(s, gcomp::lamb<float>(lamb_default), gcomp::host_seq{}, 4);
  else
    against_stream(s, gcomp::lamb<float>(lamb_default), two_threads, 4);
}

#if defined(GCOMP_HAVE_TORCH)

// LibTorch on the same sizes, with as many intra-op threads as our policy.
// SGD, Adam and AdamW are torch::optim's own steps; LibTorch has no LARS or
// LAMB, so those are the chains of tensor ops a user would write (their norms
// synchronize through .item(), as in Python implementations).
enum class torch_kind { sgd, adam, adamw, lars, lamb };

struct torch_side {
  torch::Tensor p, g, m, v;
  std::unique_ptr<torch::optim::Optimizer> opt;
  torch_kind kind;
  std::int64_t t = 0;

  explicit torch_side(torch_kind k) : kind(k) {
    p = torch::randn({std::int64_t(n)}) * 0.05;
    g = torch::randn({std::int64_t(n)});
    m = torch::zeros({std::int64_t(n)});
    v = torch::zeros({std::int64_t(n)});
    p.mutable_grad() = g.clone();
    std::vector<torch::Tensor> params{p};
    switch (k) {
      case torch_kind::sgd:
        opt = std::make_unique<torch::optim::SGD>(
            params, torch::optim::SGDOptions(sgd_momentum.lr).momentum(0.9).weight_decay(1e-4));
        break;
      case torch_kind::adam:
        opt = std::make_unique<torch::optim::Adam>(params, torch::optim::AdamOptions(1e-3));
        break;
      case torch_kind::adamw:
        opt = std::make_unique<torch::optim::AdamW>(params, torch::optim::AdamWOptions(1e-3));
        break;
      default:
        break;
    }
  }

  void step() {
    torch::NoGradGuard no_grad;
    if (opt) {
      opt->step();
      return;
    }
    ++t;
    if (kind == torch_kind::lars) {
      const double xn = p.norm().item<double>(), gn = g.norm().item<double>();
      const double wd = lars_default.weight_decay;
      const double ratio = lars_default.trust_coefficient * xn / (gn + wd * xn);
      m.mul_(0.9).add_(g.add(p, wd), lars_default.lr * ratio);
      p.sub_(m);
    } else {  // lamb
      const double b1 = lamb_default.beta1, b2 = lamb_default.beta2;
      m.mul_(b1).add_(g, 1 - b1);
      v.mul_(b2).addcmul_(g, g, 1 - b2);
      const double bc1 = 1 - std::pow(b1, double(t)), bc2 = 1 - std::pow(b2, double(t));
      torch::Tensor u = (m / bc1)
                            .div_((v / bc2).sqrt_().add_(lamb_default.eps))
                            .add_(p, lamb_default.weight_decay);
      const double ratio = p.norm().item<double>() / u.norm().item<double>();
      p.add_(u, -lamb_default.lr * ratio);
    }
  }
};

template <class Optimizer, class Policy>
void against_torch(benchmark::State& state, Optimizer opt, const Policy& policy, int threads,
                   torch_kind kind) {
  torch::set_num_threads(threads);
  torch_side theirs(kind);
  std::vector<float> x = normal_floats(n, 1, 0.05f), g = normal_floats(n, 2);
  auto step = [&] {
    opt.step(policy, one_layer, std::span<float>(x), std::span<const float>(g));
    benchmark::ClobberMemory();
  };
  step();
  theirs.step();  // both allocate their state outside the timing
  gcomp_bench::time_against(
      state, "torch", [&] { theirs.step(); }, step);
}

void sgd_vs_torch(benchmark::State& s) {
  if (s.range(0) == 1)
    against_torch(s, gcomp::sgd<float>(sgd_momentum), gcomp::host_seq{}, 1, torch_kind::sgd);
  else
    against_torch(s, gcomp::sgd<float>(sgd_momentum), two_threads, 2, torch_kind::sgd);
}
void adam_vs_torch(benchmark::State& s) {
  if (s.range(0) == 1)
    against_torch(s, gcomp::adam<float>(), gcomp::host_seq{}, 1, torch_kind::adam);
  else
    against_torch(s, gcomp::adam<float>(), two_threads, 2, torch_kind::adam);
}
void adamw_vs_torch(benchmark::State& s) {
  if (s.range(0) == 1)
    against_torch(s, gcomp::adamw<float>(), gcomp::host_seq{}, 1, torch_kind::adamw);
  else
    against_torch(s, gcomp::adamw<float>(), two_threads, 2, torch_kind::adamw);
}
void lars_vs_torch_ops(benchmark::State& s) {
  if (s.range(0) == 1)
    against_torch(s, gcomp::lars<float>(lars_default), gcomp::host_seq{}, 1, torch_kind::lars);
  else
    against_torch(s, gcomp::lars<float>(lars_default), two_threads, 2, torch_kind::lars);
}
void lamb_vs_torch_ops(benchmark::State& s) {
  if (s.range(0) == 1)
    against_torch(s, gcomp::lamb<float>(lamb_default), gcomp::host_seq{}, 1, torch_kind::lamb);
  else
    against_torch(s, gcomp::lamb<float>(lamb_default), two_threads, 2, torch_kind::lamb);
}

#endif

}  // namespace

// Argument: 1 = host_seq, 2 = host_par{2} (torch with 1 or 2 intra-op threads).
#define GCOMP_OPTIM_BENCH(fn) \
  BENCHMARK(fn)->Arg(1)->Arg(2)->UseManualTime()->Unit(benchmark::kMillisecond)

GCOMP_OPTIM_BENCH(sgd_vs_stream);
GCOMP_OPTIM_BENCH(lars_vs_stream);
GCOMP_OPTIM_BENCH(adam_vs_stream);
GCOMP_OPTIM_BENCH(adamw_vs_stream);
GCOMP_OPTIM_BENCH(lamb_vs_stream);
#if defined(GCOMP_HAVE_TORCH)
GCOMP_OPTIM_BENCH(sgd_vs_torch);
GCOMP_OPTIM_BENCH(adam_vs_torch);
GCOMP_OPTIM_BENCH(adamw_vs_torch);
GCOMP_OPTIM_BENCH(lars_vs_torch_ops);
GCOMP_OPTIM_BENCH(lamb_vs_torch_ops);
#endif

BENCHMARK_MAIN();
