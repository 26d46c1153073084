// The trainer's methods: every --method is one worker-side object built from
// gcomp's parts, behind one small interface so the training loop is the same
// for all of them.
#pragma once

#include <gcomp/gcomp.hpp>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace fmnist {

inline constexpr std::string_view method_names[] = {
    "dense",      "topk-ef",   "randomk",   "qsgd", "terngrad", "sign-ef", "powersgd",
    "jointspar",  "jointspar-lars", "local-sgd", "ri-sgd", "stale", "lag", "sasg", "divcomm-adam"};

inline bool is_method(std::string_view name) {
  for (auto m : method_names)
    if (m == name) return true;
  return false;
}

/// What a method is built from; every field has the default the demo and
/// docs/results.md use (lr: 0 picks the method's own default, default_lr()).
struct method_config {
  std::string name = "dense";
  double lr = 0;
  double momentum = 0.9;
  std::uint64_t seed = 1;
  std::size_t batch = 32;       // per worker
  std::size_t train_size = 0;   // training images in all (RI-SGD's shards cover them)
  int workers = 1;
  int rank = 0;
  double topk_ratio = 0.01;     // topk-ef and sasg (per layer)
  double randomk_ratio = 0.25;  // randomk (shared, with error feedback)
  unsigned qsgd_levels = 7;     // s = 7: levels 0..7, 3 bits + sign
  std::size_t powersgd_rank = 2;
  double redundancy = 0.25;     // ri-sgd mu
  std::size_t period = 50;      // local-sgd / ri-sgd tau
  std::size_t history = 10;     // lag / sasg D
  std::size_t max_delay = 3;    // stale: delays uniform in [0, max_delay]
  double block = 1.0 / 64;      // divcomm-adam foreground fraction
  double budget = 0;            // jointspar s; 0: D / 2
  double p_min = 0.1;           // jointspar floor
};

/// The learning rate a method uses when --lr is not given.
inline double default_lr(std::string_view method) {
  if (method == "divcomm-adam") return 1e-3;
  if (method == "jointspar-lars") return 4.0;  // global rate; the trust ratio scales it per layer
  if (method == "lag" || method == "sasg" || method == "stale") return 0.1;  // no momentum
  // Error feedback delays what a coordinate loses; with momentum 0.9 the
  // delayed mass makes these two unstable at 0.05 (diverged in a smoke run).
  if (method == "randomk" || method == "sign-ef") return 0.01;
  // Inactive-layer scaling 1 / p (up to 1 / p_min) adds variance.
  if (method == "jointspar") return 0.02;
  return 0.05;
}

/// Computes the gradient of the current mini-batch at other parameters:
/// gradient_at(at, out). SASG's and LAG's rule and the stale server use it.
using gradient_fn = std::function<void(std::span<const float> at, std::span<float> out)>;

/// One worker's side of a method. The loop per step: rows() (an empty span
/// means the trainer's own sampler), begin_step() (a mask over the module
/// layers, empty = all), a backward pass if wants_gradient(), then step().
template <class Comm>
class method {
 public:
  virtual ~method() = default;
  virtual std::span<const std::size_t> rows() { return {}; }
  virtual gcomp::layer_mask begin_step() { return {}; }
  virtual bool wants_gradient() const { return true; }
  virtual void step(Comm& comm, std::span<float> params, std::span<const float> grads,
                    const gradient_fn& gradient_at) = 0;
  /// End of training (divisible Adam's one blocking call; local SGD's last average).
  virtual void finish(Comm&, std::span<float>) {}
  /// Messages this worker has sent so far (a skipped upload or a local step sends none).
  virtual std::uint64_t uploads() const = 0;
  /// Bytes of the foreground (critical path) traffic, when the method tells them apart.
  virtual std::uint64_t foreground_bytes(std::uint64_t all) const { return all; }
  /// A short method-specific line for the summary.
  virtual std::string note() const { return {}; }
};

namespace detail {

constexpr gcomp::host_seq seq{};

// compressor -> aggregator -> optimizer, one message per worker per step.
template <class Comm, class Pipeline>
class pipeline_method final : public method<Comm> {
 public:
  pipeline_method(Pipeline p, gcomp::layout lay) : p_(std::move(p)), lay_(std::move(lay)) {}
  void step(Comm& comm, std::span<float> params, std::span<const float> grads,
            const gradient_fn&) override {
    if (p_.step(seq, comm, lay_, params, grads)) ++uploads_;  // false: skipped (NaN/Inf)
  }
  std::uint64_t uploads() const override { return uploads_; }

 private:
  Pipeline p_;
  gcomp::layout lay_;
  std::uint64_t uploads_ = 0;
};

template <class Comm, class C, class A>
std::unique_ptr<method<Comm>> make_pipeline(C c, A a, const method_config& cfg,
                                             const gcomp::layout& lay) {
  gcomp::pipeline p{std::move(c), std::move(a),
                    gcomp::sgd<float>({.lr = cfg.lr, .momentum = cfg.momentum}), cfg.seed};
  return std::make_unique<pipeline_method<Comm, decltype(p)>>(std::move(p), lay);
}

template <class Comm, class O>
class jointspar_method final : public method<Comm> {
 public:
  jointspar_method(gcomp::jointspar<O> js, gcomp::layout modules)
      : js_(std::move(js)), modules_(std::move(modules)) {}
  gcomp::layer_mask begin_step() override { return js_.begin_step(); }
  void step(Comm& comm, std::span<float> params, std::span<const float> grads,
            const gradient_fn&) override {
    if (!js_.finish_step(seq, comm, modules_, params, grads)) return;  // skipped (NaN/Inf)
    active_ += js_.last_step().active_layers;
    ++uploads_;
  }
  std::uint64_t uploads() const override { return uploads_; }
  std::string note() const override {
    const double steps = double(std::max<std::uint64_t>(1, uploads_));
    return "mean active layers " + std::to_string(double(active_) / steps).substr(0, 4) + " of " +
           std::to_string(modules_.num_layers());
  }

 private:
  gcomp::jointspar<O> js_;
  gcomp::layout modules_;
  std::uint64_t uploads_ = 0, active_ = 0;
};

template <class Comm>
class ri_sgd_method final : public method<Comm> {
 public:
  ri_sgd_method(gcomp::ri_sgd<float> ri, gcomp::layout lay) : ri_(std::move(ri)), lay_(std::move(lay)) {}
  std::span<const std::size_t> rows() override { return ri_.batch(); }
  void step(Comm& comm, std::span<float> params, std::span<const float> grads,
            const gradient_fn&) override {
    ri_.step(seq, comm, lay_, params, grads);
  }
  std::uint64_t uploads() const override { return ri_.rounds(); }
  std::string note() const override { return std::to_string(ri_.rounds()) + " averaging rounds"; }

 private:
  gcomp::ri_sgd<float> ri_;
  gcomp::layout lay_;
};

template <class Comm, class Lazy>
class lazy_method final : public method<Comm> {
 public:
  explicit lazy_method(Lazy m) : m_(std::move(m)) {}
  void step(Comm& comm, std::span<float> params, std::span<const float> grads,
            const gradient_fn& gradient_at) override {
    m_.step(seq, comm, params, grads, gradient_at);
  }
  std::uint64_t uploads() const override { return m_.rule().uploads(); }
  std::string note() const override {
    return std::to_string(m_.rule().skips()) + " of " + std::to_string(m_.steps()) +
           " uploads skipped (worker 0)";
  }

 private:
  Lazy m_;
};

template <class Comm, class C>
class stale_method final : public method<Comm> {
 public:
  explicit stale_method(gcomp::stale_parameter_server<C> ps) : ps_(std::move(ps)) {}
  bool wants_gradient() const override { return false; }
  void step(Comm& comm, std::span<float> params, std::span<const float>,
            const gradient_fn& gradient_at) override {
    ps_.step(seq, comm, params,
             [&](std::span<const float> model, std::uint64_t, std::span<float> g) {
               gradient_at(model, g);
             });
  }
  std::uint64_t uploads() const override { return ps_.uploads(); }
  std::string note() const override {
    return "delays uniform in [0, " + std::to_string(ps_.effective_delay()) + "]";
  }

 private:
  gcomp::stale_parameter_server<C> ps_;
};

template <class Comm, class C>
class divcomm_method final : public method<Comm> {
 public:
  divcomm_method(gcomp::divcomm<float, C> d, gcomp::layout lay) : d_(std::move(d)), lay_(std::move(lay)) {}
  void step(Comm& comm, std::span<float> params, std::span<const float> grads,
            const gradient_fn&) override {
    if (d_.step(seq, comm, lay_, params, grads)) ++uploads_;  // false: skipped (NaN/Inf)
  }
  void finish(Comm& comm, std::span<float> params) override { d_.finish(seq, comm, params); }
  std::uint64_t uploads() const override { return uploads_; }
  std::uint64_t foreground_bytes(std::uint64_t) const override {
    return d_.foreground_stats().bytes_sent;
  }
  std::string note() const override {
    return "background bytes " + std::to_string(d_.background_stats().bytes_sent) + " (worker 0)";
  }

 private:
  gcomp::divcomm<float, C> d_;
  gcomp::layout lay_;
  std::uint64_t uploads_ = 0;
};

}  // namespace detail

/// Builds worker cfg.rank's side of method cfg.name. `tensors` has one layer
/// per parameter tensor (with shapes), `modules` one per module.
template <class Comm>
std::unique_ptr<method<Comm>> make_method(method_config cfg, const gcomp::layout& tensors,
                                          const gcomp::layout& modules) {
  using namespace gcomp;
  using detail::make_pipeline;
  const std::string& name = cfg.name;
  if (!is_method(name)) fail("--method", "unknown method '", name, "'");
  if (cfg.lr == 0) cfg.lr = default_lr(name);
  if (!(cfg.lr > 0)) fail("--lr", "must be > 0, got ", cfg.lr);

  if (name == "dense") return make_pipeline<Comm>(identity<float>{}, allreduce{}, cfg, tensors);
  if (name == "topk-ef")
    return make_pipeline<Comm>(
        error_feedback<topk<float>>(topk<float>({.ratio = cfg.topk_ratio}, tensors)), allgather{},
        cfg, tensors);
  if (name == "randomk")
    return make_pipeline<Comm>(
        error_feedback<randomk<float, key_use::shared, rescale::none>>(
            randomk<float, key_use::shared, rescale::none>({.ratio = cfg.randomk_ratio}, tensors)),
        allreduce{}, cfg, tensors);
  if (name == "qsgd")
    return make_pipeline<Comm>(qsgd<float>({.levels = cfg.qsgd_levels, .bucket = 512}), allgather{},
                               cfg, tensors);
  if (name == "terngrad")
    return make_pipeline<Comm>(terngrad<float>({.bucket = 512}), allgather{}, cfg, tensors);
  if (name == "sign-ef")
    return make_pipeline<Comm>(error_feedback<sign<float>>(sign<float>(tensors)), allgather{}, cfg,
                               tensors);
  if (name == "powersgd")
    return make_pipeline<Comm>(
        error_feedback<powersgd<float>>(powersgd<float>({.rank = cfg.powersgd_rank}, tensors)),
        allgather{}, cfg, tensors);

  const layer_sampler_options sampler{.budget = cfg.budget,
                                      .p_min = cfg.p_min,
                                      .rule = probability_rule::variance_optimal,
                                      .seed = cfg.seed};
  if (name == "jointspar")
    return std::make_unique<detail::jointspar_method<Comm, sgd<float>>>(
        jointspar_sgd<float>(modules.num_layers(),
                             sgd<float>({.lr = cfg.lr, .momentum = cfg.momentum}), sampler),
        modules);
  if (name == "jointspar-lars")
    return std::make_unique<detail::jointspar_method<Comm, lars<float>>>(
        jointspar_lars<float>(modules.num_layers(),
                              lars<float>({.lr = cfg.lr, .momentum = cfg.momentum}), sampler),
        modules);

  if (name == "local-sgd" || name == "ri-sgd") {
    const ri_sgd_options options{.redundancy = name == "ri-sgd" ? cfg.redundancy : 0.0,
                                 .period = cfg.period,
                                 .own_batch = cfg.batch,
                                 .optimizer = {.lr = cfg.lr, .momentum = cfg.momentum},
                                 .seed = cfg.seed};
    return std::make_unique<detail::ri_sgd_method<Comm>>(
        ri_sgd<float>(cfg.train_size, cfg.workers, cfg.rank, options), tensors);
  }

  const lazy_descent_options descent{.alpha = cfg.lr,
                                     .history = cfg.history,
                                     .reduction = lazy_reduction::mean,
                                     .seed = cfg.seed};
  if (name == "lag") return std::make_unique<detail::lazy_method<Comm, lag<float>>>(lag<float>(descent, tensors));
  if (name == "sasg")
    return std::make_unique<detail::lazy_method<Comm, sasg<float>>>(
        sasg<float>({.ratio = cfg.topk_ratio, .descent = descent}, tensors));

  if (name == "stale")
    return std::make_unique<detail::stale_method<Comm, qsgd<float>>>(stale_parameter_server(
        qsgd<float>({.levels = cfg.qsgd_levels, .bucket = 512}),
        {.gamma = cfg.lr / cfg.workers,
         .delay = {.max_delay = cfg.max_delay, .kind = delay_kind::uniform, .seed = cfg.seed},
         .seed = cfg.seed}));

  // divcomm-adam
  using block = random_contiguous_block<float, rescale::none>;
  return std::make_unique<detail::divcomm_method<Comm, block>>(
      divcomm<float, block>(block({.ratio = cfg.block}),
                            {.payload = background_payload::parameters, .delay = 2},
                            {.lr = cfg.lr}, cfg.seed),
      tensors);
}

}  // namespace fmnist
