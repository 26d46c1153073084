// Optimizers under thrust_device on Thrust's OpenMP system: state in policy_buffers, results bitwise those of host_seq.
#include <doctest/doctest.h>

#include <gcomp/exec/buffer.hpp>
#include <gcomp/exec/host.hpp>
#include <gcomp/exec/thrust.hpp>

#include <omp.h>

#include <cstdint>
#include <span>
#include <vector>

#include "../optim_sameness.hpp"

namespace {
using namespace gcomp_test::sameness;

static_assert(gcomp::optimizer<gcomp::sgd<float>, gcomp::thrust_device>);
static_assert(gcomp::optimizer<gcomp::adamw<double>, gcomp::thrust_device, double>);
static_assert(gcomp::buffer_policy<gcomp::thrust_device>);

// Restores OpenMP's thread count when a test that changes it ends.
struct omp_threads_guard {
  int saved = omp_get_max_threads();
  ~omp_threads_guard() { omp_set_num_threads(saved); }
};

}  // namespace

TEST_CASE("sgd under thrust_device equals host_seq bitwise") { check_sgd_cases(gcomp::thrust_device{}); }

TEST_CASE("adam and adamw under thrust_device equal host_seq bitwise") {
  check_adam_cases(gcomp::thrust_device{});
}

TEST_CASE("lars under thrust_device equals host_seq bitwise") { check_lars_cases(gcomp::thrust_device{}); }

TEST_CASE("lamb under thrust_device equals host_seq bitwise") { check_lamb_cases(gcomp::thrust_device{}); }

TEST_CASE("optimizers under thrust_device resume from a checkpoint bitwise") {
  check_resume_cases(gcomp::thrust_device{});
}

TEST_CASE("optimizers under thrust_device do not depend on the OpenMP thread count") {
  omp_threads_guard guard;
  for (int threads : {1, 3, 4}) {
    CAPTURE(threads);
    omp_set_num_threads(threads);
    check_same_as_host(gcomp::thrust_device{}, gcomp::lamb<float>({.exclude = is_bias}), true);
    check_same_as_host(gcomp::thrust_device{}, gcomp::lars<float>(gcomp::lars_options{}), false);
  }
}

TEST_CASE("policy_buffer under thrust_device: Thrust memory, sized once, deep copies") {
  const gcomp::thrust_device device;
  gcomp::policy_buffer<float> b;
  CHECK(b.memory() == nullptr);
  CHECK(b.empty());
  b.assign(device, 1000, 2.5f);
  CHECK(b.memory() == &gcomp::thrust_device_memory_kind);
  CHECK(b.memory()->host_accessible);
  CHECK(b.to_host() == std::vector<float>(1000, 2.5f));
  const float* first = b.data();
  // A smaller assign, a clear and a refill reuse the memory.
  b.assign(device, 10, -1.0f);
  b.clear();
  b.assign(device, 1000, 0.0f);
  CHECK(b.data() == first);
  CHECK(b.capacity() == 1000);
  // A copy owns its own contents.
  b.fill(device, 7.0f);
  gcomp::policy_buffer<float> copy = b;
  CHECK(copy.data() != b.data());
  CHECK(copy.memory() == b.memory());
  b.fill(device, 1.0f);
  CHECK(copy.to_host() == std::vector<float>(1000, 7.0f));
  // Host memory serves the OpenMP system (both see the same memory), so state
  // built under host_seq continues under thrust_device without reset().
  gcomp::policy_buffer<float> host;
  host.assign(gcomp::host_seq{}, 4, 1.0f);
  CHECK(host.memory() == &gcomp::host_memory_kind);
  CHECK_NOTHROW(host.check_serves(device, "test", "host"));
  host.fill(device, 3.0f);
  CHECK(host.to_host() == std::vector<float>(4, 3.0f));
}

TEST_CASE("policy_buffer rejects bad sizes with gcomp::error naming the argument") {
  const gcomp::thrust_device device;
  gcomp::policy_buffer<double> b;
  CHECK_THROWS_WITH_AS(b.assign(device, SIZE_MAX / 4, 0.0, "caller"),
                       doctest::Contains("caller: a buffer of n = "), gcomp::error);
  CHECK(b.empty());
  b.assign(device, 3, 1.0);
  std::vector<double> out(2);
  CHECK_THROWS_WITH_AS(b.copy_to_host(std::span<double>(out)),
                       "gcomp::policy_buffer::copy_to_host: out has size 2 but the buffer has "
                       "size 3; they must match",
                       gcomp::error);
  std::vector<double> from(3, 1.0), to(4);
  CHECK_THROWS_WITH_AS(gcomp::copy_to_host(device, std::span<const double>(from), std::span<double>(to)),
                       "gcomp::copy_to_host: to has size 4 but from has size 3; they must match",
                       gcomp::error);
}
