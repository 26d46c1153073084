// A small fork-join thread pool behind host_par; users never name it.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace gcomp::detail {

/// Runs `tasks` calls of a function on the pool's threads and on the calling
/// thread. Several callers may use one pool at once (in-process workers share
/// it), and a task may itself call run(): the caller always works on its own
/// job, so progress never depends on a free pool thread and nothing deadlocks.
class thread_pool {
 public:
  explicit thread_pool(unsigned helpers) {
    threads_.reserve(helpers);
    for (unsigned t = 0; t < helpers; ++t) threads_.emplace_back([this] { work(); });
  }
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;
  ~thread_pool() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

  /// Number of threads that take part in a run(): the helpers plus the caller.
  unsigned concurrency() const { return static_cast<unsigned>(threads_.size()) + 1; }

  /// Calls f(task) for task in [0, tasks), in any order and on any thread;
  /// returns when all are done and rethrows the first exception a task threw.
  template <class F>
  void run(std::size_t tasks, F& f) {
    if (tasks == 0) return;
    if (tasks == 1 || threads_.empty()) {
      for (std::size_t t = 0; t < tasks; ++t) f(t);
      return;
    }
    job j;
    j.tasks = tasks;
    j.context = &f;
    j.call = [](void* context, std::size_t task) { (*static_cast<F*>(context))(task); };
    {
      std::lock_guard lock(mutex_);
      queue_.push_back(&j);
    }
    wake_.notify_all();
    while (execute_one(j)) {
    }
    {
      std::unique_lock lock(mutex_);
      // The job leaves the queue once every task is claimed; a claimed task may
      // still be running on a helper, so wait for the finished count too.
      done_.wait(lock, [&] { return j.finished == j.tasks; });
    }
    if (j.failure) std::rethrow_exception(j.failure);
  }

 private:
  struct job {
    std::size_t tasks = 0;
    std::atomic<std::size_t> next{0};
    std::size_t finished = 0;  // guarded by mutex_
    void* context = nullptr;
    void (*call)(void*, std::size_t) = nullptr;
    std::exception_ptr failure;  // guarded by mutex_
  };

  // Claims and runs one task of j; false when none is left to claim.
  bool execute_one(job& j) {
    const std::size_t task = j.next.fetch_add(1, std::memory_order_relaxed);
    if (task >= j.tasks) {
      retire(j);
      return false;
    }
    run_claimed(j, task);
    return true;
  }

  void retire(job& j) {
    std::lock_guard lock(mutex_);
    for (auto it = queue_.begin(); it != queue_.end(); ++it)
      if (*it == &j) {
        queue_.erase(it);
        break;
      }
  }

  void work() {
    for (;;) {
      job* j = nullptr;
      {
        std::unique_lock lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (stopping_ && queue_.empty()) return;
        j = queue_.front();
        // Rotate so concurrent callers' jobs share the helpers fairly.
        queue_.pop_front();
        queue_.push_back(j);
        // Claim under the lock: the job cannot be retired (and its caller
        // return) between our finding it and our claiming a task of it.
        const std::size_t task = j->next.fetch_add(1, std::memory_order_relaxed);
        if (task >= j->tasks) {
          queue_.pop_back();
          continue;
        }
        lock.unlock();
        run_claimed(*j, task);
      }
    }
  }

  void run_claimed(job& j, std::size_t task) {
    std::exception_ptr failure;
    try {
      j.call(j.context, task);
    } catch (...) {
      failure = std::current_exception();
    }
    bool last = false;
    {
      std::lock_guard lock(mutex_);
      if (failure && !j.failure) j.failure = failure;
      last = (++j.finished == j.tasks);
    }
    if (last) done_.notify_all();
  }

  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::deque<job*> queue_;
  bool stopping_ = false;
};

}  // namespace gcomp::detail
