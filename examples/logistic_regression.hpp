// The synthetic logistic-regression problem the examples train: each worker
// holds its own slice of one labelled data set.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <random>
#include <vector>

namespace example {

constexpr int workers = 4;
constexpr std::size_t features = 64, samples_per_worker = 2048, batch = 64;

struct shard {
  std::vector<float> x;  // samples_per_worker x features
  std::vector<float> y;  // labels in {0, 1}
};

// Each worker gets its own slice of one labelled data set.
inline shard make_shard(int rank, const std::vector<float>& truth) {
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
inline float loss_and_gradient(const shard& s, std::size_t first, std::size_t count,
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

}  // namespace example
