// Shared by the reference optimizers of the Adam and LAMB tests: Adam's moment
// estimates in double, with each layer's own step count, and Gaussian inputs.
#pragma once

#include <cstddef>
#include <random>
#include <vector>

namespace gcomp::test {

// m = b1 m + (1 - b1) g and v = b2 v + (1 - b2) g^2 element by element, t the
// number of active steps of each layer (the exponent of its bias corrections).
struct adam_moments {
  double beta1 = 0.9, beta2 = 0.999;
  std::vector<double> m{}, v{};
  std::vector<int> t{};

  // Zero moments for n elements and `layers` layers on first use; true then.
  bool start(std::size_t n, std::size_t layers) {
    if (!m.empty()) return false;
    m.assign(n, 0.0);
    v.assign(n, 0.0);
    t.assign(layers, 0);
    return true;
  }
  // Counts an active step of layer d and returns its number, 1 for the first.
  int count_step(std::size_t d) { return ++t[d]; }
  void update(std::size_t i, double g) {
    m[i] = beta1 * m[i] + (1 - beta1) * g;
    v[i] = beta2 * v[i] + (1 - beta2) * g * g;
  }
};

// n independent N(0, scale^2) values.
inline std::vector<double> random_vector(std::size_t n, std::mt19937& gen, double scale = 1.0) {
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<double> v(n);
  for (double& x : v) x = dist(gen);
  return v;
}

}  // namespace gcomp::test
