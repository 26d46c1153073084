// checkpoint_resume: 4 in-process workers train logistic regression with top-k + error feedback
// and Adam; one worker's gradient turns NaN at one step (every worker skips it), every worker
// saves a checkpoint half-way, a fresh set of pipelines loads it and finishes the run, and the
// result is compared bit for bit with the run that was never interrupted.
#include <gcomp/gcomp.hpp>

#include "logistic_regression.hpp"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

using namespace example;

namespace {

constexpr int total_steps = 200, save_at = 100, nan_at = 60, nan_rank = 2;
const gcomp::layout layout{{"weight", features}, {"bias", 1}};

auto make_pipeline() {
  return gcomp::pipeline{
      gcomp::error_feedback<gcomp::topk<float>>(gcomp::topk<float>({.ratio = 0.1}, layout)),
      gcomp::allgather{}, gcomp::adam<float>{{.lr = 0.05}}, /*seed=*/3,
      gcomp::on_nonfinite::skip_step};  // the default, spelled out
}

std::filesystem::path checkpoint_path(int rank) {
  return std::filesystem::temp_directory_path() /
         ("gcomp_checkpoint_resume_rank" + std::to_string(rank) + ".bin");
}

// Trains steps [from, to) of `pipe` on this worker's data; returns the last loss.
template <class Pipeline>
float train(Pipeline& pipe, gcomp::inproc_comm& comm, const shard& data,
            std::vector<float>& params, int from, int to) {
  std::vector<float> grad(params.size());
  float loss = 0;
  for (int step = from; step < to; ++step) {
    const std::size_t first = (std::size_t(step) * batch) % samples_per_worker;
    loss = loss_and_gradient(data, first, batch, params, grad);
    if (step == nan_at && comm.rank() == nan_rank)
      grad[5] = std::numeric_limits<float>::quiet_NaN();  // an overflowing batch, say
    const bool stepped = pipe.step(gcomp::host_seq{}, comm, layout, std::span<float>(params),
                                   std::span<const float>(grad));
    if (!stepped && comm.rank() == 0)
      std::printf("step %d skipped on every worker (worker %d's gradient had a NaN)\n", step,
                  nan_rank);
  }
  return loss;
}

}  // namespace

int main() {
  std::vector<float> truth(features);
  std::mt19937 gen(7);
  for (float& t : truth) t = std::normal_distribution<float>(0.0f, 0.5f)(gen);

  gcomp::inproc_group group(workers);
  std::vector<std::vector<float>> straight(workers), resumed(workers);
  std::vector<float> losses(workers);
  int failures = 0;

  // 1. The uninterrupted run.
  group.run([&](gcomp::inproc_comm& comm) {
    const shard data = make_shard(comm.rank(), truth);
    auto pipe = make_pipeline();
    std::vector<float> params(layout.total_size(), 0.0f);
    losses[comm.rank()] = train(pipe, comm, data, params, 0, total_steps);
    straight[comm.rank()] = params;
  });

  // 2. The same run, saved half-way: each worker writes its own file.
  group.run([&](gcomp::inproc_comm& comm) {
    const shard data = make_shard(comm.rank(), truth);
    auto pipe = make_pipeline();
    std::vector<float> params(layout.total_size(), 0.0f);
    train(pipe, comm, data, params, 0, save_at);
    std::ofstream out(checkpoint_path(comm.rank()), std::ios::binary);
    gcomp::checkpoint_writer w;
    w.begin("example::params", 1);  // the model's parameters travel in the same file
    w.array("params", params);
    w.end();
    pipe.save(w);
    w.write(out);
  });

  // 3. A restart: fresh pipelines load the files and finish the run.
  group.run([&](gcomp::inproc_comm& comm) {
    const shard data = make_shard(comm.rank(), truth);
    auto pipe = make_pipeline();
    std::vector<float> params(layout.total_size());
    std::ifstream in(checkpoint_path(comm.rank()), std::ios::binary);
    gcomp::checkpoint_reader r(in);
    r.begin("example::params", 1);
    r.array("params", std::span<float>(params));
    r.end();
    pipe.load(gcomp::host_seq{}, r);
    r.finish();
    if (comm.rank() == 0)
      std::printf("resumed at step %llu with %llu skipped step(s) on record\n",
                  static_cast<unsigned long long>(pipe.steps()),
                  static_cast<unsigned long long>(pipe.skipped_steps()));
    train(pipe, comm, data, params, save_at, total_steps);
    resumed[comm.rank()] = params;
  });

  for (int m = 0; m < workers; ++m)
    if (std::memcmp(straight[m].data(), resumed[m].data(), straight[m].size() * sizeof(float)) != 0)
      ++failures;
  std::printf("resumed run equals the uninterrupted one bit for bit on %d of %d workers\n",
              workers - failures, workers);

  // 4. A damaged file is refused with a message, not loaded.
  {
    std::fstream f(checkpoint_path(0), std::ios::binary | std::ios::in | std::ios::out);
    f.seekg(100);
    const char c = static_cast<char>(f.get());
    f.seekp(100);
    f.put(static_cast<char>(c ^ 0x01));  // one flipped bit
  }
  try {
    std::ifstream in(checkpoint_path(0), std::ios::binary);
    gcomp::checkpoint_reader r(in);
    std::printf("a damaged checkpoint was accepted\n");
    ++failures;
  } catch (const gcomp::error& e) {
    std::printf("damaged checkpoint refused: %s\n", e.what());
  }
  for (int m = 0; m < workers; ++m) std::filesystem::remove(checkpoint_path(m));

  std::printf("final loss %.4f\n", losses[0]);
  return failures == 0 && losses[0] < 0.6f ? 0 : 1;
}
