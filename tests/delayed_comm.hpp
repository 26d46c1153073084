// delayed_comm: an inproc_comm whose non-blocking all-reduces stay pending until the test releases them (a slow network on demand).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "gcomp/comm/inproc.hpp"
#include "gcomp/comm/stats.hpp"

namespace gcomp::test {

class delayed_comm;

/// The request of a delayed_comm::iallreduce_sum. test() answers false while
/// the call is held, without looking at the transport; once released, it
/// waits for the in-process call (all ranks posted it long ago, so this is
/// immediate) and answers true. That makes the step at which completion is
/// seen exactly the step the test chose. wait() is the blocking call the
/// method under test must never make during a step: it is counted.
class delayed_request {
 public:
  delayed_request() = default;
  delayed_request(delayed_request&&) noexcept = default;
  delayed_request& operator=(delayed_request&&) noexcept = default;

  inline bool test();
  inline void wait();

 private:
  friend class delayed_comm;
  delayed_request(inproc_request inner, delayed_comm* owner, std::uint64_t id)
      : inner_(std::move(inner)), owner_(owner), id_(id) {}

  inproc_request inner_;
  delayed_comm* owner_ = nullptr;
  std::uint64_t id_ = 0;
  int tests_ = 0;
};

/// Wraps one rank's inproc_comm; everything but iallreduce_sum passes through.
/// A non-blocking call is held until release() (every call issued so far is
/// let go) or, with auto_release = N > 0, until its N-th test().
class delayed_comm {
 public:
  explicit delayed_comm(inproc_comm& inner, int auto_release = 0)
      : inner_(&inner), auto_release_(auto_release) {}

  int rank() const { return inner_->rank(); }
  int size() const { return inner_->size(); }

  template <class Policy, class T>
  void allreduce_sum(const Policy& policy, std::span<T> data) {
    inner_->allreduce_sum(policy, data);
  }
  template <class Policy>
  void allgather(const Policy& policy, std::span<const std::byte> in, std::span<std::byte> out) {
    inner_->allgather(policy, in, out);
  }
  template <class Policy>
  void allgatherv(const Policy& policy, std::span<const std::byte> in, std::vector<std::byte>& out,
                  std::span<std::size_t> counts) {
    inner_->allgatherv(policy, in, out, counts);
  }
  template <class Policy, class T>
  void broadcast(const Policy& policy, std::span<T> data, int root) {
    inner_->broadcast(policy, data, root);
  }
  void barrier() { inner_->barrier(); }

  template <class Policy, class T>
  [[nodiscard]] delayed_request iallreduce_sum(const Policy& policy, std::span<T> data) {
    return delayed_request(inner_->iallreduce_sum(policy, data), this, issued_++);
  }

  comm_stats stats() const { return inner_->stats(); }

  /// Lets every call issued so far complete.
  void release() { released_before_ = issued_; }
  std::uint64_t issued() const { return issued_; }
  /// test() calls that found a call held, and wait() calls made.
  std::uint64_t held_tests() const { return held_tests_; }
  std::uint64_t waits() const { return waits_; }

 private:
  friend class delayed_request;
  bool held(const delayed_request& r) const {
    if (r.id_ < released_before_) return false;
    return auto_release_ <= 0 || r.tests_ < auto_release_;
  }

  inproc_comm* inner_;
  int auto_release_;
  std::uint64_t issued_ = 0, released_before_ = 0, held_tests_ = 0, waits_ = 0;
};

bool delayed_request::test() {
  if (!owner_) return true;
  ++tests_;
  if (owner_->held(*this)) {
    ++owner_->held_tests_;
    return false;
  }
  inner_.wait();
  return true;
}

void delayed_request::wait() {
  if (owner_) ++owner_->waits_;
  inner_.wait();
}

}  // namespace gcomp::test
