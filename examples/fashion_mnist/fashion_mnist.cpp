// fashion_mnist: distributed training of an MLP or a small CNN on Fashion-MNIST
// with LibTorch doing forward and backward and gcomp doing everything between
// the workers: compression, aggregation and the optimizer step, for every
// method gcomp ships. Workers are threads in this process (--transport inproc,
// the default) or MPI ranks (started under mpirun). Each run writes a CSV of
// its progress and a one-row summary CSV; scripts/fashion_mnist_report.py turns
// a directory of them into a table and plots.
//
//   fashion_mnist --method topk-ef --workers 4 --epochs 3 --out results/
//   mpirun -n 4 fashion_mnist --method sasg
//
// Run with --help for every option.
#include <torch/torch.h>

#include <gcomp/gcomp.hpp>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#if GCOMP_HAVE_MPI
#include <gcomp/comm/mpi.hpp>
#endif

#include "idx.hpp"
#include "methods.hpp"
#include "model.hpp"
#include "network_model.hpp"
#include "progress.hpp"

namespace {

using clock_type = std::chrono::steady_clock;
double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

// ---------------------------------------------------------------------------
// Command line

struct options {
  fmnist::method_config method;
  std::string transport;  // "" = inproc unless started under mpirun
  std::string model = "mlp";
  std::size_t epochs = 2;
  std::string out = "fashion_mnist_out";
  std::string run;  // file stem; default: the method's name
  std::string link = "1gbit";
  std::string data = fmnist::default_dir;
  std::size_t train_subset = 0, test_subset = 0;  // 0: all
  std::size_t evals_per_epoch = 4;
  bool quiet = false;
};

void usage(std::FILE* out) {
  std::fprintf(out,
               "usage: fashion_mnist [options]\n"
               "  --method M        dense topk-ef randomk qsgd terngrad sign-ef powersgd jointspar\n"
               "                    jointspar-lars local-sgd ri-sgd stale lag sasg divcomm-adam\n"
               "                    (default dense)\n"
               "  --workers N       in-process workers (default 4; under mpirun: the world size)\n"
               "  --transport T     inproc | mpi (default inproc; mpi when started under mpirun)\n"
               "  --model M         mlp (784-256-128-10) | cnn (2 conv + 2 FC) (default mlp)\n"
               "  --epochs N        passes over the training set (default 2)\n"
               "  --batch N         mini-batch per worker (default 32)\n"
               "  --lr X            learning rate (default: the method's own, see methods.hpp)\n"
               "  --seed N          initialization, data order and compressor keys (default 1)\n"
               "  --out DIR         where <run>.csv and <run>.summary.csv go (default fashion_mnist_out)\n"
               "  --run NAME        file stem of this run (default: the method)\n"
               "  --link L          modeled network: 1gbit | 10gbit | 100gbit (default 1gbit)\n"
               "  --data DIR        the IDX files (default %s)\n"
               "  --train-subset N  use the first N training images of the shuffled set (default all)\n"
               "  --test-subset N   evaluate on the first N test images (default all 10000)\n"
               "  --evals N         test evaluations per epoch (default 4)\n"
               "  method knobs: --ratio X (top-k and SASG fraction, 0.01), --randomk-ratio X (0.25),\n"
               "    --levels S (QSGD, 7), --rank R (PowerSGD, 2), --redundancy MU (RI-SGD, 0.25),\n"
               "    --period TAU (local/RI-SGD, 50), --history D (LAG/SASG, 10), --max-delay T (stale, 3),\n"
               "    --block X (divcomm foreground fraction, 1/64), --budget S (JointSpar, D/2),\n"
               "    --p-min P (JointSpar, 0.1)\n"
               "  --quiet           no progress output, only the summary line\n",
               fmnist::default_dir);
}

template <class T>
T parse_number(std::string_view flag, std::string_view text) {
  T value{};
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc{} || end != text.data() + text.size())
    gcomp::fail(flag, "expected a number, got '", text, "'");
  return value;
}

std::size_t parse_count(std::string_view flag, std::string_view text, std::size_t min = 1) {
  if (!text.empty() && text[0] == '-') gcomp::fail(flag, "expected a count >= ", min, ", got '", text, "'");
  const auto v = parse_number<std::size_t>(flag, text);
  if (v < min) gcomp::fail(flag, "expected a count >= ", min, ", got '", text, "'");
  return v;
}

double parse_positive(std::string_view flag, std::string_view text) {
  const double v = parse_number<double>(flag, text);
  if (!(v > 0) || !std::isfinite(v)) gcomp::fail(flag, "expected a positive number, got '", text, "'");
  return v;
}

double parse_fraction(std::string_view flag, std::string_view text) {
  const double v = parse_positive(flag, text);
  if (v > 1) gcomp::fail(flag, "expected a fraction in (0, 1], got '", text, "'");
  return v;
}

options parse(int argc, char** argv) {
  options o;
  o.method.workers = 4;
  for (int i = 1; i < argc; ++i) {
    const std::string_view flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      usage(stdout);
      std::exit(0);
    }
    if (flag == "--quiet") {
      o.quiet = true;
      continue;
    }
    if (i + 1 >= argc) gcomp::fail(flag, "needs a value (see --help)");
    const std::string_view v = argv[++i];
    auto& m = o.method;
    if (flag == "--method") {
      if (!fmnist::is_method(v)) {
        std::string all;
        for (auto n : fmnist::method_names) all += std::string(all.empty() ? "" : ", ") + std::string(n);
        gcomp::fail("--method", "unknown method '", v, "' (expected one of: ", all, ")");
      }
      m.name = v;
    } else if (flag == "--workers") m.workers = int(parse_count(flag, v, 1));
    else if (flag == "--transport") {
      if (v != "inproc" && v != "mpi") gcomp::fail(flag, "expected inproc or mpi, got '", v, "'");
      o.transport = v;
    } else if (flag == "--model") { fmnist::parse_model(v); o.model = v; }
    else if (flag == "--epochs") o.epochs = parse_count(flag, v);
    else if (flag == "--batch") m.batch = parse_count(flag, v);
    else if (flag == "--lr") m.lr = parse_positive(flag, v);
    else if (flag == "--seed") m.seed = parse_count(flag, v, 0);
    else if (flag == "--out") o.out = v;
    else if (flag == "--run") o.run = v;
    else if (flag == "--link") { fmnist::parse_link(v); o.link = v; }
    else if (flag == "--data") o.data = v;
    else if (flag == "--train-subset") o.train_subset = parse_count(flag, v);
    else if (flag == "--test-subset") o.test_subset = parse_count(flag, v);
    else if (flag == "--evals") o.evals_per_epoch = parse_count(flag, v);
    else if (flag == "--ratio") m.topk_ratio = parse_fraction(flag, v);
    else if (flag == "--randomk-ratio") m.randomk_ratio = parse_fraction(flag, v);
    else if (flag == "--levels") m.qsgd_levels = unsigned(parse_count(flag, v));
    else if (flag == "--rank") m.powersgd_rank = parse_count(flag, v);
    else if (flag == "--redundancy") {
      m.redundancy = parse_number<double>(flag, v);
      if (!(m.redundancy >= 0)) gcomp::fail(flag, "expected mu >= 0, got '", v, "'");
    } else if (flag == "--period") m.period = parse_count(flag, v);
    else if (flag == "--history") m.history = parse_count(flag, v, 0);
    else if (flag == "--max-delay") m.max_delay = parse_count(flag, v, 0);
    else if (flag == "--block") m.block = parse_fraction(flag, v);
    else if (flag == "--budget") m.budget = parse_positive(flag, v);
    else if (flag == "--p-min") m.p_min = parse_fraction(flag, v);
    else gcomp::fail(flag, "unknown option (see --help)");
  }
  if (o.run.empty()) o.run = o.method.name;
  return o;
}

// ---------------------------------------------------------------------------
// Data: pixels scaled to [0, 1] and standardized; the training set shuffled
// once (by --seed) so that contiguous shards are i.i.d.

struct data {
  torch::Tensor train_x, train_y, test_x, test_y;
};

data load_data(const options& o) {
  const fmnist::dataset raw = fmnist::load(o.data);
  auto images = [](const fmnist::images& im, std::size_t keep) {
    auto t = torch::from_blob(const_cast<std::uint8_t*>(im.pixels.data()),
                              {std::int64_t(im.count), std::int64_t(im.rows * im.cols)}, torch::kUInt8)
                 .narrow(0, 0, std::int64_t(keep))
                 .to(torch::kFloat32)
                 .div_(255.0f);
    return t.sub_(0.2860f).div_(0.3530f);  // Fashion-MNIST's mean and standard deviation
  };
  auto labels = [](const fmnist::labels& l, std::size_t keep) {
    return torch::from_blob(const_cast<std::uint8_t*>(l.values.data()), {std::int64_t(l.values.size())},
                            torch::kUInt8)
        .narrow(0, 0, std::int64_t(keep))
        .to(torch::kInt64);
  };
  const std::size_t n_train = raw.train_images.count, n_test = raw.test_images.count;
  if (o.train_subset > n_train)
    gcomp::fail("--train-subset", "asks for ", o.train_subset, " images; the training set has ", n_train);
  if (o.test_subset > n_test)
    gcomp::fail("--test-subset", "asks for ", o.test_subset, " images; the test set has ", n_test);
  data d;
  std::vector<std::int64_t> order(n_train);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937_64(o.method.seed * 7919 + 17));
  order.resize(o.train_subset ? o.train_subset : n_train);
  const auto pick = torch::from_blob(order.data(), {std::int64_t(order.size())}, torch::kInt64).clone();
  d.train_x = images(raw.train_images, n_train).index_select(0, pick).contiguous();
  d.train_y = labels(raw.train_labels, n_train).index_select(0, pick).contiguous();
  d.test_x = images(raw.test_images, o.test_subset ? o.test_subset : n_test).contiguous();
  d.test_y = labels(raw.test_labels, o.test_subset ? o.test_subset : n_test).contiguous();
  return d;
}

double test_accuracy(fmnist::flat_model& model, const data& d) {
  torch::NoGradGuard no_grad;
  model.train(false);
  std::int64_t correct = 0;
  const std::int64_t n = d.test_x.size(0);
  for (std::int64_t at = 0; at < n; at += 2000) {
    const std::int64_t len = std::min<std::int64_t>(2000, n - at);
    const auto pred = model.forward(d.test_x.narrow(0, at, len)).argmax(1);
    correct += pred.eq(d.test_y.narrow(0, at, len)).sum().item<std::int64_t>();
  }
  model.train(true);
  return double(correct) / double(n);
}

// ---------------------------------------------------------------------------
// The numbers every worker adds up at an evaluation point. They travel outside
// gcomp's communicator, so the byte counts stay those of the method alone.

struct counters {
  double bytes_sent = 0, foreground_bytes = 0, uploads = 0, loss_sum = 0, loss_count = 0;
  static constexpr std::size_t n = 5;
  std::array<double, n> pack() const { return {bytes_sent, foreground_bytes, uploads, loss_sum, loss_count}; }
  static counters unpack(const std::array<double, n>& a) { return {a[0], a[1], a[2], a[3], a[4]}; }
};

class side_channel {
 public:
  virtual ~side_channel() = default;
  /// Every worker calls it at the same point; everyone gets the sum.
  virtual counters sum(const counters& mine) = 0;
};

// Threads: each worker writes its slot; two barriers keep a slot from being
// overwritten before everyone has read it. Workers reach it through
// inproc_rank_channel, which knows their rank.
class inproc_side_channel {
 public:
  explicit inproc_side_channel(int workers) : slots_(std::size_t(workers)), sync_(workers) {}
  counters sum_at(int rank, const counters& mine) {
    slots_[std::size_t(rank)] = mine.pack();
    sync_.arrive_and_wait();
    std::array<double, counters::n> total{};
    for (const auto& s : slots_)
      for (std::size_t i = 0; i < total.size(); ++i) total[i] += s[i];
    sync_.arrive_and_wait();
    return counters::unpack(total);
  }

 private:
  std::vector<std::array<double, counters::n>> slots_;
  std::barrier<> sync_;
};

struct inproc_rank_channel final : side_channel {
  inproc_rank_channel(inproc_side_channel& c, int r) : shared(c), rank(r) {}
  counters sum(const counters& mine) override { return shared.sum_at(rank, mine); }
  inproc_side_channel& shared;
  int rank;
};

#if GCOMP_HAVE_MPI
class mpi_side_channel final : public side_channel {
 public:
  mpi_side_channel() { MPI_Comm_dup(MPI_COMM_WORLD, &comm_); }
  ~mpi_side_channel() override { MPI_Comm_free(&comm_); }
  counters sum(const counters& mine) override {
    auto in = mine.pack();
    std::array<double, counters::n> out{};
    MPI_Allreduce(in.data(), out.data(), int(in.size()), MPI_DOUBLE, MPI_SUM, comm_);
    return counters::unpack(out);
  }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
};
#endif

// ---------------------------------------------------------------------------
// Output

struct run_result {
  double final_accuracy = 0, bytes_sent = 0, foreground_bytes = 0, uploads = 0;
  double backward_s = 0, compute_s = 0, modeled_s = 0, wall_s = 0;
  std::size_t steps = 0, parameters = 0;
  std::string note;
};

class csv_log {
 public:
  csv_log(const std::filesystem::path& file) : out_(file) {
    if (!out_) gcomp::fail("--out", "cannot write '", file.string(), "'");
    out_ << "step,epoch,wall_s,compute_s,backward_s,modeled_comm_s,bytes_sent,uploads,train_loss,"
            "test_accuracy\n";
  }
  void row(std::size_t step, double epoch, double wall, double compute, double backward, double modeled,
           double bytes, double uploads, double loss, double accuracy) {
    char line[512];
    std::snprintf(line, sizeof line, "%zu,%.4f,%.3f,%.3f,%.3f,%.4f,%.0f,%.0f,%.5f,%.4f\n", step, epoch,
                  wall, compute, backward, modeled, bytes, uploads, loss, accuracy);
    out_ << line;
    out_.flush();
  }

 private:
  std::ofstream out_;
};

// ---------------------------------------------------------------------------
// One worker's training loop. Rank 0 evaluates, logs and shows progress.

struct shared_setup {
  const options& opts;
  const data& d;
  fmnist::link link;
};

template <class Inner>
run_result train_worker(const shared_setup& s, Inner& inner, side_channel& channel,
                        fmnist::flat_model& model) {
  const options& o = s.opts;
  const data& d = s.d;
  const int rank = inner.rank(), workers = inner.size();
  fmnist::modeled_comm<Inner> comm(inner, s.link);

  fmnist::method_config cfg = o.method;
  cfg.rank = rank;
  cfg.workers = workers;
  cfg.train_size = std::size_t(d.train_x.size(0));
  const std::size_t shard = cfg.train_size / std::size_t(workers);
  const std::size_t steps_per_epoch = shard / cfg.batch;
  if (steps_per_epoch == 0)
    gcomp::fail("--batch", cfg.batch, " is larger than a worker's shard of ", shard, " images");
  auto method = fmnist::make_method<fmnist::modeled_comm<Inner>>(cfg, model.tensor_layout(),
                                                                 model.module_layout());
  const std::size_t total_steps = steps_per_epoch * o.epochs;
  const std::size_t eval_every = std::max<std::size_t>(1, steps_per_epoch / o.evals_per_epoch);

  std::unique_ptr<csv_log> log;
  std::unique_ptr<fmnist::progress> bar;
  if (rank == 0) {
    std::filesystem::create_directories(o.out);
    log = std::make_unique<csv_log>(std::filesystem::path(o.out) / (o.run + ".csv"));
    if (!o.quiet) bar = std::make_unique<fmnist::progress>(stdout, fmnist::is_terminal(stdout));
  }

  // This worker's own shard, visited in a new order every epoch.
  std::vector<std::int64_t> order(shard);
  std::iota(order.begin(), order.end(), std::int64_t(std::size_t(rank) * shard));
  std::vector<std::int64_t> rows(cfg.batch);

  double backward_s = 0, compute_s = 0, eval_s = 0;
  counters mine;
  double last_loss_sum = 0, last_loss_count = 0, accuracy = -1;
  double shown_loss_sum = 0, shown_loss_count = 0;
  torch::Tensor bx, by;
  std::vector<float> saved_params(model.size()), saved_grads(model.size());

  auto forward_backward = [&]() {
    const auto loss = torch::nn::functional::cross_entropy(model.forward(bx), by);
    const auto t_backward = clock_type::now();
    model.backward(loss);
    backward_s += seconds_since(t_backward);
    mine.loss_sum += loss.item<double>();
    mine.loss_count += 1;
  };
  // The current mini-batch's gradient at other parameters; the flat buffers
  // are put back afterwards (the method may still be reading `grads`).
  const fmnist::gradient_fn gradient_at = [&](std::span<const float> at, std::span<float> out) {
    auto params = model.params();
    auto grads = model.grads();
    std::copy(params.begin(), params.end(), saved_params.begin());
    std::copy(grads.begin(), grads.end(), saved_grads.begin());
    std::copy(at.begin(), at.end(), params.begin());
    forward_backward();
    std::copy(grads.begin(), grads.end(), out.begin());
    std::copy(saved_params.begin(), saved_params.end(), params.begin());
    std::copy(saved_grads.begin(), saved_grads.end(), grads.begin());
  };

  const auto start = clock_type::now();
  std::mt19937_64 shuffler(o.method.seed * 1000003 + std::uint64_t(rank));
  for (std::size_t step = 1; step <= total_steps; ++step) {
    const std::size_t in_epoch = (step - 1) % steps_per_epoch;
    if (in_epoch == 0) std::shuffle(order.begin(), order.end(), shuffler);
    const auto t_step = clock_type::now();
    const double comm_before = comm.measured_comm_seconds();

    const std::span<const std::size_t> method_rows = method->rows();
    if (method_rows.empty())
      std::copy_n(order.begin() + std::ptrdiff_t(in_epoch * cfg.batch), cfg.batch, rows.begin());
    else
      rows.assign(method_rows.begin(), method_rows.end());
    const auto idx = torch::from_blob(rows.data(), {std::int64_t(rows.size())}, torch::kInt64);
    bx = d.train_x.index_select(0, idx);
    by = d.train_y.index_select(0, idx);

    model.set_trainable(method->begin_step());
    if (method->wants_gradient()) forward_backward();
    method->step(comm, model.params(), model.grads(), gradient_at);
    if (step == total_steps) method->finish(comm, model.params());
    compute_s += seconds_since(t_step) - (comm.measured_comm_seconds() - comm_before);

    const bool eval = step % eval_every == 0 || step == total_steps;
    if (!eval) {
      if (bar && (step % 8 == 0))  // this worker's loss and bytes between evaluations
        bar->update({(step - 1) / steps_per_epoch + 1, o.epochs, in_epoch + 1, steps_per_epoch,
                     (mine.loss_sum - shown_loss_sum) / std::max(1.0, mine.loss_count - shown_loss_count),
                     accuracy, double(comm.stats().bytes_sent) * workers / 1e6,
                     seconds_since(start) - eval_s});
      continue;
    }
    mine.bytes_sent = double(comm.stats().bytes_sent);
    mine.foreground_bytes = double(method->foreground_bytes(comm.stats().bytes_sent));
    mine.uploads = double(method->uploads());
    const counters all = channel.sum(mine);
    shown_loss_sum = mine.loss_sum;
    shown_loss_count = mine.loss_count;
    if (rank != 0) continue;
    const auto t_eval = clock_type::now();
    accuracy = test_accuracy(model, d);
    eval_s += seconds_since(t_eval);
    const double loss = (all.loss_sum - last_loss_sum) / std::max(1.0, all.loss_count - last_loss_count);
    last_loss_sum = all.loss_sum;
    last_loss_count = all.loss_count;
    const double wall = seconds_since(start) - eval_s;
    log->row(step, double(step) / double(steps_per_epoch), wall, compute_s, backward_s,
             comm.modeled_seconds(), all.bytes_sent, all.uploads, loss, accuracy);
    const fmnist::status st{(step - 1) / steps_per_epoch + 1, o.epochs, in_epoch + 1, steps_per_epoch, loss,
                            accuracy, all.bytes_sent / 1e6, wall};
    if (bar) {
      if (in_epoch + 1 == steps_per_epoch)
        bar->end_epoch(st);
      else
        bar->update(st);
    }
    if (step == total_steps) {
      run_result r;
      r.final_accuracy = accuracy;
      r.bytes_sent = all.bytes_sent;
      r.foreground_bytes = all.foreground_bytes;
      r.uploads = all.uploads;
      r.backward_s = backward_s;
      r.compute_s = compute_s;
      r.modeled_s = comm.modeled_seconds();
      r.wall_s = wall;
      r.steps = total_steps;
      r.parameters = model.size();
      r.note = method->note();
      return r;
    }
  }
  return {};
}

void write_summary(const options& o, int workers, const std::string& transport, const run_result& r) {
  const auto file = std::filesystem::path(o.out) / (o.run + ".summary.csv");
  std::ofstream out(file);
  if (!out) gcomp::fail("--out", "cannot write '", file.string(), "'");
  const double lr = o.method.lr > 0 ? o.method.lr : fmnist::default_lr(o.method.name);
  out << "run,method,model,workers,transport,link,epochs,steps,batch,lr,seed,final_test_accuracy,"
         "bytes_sent,uploads,backward_s_per_step,compute_s,modeled_comm_s,wall_s,foreground_bytes,parameters,note\n";
  char line[1024];
  std::snprintf(line, sizeof line, "%s,%s,%s,%d,%s,%s,%zu,%zu,%zu,%g,%llu,%.4f,%.0f,%.0f,%.6f,%.3f,%.4f,%.3f,%.0f,%zu,",
                o.run.c_str(), o.method.name.c_str(), o.model.c_str(), workers, transport.c_str(),
                o.link.c_str(), o.epochs, r.steps, o.method.batch, lr,
                static_cast<unsigned long long>(o.method.seed), r.final_accuracy, r.bytes_sent, r.uploads,
                r.backward_s / double(std::max<std::size_t>(1, r.steps)), r.compute_s, r.modeled_s, r.wall_s,
                r.foreground_bytes, r.parameters);
  std::string note = r.note;
  std::replace(note.begin(), note.end(), ',', ';');
  out << line << note << "\n";
  std::printf("%s: test accuracy %.4f after %zu epochs (%zu steps, %d workers, %s); %.2f MB sent, %.0f uploads; "
              "backward %.2f ms/step, compute %.1f s, modeled comm %.2f s at %s (modeled); %s\n",
              o.run.c_str(), r.final_accuracy, o.epochs, r.steps, workers, transport.c_str(),
              r.bytes_sent / 1e6, r.uploads, 1e3 * r.backward_s / double(std::max<std::size_t>(1, r.steps)),
              r.compute_s, r.modeled_s, o.link.c_str(), r.note.c_str());
}

bool under_mpirun() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(v)) return true;
  return false;
}

int run_inproc(const options& o) {
  const data d = load_data(o);
  const int workers = o.method.workers;
  const shared_setup s{o, d, fmnist::parse_link(o.link)};
  // Replicas are built one at a time from the same seed (torch's generator is
  // global), so every worker starts from the same parameters.
  std::vector<std::unique_ptr<fmnist::flat_model>> models;
  for (int m = 0; m < workers; ++m)
    models.push_back(std::make_unique<fmnist::flat_model>(fmnist::parse_model(o.model), o.method.seed));
  inproc_side_channel channel(workers);
  run_result result;
  gcomp::inproc_group group(workers);
  group.run([&](gcomp::inproc_comm& comm) {
    inproc_rank_channel mine(channel, comm.rank());
    auto r = train_worker(s, comm, mine, *models[std::size_t(comm.rank())]);
    if (comm.rank() == 0) result = r;
  });
  write_summary(o, workers, "inproc", result);
  return 0;
}

#if GCOMP_HAVE_MPI
int run_mpi(const options& o, int& argc, char**& argv) {
  gcomp::mpi_environment env(argc, argv);
  gcomp::mpi_comm comm(MPI_COMM_WORLD, {.summation = gcomp::mpi_summation::rank_ordered});
  const data d = load_data(o);
  const shared_setup s{o, d, fmnist::parse_link(o.link)};
  fmnist::flat_model model(fmnist::parse_model(o.model), o.method.seed);
  mpi_side_channel channel;
  const run_result r = train_worker(s, comm, channel, model);
  if (comm.rank() == 0) write_summary(o, comm.size(), "mpi", r);
  return 0;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  try {
    options o = parse(argc, argv);
    torch::set_num_threads(1);  // the workers are the parallelism
    const bool mpi = o.transport == "mpi" || (o.transport.empty() && under_mpirun());
    if (mpi) {
#if GCOMP_HAVE_MPI
      return run_mpi(o, argc, argv);
#else
      gcomp::fail("--transport", "mpi: this build has no MPI (configure with libopenmpi-dev installed)");
#endif
    }
    return run_inproc(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fashion_mnist: %s\n", e.what());
    return 2;
  }
}
