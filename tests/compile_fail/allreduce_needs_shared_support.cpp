// A compressor without shared support handed to the all-reduce aggregator must
// not compile, and the diagnostic must name the unmet requirement.
// expect: shared_support
#include <span>
#include <vector>

#include "gcomp/gcomp.hpp"

struct private_indices : gcomp::identity<float> {
  static constexpr bool shared_support = false;  // payloads do not line up across workers
};

int main() {
  gcomp::inproc_group group(1);
  gcomp::pipeline p{private_indices{}, gcomp::allreduce{}, gcomp::sgd<float>{}};
  const gcomp::layout lay{2};
  std::vector<float> x(2), g(2);
  p.step(gcomp::host_seq{}, group.comm(0), lay, std::span<float>(x), std::span<const float>(g));
}
