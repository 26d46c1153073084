// Trains a 2-parameter least-squares model with 2 in-process workers through
// the installed gcomp headers; exits non-zero unless it converges.
#include <gcomp/gcomp.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  const gcomp::layout lay{{"w", 1}, {"b", 1}};
  gcomp::inproc_group group(2);
  std::vector<std::vector<float>> params(2, std::vector<float>(2, 0.0f));
  group.run([&](gcomp::inproc_comm& comm) {
    gcomp::pipeline p{gcomp::identity<float>{}, gcomp::allreduce{},
                      gcomp::sgd<float>{{.lr = 0.5}}};
    std::vector<float>& x = params[comm.rank()];
    std::vector<float> g(2);
    for (int step = 0; step < 300; ++step) {
      // Worker r fits y = 2 t + 1 at t = r: loss (w t + b - y)^2 / 2.
      const float t = static_cast<float>(comm.rank());
      const float residual = x[0] * t + x[1] - (2.0f * t + 1.0f);
      g = {residual * t, residual};
      p.step(gcomp::host_seq{}, comm, lay, std::span<float>(x), std::span<const float>(g));
    }
  });
  const bool ok = std::fabs(params[0][0] - 2.0f) < 1e-3f && std::fabs(params[0][1] - 1.0f) < 1e-3f &&
                  params[0] == params[1];
  std::printf("consumer: w=%.4f b=%.4f %s\n", params[0][0], params[0][1], ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
