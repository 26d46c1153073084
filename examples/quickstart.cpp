// quickstart: 4 in-process workers train a logistic-regression model on synthetic
// data with gcomp's pipeline (identity compressor -> all-reduce -> momentum SGD)
// and print the loss and the bytes each worker communicated.
#include <gcomp/gcomp.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace {

constexpr int workers = 4;
constexpr std::size_t features = 64, samples_per_worker = 2048, batch = 64;

struct shard {
  std::vector<float> x;  // samples_per_worker x features
  std::vector<float> y;  // labels in {0, 1}
};

// Each worker gets its own slice of one labelled data set.
shard make_shard(int rank, const std::vector<float>& truth) {
  std::mt19937 gen(1000 + rank);
  std::normal_distribution<float> normal;
  shard s;
  s.x.resize(samples_per_worker * features);
  s.y.resize(samples_per_worker);
  for (std::size_t i = 0; i < samples_per_worker; ++i) {
    float logit = 0;
    for (std::size_t j = 0; j < features; ++j) {
      s.x[i * features + j] = normal(gen);
      logit += s.x[i * features + j] * truth[j];
    }
    s.y[i] = std::uniform_real_distribution<float>()(gen) < 1 / (1 + std::exp(-logit)) ? 1.f : 0.f;
  }
  return s;
}

// Mean logistic loss over rows [first, first + count) and its gradient
// (weights first, then the bias).
float loss_and_gradient(const shard& s, std::size_t first, std::size_t count,
                        const std::vector<float>& params, std::vector<float>& grad) {
  std::fill(grad.begin(), grad.end(), 0.0f);
  float loss = 0;
  for (std::size_t i = first; i < first + count; ++i) {
    float logit = params[features];
    for (std::size_t j = 0; j < features; ++j) logit += s.x[i * features + j] * params[j];
    const float p = 1 / (1 + std::exp(-logit));
    loss += -(s.y[i] * std::log(p + 1e-7f) + (1 - s.y[i]) * std::log(1 - p + 1e-7f));
    for (std::size_t j = 0; j < features; ++j) grad[j] += (p - s.y[i]) * s.x[i * features + j];
    grad[features] += p - s.y[i];
  }
  for (float& g : grad) g /= float(count);
  return loss / float(count);
}

}  // namespace

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
