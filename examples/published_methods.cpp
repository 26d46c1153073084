// published_methods: the quickstart's 4-worker logistic regression trained with each of the
// published methods gcomp ships (JointSpar, RI-SGD, SASG, LAG, divisible Adam, stale
// compressed gradients) next to synchronous SGD; prints each one's final loss and traffic.
#include <gcomp/gcomp.hpp>

#include <cstdio>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "logistic_regression.hpp"

using namespace example;

namespace {

constexpr int steps = 300;
// Five layers over the 65 parameters, so JointSpar has layers to drop.
const gcomp::layout layout{{"w0", 16}, {"w1", 16}, {"w2", 16}, {"w3", 16}, {"bias", 1}};

struct outcome {
  std::string name;
  float loss = 0;                  // mean loss over every worker's whole slice, at the end
  double bytes_per_step = 0;       // bytes worker 0 sent per step
  std::string detail;              // what the method itself reports
};

// Every worker's loss on its whole slice, averaged over workers.
float final_loss(gcomp::inproc_comm& comm, const shard& data, const std::vector<float>& params) {
  std::vector<float> grad(params.size());
  float loss = loss_and_gradient(data, 0, samples_per_worker, params, grad);
  comm.allreduce_sum(gcomp::host_seq{}, std::span<float>(&loss, 1));
  return loss / workers;
}

// Runs `train(comm, data, params, result)` on 4 workers and fills loss and bytes.
template <class Train>
outcome run(std::string name, const std::vector<float>& truth, Train train) {
  outcome result;
  result.name = std::move(name);
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    const shard data = make_shard(comm.rank(), truth);
    std::vector<float> params(layout.total_size(), 0.0f);
    std::string detail;
    train(comm, data, params, detail);
    const auto sent = comm.stats().bytes_sent;
    const float loss = final_loss(comm, data, params);
    if (comm.rank() == 0) {
      result.loss = loss;
      result.bytes_per_step = double(sent) / steps;
      result.detail = detail;
    }
  });
  return result;
}

// Rows [first, first + batch) of this step's mini-batch in a worker's slice.
std::size_t first_row(int step) { return (std::size_t(step) * batch) % samples_per_worker; }

}  // namespace

int main() {
  std::vector<float> truth(features);
  std::mt19937 gen(7);
  for (float& t : truth) t = std::normal_distribution<float>(0.0f, 0.5f)(gen);
  const gcomp::host_seq seq;
  std::vector<outcome> rows;

  // Synchronous SGD: the reference every method is measured against.
  rows.push_back(run("synchronous SGD", truth, [&](auto& comm, const shard& data, auto& params,
                                                  std::string&) {
    gcomp::pipeline pipeline{gcomp::identity<float>{}, gcomp::allreduce{},
                             gcomp::sgd<float>{{.lr = 0.5, .momentum = 0.9}}};
    std::vector<float> grad(params.size());
    for (int t = 0; t < steps; ++t) {
      loss_and_gradient(data, first_row(t), batch, params, grad);
      pipeline.step(seq, comm, layout, std::span<float>(params), std::span<const float>(grad));
    }
  }));

  // JointSpar: the mask comes before the backward pass; only active layers travel.
  rows.push_back(run("JointSpar (s = 2.5 of 5 layers)", truth,
                     [&](auto& comm, const shard& data, auto& params, std::string& detail) {
    gcomp::jointspar_sgd<float> js(layout.num_layers(),
                                   gcomp::sgd<float>({.lr = 0.5, .momentum = 0.9}),
                                   {.p_min = 0.1, .rule = gcomp::probability_rule::variance_optimal,
                                    .seed = 42});
    std::vector<float> grad(params.size());
    double active = 0;
    for (int t = 0; t < steps; ++t) {
      const gcomp::layer_mask mask = js.begin_step();  // a real trainer skips inactive layers here
      (void)mask;
      loss_and_gradient(data, first_row(t), batch, params, grad);
      js.finish_step(seq, comm, layout, std::span<float>(params), std::span<const float>(grad));
      active += double(js.last_step().active_layers);
    }
    detail = "mean active layers " + std::to_string(active / steps).substr(0, 4);
  }));

  // RI-SGD: local momentum SGD on the own slice plus a quarter of the
  // neighbour's, parameters averaged every 10 steps; local SGD is mu = 0.
  for (double mu : {0.25, 0.0}) {
    const shard all = make_all(truth);
    rows.push_back(run(mu > 0 ? "RI-SGD (mu = 0.25, tau = 10)" : "local SGD (tau = 10)", truth,
                       [&](auto& comm, const shard&, auto& params, std::string& detail) {
      gcomp::ri_sgd_options options{.redundancy = mu, .period = 10, .own_batch = batch,
                                    .optimizer = {.lr = 0.5, .momentum = 0.9}, .seed = 42};
      gcomp::ri_sgd<float> ri(all.y.size(), comm.size(), comm.rank(), options);
      std::vector<float> grad(params.size());
      for (int t = 0; t < steps; ++t) {
        const auto rows_of_batch = ri.batch();
        loss_and_gradient_of(
            all, rows_of_batch.size(), [&](std::size_t k) { return rows_of_batch[k]; },
            params.data(), grad.data());
        ri.step(seq, comm, layout, std::span<float>(params), std::span<const float>(grad));
      }
      detail = std::to_string(ri.rounds()) + " averaging rounds";
    }));
  }

  // SASG and LAG: a worker uploads only when its gradient changed enough;
  // everyone reuses the last message of a worker that skipped.
  auto lazy_run = [&](auto& method, auto& comm, const shard& data, auto& params,
                      std::string& detail) {
    std::vector<float> grad(params.size());
    for (int t = 0; t < steps; ++t) {
      const std::size_t first = first_row(t);
      loss_and_gradient(data, first, batch, params, grad);
      method.step(seq, comm, std::span<float>(params), std::span<const float>(grad),
                  [&](std::span<const float> at, std::span<float> out) {
                    loss_and_gradient_of(
                        data, batch, [first](std::size_t k) { return first + k; }, at.data(),
                        out.data());
                  });
    }
    detail = std::to_string(method.aggregator().total_skips()) + " of " +
             std::to_string(steps * workers) + " uploads skipped";
  };
  rows.push_back(run("SASG (top-10% per layer + EF, lazy)", truth,
                     [&](auto& comm, const shard& data, auto& params, std::string& detail) {
    gcomp::sasg<float> method({.ratio = 0.1, .descent = {.alpha = 0.5, .history = 10,
                                                        .reduction = gcomp::lazy_reduction::mean}},
                              layout);
    lazy_run(method, comm, data, params, detail);
  }));
  rows.push_back(run("LAG (dense, lazy)", truth,
                     [&](auto& comm, const shard& data, auto& params, std::string& detail) {
    gcomp::lag<float> method({.alpha = 0.5, .history = 10, .reduction = gcomp::lazy_reduction::mean},
                             layout);
    lazy_run(method, comm, data, params, detail);
  }));

  // Divisible communication for Adam: a shared random block of 1/8 of the
  // gradient (with error feedback) in the foreground every step; the
  // parameters averaged in the background, never waited for.
  rows.push_back(run("divisible Adam (block 1/8 + background)", truth,
                     [&](auto& comm, const shard& data, auto& params, std::string& detail) {
    gcomp::divcomm<float> method(
        gcomp::random_contiguous_block<float, gcomp::rescale::none>({.ratio = 1.0 / 8}),
        {.payload = gcomp::background_payload::parameters, .delay = 2}, {.lr = 0.05},
        /*seed=*/42);
    std::vector<float> grad(params.size());
    for (int t = 0; t < steps; ++t) {
      loss_and_gradient(data, first_row(t), batch, params, grad);
      method.step(seq, comm, layout, std::span<float>(params), std::span<const float>(grad));
    }
    method.finish(seq, comm, std::span<float>(params));  // the one blocking call, at the end
    detail = "foreground " + std::to_string(method.foreground_stats().bytes_sent / steps) +
             " B/step, background " + std::to_string(method.background_stats().bytes_sent / steps) +
             " B/step";
  }));

  // Compressed gradients with staleness, parameter-server form: each worker's
  // QSGD message is computed at a model up to 3 steps old, and the
  // (replicated) server sums the last message of every worker.
  rows.push_back(run("stale QSGD server (delay <= 3)", truth,
                     [&](auto& comm, const shard& data, auto& params, std::string& detail) {
    gcomp::stale_parameter_server ps(
        gcomp::qsgd<float>({.levels = 7, .bucket = 64}),
        {.gamma = 0.5 / workers,
         .delay = {.max_delay = 3, .kind = gcomp::delay_kind::uniform, .seed = 1},
         .seed = 42});
    for (int t = 0; t < steps; ++t)
      ps.step(seq, comm, std::span<float>(params),
              [&](std::span<const float> model, std::uint64_t step, std::span<float> g) {
                const std::size_t first = first_row(int(step));
                loss_and_gradient_of(
                    data, batch, [first](std::size_t k) { return first + k; }, model.data(),
                    g.data());
              });
    detail = "effective delay " + std::to_string(ps.effective_delay());
  }));

  std::printf("%-40s %10s %12s  %s\n", "method", "final loss", "bytes/step", "reports");
  bool all_learned = true;
  for (const auto& r : rows) {
    std::printf("%-40s %10.4f %12.0f  %s\n", r.name.c_str(), r.loss, r.bytes_per_step,
                r.detail.c_str());
    all_learned = all_learned && r.loss < 0.6f;
  }
  return all_learned ? 0 : 1;
}
