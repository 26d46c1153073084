// The MPI adapter's dense all-reduce against a raw MPI_Allreduce of the same buffer, timed in the same run under mpirun.
//
// Run with several ranks, e.g.
//   mpirun -np 2 --oversubscribe build/bench/comm_bench
// Every rank runs every benchmark with a fixed iteration count (collectives
// must match); only rank 0 reports. Each iteration times one raw
// MPI_Allreduce(MPI_IN_PLACE, MPI_FLOAT, MPI_SUM) and one mpi_comm::allreduce_sum
// of equal buffers, alternating which goes first, each after a barrier; a
// collective's time is the slowest rank's, so the per-iteration times are
// maxima over ranks. Counter x_raw is the median of adapter / raw per
// iteration (1.00 = no overhead); raw_ms and gcomp_ms are mean times.
// Variants: native (the default options: arguments compared across ranks
// before each call), native_unchecked (check_across_ranks = false),
// rank_ordered (bitwise reproducible sums; informative, another algorithm).
#include <benchmark/benchmark.h>
#include <mpi.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "gcomp/comm/mpi.hpp"
#include "gcomp/exec/host.hpp"

namespace {

// Ranks other than 0 run the benchmarks silently.
class silent_reporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
  return v[v.size() / 2];
}

void allreduce_vs_raw(benchmark::State& state, gcomp::mpi_options options) {
  const auto n = static_cast<std::size_t>(state.range(0)) / sizeof(float);
  // One buffer for both, so that both see the same pages (huge or not) and
  // cache state. Zeros stay zeros however often they are summed: no
  // overflow, no denormals.
  std::vector<float> x(n, 0.0f);
  gcomp::mpi_comm comm(MPI_COMM_WORLD, options);
  auto run_raw = [&] {
    MPI_Allreduce(MPI_IN_PLACE, x.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  };
  auto run_ours = [&] { comm.allreduce_sum(gcomp::host_seq{}, std::span<float>(x)); };
  auto timed = [](auto&& f) {
    MPI_Barrier(MPI_COMM_WORLD);
    const double t0 = MPI_Wtime();
    f();
    return MPI_Wtime() - t0;
  };
  timed(run_raw);  // warm-up: pages touched, MPI's buffers set up
  timed(run_ours);

  std::vector<double> t_raw, t_ours;
  for (auto _ : state) {
    double r = 0, o = 0;
    if (t_raw.size() % 2 == 0) {
      r = timed(run_raw);
      o = timed(run_ours);
    } else {
      o = timed(run_ours);
      r = timed(run_raw);
    }
    t_raw.push_back(r);
    t_ours.push_back(o);
    state.SetIterationTime(o);
  }
  // Every rank ran the same fixed number of iterations.
  MPI_Allreduce(MPI_IN_PLACE, t_raw.data(), static_cast<int>(t_raw.size()), MPI_DOUBLE, MPI_MAX,
                MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, t_ours.data(), static_cast<int>(t_ours.size()), MPI_DOUBLE, MPI_MAX,
                MPI_COMM_WORLD);
  std::vector<double> ratios(t_raw.size());
  double sum_raw = 0, sum_ours = 0;
  for (std::size_t i = 0; i < ratios.size(); ++i) {
    ratios[i] = t_ours[i] / t_raw[i];
    sum_raw += t_raw[i];
    sum_ours += t_ours[i];
  }
  state.counters["x_raw"] = median(ratios);
  state.counters["raw_ms"] = 1e3 * sum_raw / double(t_raw.size());
  state.counters["gcomp_ms"] = 1e3 * sum_ours / double(t_ours.size());
  state.counters["ranks"] = comm.size();
  state.SetBytesProcessed(state.iterations() * state.range(0));
}

constexpr std::int64_t mib = 1 << 20;

void register_all() {
  struct variant {
    const char* name;
    gcomp::mpi_options options;
  };
  const variant variants[] = {
      {"native", {}},  // the default: arguments checked across ranks
      {"native_unchecked", {.check_across_ranks = false}},
      {"rank_ordered", {.summation = gcomp::mpi_summation::rank_ordered}},
  };
  for (const variant& v : variants) {
    for (std::int64_t bytes : {4 * mib, 64 * mib}) {
      benchmark::RegisterBenchmark((std::string("allreduce_vs_raw/") + v.name).c_str(),
                                   allreduce_vs_raw, v.options)
          ->Arg(bytes)
          ->Iterations(bytes == 4 * mib ? 200 : 30)  // fixed: every rank must make the same calls
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  gcomp::mpi_environment environment(argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {  // only rank 0 writes --benchmark_out's file
    int kept = 1;
    for (int i = 1; i < argc; ++i)
      if (!std::string_view(argv[i]).starts_with("--benchmark_out")) argv[kept++] = argv[i];
    argc = kept;
  }
  benchmark::Initialize(&argc, argv);
  register_all();
  if (rank == 0) {
    benchmark::RunSpecifiedBenchmarks();
  } else {
    silent_reporter display;
    benchmark::RunSpecifiedBenchmarks(&display);
  }
  benchmark::Shutdown();
  return 0;
}
