// Data partitions with redundancy for RI-SGD (Haddadpour, Kamani, Mahdavi, Cadambe, "Trading
// Redundancy for Communication", ICML 2019): each worker's shard plus fractions of its neighbours'
// shards, a per-worker mini-batch sampler, and coverage after workers leave.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "gcomp/core/error.hpp"
#include "gcomp/core/random.hpp"

namespace gcomp {

/// Samples [begin, end) of a data set.
struct sample_range {
  std::size_t begin = 0;
  std::size_t end = 0;

  std::size_t size() const { return end - begin; }
  bool contains(std::size_t sample) const { return sample >= begin && sample < end; }
  friend bool operator==(const sample_range&, const sample_range&) = default;
};

/// One piece of a worker's local data: samples of shard `shard` (the whole
/// shard, or a prefix of it).
struct shard_part {
  int shard = 0;
  sample_range samples;
  friend bool operator==(const shard_part&, const shard_part&) = default;
};

/// The data plan of RI-SGD. n samples are split into M contiguous shards of
/// sizes differing by at most one (shard s comes before shard s + 1). Worker j
/// holds shard j and, with redundancy mu, mu * M shards' worth of its
/// neighbours' data: the whole shards (j + 1) mod M, ..., (j + w) mod M for
/// w = floor(mu * M), then the first floor(f * |shard|) samples of shard
/// (j + w + 1) mod M for the remaining fraction f = mu * M - w. Floors, so
/// that a fraction below one never holds a whole shard: then "every shard
/// survives the loss of any one worker" holds exactly when mu * M >= 1.
///
/// mu * M within 1e-9 of a whole number counts as that number, so that
/// mu = 0.3, M = 10 means three neighbours despite 0.3 * 10 = 2.9999... in
/// binary floating point.
///
/// Workers can be removed; the plan then says which shards still have every
/// sample held by some remaining worker.
class shard_plan {
 public:
  shard_plan(std::size_t samples, int workers, double redundancy)
      : samples_(samples), workers_(workers), redundancy_(redundancy) {
    constexpr std::string_view where = "gcomp::shard_plan";
    check_positive(where, "workers", workers);
    require(samples >= static_cast<std::size_t>(workers), where, "samples must be >= workers (",
            workers, ") so that no shard is empty, got ", samples);
    const double m = static_cast<double>(workers);
    const double extra = redundancy * m;
    // The tolerance lets mu = (M - 1) / M pass although (M - 1) / M * M may round above M - 1.
    require(std::isfinite(redundancy) && redundancy >= 0.0 && extra <= m - 1.0 + tolerance, where,
            "redundancy must be in [0, (workers - 1) / workers] = [0, ", (m - 1.0) / m, "], got ",
            redundancy);
    whole_ = std::min(static_cast<std::size_t>(std::floor(extra + tolerance)),
                      static_cast<std::size_t>(workers - 1));
    fraction_ = std::max(0.0, extra - static_cast<double>(whole_));
    if (whole_ == static_cast<std::size_t>(workers - 1) || fraction_ < tolerance) fraction_ = 0.0;

    const auto count = static_cast<std::size_t>(workers);
    part_begin_.reserve(count + 1);
    parts_.reserve(count * (whole_ + 2));
    for (int j = 0; j < workers; ++j) {
      part_begin_.push_back(parts_.size());
      parts_.push_back({j, shard(j)});
      for (std::size_t k = 1; k <= whole_; ++k) {
        const int s = neighbour(j, k);
        parts_.push_back({s, shard(s)});
      }
      if (fraction_ > 0.0) {
        const int s = neighbour(j, whole_ + 1);
        const sample_range full = shard(s);
        const std::size_t prefix = prefix_length(full.size());
        if (prefix > 0) parts_.push_back({s, {full.begin, full.begin + prefix}});
      }
    }
    part_begin_.push_back(parts_.size());
    active_.assign(count, 1);
  }

  std::size_t samples() const { return samples_; }
  /// M: the workers the plan was made for, removed ones included.
  int workers() const { return workers_; }
  double redundancy() const { return redundancy_; }
  /// floor(mu * M): the neighbour shards every worker holds whole.
  std::size_t whole_neighbours() const { return whole_; }
  /// mu * M - floor(mu * M): the fraction of one more neighbour shard held as a prefix.
  double partial_fraction() const { return fraction_; }

  /// The samples of shard s, which worker s owns.
  sample_range shard(int s) const {
    check_in_half_open("gcomp::shard_plan::shard", "shard", s, 0, workers_);
    const std::size_t m = static_cast<std::size_t>(workers_), i = static_cast<std::size_t>(s);
    const std::size_t base = samples_ / m, extra = samples_ % m;
    const std::size_t begin = i * base + std::min(i, extra);
    return {begin, begin + base + (i < extra ? 1 : 0)};
  }

  /// Worker j's local data: its own shard first, then the neighbours' parts
  /// in the order (j + 1) mod M, (j + 2) mod M, ...
  std::span<const shard_part> parts(int worker) const {
    check_worker("gcomp::shard_plan::parts", worker);
    const auto j = static_cast<std::size_t>(worker);
    return std::span<const shard_part>(parts_).subspan(part_begin_[j],
                                                       part_begin_[j + 1] - part_begin_[j]);
  }

  /// Samples worker j holds (own shard plus redundant parts).
  std::size_t local_samples(int worker) const {
    std::size_t total = 0;
    for (const shard_part& p : parts(worker)) total += p.samples.size();
    return total;
  }

  /// Samples worker j holds beyond its own shard.
  std::size_t extra_samples(int worker) const {
    return local_samples(worker) - shard(worker).size();
  }

  /// Whether worker j holds `sample` (removed or not).
  bool holds(int worker, std::size_t sample) const {
    for (const shard_part& p : parts(worker))
      if (p.samples.contains(sample)) return true;
    return false;
  }

  /// Takes worker j out of the plan (it failed or left). At least one
  /// worker must remain; a worker can be removed once.
  void remove(int worker) {
    constexpr std::string_view where = "gcomp::shard_plan::remove";
    check_worker(where, worker);
    require(active(worker), where, "worker ", worker, " was already removed");
    require(active_workers() > 1, where, "worker ", worker,
            " is the last one left; at least one worker must remain");
    active_[static_cast<std::size_t>(worker)] = 0;
  }

  bool active(int worker) const {
    check_worker("gcomp::shard_plan::active", worker);
    return active_[static_cast<std::size_t>(worker)] != 0;
  }

  int active_workers() const {
    return static_cast<int>(std::count(active_.begin(), active_.end(), std::uint8_t{1}));
  }

  /// The remaining workers in increasing order: worker survivors()[r] must be
  /// rank r of the survivors' communicator (e.g. MPI_Comm_split with the old
  /// rank as key).
  std::vector<int> survivors() const {
    std::vector<int> out;
    for (int j = 0; j < workers_; ++j)
      if (active_[static_cast<std::size_t>(j)] != 0) out.push_back(j);
    return out;
  }

  /// The rank of worker j among the survivors (it must be active).
  int survivor_rank(int worker) const {
    constexpr std::string_view where = "gcomp::shard_plan::survivor_rank";
    check_worker(where, worker);
    require(active(worker), where, "worker ", worker, " was removed and has no rank");
    return static_cast<int>(std::count(active_.begin(), active_.begin() + worker, std::uint8_t{1}));
  }

  /// Samples of shard s that no remaining worker holds. Every part of a shard
  /// is a prefix of it, so the held samples are the longest held prefix.
  std::size_t uncovered_samples(int s) const {
    const sample_range full = shard(s);
    std::size_t held = 0;
    for (int j = 0; j < workers_; ++j) {
      if (active_[static_cast<std::size_t>(j)] == 0) continue;
      for (const shard_part& p : parts(j))
        if (p.shard == s) held = std::max(held, p.samples.size());
    }
    return full.size() - held;
  }

  /// The shards with at least one sample no remaining worker holds.
  std::vector<int> uncovered_shards() const {
    std::vector<int> out;
    for (int s = 0; s < workers_; ++s)
      if (uncovered_samples(s) > 0) out.push_back(s);
    return out;
  }

  /// Whether every sample is still held by some remaining worker.
  bool covered() const {
    for (int s = 0; s < workers_; ++s)
      if (uncovered_samples(s) > 0) return false;
    return true;
  }

 private:
  static constexpr double tolerance = 1e-9;

  int neighbour(int j, std::size_t k) const {
    return static_cast<int>((static_cast<std::size_t>(j) + k) % static_cast<std::size_t>(workers_));
  }

  // floor(f * size) with the same tolerance as mu * M, and never the whole
  // shard (a fraction below one is not a whole shard).
  std::size_t prefix_length(std::size_t size) const {
    const double exact = fraction_ * static_cast<double>(size);
    const auto prefix =
        static_cast<std::size_t>(std::floor(exact + tolerance * std::max(1.0, exact)));
    return std::min(prefix, size - 1);
  }

  void check_worker(std::string_view where, int worker) const {
    check_in_half_open(where, "worker", worker, 0, workers_);
  }

  std::size_t samples_;
  int workers_;
  double redundancy_;
  std::size_t whole_ = 0;
  double fraction_ = 0.0;
  std::vector<shard_part> parts_;  // every worker's parts, worker by worker
  std::vector<std::size_t>
      part_begin_;  // worker j's parts are [part_begin_[j], part_begin_[j + 1])
  std::vector<std::uint8_t> active_;
};

/// Worker j's mini-batches under a shard_plan. A step draws own_batch samples
/// (B / M) from the own shard and, from each redundant part, a number in
/// proportion to the part's share of its shard: own_batch from a whole
/// neighbour shard, round(own_batch * |prefix| / |shard|) from a prefix. So
/// every sample the worker holds is equally likely to be drawn, and the local
/// batch grows with the redundancy as in the paper.
///
/// Draws are uniform with replacement within each part, from the stream
/// rng_key{seed, step, worker}: the batch of a step is a pure function of
/// (plan, worker, own_batch, seed, step), independent of the order of calls.
class shard_sampler {
 public:
  shard_sampler(const shard_plan& plan, int worker, std::size_t own_batch, std::uint64_t seed = 0)
      : worker_(worker), seed_(seed) {
    constexpr std::string_view where = "gcomp::shard_sampler";
    check_positive(where, "own_batch", own_batch);
    const std::span<const shard_part> parts = plan.parts(worker);  // checks worker
    parts_.assign(parts.begin(), parts.end());
    counts_.reserve(parts_.size());
    for (const shard_part& p : parts_) {
      const double share =
          static_cast<double>(p.samples.size()) / static_cast<double>(plan.shard(p.shard).size());
      const auto count =
          static_cast<std::size_t>(std::llround(static_cast<double>(own_batch) * share));
      counts_.push_back(count);
      batch_size_ += count;
    }
  }

  int worker() const { return worker_; }
  std::uint64_t seed() const { return seed_; }
  /// Samples per step: own_batch plus the redundant parts' shares.
  std::size_t batch_size() const { return batch_size_; }
  /// The parts drawn from, as in shard_plan::parts(worker).
  std::span<const shard_part> parts() const { return parts_; }
  /// Draws per step from each part.
  std::span<const std::size_t> part_counts() const { return counts_; }

  /// Writes step `step`'s batch into out (batch_size() entries): the draws
  /// from parts()[0] first, then those of parts()[1], and so on.
  void sample(std::uint64_t step, std::span<std::size_t> out) const {
    check_same_size("gcomp::shard_sampler::sample", "out", out.size(), "batch_size()", batch_size_);
    const rng_key key{seed_, step, static_cast<std::uint32_t>(worker_)};
    std::size_t i = 0;
    for (std::size_t k = 0; k < parts_.size(); ++k) {
      const sample_range r = parts_[k].samples;
      const double length = static_cast<double>(r.size());
      for (std::size_t c = 0; c < counts_[k]; ++c, ++i) {
        // u < 1, but u * length can round up to length for very long parts.
        const auto offset = static_cast<std::size_t>(uniform_double(key, i) * length);
        out[i] = r.begin + std::min(offset, r.size() - 1);
      }
    }
  }

 private:
  int worker_;
  std::uint64_t seed_;
  std::size_t batch_size_ = 0;
  std::vector<shard_part> parts_;
  std::vector<std::size_t> counts_;
};

}  // namespace gcomp
