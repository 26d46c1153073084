// Kernels of PowerSGD's power step: P = M Q, Gram-Schmidt on P, Q = M^T P, and P Q^T added into a buffer (host loops, and one-thread-per-entry functors for device policies that sum in the same order).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>
#include <vector>

#include "gcomp/core/config.hpp"
#include "gcomp/exec/detail/unfused.hpp"
#include "gcomp/exec/host.hpp"

namespace gcomp::detail {

// Calls f(task) for every task in [0, tasks); on a pool when there is enough
// work. Tasks write disjoint outputs, each in a fixed order, so the results do
// not depend on the thread count.
template <class F>
void lowrank_tasks(const host_seq&, std::size_t tasks, std::size_t, F&& f) {
  for (std::size_t t = 0; t < tasks; ++t) f(t);
}

template <class F>
void lowrank_tasks(const host_par& policy, std::size_t tasks, std::size_t work, F&& f) {
  if (tasks <= 1 || work < host_grain || policy.threads() == 1)
    return lowrank_tasks(host_seq{}, tasks, work, f);
  policy.pool().run(tasks, f);
}

inline constexpr std::size_t lowrank_row_chunk = 64;

/// p (rows x r, row-major, double) = m (rows x cols, row-major) * q (cols x r, row-major).
template <class Policy, class T>
void lowrank_multiply(const Policy& policy, const T* m, std::size_t rows, std::size_t cols,
                      const T* q, std::size_t r, double* p) {
  const std::size_t tasks = (rows + lowrank_row_chunk - 1) / lowrank_row_chunk;
  lowrank_tasks(policy, tasks, rows * cols * r, [=](std::size_t t) {
    const std::size_t end = std::min(rows, (t + 1) * lowrank_row_chunk);
    for (std::size_t i = t * lowrank_row_chunk; i < end; ++i) {
      double* pi = p + i * r;
      std::fill(pi, pi + r, 0.0);
      const T* mi = m + i * cols;
      for (std::size_t c = 0; c < cols; ++c) {
        const double v = static_cast<double>(mi[c]);
        const T* qc = q + c * r;
        for (std::size_t j = 0; j < r; ++j) pi[j] += v * static_cast<double>(qc[j]);
      }
    }
  });
}

/// q (cols x r, double) = m^T (cols x rows) * p (rows x r, T): column chunks
/// are independent tasks, each summing over the rows in increasing order.
template <class Policy, class T>
void lowrank_multiply_transposed(const Policy& policy, const T* m, std::size_t rows,
                                 std::size_t cols, const T* p, std::size_t r, double* q) {
  const std::size_t tasks = (cols + lowrank_row_chunk - 1) / lowrank_row_chunk;
  lowrank_tasks(policy, tasks, rows * cols * r, [=](std::size_t t) {
    const std::size_t c0 = t * lowrank_row_chunk, c1 = std::min(cols, c0 + lowrank_row_chunk);
    std::fill(q + c0 * r, q + c1 * r, 0.0);
    for (std::size_t i = 0; i < rows; ++i) {
      const T* mi = m + i * cols;
      const T* pi = p + i * r;
      for (std::size_t c = c0; c < c1; ++c) {
        const double v = static_cast<double>(mi[c]);
        double* qc = q + c * r;
        for (std::size_t j = 0; j < r; ++j) qc[j] += v * static_cast<double>(pi[j]);
      }
    }
  });
}

/// Orthonormalises the r columns of p (rows x r, row-major) in place by
/// modified Gram-Schmidt with one re-orthogonalisation pass ("twice is
/// enough", Giraud et al. 2005). A column that keeps less than `tolerance` of
/// its norm after projection is (numerically) dependent on the earlier ones:
/// it is set to zero and degenerate[j] = 1, so P Q^T simply has lower rank.
inline void lowrank_orthonormalise(double* p, std::size_t rows, std::size_t r,
                                   unsigned char* degenerate, double tolerance = 1e-9) {
  auto dot = [&](std::size_t a, std::size_t b) {
    double s = 0.0;
    for (std::size_t i = 0; i < rows; ++i) s += p[i * r + a] * p[i * r + b];
    return s;
  };
  for (std::size_t j = 0; j < r; ++j) {
    const double before = std::sqrt(dot(j, j));
    for (int pass = 0; pass < 2; ++pass)
      for (std::size_t l = 0; l < j; ++l) {
        if (degenerate[l]) continue;
        const double coefficient = dot(l, j);
        for (std::size_t i = 0; i < rows; ++i) p[i * r + j] -= coefficient * p[i * r + l];
      }
    const double after = std::sqrt(dot(j, j));
    degenerate[j] = !(before > 0.0) || !(after > tolerance * before) || !std::isfinite(after);
    const double inverse = degenerate[j] ? 0.0 : 1.0 / after;
    for (std::size_t i = 0; i < rows; ++i) p[i * r + j] *= inverse;
  }
}

/// out (rows x cols at `out`) += scale * p q^T, p rows x r and q cols x r.
template <class Policy, class T>
void lowrank_add_product(const Policy& policy, const T* p, const T* q, std::size_t rows,
                         std::size_t cols, std::size_t r, T scale, T* out) {
  const std::size_t tasks = (rows + lowrank_row_chunk - 1) / lowrank_row_chunk;
  lowrank_tasks(policy, tasks, rows * cols * r, [=](std::size_t t) {
    const std::size_t end = std::min(rows, (t + 1) * lowrank_row_chunk);
    for (std::size_t i = t * lowrank_row_chunk; i < end; ++i) {
      const T* pi = p + i * r;
      T* oi = out + i * cols;
      for (std::size_t c = 0; c < cols; ++c) {
        const T* qc = q + c * r;
        double s = 0.0;
        for (std::size_t j = 0; j < r; ++j) s += static_cast<double>(pi[j]) * static_cast<double>(qc[j]);
        oi[c] += scale * static_cast<T>(s);
      }
    }
  });
}

// One thread per output entry under a device policy. Each entry is summed
// in the host loops' order (from 0.0, one term after another, the product
// rounded before the sum), so the results are bitwise the host's; the host
// loops above are faster on a CPU, these are the first, uncoalesced form on a
// GPU (each thread walks a row or a column of M).

/// p[t] for t = i * r + j: sum over c of m[i][c] * q[c][j] (lowrank_multiply).
template <class T>
struct lowrank_multiply_entry {
  const T* m;
  const T* q;
  double* p;
  std::size_t cols, r;
  GCOMP_HD void operator()(std::size_t t) const {
    const std::size_t i = t / r, j = t % r;
    const T* mi = m + i * cols;
    double s = 0.0;
    for (std::size_t c = 0; c < cols; ++c)
      s = add_unfused(s, mul_unfused(static_cast<double>(mi[c]), static_cast<double>(q[c * r + j])));
    p[t] = s;
  }
};

/// q[t] for t = c * r + j: sum over i of m[i][c] * p[i][j] (lowrank_multiply_transposed).
template <class T>
struct lowrank_multiply_transposed_entry {
  const T* m;
  const T* p;
  double* q;
  std::size_t rows, cols, r;
  GCOMP_HD void operator()(std::size_t t) const {
    const std::size_t c = t / r, j = t % r;
    double s = 0.0;
    for (std::size_t i = 0; i < rows; ++i)
      s = add_unfused(s, mul_unfused(static_cast<double>(m[i * cols + c]), static_cast<double>(p[i * r + j])));
    q[t] = s;
  }
};

/// out[t] += scale * T(sum over j of p[i][j] q[c][j]) for t = i * cols + c
/// (lowrank_add_product).
template <class T>
struct lowrank_add_product_entry {
  const T* p;
  const T* q;
  T* out;
  std::size_t cols, r;
  T scale;
  GCOMP_HD void operator()(std::size_t t) const {
    const std::size_t i = t / cols, c = t % cols;
    double s = 0.0;
    for (std::size_t j = 0; j < r; ++j)
      s = add_unfused(s, mul_unfused(static_cast<double>(p[i * r + j]), static_cast<double>(q[c * r + j])));
    out[t] = add_unfused(out[t], mul_unfused(scale, static_cast<T>(s)));
  }
};

}  // namespace gcomp::detail
