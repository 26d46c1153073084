// compare_compressors: the quickstart's 4-worker logistic regression trained with several
// compressor pipelines; prints each one's final loss and the gradient bytes a worker sent.
#include <gcomp/gcomp.hpp>

#include <cstdio>
#include <random>
#include <vector>

#include "logistic_regression.hpp"

using namespace example;

namespace {

constexpr int steps = 300;

struct outcome {
  float loss = 0;
  unsigned long long bytes_per_step = 0;
};

// Trains with pipeline{make_compressor(), Aggregator{}, momentum SGD} and
// returns worker 0's final loss (averaged over workers) and bytes per step.
template <class Aggregator, class MakeCompressor>
outcome train(const std::vector<float>& truth, MakeCompressor make_compressor) {
  const gcomp::layout layout{{"weight", features}, {"bias", 1}};
  gcomp::inproc_group group(workers);
  outcome result;
  group.run([&](gcomp::inproc_comm& comm) {
    const shard data = make_shard(comm.rank(), truth);
    gcomp::pipeline pipeline{make_compressor(layout), Aggregator{},
                             gcomp::sgd<float>{{.lr = 0.5, .momentum = 0.9}}, /*seed=*/42};
    std::vector<float> params(layout.total_size(), 0.0f), grad(layout.total_size());
    unsigned long long sent = 0;
    for (int step = 0; step < steps; ++step) {
      const std::size_t first = (std::size_t(step) * batch) % samples_per_worker;
      float loss = loss_and_gradient(data, first, batch, params, grad);
      const auto before = comm.stats().bytes_sent;
      pipeline.step(gcomp::host_seq{}, comm, layout, std::span<float>(params),
                    std::span<const float>(grad));
      sent += comm.stats().bytes_sent - before;
      comm.allreduce_sum(gcomp::host_seq{}, std::span<float>(&loss, 1));
      if (comm.rank() == 0 && step == steps - 1) {
        result.loss = loss / workers;
        result.bytes_per_step = sent / steps;
      }
    }
  });
  return result;
}

}  // namespace

int main() {
  std::vector<float> truth(features);
  std::mt19937 gen(7);
  for (float& t : truth) t = std::normal_distribution<float>(0.0f, 0.5f)(gen);

  struct row {
    const char* name;
    outcome result;
  };
  using gcomp::error_feedback;
  const std::vector<row> rows = {
      {"identity + allreduce",
       train<gcomp::allreduce>(truth, [](const gcomp::layout&) { return gcomp::identity<float>{}; })},
      {"fp16 cast + allgather",
       train<gcomp::allgather>(truth, [](const gcomp::layout&) { return gcomp::fp16_cast<float>{}; })},
      {"top-k 10% + EF + allgather", train<gcomp::allgather>(truth, [](const gcomp::layout&) {
         return error_feedback<gcomp::topk<float>>(gcomp::topk<float>({.ratio = 0.1}));
       })},
      {"shared random-k 25% + EF + allreduce",
       train<gcomp::allreduce>(truth, [](const gcomp::layout&) {
         using C = gcomp::shared_randomk<float, gcomp::rescale::none>;
         return error_feedback<C>(C({.ratio = 0.25}));
       })},
      {"QSGD 4 bits + allgather", train<gcomp::allgather>(truth, [](const gcomp::layout&) {
         return gcomp::qsgd<float>({.levels = 7, .bucket = 64});
       })},
      {"TernGrad + allgather", train<gcomp::allgather>(truth, [](const gcomp::layout&) {
         return gcomp::terngrad<float>({.bucket = 64});
       })},
      {"scaled sign per layer + EF + allgather",
       train<gcomp::allgather>(truth, [](const gcomp::layout& lay) {
         return error_feedback<gcomp::sign<float>>(gcomp::sign<float>(lay));
       })},
  };

  std::printf("%-40s %10s %16s %10s\n", "pipeline", "final loss", "bytes/step/worker", "vs dense");
  const double dense = double(rows[0].result.bytes_per_step);
  bool all_learned = true;
  for (const auto& r : rows) {
    std::printf("%-40s %10.4f %16llu %9.1fx\n", r.name, r.result.loss, r.result.bytes_per_step,
                dense / double(r.result.bytes_per_step));
    all_learned = all_learned && r.result.loss < 0.6f;
  }
  return all_learned ? 0 : 1;
}
