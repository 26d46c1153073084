// quickstart: 4 in-process workers train a logistic-regression model on synthetic
// data with gcomp's pipeline (identity compressor -> all-reduce -> momentum SGD)
// and print the loss and the bytes each worker communicated.
#include <gcomp/gcomp.hpp>

#include "logistic_regression.hpp"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

using namespace example;


int main() {
  // The model: two named layers over one flat parameter buffer.
  const gcomp::layout layout{{"weight", features}, {"bias", 1}};

  std::vector<float> truth(features);
  std::mt19937 gen(7);
  for (float& t : truth) t = std::normal_distribution<float>(0.0f, 0.5f)(gen);

  gcomp::inproc_group group(workers);  // 4 workers = 4 threads in this process
  std::vector<float> losses(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    const shard data = make_shard(comm.rank(), truth);
    gcomp::pipeline pipeline{gcomp::identity<float>{},  // compressor: send gradients as they are
                             gcomp::allreduce{},        // aggregator: average over workers
                             gcomp::sgd<float>{{.lr = 0.5, .momentum = 0.9}}};
    std::vector<float> params(layout.total_size(), 0.0f), grad(layout.total_size());
    unsigned long long gradient_bytes = 0;  // what the pipeline sent, not the loss printouts

    for (int step = 0; step <= 200; ++step) {
      const std::size_t first = (std::size_t(step) * batch) % samples_per_worker;
      float loss = loss_and_gradient(data, first, batch, params, grad);
      const auto before = comm.stats().bytes_sent;
      pipeline.step(gcomp::host_seq{}, comm, layout, std::span<float>(params),
                    std::span<const float>(grad));
      gradient_bytes += comm.stats().bytes_sent - before;

      // Average the loss for the printout (a collective: every worker calls it).
      comm.allreduce_sum(gcomp::host_seq{}, std::span<float>(&loss, 1));
      if (comm.rank() == 0 && step % 25 == 0)
        std::printf("step %3d  loss %.4f  gradient bytes sent by worker 0: %llu\n", step,
                    loss / workers, gradient_bytes);
      losses[comm.rank()] = loss / workers;
    }
  });
  std::printf("final loss %.4f on each of %d workers\n", losses[0], workers);
  return losses[0] < 0.6f ? 0 : 1;
}
