// stateful_wrapper<C>: the shell shared by error_feedback<C> and ef21<C>.
#pragma once

#include <cstddef>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/core/checkpoint.hpp"
#include "gcomp/core/concepts.hpp"
#include "gcomp/core/error.hpp"
#include "gcomp/exec/buffer.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp::detail {

/// Base of a compressor that wraps C with one per-worker vector of state
/// (allocated at the first compress(), sized to that gradient, and reused) and
/// one scratch buffer of the same size, both in the memory of the first
/// step's policy (device memory under cuda_par; a later step under a policy
/// that memory does not serve throws). The payload is C's, so decompression,
/// wire size and bits per element are C's; the result is always biased and has
/// shared support exactly when C has. Derived classes supply compress() and
/// the accessors to the state under their own names.
template <class C>
class stateful_wrapper {
 public:
  using compressor_type = C;
  using value_type = typename C::value_type;
  using payload = typename C::payload;
  static constexpr bool unbiased = false;
  static constexpr bool shared_support = compressor_traits<C>::shared_support;

  /// out += scale * (what `message` carries, decoded by C).
  template <class Policy>
  void decompress_add(const Policy& policy, const payload& message, std::span<value_type> out,
                      value_type scale) const {
    inner_.decompress_add(policy, message, out, scale);
  }

  std::size_t wire_bytes(const payload& message) const { return inner_.wire_bytes(message); }
  double bits_per_element(std::size_t n) const {
    return compressor_traits<C>::bits_per_element(inner_, n);
  }

  C& inner() { return inner_; }
  const C& inner() const { return inner_; }

 protected:
  stateful_wrapper() = default;
  explicit stateful_wrapper(C inner) : inner_(std::move(inner)) {}

  /// Before a step on a gradient of size n: the state must already have size
  /// n (after the first step; else fails as `where` naming it `state_name`)
  /// in memory that serves `policy`, or is zeroed to size n; the scratch
  /// buffer gets size n.
  template <class Policy>
  void prepare(const Policy& policy, std::string_view where, std::string_view state_name,
               std::size_t n) {
    if (started_) {
      check_same_size(where, "gradient", n, state_name, state_.size());
      state_.check_serves(policy, where, state_name);
    } else {
      state_.assign(policy, n, value_type(0), where);
    }
    scratch_.resize(policy, n, where);
  }

  /// The state as a span, for accessors: host memory under host policies,
  /// the policy's memory otherwise (read it with gcomp::copy_to_host).
  std::span<const value_type> state_span() const { return state_.span(); }
  std::span<value_type> state_span() { return state_.span(); }

  /// Zeroes the state (size and storage kept) with `policy`'s kernels.
  template <class Policy>
  void zero_state(const Policy& policy) {
    state_.fill(policy, value_type(0), "gcomp::error_feedback/ef21::reset");
  }
  /// Zeroes host-accessible state; device state needs zero_state(policy).
  void zero_host_state(std::string_view where) {
    if (state_.empty()) return;
    require(state_.memory()->host_accessible, where, "the state is in ", state_.memory()->name,
            ": call reset(policy) with the policy it was built under");
    std::fill(state_.data(), state_.data() + state_.size(), value_type(0));
  }

  /// The section of a wrapper (`kind`, version 1): whether a step was taken,
  /// the state vector (named `state_name`) and C's own state nested inside.
  /// The scratch buffer is rebuilt by every step, so it is not saved.
  void save_section(checkpoint_writer& out, std::string_view kind,
                    std::string_view state_name) const {
    out.begin(kind, 1);
    out.value("started", started_);
    if (state_.empty() || state_.memory()->host_accessible) {
      out.array(state_name, state_.span());
    } else {
      const std::vector<value_type> host = state_.to_host();  // device state: one copy per save
      out.array(state_name, std::span<const value_type>(host));
    }
    save_state(out, inner_);
    out.end();
  }

  /// Reads what save_section wrote. A started wrapper knows its size and
  /// takes only a state of that size; a fresh one takes the size the
  /// checkpoint has. Everything is read into temporaries (C into a copy), so
  /// a rejected checkpoint leaves the wrapper and C as they were.
  template <class Policy>
  void load_section(const Policy& policy, checkpoint_reader& in, std::string_view kind,
                    std::string_view state_name) {
    in.begin(kind, 1);
    const bool started = in.value<bool>("started");
    std::vector<value_type> state;
    if (started_) {
      state.resize(state_.size());
      in.array(state_name, std::span<value_type>(state));
    } else {
      state = in.vector<value_type>(state_name);
    }
    // The new state in the policy's memory, before anything is replaced.
    policy_buffer<value_type> loaded;
    loaded.assign_from_host(policy, std::span<const value_type>(state), "gcomp::checkpoint load");
    if constexpr (requires { inner_.load(policy, in); }) {
      C inner(inner_);
      inner.load(policy, in);
      in.end();
      inner_ = std::move(inner);
    } else {
      in.end();
    }
    state_ = std::move(loaded);
    started_ = started;
  }

  C inner_;
  policy_buffer<value_type> state_;
  policy_buffer<value_type> scratch_;
  bool started_ = false;
};

}  // namespace gcomp::detail
