// cuda_pipeline: one worker per visible GPU (up to 4; one is enough) trains a least-squares
// model on its own synthetic data with gcomp's pipeline under cuda_par over NCCL: top-k
// (1%) with error feedback -> allgather -> Adam. Parameters, gradients and the optimizer's
// state live on the GPU; the top-k messages cross to the host and back through NCCL.
// Prints the loss; exits 77 (skipped) without a GPU, 1 if the model did not learn.
#include <gcomp/comm/nccl.hpp>
#include <gcomp/exec/cuda.cuh>
#include <gcomp/gcomp.hpp>

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <span>
#include <thread>
#include <vector>

namespace {

constexpr std::size_t features = 2000;
constexpr std::size_t rows = 4096;   // per worker
constexpr std::size_t batch = 256;
constexpr int steps = 300;

// r[b] = x_b . w - y_b for the batch's rows (one thread per row).
struct residual_entry {
  const float* x;  // rows x features, row-major
  const float* y;
  const float* w;
  float* r;
  std::size_t first;
  GCOMP_HD void operator()(std::size_t b) const {
    const float* row = x + (first + b) * features;
    float s = 0.0f;
    for (std::size_t j = 0; j < features; ++j) s += row[j] * w[j];
    r[b] = s - y[first + b];
  }
};

// g[j] = (1 / batch) sum over the batch of x_bj r_b (one thread per feature).
struct gradient_entry {
  const float* x;
  const float* r;
  float* g;
  std::size_t first;
  GCOMP_HD void operator()(std::size_t j) const {
    float s = 0.0f;
    for (std::size_t b = 0; b < batch; ++b) s += x[(first + b) * features + j] * r[b];
    g[j] = s / static_cast<float>(batch);
  }
};

struct square_of {
  const float* r;
  GCOMP_HD double operator()(std::size_t b) const { return static_cast<double>(r[b]) * r[b]; }
};
struct plus {
  GCOMP_HD double operator()(double a, double b) const { return a + b; }
};

bool check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return true;
  std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(status));
  return false;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("cuda_pipeline: no CUDA device; skipped\n");
    return 77;
  }
  const int workers = std::min(devices, 4);
  std::vector<int> ids(static_cast<std::size_t>(workers));
  for (int d = 0; d < workers; ++d) ids[static_cast<std::size_t>(d)] = d;
  std::vector<ncclComm_t> nccl(static_cast<std::size_t>(workers));
  if (ncclCommInitAll(nccl.data(), workers, ids.data()) != ncclSuccess) {
    std::fprintf(stderr, "ncclCommInitAll failed\n");
    return 1;
  }
  // The same true weights everywhere; each worker its own rows.
  std::vector<float> truth(features);
  std::mt19937 gen(7);
  for (float& t : truth) t = std::normal_distribution<float>(0.0f, 1.0f)(gen);

  std::vector<double> first_loss(static_cast<std::size_t>(workers)), last_loss(first_loss);
  std::vector<std::thread> threads;
  for (int m = 0; m < workers; ++m) {
    threads.emplace_back([&, m] {
      const auto me = static_cast<std::size_t>(m);
      if (!check(cudaSetDevice(m), "cudaSetDevice")) return;
      cudaStream_t stream = nullptr;
      if (!check(cudaStreamCreate(&stream), "cudaStreamCreate")) return;
      {
        const gcomp::cuda_par policy{stream};
        gcomp::nccl_comm comm(nccl[me], stream);
        std::vector<float> x(rows * features), y(rows);
        std::mt19937 data(100 + static_cast<unsigned>(m));
        std::normal_distribution<float> normal(0.0f, 1.0f);
        for (float& v : x) v = normal(data) / 40.0f;
        for (std::size_t i = 0; i < rows; ++i) {
          double s = 0;
          for (std::size_t j = 0; j < features; ++j) s += double(x[i * features + j]) * truth[j];
          y[i] = static_cast<float>(s) + 0.01f * normal(data);
        }
        gcomp::policy_buffer<float> x_d, y_d, w, g, r;  // all on this worker's GPU
        x_d.assign_from_host(policy, std::span<const float>(x));
        y_d.assign_from_host(policy, std::span<const float>(y));
        w.assign(policy, features, 0.0f);
        g.assign(policy, features, 0.0f);
        r.assign(policy, batch, 0.0f);

        const gcomp::layout layout{{"weight", features}};
        gcomp::pipeline pipeline{
            gcomp::error_feedback<gcomp::topk<float>>(gcomp::topk<float>({.ratio = 0.01})),
            gcomp::allgather{}, gcomp::adam<float>{{.lr = 0.05}}};
        for (int step = 0; step <= steps; ++step) {
          const std::size_t first = (static_cast<std::size_t>(step) * batch) % rows;
          gcomp::for_each_index(policy, batch, residual_entry{x_d.data(), y_d.data(), w.data(), r.data(), first});
          gcomp::for_each_index(policy, features, gradient_entry{x_d.data(), r.data(), g.data(), first});
          const double loss = gcomp::transform_reduce(policy, batch, 0.0, plus{}, square_of{r.data()}) /
                              (2.0 * static_cast<double>(batch));
          if (step == 0) first_loss[me] = loss;
          last_loss[me] = loss;
          if (step == steps) break;
          pipeline.step(policy, comm, layout, w.span(), std::span<const float>(g.span()));
          if (m == 0 && step % 50 == 0)
            std::printf("step %3d  loss %.5f  bytes sent by worker 0 so far: %llu\n", step, loss,
                        static_cast<unsigned long long>(comm.stats().bytes_sent));
        }
      }
      cudaStreamDestroy(stream);
    });
  }
  for (std::thread& t : threads) t.join();
  for (ncclComm_t c : nccl) ncclCommDestroy(c);
  std::printf("%d worker(s): loss %.5f -> %.5f on worker 0\n", workers, first_loss[0], last_loss[0]);
  return last_loss[0] < 0.05 * first_loss[0] ? 0 : 1;
}
