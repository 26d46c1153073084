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

// Every worker's slice, concatenated in rank order: worker m's rows are
// [m * samples_per_worker, (m + 1) * samples_per_worker). For methods that
// give workers each other's data (RI-SGD).
inline shard make_all(const std::vector<float>& truth) {
  shard all;
  for (int m = 0; m < workers; ++m) {
    const shard s = make_shard(m, truth);
    all.x.insert(all.x.end(), s.x.begin(), s.x.end());
    all.y.insert(all.y.end(), s.y.begin(), s.y.end());
  }
  return all;
}

// Mean logistic loss over the given rows and its gradient (weights first,
// then the bias); `row(k)` is the index of the k-th of `count` rows.
template <class Row>
float loss_and_gradient_of(const shard& s, std::size_t count, Row row, const float* params,
                           float* grad) {
  std::fill(grad, grad + features + 1, 0.0f);
  float loss = 0;
  for (std::size_t k = 0; k < count; ++k) {
    const std::size_t i = row(k);
    float logit = params[features];
    for (std::size_t j = 0; j < features; ++j) logit += s.x[i * features + j] * params[j];
    const float p = 1 / (1 + std::exp(-logit));
    loss += -(s.y[i] * std::log(p + 1e-7f) + (1 - s.y[i]) * std::log(1 - p + 1e-7f));
    for (std::size_t j = 0; j < features; ++j) grad[j] += (p - s.y[i]) * s.x[i * features + j];
    grad[features] += p - s.y[i];
  }
  for (std::size_t j = 0; j <= features; ++j) grad[j] /= float(count);
  return loss / float(count);
}

// Rows [first, first + count).
inline float loss_and_gradient(const shard& s, std::size_t first, std::size_t count,
                               const std::vector<float>& params, std::vector<float>& grad) {
  return loss_and_gradient_of(
      s, count, [first](std::size_t k) { return first + k; }, params.data(), grad.data());
}

}  // namespace example
